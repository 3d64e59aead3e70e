"""Checkpoints of run models: the weights with their task and run metadata, written atomically.

A checkpoint carries its run's ``finished_at`` stamp, so a record is never paired with the
checkpoint of another training of the same run (:func:`check_checkpoint_matches`).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..utils import FlatnessError, atomic_write_bytes
from .tasks import TrainConfig, get_task

__all__ = [
    "CHECKPOINT_FORMAT",
    "save_checkpoint",
    "load_checkpoint",
    "StaleCheckpointError",
    "check_checkpoint_matches",
]

CHECKPOINT_FORMAT = "flatness-checkpoint"


def _input_width(model: nn.Module) -> int | None:
    for module in model.modules():
        width = getattr(module, "in_features", None)
        if isinstance(width, int):
            return width
    return None


def save_checkpoint(
    path: str | os.PathLike[str], model: nn.Module, *, task: str, meta: dict[str, Any]
) -> None:
    """Write the model's weights with its task name and ``meta`` (plain JSON-like data), atomically."""
    get_task(task)
    payload = {
        "format": CHECKPOINT_FORMAT,
        "version": 1,
        "task": task,
        "num_features": _input_width(model),
        "state_dict": {k: v.detach().cpu().clone() for k, v in model.state_dict().items()},
        "meta": meta,
    }
    atomic_write_bytes(path, lambda fh: torch.save(payload, fh))


def load_checkpoint(
    path: str | os.PathLike[str], task: str | None = None
) -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild the task's model from a checkpoint; returns ``(model, meta)``, model in eval mode.

    ``FlatnessError`` if the file is missing, is not a flatness checkpoint, belongs to another
    task than ``task``, or its weights do not fit the task's model.
    """
    path = Path(path)
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
    task_obj = get_task(str(saved_task))
    config = (payload.get("meta") or {}).get("config")
    model = task_obj.build_model(
        num_features=payload.get("num_features"),
        config=None if config is None else TrainConfig.from_dict(config),
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
