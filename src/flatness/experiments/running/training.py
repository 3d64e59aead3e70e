"""One training loop for every method: mini-batches in, ``method.step`` per batch, curves out.

The loop knows nothing about any method: it shuffles the training split with a seeded
generator, calls :meth:`flatness.methods.Method.step` on each mini-batch, steps the learning-rate
schedule, averages whatever floats the steps return (``loss``, ``sq_trace``, ``penalty``, ...)
per epoch, and after each epoch evaluates the model in eval mode (dropout off) on the training
set (its first ``config.train_eval_samples`` samples, all by default), the validation and the
test split: loss and accuracy of each (:func:`evaluate_splits`). Evaluation draws no random
numbers, so it leaves training unchanged. Training time excludes evaluation and the
``on_epoch_end`` callback.

Learning-rate schedules (per optimisation step, :func:`make_scheduler`): an optional linear
warm-up from ``lr/10`` to ``lr`` over ``warmup_epochs``, then ``constant``, ``cosine`` or
``linear`` decay to ``final_lr_fraction * lr`` at the last step.

Example:
    >>> import torch
    >>> from flatness.methods import make_method
    >>> from flatness.experiments.world.tasks import get_task
    >>> from flatness.experiments.running.training import make_optimizer, train
    >>> task = get_task("breast-cancer-mlp")
    >>> data = task.load()
    >>> config = task.config.replace(epochs=2)
    >>> _ = torch.manual_seed(0)
    >>> model = task.build_model()
    >>> method = make_method("fa", model, task.loss_fn, lam=0.01, probes=2, every=10, seed=0)
    >>> history = train(model, method, make_optimizer(model, config), data, config,
    ...                 predict=task.predict, generator=torch.Generator().manual_seed(0))
    >>> len(history.epochs), history.epochs[-1]["test_acc"] > 0.8
    (2, True)
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from ...methods import Method
from ...utils import FlatnessError, call_model, eval_mode, preserved_mode, take_first
from ..world.data import Splits, iterate_batches
from ..world.tasks import TrainConfig
from .distributed import take_shard
from .progress import progress_bar
from .resume import EpochState, capture_random_streams, restore_random_streams

__all__ = [
    "TrainingDiverged",
    "History",
    "make_optimizer",
    "make_scheduler",
    "evaluate",
    "evaluate_splits",
    "steps_per_epoch",
    "train",
]

Predict = Callable[[Tensor], Tensor]
Score = Callable[[Tensor, Tensor], Tensor]
EpochCallback = Callable[[int, dict[str, Any]], "dict[str, Any] | None"]
StepCallback = Callable[[int, dict[str, float]], None]
Augment = Callable[[Tensor, "torch.Generator | None"], Tensor]


class TrainingDiverged(FlatnessError):
    """The training loss became NaN or infinite."""


@dataclass
class History:
    """Per-epoch records and totals of one training run (plain data)."""

    epochs: list[dict[str, Any]] = field(default_factory=list)
    steps: int = 0
    train_seconds: float = 0.0
    eval_seconds: float = 0.0
    # the epochs after which training was resumed from an epoch state (:mod:`.resume`)
    resumed_after_epochs: list[int] = field(default_factory=list)

    def curve(self, key: str) -> list[Any]:
        """The values of ``key`` over epochs (``None`` where an epoch lacks it)."""
        return [e.get(key) for e in self.epochs]

    def as_dict(self) -> dict[str, Any]:
        """The counts and times as plain JSON-ready data."""
        return {
            "epochs": self.epochs,
            "steps": self.steps,
            "train_seconds": self.train_seconds,
            "eval_seconds": self.eval_seconds,
        }


def make_optimizer(model: nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    """``config.optimizer`` with weight decay ``config.weight_decay`` (fused kernel where available).

    ``"adam"``: Adam with L2 decay added to the gradient (the paper's); ``"adamw"``: decoupled
    decay; ``"sgd"``: SGD with ``config.momentum`` (Nesterov if ``config.nesterov``), L2 decay.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    fused = all(p.dtype in (torch.float32, torch.float64, torch.float16, torch.bfloat16) for p in params)
    kwargs: dict[str, Any] = {"lr": config.lr, "weight_decay": config.weight_decay}
    if config.optimizer == "sgd":
        cls: type[torch.optim.Optimizer] = torch.optim.SGD
        kwargs.update(momentum=config.momentum, nesterov=config.nesterov)
    else:
        cls = torch.optim.AdamW if config.optimizer == "adamw" else torch.optim.Adam
    # The fused CPU/CUDA kernel computes the same update as the default one, several times faster
    # for large layers (2.6M weights: ~2 ms instead of ~25 ms per step on one CPU core).
    try:
        return cls(params, **kwargs, fused=fused)
    except (RuntimeError, TypeError):
        return cls(params, **kwargs)


def steps_per_epoch(num_samples: int, batch_size: int) -> int:
    """Mini-batches per epoch: ⌈num_samples / batch_size⌉, at least 1."""
    return max(1, math.ceil(num_samples / batch_size))


def lr_factor(step: int, total: int, warmup: int, schedule: str, final: float) -> float:
    """Learning-rate multiplier at optimisation step ``step`` (0-based) of ``total``."""
    if warmup > 0 and step < warmup:
        return 0.1 + 0.9 * step / warmup
    if schedule == "constant" or total <= warmup:
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    if schedule == "cosine":
        return final + (1.0 - final) * 0.5 * (1.0 + math.cos(math.pi * progress))
    if schedule == "linear":
        return final + (1.0 - final) * (1.0 - progress)
    raise ValueError(f"unknown schedule {schedule!r}")


def make_scheduler(
    optimizer: torch.optim.Optimizer, config: TrainConfig, steps_per_epoch: int
) -> torch.optim.lr_scheduler.LambdaLR | None:
    """The per-step schedule of ``config`` (``None`` for a constant rate without warm-up)."""
    if config.schedule == "constant" and config.warmup_epochs == 0:
        return None
    total = config.epochs * steps_per_epoch
    warmup = round(config.warmup_epochs * steps_per_epoch)
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda step: lr_factor(step, total, warmup, config.schedule, config.final_lr_fraction),
    )


