r"""Sweeps of a training method over its strength and seeds: ``flatness run TASK``.

A *run* is one (task, method, strength, seed, protocol) combination. Each run trains the task's
model with its default protocol (:class:`flatness.tasks.TrainConfig`, optionally overridden),
measures the final model, and writes into the results directory ``OUT/TASK/``:

* ``NAME.json`` — the record (written atomically, last): accuracies (final, best over epochs,
  at the epoch of best validation accuracy), the measured Tr(H²)/B of the final model
  (:func:`measure_final`), the paper's average flatness over training, times, per-epoch curves;
* ``checkpoints/NAME.pt`` — the final model (:func:`flatness.tasks.load_checkpoint`);
* ``trajectories/NAME.pt`` — ``--trajectory N`` snapshots evenly spaced along training.

``NAME`` is e.g. ``fa_lam0.01_seed0``; a non-default protocol or method setting appends a short
tag (``_pXXXXXX`` / ``_kXXXXXX``), so different protocols never share a file. Re-running a
command skips runs whose JSON is complete: a killed sweep resumes where it stopped and loses at
most the runs in flight. ``--jobs N`` runs N runs at a time in separate processes.

The measured flatness uses one fixed protocol for every run of a task (including λ = 0): the
first 1024 training samples in their fixed order, in batches of the task's B, the model in eval
mode, 10 Rademacher probes per batch from a generator seeded identically for every run:

.. math:: \widehat{F} = \frac{1}{n_b}\sum_{b=1}^{n_b} \frac{1}{B}\,\widehat{\operatorname{Tr}}(H_b^2)

Example:
    >>> from flatness.experiments import build_grid, run_grid
    >>> specs = build_grid("breast-cancer-mlp", "fa", [0.0, 0.01], seeds=1,
    ...                    config_overrides={"epochs": 2})
    >>> [s.name for s in specs]  # doctest: +ELLIPSIS
    ['fa_lam0_seed0_p...', 'fa_lam0.01_seed0_p...']
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import inspect
import json
import math
import multiprocessing
import os
import platform
import sys
import time
from collections.abc import Iterable, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from .data import Splits
from .hutchinson import measure_sq_trace
from .methods import METHODS, Method, make_method
from .tasks import (
    TASKS,
    Task,
    TrainConfig,
    atomic_write_bytes,
    get_task,
    iterate_batches,
    load_checkpoint,
    save_checkpoint,
)
from .train import TrainingDiverged, make_optimizer, steps_per_epoch, train
from .distributed import (
    DistContext,
    EmulatedRanks,
    init_distributed,
    launched_by_torchrun,
    rank_seed,
    shutdown,
    wrap_model,
)
from .utils import FlatnessError, eval_mode, to_device

__all__ = [
    "RECORD_FORMAT",
    "PAPER_GRID",
    "MEASURE_SAMPLES",
    "MEASURE_PROBES",
    "MEASURE_SEED",
    "RunSpec",
    "default_values",
    "build_grid",
    "measure_sq_trace_per_B",
    "measure_final",
    "execute_run",
    "run_grid",
    "read_record",
    "write_json",
    "add_cli",
]

RECORD_FORMAT = "flatness-run"
PAPER_GRID: tuple[float, ...] = (0.0, 0.001, 0.01, 0.1, 1.0)
# Method settings that are the default protocol (no tag in run names).
DEFAULT_METHOD_KWARGS: dict[str, dict[str, Any]] = {"fa": {"probes": 5, "every": 10}}
# The fixed flatness-measurement protocol (identical for every run of a task).
MEASURE_SAMPLES = 1024
MEASURE_PROBES = 10
MEASURE_SEED = 20240601
# The lighter per-epoch version (a flatness curve for every run, λ = 0 included): the first
# two batches of B, 5 probes each.
EPOCH_MEASURE_BATCHES = 2
EPOCH_MEASURE_PROBES = 5


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
        """``""`` for the task's default protocol, else a short hash of the training config."""
        default = get_task(self.task).config.as_dict()
        return "" if self.config == default else _short_hash(self.config)

    @property
    def variant_id(self) -> str:
        """``""`` for the method's default settings, else a short hash of its keyword arguments."""
        default = DEFAULT_METHOD_KWARGS.get(self.method, {})
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


def _method_class(method: str) -> type[Method]:
    if method not in METHODS:
        raise FlatnessError(f"unknown method {method!r}; expected one of: {', '.join(sorted(METHODS))}")
    return METHODS[method]


def _accepts(method: str, keyword: str) -> bool:
    """Whether the method's constructor takes ``keyword`` (by name or through ``**kwargs``)."""
    params = inspect.signature(_method_class(method).__init__).parameters
    return keyword in params or any(p.kind is p.VAR_KEYWORD for p in params.values())


