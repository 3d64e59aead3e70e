"""The paper's three experiments as tasks: data, model, loss and default training protocol.

=====================  ==========================  ===========================  =================
task                   data                        model                        protocol
=====================  ==========================  ===========================  =================
``cifar100-mlp``       CIFAR-100, standardised     MLP 3072-512-256-100,        Adam lr 1e-3,
                       per channel                 ReLU, dropout 0.3,           2-ep warm-up +
                                                   initial weights at half      cosine, 10 ep,
                                                   PyTorch's default scale      B 128, wd 5e-4
``newsgroups-logreg``  20 Newsgroups TF-IDF        logistic regression          Adam lr 3e-3,
                       (sparse CSR)                (one sparse linear layer)    20 ep, B 32,
                                                                                wd 1e-4
``breast-cancer-mlp``  Breast Cancer Wisconsin,    MLP 30-512-256-1, BCE with   Adam lr 1e-3,
                       80/20 stratified split      logits                       50 ep, B 32,
                                                                                wd 1e-4
=====================  ==========================  ===========================  =================

Weight decay is Adam's L2 term (added to the gradient), as in the paper's "L2 weight decay".
Every task carves a fixed stratified validation split (10 %) from its training set; the split
does not depend on a run's seed.

Example:
    >>> import torch
    >>> from flatness.experiments.data import iterate_batches
    >>> from flatness.experiments.tasks import get_task
    >>> task = get_task("breast-cancer-mlp")
    >>> splits = task.load()
    >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
    <torch._C.Generator object at ...>
    >>> model = task.build_model()
    >>> x, y = next(iterate_batches(splits.x_train, splits.y_train, 32, shuffle=False))
    >>> task.loss_fn(model(x), y).shape, task.predict(model(x)).shape
    (torch.Size([]), torch.Size([32]))
"""

from __future__ import annotations

import dataclasses
import typing
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import Tensor, nn

from .data import (
    Splits,
    data_dir,
    load_breast_cancer,
    load_cifar100,
    load_newsgroups,
    split_validation,
)
from ..utils import FlatnessError
from .models import logistic_regression, mlp

__all__ = [
    "SCHEDULES",
    "TrainConfig",
    "Task",
    "TASKS",
    "get_task",
]

