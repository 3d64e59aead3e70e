r"""PyTorch Lightning: a curvature callback, and how the penalty and SAM/GNP/NRS go into a module.

Needs ``pip install 'flatness[lightning]'`` (the ``lightning`` package; import from
``lightning.pytorch``, not the older standalone ``pytorch_lightning``).

**Watching curvature.** :class:`CurvatureCallback` measures λ_max, Tr(H) and Tr(H²)/B (any
measure of :data:`flatness.measures.MEASURES`, by :class:`flatness.CurvatureMonitor`) every N
optimizer steps on one fixed batch — the first training batch it sees, or ``batch=`` — and
hands them to every logger of the trainer (TensorBoard, CSV, W&B, ...) as
``curvature/lambda_max``, ``curvature/hessian_trace``, ... at the trainer's global step, and to
``pl_module.log`` (``logger=False``), so that ``callback_metrics``, ``EarlyStopping`` and
``ModelCheckpoint`` can use them. The
measurement leaves the module, its BatchNorm statistics and the random streams as they were.

**The FA penalty** under automatic optimization — add it to the loss ``training_step`` returns::

    def __init__(self):
        ...
        self.penalty = FlatnessPenalty(self.net, F.cross_entropy, lam=0.01, probes=5, every=10)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.cross_entropy(self.net(x), y)
        return loss + self.penalty(x, y)

**SAM, GNP, NRS** under manual optimization (``self.automatic_optimization = False``) with
the optimizer wrappers :class:`flatness.methods.sam.SAM`, :class:`flatness.methods.gnp.GNP`
(the same protocol) and :class:`flatness.methods.nrs.NRS`, built with ``model=self`` so that
BatchNorm's running statistics are updated **once per step**, by the pass at θ (the passes at
the perturbed points normalise with their batch's statistics and update nothing)::

    def configure_optimizers(self):
        return SAM(self.parameters(), torch.optim.SGD, rho=0.05, model=self, lr=0.1)

    def training_step(self, batch, batch_idx):           # SAM and GNP
        x, y = batch
        opt = self.optimizers()

        def closure():
            loss = F.cross_entropy(self(x), y)
            self.manual_backward(loss)
            return loss

        opt.zero_grad()
        loss = closure()          # at θ: the gradient the wrapper perturbs along
        opt.step(closure=closure) # at the perturbed point; θ restored; the base step
        self.log("train_loss", loss)

    def training_step(self, batch, batch_idx):           # NRS: the wrapper runs every pass
        x, y = batch

        def closure():
            out = self(x)
            return F.cross_entropy(out, y), out         # no backward here

        loss = self.optimizers().step(closure=closure, backward=self.manual_backward)
        self.log("train_loss", loss)

Runnable versions: ``examples/lightning_penalty.py`` and ``examples/lightning_sam.py``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import lightning.pytorch as pl

from ..measures.summary import MeasureOptions
from ..monitor import CurvatureMonitor, detached_copy
from ..passes import Function
from ..utils import FlatnessError

__all__ = ["CurvatureCallback"]


class CurvatureCallback(pl.Callback):
    """Curvature measures every ``every`` optimizer steps, for the trainer's loggers and ``pl_module.log``.

    The loggers get them at the global step (see the module docs).

    Args:
        every: measure after the optimizer steps N, 2N, ... (at the end of the batch whose
            step makes the trainer's ``global_step`` a multiple of N).
        measures: measure names, as for :class:`flatness.CurvatureMonitor`.
        batch: the fixed batch to measure on (default: a copy of the first training batch).
        loss_fn: ``loss_fn(output, target)`` for ``(x, y)`` batches, or a
            :class:`flatness.ModelLoss` for any batch (default: the module's ``loss_fn``
            attribute).
        function, options: the measured function and the measures' settings, as for the
            monitor.
        prefix: the logged names' prefix.

    ``last`` holds the latest record (with its cost: ``seconds``, ``hvps``).
    """

    def __init__(
        self,
        every: int = 100,
        measures: Sequence[str] = ("lambda_max", "trace", "sq_trace"),
        batch: Any = None,
        loss_fn: Any = None,
        *,
        function: Function = "deployed",
        options: MeasureOptions | None = None,
        prefix: str = "curvature/",
    ) -> None:
        super().__init__()
        if isinstance(every, bool) or not isinstance(every, int) or every < 1:
            raise FlatnessError(f"every must be an integer >= 1, got {every!r}")
        self.every = every
        self.measures = tuple(measures)
        self.batch = None if batch is None else detached_copy(batch)
        self.loss_fn = loss_fn
        self.function = function
        self.options = options
        self.prefix = prefix
        self.monitor: CurvatureMonitor | None = None
        self.last: dict[str, Any] | None = None
        self._measured_step: int | None = None

    def _monitor(self, pl_module: pl.LightningModule) -> CurvatureMonitor:
        if self.monitor is None:
            loss_fn = self.loss_fn if self.loss_fn is not None else getattr(pl_module, "loss_fn", None)
            if loss_fn is None:
                raise FlatnessError(
                    "CurvatureCallback needs a loss: give loss_fn= (or set a loss_fn attribute on the LightningModule)"
                )
            self.monitor = CurvatureMonitor(
                pl_module, loss_fn, self.batch, self.every, self.measures, path=None,
                function=self.function, options=self.options,
            )
        return self.monitor

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        """Keep a detached copy of the first training batch (the measures' batch)."""
        if self.batch is None:
            self.batch = detached_copy(batch)

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        """Measure the curvature every ``every`` optimizer steps and log it."""
        step = trainer.global_step  # optimizer steps done: the model after `step` updates
        # under gradient accumulation several batches share a global step: measure once
        if step % self.every or step == self._measured_step:
            return
        self._measured_step = step
        monitor = self._monitor(pl_module)
        self.last = monitor.measure(step)
        values = {f"{self.prefix}{k}": v for k, v in monitor.scalars(self.last).items() if k != "step"}
        # Loggers get each record once, at its step. Through self.log they would not:
        # Lightning re-sends a step metric's last value at every later step of the epoch (a
        # measurement every N steps appeared at every step) and stamps it with the count of
        # finished batches, one less than the global step here. self.log still gets the values
        # (logger=False) so that callback_metrics, EarlyStopping and ModelCheckpoint see them.
        pl_module.log_dict(values, on_step=True, on_epoch=False, logger=False, batch_size=monitor.batch_size)
        for logger in trainer.loggers:
            logger.log_metrics(values, step=step)