def _rank_kwargs(kwargs: dict[str, Any], rank: int) -> dict[str, Any]:
    """A method's settings on DDP rank ``rank``: its own random stream (e.g. FA's probes)."""
    if "seed" not in kwargs:
        return dict(kwargs)
    return {**kwargs, "seed": rank_seed(kwargs["seed"], rank)}


def default_values(method: str) -> list[float | None]:
    """The default sweep of a method's strength: the paper's λ grid for ``fa``."""
    cls = _method_class(method)
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
) -> list[RunSpec]:
    """The runs of one sweep: every strength in ``values`` times every seed.

    ``seeds`` is a count (seeds 0..N-1) or explicit seeds. ``method_kwargs`` default to the
    method's default protocol (``fa``: 5 probes every 10 steps).
    """
    task_obj = get_task(task)
    cls = _method_class(method)
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
        config = task_obj.config.replace(**(config_overrides or {}))
    except (TypeError, ValueError) as exc:
        raise FlatnessError(f"invalid training protocol for {task}: {exc}") from None
    kwargs = dict(DEFAULT_METHOD_KWARGS.get(method, {}))
    kwargs.update(method_kwargs or {})
    if trajectory < 0:
        raise FlatnessError(f"--trajectory must be >= 0, got {trajectory}")
    return [
        RunSpec(task, method, cls.hparam, v, s, config.as_dict(), kwargs, trajectory)
        for v in grid
        for s in seed_list
    ]


# --------------------------------------------------------------------------------------------
# Measurements


def measure_sq_trace_per_B(
    model: nn.Module,
    task: Task,
    x: Tensor,
    y: Tensor,
    batch_size: int,
    *,
    num_samples: int = MEASURE_SAMPLES,
    probes: int = MEASURE_PROBES,
    seed: int = MEASURE_SEED,
) -> dict[str, float]:
    """Mean over fixed batches of Tr(H_b²)/B: the first ``num_samples`` rows of ``x``, in order.

    Only full batches of ``batch_size`` are used (B is the same for every batch). The model is
    in eval mode; probes come from one generator seeded with ``seed``, so two models of the same
    architecture see the same probes. Returns the value, the Monte-Carlo standard error of the
    probes, and the number of samples and probes used.
    """
    n = min(num_samples, int(y.shape[0]))
    n_batches = n // batch_size
    if n_batches == 0:
        batch_size, n_batches = n, 1  # fewer samples than one batch: use them all as one
    params = [p for p in model.parameters() if p.requires_grad]
    generator = torch.Generator().manual_seed(seed)
    values, variances = [], []
    with eval_mode(model):
        batches = iterate_batches(x, y, batch_size, shuffle=False)
        for _, (xb, yb) in zip(range(n_batches), batches):
            loss = task.loss_fn(model(xb), yb)
            est = measure_sq_trace(loss, params, probes=probes, generator=generator)
            values.append(est.value / batch_size)
            se = est.stderr / batch_size if math.isfinite(est.stderr) else 0.0
            variances.append(se**2)
    value = sum(values) / len(values)
    stderr = math.sqrt(sum(variances)) / len(values)
    return {
        "value": value,
        "stderr": stderr,
        "samples": n_batches * batch_size,
        "batch_size": batch_size,
        "probes": probes,
    }


def measure_final(model: nn.Module, task: Task, splits: Splits, config: TrainConfig) -> dict[str, Any]:
    """Every measurement of a final model, as flat record entries (extend here, e.g. λ_max).

    ``measured_sq_trace_per_B`` is Tr(H²)/B by the fixed protocol of this module; the training
    set is the one the model was trained on (validation split excluded).
    """
    start = time.perf_counter()
    m = measure_sq_trace_per_B(model, task, splits.x_train, splits.y_train, config.batch_size)
    return {
        "measured_sq_trace_per_B": m["value"],
        "measured_sq_trace_per_B_stderr": m["stderr"],
        "measurement": {
            "what": "mean over fixed batches of Tr(H_b^2)/B, eval mode, Rademacher probes",
            "samples": m["samples"],
            "batch_size": m["batch_size"],
            "probes_per_batch": m["probes"],
            "probe_seed": MEASURE_SEED,
            "seconds": time.perf_counter() - start,
        },
    }


FLATNESS_KEYS: tuple[str, ...] = ("lambda_max", "hessian_trace")


class StaleCheckpointError(FlatnessError):
    """A run's checkpoint file was written by another training of that run than its record."""


def check_checkpoint_matches(record: dict[str, Any], meta: dict[str, Any], path: Path) -> None:
    """``StaleCheckpointError`` unless the checkpoint at ``path`` is the one ``record`` wrote.

    Checkpoints carry their run's ``finished_at`` stamp (older ones: its final test accuracy),
    so results copied between directories cannot silently pair a record with the checkpoint of
    a different training of the same run.
    """
    same_run = meta.get("name", record["name"]) == record["name"]
    if "finished_at" in meta:
        same_run = same_run and meta["finished_at"] == record.get("finished_at")
    else:
        same_run = same_run and meta.get("final_test_acc") == record.get("final_test_acc")
    if not same_run:
        raise StaleCheckpointError(
            f"checkpoint {path} is not the one run {record['name']} recorded "
            f"(finished {meta.get('finished_at', 'at an unknown time')}, record {record.get('finished_at')}); "
            "re-run that run or remove the stale checkpoint"
        )


