r"""Loss-landscape pictures.

Random filter-normalised directions, 1D and 2D surfaces, linear interpolation between two models,
and the PCA of a training trajectory over a 2D contour.

.. math::

    f(\alpha) = L(\theta + \alpha d), \qquad
    f(\alpha, \beta) = L(\theta + \alpha d_1 + \beta d_2), \qquad
    g(t) = L\big((1 - t)\,\theta_a + t\,\theta_b\big)

Directions follow Li, Xu, Taylor, Studer & Goldstein (2018, "Visualizing the loss landscape of
neural nets"): a Gaussian direction is *filter-normalised*, each filter (row of a weight, slice
along its first axis) rescaled to the norm of the same filter of θ, so that pictures of networks
with different weight scales are comparable. One-dimensional parameters (biases, normalisation
scales and shifts) are left out (direction zero) unless ``include_1d=True``, which normalises
each of them as one filter. The PCA picture (their §7) projects the checkpoints θ_i − θ_n of a run
on the first two principal components (scikit-learn's ``PCA``) and draws the path over the
contour of L in that plane, centred at the final model.

Every point is evaluated with ``torch.func.functional_call`` in eval mode: the user's model (its
parameters, buffers and train/eval flags) is never modified, also when an exception is raised.
Along an interpolation, BatchNorm running statistics are re-estimated at every point by default
(:mod:`flatness.norm_statistics`, on a private copy of the model), as mode-connectivity work does.
A non-finite loss at a grid point is stored as NaN, marked in the plot, and counted in a warning;
the other points are still computed. Surfaces are saved as ``.npz`` and drawn as PNG.

Example:
    >>> import torch
    >>> from torch import nn
    >>> from flatness.landscape import surface_1d
    >>> model = nn.Sequential(nn.Linear(3, 8), nn.ReLU(), nn.Linear(8, 2))
    >>> data = [(torch.randn(32, 3), torch.randint(0, 2, (32,)))]
    >>> s = surface_1d(model, nn.functional.cross_entropy, data, num=5, seed=0)
    >>> s.loss.shape, s.xs.tolist()
    ((5,), [-1.0, -0.5, 0.0, 0.5, 1.0])
"""

from __future__ import annotations

import copy
import json
import math
import os
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from .measures.functional import (
    Batch,
    LossFn,
    collect_batches,
    evaluate_at,
    trainable_params,
)
from .measures.io import save_figure, save_npz
from .norm_statistics import reestimate_norm_statistics, tracked_norm_layers
from .probes import make_generator
from .utils import FlatnessError, eval_mode

__all__ = [
    "Direction",
    "Surface",
    "filter_normalize",
    "random_direction",
    "model_difference",
    "surface_1d",
    "surface_2d",
    "interpolate",
    "evaluate_points",
    "trajectory_pca",
    "pca_surface",
    "plot_surface",
]

Direction = dict[str, Tensor]
Metric = Callable[[Tensor, Any], Tensor]
# ``progress``: False, True (a tqdm bar), or ``total -> bar`` (``update(n)``, ``close()``), e.g. the
# CLI's bar that is plain periodic lines when stderr is not a terminal
Progress = bool | Callable[[int], Any]


@dataclass
class Surface:
    """Loss (and optional metric) on a 1D line or a 2D grid; NaN marks non-finite points.

    ``loss`` has shape ``(len(xs),)`` for the 1D kinds and ``(len(ys), len(xs))`` for the 2D
    kinds (row = y). ``trajectory`` holds the PCA coordinates of the checkpoints (kind
    ``"pca"``), the last row being the final model at (0, 0).
    """

    kind: str
    xs: np.ndarray
    loss: np.ndarray
    ys: np.ndarray | None = None
    metric: np.ndarray | None = None
    metric_name: str | None = None
    trajectory: np.ndarray | None = None
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def num_nonfinite(self) -> int:
        """How many points of ``loss`` are NaN (a non-finite loss there)."""
        return int(np.sum(~np.isfinite(self.loss)))

    def save(self, path: str | os.PathLike[str]) -> Path:
        """All arrays as ``.npz`` (written atomically); ``info`` as a JSON string."""
        arrays: dict[str, Any] = {"kind": self.kind, "xs": self.xs, "loss": self.loss,
                                  "info": json.dumps(self.info, sort_keys=True)}
        if self.ys is not None:
            arrays["ys"] = self.ys
        if self.metric is not None:
            arrays["metric"] = self.metric
            arrays["metric_name"] = self.metric_name or "metric"
        if self.trajectory is not None:
            arrays["trajectory"] = self.trajectory
        return save_npz(path, **arrays)