@torch.no_grad()
def evaluate(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    predict: Predict,
    batch_size: int = 1024,
    loss_fn: Callable[[Tensor, Tensor], Tensor] | None = None,
    score: Score | None = None,
) -> dict[str, float]:
    """Accuracy (and mean loss if ``loss_fn``) of ``model`` in eval mode; modes restored after.

    ``score(logits, y)``: per-example scores averaged in place of the accuracy (a task's
    :meth:`~flatness.experiments.world.tasks.Task.score`, e.g. a regression task's).
    """
    correct: float = 0
    total, loss_sum = 0, 0.0
    with eval_mode(model):
        for xb, yb in iterate_batches(x, y, batch_size, shuffle=False):
            logits = call_model(model, xb)
            if score is None:
                correct += int((predict(logits) == yb.long()).sum())
            else:
                correct += float(score(logits, yb).sum())
            total += int(yb.shape[0])
            if loss_fn is not None:
                loss_sum += float(loss_fn(logits, yb)) * int(yb.shape[0])
    out = {"acc": correct / max(1, total)}
    if loss_fn is not None:
        out["loss"] = loss_sum / max(1, total)
    return out


def evaluate_splits(
    model: nn.Module,
    data: Splits,
    config: TrainConfig,
    predict: Predict,
    loss_fn: Callable[[Tensor, Tensor], Tensor] | None = None,
    score: Score | None = None,
    only: Sequence[str] = ("train", "val", "test"),
) -> dict[str, float]:
    """Eval-mode loss and accuracy (or ``score``, :func:`evaluate`).

    On the training, validation and test splits.

    Keys ``train_acc``, ``val_acc``, ``test_acc`` (and ``*_loss`` with ``loss_fn``); no ``val_*``
    without a validation split. The training set is its first ``config.train_eval_samples``
    samples (all if ``None``): the same fixed subset every epoch. ``only``: the splits to evaluate.
    """
    n_train = int(data.y_train.shape[0])
    cap = n_train if config.train_eval_samples is None else min(config.train_eval_samples, n_train)
    splits = [("train", take_first(data.x_train, cap), data.y_train[:cap])]
    if data.x_val is not None and data.y_val is not None:
        splits.append(("val", data.x_val, data.y_val))
    splits.append(("test", data.x_test, data.y_test))
    out: dict[str, float] = {}
    for name, x, y in (s for s in splits if s[0] in only):
        result = evaluate(model, x, y, predict, config.eval_batch_size, loss_fn, score)
        out.update({f"{name}_{key}": value for key, value in result.items()})
    return out


