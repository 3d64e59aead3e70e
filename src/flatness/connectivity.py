r"""Mode connectivity: the loss barrier between two models.

On the straight line between them and on a trained quadratic Bézier curve (Garipov et al. 2018;
Frankle et al. 2020).

.. math::

    \phi_{\text{lin}}(t) = (1 - t)\,\theta_a + t\,\theta_b, \qquad
    \phi_\theta(t) = (1 - t)^2\,\theta_a + 2t(1 - t)\,\theta + t^2\,\theta_b, \qquad t \in [0, 1],

    B = \max_t \Big[v(\phi(t)) - \big((1 - t)\,v(\theta_a) + t\,v(\theta_b)\big)\Big] \;\ge 0,

the barrier of a value v (the loss, or the error 1 − accuracy) along a path: its largest rise
above the straight line between the endpoints' values, over a grid of t including 0 and 1.
Two models in one linearly connected basin have B ≈ 0.

At every point BatchNorm running statistics are re-estimated on ``stat_batches`` (a private
copy of model a; :mod:`flatness.norm_statistics`), then the loss and accuracy are evaluated in
eval mode (dropout off). The Bézier control point θ starts at the midpoint (so the untrained
curve is the line) and is trained, as Garipov et al. do, by minimising E_{t ~ U[0, 1]}
L(φ_θ(t)): each step draws t and a training batch from a seeded generator, runs the network
with BatchNorm on batch statistics and dropout off, and takes an Adam step on θ. The models
passed in are never modified.

Example (two copies of one model: barrier 0):
    >>> import copy, torch
    >>> from torch import nn
    >>> from flatness.connectivity import linear_path
    >>> model = nn.Sequential(nn.Linear(3, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 2))
    >>> data = [(torch.randn(32, 3), torch.randint(0, 2, (32,)))]
    >>> path = linear_path(model, copy.deepcopy(model), nn.functional.cross_entropy, data, num=5)
    >>> path.barrier_loss
    0.0
"""

from __future__ import annotations

import copy
import json
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from .landscape import evaluate_points, model_difference
from .measures.functional import LossFn, call_at, collect_batches, trainable_params
from .measures.io import save_figure
from .norm_statistics import tracked_norm_layers
from .probes import make_generator
from .utils import FlatnessError, atomic_write_bytes, preserved_mode

__all__ = [
    "PathCurve",
    "Connectivity",
    "barrier",
    "bezier_point",
    "linear_path",
    "train_bezier",
    "bezier_path",
    "connect",
    "plot_connectivity",
]

Accuracy = Callable[[Tensor, Any], Tensor]


def barrier(ts: Sequence[float] | np.ndarray, values: Sequence[float] | np.ndarray) -> float:
    """max_t [v(t) − ((1 − t) v(0) + t v(1))] over a grid ``ts`` from 0 to 1 (NaN if any value is)."""
    t, v = np.asarray(ts, dtype=float), np.asarray(values, dtype=float)
    if t.ndim != 1 or t.shape != v.shape or len(t) < 2 or t[0] != 0.0 or t[-1] != 1.0:
        raise FlatnessError("a barrier needs values on a grid of t from 0 to 1 (at least 2 points)")
    if not np.all(np.isfinite(v)):
        return float("nan")
    return float(np.max(v - (v[0] + t * (v[-1] - v[0]))))  # exactly 0 for a constant path


@dataclass
class PathCurve:
    """Loss (and error = 1 − accuracy) at ``ts`` along one path, with their barriers."""

    kind: str
    ts: np.ndarray
    loss: np.ndarray
    error: np.ndarray | None = None

    @property
    def barrier_loss(self) -> float:
        """The loss barrier (:func:`barrier`)."""
        return barrier(self.ts, self.loss)

    @property
    def barrier_error(self) -> float | None:
        """The error barrier, ``None`` without an accuracy."""
        return None if self.error is None else barrier(self.ts, self.error)

    def as_dict(self) -> dict[str, Any]:
        """``t``, ``loss``, ``barrier_loss`` (and ``error``, ``barrier_error``) as plain data."""
        out: dict[str, Any] = {"t": self.ts.tolist(), "loss": self.loss.tolist(), "barrier_loss": self.barrier_loss}
        if self.error is not None:
            out.update(error=self.error.tolist(), barrier_error=self.barrier_error)
        return out