# ---------------------------------------------------------------- directions


def filter_normalize(
    direction: Mapping[str, Tensor], theta: Mapping[str, Tensor], include_1d: bool = False
) -> Direction:
    """Rescale each filter of ``direction`` to the norm of the same filter of ``theta``.

    A filter is a slice along the first axis of a parameter with two or more axes. 1-D
    parameters (biases, normalisation parameters) become zero, or with ``include_1d`` are
    rescaled as a whole to the norm of the parameter.
    """
    out: Direction = {}
    for name, d in direction.items():
        t = theta[name]
        if d.shape != t.shape:
            raise FlatnessError(f"direction {name!r} has shape {tuple(d.shape)}, not {tuple(t.shape)}")
        if t.dim() <= 1:
            if include_1d:
                out[name] = d * (t.norm() / (d.norm() + 1e-10))
            else:
                out[name] = torch.zeros_like(d)
            continue
        d_rows, t_rows = d.flatten(1), t.flatten(1)
        scale = t_rows.norm(dim=1, keepdim=True) / (d_rows.norm(dim=1, keepdim=True) + 1e-10)
        out[name] = (d_rows * scale).reshape(d.shape)
    return out


def random_direction(
    model: nn.Module,
    *,
    seed: int | None = 0,
    generator: torch.Generator | None = None,
    normalize: bool = True,
    include_1d: bool = False,
) -> Direction:
    """A Gaussian direction over the trainable parameters, filter-normalised by default."""
    theta = trainable_params(model)
    gen = make_generator(seed, generator)
    raw = {n: torch.randn(t.shape, generator=gen, dtype=t.dtype).to(t.device) for n, t in theta.items()}
    if not normalize:
        if not include_1d:
            raw = {n: (d if theta[n].dim() > 1 else torch.zeros_like(d)) for n, d in raw.items()}
        return raw
    return filter_normalize(raw, theta, include_1d)


def _check_same_architecture(a: Mapping[str, Tensor], b: Mapping[str, Tensor], what: str) -> None:
    if set(a) != set(b):
        missing, extra = sorted(set(a) - set(b)), sorted(set(b) - set(a))
        raise FlatnessError(f"{what} has different parameters (missing {missing}, extra {extra})")
    for name in a:
        if a[name].shape != b[name].shape:
            raise FlatnessError(
                f"{what}: parameter {name!r} has shape {tuple(b[name].shape)}, "
                f"expected {tuple(a[name].shape)}"
            )


def _params_of(source: nn.Module | Mapping[str, Tensor], names: Iterable[str], what: str) -> Direction:
    state = dict(source.named_parameters()) if isinstance(source, nn.Module) else source
    missing = [n for n in names if n not in state]
    if missing:
        raise FlatnessError(f"{what} lacks parameter(s) {missing}")
    return {n: state[n].detach() for n in names}


def model_difference(model_a: nn.Module, model_b: nn.Module) -> Direction:
    """θ_b − θ_a over the trainable parameters (same architecture required)."""
    a, b = trainable_params(model_a), trainable_params(model_b)
    _check_same_architecture(a, b, "the other model")
    return {n: b[n].to(a[n]) - a[n] for n in a}


# ---------------------------------------------------------------- evaluation


def _progress_bar(progress: Progress, num: int) -> Any:
    """The bar ``progress`` asks for over ``num`` points (its own factory's, or tqdm's), or ``None``."""
    if callable(progress):
        return progress(num)
    if progress:
        from tqdm import tqdm

        return tqdm(total=num, desc="landscape", leave=False)
    return None


def evaluate_points(
    model: nn.Module,
    loss_fn: LossFn,
    data: list[Batch],
    points: Iterable[Mapping[str, Tensor]],
    num: int,
    metric: Metric | None = None,
    progress: Progress = False,
    stat_batches: Iterable[tuple[Any, Any]] | None = None,
) -> tuple[np.ndarray, np.ndarray | None]:
    """Loss (and ``metric``) at each of ``num`` parameter points, eval mode; NaN where not finite.

    With ``stat_batches`` and a model with running statistics, each point is evaluated on a
    private copy of the model whose statistics are first re-estimated on ``stat_batches``
    (:func:`flatness.norm_statistics.reestimate_norm_statistics`); points then hold parameters
    only.
    """
    losses = np.full(num, np.nan)
    values = np.full(num, np.nan) if metric is not None else None
    bar = _progress_bar(progress, num)
    reestimate = stat_batches is not None and bool(tracked_norm_layers(model))
    work = copy.deepcopy(model) if reestimate else model
    stats = list(stat_batches) if reestimate and stat_batches is not None else []
    try:
        with eval_mode(work):
            for i, params in enumerate(points):
                if reestimate:
                    with torch.no_grad():
                        for name, p in work.named_parameters():
                            if name in params:
                                p.copy_(params[name])
                    reestimate_norm_statistics(work, stats)
                    params = trainable_params(work)
                loss, value = evaluate_at(work, loss_fn, data, params, metric)
                if math.isfinite(loss):
                    losses[i] = loss
                    if values is not None:
                        values[i] = value
                if bar is not None:
                    bar.update(1)
    finally:
        if bar is not None:
            bar.close()
    bad = int(np.sum(np.isnan(losses)))
    if bad:
        warnings.warn(
            f"the loss is not finite at {bad} of {num} points; they are stored as NaN and "
            "marked in the plot",
            RuntimeWarning,
            stacklevel=3,
        )
    return losses, values