# Methods may return 0-d tensors (no host synchronisation per step): their losses are checked
# for divergence every _SYNC_EVERY steps and at the end of each epoch (one wait for the device).
_SYNC_EVERY = 50


def _check_losses(pending: list[tuple[int, Any]], epoch: int) -> None:
    """Raise :class:`TrainingDiverged` at the first pending step whose loss is missing or not finite.

    Empties ``pending``.
    """
    for step, loss in pending:  # after the first value, the device has nothing left to wait for
        value = None if loss is None else float(loss)
        if value is None or not math.isfinite(value):
            raise TrainingDiverged(f"training loss is {value} at epoch {epoch}, step {step}")
    pending.clear()


def train(
    model: nn.Module,
    method: Method,
    optimizer: torch.optim.Optimizer,
    data: Splits,
    config: TrainConfig,
    *,
    predict: Predict | None = None,
    scheduler: Any = "auto",
    generator: torch.Generator | None = None,
    evaluate_every_epoch: bool = True,
    progress: bool = False,
    description: str = "train",
    on_epoch_end: EpochCallback | None = None,
    on_step_end: StepCallback | None = None,
    shard: tuple[int, int] | None = None,
    min_batch: int = 1,
    augment: Augment | None = None,
    score: Score | None = None,
    epoch_state: EpochState | None = None,
) -> History:
    """Train ``model`` with ``method`` for ``config.epochs`` epochs; returns the :class:`History`.

    Args:
        model: the network ``method`` was built for; put in train mode while training, its
            previous per-module modes restored at the end (also on errors).
        method: any :class:`flatness.methods.Method`; called once per mini-batch.
        optimizer: passed to ``method.step``.
        data: training split (shuffled each epoch), optional validation split, test split.
        config: epochs, batch size, schedule, evaluation batch size.
        predict: logits -> class ids (default argmax).
        score: ``(logits, y)`` -> per-example scores, averaged in place of the accuracy
            (:func:`evaluate`; default: hits of ``predict``).
        scheduler: ``"auto"`` builds :func:`make_scheduler` from ``config``; ``None`` for none;
            or any object with ``step()``, called after every optimisation step.
        generator: the shuffling generator (seed it for reproducible runs).
        evaluate_every_epoch: evaluate (and call ``on_epoch_end``) after every epoch; else after
            the last one only (with a stopping rule: the training split every epoch, the rest
            after the epoch that meets the rule or the cap).
        progress: show progress over the epochs' steps (:func:`~.progress.progress_bar`:
            a bar on a terminal, periodic lines otherwise).
        description: the progress bar's label.
        on_epoch_end: ``f(epoch, record) -> dict | None`` after each evaluated epoch; a returned
            dict is merged into the epoch's record (e.g. a curvature measurement). Not counted
            as training time.
        on_step_end: ``f(global_step, info)`` after each optimisation step (e.g. snapshots).
        shard: ``(rank, world_size)`` under DDP: every rank draws the same global mini-batches
            and steps on its own contiguous shard (:func:`flatness.distributed.take_shard`).
        min_batch: skip global mini-batches with fewer samples (so that no rank's shard is
            empty; the runner sets it to the number of ranks).
        augment: ``f(x, generator) -> x`` applied to every global mini-batch before sharding,
            with the shuffling ``generator`` (e.g. :meth:`flatness.experiments.world.tasks.Task.augment`).
        epoch_state: where training saves its state after epochs and resumes from
            (:mod:`.resume`; one process, ``on_step_end`` keeping nothing the state misses);
            ``scheduler`` must then be ``None`` or have ``state_dict``.

    Each epoch's record holds ``epoch`` (1-based), ``seconds`` (training only), ``lr`` (at the
    epoch's end), the mean over steps of every float the method returned (``loss``, and e.g.
    ``sq_trace`` averaged over the steps that computed it, with ``<key>_steps`` counts), and
    when evaluated :func:`evaluate_splits`' ``train_loss`` / ``train_acc`` / ``val_loss`` /
    ``val_acc`` / ``test_loss`` / ``test_acc`` (losses if the method has a ``loss_fn``).

    With a stopping rule (``config.stop_train_loss`` / ``stop_train_acc``) training ends after
    the first epoch whose evaluation meets it (evaluate every epoch for the rule to act);
    ``config.epochs`` is then a cap.

    Raises:
        TrainingDiverged: the task loss became NaN or infinite.
    """
    predict = predict or (lambda logits: logits.argmax(dim=-1))
    per_epoch = steps_per_epoch(int(data.y_train.shape[0]), config.batch_size)
    if scheduler == "auto":
        scheduler = make_scheduler(optimizer, config, per_epoch)
    loss_fn = getattr(method, "loss_fn", None)
    history = History()
    stop_rule = config.reached_stop(None, None) is not None
    bar = progress_bar(config.epochs * per_epoch, description, "step", leave=False) if progress else None
    loop = _EpochLoop(method, optimizer, data, config, scheduler, generator, on_step_end, shard, min_batch,
                      augment, bar)
    resumable = _Resumable(model, method, optimizer, scheduler, generator, history, epoch_state)
    first = resumable.resume()
    if bar is not None and history.steps:
        bar.update(history.steps)
    try:
        with preserved_mode(model):
            for epoch in range(first, config.epochs + 1):
                model.train()
                start = time.perf_counter()
                sums, counts = loop.run(epoch, history)
                seconds = time.perf_counter() - start
                history.train_seconds += seconds
                record = _epoch_record(epoch, sums, counts, seconds, optimizer)
                start = time.perf_counter()
                last = epoch == config.epochs
                if stop_rule and not (evaluate_every_epoch or last):
                    # the rule's input every epoch; the other splits and the callback at the end
                    record.update(evaluate_splits(model, data, config, predict, loss_fn, score, ("train",)))
                    last = bool(config.reached_stop(record.get("train_loss"), record.get("train_acc")))
                if evaluate_every_epoch or last:
                    record.update(evaluate_splits(model, data, config, predict, loss_fn, score))
                    if on_epoch_end is not None:
                        record.update(on_epoch_end(epoch, record) or {})
                history.eval_seconds += time.perf_counter() - start
                history.epochs.append(record)
                if bar is not None:
                    acc = record.get("test_acc")
                    bar.set_postfix(epoch=epoch, test_acc=f"{acc:.4f}" if acc is not None else "-")
                stop = stop_rule and bool(config.reached_stop(record.get("train_loss"), record.get("train_acc")))
                resumable.save(epoch, done=stop or epoch == config.epochs)
                if stop:
                    break  # the stopping rule: the rest of the epochs are a cap, not a budget
    finally:
        if bar is not None:
            bar.close()
    return history


