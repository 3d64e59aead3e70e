r"""Watch curvature during training: λ_max, Tr(H), Tr(H²)/B every N steps on a fixed batch.

:class:`CurvatureMonitor` runs measures of :mod:`flatness.measures` by name (the registry
:data:`flatness.measures.MEASURES`, through :func:`flatness.measures.compute_measures`) on one
held-out batch every ``every`` steps, under the measure policy
(:func:`flatness.passes.measure_pass`: by default the deployed function — eval mode, BatchNorm
with its running statistics, dropout off; ``function="batch_stats"`` for BatchNorm on the
batch's own statistics). It leaves the model exactly as it found it — weights, ``.grad``,
``training`` flags, BatchNorm running statistics — and the global random states (torch CPU and
CUDA, Python's ``random``, NumPy's legacy global state) bitwise unchanged, so adding a monitor to
a run does not change the run. The probes are drawn from a fixed seed, the same at every call,
so successive values differ by the model's change, not by the draw.

.. math::

    \lambda_\max(H), \quad \operatorname{Tr}(H), \quad \operatorname{Tr}(H^2)/B,
    \qquad H = \nabla^2_\theta\, \ell(\theta; x_{1..B}, y_{1..B})

(H of the batch-mean loss on the monitored batch of B examples; Tr(H²)/B is the FA penalty's
quantity without λ). Each record goes to a CSV file (one line per measurement, appended in one
write, the header once; an existing file with the same columns is continued, steps it already
holds are skipped) and, when a ``torch.utils.tensorboard.SummaryWriter`` is given, to TensorBoard
scalars ``curvature/<key>``. Every record states its own cost: ``seconds`` and ``hvps`` (the
Hessian-vector products the measures report, e.g. ``eigen_matvecs``).

Example:
    >>> import tempfile, pathlib, torch
    >>> from torch import nn
    >>> from flatness import CurvatureMonitor
    >>> model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3))
    >>> held_out = (torch.randn(32, 4), torch.randint(0, 3, (32,)))
    >>> path = pathlib.Path(tempfile.mkdtemp()) / "curvature.csv"
    >>> monitor = CurvatureMonitor(model, nn.functional.cross_entropy, held_out, every=2, path=path)
    >>> opt = torch.optim.SGD(model.parameters(), lr=0.1)
    >>> for step in range(4):
    ...     x, y = torch.randn(16, 4), torch.randint(0, 3, (16,))
    ...     opt.zero_grad(); nn.functional.cross_entropy(model(x), y).backward(); opt.step()
    ...     record = monitor.step()             # measures on steps 0 and 2
    >>> [line.split(",")[0] for line in path.read_text().splitlines()]
    ['step', '0', '2']
    >>> {"lambda_max", "hessian_trace", "hessian_sq_trace_per_B", "seconds", "hvps"} <= set(monitor.last)
    True
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import io
import os
import random
import time
import warnings
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from .batch_loss import ModelLoss
from .measures.functional import LossFn
from .measures.summary import MEASURES, MeasureOptions, compute_measures
from .passes import FUNCTIONS, Function
from .utils import FlatnessError, batch_size

__all__ = ["ALIASES", "CurvatureMonitor", "preserved_random_states", "measure_names", "detached_copy"]

ALIASES: dict[str, str] = {"trace": "hessian_trace", "sq_trace": "hessian_sq_trace"}
"""Short names the monitor accepts for measures of :data:`flatness.measures.MEASURES`."""

DEFAULT_OPTIONS = MeasureOptions(matvecs=30, k=1, eigen_tol=1e-3)
"""The monitor's default measure settings: the cheap set a run records at its end
(:func:`flatness.measures.final_measures`: λ_max to 1e-3 relative, 30 products for the traces)."""


def measure_names(measures: Sequence[str]) -> list[str]:
    """Registry names for ``measures`` (aliases resolved, repeats dropped), or one clear error."""
    if isinstance(measures, str):
        measures = (measures,)
    names = list(dict.fromkeys(ALIASES.get(m, m) for m in measures))
    unknown = [m for m in names if m not in MEASURES]
    if unknown or not names:
        known = sorted([*MEASURES, *ALIASES])
        raise FlatnessError(f"unknown measure(s) {unknown or list(measures)}; expected some of {known}")
    return names


@contextlib.contextmanager
def preserved_random_states(devices: Sequence[int] = ()) -> Iterator[None]:
    """The body may draw random numbers; the random states are put back bitwise on exit (also on error).

    The states: torch's CPU state, the CUDA states of ``devices``, Python's ``random`` and NumPy's
    global state.
    """
    py_state = random.getstate()
    np_state = np.random.get_state()
    try:
        with torch.random.fork_rng(devices=list(devices)):
            yield
    finally:
        random.setstate(py_state)
        np.random.set_state(np_state)


def detached_copy(x: Any) -> Any:
    """A detached copy of a tensor or a (nested) tuple/list/dict of tensors; other values as they are.

    A monitored batch is kept this way: later in-place changes by a data loader (reused buffers) do
    not reach it.
    """
    if isinstance(x, torch.Tensor):
        return x.detach().clone()
    if isinstance(x, tuple):
        return tuple(detached_copy(t) for t in x)
    if isinstance(x, list):
        return [detached_copy(t) for t in x]
    if isinstance(x, Mapping):
        return {k: detached_copy(v) for k, v in x.items()}
    return x


def _cuda_devices(model: nn.Module) -> list[int]:
    return sorted({t.device.index or 0 for t in [*model.parameters(), *model.buffers()] if t.is_cuda})


def _scalar(value: Any) -> float | None:
    """``value`` as a float when it is a real number (bools and strings are not measured values)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value)


