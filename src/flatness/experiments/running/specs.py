"""What identifies one run: :class:`RunSpec`, its file name, and the grids of a sweep.

A *run* is one (task, method, strength, seed, protocol, model settings) combination. ``NAME`` is
e.g. ``fa_lam0.01_seed0``; a non-default protocol, method setting or model setting (width,
dropout: :attr:`RunSpec.model_kwargs`) appends a short tag (``_pXXXXXX`` / ``_kXXXXXX`` /
``_mXXXXXX``), so different protocols never share a file. A method's default
settings and default sweep are its class attributes ``protocol_defaults`` and ``default_grid``
(:mod:`flatness.methods.base`): no method is special-cased here. A composed method
(``sam+fa``) sweeps its first component's strength; the others' come from ``method_kwargs``.

Example:
    >>> from flatness.experiments.running.specs import build_grid
    >>> specs = build_grid("breast-cancer-mlp", "fa", [0.0, 0.01], seeds=1,
    ...                    config_overrides={"epochs": 2})
    >>> [s.name for s in specs]  # doctest: +ELLIPSIS
    ['fa_lam0_seed0_p...', 'fa_lam0.01_seed0_p...']
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from ...methods import Method
from ...methods import method_class as _method_class
from ...methods.compose import ComposedMethod
from ...probes import rank_seed
from ...utils import FlatnessError
from ..world.errors import SettingError
from ..world.tasks import Task, TrainConfig, get_task

__all__ = [
    "RunSpec",
    "format_value",
    "default_values",
    "build_grid",
    "select_shard",
    "parse_shard",
    "resolved_settings",
]


MAX_SEEDS = 100_000  # per strength: a grid is built, named and claimed run by run before training
MAX_SEED = 2**63 - 1  # torch generators take 64-bit seeds


def default_method_kwargs(task: str, method: str) -> dict[str, Any]:
    """The method's default protocol on ``task``.

    Its class's ``protocol_defaults``, then the task's own ``method_defaults`` (e.g. the first-order
    FA backend on the CIFAR image tasks).
    """
    return {**method_class(method).protocol_defaults, **get_task(task).method_defaults.get(method, {})}


def short_hash(obj: Any) -> str:
    """Six hex digits of SHA-1 over ``obj`` as sorted JSON: the tags of run names (``_kXXXXXX``)."""
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
    # settings passed to ``task.build_model(**model_kwargs)``: only the non-default ones
    model_kwargs: dict[str, Any] = field(default_factory=dict)

    @property
    def protocol_id(self) -> str:
        """The protocol part of the run name.

        ``""`` for the task's default protocol, the name of another of its named protocols (e.g.
        ``gpu``), else a short hash of the training config.
        """
        task = get_task(self.task)
        if self.config == task.config.as_dict():
            return ""
        return task.protocol_name(self.config) or short_hash(self.config)

    @property
    def variant_id(self) -> str:
        """``""`` for the method's default settings, else a short hash of its keyword arguments."""
        default = default_method_kwargs(self.task, self.method)
        return "" if self.method_kwargs == default else short_hash(self.method_kwargs)

    @property
    def model_id(self) -> str:
        """``""`` for the task's default model, else a short hash of the model settings."""
        return short_hash(self.model_kwargs) if self.model_kwargs else ""

    @property
    def name(self) -> str:
        """The run's name, the file stem of its record and checkpoint.

        Made of the method and strength, the tags of non-default settings, and the seed.
        """
        parts = [self.method]
        if self.hparam is not None and self.value is not None:
            parts[0] += f"_{self.hparam}{format_value(self.value)}"
        if self.variant_id:
            parts.append(f"k{self.variant_id}")
        if self.model_id:
            parts.append(f"m{self.model_id}")
        parts.append(f"seed{self.seed}")
        if self.protocol_id:
            parts.append(f"p{self.protocol_id}")
        return "_".join(parts)

    @property
    def cost(self) -> float:
        """A rough relative cost, to start the longest runs first (better packing over jobs)."""
        return get_task(self.task).run_cost(self.config) * (1.0 if not self.value else 2.5)

    def as_dict(self) -> dict[str, Any]:
        """The spec as plain JSON-ready data (stored in the run record)."""
        return {
            "task": self.task,
            "method": self.method,
            "hparam": self.hparam,
            "value": self.value,
            "seed": self.seed,
            "config": dict(self.config),
            "method_kwargs": dict(self.method_kwargs),
            "trajectory": self.trajectory,
            "model_kwargs": dict(self.model_kwargs),
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "RunSpec":
        """The spec of :meth:`as_dict`'s data."""
        return cls(
            task=d["task"],
            method=d["method"],
            hparam=d.get("hparam"),
            value=d.get("value"),
            seed=int(d["seed"]),
            config=dict(d["config"]),
            method_kwargs=dict(d.get("method_kwargs") or {}),
            trajectory=int(d.get("trajectory") or 0),
            model_kwargs=dict(d.get("model_kwargs") or {}),
        )


def method_class(method: str) -> type[Method]:
    """The method's class (registered, or composed as ``a+b``); a clear error otherwise."""
    try:
        return _method_class(method)
    except ValueError as exc:
        raise FlatnessError(str(exc)) from None


def accepts(method: str, keyword: str) -> bool:
    """Whether the method's constructor takes ``keyword``."""
    return method_class(method).accepts(keyword)


def rank_kwargs(kwargs: dict[str, Any], rank: int) -> dict[str, Any]:
    """A method's settings on DDP rank ``rank``: its own random stream (e.g. FA's probes)."""
    if "seed" not in kwargs:
        return dict(kwargs)
    return {**kwargs, "seed": rank_seed(kwargs["seed"], rank)}


def default_values(method: str) -> list[float | None]:
    """The default sweep of a method's strength (its ``default_grid``; fa: the paper's λ grid)."""
    cls = method_class(method)
    if cls.hparam is None:
        return [None]
    grid = cls.default_grid
    if not grid:
        raise SettingError(f"method {method!r} has no default grid: give its strengths in `values`", "values")
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
    model_kwargs: dict[str, Any] | None = None,
    protocol: str | None = None,
) -> list[RunSpec]:
    """The runs of one sweep: every strength in ``values`` times every seed.

    ``seeds`` is a count (seeds 0..N-1) or explicit seeds. ``method_kwargs`` default to the
    method's ``protocol_defaults`` then the task's ``method_defaults`` (``fa``: 5 probes every
    10 steps). ``protocol`` names one of the task's training protocols (default: its first,
    ``config``); ``config_overrides`` apply on top. Overriding ``epochs`` without
    ``warmup_epochs`` scales the protocol's warm-up by the same factor (the same share of
    training). ``model_kwargs`` are model settings of the task
    (:attr:`flatness.experiments.world.tasks.Task.model_defaults`); those equal to the default are
    dropped, so a default model keeps its plain run name.
    """
    task_obj = get_task(task)
    cls = method_class(method)
    seed_list = _seed_list(seeds)
    grid = _strength_grid(method, values)
    config = _protocol(task_obj, protocol, config_overrides or {})
    kwargs = default_method_kwargs(task, method)
    kwargs.update(method_kwargs or {})
    unknown = [k for k in kwargs if not cls.accepts(k)]
    if unknown:
        raise SettingError(f"method {method!r} takes no setting {unknown[0]!r} (`method_kwargs`)", "method_kwargs")
    for key in kwargs:
        if cls.hparam is not None and key.rpartition(".")[2] == cls.hparam:
            # the run would train at the swept value and record this one (issue 30, finding 2)
            raise SettingError(
                f"`method_kwargs` {key} sets {cls.hparam}, the strength the sweep varies: "
                "give its strengths in `values` instead", "method_kwargs", "values",
            )
    if trajectory < 0:
        raise SettingError(f"`trajectory` must be >= 0, got {trajectory}", "trajectory")
    settings = json.loads(json.dumps(task_obj.model_settings(model_kwargs)))  # as records store them
    model = {k: v for k, v in settings.items() if v != task_obj.model_defaults.get(k)}
    return [
        RunSpec(task, method, cls.hparam, v, s, config.as_dict(), kwargs, trajectory, model)
        for v in grid
        for s in seed_list
    ]