@dataclass
class _Resumable:
    """:func:`train`'s state after an epoch, saved to and restored from an :class:`~.resume.EpochState`."""

    model: nn.Module
    method: Method
    optimizer: torch.optim.Optimizer
    scheduler: Any
    generator: torch.Generator | None
    history: History
    epoch_state: EpochState | None

    def save(self, epoch: int, done: bool) -> None:
        """Save the state after ``epoch`` (``done``: training ends here; a resumed run goes straight on)."""
        if self.epoch_state is None or not self.epoch_state.due(done):
            return
        state = {
            "next_epoch": epoch + 1,
            "done": done,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": None if self.scheduler is None else self.scheduler.state_dict(),
            "method": self.method.state_dict(),
            "random": capture_random_streams(self.generator),
            "history": {**self.history.as_dict(), "resumed_after_epochs": self.history.resumed_after_epochs},
        }
        self.epoch_state.save(state, final=done)

    def resume(self) -> int:
        """Restore a saved state if there is one; the first epoch still to train (past the last when done)."""
        saved = None if self.epoch_state is None else self.epoch_state.load()
        if saved is None:
            return 1
        self.model.load_state_dict(saved["model"])
        self.optimizer.load_state_dict(saved["optimizer"])
        if self.scheduler is not None:
            self.scheduler.load_state_dict(saved["scheduler"])
        self.method.load_state_dict(saved["method"])
        restore_random_streams(saved["random"], self.generator)
        past = saved["history"]
        self.history.epochs, self.history.steps = past["epochs"], past["steps"]
        self.history.train_seconds, self.history.eval_seconds = past["train_seconds"], past["eval_seconds"]
        self.history.resumed_after_epochs = [*past["resumed_after_epochs"], saved["next_epoch"] - 1]
        return sys.maxsize if saved["done"] else int(saved["next_epoch"])