def _along(theta: Direction, dirs: Sequence[Direction], coords: Iterable[Sequence[float]]):
    for c in coords:
        yield {n: t + sum(float(a) * d[n] for a, d in zip(c, dirs, strict=True)) for n, t in theta.items()}


def _metric_name(metric: Metric | None, name: str | None) -> str | None:
    if metric is None:
        return None
    if name:
        return name
    fn_name = getattr(metric, "__name__", "")
    return fn_name if fn_name and not fn_name.startswith("<") else "metric"


def surface_1d(
    model: nn.Module,
    loss_fn: LossFn,
    batches: Iterable[tuple[Any, Any]],
    direction: Mapping[str, Tensor] | None = None,
    *,
    span: float = 1.0,
    num: int = 41,
    alphas: Sequence[float] | np.ndarray | None = None,
    seed: int | None = 0,
    include_1d: bool = False,
    metric: Metric | None = None,
    metric_name: str | None = None,
    progress: Progress = False,
) -> Surface:
    """L(θ + α d) for α in ``alphas`` (default ``num`` points in [−span, span]).

    ``direction`` defaults to :func:`random_direction` (filter-normalised, seeded).
    """
    data = collect_batches(batches)
    theta = trainable_params(model)
    d = dict(direction) if direction is not None else random_direction(
        model, seed=seed, include_1d=include_1d)
    _check_same_architecture(theta, d, "the direction")
    xs = np.asarray(alphas if alphas is not None else np.linspace(-span, span, num), dtype=float)
    loss, values = evaluate_points(model, loss_fn, data, _along(theta, [d], ([a] for a in xs)),
                                    len(xs), metric, progress)
    return Surface("1d", xs, loss, metric=values, metric_name=_metric_name(metric, metric_name),
                   info={"seed": seed, "include_1d": include_1d})


def surface_2d(
    model: nn.Module,
    loss_fn: LossFn,
    batches: Iterable[tuple[Any, Any]],
    directions: tuple[Mapping[str, Tensor], Mapping[str, Tensor]] | None = None,
    *,
    span: float = 1.0,
    num: int = 21,
    xs: Sequence[float] | np.ndarray | None = None,
    ys: Sequence[float] | np.ndarray | None = None,
    seed: int | None = 0,
    include_1d: bool = False,
    metric: Metric | None = None,
    metric_name: str | None = None,
    progress: Progress = False,
    kind: str = "2d",
) -> Surface:
    """L(θ + α d₁ + β d₂) on the grid ``xs × ys`` (default ``num × num`` in [−span, span]²).

    ``directions`` default to two independent filter-normalised random directions.
    """
    data = collect_batches(batches)
    theta = trainable_params(model)
    if directions is None:
        gen = make_generator(seed)
        d1 = random_direction(model, generator=gen, include_1d=include_1d)
        d2 = random_direction(model, generator=gen, include_1d=include_1d)
    else:
        d1, d2 = dict(directions[0]), dict(directions[1])
    for d in (d1, d2):
        _check_same_architecture(theta, d, "the direction")
    gx = np.asarray(xs if xs is not None else np.linspace(-span, span, num), dtype=float)
    gy = np.asarray(ys if ys is not None else np.linspace(-span, span, num), dtype=float)
    coords = [(a, b) for b in gy for a in gx]  # row-major: loss[j, i] = f(xs[i], ys[j])
    loss, values = evaluate_points(model, loss_fn, data, _along(theta, [d1, d2], coords),
                                    len(coords), metric, progress)
    shape = (len(gy), len(gx))
    return Surface(kind, gx, loss.reshape(shape), ys=gy,
                   metric=None if values is None else values.reshape(shape),
                   metric_name=_metric_name(metric, metric_name),
                   info={"seed": seed, "include_1d": include_1d})