def _seed_list(seeds: int | Sequence[int]) -> list[int]:
    """The seeds of a sweep: a count N (seeds 0..N-1) or explicit seeds, checked."""
    if isinstance(seeds, int) and not 1 <= seeds <= MAX_SEEDS:
        raise SettingError(f"`seeds` must be a count from 1 to {MAX_SEEDS}, got {seeds}", "seeds")
    seed_list = list(range(seeds)) if isinstance(seeds, int) else [int(s) for s in seeds]
    if not seed_list:
        raise SettingError(f"`seeds` must be >= 1, got {seeds}", "seeds")
    if any(not 0 <= s <= MAX_SEED for s in seed_list):
        raise SettingError(f"`seeds` must be integers from 0 to 2**63 - 1, got {seeds}", "seeds")
    return seed_list


def _strength_grid(method: str, values: Sequence[float] | None) -> list[float | None]:
    """The swept strengths: ``values`` (finite, >= 0, no repeats), else the method's default grid."""
    cls = method_class(method)
    if values is None:
        grid = default_values(method)
    elif cls.hparam is None:
        raise SettingError(f"method {method!r} has no strength to sweep; give no `values`", "values")
    else:
        grid = [float(v) for v in values]
    for v in grid:
        if v is not None and not (math.isfinite(v) and v >= 0):
            raise SettingError(f"`values` ({cls.hparam or 'strength'}) must be finite and >= 0, got {v:g}", "values")
    if len({format_value(v) for v in grid if v is not None}) != len([v for v in grid if v is not None]):
        raise SettingError(f"repeated strengths in `values`: {grid}", "values")
    return grid


