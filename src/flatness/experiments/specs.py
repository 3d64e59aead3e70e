"""What identifies one run: :class:`RunSpec`, its file name, and the grids of a sweep.

A *run* is one (task, method, strength, seed, protocol) combination. ``NAME`` is e.g.
``fa_lam0.01_seed0``; a non-default protocol or method setting appends a short tag
(``_pXXXXXX`` / ``_kXXXXXX``), so different protocols never share a file.

Example:
    >>> from flatness.experiments.specs import build_grid
    >>> specs = build_grid("breast-cancer-mlp", "fa", [0.0, 0.01], seeds=1,
    ...                    config_overrides={"epochs": 2})
    >>> [s.name for s in specs]  # doctest: +ELLIPSIS
    ['fa_lam0_seed0_p...', 'fa_lam0.01_seed0_p...']
"""

from __future__ import annotations

import hashlib
import inspect
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from ..methods import METHODS, Method
from ..probes import rank_seed
from ..utils import FlatnessError
from .tasks import get_task

__all__ = [
    "PAPER_GRID",
    "DEFAULT_METHOD_KWARGS",
    "RunSpec",
    "format_value",
    "default_values",
    "build_grid",
    "select_shard",
    "parse_shard",
]

PAPER_GRID: tuple[float, ...] = (0.0, 0.001, 0.01, 0.1, 1.0)
# Method settings that are the default protocol (no tag in run names).
DEFAULT_METHOD_KWARGS: dict[str, dict[str, Any]] = {"fa": {"probes": 5, "every": 10}}


def default_method_kwargs(task: str, method: str) -> dict[str, Any]:
    """The method's default protocol on ``task``: :data:`DEFAULT_METHOD_KWARGS`, then the task's
    own ``method_defaults`` (e.g. the first-order FA backend on the CIFAR image tasks)."""
    return {**DEFAULT_METHOD_KWARGS.get(method, {}), **get_task(task).method_defaults.get(method, {})}


def _short_hash(obj: Any) -> str:
    text = json.dumps(obj, sort_keys=True, default=str)
    return hashlib.sha1(text.encode()).hexdigest()[:6]


def format_value(value: float) -> str:
    """A strength as it appears in run names: ``0``, ``0.001``, ``1``, ``2.5e-05``."""
    text = f"{value:.6g}"
    return text


