r"""The correctness half of ``flatness bench gpu``: the device against float64 on the CPU.

Every quantity is computed twice from the same weights, the same batch and the same probes (a
seeded probe generator lives on the CPU, so a seed draws the same probes for every device and
dtype: :mod:`flatness.probes`): once in float64 on the CPU (the reference) and once in float32 on
the device under test, with TF32 off (``fp32``) and on (``tf32``: both
``torch.backends.cuda.matmul.allow_tf32`` and ``torch.backends.cudnn.allow_tf32``). A case passes
when the relative error ‖device − reference‖ / ‖reference‖ of each compared quantity is within
its tolerance (:data:`TOLERANCES`; NaN never passes).

Cases (:func:`penalty_case`, :func:`update_case`, :func:`measure_case`):

- the FA penalty ``FlatnessPenalty(..., backend=B)`` (λ = 1, M probes, every step): the Tr(H²)
  estimate and the gradient of the penalty term, for every backend the model admits
  (``autograd``, ``layerwise``, ``finite-difference``, ``kfac``) and the control-variate
  estimator (``estimator="cv"``, default backend);
- one step of SAM and of NRS (SGD with lr = 1 from the same weights): the parameter update and
  the buffers after the step (BatchNorm's running statistics);
- λ_max (Lanczos) and Tr(H) (Hutchinson, the same Rademacher probes) of a small model.

Tolerances. Unit roundoff u = 2⁻²⁴ ≈ 6·10⁻⁸ in float32 and u = 2⁻¹¹ ≈ 4.9·10⁻⁴ in TF32 (a
10-bit mantissa for the operands of matrix products and convolutions; accumulation stays
float32). A quantity that passes through s rounded product stages carries a relative error of
about √s·u when the rounding errors are independent: the penalty's value (forward, backward and
double backward through depth L ≈ 20: s ≈ 60, twice that for the square ‖Hv‖²) ≈ 10·u, its
gradient (one more differentiation) ≈ 12·u, a first-order update ≈ 6·u.

- ``exact`` (autograd, layerwise, K-FAC, control variate: the same function in exact
  arithmetic): float32 1e-4 (value) / 1e-3 (gradient), over 100 × the √s·u estimate, for the
  device's other summation orders (split-K, atomics) and conditioning; TF32 2e-2 / 5e-2, about
  4 × the √s·u estimate (≈ 5e-3 / 6e-3).
- ``finite-difference``: its float32 error is the estimator's own rounding error ε‖g‖/(r s)
  (:mod:`flatness.finite_difference`), a property of the method, not of the device. So the
  same case is also computed in float32 on the CPU, and the device passes when its error is
  within 3 × that CPU float32 error (spread between summation orders) or within the ``exact``
  tolerance of its precision, whichever is larger. TF32's 8192-fold larger u is not excused:
  a first-order penalty under TF32 must be as good as an exact one under TF32.
- ``update`` (SAM, NRS: first derivatives at a perturbed point): float32 1e-4, TF32 1e-2.
- ``measure``: Tr(H) (the same probes on both sides) and λ_max (Lanczos, whose float32 stopping
  rule is a residual of ``1e-4·|λ|``: :func:`flatness.measures.eigenvalues_of`): float32 1e-3,
  TF32 1e-2.

Measured with the CPU as the device (float32 against float64, the full run's models and sizes,
one thread: ``run_correctness(FULL, torch.device("cpu"), 0, None, print)`` of
:mod:`.gpu`): every case passes; the largest errors of the exact backends are 1.1e-7 (value)
and 2.0e-6 (gradient, ResNet-20), of the updates 1.2e-6 (SAM, MLP), of the measures 1.4e-7;
the finite-difference gradient is off by 22 % on the paper's MLP, 2.4 % on ResNet-20 and 7.0 %
on the ViT (values: 1.2e-5, 3.6e-4, 7.7e-4).

A K-FAC case draws its labels from the model's softmax on the CPU generator; probabilities that
differ in the last bits can, rarely, flip one sampled label (then the case fails by about 1/B
and says so by its size).
"""

from __future__ import annotations

import contextlib
import copy
import math
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from .... import FlatnessPenalty
from ....measures import hessian_trace, top_eigenvalues
from ....methods import make_method