def _protocol(task: Task, protocol: str | None, overrides: dict[str, Any]) -> TrainConfig:
    """The named protocol (default: the task's first) with ``overrides``.

    An ``epochs`` override without ``warmup_epochs`` scales the warm-up by the same factor (the same
    share of training). The protocol checks the values (:class:`TrainConfig`): a field out of its range
    is a :class:`SettingError` naming it.
    """
    overrides = dict(overrides)
    try:
        default = task.config if protocol is None else task.protocol(protocol)
        if "epochs" in overrides and "warmup_epochs" not in overrides and default.warmup_epochs:
            # the warm-up keeps its share of training (cifar100-mlp: 2 of 10 epochs -> 0.2 of 1)
            overrides["warmup_epochs"] = default.warmup_epochs * overrides["epochs"] / default.epochs
        return default.replace(**overrides)
    except SettingError as exc:  # a field out of its range: still named, for a front end to spell
        raise SettingError(f"invalid training protocol for {task.name}: {exc.message}", *exc.parameters) from None
    except (TypeError, ValueError) as exc:
        raise FlatnessError(f"invalid training protocol for {task.name}: {exc}") from None


def plain(value: Any) -> Any:
    """``value`` as JSON data (tuples become lists; what JSON cannot hold, its ``repr``)."""
    return json.loads(json.dumps(value, default=repr))


def resolved_method_kwargs(method: str, kwargs: dict[str, Any]) -> dict[str, Any]:
    """Every keyword argument the method is built with.

    ``kwargs`` over the method's defaults (a composed method's under each component's prefix,
    ``"sam.rho"``), sorted.
    """
    cls = method_class(method)
    given = kwargs
    if issubclass(cls, ComposedMethod):
        given = {f"{c}.{k}": v for c, part in cls.route(kwargs).items() for k, v in part.items()}
    full = {**cls.keyword_defaults(), **given}
    return plain({k: full[k] for k in sorted(full)})


def resolved_settings(spec: RunSpec, method_kwargs: dict[str, Any]) -> dict[str, Any]:
    """What a run computes with, in full.

    A record's ``resolved``: every training-config field (the run name's ``config`` leaves the
    later fields out at their defaults), every model setting, every method keyword argument
    (``method_kwargs``: as the runner builds the method).
    """
    task = get_task(spec.task)
    return {
        "config": plain(dataclasses.asdict(TrainConfig.from_dict(spec.config))),
        "model_kwargs": plain(task.model_settings(spec.model_kwargs)),
        "method_kwargs": resolved_method_kwargs(spec.method, method_kwargs),
    }


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
        raise SettingError(f"`index` must be from 1 to `count`, got {index} of {count}", "index", "count")
    ordered = sorted(specs, key=lambda s: (s.task, -s.cost, s.name))
    return ordered[index - 1 :: count]


def parse_shard(text: str) -> tuple[int, int]:
    """The ``(I, N)`` of a shard ``"I/N"`` (1 <= I <= N); a :class:`SettingError` otherwise."""
    index, sep, count = text.partition("/")
    try:
        if not sep:
            raise ValueError
        i, n = int(index), int(count)
    except ValueError:
        raise SettingError(f"`shard` must look like I/N (e.g. 2/4), got {text!r}", "shard") from None
    if not 1 <= i <= n:
        raise SettingError(f"`shard` must be I/N with 1 <= I <= N, got {i}/{n}", "shard")
    return i, n