@dataclass
class Connectivity:
    """The linear path, the trained Bézier curve (if any), and how they were made."""

    linear: PathCurve
    bezier: PathCurve | None = None
    info: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        """Both paths' :meth:`PathCurve.as_dict` (``linear``, ``bezier``) and ``info``, as plain data."""
        out = {"linear": self.linear.as_dict(), **self.info}
        if self.bezier is not None:
            out["bezier"] = self.bezier.as_dict()
        return out

    def save_json(self, path: str | os.PathLike[str]) -> Path:
        """The numbers as JSON (non-finite values as ``null``), written atomically."""
        text = json.dumps(_finite_or_null(self.as_dict()), indent=1) + "\n"
        atomic_write_bytes(path, lambda fh: fh.write(text.encode()))
        return Path(path)


def _finite_or_null(value: Any) -> Any:
    if isinstance(value, float):
        return value if np.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite_or_null(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite_or_null(v) for v in value]
    return value


def bezier_point(
    theta_a: Mapping[str, Tensor], control: Mapping[str, Tensor], theta_b: Mapping[str, Tensor], t: float | Tensor
) -> dict[str, Tensor]:
    """φ_θ(t) = (1 − t)² θ_a + 2t(1 − t) θ + t² θ_b (differentiable in ``control``)."""
    return {n: (1 - t) ** 2 * theta_a[n] + 2 * t * (1 - t) * control[n] + t**2 * theta_b[n] for n in theta_a}


def _endpoints(model_a: nn.Module, model_b: nn.Module) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    diff = model_difference(model_a, model_b)  # same architecture, or a FlatnessError
    theta_a = trainable_params(model_a)
    return theta_a, {n: theta_a[n] + diff[n] for n in theta_a}


def _curve(
    kind: str, model_a: nn.Module, points: list[dict[str, Tensor]], ts: np.ndarray, loss_fn: LossFn,
    batches: Iterable[tuple[Any, Any]], accuracy: Accuracy | None, stat_batches: Iterable[tuple[Any, Any]] | None,
) -> PathCurve:
    data = collect_batches(batches)
    stats = list(stat_batches) if stat_batches is not None else [(b.x, b.y) for b in data]
    loss, acc = evaluate_points(model_a, loss_fn, data, points, len(points), accuracy, stat_batches=stats)
    return PathCurve(kind, ts, loss, None if acc is None else 1.0 - acc)


def linear_path(
    model_a: nn.Module,
    model_b: nn.Module,
    loss_fn: LossFn,
    batches: Iterable[tuple[Any, Any]],
    *,
    num: int = 21,
    accuracy: Accuracy | None = None,
    stat_batches: Iterable[tuple[Any, Any]] | None = None,
) -> PathCurve:
    """Loss (and error, with ``accuracy(logits, y)``) on ``batches`` at ``num`` points of the line.

    BatchNorm statistics are re-estimated on ``stat_batches`` (default: ``batches``) at each point.
    """
    theta_a, theta_b = _endpoints(model_a, model_b)
    ts = np.linspace(0.0, 1.0, num)
    points = [{n: theta_a[n] + float(t) * (theta_b[n] - theta_a[n]) for n in theta_a} for t in ts]
    return _curve("linear", model_a, points, ts, loss_fn, batches, accuracy, stat_batches)


def train_bezier(
    model_a: nn.Module,
    model_b: nn.Module,
    loss_fn: LossFn,
    train_batches: Sequence[tuple[Any, Any]],
    *,
    steps: int = 200,
    lr: float = 1e-3,
    seed: int | None = 0,
) -> tuple[dict[str, Tensor], list[float]]:
    """The control point θ of a quadratic Bézier curve from model a to model b, and the loss at each step.

    θ is trained on ``train_batches`` (see the module docs).
    """
    if steps < 1 or not lr > 0:
        raise FlatnessError(f"the curve needs steps >= 1 and lr > 0 (got {steps}, {lr})")
    if not train_batches:
        raise FlatnessError("training the curve needs at least one training batch")
    theta_a, theta_b = _endpoints(model_a, model_b)
    control = {n: (0.5 * (theta_a[n] + theta_b[n])).clone().requires_grad_(True) for n in theta_a}
    optimizer = torch.optim.Adam(list(control.values()), lr=lr)
    gen = make_generator(seed)
    work = copy.deepcopy(model_a)  # its BatchNorm buffers take the training passes' updates
    history = []
    order: list[int] = []
    with preserved_mode(work):
        work.eval()
        for m in tracked_norm_layers(work):
            m.train()  # BatchNorm on batch statistics, dropout off
        for _ in range(steps):
            if not order:
                order = torch.randperm(len(train_batches), generator=gen).tolist()
            x, y = train_batches[order.pop()]
            t = float(torch.rand((), generator=gen))
            optimizer.zero_grad()
            loss = loss_fn(call_at(work, bezier_point(theta_a, control, theta_b, t), x), y)
            loss.backward()
            optimizer.step()
            history.append(float(loss.detach()))
    return {n: c.detach() for n, c in control.items()}, history


