"""What one run leaves behind.

Its record built from training and measurement, its checkpoint, its trajectory snapshots, and last
its record (:func:`flatness.experiments.running.runner.execute_run`).

A run's record starts as :func:`started_record` (identity, data sizes, environment, resolved
settings; ``status`` ``"failed"``), becomes :func:`finished_record` after training and the
final measurements, and is written by :func:`write_run` after the checkpoint and trajectory,
so that its presence marks the run as done.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ...methods.fa import PenaltyLog
from ...utils import atomic_write_bytes
from ..world.data import Splits
from ..world.tasks import Task, TrainConfig
from .checkpoints import save_checkpoint
from .distributed import DistContext
from .platforms import environment
from .record import RECORD_FIELDS, RunRecord, write_record
from .specs import RunSpec, resolved_settings
from .training import History

__all__ = [
    "Snapshots",
    "avg_train_sq_trace_per_B",
    "finished_record",
    "now",
    "snapshot_steps",
    "started_record",
    "write_run",
]


def snapshot_steps(total: int, count: int) -> list[int]:
    """``count`` optimisation steps evenly spread over ``0..total`` (0 = initial weights).

    At most every step once.
    """
    if count <= 0:
        return []
    count = min(count, total + 1)
    if count == 1:
        return [total]
    return sorted({round(i * total / (count - 1)) for i in range(count)})


def state_copy(model: nn.Module) -> dict[str, Tensor]:
    """A detached CPU copy of ``model``'s state dict."""
    return {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}


@dataclass
class Snapshots:
    """A run's ``trajectory`` weight snapshots.

    At the optimisation steps ``steps`` (0: the initial weights, taken at once).
    """

    model: nn.Module
    steps: set[int]
    taken: list[tuple[int, dict[str, Tensor]]] = field(default_factory=list)

    def __post_init__(self) -> None:
        if 0 in self.steps:
            self.taken.append((0, state_copy(self.model)))

    def on_step_end(self, step: int, info: dict[str, float]) -> None:
        """Take a snapshot after optimisation step ``step`` if it is one of :attr:`steps`."""
        if step in self.steps:
            self.taken.append((step, state_copy(self.model)))


def avg_train_sq_trace_per_B(epochs: list[dict[str, Any]], batch_size: int) -> float | None:
    """The paper's average flatness: the mean of the method's Tr(H²) estimates over training, /B."""
    total, count = 0.0, 0
    for e in epochs:
        logged = PenaltyLog.from_epoch(e)
        if logged is not None:
            total += logged.sq_trace * logged.steps
            count += logged.steps
    return None if count == 0 else total / count / batch_size


def started_record(
    spec: RunSpec, task: Task, splits: Splits, config: TrainConfig, kwargs: dict[str, Any], world: int,
    dist_ctx: DistContext | None, device: torch.device,
) -> RunRecord:
    """What a run's record holds before training.

    Its identity, data sizes, environment and resolved settings (``status`` ``"failed"`` until
    :func:`finished_record`).
    """
    train_samples = int(splits.y_train.shape[0])
    distributed = None if world == 1 else {
        "world_size": world,
        "backend": "emulated" if dist_ctx is None else dist_ctx.backend,
        "semantics": "per-rank penalty/perturbation on the local shard, gradients averaged",
    }
    return RunRecord(
        name=spec.name, task=spec.task, method=spec.method, hparam=spec.hparam, value=spec.value,
        seed=spec.seed, status="failed", config=dict(spec.config), method_kwargs=dict(spec.method_kwargs),
        trajectory=spec.trajectory, model_kwargs=dict(spec.model_kwargs), protocol_id=spec.protocol_id,
        variant_id=spec.variant_id, task_version=task.version, ranks=world, distributed=distributed,
        train_samples=train_samples,
        val_samples=0 if splits.y_val is None else int(splits.y_val.shape[0]),
        test_samples=int(splits.y_test.shape[0]),
        train_eval_samples=min(config.train_eval_samples or train_samples, train_samples),
        environment=environment(device),
        resolved=resolved_settings(spec, kwargs),
        task_source=None if task.source is None
        else {**task.source, "description": task.description, "metric": task.metric_name},
    )