def interpolate(
    model_a: nn.Module,
    model_b: nn.Module,
    loss_fn: LossFn,
    batches: Iterable[tuple[Any, Any]],
    *,
    alphas: Sequence[float] | np.ndarray | None = None,
    num: int = 41,
    metric: Metric | None = None,
    metric_name: str | None = None,
    progress: Progress = False,
    norm_stats: str = "reestimate",
    stat_batches: Iterable[tuple[Any, Any]] | None = None,
) -> Surface:
    """L((1 − t) θ_a + t θ_b) for t in ``alphas`` (default ``num`` points in [−0.5, 1.5]).

    ``norm_stats``: ``"reestimate"`` (default) re-estimates BatchNorm running statistics at
    every point on ``stat_batches`` (default: ``batches``; see :func:`evaluate_points`);
    ``"interpolate"`` interpolates floating-point buffers like the weights (other buffers are
    model a's). Models without running statistics are the same either way. Neither model is
    modified.
    """
    if norm_stats not in ("reestimate", "interpolate"):
        raise FlatnessError(f"norm_stats must be 'reestimate' or 'interpolate', got {norm_stats!r}")
    data = collect_batches(batches)
    diff = model_difference(model_a, model_b)
    theta = trainable_params(model_a)
    buf_a = dict(model_a.named_buffers())
    buf_b = dict(model_b.named_buffers())
    _check_same_architecture(buf_a, buf_b, "the other model's buffers")
    reestimate = norm_stats == "reestimate"
    float_bufs = [] if reestimate else [n for n, b in buf_a.items() if b.is_floating_point()]
    ts = np.asarray(alphas if alphas is not None else np.linspace(-0.5, 1.5, num), dtype=float)

    def points():
        for t in ts:
            params = {n: theta[n] + float(t) * diff[n] for n in theta}
            for n in float_bufs:
                params[n] = buf_a[n] + float(t) * (buf_b[n].to(buf_a[n]) - buf_a[n])
            yield params

    stats = (stat_batches if stat_batches is not None else [(b.x, b.y) for b in data]) if reestimate else None
    loss, values = evaluate_points(model_a, loss_fn, data, points(), len(ts), metric, progress, stats)
    distance = math.sqrt(sum(float(d.pow(2).sum()) for d in diff.values()))
    return Surface("interp", ts, loss, metric=values, metric_name=_metric_name(metric, metric_name),
                   info={"distance": distance, "norm_stats": norm_stats})


# ---------------------------------------------------------------- trajectory PCA


def trajectory_pca(
    model: nn.Module, checkpoints: Sequence[nn.Module | Mapping[str, Tensor]]
) -> tuple[Direction, Direction, np.ndarray, np.ndarray]:
    """First two principal directions of θ_i − θ_final over the ``checkpoints`` of a run.

    Args:
        model: the final model θ_final (the picture's centre).
        checkpoints: models or state dicts along training (the final one may be among them).

    Returns:
        ``(d1, d2, coords, explained)``: unit-norm directions, the ``(T + 1, 2)`` coordinates of
        the checkpoints and then of the final model (0, 0), and the two components' explained
        variance ratios.
    """
    from sklearn.decomposition import PCA

    theta = trainable_params(model)
    names = list(theta)
    final = torch.cat([theta[n].reshape(-1).double().cpu() for n in names])
    rows = []
    for i, ckpt in enumerate(checkpoints):
        params = _params_of(ckpt, names, f"checkpoint {i}")
        _check_same_architecture(theta, params, f"checkpoint {i}")
        flat = torch.cat([params[n].reshape(-1).double().cpu() for n in names])
        rows.append((flat - final).numpy())
    if len(rows) < 2:
        raise FlatnessError(f"the trajectory PCA needs at least 2 checkpoints, got {len(rows)}")
    matrix = np.stack(rows)
    if np.linalg.matrix_rank(matrix - matrix.mean(0)) < 2:
        raise FlatnessError("the checkpoints span fewer than 2 directions; save more of them")
    pca = PCA(n_components=2, svd_solver="full").fit(matrix)
    comps = pca.components_  # unit rows
    coords = np.vstack([matrix @ comps.T, np.zeros((1, 2))])
    dirs = []
    for comp in comps:
        chunks = torch.from_numpy(comp).split([theta[n].numel() for n in names])
        dirs.append({n: c.reshape(theta[n].shape).to(theta[n]) for n, c in zip(names, chunks, strict=True)})
    return dirs[0], dirs[1], coords, pca.explained_variance_ratio_.copy()