__all__ = [
    "PRECISIONS",
    "Tolerance",
    "TOLERANCES",
    "FD_SPREAD",
    "PENALTY_SETTINGS",
    "tf32",
    "relative_error",
    "penalty_case",
    "update_case",
    "measure_case",
    "tolerance_notes",
]

PRECISIONS: tuple[str, ...] = ("fp32", "tf32")


@dataclass(frozen=True)
class Tolerance:
    """Relative error bars of a case's value (a scalar) and gradient / update (a vector)."""

    value: float
    grad: float


TOLERANCES: dict[str, dict[str, Tolerance]] = {
    "exact": {"fp32": Tolerance(1e-4, 1e-3), "tf32": Tolerance(2e-2, 5e-2)},
    "update": {"fp32": Tolerance(1e-4, 1e-4), "tf32": Tolerance(1e-2, 1e-2)},
    "measure": {"fp32": Tolerance(1e-3, 1e-3), "tf32": Tolerance(1e-2, 1e-2)},
}
FD_SPREAD = 3.0  # a device's finite-difference error may be this many times the CPU's float32 one

# label -> FlatnessPenalty keyword arguments (the control variate on the default backend)
PENALTY_SETTINGS: dict[str, dict[str, str]] = {
    "autograd": {"backend": "autograd"},
    "layerwise": {"backend": "layerwise"},
    "finite-difference": {"backend": "finite-difference"},
    "kfac": {"backend": "kfac"},
    "cv": {"estimator": "cv"},
}

LOSS = nn.CrossEntropyLoss()
CORRUPTION = 1.5  # what an injected fault multiplies the device's figures by


def tolerance_notes() -> dict[str, object]:
    """The tolerances and their reasons, as written into the JSON."""
    return {
        "unit_roundoff": {"fp32": 2.0**-24, "tf32": 2.0**-11},
        "relative_error": "‖device − reference‖ / ‖reference‖; the reference is float64 on the CPU",
        **{family: {p: vars(t) for p, t in by.items()} for family, by in TOLERANCES.items()},
        "finite-difference": (
            f"max({FD_SPREAD} × the same case's float32 error on the CPU, the 'exact' tolerance of "
            "the precision): its float32 error is the estimator's own rounding error"
        ),
        "why": "see the docstring of flatness.experiments.running.bench.gpu_checks",
    }


@contextlib.contextmanager
def tf32(enabled: bool) -> Iterator[None]:
    """TF32 for CUDA matrix products and cuDNN convolutions on or off; both flags restored."""
    matmul, cudnn = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = enabled
    torch.backends.cudnn.allow_tf32 = enabled
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = matmul
        torch.backends.cudnn.allow_tf32 = cudnn


def relative_error(value: Tensor | float, reference: Tensor | float) -> float:
    """‖value − reference‖ / ‖reference‖ in float64 (∞ for a non-finite value or error)."""
    a = torch.as_tensor(value, dtype=torch.float64).cpu()
    b = torch.as_tensor(reference, dtype=torch.float64).cpu()
    if not bool(torch.isfinite(a).all()):
        return math.inf
    scale = float(torch.linalg.vector_norm(b))
    err = float(torch.linalg.vector_norm(a - b)) / (scale if scale > 0 else 1.0)
    return err if math.isfinite(err) else math.inf


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _flat(tensors: Sequence[Tensor | None], like: Sequence[Tensor]) -> Tensor:
    return torch.cat([
        (torch.zeros_like(p) if t is None else t).detach().reshape(-1).to("cpu", torch.float64)
        for t, p in zip(tensors, like, strict=True)
    ])


def _placed(model: nn.Module, device: torch.device, dtype: torch.dtype) -> nn.Module:
    return copy.deepcopy(model).to(device=device, dtype=dtype).train()


@dataclass
class _Run:
    """One evaluation of a case: its figures, its time and what it warned."""

    value: float
    vector: Tensor | None
    seconds: float
    warnings: list[str]


