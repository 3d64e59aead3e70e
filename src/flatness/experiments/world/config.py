"""A training protocol as plain data: :class:`TrainConfig`.

Epochs, batch size, optimiser, schedule, evaluation subsets, stopping rule, checked when built:
this is the one place that checks them, whoever sets them (a task, ``flatness run --lr``, a
study); a :class:`ProtocolError` names the field, which a front end spells as its flag.

Example:
    >>> from flatness.experiments.world.config import TrainConfig
    >>> config = TrainConfig(epochs=2, batch_size=32, lr=1e-3, weight_decay=0.0)
    >>> config.as_dict()  # doctest: +NORMALIZE_WHITESPACE
    {'epochs': 2, 'batch_size': 32, 'lr': 0.001, 'weight_decay': 0.0, 'val_fraction': 0.1,
     'schedule': 'constant', 'warmup_epochs': 0.0, 'final_lr_fraction': 0.0, 'eval_batch_size': 1024}
    >>> config.replace(train_subset=100).subsets()
    (100, 0, 0)
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import typing
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from .errors import SettingError

__all__ = ["SCHEDULES", "OPTIMIZERS", "ProtocolError", "TrainConfig"]

SCHEDULES: tuple[str, ...] = ("constant", "cosine", "linear")
OPTIMIZERS: tuple[str, ...] = ("adam", "adamw", "sgd")
MAX_COUNT = 2**63 - 1  # counts reach torch (batch splits, sizes) as 64-bit integers


def _is_count(value: Any, minimum: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and minimum <= value <= MAX_COUNT


def _is_finite(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)


class ProtocolError(SettingError, ValueError):
    """A field of a :class:`TrainConfig` out of its range: a :class:`SettingError` naming it, and a ``ValueError``."""


@dataclass(frozen=True)
class TrainConfig:
    """A training protocol; plain data, serialisable with :meth:`as_dict`.

    Args:
        epochs: passes over the training split.
        batch_size: mini-batch size B (also the B of Tr(H²)/B).
        lr: Adam's (peak) learning rate.
        weight_decay: Adam's L2 coefficient.
        val_fraction: share of the training set held out for validation (fixed split).
        schedule: ``"constant"``, ``"cosine"`` or ``"linear"`` decay, per step, from ``lr`` to
            ``final_lr_fraction * lr`` at the end of training.
        warmup_epochs: linear warm-up from ``lr / 10`` to ``lr`` over this many epochs first.
        final_lr_fraction: end point of a decaying schedule, as a fraction of ``lr``.
        eval_batch_size: batch size of evaluation passes (speed only, no effect on results).
        train_eval_samples: the per-epoch eval-mode pass over the training set uses its first
            this many samples (a fixed subset; ``None`` = all). Evaluation only: training is
            the same whatever its value.
        optimizer: ``"adam"`` (L2 weight decay added to the gradient, the paper's), ``"adamw"``
            (decoupled weight decay) or ``"sgd"`` (with ``momentum``, optionally Nesterov; L2
            weight decay).
        momentum: SGD's momentum (ignored by Adam/AdamW).
        nesterov: SGD with Nesterov momentum.
        model: the architecture (:data:`flatness.experiments.world.architectures.ARCHITECTURES`) for
            tasks that offer several; ``""`` for the task's only model.
        augment: apply the task's training augmentation
            (:meth:`~flatness.experiments.world.tasks.Task.augment`) per mini-batch.
        train_subset, val_subset, test_subset: train / validate / test on a fixed stratified
            subset of that many samples of the split (0: the whole split); the subsets do not
            depend on a run's seed.
        stop_train_loss, stop_train_acc: a stopping rule (Jiang et al. 2019): end training after
            the first epoch whose eval-mode training loss is ≤ ``stop_train_loss`` or accuracy
            ≥ ``stop_train_acc`` (on the ``train_eval_samples``); ``epochs`` is then the cap.
    """

    epochs: int
    batch_size: int
    lr: float
    weight_decay: float
    val_fraction: float = 0.1
    schedule: str = "constant"
    warmup_epochs: float = 0.0
    final_lr_fraction: float = 0.0
    eval_batch_size: int = 1024
    train_eval_samples: int | None = None
    optimizer: str = "adam"
    momentum: float = 0.9
    nesterov: bool = False
    model: str = ""
    augment: bool = False
    train_subset: int = 0
    val_subset: int = 0
    test_subset: int = 0
    stop_train_loss: float | None = None
    stop_train_acc: float | None = None

    # Fields added after the first protocols: left out of :meth:`as_dict` while at their
    # default, so the names and records of existing runs stay valid.
    LATER_FIELDS: typing.ClassVar[tuple[str, ...]] = (
        "train_eval_samples", "optimizer", "momentum", "nesterov", "model", "augment",
        "train_subset", "val_subset", "test_subset", "stop_train_loss", "stop_train_acc",
    )

    def __post_init__(self) -> None:
        for ok, message, *fields in self._checks():
            if not ok:
                raise ProtocolError(message, *fields)

    def _checks(self) -> Iterator[tuple[Any, ...]]:
        """``(ok, message, *fields)`` per rule, in field order (lazily: a rule may assume the ones before)."""
        count = "an integer from 1 to 2**63 - 1"
        yield _is_count(self.epochs, 1), f"`epochs` must be {count}, got {self.epochs!r}", "epochs"
        yield _is_count(self.batch_size, 1), f"`batch_size` must be {count}, got {self.batch_size!r}", "batch_size"
        yield _is_finite(self.lr) and self.lr > 0, f"`lr` must be finite and > 0, got {self.lr!r}", "lr"
        yield self.weight_decay >= 0, f"`weight_decay` must be >= 0, got {self.weight_decay!r}", "weight_decay"
        yield 0 <= self.val_fraction < 1, f"`val_fraction` must be in [0, 1), got {self.val_fraction!r}", "val_fraction"
        yield self.schedule in SCHEDULES, f"`schedule` must be one of {SCHEDULES}, got {self.schedule!r}", "schedule"
        yield (
            _is_finite(self.warmup_epochs) and 0 <= self.warmup_epochs <= self.epochs,
            f"`warmup_epochs` must be finite and in [0, {self.epochs}] (at most `epochs`), got {self.warmup_epochs!r}",
            "warmup_epochs", "epochs",
        )
        yield (0 <= self.final_lr_fraction <= 1,
               f"`final_lr_fraction` must be in [0, 1], got {self.final_lr_fraction!r}", "final_lr_fraction")
        yield (_is_count(self.eval_batch_size, 1),
               f"`eval_batch_size` must be {count}, got {self.eval_batch_size!r}", "eval_batch_size")
        yield (
            self.train_eval_samples is None or _is_count(self.train_eval_samples, 1),
            f"`train_eval_samples` must be {count} (None: all samples), got {self.train_eval_samples!r}",
            "train_eval_samples",
        )
        yield (self.optimizer in OPTIMIZERS,
               f"`optimizer` must be one of {OPTIMIZERS}, got {self.optimizer!r}", "optimizer")
        yield 0 <= self.momentum < 1, f"`momentum` must be in [0, 1), got {self.momentum!r}", "momentum"
        yield (
            not self.nesterov or (self.optimizer == "sgd" and self.momentum > 0),
            f"`nesterov` needs `optimizer` 'sgd' with `momentum` > 0, got {self.optimizer!r} with {self.momentum!r}",
            "nesterov", "optimizer", "momentum",
        )
        yield isinstance(self.model, str), f"`model` must be an architecture name or '', got {self.model!r}", "model"
        yield (
            all(_is_count(n, 0) for n in self.subsets()),
            "`train_subset`, `val_subset` and `test_subset` must be integers from 0 (all) to 2**63 - 1, "
            f"got {self.subsets()}",
            "train_subset", "val_subset", "test_subset",
        )
        yield (self.stop_train_loss is None or self.stop_train_loss > 0,
               f"`stop_train_loss` must be > 0, got {self.stop_train_loss!r}", "stop_train_loss")
        yield (self.stop_train_acc is None or 0 < self.stop_train_acc <= 1,
               f"`stop_train_acc` must be in (0, 1], got {self.stop_train_acc!r}", "stop_train_acc")

    def subsets(self) -> tuple[int, int, int]:
        """``(train_subset, val_subset, test_subset)``; all 0: the whole splits."""
        return (self.train_subset, self.val_subset, self.test_subset)

    def reached_stop(self, train_loss: float | None, train_acc: float | None) -> bool | None:
        """Whether the stopping rule is met by these training values (``None``: no rule)."""
        if self.stop_train_loss is None and self.stop_train_acc is None:
            return None
        return bool((self.stop_train_loss is not None and train_loss is not None and train_loss <= self.stop_train_loss)
                    or (self.stop_train_acc is not None and train_acc is not None and train_acc >= self.stop_train_acc))

    def as_dict(self) -> dict[str, Any]:
        """The fields as plain data; the later fields are left out while at their defaults.

        So configs (and the names and identities of runs) from before those fields existed
        stay the same.
        """
        out = dataclasses.asdict(self)
        for f in dataclasses.fields(self):
            if f.name in self.LATER_FIELDS and out[f.name] == f.default:
                del out[f.name]
        return out

    def replace(self, **overrides: Any) -> "TrainConfig":
        """A copy with ``overrides`` (unknown field names raise ``ValueError``)."""
        fields = {f.name: f.type for f in dataclasses.fields(self)}
        unknown = sorted(set(overrides) - set(fields))
        if unknown:
            raise ValueError(f"unknown training-config field(s) {unknown}; known: {sorted(fields)}")
        return dataclasses.replace(self, **overrides)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "TrainConfig":
        """The config of :meth:`as_dict`'s data; ``ValueError`` naming unknown fields."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown training-config field(s) {unknown}; known: {sorted(known)}")
        return cls(**values)