def bezier_path(
    model_a: nn.Module,
    model_b: nn.Module,
    control: Mapping[str, Tensor],
    loss_fn: LossFn,
    batches: Iterable[tuple[Any, Any]],
    *,
    num: int = 21,
    accuracy: Accuracy | None = None,
    stat_batches: Iterable[tuple[Any, Any]] | None = None,
) -> PathCurve:
    """As :func:`linear_path`, along the Bézier curve with control point ``control``."""
    theta_a, theta_b = _endpoints(model_a, model_b)
    missing = sorted(set(theta_a) - set(control))
    if missing:
        raise FlatnessError(f"the control point lacks parameter(s) {missing}")
    ts = np.linspace(0.0, 1.0, num)
    points = [bezier_point(theta_a, control, theta_b, float(t)) for t in ts]
    return _curve("bezier", model_a, points, ts, loss_fn, batches, accuracy, stat_batches)


def connect(
    model_a: nn.Module,
    model_b: nn.Module,
    loss_fn: LossFn,
    batches: Iterable[tuple[Any, Any]],
    train_batches: Sequence[tuple[Any, Any]] | None = None,
    *,
    num: int = 21,
    accuracy: Accuracy | None = None,
    stat_batches: Iterable[tuple[Any, Any]] | None = None,
    curve_steps: int = 200,
    curve_lr: float = 1e-3,
    seed: int | None = 0,
) -> Connectivity:
    """The linear path and the trained Bézier curve between two models, evaluated on ``batches``.

    The curve with ``train_batches`` and ``curve_steps`` > 0; statistics re-estimated on
    ``stat_batches`` (default: ``train_batches``, else ``batches``).
    """
    if num < 2:
        raise FlatnessError(f"a path needs num >= 2 points, got {num}")
    data = collect_batches(batches)
    stats = list(stat_batches) if stat_batches is not None else (list(train_batches) if train_batches else None)
    linear = linear_path(model_a, model_b, loss_fn, data, num=num, accuracy=accuracy, stat_batches=stats)
    theta_a, theta_b = _endpoints(model_a, model_b)
    distance = float(torch.sqrt(sum((theta_b[n] - theta_a[n]).double().pow(2).sum() for n in theta_a)))
    info: dict[str, Any] = {"distance": distance, "points": num,
                            "norm_stats": "reestimated" if tracked_norm_layers(model_a) else "none"}
    if not train_batches or curve_steps < 1:
        return Connectivity(linear, None, info)
    control, history = train_bezier(model_a, model_b, loss_fn, train_batches, steps=curve_steps, lr=curve_lr, seed=seed)
    curve = bezier_path(model_a, model_b, control, loss_fn, data, num=num, accuracy=accuracy, stat_batches=stats)
    tail = history[-max(1, len(history) // 10):]
    info.update(curve_steps=curve_steps, curve_lr=curve_lr, seed=seed,
                curve_final_train_loss=float(np.mean(tail)),
                control_distance_from_midpoint=float(torch.sqrt(sum(
                    (control[n] - 0.5 * (theta_a[n] + theta_b[n])).double().pow(2).sum() for n in theta_a))))
    return Connectivity(linear, curve, info)


def plot_connectivity(result: Connectivity, path: str | os.PathLike[str], *, title: str | None = None) -> Path:
    """Loss and error along the linear path and the Bézier curve, as a PNG."""
    from matplotlib.figure import Figure  # no pyplot: leaves the user's backend alone

    curves = [c for c in (result.linear, result.bezier) if c is not None]
    with_error = result.linear.error is not None
    fig = Figure(figsize=(10.0 if with_error else 5.5, 4.0))
    axes = fig.subplots(1, 2 if with_error else 1)
    axes = list(axes) if with_error else [axes]
    names = {"linear": "linear path", "bezier": "Bézier curve (trained)"}
    for ax, key, label in zip(axes, ("loss", "error"), ("loss", "error (1 − accuracy)"), strict=True):
        for c in curves:
            values = getattr(c, key)
            b = c.barrier_loss if key == "loss" else c.barrier_error
            ax.plot(c.ts, values, "-o", ms=3, label=f"{names[c.kind]}: barrier {b:.3g}")
        ax.set_xlabel("t  (0 = model a, 1 = model b)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    fig.suptitle(title or "Mode connectivity (BatchNorm statistics re-estimated at each point)")
    fig.tight_layout()
    return save_figure(fig, path)