def _timed(fn: Callable[[], tuple[float, Tensor | None]], device: torch.device) -> _Run:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _synchronize(device)
        start = time.perf_counter()
        value, vector = fn()
        _synchronize(device)
        seconds = time.perf_counter() - start
    messages = sorted({" ".join(str(w.message).split())[:200] for w in caught})
    return _Run(value, vector, seconds, messages)


def _penalty(
    model: nn.Module, x: Tensor, y: Tensor, settings: dict[str, str], probes: int, seed: int
) -> tuple[float, Tensor]:
    params = [p for p in model.parameters() if p.requires_grad]
    penalty = FlatnessPenalty(model, LOSS, lam=1.0, probes=probes, every=1, seed=seed, **settings)  # type: ignore[arg-type]
    term = penalty(x, y)
    grads = torch.autograd.grad(term, params, allow_unused=True)
    return float(penalty.last_sq_trace), _flat(grads, params)  # type: ignore[arg-type]


def _compare(
    case: dict[str, Any], ref: _Run, dev: _Run, tol: Tolerance, corrupt: bool, names: tuple[str, str | None]
) -> dict[str, Any]:
    value, vector = dev.value, dev.vector
    if corrupt:  # the test hook: a wrong figure must fail the case
        value = value * CORRUPTION
        vector = None if vector is None else vector * CORRUPTION
    value_key, vector_key = names
    value_err = relative_error(value, ref.value)
    passed = value_err <= tol.value
    case.update({
        f"{value_key}_reference": ref.value,
        value_key: value,
        f"{value_key}_rel_err": value_err,
        f"{value_key}_rtol": tol.value,
    })
    if vector is not None and ref.vector is not None and vector_key:
        vector_err = relative_error(vector, ref.vector)
        passed = passed and vector_err <= tol.grad
        case.update({f"{vector_key}_rel_err": vector_err, f"{vector_key}_rtol": tol.grad})
    case.update({
        "reference_s": ref.seconds,
        "device_s": dev.seconds,
        "warnings": sorted(set(ref.warnings) | set(dev.warnings)),
        "passed": passed,
    })
    if corrupt:
        case["fault_injected"] = True
    return case


class References:
    """float64 CPU results, computed once per case and shared by both TF32 settings."""

    def __init__(self) -> None:
        self._cache: dict[str, _Run] = {}

    def get(self, key: str, compute: Callable[[], _Run]) -> _Run:
        if key not in self._cache:
            self._cache[key] = compute()
        return self._cache[key]


def penalty_case(
    refs: References, model_name: str, model: nn.Module, x: Tensor, y: Tensor, label: str,
    precision: str, device: torch.device, probes: int, seed: int, fault: str | None,
) -> dict[str, Any]:
    """The penalty's Tr(H²) estimate and gradient by backend ``label`` on ``device`` vs float64."""
    settings = PENALTY_SETTINGS[label]
    case_id = f"penalty:{model_name}:{label}:{precision}"
    case: dict[str, Any] = {"id": case_id, "kind": "penalty", "model": model_name, "backend": label,
                            "precision": precision, "probes": probes, "batch": int(x.shape[0]), **settings}
    cpu = torch.device("cpu")

    def on(where: torch.device, dtype: torch.dtype) -> Callable[[], tuple[float, Tensor]]:
        return lambda: _penalty(_placed(model, where, dtype), x.to(where, dtype), y.to(where), settings, probes, seed)

    try:
        ref = refs.get(f"penalty:{model_name}:{label}", lambda: _timed(on(cpu, torch.float64), cpu))
        tol = TOLERANCES["exact"][precision]
        if label == "finite-difference":
            cpu32 = refs.get(f"penalty:{model_name}:{label}:cpu-float32", lambda: _timed(on(cpu, torch.float32), cpu))
            cpu_value_err = relative_error(cpu32.value, ref.value)
            cpu_grad_err = relative_error(cpu32.vector, ref.vector)
            case.update(cpu_float32_sq_trace_rel_err=cpu_value_err, cpu_float32_grad_rel_err=cpu_grad_err)
            tol = Tolerance(max(tol.value, FD_SPREAD * cpu_value_err), max(tol.grad, FD_SPREAD * cpu_grad_err))
        with tf32(precision == "tf32"):
            dev = _timed(on(device, torch.float32), device)
        return _compare(case, ref, dev, tol, _matches(case_id, fault), ("sq_trace", "grad"))
    except Exception as exc:  # recorded as a failed case: the run goes on to the others
        return {**case, "passed": False, "error": f"{type(exc).__name__}: {' '.join(str(exc).split())[:300]}"}


