r"""The flatness-aware (FA) penalty λ·Tr(H²)/B as a drop-in term for any training loop.

.. math::

    L_\text{total} = L_\text{task} + \lambda \cdot \frac{1}{M B} \sum_{j=1}^{M} \lVert H v_j \rVert^2

where H is the Hessian of the task loss on the mini-batch, B the batch size and v_j Rademacher or
Gaussian probes (FA-regularization paper, eq. 3 and Algorithms 1–2). The curvature term is computed
on every ``every``-th call and is an exact zero on the other calls. The curvature pass computes
the same function as the task loss (:func:`flatness.passes.curvature_pass`): BatchNorm with the
batch's statistics, its running statistics left bitwise unchanged, dropout off (the paper), and
the math attention kernel (fused attention kernels have no double backward).

Example:
    >>> import torch
    >>> from torch import nn
    >>> from flatness import FlatnessPenalty
    >>> model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Dropout(0.3), nn.Linear(8, 3))
    >>> loss_fn = nn.CrossEntropyLoss()
    >>> opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    >>> penalty = FlatnessPenalty(model, loss_fn, lam=0.01, probes=5, every=10, seed=0)
    >>> x, y = torch.randn(16, 4), torch.randint(0, 3, (16,))
    >>> loss = loss_fn(model(x), y) + penalty(x, y)
    >>> loss.backward(); opt.step()
    >>> penalty.last_sq_trace is not None and model.training
    True
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence
from typing import Any, Literal

import torch
from torch import Tensor, nn

from . import layerwise
from .hutchinson import sq_trace
from .probes import Distribution, check_distribution, make_generator, sample_probes
from .finite_difference import FrozenKinks, fd_sq_trace, same_function_in_train_mode
from .finite_difference import surrogate as fd_surrogate
from .passes import curvature_pass
from .utils import batch_size, call_model, take_first, unwrap

__all__ = ["BACKENDS", "FlatnessPenalty", "NonFiniteCurvatureError"]

BACKENDS: tuple[str, ...] = ("auto", "autograd", "layerwise", "finite-difference")


class NonFiniteCurvatureError(FloatingPointError):
    """The Tr(H²) estimate was NaN or infinite."""


class FlatnessPenalty:
    """λ·Tr(H²)/B, estimated with M Hutchinson probes every ``every`` calls.

    Args:
        model: the network; its parameters that require grad are penalised (or ``params``).
        loss_fn: ``loss_fn(model(x), y) -> scalar`` (batch mean), the task loss.
        lam: λ >= 0. ``lam=0`` computes nothing and returns exact zeros.
        probes: M >= 1 probes per curvature pass.
        every: compute the penalty on calls 0, k, 2k, ... (k >= 1); zero on the others.
        dist: ``"rademacher"`` or ``"gaussian"``.
        seed: seed of the probe generator (reproducible probes); ``None`` uses torch's global RNG.
        generator: an explicit probe generator (overrides ``seed``).
        sub_batch: curvature pass on only the first ``sub_batch`` samples (int) or that fraction
            of the batch (float in (0, 1]); the result is still divided by the full B, so that it
            estimates the same λ·Tr(H²)/B with fewer samples.
        eval_during_curvature: dropout off in the curvature pass (the paper; default). With
            ``False`` the modules keep their modes (dropout on). Either way BatchNorm uses batch
            statistics and its running statistics are not updated (:mod:`flatness.passes`).
        on_nonfinite: ``"raise"`` (default) a :class:`NonFiniteCurvatureError`, or ``"skip"``:
            warn and return zero for that step.
        params: the parameters to penalise (default: all of ``model``'s trainable ones).
        backend: ``"auto"`` (default) uses the closed-form layer-wise estimator
            (:mod:`flatness.layerwise`) when the model is a supported stack of Linear layers and
            activations, else generic double backward (``"autograd"``); both give the same
            estimate for the same probes. ``"layerwise"`` insists on the closed form.
            ``"finite-difference"``: the first-order estimator of
            :mod:`flatness.finite_difference` — no double backward (works with
            models compiled with ``torch.compile`` and fused attention kernels), 1 + 3M gradient
            evaluations per curvature step (3M through :meth:`objective`); the returned term has
            the value λ·Tr(H²)/B and the finite-difference gradient.
        fd_step: the relative steps ``(h_v, h_u)`` (or one number for both) of the
            finite-difference backend (:func:`flatness.finite_difference.step_sizes`; default
            by dtype, :data:`flatness.finite_difference.RELATIVE_STEP`).

    After a curvature pass, ``last_sq_trace`` holds the Tr(H²) estimate (a float) and
    ``last_penalty`` the value added to the loss.
    """

    def __init__(
        self,
        model: nn.Module,
        loss_fn: Callable[[Tensor, Any], Tensor],
        lam: float = 0.01,
        probes: int = 5,
        every: int = 1,
        dist: Distribution = "rademacher",
        *,
        seed: int | None = None,
        generator: torch.Generator | None = None,
        sub_batch: int | float | None = None,
        eval_during_curvature: bool = True,
        on_nonfinite: Literal["raise", "skip"] = "raise",
        params: Sequence[Tensor] | None = None,
        backend: Literal["auto", "autograd", "layerwise", "finite-difference"] = "auto",
        fd_step: float | tuple[float, float] | None = None,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if not (isinstance(lam, (int, float)) and math.isfinite(lam) and lam >= 0):
            raise ValueError(f"lam (λ) must be a finite number >= 0, got {lam!r}")
        if not isinstance(probes, int) or probes < 1:
            raise ValueError(f"probes (M) must be an integer >= 1, got {probes!r}")
        if not isinstance(every, int) or every < 1:
            raise ValueError(f"every (k) must be an integer >= 1, got {every!r}")
        check_distribution(dist)
        if on_nonfinite not in ("raise", "skip"):
            raise ValueError(f"on_nonfinite must be 'raise' or 'skip', got {on_nonfinite!r}")
        if sub_batch is not None:
            if isinstance(sub_batch, bool) or not isinstance(sub_batch, (int, float)):
                raise ValueError(f"sub_batch must be an int or a float, got {sub_batch!r}")
            if isinstance(sub_batch, float) and not 0 < sub_batch <= 1:
                raise ValueError(f"a fractional sub_batch must be in (0, 1], got {sub_batch}")
            if isinstance(sub_batch, int) and sub_batch < 1:
                raise ValueError(f"sub_batch must be >= 1, got {sub_batch}")
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        if fd_step is not None:
            steps = (fd_step, fd_step) if isinstance(fd_step, (int, float)) else tuple(fd_step)
            if len(steps) != 2 or not all(isinstance(h, (int, float)) and math.isfinite(h) and h > 0 for h in steps):
                raise ValueError(f"fd_step must be a finite number > 0 or a pair of them, got {fd_step!r}")
        if backend == "layerwise" and params is not None:
            raise ValueError("backend='layerwise' penalises all of the model's parameters: drop params")
        self.backend = backend
        self.fd_step = fd_step
        self.model = model
        # Under DDP the curvature pass runs on the wrapped module: it is built out of place with
        # autograd.grad(create_graph=True) on the local batch, and the one ordinary backward() of
        # task loss + penalty is what DDP all-reduces (it does not synchronise grads of grads).
        self.local_model = unwrap(model)
        self.loss_fn = loss_fn
        self.lam = float(lam)
        self.probes = probes
        self.every = every
        self.dist = dist
        self.sub_batch = sub_batch
        self.eval_during_curvature = eval_during_curvature
        self.on_nonfinite = on_nonfinite
        self._params = list(params) if params is not None else None
        self.generator = make_generator(seed, generator)
        self.calls = 0
        self.last_sq_trace: float | None = None
        self.last_penalty: float | None = None

    @property
    def params(self) -> list[Tensor]:
        if self._params is not None:
            return self._params
        return [p for p in self.model.parameters() if p.requires_grad]

    def is_active(self, call: int | None = None) -> bool:
        """Whether call number ``call`` (default: the next one) computes the curvature term."""
        call = self.calls if call is None else call
        return self.lam > 0 and call % self.every == 0

    def _curvature_batch(self, x: Any, y: Any) -> tuple[Any, Any]:
        if self.sub_batch is None:
            return x, y
        full = batch_size(x)
        n = self.sub_batch if isinstance(self.sub_batch, int) else math.ceil(self.sub_batch * full)
        n = max(1, min(n, full))
        return take_first(x, n), take_first(y, n)

    def __call__(self, x: Any, y: Any) -> Tensor:
        """The penalty for this mini-batch: λ·Tr(H²)/B with graph, or an exact zero."""
        return self._penalty(x, y)

    def objective(self, x: Any, y: Any) -> tuple[Tensor, Tensor]:
        """``(task_loss, task_loss + self(x, y))`` on this mini-batch, the second to back-propagate.

        The task loss is ``loss_fn(model(x), y)`` with the model in its current modes. The
        finite-difference backend takes its g(θ) (and ReLU masks) from the task pass when that
        is the curvature pass's function — the full batch is the curvature batch, all trainable
        parameters are penalised and the model is deterministic in train mode
        (:func:`flatness.finite_difference.same_function_in_train_mode`) — which saves one
        gradient evaluation per curvature step; the sum is then a surrogate with the value of
        the sum and the gradient ∇L + ∇penalty, applied by its ``backward()``.
        """
        if not (
            self.backend == "finite-difference"
            and self.is_active()
            and self.sub_batch is None
            and self._params is None
            and same_function_in_train_mode(self.local_model)
        ):
            loss = self.loss_fn(call_model(self.model, x), y)
            return loss, loss + self._penalty(x, y)
        params = self.params
        kinks = FrozenKinks()
        with kinks.recording():
            loss = self.loss_fn(call_model(self.model, x), y)
        grads = torch.autograd.grad(loss, params)
        return loss.detach(), fd_surrogate(params, loss, grads) + self._penalty(x, y, grads, kinks)

    def _penalty(
        self, x: Any, y: Any, grad0: Sequence[Tensor] | None = None, kinks: FrozenKinks | None = None
    ) -> Tensor:
        active = self.is_active()
        self.calls += 1
        params = self.params
        if not params:
            raise ValueError("the model has no parameters that require grad")
        ref = params[0]
        if not active:
            return torch.zeros((), device=ref.device, dtype=ref.dtype)
        full_batch = batch_size(x)
        cx, cy = self._curvature_batch(x, y)
        if self.backend == "finite-difference":
            probes = sample_probes(params, self.probes, self.dist, generator=self.generator)
            fd = fd_sq_trace(
                self.local_model, self.loss_fn, cx, cy, params, probes, h=self.fd_step, grad0=grad0,
                kinks=kinks, dropout=not self.eval_during_curvature,
            )
            assert fd.grads is not None
            estimate = fd_surrogate(params, fd.values.mean(), fd.grads)
        else:
            with curvature_pass(self.local_model, dropout=not self.eval_during_curvature):
                if self.backend == "layerwise" or (
                    self.backend == "auto"
                    and self._params is None
                    and layerwise.supports(self.local_model, cx)
                ):
                    estimate = layerwise.layerwise_sq_trace(
                        self.local_model, self.loss_fn, cx, cy, self.probes, self.dist,
                        generator=self.generator,
                    )
                else:
                    loss = self.loss_fn(call_model(self.local_model, cx), cy)
                    estimate = sq_trace(
                        loss, params, self.probes, self.dist, generator=self.generator,
                        create_graph=True,
                    )
        value = float(estimate.detach())
        if not math.isfinite(value):
            message = (
                f"non-finite Tr(H²) estimate ({value}) at call {self.calls - 1}; "
                "lower the learning rate or λ, or pass on_nonfinite='skip'"
            )
            if self.on_nonfinite == "raise":
                raise NonFiniteCurvatureError(message)
            warnings.warn(message + " (step skipped)", RuntimeWarning, stacklevel=2)
            return torch.zeros((), device=ref.device, dtype=ref.dtype)
        penalty = self.lam * estimate / full_batch
        self.last_sq_trace = value
        self.last_penalty = self.lam * value / full_batch
        return penalty

    def state_dict(self) -> dict[str, Any]:
        """Schedule position and generator state, to resume a run exactly."""
        return {
            "calls": self.calls,
            "generator": None if self.generator is None else self.generator.get_state(),
            "last_sq_trace": self.last_sq_trace,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.calls = int(state["calls"])
        if state.get("generator") is not None:
            if self.generator is None:
                self.generator = torch.Generator(device="cpu")
            self.generator.set_state(state["generator"])
        self.last_sq_trace = state.get("last_sq_trace")

    def __repr__(self) -> str:
        return (
            f"FlatnessPenalty(lam={self.lam}, probes={self.probes}, every={self.every}, "
            f"dist={self.dist!r}, sub_batch={self.sub_batch})"
        )