class _CsvLog:
    """Append-only CSV: each record is one ``write`` of a complete line (``O_APPEND``), the header once.

    A file that exists is continued if its header matches (resume).
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self.columns: list[str] | None = None
        self.last_step: int | None = None
        if self.path.exists() and self.path.stat().st_size > 0:
            self._resume()

    def _resume(self) -> None:
        text = self.path.read_text()
        if not text.endswith("\n"):  # a line cut by a crash: drop it, keep the complete ones
            keep = text[: text.rfind("\n") + 1]
            warnings.warn(
                f"{self.path}: dropped an incomplete last line (an interrupted write)", RuntimeWarning, stacklevel=4
            )
            with open(self.path, "r+b") as fh:
                fh.truncate(len(keep.encode()))
            text = keep
        rows = list(csv.reader(io.StringIO(text)))
        if not rows:
            return
        if not rows[0] or rows[0][0] != "step":
            raise FlatnessError(f"{self.path} is not a curvature monitor log (its first column is not 'step')")
        self.columns = rows[0]
        steps = [int(r[0]) for r in rows[1:] if r]
        self.last_step = max(steps) if steps else None

    def append(self, record: Mapping[str, float]) -> None:
        columns = ["step", *[k for k in record if k != "step"]]
        header = self.columns is None
        if header:
            self.columns = columns
        elif set(columns) != set(self.columns):  # type: ignore[arg-type]
            raise FlatnessError(
                f"{self.path} has the columns {self.columns}; this monitor writes {columns}: "
                "give it another path (or the same measures)"
            )
        buffer = io.StringIO()
        writer = csv.writer(buffer, lineterminator="\n")
        if header:
            writer.writerow(self.columns)
        writer.writerow([_format(record.get(c)) for c in self.columns])  # type: ignore[union-attr]
        data = buffer.getvalue().encode()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
        try:
            written = os.write(fd, data)
            if written != len(data):
                raise FlatnessError(f"could not append a whole line to {self.path} (disk full?)")
            os.fsync(fd)
        finally:
            os.close(fd)
        self.last_step = int(record["step"])


def _format(value: float | None) -> str:
    if value is None:
        return ""
    return repr(int(value)) if float(value).is_integer() and abs(value) < 2**53 else repr(float(value))


class CurvatureMonitor:
    """Curvature measures of ``model`` on a fixed batch every ``every`` steps (module docs).

    Args:
        model: the network being trained (read only: nothing of it is changed).
        loss_fn: ``loss_fn(model(x), y) -> scalar``, the batch-mean task loss; or a
            :class:`flatness.ModelLoss` ``fn(model, batch)`` for any batch (e.g. a dict).
        batch: the held-out batch measured every time, an ``(x, y)`` pair (any batch with a
            :class:`~flatness.ModelLoss`); kept as a detached copy.
        every: measure on steps 0, N, 2N, ... (N >= 1).
        measures: names from :data:`flatness.measures.MEASURES`, or the short names
            ``"trace"`` (Tr(H), ``hessian_trace``) and ``"sq_trace"`` (Tr(H²), with Tr(H²)/B as
            ``hessian_sq_trace_per_B``).
        path: the CSV file (default ``curvature.csv``; ``None``: no file).
        writer: a ``torch.utils.tensorboard.SummaryWriter`` (or anything with ``add_scalar``)
            that gets every numeric value as ``<tag>/<key>`` at the step.
        tag: the TensorBoard tag prefix.
        function: ``"deployed"`` (default; eval mode, running statistics) or ``"batch_stats"``
            (BatchNorm on the monitored batch's statistics); see :mod:`flatness.passes`.
        options: the measures' settings (default :data:`DEFAULT_OPTIONS`; its ``function`` is
            replaced by ``function``).

    After each measurement ``last`` holds its record: ``step``, the measures' keys (numbers;
    lists and labels such as ``top_eigenvalues`` and ``last_layer`` too, which the CSV and
    TensorBoard leave out), ``seconds`` (wall time of the call) and ``hvps`` (the
    Hessian-vector products the measures report).
    """

    def __init__(
        self,
        model: nn.Module,
        loss_fn: LossFn | ModelLoss,
        batch: Any,
        every: int = 100,
        measures: Sequence[str] = ("lambda_max", "trace", "sq_trace"),
        *,
        path: str | os.PathLike[str] | None = "curvature.csv",
        writer: Any = None,
        tag: str = "curvature",
        function: Function = "deployed",
        options: MeasureOptions | None = None,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise FlatnessError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if isinstance(every, bool) or not isinstance(every, int) or every < 1:
            raise FlatnessError(f"every must be an integer >= 1, got {every!r}")
        if function not in FUNCTIONS:
            raise FlatnessError(f"function must be one of {FUNCTIONS}, got {function!r}")
        if not isinstance(loss_fn, ModelLoss) and (not isinstance(batch, (tuple, list)) or len(batch) != 2):
            raise FlatnessError("batch must be an (inputs, targets) pair (or give a ModelLoss for any batch)")
        if writer is not None and not callable(getattr(writer, "add_scalar", None)):
            raise FlatnessError(f"writer must have add_scalar (a SummaryWriter), got {type(writer).__name__}")
        self.model = model
        self.loss_fn = loss_fn
        if isinstance(loss_fn, ModelLoss):  # the measures take it with whole batches
            self.batch = detached_copy(batch)
            self.batch_size = loss_fn.size_of(self.batch)
        else:
            self.batch = detached_copy(tuple(batch))
            self.batch_size = batch_size(self.batch[0])
        self.every = every
        self.measures = measure_names(measures)
        base = options if options is not None else DEFAULT_OPTIONS
        self.options = dataclasses.replace(base, function=function)
        self.writer = writer
        self.tag = tag
        self.csv = _CsvLog(path) if path is not None else None
        self.calls = 0
        self.last: dict[str, Any] | None = None

    def is_due(self, step: int) -> bool:
        """Whether ``step`` is a measuring step (a multiple of ``every`` not yet in the CSV)."""
        done = self.csv is not None and self.csv.last_step is not None and step <= self.csv.last_step
        return step % self.every == 0 and not done

    def step(self, step: int | None = None) -> dict[str, Any] | None:
        """Call once per training step: measures when the step is due, else returns ``None``.

        ``step``: the training loop's global step (default: this monitor's own count of calls).
        Pass it when a run resumes, so that the CSV is continued where it stopped.
        """
        current = self.calls if step is None else int(step)
        self.calls = current + 1
        if not self.is_due(current):
            return None
        return self.measure(current)

    __call__ = step

    def measure(self, step: int) -> dict[str, Any]:
        """Measure now, as step ``step``; the record goes to the CSV and the writer."""
        start = time.perf_counter()
        model = self.model
        grads = [(p, p.grad) for p in model.parameters()]
        device_type = next((p.device.type for p in model.parameters()), "cpu")
        with contextlib.ExitStack() as stack:
            stack.enter_context(preserved_random_states(_cuda_devices(model)))
            stack.enter_context(torch.enable_grad())
            # measures in the parameters' dtype, whatever autocast region the loop is in
            stack.enter_context(torch.autocast(device_type, enabled=False))
            try:
                values = compute_measures(model, self.loss_fn, [self.batch], self.measures, self.options)
            finally:
                for p, g in grads:  # measures use autograd.grad; this keeps any .grad as it was
                    p.grad = g
        record: dict[str, Any] = {"step": step, **values}
        if "hessian_sq_trace" in values:
            record["hessian_sq_trace_per_B"] = values["hessian_sq_trace"] / self.batch_size
            record["hessian_sq_trace_per_B_stderr"] = values["hessian_sq_trace_stderr"] / self.batch_size
        record["hvps"] = sum(int(v) for k, v in values.items() if k.endswith("_matvecs"))
        record["seconds"] = time.perf_counter() - start
        self.last = record
        scalars = self.scalars(record)
        if self.csv is not None:
            self.csv.append(scalars)
        if self.writer is not None:
            for key, value in scalars.items():
                if key != "step":
                    self.writer.add_scalar(f"{self.tag}/{key}", value, step)
        return record

    @staticmethod
    def scalars(record: Mapping[str, Any]) -> dict[str, float]:
        """The numeric entries of a record (what the CSV and TensorBoard get)."""
        out = {}
        for key, value in record.items():
            number = _scalar(value)
            if number is not None:
                out[key] = number
        return out

    def state_dict(self) -> dict[str, Any]:
        """The monitor's position in training (its call count), for a checkpoint."""
        return {"calls": self.calls}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Resume from :meth:`state_dict`: the next measurement falls on the same steps as before."""
        self.calls = int(state["calls"])

    def __repr__(self) -> str:
        where = self.csv.path if self.csv is not None else None
        return (
            f"CurvatureMonitor(every={self.every}, measures={self.measures}, "
            f"function={self.options.function!r}, path={where!r})"
        )
