r"""Hugging Face ``transformers``: a Trainer with the FA penalty, and a curvature callback.

Needs ``pip install 'flatness[hf]'`` (transformers, and accelerate, which ``Trainer`` needs).

:class:`FlatnessTrainer` is a ``transformers.Trainer`` whose ``compute_loss`` adds
λ·Tr(H²)/B (:class:`flatness.FlatnessPenalty`) to the model's loss on every training batch; its
own keywords are the penalty's (``lam``, ``probes``, ``every`` and any other keyword of
:class:`~flatness.FlatnessPenalty`), the rest are the Trainer's::

    trainer = FlatnessTrainer(model=model, args=args, train_dataset=train,
                              lam=0.01, probes=2, every=10, seed=0)
    trainer.train()

Batches are the Trainer's dicts; the loss is the model's own, ``model(**batch).loss``
(:func:`flatness.batch_loss.hf_loss`, or ``loss=ModelLoss(...)``), and B is the leading dimension
of the batch's first tensor (``input_ids``). The penalty is added in training only (not in
``evaluate``/``predict``, which run without gradients), and counts its ``every`` in calls of
``compute_loss``: with gradient accumulation, in micro-batches. The penalty's value and Tr(H²)
go into the Trainer's logs as ``flatness_penalty`` and ``flatness_sq_trace``.

**Attention kernels.** The penalty differentiates the loss three times. Fused attention kernels
(flash, memory-efficient, and PyTorch's CPU flash kernel, which ``attn_implementation="sdpa"``
— transformers' default — dispatches to) have no double backward; the curvature pass selects
PyTorch's math kernel for ``scaled_dot_product_attention`` (:func:`flatness.passes.curvature_pass`),
so BERT with ``"sdpa"`` works as it is, as does ``"eager"`` (tested: ``tests/test_integrations_hf.py``).
Kernels outside PyTorch's SDPA (``"flash_attention_2"``, custom kernels) cannot be switched
and fail in the penalty's backward: load such a model with ``attn_implementation="sdpa"`` or
``"eager"``, or use ``backend="finite-difference"`` (first-order: no double backward).

:class:`CurvatureCallback` (a ``TrainerCallback``) measures λ_max, Tr(H), Tr(H²)/B every N
optimizer steps on a fixed batch (the first training batch unless ``batch=``), by
:class:`flatness.CurvatureMonitor`. Under a :class:`FlatnessTrainer` (or given ``trainer=``) it
reports through ``trainer.log``, so every ``report_to`` integration (TensorBoard, W&B, ...) gets
``curvature/...``; it always appends its record to ``state.log_history`` and, given ``path=``
or ``writer=``, to a CSV file or a ``SummaryWriter``.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from typing import Any

import torch
import transformers
from torch import nn

from ..batch_loss import ModelLoss, hf_loss
from ..measures.summary import MeasureOptions
from ..monitor import CurvatureMonitor, detached_copy, preserved_random_states
from ..passes import Function
from ..penalties import FlatnessPenalty
from ..utils import FlatnessError, to_device, unwrap

__all__ = ["FlatnessTrainer", "CurvatureCallback"]

_TRAINER_KEYWORDS = frozenset(inspect.signature(transformers.Trainer.__init__).parameters) - {"self"}
_PENALTY_KEYWORDS = frozenset(inspect.signature(FlatnessPenalty.__init__).parameters) - {"self", "model", "loss_fn"}


class FlatnessTrainer(transformers.Trainer):
    """``transformers.Trainer`` + λ·Tr(H²)/B on each training batch (module docs).

    Args:
        lam, probes, every: the penalty's λ, M and k (:class:`flatness.FlatnessPenalty`).
        loss: the loss the penalty differentiates, a :class:`flatness.ModelLoss` (default
            ``model(**batch).loss``).
        **kwargs: ``transformers.Trainer``'s arguments, and any other keyword of
            :class:`~flatness.FlatnessPenalty` (``seed``, ``dist``, ``sub_batch``, ``backend``, ...).
    """

    def __init__(self, *args: Any, lam: float = 0.01, probes: int = 5, every: int = 1,
                 loss: ModelLoss | None = None, **kwargs: Any) -> None:
        unknown = sorted(set(kwargs) - _TRAINER_KEYWORDS - _PENALTY_KEYWORDS)
        if unknown:
            raise TypeError(
                f"FlatnessTrainer got unknown keyword(s) {unknown}: neither Trainer's nor FlatnessPenalty's"
            )
        penalty_kwargs = {k: kwargs.pop(k) for k in list(kwargs) if k in _PENALTY_KEYWORDS}
        if loss is not None and not isinstance(loss, ModelLoss):
            raise TypeError(f"loss must be a flatness.ModelLoss, got {type(loss).__name__}")
        # validate now (one clear error), build on the model the Trainer trains
        FlatnessPenalty(nn.Linear(1, 1), hf_loss, lam=lam, probes=probes, every=every, **penalty_kwargs)
        self.penalty_kwargs = {"lam": lam, "probes": probes, "every": every, **penalty_kwargs}
        self.flatness_loss = loss if loss is not None else ModelLoss(hf_loss)
        self.penalty: FlatnessPenalty | None = None
        self._penalised: nn.Module | None = None
        super().__init__(*args, **kwargs)
        for callback in self.callback_handler.callbacks:
            if isinstance(callback, CurvatureCallback) and callback.trainer is None:
                callback.trainer = self

    def _penalty_for(self, model: nn.Module) -> FlatnessPenalty:
        local = unwrap(model)
        if self.penalty is None or self._penalised is not local:
            self.penalty = FlatnessPenalty(local, self.flatness_loss, **self.penalty_kwargs)
            self._penalised = local
        return self.penalty

    def compute_loss(self, model: nn.Module, inputs: dict[str, Any], return_outputs: bool = False,
                     num_items_in_batch: Any = None) -> Any:
        """The Trainer's loss, plus the flatness penalty on training steps (grad enabled, λ ≠ 0)."""
        result = super().compute_loss(
            model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch
        )
        if not (model.training and torch.is_grad_enabled()) or self.penalty_kwargs["lam"] == 0:
            return result
        loss, outputs = result if return_outputs else (result, None)
        loss = loss + self._penalty_for(model)(inputs)
        return (loss, outputs) if return_outputs else loss

    def log(self, logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
        """The Trainer's log, with the last penalty and its Tr(H²) estimate beside the loss."""
        if self.penalty is not None and self.penalty.last_penalty is not None and "loss" in logs:
            logs = {**logs, "flatness_penalty": self.penalty.last_penalty,
                    "flatness_sq_trace": self.penalty.last_sq_trace}
        super().log(logs, *args, **kwargs)


class CurvatureCallback(transformers.TrainerCallback):
    """Curvature measures every ``every`` optimizer steps on a fixed batch (module docs).

    Args:
        every: measure when ``state.global_step`` is N, 2N, ... (after that many updates).
        measures: measure names, as for :class:`flatness.CurvatureMonitor`.
        batch: the batch to measure on (default: the first batch of the training loader).
        loss: a :class:`flatness.ModelLoss` (default ``model(**batch).loss``).
        trainer: the Trainer to report through (set by :class:`FlatnessTrainer`).
        path, writer, function, options: as for :class:`flatness.CurvatureMonitor`
            (by default no CSV file: the Trainer's logs hold the values).
        prefix: the logged names' prefix.
    """

    def __init__(
        self,
        every: int = 100,
        measures: Sequence[str] = ("lambda_max", "trace", "sq_trace"),
        batch: Any = None,
        loss: ModelLoss | None = None,
        *,
        trainer: transformers.Trainer | None = None,
        path: Any = None,
        writer: Any = None,
        function: Function = "deployed",
        options: MeasureOptions | None = None,
        prefix: str = "curvature/",
    ) -> None:
        if isinstance(every, bool) or not isinstance(every, int) or every < 1:
            raise FlatnessError(f"every must be an integer >= 1, got {every!r}")
        self.every = every
        self.measures = tuple(measures)
        self.batch = None if batch is None else detached_copy(batch)
        self.loss = loss if loss is not None else ModelLoss(hf_loss)
        self.trainer = trainer
        self.path, self.writer, self.function, self.options = path, writer, function, options
        self.prefix = prefix
        self.monitor: CurvatureMonitor | None = None
        self.last: dict[str, Any] | None = None

    def _first_batch(self, loader: Any, device: torch.device) -> Any:
        if loader is None:
            raise FlatnessError("CurvatureCallback: no batch= given and the Trainer passed no training loader")
        with preserved_random_states():  # a new iterator draws its shuffling seed
            batch = next(iter(loader))
        return to_device(detached_copy(batch), device)

    def on_step_end(self, args: Any, state: Any, control: Any, model: nn.Module | None = None,
                    train_dataloader: Any = None, **kwargs: Any) -> Any:
        """Measure the curvature every ``every`` steps and log it."""
        step = state.global_step
        if model is None or step % self.every:
            return control
        if self.monitor is None:
            device = next(model.parameters()).device
            batch = self.batch if self.batch is not None else self._first_batch(train_dataloader, device)
            self.monitor = CurvatureMonitor(
                model, self.loss, batch, self.every, self.measures, path=self.path, writer=self.writer,
                function=self.function, options=self.options,
            )
        self.last = self.monitor.measure(step)
        values = {f"{self.prefix}{k}": v for k, v in self.monitor.scalars(self.last).items() if k != "step"}
        if self.trainer is not None:
            self.trainer.log(values)  # appends to state.log_history and reaches every report_to
        else:
            state.log_history.append({**values, "step": step})
        return control
