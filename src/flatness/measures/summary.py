"""Several measures in one call, as a flat JSON-ready dict (the ``flatness measure`` command).

:func:`final_measures` is the cheap set an experiment run records at its end (λ_max, Tr(H),
the empirical Fisher trace and the loss). :func:`compute_measures` runs any of
:data:`MEASURES` by name with shared options.

Which function is measured (``MeasureOptions.function``, ``final_measures(function=...)``):
``"deployed"`` (default) is the model as it predicts — eval mode, BatchNorm with its running
statistics, dropout off; ``"batch_stats"`` is the function training differentiated — BatchNorm
with the statistics of each measured batch (so they depend on the measurement batch size),
dropout off. Running statistics are never written (:func:`flatness.passes.measure_pass`).

Example:
    >>> import torch
    >>> from torch import nn
    >>> from flatness.measures import compute_measures
    >>> model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    >>> data = [(torch.randn(32, 3, dtype=torch.float64), torch.randint(0, 2, (32,)))]
    >>> out = compute_measures(model, nn.functional.cross_entropy, data, ["loss", "lambda_max"])
    >>> sorted(out)[:3]
    ['condition_number_topk', 'effective_dimension_topk', 'eigen_matvecs']
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from torch import Tensor, nn

from ..batch_loss import BatchLoss
from ..passes import FUNCTIONS, Function, measure_pass
from ..utils import FlatnessError, eval_mode
from .divergence import model_divergence
from .eigen import last_layer, top_eigenvalues
from .fisher import fisher_trace
from .functional import (
    Batch,
    LossFn,
    accepts_model_loss,
    collect_batches,
    evaluate_at,
    trainable_params,
)
from .local_entropy import local_entropy
from .margin import output_margin
from .noise import noisy_loss
from .norms import distance_from_init, parameter_norm, path_norm
from .pac_bayes import pac_bayes
from .sharpness import adaptive_sharpness, eps_sharpness
from .sq_trace import hessian_sq_trace
from .trace import hessian_trace

__all__ = ["MeasureOptions", "MEASURES", "DEFAULT_MEASURES", "compute_measures", "final_measures"]


@dataclass(frozen=True)
class MeasureOptions:
    """Options shared by the measures (CLI flags)."""

    seed: int = 0
    matvecs: int = 100
    k: int = 3
    eigen_tol: float | None = None
    eps: float = 1e-3
    adaptive_eps: float = 1e-2
    sharpness_steps: int = 20
    sigma: float = 0.01
    noise_samples: int = 20
    divergence_eps: float = 0.1
    divergence_samples: int = 10
    # Jiang et al.'s reference measures: the initial weights (for distance_from_init and the
    # PAC-Bayes init bounds), the margin quantile, the PAC-Bayes error deviation and draws
    initial: Mapping[str, Tensor] | None = None
    margin_quantile: float = 0.1
    pacbayes_deviation: float = 0.1
    pacbayes_samples: int = 10
    # Entropy-SGD's local entropy (:mod:`.local_entropy`): scope γ, thermal noise ε, Langevin
    # steps per quadrature node, step size (None: 0.05/γ), quadrature nodes
    entropy_gamma: float = 100.0
    entropy_noise: float = 0.1
    entropy_steps: int = 30
    entropy_step_size: float | None = None
    entropy_nodes: int = 6
    function: Function = "deployed"

    def __post_init__(self) -> None:
        if self.function not in FUNCTIONS:
            raise FlatnessError(f"function must be one of {FUNCTIONS}, got {self.function!r}")


Measure = Callable[[nn.Module, LossFn, list[Batch], MeasureOptions], dict[str, Any]]


def _loss(model: nn.Module, loss_fn: LossFn, data: list[Batch], o: MeasureOptions) -> dict[str, Any]:
    with eval_mode(model):
        return {"loss": evaluate_at(model, loss_fn, data, trainable_params(model))[0]}


def _trace(model: nn.Module, loss_fn: LossFn, data: list[Batch], o: MeasureOptions) -> dict[str, Any]:
    est = hessian_trace(model, loss_fn, data, o.matvecs, "hutchinson", seed=o.seed)
    return {"hessian_trace": est.value, "hessian_trace_stderr": est.stderr,
            "hessian_trace_matvecs": est.num_samples}


def _hutchpp(model: nn.Module, loss_fn: LossFn, data: list[Batch], o: MeasureOptions) -> dict[str, Any]:
    est = hessian_trace(model, loss_fn, data, max(3, o.matvecs), "hutch++", seed=o.seed)
    return {"hessian_trace_hutchpp": est.value, "hessian_trace_hutchpp_stderr": est.stderr}


def _sq_trace(model: nn.Module, loss_fn: LossFn, data: list[Batch], o: MeasureOptions) -> dict[str, Any]:
    est = hessian_sq_trace(model, loss_fn, data, o.matvecs, seed=o.seed)
    return {"hessian_sq_trace": est.value, "hessian_sq_trace_stderr": est.stderr,
            "hessian_sq_trace_matvecs": est.num_samples}


def _eigen(model: nn.Module, loss_fn: LossFn, data: list[Batch], o: MeasureOptions) -> dict[str, Any]:
    spec = top_eigenvalues(model, loss_fn, data, o.k, tol=o.eigen_tol, seed=o.seed)
    return spec.as_dict()


def _last_layer(model: nn.Module, loss_fn: LossFn, data: list[Batch], o: MeasureOptions) -> dict[str, Any]:
    name, params = last_layer(model)
    spec = top_eigenvalues(model, loss_fn, data, 1, params=params, tol=o.eigen_tol, seed=o.seed)
    return {"last_layer_lambda_max": spec.lambda_max, "last_layer": name or type(model).__name__}


def _eps(model: nn.Module, loss_fn: LossFn, data: list[Batch], o: MeasureOptions) -> dict[str, Any]:
    s = eps_sharpness(model, loss_fn, data, o.eps, "box", steps=o.sharpness_steps, seed=o.seed)
    return {"eps_sharpness": s.value, "eps_sharpness_keskar": s.keskar, "eps_sharpness_eps": s.eps}


def _adaptive(model: nn.Module, loss_fn: LossFn, data: list[Batch], o: MeasureOptions) -> dict[str, Any]:
    s = adaptive_sharpness(model, loss_fn, data, o.adaptive_eps, steps=o.sharpness_steps, seed=o.seed)
    return {"adaptive_sharpness": s.value, "adaptive_sharpness_eps": s.eps}


def _noise(model: nn.Module, loss_fn: LossFn, data: list[Batch], o: MeasureOptions) -> dict[str, Any]:
    r = noisy_loss(model, loss_fn, data, o.sigma, o.noise_samples, seed=o.seed)
    return {"noise_loss": r.mean, "noise_loss_stderr": r.stderr, "noise_loss_ci": [r.ci_low, r.ci_high],
            "noise_loss_increase": r.increase, "noise_sigma": r.sigma}


def _local_entropy(model: nn.Module, loss_fn: LossFn, data: list[Batch], o: MeasureOptions) -> dict[str, Any]:
    r = local_entropy(model, loss_fn, data, o.entropy_gamma, o.entropy_noise, steps=o.entropy_steps,
                      burn_in=o.entropy_steps // 3, step_size=o.entropy_step_size, nodes=o.entropy_nodes,
                      seed=o.seed)
    return {"local_entropy": r.value, "local_entropy_stderr": r.stderr,
            "local_entropy_sharpness": r.sharpness, "local_entropy_gamma": r.gamma,
            "local_entropy_noise": r.noise, "local_entropy_step_size": r.step_size}


def _fisher(model: nn.Module, loss_fn: LossFn, data: list[Batch], o: MeasureOptions) -> dict[str, Any]:
    est = fisher_trace(model, loss_fn, data)
    return {"fisher_trace": est.value, "fisher_trace_stderr": est.stderr}


def _divergence(model: nn.Module, loss_fn: LossFn, data: list[Batch], o: MeasureOptions) -> dict[str, Any]:
    est = model_divergence(model, data, o.divergence_eps, o.divergence_samples, seed=o.seed)
    return {"model_divergence": est.value, "model_divergence_stderr": est.stderr,
            "model_divergence_eps": o.divergence_eps}


def _param_norm(model: nn.Module, loss_fn: LossFn, data: list[Batch], o: MeasureOptions) -> dict[str, Any]:
    return {"param_norm": parameter_norm(model)}


def _path_norm(model: nn.Module, loss_fn: LossFn, data: list[Batch], o: MeasureOptions) -> dict[str, Any]:
    return {"path_norm": path_norm(model, data[0].x)}


def _distance(model: nn.Module, loss_fn: LossFn, data: list[Batch], o: MeasureOptions) -> dict[str, Any]:
    if o.initial is None:
        raise FlatnessError("distance_from_init needs the initial weights (MeasureOptions.initial)")
    return {"distance_from_init": distance_from_init(model, o.initial)}


def _margin(model: nn.Module, loss_fn: LossFn, data: list[Batch], o: MeasureOptions) -> dict[str, Any]:
    m = output_margin(model, data, o.margin_quantile)
    return {"output_margin": m.value, "inverse_margin_sq": m.inverse_sq, "margin_quantile": m.quantile}


def _pac_bayes(model: nn.Module, loss_fn: LossFn, data: list[Batch], o: MeasureOptions, mag: bool) -> dict[str, Any]:
    r = pac_bayes(model, loss_fn, data, o.pacbayes_deviation, magnitude_aware=mag, initial=o.initial,
                  samples=o.pacbayes_samples, seed=o.seed)
    key = "pacbayes_mag" if mag else "pacbayes"
    out = {f"{key}_sigma": r.sigma, f"{key}_flatness": r.flatness, f"{key}_orig": r.bound_orig}
    if r.bound_init is not None:
        out[f"{key}_init"] = r.bound_init
    return out


def _pacbayes_plain(model: nn.Module, loss_fn: LossFn, data: list[Batch], o: MeasureOptions) -> dict[str, Any]:
    return _pac_bayes(model, loss_fn, data, o, mag=False)


def _pacbayes_mag(model: nn.Module, loss_fn: LossFn, data: list[Batch], o: MeasureOptions) -> dict[str, Any]:
    return _pac_bayes(model, loss_fn, data, o, mag=True)


MEASURES: dict[str, Measure] = {
    "loss": _loss,
    "hessian_trace": _trace,
    "hutchpp_trace": _hutchpp,
    "hessian_sq_trace": _sq_trace,
    "lambda_max": _eigen,
    "last_layer_lambda_max": _last_layer,
    "eps_sharpness": _eps,
    "adaptive_sharpness": _adaptive,
    "noise_loss": _noise,
    "local_entropy": _local_entropy,
    "fisher_trace": _fisher,
    "model_divergence": _divergence,
    "param_norm": _param_norm,
    "path_norm": _path_norm,
    "distance_from_init": _distance,
    "margin": _margin,
    "pacbayes": _pacbayes_plain,
    "pacbayes_mag": _pacbayes_mag,
}
"""Measure names → functions returning their JSON keys (``lambda_max`` also gives the top-k)."""

DEFAULT_MEASURES: tuple[str, ...] = (
    "loss", "hessian_trace", "hessian_sq_trace", "lambda_max", "last_layer_lambda_max",
    "eps_sharpness", "fisher_trace",
)


NEEDS_OUTPUT: frozenset[str] = frozenset({"margin", "model_divergence", "path_norm", "pacbayes", "pacbayes_mag"})
"""Measures of the model's output (logits), which a :class:`flatness.ModelLoss` does not expose."""