def _one_step(model: nn.Module, x: Tensor, y: Tensor, method: str, hp: dict[str, Any]) -> tuple[float, Tensor]:
    """(loss, [update θ_before − θ_after, float buffers after]) of one step with SGD at lr = 1."""
    params = [p for p in model.parameters() if p.requires_grad]
    before = _flat(params, params).clone()
    opt = torch.optim.SGD(params, lr=1.0)
    info = make_method(method, model, LOSS, **hp).step(x, y, opt)
    update = before - _flat(params, params)
    buffers = [b for b in model.buffers() if b.is_floating_point()]
    return float(info["loss"]), torch.cat([update, _flat(buffers, buffers)]) if buffers else update


def update_case(
    refs: References, model_name: str, model: nn.Module, x: Tensor, y: Tensor, method: str,
    hp: dict[str, Any], precision: str, device: torch.device, fault: str | None,
) -> dict[str, Any]:
    """One step of ``method`` from the same weights on ``device`` vs float64 on the CPU."""
    case_id = f"update:{model_name}:{method}:{precision}"
    case: dict[str, Any] = {"id": case_id, "kind": "update", "model": model_name, "method": method,
                            "precision": precision, "batch": int(x.shape[0]), "hparams": hp}
    cpu = torch.device("cpu")

    def on(where: torch.device, dtype: torch.dtype) -> Callable[[], tuple[float, Tensor]]:
        return lambda: _one_step(_placed(model, where, dtype), x.to(where, dtype), y.to(where), method, hp)

    try:
        ref = refs.get(f"update:{model_name}:{method}", lambda: _timed(on(cpu, torch.float64), cpu))
        with tf32(precision == "tf32"):
            dev = _timed(on(device, torch.float32), device)
        tol = TOLERANCES["update"][precision]
        return _compare(case, ref, dev, tol, _matches(case_id, fault), ("loss", "update"))
    except Exception as exc:
        return {**case, "passed": False, "error": f"{type(exc).__name__}: {' '.join(str(exc).split())[:300]}"}


def _measure(name: str, model: nn.Module, x: Tensor, y: Tensor, matvecs: int) -> tuple[float, None]:
    if name == "lambda_max":
        return top_eigenvalues(model, LOSS, [(x, y)], k=1, seed=0).lambda_max, None
    return hessian_trace(model, LOSS, [(x, y)], num_matvecs=matvecs, seed=0).value, None


def measure_case(
    refs: References, model_name: str, model: nn.Module, x: Tensor, y: Tensor, name: str,
    precision: str, device: torch.device, matvecs: int, fault: str | None,
) -> dict[str, Any]:
    """λ_max (``name="lambda_max"``) or Tr(H) (``"trace"``) on ``device`` vs float64 on the CPU."""
    case_id = f"measure:{model_name}:{name}:{precision}"
    case: dict[str, Any] = {"id": case_id, "kind": "measure", "model": model_name, "measure": name,
                            "precision": precision, "batch": int(x.shape[0])}
    if name == "trace":
        case["matvecs"] = matvecs
    cpu = torch.device("cpu")

    def on(where: torch.device, dtype: torch.dtype) -> Callable[[], tuple[float, None]]:
        return lambda: _measure(name, _placed(model, where, dtype), x.to(where, dtype), y.to(where), matvecs)

    try:
        ref = refs.get(f"measure:{model_name}:{name}", lambda: _timed(on(cpu, torch.float64), cpu))
        with tf32(precision == "tf32"):
            dev = _timed(on(device, torch.float32), device)
        tol = TOLERANCES["measure"][precision]
        return _compare(case, ref, dev, tol, _matches(case_id, fault), ("value", None))
    except Exception as exc:
        return {**case, "passed": False, "error": f"{type(exc).__name__}: {' '.join(str(exc).split())[:300]}"}


def _matches(case_id: str, fault: str | None) -> bool:
    return fault is not None and case_id.startswith(fault)
