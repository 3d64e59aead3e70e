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
    >>> from flatness.tasks import get_task, iterate_batches
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
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from .data import (
    Splits,
    data_dir,
    load_breast_cancer,
    load_cifar100,
    load_newsgroups,
    select_rows,
    split_validation,
)
from .models import logistic_regression, mlp
from .utils import FlatnessError, atomic_write_bytes

__all__ = [
    "SCHEDULES",
    "TrainConfig",
    "Task",
    "TASKS",
    "get_task",
    "iterate_batches",
    "save_checkpoint",
    "load_checkpoint",
    "atomic_write_bytes",
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
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(f"{message} (got {self.as_dict()})")

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

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

    def build_model(self, num_features: int | None = None) -> nn.Module:
        """A freshly initialised model (seed torch's global RNG before calling)."""
        raise NotImplementedError

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
    config = TrainConfig(
        epochs=10,
        batch_size=128,
        lr=1e-3,
        weight_decay=5e-4,
        schedule="cosine",
        warmup_epochs=2.0,
    )

    def _load_raw(self, root: Path, download: bool | None) -> Splits:
        return load_cifar100(root, download)

    def build_model(self, num_features: int | None = None) -> nn.Module:
        return mlp(
            self._features(num_features), 100, (512, 256), dropout=0.3, weight_scale=self.weight_scale
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

    def build_model(self, num_features: int | None = None) -> nn.Module:
        return logistic_regression(self._features(num_features), 20)


class BreastCancerMLP(Task):
    name = "breast-cancer-mlp"
    description = "Breast Cancer Wisconsin, MLP 30-512-256-1 (ReLU, dropout 0.3), BCE"
    paper_table = "Table 3"
    num_classes = 2
    num_features = 30
    config = TrainConfig(epochs=50, batch_size=32, lr=1e-3, weight_decay=1e-4)

    def _cache_key(self, root: Path, val_fraction: float) -> tuple[str, float]:
        return ("bundled", val_fraction)  # ships with scikit-learn: no data directory involved

    def _load_raw(self, root: Path, download: bool | None) -> Splits:
        return load_breast_cancer()

    def build_model(self, num_features: int | None = None) -> nn.Module:
        return mlp(self._features(num_features), 1, (512, 256), dropout=0.3)

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


def iterate_batches(
    x: Tensor,
    y: Tensor,
    batch_size: int,
    *,
    shuffle: bool,
    generator: torch.Generator | None = None,
    drop_last: bool = False,
) -> Iterator[tuple[Tensor, Tensor]]:
    """Mini-batches ``(x[idx], y[idx])`` of a dense or sparse (CSR/COO) ``x``.

    With ``shuffle`` the order is a fresh permutation from ``generator`` (reproducible for a
    seeded generator); otherwise the data order. The last batch may be smaller unless
    ``drop_last``.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    n = int(y.shape[0])
    if int(x.shape[0]) != n:
        raise ValueError(f"x has {x.shape[0]} rows but y has {n}")
    order = torch.randperm(n, generator=generator) if shuffle else torch.arange(n)
    for idx in order.split(batch_size):
        if drop_last and len(idx) < batch_size:
            return
        if not shuffle and x.layout == torch.strided:
            start = int(idx[0])
            yield x[start : start + len(idx)], y[start : start + len(idx)]  # views, no copy
        else:
            yield select_rows(x, idx), y[idx]


# --------------------------------------------------------------------------------------------
# Checkpoints

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
    model = task_obj.build_model(num_features=payload.get("num_features"))
    try:
        model.load_state_dict(payload["state_dict"])
    except (RuntimeError, KeyError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise FlatnessError(f"{path} does not fit the {saved_task} model: {first}") from None
    model.eval()
    return model, dict(payload.get("meta") or {})