def pca_surface(
    model: nn.Module,
    loss_fn: LossFn,
    batches: Iterable[tuple[Any, Any]],
    checkpoints: Sequence[nn.Module | Mapping[str, Tensor]],
    *,
    num: int = 21,
    margin: float = 0.3,
    metric: Metric | None = None,
    metric_name: str | None = None,
    progress: Progress = False,
) -> Surface:
    """The loss contour in the plane of the trajectory's first two PCA directions, with the path.

    The grid covers the checkpoints' coordinates plus ``margin`` of their span on each side.
    """
    d1, d2, coords, explained = trajectory_pca(model, checkpoints)
    axes = []
    for j in range(2):
        low, high = float(coords[:, j].min()), float(coords[:, j].max())
        pad = margin * max(high - low, 1e-12)
        axes.append(np.linspace(low - pad, high + pad, num))
    surface = surface_2d(model, loss_fn, batches, (d1, d2), xs=axes[0], ys=axes[1],
                         metric=metric, metric_name=metric_name, progress=progress, kind="pca")
    surface.trajectory = coords
    surface.info = {"explained_variance_ratio": [float(e) for e in explained],
                    "num_checkpoints": len(checkpoints)}
    return surface


# ---------------------------------------------------------------- plots


def plot_surface(surface: Surface, path: str | os.PathLike[str], *, title: str | None = None) -> Path:
    """Draw a :class:`Surface` as PNG (line for 1D kinds, contour for 2D ones); NaN points as ×."""
    from matplotlib.figure import Figure  # no pyplot: leaves the user's backend alone

    fig = Figure(figsize=(6.4, 4.8))
    ax = fig.subplots()
    bad = ~np.isfinite(surface.loss)
    if surface.ys is None:
        label = {"interp": "t  (0 = model a, 1 = model b)"}.get(surface.kind, "α (filter-normalised)")
        ax.plot(surface.xs, surface.loss, "-o", ms=3, color="C0", label="loss")
        if bad.any():
            low = np.nanmin(surface.loss) if (~bad).any() else 0.0
            ax.plot(surface.xs[bad], np.full(int(bad.sum()), low), "x", color="red",
                    label="non-finite loss")
        ax.set_xlabel(label)
        ax.set_ylabel("loss")
        handles, labels = ax.get_legend_handles_labels()
        if surface.metric is not None:
            twin = ax.twinx()
            twin.plot(surface.xs, surface.metric, "--", color="C1", label=surface.metric_name)
            twin.set_ylabel(surface.metric_name or "metric")
            more = twin.get_legend_handles_labels()
            handles, labels = handles + more[0], labels + more[1]
        ax.legend(handles, labels, loc="best", fontsize="small")
    else:
        X, Y = np.meshgrid(surface.xs, surface.ys)
        Z = np.ma.masked_invalid(surface.loss)
        if Z.count() >= 4 and float(Z.max()) > float(Z.min()):
            levels = np.linspace(float(Z.min()), float(Z.max()), 25)
            filled = ax.contourf(X, Y, Z, levels=levels, cmap="viridis")
            ax.contour(X, Y, Z, levels=levels[::3], colors="k", linewidths=0.4)
            fig.colorbar(filled, ax=ax, label="loss")
        if bad.any():
            ax.plot(X[bad], Y[bad], "x", color="red", ms=5, label="non-finite loss")
        if surface.trajectory is not None:
            traj = surface.trajectory
            ax.plot(traj[:, 0], traj[:, 1], "-o", color="white", mec="k", ms=4, lw=1.5,
                    label="trajectory")
            ax.plot(traj[-1, 0], traj[-1, 1], "*", color="red", ms=12, label="final model")
            ev = surface.info.get("explained_variance_ratio", [math.nan, math.nan])
            ax.set_xlabel(f"PC 1 ({100 * ev[0]:.1f}% of variance)")
            ax.set_ylabel(f"PC 2 ({100 * ev[1]:.1f}% of variance)")
        else:
            ax.plot([0], [0], "*", color="red", ms=12, label="model")
            ax.set_xlabel("α (direction 1)")
            ax.set_ylabel("β (direction 2)")
        ax.legend(loc="upper right", fontsize="small")
    default = {"1d": "Loss along a random filter-normalised direction",
               "2d": "Loss surface (random filter-normalised directions)",
               "interp": "Loss along the linear interpolation",
               "pca": "Loss surface and training trajectory (PCA plane)"}
    ax.set_title(title or default.get(surface.kind, "Loss landscape"))
    fig.tight_layout()
    return save_figure(fig, path)
