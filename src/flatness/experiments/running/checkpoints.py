"""Checkpoints of run models: the weights with their task and run metadata, written atomically.

A checkpoint carries its run's ``finished_at`` stamp, so a record is never paired with the
checkpoint of another training of the same run (:func:`check_checkpoint_matches`), and the model
settings it was built with. :func:`initial_model` rebuilds a run's initial weights from its seed.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ...utils import FlatnessError, atomic_write_bytes
from ..world.plugins import recorded_task
from ..world.tasks import TrainConfig, get_task
from .record import RunRecord

__all__ = [
    "CHECKPOINT_FORMAT",
    "save_checkpoint",
    "load_checkpoint",
    "StaleCheckpointError",
    "check_checkpoint_matches",
    "initial_model",
    "checkpoint_initial_model",
]

CHECKPOINT_FORMAT = "flatness-checkpoint"


def _input_width(model: nn.Module) -> int | None:
    for module in model.modules():
        width = getattr(module, "in_features", None)
        if isinstance(width, int):
            return width
    return None


def save_checkpoint(
    path: str | os.PathLike[str],
    model: nn.Module,
    *,
    task: str,
    meta: dict[str, Any],
    model_kwargs: dict[str, Any] | None = None,
    task_source: dict[str, Any] | None = None,
) -> None:
    """Write the model's weights with its task name, model settings and ``meta``, atomically.

    The model settings are those it was built with (``task.build_model(**model_kwargs)``); ``meta``
    is plain JSON-like data. ``task_source``: a plugin task's origin
    (:mod:`flatness.experiments.world.plugins`), so the checkpoint loads without naming the plugin
    again.
    """
    get_task(task)
    payload = {
        "format": CHECKPOINT_FORMAT,
        "version": 1,
        "task": task,
        "task_source": task_source,
        "num_features": _input_width(model),
        "model_kwargs": dict(model_kwargs or {}),
        "state_dict": {k: v.detach().cpu().clone() for k, v in model.state_dict().items()},
        "meta": meta,
    }
    atomic_write_bytes(path, lambda fh: torch.save(payload, fh))


def _read_payload(path: Path, task: str | None) -> dict[str, Any]:
    if not path.is_file():
        raise FlatnessError(f"checkpoint {path} does not exist")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise FlatnessError(f"{path} is not a readable flatness checkpoint ({type(exc).__name__})") from None
    if not isinstance(payload, dict) or payload.get("format") != CHECKPOINT_FORMAT:
        raise FlatnessError(f"{path} is not a flatness checkpoint")
    saved_task = payload.get("task")
    if task is not None and saved_task != task:
        raise FlatnessError(f"{path} is a checkpoint of task {saved_task!r}, not {task!r}")
    recorded_task(str(saved_task), payload.get("task_source"))
    return payload


def load_checkpoint(
    path: str | os.PathLike[str], task: str | None = None
) -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild the task's model from a checkpoint; returns ``(model, meta)``, model in eval mode.

    ``FlatnessError`` if the file is missing, is not a flatness checkpoint, belongs to another
    task than ``task``, or its weights do not fit the task's model.
    """
    path = Path(path)
    payload = _read_payload(path, task)
    saved_task = payload["task"]
    config = (payload.get("meta") or {}).get("config")
    model = get_task(saved_task).build_model(
        num_features=payload.get("num_features"),
        config=None if config is None else TrainConfig.from_dict(config),
        **(payload.get("model_kwargs") or {}),
    )
    try:
        model.load_state_dict(payload["state_dict"])
    except (RuntimeError, KeyError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise FlatnessError(f"{path} does not fit the {saved_task} model: {first}") from None
    model.eval()
    return model, dict(payload.get("meta") or {})


class StaleCheckpointError(FlatnessError):
    """A run's checkpoint file was written by another training of that run than its record."""


def check_checkpoint_matches(record: RunRecord, meta: dict[str, Any], path: Path) -> None:
    """``StaleCheckpointError`` unless the checkpoint at ``path`` is the one ``record`` wrote.

    Checkpoints carry their run's ``finished_at`` stamp (older ones: its final test accuracy),
    so results copied between directories cannot silently pair a record with the checkpoint of
    a different training of the same run.
    """
    same_run = meta.get("name", record.name) == record.name
    if "finished_at" in meta:
        same_run = same_run and meta["finished_at"] == record.finished_at
    else:
        same_run = same_run and meta.get("final_test_acc") == record.final_test_acc
    if not same_run:
        raise StaleCheckpointError(
            f"checkpoint {path} is not the one run {record.name} recorded "
            f"(finished {meta.get('finished_at', 'at an unknown time')}, record {record.finished_at}); "
            "re-run that run or remove the stale checkpoint"
        )


def initial_model(
    task: str,
    seed: int,
    *,
    num_features: int | None = None,
    model_kwargs: dict[str, Any] | None = None,
    config: dict[str, Any] | None = None,
) -> nn.Module:
    """The model a run of ``seed`` started from, rebuilt exactly (eval mode).

    The runner seeds torch's global generator with the run's seed right before
    ``task.build_model``; this replays that inside ``torch.random.fork_rng``, so the caller's
    random state is left as it was. ``config``: the run's training config (it names the
    architecture of tasks with several).
    """
    task_obj = get_task(task)
    train_config = None if config is None else TrainConfig.from_dict(config)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(seed))
        model = task_obj.build_model(num_features=num_features, config=train_config, **(model_kwargs or {}))
    return model.eval()


def checkpoint_initial_model(path: str | os.PathLike[str], task: str | None = None) -> nn.Module | None:
    """:func:`initial_model` of the run that wrote the checkpoint at ``path``.

    ``None`` when the checkpoint does not name its run's seed (not written by the runner).
    """
    payload = _read_payload(Path(path), task)
    seed = (payload.get("meta") or {}).get("seed")
    if not isinstance(seed, int):
        return None
    return initial_model(
        payload["task"], seed, num_features=payload.get("num_features"),
        model_kwargs=payload.get("model_kwargs") or {}, config=(payload.get("meta") or {}).get("config"),
    )