@accepts_model_loss
def compute_measures(
    model: nn.Module,
    loss_fn: LossFn,
    batches: Iterable[tuple[Any, Any]],
    measures: Sequence[str] = DEFAULT_MEASURES,
    options: MeasureOptions | None = None,
    *,
    timings: bool = False,
) -> dict[str, Any]:
    """Run the named measures on the same data; one flat dict of their results.

    With ``timings``, ``seconds_<name>`` keys give each measure's wall time.
    """
    unknown = [m for m in measures if m not in MEASURES]
    if unknown:
        raise FlatnessError(f"unknown measure(s) {unknown}; expected some of {sorted(MEASURES)}")
    if isinstance(model, BatchLoss):
        need = [m for m in measures if m in NEEDS_OUTPUT]
        if need:
            raise FlatnessError(
                f"measure(s) {need} need the model's output, and a ModelLoss gives only the loss: "
                "measure with loss_fn(output, target)"
            )
    options = options or MeasureOptions()
    data = collect_batches(batches)
    out: dict[str, Any] = {}
    with measure_pass(model, options.function):
        for name in dict.fromkeys(measures):  # keep order, drop repeats
            start = time.perf_counter()
            out.update(MEASURES[name](model, loss_fn, data, options))
            if timings:
                out[f"seconds_{name}"] = time.perf_counter() - start
    return out


@accepts_model_loss
def final_measures(
    model: nn.Module,
    loss_fn: LossFn,
    batches: Iterable[tuple[Any, Any]],
    seed: int = 0,
    *,
    matvecs: int = 30,
    function: Function = "deployed",
) -> dict[str, float]:
    """The cheap end-of-run set: ``loss``, ``lambda_max``, ``hessian_trace`` (+ ``_stderr``), ``fisher_trace``.

    λ_max to 1e-3 relative, Tr(H) by Hutchinson with ``matvecs`` products; ``function`` as in the
    module docs.
    """
    data = collect_batches(batches)
    with measure_pass(model, function):
        loss = evaluate_at(model, loss_fn, data, trainable_params(model))[0]
        spec = top_eigenvalues(model, loss_fn, data, 1, tol=1e-3, seed=seed)
        trace = hessian_trace(model, loss_fn, data, matvecs, seed=seed)
        fisher = fisher_trace(model, loss_fn, data, function=function)
    return {
        "loss": loss,
        "lambda_max": spec.lambda_max,
        "hessian_trace": trace.value,
        "hessian_trace_stderr": trace.stderr,
        "fisher_trace": fisher.value,
    }