def finished_record(
    base: RunRecord, history: History, measurements: dict[str, Any], config: TrainConfig, started: float,
    *, trajectory: bool,
) -> RunRecord:
    """``base`` completed by the training ``history`` and the final ``measurements``.

    Record fields, the rest as extras: final, best and validation-chosen accuracies, curves, times.
    """
    epochs = history.epochs
    evaluated = [i for i, e in enumerate(epochs) if "test_acc" in e]  # all, unless a stopping rule
    test = [e.get("test_acc") for e in epochs]
    val = [e.get("val_acc") for e in epochs]
    best_epoch = max(evaluated, key=lambda i: test[i])
    has_val = all(val[i] is not None for i in evaluated)
    chosen = max(evaluated, key=lambda i: val[i]) if has_val else None
    last = epochs[-1]
    return dataclasses.replace(
        base,
        status="complete",
        final_train_loss=last.get("train_loss"),
        final_train_acc=last.get("train_acc"),
        final_val_loss=last.get("val_loss"),
        final_val_acc=last.get("val_acc"),
        final_test_loss=last.get("test_loss"),
        final_test_acc=test[-1],
        best_test_acc=test[best_epoch],
        best_test_epoch=best_epoch + 1,
        val_chosen_epoch=None if chosen is None else chosen + 1,
        val_chosen_test_acc=None if chosen is None else test[chosen],
        **{k: v for k, v in measurements.items() if k in RECORD_FIELDS},
        extras={k: v for k, v in measurements.items() if k not in RECORD_FIELDS},
        avg_train_sq_trace_per_B=avg_train_sq_trace_per_B(epochs, config.batch_size),
        avg_epoch_sq_trace_per_B=sum(epochs[i]["sq_trace_per_B"] for i in evaluated) / len(evaluated),
        train_seconds=history.train_seconds,
        seconds_per_epoch=history.train_seconds / len(epochs),
        eval_seconds=history.eval_seconds,
        total_seconds=time.perf_counter() - started,
        steps=history.steps,
        curves={key: [e.get(key) for e in epochs] for key in sorted({k for e in epochs for k in e})},
        checkpoint=f"checkpoints/{base.name}.pt",
        trajectory_file=f"trajectories/{base.name}.pt" if trajectory else None,
        finished_at=now(),
    )


def write_run(
    out: Path, spec: RunSpec, record: RunRecord, model: nn.Module, task_source: dict[str, Any] | None,
    snapshots: list[tuple[int, dict[str, Tensor]]], per_epoch: int,
) -> None:
    """The run's checkpoint, its trajectory (if any), then its record.

    Last, its presence marks the run as done.
    """
    meta = {
        "name": record.name,
        "method": record.method,
        "hparam": record.hparam,
        "value": record.value,
        "seed": record.seed,
        "final_test_acc": record.final_test_acc,
        "finished_at": record.finished_at,
        "config": spec.config,
    }
    save_checkpoint(out / str(record.checkpoint), model, task=spec.task, meta=meta, model_kwargs=spec.model_kwargs,
                    task_source=task_source)
    if snapshots:
        payload = {
            "format": "flatness-trajectory",
            "task": spec.task,
            "name": spec.name,
            "steps": [s for s, _ in snapshots],
            "steps_per_epoch": per_epoch,
            "state_dicts": [sd for _, sd in snapshots],
        }
        atomic_write_bytes(out / str(record.trajectory_file), lambda fh: torch.save(payload, fh))
    write_record(out / f"{spec.name}.json", record)


def now() -> str:
    """The current UTC time in ISO format, to the second (a record's ``finished_at``)."""
    return datetime.now(timezone.utc).isoformat(timespec="seconds")