@dataclass
class _EpochLoop:
    """One epoch of :func:`train`'s optimisation steps (its arguments of the same names)."""

    method: Method
    optimizer: torch.optim.Optimizer
    data: Splits
    config: TrainConfig
    scheduler: Any
    generator: torch.Generator | None
    on_step_end: StepCallback | None
    shard: tuple[int, int] | None
    min_batch: int
    augment: Augment | None
    bar: Any

    def run(self, epoch: int, history: History) -> tuple[dict[str, float], dict[str, int]]:
        """Step through the epoch's shuffled mini-batches.

        The sums and counts of every value the steps returned (read from the device once, at the
        end).
        """
        sums: dict[str, Any] = {}
        counts: dict[str, int] = {}
        pending: list[tuple[int, Any]] = []
        batches = iterate_batches(
            self.data.x_train, self.data.y_train, self.config.batch_size, shuffle=True, generator=self.generator
        )
        for x, y in batches:
            if self.min_batch > 1 and int(y.shape[0]) < self.min_batch:
                continue  # identical on every rank: the global batch sizes agree
            if self.augment is not None:
                x = self.augment(x, self.generator)
            if self.shard is not None:
                x, y = take_shard(x, y, *self.shard)
            info = self.method.step(x, y, self.optimizer)
            pending.append((history.steps + 1, info.get("loss")))
            if len(pending) >= _SYNC_EVERY or not isinstance(pending[-1][1], Tensor):
                _check_losses(pending, epoch)
            if self.scheduler is not None:
                self.scheduler.step()
            history.steps += 1
            for key, value in info.items():
                value = value.detach() if isinstance(value, Tensor) else float(value)
                sums[key] = sums.get(key, 0.0) + value
                counts[key] = counts.get(key, 0) + 1
            if self.on_step_end is not None:
                self.on_step_end(history.steps, info)
            if self.bar is not None:
                self.bar.update(1)
        _check_losses(pending, epoch)
        return {key: float(total) for key, total in sums.items()}, counts  # one sync per epoch


def _epoch_record(
    epoch: int, sums: dict[str, float], counts: dict[str, int], seconds: float, optimizer: torch.optim.Optimizer
) -> dict[str, Any]:
    """An epoch's record before evaluation.

    Its number, steps, seconds, learning rate, and the mean over steps of every logged value (with
    ``<key>_steps`` where fewer steps logged it).
    """
    record: dict[str, Any] = {
        "epoch": epoch,
        "steps": counts.get("loss", 0),
        "seconds": seconds,
        "lr": float(optimizer.param_groups[0]["lr"]),
    }
    for key, total in sums.items():
        record[key] = total / counts[key]
        if counts[key] != counts.get("loss"):
            record[f"{key}_steps"] = counts[key]
    return record