def _read_cache_entry(record: dict[str, Any], cache: Path) -> dict[str, Any]:
    path = cache / f"{record['name']}.json"
    if not path.exists():
        return {}
    try:
        cached = json.loads(path.read_text())
    except ValueError:
        return {}
    if not isinstance(cached, dict) or cached.get("finished_at") != record.get("finished_at"):
        return {}  # the run was redone: its cache entry is stale
    return cached


def cached_extras(
    record: dict[str, Any],
    cache: Path,
    wanted: Sequence[str],
    cached: dict[str, Any] | None = None,
) -> dict[str, float]:
    """``wanted`` values already known for a run: from its record, else from ``cache/NAME.json``.

    Computes nothing (see :func:`final_model_extras`); keys known nowhere are left out.
    """
    out = {k: float(record[k]) for k in wanted if isinstance(record.get(k), (int, float))}
    cached = _read_cache_entry(record, cache) if cached is None else cached
    out.update({k: float(cached[k]) for k in wanted if k not in out and isinstance(cached.get(k), (int, float))})
    return out


def final_model_extras(
    record: dict[str, Any],
    directory: Path,
    cache: Path,
    wanted: Sequence[str],
    data_dir: str | None,
    download: bool | None,
) -> dict[str, float]:
    """``wanted`` of ``final_val_loss`` and :data:`FLATNESS_KEYS` for one run's final model.

    Taken from the run record when it has them, else from ``cache/NAME.json`` (valid while the
    record's ``finished_at`` matches), else computed from the checkpoint and added to the cache.
    Validation loss: the task loss over the validation split, eval mode. λ_max and Tr(H):
    :func:`flatness.measures.final_measures` on the first 1024 training samples in batches of B.
    """
    cached = _read_cache_entry(record, cache)
    out = cached_extras(record, cache, wanted, cached)
    missing = [k for k in wanted if k not in out]
    if not missing:
        return out
    task = get_task(record["task"])
    config = TrainConfig.from_dict(record["config"])
    splits = task.load(data_dir, val_fraction=config.val_fraction, download=download)
    model, meta = load_checkpoint(directory / record["checkpoint"], task=record["task"])
    check_checkpoint_matches(record, meta, directory / record["checkpoint"])
    new: dict[str, Any] = {}
    if "final_val_loss" in missing and splits.x_val is not None and splits.y_val is not None:
        from .train import evaluate

        result = evaluate(model, splits.x_val, splits.y_val, task.predict, config.eval_batch_size, task.loss_fn)
        new["final_val_loss"] = result["loss"]
    if any(k in missing for k in FLATNESS_KEYS):
        from . import measures

        n = min(MEASURE_SAMPLES, int(splits.y_train.shape[0]))
        batch = min(config.batch_size, n)
        batches = [
            b for _, b in zip(range(n // batch), iterate_batches(splits.x_train, splits.y_train, batch, shuffle=False))
        ]
        start = time.perf_counter()
        values = measures.final_measures(model, task.loss_fn, batches, seed=0)
        new.update({k: float(values[k]) for k in FLATNESS_KEYS})
        new["measure_samples"], new["measure_batch_size"] = batch * len(batches), batch
        new["measure_seconds"] = time.perf_counter() - start
    cached.update(new)
    cached.update({"name": record["name"], "finished_at": record.get("finished_at")})
    write_json(cache / f"{record['name']}.json", cached)
    out.update({k: float(new[k]) for k in missing if k in new})
    return out


# --------------------------------------------------------------------------------------------
# Files


def write_json(path: str | os.PathLike[str], obj: Any) -> None:
    """Write ``obj`` as JSON atomically (temp file in the same folder, then rename)."""
    data = (json.dumps(obj, indent=1, sort_keys=False, allow_nan=True) + "\n").encode()
    atomic_write_bytes(path, lambda fh: fh.write(data))


def read_record(path: str | os.PathLike[str]) -> dict[str, Any] | None:
    """A run record if ``path`` holds a finished one (complete or failed), else ``None``."""
    try:
        with open(path, encoding="utf-8") as fh:
            record = json.load(fh)
    except (OSError, ValueError):
        return None
    if not isinstance(record, dict) or record.get("format") != RECORD_FORMAT:
        return None
    if record.get("status") not in ("complete", "failed"):
        return None
    return record


def _check_writable(directory: Path) -> None:
    try:
        directory.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(directory / ".write-test", lambda fh: fh.write(b"ok"))
        (directory / ".write-test").unlink()
    except OSError as exc:
        raise FlatnessError(f"cannot write results to {directory}: {exc.strerror or exc}") from None


# --------------------------------------------------------------------------------------------
# One run


def _snapshot_steps(total: int, count: int) -> list[int]:
    """``count`` optimisation steps evenly spread over ``0..total`` (0 = initial weights)."""
    if count <= 0:
        return []
    if count == 1:
        return [total]
    return sorted({round(i * total / (count - 1)) for i in range(count)})


def _state_copy(model: nn.Module) -> dict[str, Tensor]:
    return {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}


def _avg_train_flatness(epochs: list[dict[str, Any]], batch_size: int) -> float | None:
    """The paper's average flatness: the mean of the method's Tr(H²) estimates over training, /B."""
    total, count = 0.0, 0
    for e in epochs:
        if e.get("sq_trace") is not None:
            steps = int(e.get("sq_trace_steps", e.get("steps", 1)) or 1)
            total += e["sq_trace"] * steps
            count += steps
    return None if count == 0 else total / count / batch_size


def execute_run(
    spec: RunSpec,
    out_dir: str | os.PathLike[str],
    *,
    data_dir: str | os.PathLike[str] | None = None,
    download: bool | None = None,
    progress: bool = False,
    dist_ctx: DistContext | None = None,
    emulate_ranks: int = 1,
) -> dict[str, Any]:
    """Train and measure one run; write its checkpoint(s) and then its JSON record.

    A run that diverges (non-finite loss or curvature) is recorded with ``status: "failed"``;
    data problems raise :class:`FlatnessError` and write nothing.

    ``dist_ctx``: this process is one rank of a DDP job (:mod:`flatness.distributed`); every
    rank calls this with the same spec, rank 0 measures and writes. ``emulate_ranks`` > 1 runs
    the arithmetic of that many DDP ranks in this one process (the reference of the DDP tests).
    """
    out = Path(out_dir)
    task = get_task(spec.task)
    config = TrainConfig.from_dict(spec.config)
    splits = task.load(data_dir, val_fraction=config.val_fraction, download=download)
    kwargs = dict(spec.method_kwargs)
    if spec.hparam is not None and spec.value is not None:
        kwargs[spec.hparam] = spec.value
    if _accepts(spec.method, "seed") and "seed" not in kwargs:
        kwargs["seed"] = spec.seed  # the method's own randomness (e.g. FA's probes)
    torch.manual_seed(spec.seed)
    model = task.build_model(num_features=splits.num_features)
    world = dist_ctx.world_size if dist_ctx is not None else emulate_ranks
    is_main = dist_ctx is None or dist_ctx.is_main
    try:
        if dist_ctx is not None:
            # identical initial weights on every rank (DDP also broadcasts rank 0's), then each
            # rank's own streams: dropout from the global generator, probes from the method's
            if dist_ctx.device.type != "cpu":
                model = model.to(dist_ctx.device)
                splits = dataclasses.replace(
                    splits,
                    **{
                        f.name: to_device(getattr(splits, f.name), dist_ctx.device)
                        for f in dataclasses.fields(splits)
                        if isinstance(getattr(splits, f.name), Tensor)
                    },
                )
            torch.manual_seed(rank_seed(spec.seed, dist_ctx.rank))
            method = make_method(
                spec.method, wrap_model(model, dist_ctx), task.loss_fn, **_rank_kwargs(kwargs, dist_ctx.rank)
            )
        elif emulate_ranks > 1:
            seeds = [rank_seed(spec.seed, r) for r in range(emulate_ranks)]
            per_rank = [
                make_method(spec.method, model, task.loss_fn, **_rank_kwargs(kwargs, r))
                for r in range(emulate_ranks)
            ]
            method = EmulatedRanks(per_rank, seeds)
        else:
            method = make_method(spec.method, model, task.loss_fn, **kwargs)
    except (TypeError, ValueError) as exc:
        message = " ".join(str(exc).split())
        raise FlatnessError(f"method {spec.method!r} rejects its settings {kwargs}: {message}") from None
    optimizer = make_optimizer(model, config)
    generator = torch.Generator().manual_seed(spec.seed)
    per_epoch = steps_per_epoch(int(splits.y_train.shape[0]), config.batch_size)
    snap_steps = set(_snapshot_steps(config.epochs * per_epoch, spec.trajectory))
    snapshots: list[tuple[int, dict[str, Tensor]]] = []
    if 0 in snap_steps:
        snapshots.append((0, _state_copy(model)))

    def on_step_end(step: int, info: dict[str, float]) -> None:
        if step in snap_steps:
            snapshots.append((step, _state_copy(model)))

    def on_epoch_end(epoch: int, record: dict[str, Any]) -> dict[str, Any]:
        if not is_main:
            return {"sq_trace_per_B": float("nan")}  # measured (and recorded) by rank 0 only
        m = measure_sq_trace_per_B(
            model,
            task,
            splits.x_train,
            splits.y_train,
            config.batch_size,
            num_samples=EPOCH_MEASURE_BATCHES * config.batch_size,
            probes=EPOCH_MEASURE_PROBES,
        )
        return {"sq_trace_per_B": m["value"]}

    base: dict[str, Any] = {
        "format": RECORD_FORMAT,
        "version": 1,
        "name": spec.name,
        **spec.as_dict(),
        "protocol_id": spec.protocol_id,
        "variant_id": spec.variant_id,
        "task_version": task.version,
        "ranks": world,
        "distributed": None
        if world == 1
        else {
            "world_size": world,
            "backend": "emulated" if dist_ctx is None else dist_ctx.backend,
            "semantics": "per-rank penalty/perturbation on the local shard, gradients averaged",
        },
        "train_samples": int(splits.y_train.shape[0]),
        "val_samples": 0 if splits.y_val is None else int(splits.y_val.shape[0]),
        "test_samples": int(splits.y_test.shape[0]),
        "environment": {
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "python": platform.python_version(),
        },
    }
    started = time.perf_counter()
    try:
        history = train(
            model,
            method,
            optimizer,
            splits,
            config,
            predict=task.predict,
            generator=generator,
            progress=progress,
            description=spec.name,
            on_epoch_end=on_epoch_end,
            on_step_end=on_step_end if snap_steps else None,
            shard=None if dist_ctx is None else (dist_ctx.rank, dist_ctx.world_size),
            min_batch=world,
        )
    except (TrainingDiverged, FloatingPointError) as exc:
        if not is_main:
            return {"status": "failed", "name": spec.name}
        record = {
            **base,
            "status": "failed",
            "error": f"{type(exc).__name__}: {exc}",
            "finished_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        }
        write_json(out / f"{spec.name}.json", record)
        return record
    if not is_main:
        return {"status": "complete", "name": spec.name, "rank": dist_ctx.rank}
    measurements = measure_final(model, task, splits, config)
    epochs = history.epochs
    test = [e["test_acc"] for e in epochs]
    val = [e.get("val_acc") for e in epochs]
    best_epoch = max(range(len(test)), key=lambda i: test[i])
    chosen = max(range(len(val)), key=lambda i: val[i]) if all(v is not None for v in val) else None
    record = {
        **base,
        "status": "complete",
        "final_test_acc": test[-1],
        "best_test_acc": test[best_epoch],
        "best_test_epoch": best_epoch + 1,
        "val_chosen_epoch": None if chosen is None else chosen + 1,
        "val_chosen_test_acc": None if chosen is None else test[chosen],
        "final_val_acc": val[-1],
        **measurements,
        "avg_train_sq_trace_per_B": _avg_train_flatness(epochs, config.batch_size),
        "avg_epoch_sq_trace_per_B": sum(e["sq_trace_per_B"] for e in epochs) / len(epochs),
        "train_seconds": history.train_seconds,
        "seconds_per_epoch": history.train_seconds / len(epochs),
        "eval_seconds": history.eval_seconds,
        "total_seconds": time.perf_counter() - started,
        "steps": history.steps,
        "curves": {key: [e.get(key) for e in epochs] for key in sorted({k for e in epochs for k in e})},
        "checkpoint": f"checkpoints/{spec.name}.pt",
        "trajectory_file": f"trajectories/{spec.name}.pt" if snapshots else None,
        "finished_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    meta = {k: record[k] for k in ("name", "method", "hparam", "value", "seed", "final_test_acc", "finished_at")}
    meta["config"] = spec.config
    save_checkpoint(out / record["checkpoint"], model, task=spec.task, meta=meta)
    if snapshots:
        payload = {
            "format": "flatness-trajectory",
            "task": spec.task,
            "name": spec.name,
            "steps": [s for s, _ in snapshots],
            "steps_per_epoch": per_epoch,
            "state_dicts": [sd for _, sd in snapshots],
        }
        atomic_write_bytes(out / record["trajectory_file"], lambda fh: torch.save(payload, fh))
    write_json(out / f"{spec.name}.json", record)  # last: its presence marks the run as done
    return record


# --------------------------------------------------------------------------------------------
# Many runs


def _worker_init(threads: int) -> None:
    torch.set_num_threads(threads)


def _worker_run(spec_dict: dict[str, Any], out_dir: str, data_dir: str | None, download: bool | None) -> dict[str, Any]:
    record = execute_run(RunSpec.from_dict(spec_dict), out_dir, data_dir=data_dir, download=download)
    return _brief(record)


def _brief(record: dict[str, Any]) -> dict[str, Any]:
    keys = ("name", "status", "final_test_acc", "measured_sq_trace_per_B", "train_seconds", "error")
    return {k: record.get(k) for k in keys}


def _describe(record: dict[str, Any]) -> str:
    if record.get("status") != "complete":
        return f"{record['name']}: FAILED ({record.get('error')})"
    return (
        f"{record['name']}: final acc {record['final_test_acc']:.4f}, "
        f"Tr(H²)/B {record['measured_sq_trace_per_B']:.4g}, train {record['train_seconds']:.1f} s"
    )


def _available_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def _identity(spec: RunSpec) -> dict[str, Any]:
    d = spec.as_dict()
    d.pop("trajectory")  # an extra output, not part of what the run computes
    return d


def pending_runs(
    specs: Iterable[RunSpec], out_dir: str | os.PathLike[str], retry_failed: bool = False
) -> tuple[list[RunSpec], list[dict[str, Any]]]:
    """Split ``specs`` into runs still to do and records already finished in ``out_dir``.

    A finished record whose settings differ from its spec (same file name, other settings) is an
    error: nothing is overwritten.
    """
    todo, done = [], []
    for spec in specs:
        path = Path(out_dir) / f"{spec.name}.json"
        if not path.exists():
            todo.append(spec)
            continue
        record = read_record(path)
        if record is None:
            raise FlatnessError(
                f"{path} exists but is not a finished run record; move it away to re-run that run"
            )
        if _identity(RunSpec.from_dict(record)) != _identity(spec):
            raise FlatnessError(f"{path} holds a run with other settings; use another --out")
        version = get_task(spec.task).version
        if record.get("task_version", 1) != version:  # records before versioning: 1
            raise FlatnessError(
                f"{path} was made by version {record.get('task_version', 1)} of the {spec.task} "
                f"protocol (now {version}); use another --out"
            )
        if record["status"] == "failed" and retry_failed:
            todo.append(spec)
        else:
            done.append(record)
    return todo, done


def run_grid(
    specs: Sequence[RunSpec],
    out_root: str | os.PathLike[str],
    *,
    jobs: int = 1,
    data_dir: str | os.PathLike[str] | None = None,
    download: bool | None = None,
    progress: bool = True,
    retry_failed: bool = False,
    log: Any = None,
    dist_ctx: DistContext | None = None,
    emulate_ranks: int = 1,
) -> dict[str, list[dict[str, Any]]]:
    """Run every pending spec (``jobs`` at a time), results under ``OUT/TASK/``.

    Returns the finished records (brief form for runs done now) per results directory. Runs
    already finished are skipped. With ``jobs > 1`` each run is a task for a pool of spawned
    processes with ``cores // jobs`` torch threads each; the longest runs are started first.
    """
    if jobs < 1:
        raise FlatnessError(f"--jobs must be >= 1, got {jobs}")
    if (dist_ctx is not None or emulate_ranks > 1) and jobs != 1:
        raise FlatnessError("--jobs must be 1 with --ddp / --emulate-ranks (the ranks are the parallelism)")
    if dist_ctx is not None:
        return _run_grid_ddp(specs, Path(out_root), dist_ctx, data_dir, download, progress, retry_failed, log)
    out_root = Path(out_root)
    dirs = {spec.task: out_root / spec.task for spec in specs}
    for d in dict.fromkeys(dirs.values()):
        _check_writable(d)
    todo: list[RunSpec] = []
    results: dict[str, list[dict[str, Any]]] = {str(d): [] for d in dirs.values()}
    for task_name in dict.fromkeys(s.task for s in specs):
        task_specs = [s for s in specs if s.task == task_name]
        pending, done = pending_runs(task_specs, dirs[task_name], retry_failed)
        todo += pending
        results[str(dirs[task_name])] += done
    say = log or (lambda msg: print(msg, file=sys.stderr))
    skipped = len(specs) - len(todo)
    if skipped:
        say(f"{skipped} of {len(specs)} runs already finished; skipping them")
    if not todo:
        return results
    todo.sort(key=lambda s: -s.cost)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(todo), desc="runs", unit="run")
        say = bar.write if log is None else say
    try:
        if jobs == 1:
            for spec in todo:
                record = execute_run(
                    spec, dirs[spec.task], data_dir=data_dir, download=download, progress=progress,
                    emulate_ranks=emulate_ranks,
                )
                results[str(dirs[spec.task])].append(_brief(record))
                say(_describe(record))
                if bar is not None:
                    bar.update(1)
        else:
            threads = max(1, _available_cores() // jobs)
            context = multiprocessing.get_context("spawn")
            with ProcessPoolExecutor(jobs, mp_context=context, initializer=_worker_init, initargs=(threads,)) as pool:
                futures: dict[Future[dict[str, Any]], RunSpec] = {
                    pool.submit(
                        _worker_run,
                        spec.as_dict(),
                        str(dirs[spec.task]),
                        None if data_dir is None else str(data_dir),
                        download,
                    ): spec
                    for spec in todo
                }
                remaining = set(futures)
                try:
                    while remaining:
                        finished, remaining = wait(remaining, return_when=FIRST_COMPLETED)
                        for fut in finished:
                            record = fut.result()  # a worker's FlatnessError ends the sweep here
                            spec = futures[fut]
                            results[str(dirs[spec.task])].append(record)
                            say(_describe(record))
                            if bar is not None:
                                bar.update(1)
                except BaseException:
                    for fut in remaining:
                        fut.cancel()
                    raise
    finally:
        if bar is not None:
            bar.close()
    return results


def _run_grid_ddp(
    specs: Sequence[RunSpec],
    out_root: Path,
    ctx: DistContext,
    data_dir: str | os.PathLike[str] | None,
    download: bool | None,
    progress: bool,
    retry_failed: bool,
    log: Any,
) -> dict[str, list[dict[str, Any]]]:
    """Every rank runs the same pending runs in the same order; rank 0 decides which and writes."""
    import torch.distributed as dist

    dirs = {spec.task: out_root / spec.task for spec in specs}
    results: dict[str, list[dict[str, Any]]] = {str(d): [] for d in dirs.values()}
    plan: list[Any] = [None]
    if ctx.is_main:
        todo: list[RunSpec] = []
        for d in dict.fromkeys(dirs.values()):
            _check_writable(d)
        for task_name in dict.fromkeys(s.task for s in specs):
            pending, done = pending_runs([s for s in specs if s.task == task_name], dirs[task_name], retry_failed)
            todo += pending
            results[str(dirs[task_name])] += done
        plan = [[s.as_dict() for s in sorted(todo, key=lambda s: -s.cost)]]
    dist.broadcast_object_list(plan, src=0)  # a shared filesystem is not assumed
    say = log or (lambda msg: print(msg, file=sys.stderr))
    if ctx.is_main and len(specs) > len(plan[0]):
        say(f"{len(specs) - len(plan[0])} of {len(specs)} runs already finished; skipping them")
    for spec_dict in plan[0]:
        spec = RunSpec.from_dict(spec_dict)
        record = execute_run(
            spec, dirs[spec.task], data_dir=data_dir, download=download,
            progress=progress and ctx.is_main, dist_ctx=ctx,
        )
        dist.barrier()  # rank 0 has written the run before anyone starts the next
        if ctx.is_main:
            results[str(dirs[spec.task])].append(_brief(record))
            say(_describe(record))
    return results


def select_shard(specs: Sequence[RunSpec], index: int, count: int) -> list[RunSpec]:
    """The ``index``-th (1-based) of ``count`` disjoint, balanced slices of a grid.

    Runs are dealt round-robin in a fixed order (task, cost, name), so every machine computes the
    same partition from the same command line, and the slices' costs are similar.
    """
    if not (1 <= index <= count):
        raise FlatnessError(f"--shard must be I/N with 1 <= I <= N, got {index}/{count}")
    ordered = sorted(specs, key=lambda s: (s.task, -s.cost, s.name))
    return ordered[index - 1 :: count]


def _parse_shard(text: str) -> tuple[int, int]:
    index, sep, count = text.partition("/")
    try:
        if not sep:
            raise ValueError
        return int(index), int(count)
    except ValueError:
        raise FlatnessError(f"--shard must look like I/N (e.g. 2/4), got {text!r}") from None


# --------------------------------------------------------------------------------------------
# CLI


def _parse_assignments(items: Sequence[str] | None, what: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for item in items or []:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise FlatnessError(f"{what} must look like KEY=VALUE, got {item!r}")
        try:
            out[key] = json.loads(raw)
        except ValueError:
            out[key] = raw  # a bare word: a string value
    return out


def protocol_overrides(args: argparse.Namespace) -> dict[str, Any]:
    """The training-protocol flags a user gave (``--epochs``, ``--batch-size``, ``--lr``), checked."""
    for flag, value in (("--epochs", args.epochs), ("--batch-size", args.batch_size)):
        if value is not None and value < 1:
            raise FlatnessError(f"{flag} must be >= 1, got {value}")
    if args.lr is not None and not args.lr > 0:
        raise FlatnessError(f"--lr must be > 0, got {args.lr}")
    return {
        k: v
        for k, v in (("epochs", args.epochs), ("batch_size", args.batch_size), ("lr", args.lr))
        if v is not None
    }


def _tasks_from_args(names: Sequence[str]) -> list[str]:
    out: list[str] = []
    for name in names:
        if name == "all":
            out += list(TASKS)
        else:
            get_task(name)
            out.append(name)
    return list(dict.fromkeys(out))


def _cmd_run(args: argparse.Namespace) -> int:
    tasks = _tasks_from_args(args.tasks)
    if args.seeds < 1:
        raise FlatnessError(f"--seeds must be >= 1, got {args.seeds}")
    if args.jobs < 1:
        raise FlatnessError(f"--jobs must be >= 1, got {args.jobs}")
    if args.lambdas is not None:
        bad = [v for v in args.lambdas if not (math.isfinite(v) and v >= 0)]
        if bad:
            raise FlatnessError(f"--lambdas must be finite and >= 0, got {bad[0]:g}")
    overrides = protocol_overrides(args)
    method_kwargs = _parse_assignments(args.method_arg, "--method-arg")
    for key, value in (("probes", args.probes), ("every", args.every)):
        if value is not None:
            if value < 1:
                raise FlatnessError(f"--{key} must be >= 1, got {value}")
            if not _accepts(args.method, key):
                raise FlatnessError(f"method {args.method!r} takes no --{key}")
            method_kwargs[key] = value
    specs: list[RunSpec] = []
    for task in tasks:
        specs += build_grid(
            task,
            args.method,
            args.lambdas,
            args.seeds,
            config_overrides=overrides,
            method_kwargs=method_kwargs,
            trajectory=args.trajectory,
        )
    if args.shard:
        specs = select_shard(specs, *_parse_shard(args.shard))
    if args.emulate_ranks < 1:
        raise FlatnessError(f"--emulate-ranks must be >= 1, got {args.emulate_ranks}")
    dist_ctx = None
    if args.ddp or launched_by_torchrun():
        if args.emulate_ranks > 1:
            raise FlatnessError("--emulate-ranks is the one-process twin of --ddp: use one of them")
        dist_ctx = init_distributed(args.backend)
    start = time.perf_counter()
    try:
        results = run_grid(
            specs,
            args.out,
            jobs=args.jobs,
            data_dir=args.data_dir,
            download=False if args.no_download else None,
            progress=not args.quiet,
            retry_failed=args.retry_failed,
            dist_ctx=dist_ctx,
            emulate_ranks=args.emulate_ranks,
        )
    finally:
        if dist_ctx is not None:
            shutdown()
    if dist_ctx is not None and not dist_ctx.is_main:
        return 0
    wall = time.perf_counter() - start
    print(f"{len(specs)} runs in {', '.join(results)}; wall time {wall:.1f} s", file=sys.stderr)
    from .report import write_report

    for directory in results:
        text = write_report(directory, plots=not args.no_plots)
        print(text)
    return 0


def add_cli(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "run",
        help="sweep a method's strength over seeds on a paper task (resumable)",
        description=(
            "Train TASK (cifar100-mlp, newsgroups-logreg, breast-cancer-mlp, or 'all') for every "
            "strength and seed, write one JSON per run, checkpoints, summary.md/csv and plots "
            "under OUT/TASK/. Re-running the same command skips finished runs."
        ),
    )
    p.add_argument("tasks", nargs="+", metavar="TASK", help=f"one of {', '.join(TASKS)}, or 'all'")
    p.add_argument("--method", default="fa", help="training method (default: fa)")
    p.add_argument(
        "--lambdas",
        "--values",
        dest="lambdas",
        type=float,
        nargs="+",
        metavar="V",
        help="strengths of the method's hyper-parameter (default for fa: 0 0.001 0.01 0.1 1)",
    )
    p.add_argument("--seeds", type=int, default=3, help="number of seeds, 0..N-1 (default 3)")
    p.add_argument("--epochs", type=int, help="override the task's number of epochs")
    p.add_argument("--batch-size", type=int, help="override the task's batch size B")
    p.add_argument("--lr", type=float, help="override the task's learning rate")
    p.add_argument("--probes", type=int, help="Hutchinson probes M per curvature step (fa: 5)")
    p.add_argument("--every", type=int, help="curvature step every K steps (fa: 10)")
    p.add_argument(
        "--method-arg",
        action="append",
        metavar="KEY=VALUE",
        help="extra keyword argument of the method (repeatable; VALUE is JSON or a word)",
    )
    p.add_argument("--data-dir", help="data directory (default: $FLATNESS_DATA or ~/.cache/flatness)")
    p.add_argument("--out", default="runs", help="results root; a folder per task (default: runs)")
    p.add_argument("--jobs", type=int, default=1, help="runs in parallel processes (default 1)")
    p.add_argument(
        "--trajectory",
        type=int,
        default=0,
        metavar="N",
        help="keep N weight snapshots evenly along training (for landscape plots; default 0)",
    )
    p.add_argument("--no-download", action="store_true", help="never download missing data")
    p.add_argument("--retry-failed", action="store_true", help="re-run runs recorded as failed")
    p.add_argument("--no-plots", action="store_true", help="write the tables but no PNG plots")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument(
        "--shard",
        metavar="I/N",
        help="run only the I-th of N disjoint slices of the grid (several machines, one --out)",
    )
    p.add_argument(
        "--ddp",
        action="store_true",
        help="train each run with DistributedDataParallel (automatic under torchrun)",
    )
    p.add_argument("--backend", choices=("gloo", "nccl"), help="DDP backend (default: nccl on GPU, else gloo)")
    p.add_argument(
        "--emulate-ranks",
        type=int,
        default=1,
        metavar="N",
        help="one process doing the arithmetic of an N-rank DDP run (reference for --ddp)",
    )
    p.set_defaults(func=_cmd_run)