SCHEDULES: tuple[str, ...] = ("constant", "cosine", "linear")
VALIDATION_SPLIT_SEED = 0


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

    # Fields added after the first protocols: left out of :meth:`as_dict` while at their
    # default, so the names and records of existing runs stay valid.
    LATER_FIELDS: typing.ClassVar[tuple[str, ...]] = ("train_eval_samples",)

    def __post_init__(self) -> None:
        checks = [
            (isinstance(self.epochs, int) and self.epochs >= 1, "epochs must be an integer >= 1"),
            (
                isinstance(self.batch_size, int) and self.batch_size >= 1,
                "batch_size must be an integer >= 1",
            ),
            (self.lr > 0, "lr must be > 0"),
            (self.weight_decay >= 0, "weight_decay must be >= 0"),
            (0 <= self.val_fraction < 1, "val_fraction must be in [0, 1)"),
            (self.schedule in SCHEDULES, f"schedule must be one of {SCHEDULES}"),
            (0 <= self.warmup_epochs <= self.epochs, "warmup_epochs must be in [0, epochs]"),
            (0 <= self.final_lr_fraction <= 1, "final_lr_fraction must be in [0, 1]"),
            (self.eval_batch_size >= 1, "eval_batch_size must be >= 1"),
            (
                self.train_eval_samples is None
                or (isinstance(self.train_eval_samples, int) and self.train_eval_samples >= 1),
                "train_eval_samples must be None or an integer >= 1",
            ),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(f"{message} (got {self.as_dict()})")

    def as_dict(self) -> dict[str, Any]:
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
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown training-config field(s) {unknown}; known: {sorted(known)}")
        return cls(**values)


class Task:
    """One experiment of the paper: ``load`` data, ``build_model``, ``loss_fn``, ``predict``.

    ``load`` caches its result per (data directory, validation fraction) in the process, so the
    runs of a sweep in one worker process read and preprocess the data once.
    """

    name: str = ""
    description: str = ""
    paper_table: str = ""
    # Bumped whenever the task's data preparation, model or default protocol changes: run
    # records of another version are then not taken as finished runs of this one.
    version: int = 1
    config: TrainConfig
    num_classes: int = 0
    num_features: int | None = None  # input width; data-dependent tasks set it in ``load``
    # The model settings ``build_model`` accepts (e.g. hidden widths, dropout) and their defaults;
    # a run's non-default ones are part of its identity (RunSpec.model_kwargs).
    model_defaults: dict[str, Any] = {}

    def __init__(self) -> None:
        self._cache: dict[tuple[str, float], Splits] = {}

    def _load_raw(self, root: Path, download: bool | None) -> Splits:
        raise NotImplementedError

    def _cache_key(self, root: Path, val_fraction: float) -> tuple[str, float]:
        return (str(root.resolve()), val_fraction)

    def load(
        self,
        data_dir_: str | Path | None = None,
        *,
        val_fraction: float | None = None,
        download: bool | None = None,
    ) -> Splits:
        """Train/validation/test splits; ``FlatnessError`` says what is missing or damaged."""
        root = data_dir(data_dir_)
        fraction = self.config.val_fraction if val_fraction is None else float(val_fraction)
        key = self._cache_key(root, fraction)
        if key not in self._cache:
            raw = self._load_raw(root, download)
            self.num_features = raw.num_features
            self._cache[key] = split_validation(raw, fraction, seed=VALIDATION_SPLIT_SEED)
        return self._cache[key]

    def clear_cache(self) -> None:
        self._cache.clear()

    def build_model(self, num_features: int | None = None, **settings: Any) -> nn.Module:
        """A freshly initialised model (seed torch's global RNG before calling).

        ``settings`` override :attr:`model_defaults` (see :meth:`model_settings`).
        """
        raise NotImplementedError

    def model_settings(self, overrides: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """:attr:`model_defaults` with ``overrides``; an unknown name is a ``FlatnessError``."""
        unknown = sorted(set(overrides or {}) - set(self.model_defaults))
        if unknown:
            known = ", ".join(sorted(self.model_defaults)) or "none"
            raise FlatnessError(f"task {self.name} has no model setting(s) {unknown}; known: {known}")
        return {**self.model_defaults, **(overrides or {})}

    def _features(self, num_features: int | None) -> int:
        width = num_features if num_features is not None else self.num_features
        if width is None:
            raise FlatnessError(f"task {self.name}: call load() first (the input width is data-dependent)")
        return int(width)

    def loss_fn(self, logits: Tensor, y: Tensor) -> Tensor:
        """Batch-mean cross-entropy over ``num_classes`` logits."""
        return nn.functional.cross_entropy(logits, y)

    def predict(self, logits: Tensor) -> Tensor:
        """Predicted class ids (int64)."""
        return logits.argmax(dim=-1)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, config={self.config})"


class Cifar100MLP(Task):
    name = "cifar100-mlp"
    description = "CIFAR-100, MLP 3072-512-256-100 (ReLU, dropout 0.3, initial weights ×0.5)"
    paper_table = "Table 1"
    num_classes = 100
    num_features = 3072
    version = 3
    # Adam at the paper's lr 0.01 kills this MLP within its first ten steps (the first Adam
    # steps move every weight by ~lr; the second hidden layer dies and the loss stays at
    # ln 100), with or without warm-up, decoupled decay or another initialisation; 3e-3 and 2e-3
    # are unstable too. Tuned on the validation split: peak lr 1e-3 reached by a linear warm-up
    # over 2 epochs, then cosine decay to 0 (seed 0); then, over seeds 0-2, the initial weights
    # at half PyTorch's default scale (validation accuracy 0.2631 against 0.2627 at full scale, a
    # tie within seed noise). On seeds 0-1, half scale scored 0.2640, ahead of a zero output
    # layer (0.2615), a quarter scale (0.2608) and Adam beta2 = 0.99 (0.2574). Earlier, at
    # seed 0 without warm-up, LeCun-normal (Flax's default) scored 0.011 below PyTorch's default.
    weight_scale = 0.5
    model_defaults = {"hidden": [512, 256], "dropout": 0.3}
    config = TrainConfig(
        epochs=10,
        batch_size=128,
        lr=1e-3,
        weight_decay=5e-4,
        schedule="cosine",
        warmup_epochs=2.0,
        # the per-epoch eval-mode pass over all 45,000 training images costs about as much as
        # an epoch of training; the first 10,000 (a fixed subset) estimate train loss/acc well
        train_eval_samples=10_000,
    )

    def _load_raw(self, root: Path, download: bool | None) -> Splits:
        return load_cifar100(root, download)

    def build_model(self, num_features: int | None = None, **settings: Any) -> nn.Module:
        s = self.model_settings(settings)
        return mlp(
            self._features(num_features), 100, tuple(s["hidden"]), dropout=s["dropout"],
            weight_scale=self.weight_scale,
        )


class NewsgroupsLogReg(Task):
    name = "newsgroups-logreg"
    description = "20 Newsgroups (bydate) TF-IDF, logistic regression (sparse inputs)"
    paper_table = "Table 2"
    num_classes = 20
    num_features = None  # the TF-IDF vocabulary size, known after load()
    config = TrainConfig(epochs=20, batch_size=32, lr=3e-3, weight_decay=1e-4)

    def _load_raw(self, root: Path, download: bool | None) -> Splits:
        return load_newsgroups(root, download)

    def build_model(self, num_features: int | None = None, **settings: Any) -> nn.Module:
        self.model_settings(settings)
        return logistic_regression(self._features(num_features), 20)


class BreastCancerMLP(Task):
    name = "breast-cancer-mlp"
    description = "Breast Cancer Wisconsin, MLP 30-512-256-1 (ReLU, dropout 0.3), BCE"
    paper_table = "Table 3"
    num_classes = 2
    num_features = 30
    config = TrainConfig(epochs=50, batch_size=32, lr=1e-3, weight_decay=1e-4)
    model_defaults = {"hidden": [512, 256], "dropout": 0.3}

    def _cache_key(self, root: Path, val_fraction: float) -> tuple[str, float]:
        return ("bundled", val_fraction)  # ships with scikit-learn: no data directory involved

    def _load_raw(self, root: Path, download: bool | None) -> Splits:
        return load_breast_cancer()

    def build_model(self, num_features: int | None = None, **settings: Any) -> nn.Module:
        s = self.model_settings(settings)
        return mlp(self._features(num_features), 1, tuple(s["hidden"]), dropout=s["dropout"])

    def loss_fn(self, logits: Tensor, y: Tensor) -> Tensor:
        """Batch-mean BCE-with-logits on the single logit; ``y`` is float {0, 1}."""
        return nn.functional.binary_cross_entropy_with_logits(logits.squeeze(-1), y.to(logits.dtype))

    def predict(self, logits: Tensor) -> Tensor:
        return (logits.squeeze(-1) > 0).long()


TASKS: dict[str, Task] = {t.name: t for t in (Cifar100MLP(), NewsgroupsLogReg(), BreastCancerMLP())}


def get_task(name: str) -> Task:
    """The task called ``name``; ``FlatnessError`` listing the valid names otherwise."""
    if name not in TASKS:
        raise FlatnessError(f"unknown task {name!r}; expected one of: {', '.join(TASKS)}")
    return TASKS[name]