@dataclass(frozen=True)
class RunSpec:
    """Everything that identifies and configures one run; plain data (see :meth:`as_dict`)."""

    task: str
    method: str
    hparam: str | None
    value: float | None
    seed: int
    config: dict[str, Any]
    method_kwargs: dict[str, Any] = field(default_factory=dict)
    trajectory: int = 0

    @property
    def protocol_id(self) -> str:
        """``""`` for the task's default protocol, the name of another of its named protocols
        (e.g. ``gpu``), else a short hash of the training config."""
        task = get_task(self.task)
        if self.config == task.config.as_dict():
            return ""
        return task.protocol_name(self.config) or _short_hash(self.config)

    @property
    def variant_id(self) -> str:
        """``""`` for the method's default settings, else a short hash of its keyword arguments."""
        default = default_method_kwargs(self.task, self.method)
        return "" if self.method_kwargs == default else _short_hash(self.method_kwargs)

    @property
    def name(self) -> str:
        parts = [self.method]
        if self.hparam is not None and self.value is not None:
            parts[0] += f"_{self.hparam}{format_value(self.value)}"
        if self.variant_id:
            parts.append(f"k{self.variant_id}")
        parts.append(f"seed{self.seed}")
        if self.protocol_id:
            parts.append(f"p{self.protocol_id}")
        return "_".join(parts)

    @property
    def cost(self) -> float:
        """A rough relative cost, to start the longest runs first (better packing over jobs)."""
        base = {"cifar100-mlp": 8.0, "newsgroups-logreg": 5.0}.get(self.task, 1.0)
        scale = self.config.get("epochs", 1) / max(1, get_task(self.task).config.epochs)
        return base * scale * (1.0 if not self.value else 2.5)

    def as_dict(self) -> dict[str, Any]:
        return {
            "task": self.task,
            "method": self.method,
            "hparam": self.hparam,
            "value": self.value,
            "seed": self.seed,
            "config": dict(self.config),
            "method_kwargs": dict(self.method_kwargs),
            "trajectory": self.trajectory,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "RunSpec":
        return cls(
            task=d["task"],
            method=d["method"],
            hparam=d.get("hparam"),
            value=d.get("value"),
            seed=int(d["seed"]),
            config=dict(d["config"]),
            method_kwargs=dict(d.get("method_kwargs") or {}),
            trajectory=int(d.get("trajectory") or 0),
        )


def method_class(method: str) -> type[Method]:
    if method not in METHODS:
        raise FlatnessError(f"unknown method {method!r}; expected one of: {', '.join(sorted(METHODS))}")
    return METHODS[method]


def accepts(method: str, keyword: str) -> bool:
    """Whether the method's constructor takes ``keyword`` (by name or through ``**kwargs``)."""
    params = inspect.signature(method_class(method).__init__).parameters
    return keyword in params or any(p.kind is p.VAR_KEYWORD for p in params.values())


def rank_kwargs(kwargs: dict[str, Any], rank: int) -> dict[str, Any]:
    """A method's settings on DDP rank ``rank``: its own random stream (e.g. FA's probes)."""
    if "seed" not in kwargs:
        return dict(kwargs)
    return {**kwargs, "seed": rank_seed(kwargs["seed"], rank)}


def default_values(method: str) -> list[float | None]:
    """The default sweep of a method's strength: the paper's λ grid for ``fa``."""
    cls = method_class(method)
    if cls.hparam is None:
        return [None]
    if method == "fa":
        return list(PAPER_GRID)
    grid = getattr(cls, "default_grid", None)
    if not grid:
        raise FlatnessError(f"method {method!r} has no default grid: give its values with --lambdas")
    return [float(v) for v in grid]


def build_grid(
    task: str,
    method: str = "fa",
    values: Sequence[float] | None = None,
    seeds: int | Sequence[int] = 3,
    *,
    config_overrides: dict[str, Any] | None = None,
    method_kwargs: dict[str, Any] | None = None,
    trajectory: int = 0,
    protocol: str | None = None,
) -> list[RunSpec]:
    """The runs of one sweep: every strength in ``values`` times every seed.

    ``seeds`` is a count (seeds 0..N-1) or explicit seeds. ``method_kwargs`` default to the
    method's default protocol (``fa``: 5 probes every 10 steps). ``protocol`` names one of the
    task's training protocols (default: its first, ``config``); ``config_overrides`` apply on top.
    """
    task_obj = get_task(task)
    cls = method_class(method)
    seed_list = list(range(seeds)) if isinstance(seeds, int) else [int(s) for s in seeds]
    if not seed_list or (isinstance(seeds, int) and seeds < 1):
        raise FlatnessError(f"seeds must be >= 1, got {seeds}")
    if values is None:
        grid = default_values(method)
    elif cls.hparam is None:
        raise FlatnessError(f"method {method!r} has no strength to sweep; drop --lambdas")
    else:
        grid = [float(v) for v in values]
    for v in grid:
        if v is not None and not (math.isfinite(v) and v >= 0):
            raise FlatnessError(f"{cls.hparam or 'strength'} values must be finite and >= 0, got {v}")
    if len({format_value(v) for v in grid if v is not None}) != len([v for v in grid if v is not None]):
        raise FlatnessError(f"repeated values in the grid: {grid}")
    try:
        base = task_obj.config if protocol is None else task_obj.protocol(protocol)
        config = base.replace(**(config_overrides or {}))
    except (TypeError, ValueError) as exc:
        raise FlatnessError(f"invalid training protocol for {task}: {exc}") from None
    kwargs = default_method_kwargs(task, method)
    kwargs.update(method_kwargs or {})
    if trajectory < 0:
        raise FlatnessError(f"--trajectory must be >= 0, got {trajectory}")
    return [
        RunSpec(task, method, cls.hparam, v, s, config.as_dict(), kwargs, trajectory)
        for v in grid
        for s in seed_list
    ]


def identity(spec: RunSpec) -> dict[str, Any]:
    d = spec.as_dict()
    d.pop("trajectory")  # an extra output, not part of what the run computes
    return d


def select_shard(specs: Sequence[RunSpec], index: int, count: int) -> list[RunSpec]:
    """The ``index``-th (1-based) of ``count`` disjoint, balanced slices of a grid.

    Runs are dealt round-robin in a fixed order (task, cost, name), so every machine computes the
    same partition from the same command line, and the slices' costs are similar.
    """
    if not (1 <= index <= count):
        raise FlatnessError(f"--shard must be I/N with 1 <= I <= N, got {index}/{count}")
    ordered = sorted(specs, key=lambda s: (s.task, -s.cost, s.name))
    return ordered[index - 1 :: count]


def parse_shard(text: str) -> tuple[int, int]:
    index, sep, count = text.partition("/")
    try:
        if not sep:
            raise ValueError
        return int(index), int(count)
    except ValueError:
        raise FlatnessError(f"--shard must look like I/N (e.g. 2/4), got {text!r}") from None
