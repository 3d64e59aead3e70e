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

import contextlib
import math
import warnings
from collections.abc import Callable, Iterator, Sequence
from typing import Any, Literal

import torch
from torch import Tensor, nn

from . import layerwise
from .batch_loss import ModelLoss, adapt_wrapped, batch_size_of, call_pair
from .control_variate import cv_sq_trace
from .finite_difference import FrozenKinks, fd_sq_trace, same_function_in_train_mode
from .finite_difference import surrogate as fd_surrogate
from .hutchinson import sq_trace
from .kfac import kfac_sq_trace
from .lam_control import make_policy
from .linear_io import SharedPrefix, share_prefix
from .passes import curvature_pass
from .precision import PassPrecision
from .probes import Distribution, check_distribution, make_generator, sample_probes
from .utils import batch_size, call_model, require_double_backward, take_first

__all__ = ["BACKENDS", "FlatnessPenalty", "NonFiniteCurvatureError"]

BACKENDS: tuple[str, ...] = ("auto", "autograd", "layerwise", "finite-difference", "kfac")


class NonFiniteCurvatureError(FloatingPointError):
    """The Tr(H²) estimate was NaN or infinite."""


class FlatnessPenalty:
    """λ·Tr(H²)/B, estimated with M Hutchinson probes every ``every`` calls.

    Args:
        model: the network; its parameters that require grad are penalised (or ``params``).
        loss_fn: ``loss_fn(model(x), y) -> scalar`` (batch mean), the task loss; or a
            :class:`flatness.ModelLoss` ``fn(model, batch)`` for any batch (dicts): the penalty is
            then called as ``penalty(batch)``, B is the batch's size (:mod:`flatness.batch_loss`),
            and the backends that need the model output (layer-wise, K-FAC, ``cv``) are refused.
        lam: λ >= 0. ``lam=0`` computes nothing and returns exact zeros.
        probes: M >= 1 probes per curvature pass.
        every: compute the penalty on calls 0, k, 2k, ... (k >= 1); zero on the others.
        dist: ``"rademacher"`` (the paper's) or ``"gaussian"``. On the layer-wise path Gaussian
            probes are the cheaper ones: the input layer's block is drawn in the data's image
            (:func:`flatness.layerwise.input_tangent_in_image`; same distribution of the
            estimate, other draws than :func:`flatness.sample_probes` for the same seed).
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
            (:mod:`flatness.layerwise`) when the model is structurally a supported stack of
            Linear layers and activations (:func:`flatness.layerwise.unsupported_reason`), else
            generic double backward (``"autograd"``); both give the same estimate for the same
            probes. What the structure cannot show is that ``loss_fn`` depends on the model
            output alone, so ``"auto"`` computes its first curvature pass both ways with the
            same probes and keeps the closed form only if they agree (relative difference
            <= 1e-8 in float64, 1e-4 in float32); otherwise it warns once and uses autograd
            from then on. ``"layerwise"`` is the explicit declaration that the loss is a
            function of the output: no check against autograd, and a ``ValueError`` naming the
            reason when the model is not covered.
            ``"finite-difference"``: the first-order estimator of
            :mod:`flatness.finite_difference` — no double backward (works with models compiled
            with ``torch.compile`` and fused attention kernels), 1 + 3M gradient evaluations per
            curvature step (3M through :meth:`objective`); the returned term has the value
            λ·Tr(H²)/B and the finite-difference gradient.
            ``"kfac"``: the Kronecker-factored approximation Σ_l Tr(A_l²)·Tr(G_l²) of
            :mod:`flatness.kfac` instead of Hutchinson (no probes; Linear layers only).
        fd_step: the relative steps ``(h_v, h_u)`` (or one number for both) of the
            finite-difference backend (:func:`flatness.finite_difference.step_sizes`; default
            by dtype, :data:`flatness.finite_difference.RELATIVE_STEP`).
        estimator: ``"hutchinson"`` (default) or ``"cv"``: Hutchinson with the output layer's
            exact Hessian block as a control variate (:mod:`flatness.control_variate`; unbiased,
            lower variance at about the same cost; ``flatness bench variance``).
        lam_schedule: λ over the steps (calls): a :mod:`flatness.schedules` schedule, or its
            short form (``"warmup:0.1+cosine"``, fractions of ``total_steps``); λ = 0 skips the
            pass. ``lam`` is the peak.
        lam_control: an adaptive λ (:mod:`flatness.lam_control`): ``"ratio[:ρ[:β]]"`` sets λ ≤
            ``lam`` so that the penalty's gradient norm is ρ × the task gradient's;
            ``"spike[:FACTOR[:BOOST]]"`` runs the pass every step and raises λ after a
            Tr(H²) spike and backs off to every ``every`` steps otherwise; or a controller object.
        total_steps: the length of the run in steps (for a text ``lam_schedule``).

    After a curvature pass, ``last_sq_trace`` holds the Tr(H²) estimate (a float),
    ``last_lam`` the λ applied and ``last_penalty`` the value added to the loss; ``policy`` is
    the λ-policy (its ``log`` holds its decisions). Computing the task loss inside
    :meth:`sharing` lets the next call reuse the task forward's input layer.
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
        backend: Literal["auto", "autograd", "layerwise", "finite-difference", "kfac"] = "auto",
        estimator: Literal["hutchinson", "cv"] = "hutchinson",
        fd_step: float | tuple[float, float] | None = None,
        lam_schedule: Any = None,
        lam_control: Any = None,
        total_steps: int | None = None,
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
            raise ValueError(f"backend must be one of {', '.join(map(repr, BACKENDS))}, got {backend!r}")
        if estimator not in ("hutchinson", "cv"):
            raise ValueError(f"estimator must be 'hutchinson' or 'cv', got {estimator!r}")
        if backend in ("kfac", "finite-difference") and estimator != "hutchinson":
            raise ValueError(f"backend={backend!r} has its own estimator: drop estimator")
        if fd_step is not None:
            steps = (fd_step, fd_step) if isinstance(fd_step, (int, float)) else tuple(fd_step)
            if len(steps) != 2 or not all(
                isinstance(h, (int, float)) and math.isfinite(h) and h > 0 for h in steps
            ):
                raise ValueError(f"fd_step must be a finite number > 0 or a pair of them, got {fd_step!r}")
        self.model_loss = loss_fn if isinstance(loss_fn, ModelLoss) else None
        if self.model_loss is not None:
            if backend in ("layerwise", "kfac") or estimator == "cv":
                what = f"estimator={estimator!r}" if estimator == "cv" else f"backend={backend!r}"
                raise ValueError(f"{what} needs the model output, and a ModelLoss gives only the loss: "
                                 "use backend='auto', 'autograd' or 'finite-difference'")
        for name, used in (("backend='layerwise'", backend == "layerwise"), ("backend='kfac'", backend == "kfac"), ("estimator='cv'", estimator == "cv")):
            if used and params is not None:
                raise ValueError(f"{name} penalises all of the model's parameters: drop params")
        self.backend = backend
        self.estimator = estimator
        self.fd_step = fd_step
        self.policy = make_policy(float(lam), every, lam_schedule, lam_control, total_steps)
        # a fixed λ is not logged per step (the run's settings hold it)
        self._varying_lam = lam_schedule is not None or lam_control is not None
        # a ModelLoss: the model and loss as one module (flatness.batch_loss); local_model: the
        # module the out-of-place passes run, also the eager module inside torch.compile's wrapper
        model, loss_fn, self.local_model = adapt_wrapped(model, loss_fn)
        self.model = model
        # Under DDP the curvature pass runs on the wrapped module: it is built out of place with
        # autograd.grad(create_graph=True) on the local batch, and the one ordinary backward() of
        # task loss + penalty is what DDP all-reduces (it does not synchronise grads of grads).
        if backend != "finite-difference":
            require_double_backward(self.local_model, f"backend={backend!r}")
        self._precision = PassPrecision(backend)  # autocast: flatness.precision
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
        self.last_lam: float | None = None
        # "auto": None until the first curvature pass compared the closed form with autograd.
        self._layerwise_agrees: bool | None = None
        self._shared: tuple[Any, Tensor] | None = None  # (input, first Linear's output)
        self._prefix: SharedPrefix | None = None  # the task forward's prefix (kfac, cv)
        self._pending_hook: Any = None

    @property
    def params(self) -> list[Tensor]:
        """The penalised parameters (``params`` as given, else the model's trainable ones)."""
        if self._params is not None:
            return self._params
        return [p for p in self.model.parameters() if p.requires_grad]

    def is_active(self, call: int | None = None) -> bool:
        """Whether call number ``call`` (default: the next one) computes the curvature term."""
        return self.policy.decide(self.calls if call is None else call).active

    def _curvature_batch(self, x: Any, y: Any) -> tuple[Any, Any]:
        if self.sub_batch is None:
            return x, y
        full = batch_size(x)
        n = self.sub_batch if isinstance(self.sub_batch, int) else math.ceil(self.sub_batch * full)
        n = max(1, min(n, full))
        return take_first(x, n), take_first(y, n)

    def __call__(self, x: Any, y: Any = None, *, log: dict[str, float] | None = None) -> Tensor:
        """The penalty for this mini-batch: λ·Tr(H²)/B with graph, or an exact zero.

        ``log``: a dict that receives the floats of this step's λ decision (``lam`` when λ
        varies; the controllers' measurements), e.g. a training step's logged values.
        """
        return self._call(*call_pair(self.model_loss, x, y), log)

    def _call(self, x: Any, y: Any, log: dict[str, float] | None) -> Tensor:
        shared, self._shared = self._shared, None
        prefix, self._prefix = self._prefix, None
        first = shared[1] if shared is not None and shared[0] is x else None
        return self._penalty(x, y, first, prefix, log)

    def shares_task_gradient(self) -> bool:
        """Whether :meth:`objective` takes this step's g(θ) from the task pass (see there)."""
        return (
            self.backend == "finite-difference"
            and self.is_active()
            and self.sub_batch is None
            and self._params is None
            and not getattr(self.policy, "needs_grad_norms", False)
            and same_function_in_train_mode(self.local_model)
        )

    def objective(self, x: Any, y: Any = None, *, log: dict[str, float] | None = None) -> tuple[Tensor, Tensor]:
        """``(task_loss, task_loss + self(x, y))`` on this mini-batch, the second to back-propagate.

        The task loss is ``loss_fn(model(x), y)`` with the model in its current modes. The
        finite-difference backend takes its g(θ) (and ReLU masks) from the task pass when that
        is the curvature pass's function — the full batch is the curvature batch, all trainable
        parameters are penalised and the model is deterministic in train mode
        (:func:`flatness.finite_difference.same_function_in_train_mode`) — which saves one
        gradient evaluation per curvature step; the sum is then a surrogate with the value of
        the sum and the gradient ∇L + ∇penalty, applied by its ``backward()``.

        Example:
            >>> import torch
            >>> from torch import nn
            >>> from flatness import FlatnessPenalty
            >>> model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3))
            >>> penalty = FlatnessPenalty(model, nn.CrossEntropyLoss(), backend="finite-difference", seed=0)
            >>> loss, total = penalty.objective(torch.randn(16, 4), torch.randint(0, 3, (16,)))
            >>> total.backward()
        """
        x, y = call_pair(self.model_loss, x, y)
        if not self.shares_task_gradient():
            loss = self.loss_fn(call_model(self.model, x), y)
            return loss, loss + self._call(x, y, log)
        params = self.params
        kinks = FrozenKinks()
        with kinks.recording():
            loss = self.loss_fn(call_model(self.model, x), y)
        grads = torch.autograd.grad(loss, params)
        penalty = self._penalty(x, y, None, None, log, grad0=grads, kinks=kinks)
        return loss.detach(), fd_surrogate(params, loss.detach(), grads) + penalty

    @contextlib.contextmanager
    def sharing(self) -> Iterator[None]:
        """Around the task loss's forward pass: the next curvature pass reuses its input layer.

        For ``backend="kfac"`` and ``estimator="cv"``, whose closed forms run a forward pass of
        their own, the output of the model's leading Linear/activation modules is recorded
        (:func:`flatness.linear_io.share_prefix`); otherwise :meth:`sharing_first_layer`.
        """
        if not (self.backend == "kfac" or self.estimator == "cv"):
            with self.sharing_first_layer():
                yield
            return
        if not self.is_active() or self.model is not self.local_model:  # not under DDP, as below
            yield
            return
        with share_prefix(self.local_model) as prefix:
            yield
        self._prefix = prefix

    @contextlib.contextmanager
    def sharing_first_layer(self) -> Iterator[None]:
        """Around the task loss's forward pass: share its first Linear layer's output with the
        next call's curvature pass, which then skips that product, forward and backward.

        Example:
            >>> import torch
            >>> from torch import nn
            >>> from flatness import FlatnessPenalty
            >>> model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Dropout(0.3), nn.Linear(8, 3))
            >>> penalty = FlatnessPenalty(model, nn.CrossEntropyLoss(), lam=0.01, seed=0)
            >>> x, y = torch.randn(16, 4), torch.randint(0, 3, (16,))
            >>> for _ in range(2):  # the first call checks the closed form against autograd
            ...     with penalty.sharing_first_layer():
            ...         loss = nn.functional.cross_entropy(model(x), y)
            ...     (loss + penalty(x, y)).backward()

        The output is kept only on the closed-form path (once ``backend="auto"`` has checked it,
        see the class docs), for the unwrapped model, when nothing before the first Linear
        differs between the two passes (an active dropout) and no module works in place; and it
        is used only if the next call gets the very input tensor the forward pass got.
        Otherwise the call computes everything itself, as without this context.
        """
        self._shared = None
        model = self.model
        if (
            not self.is_active()
            or self.backend in ("autograd", "kfac", "finite-difference")
            or self.estimator == "cv"
            or (self.backend == "auto" and not self._layerwise_agrees)
            or model is not self.local_model
            or type(model) is not nn.Sequential
        ):
            yield
            return
        modules = list(model)
        first = next((i for i, m in enumerate(modules) if type(m) is nn.Linear), None)
        if first is None or any(getattr(m, "inplace", False) for m in modules) or any(
            type(m) is nn.Dropout and m.training and m.p > 0 for m in modules[:first]
        ):
            yield
            return
        seen: dict[str, Any] = {}
        handles = [
            model.register_forward_pre_hook(lambda mod, args: seen.setdefault("x", args[0])),
            modules[first].register_forward_hook(lambda mod, args, out: seen.setdefault("z", out)),
        ]
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()
        if "x" in seen and "z" in seen:
            self._shared = (seen["x"], seen["z"])

    def _backend(self, cx: Any) -> str:
        """``"layerwise"``, ``"autograd"`` or ``"verify"`` (auto's first pass) for batch ``cx``."""
        if self.backend == "autograd":
            return "autograd"
        reason = layerwise.unsupported_reason(self.local_model, cx)
        if self.backend == "layerwise":
            if reason is not None:
                raise ValueError(f"backend='layerwise' cannot compute this model's Tr(H²): {reason}")
            return "layerwise"
        if self._params is not None or reason is not None or self._layerwise_agrees is False:
            return "autograd"
        return "layerwise" if self._layerwise_agrees else "verify"

    def _engine(
        self, cx: Any, cy: Any, params: list[Tensor], first: Tensor | None
    ) -> Callable[[Sequence[Tensor]], Tensor]:
        """(1/M) Σ_j ‖H v_j‖² for given probe vectors, by the chosen backend (with graph)."""
        backend = self._backend(cx)
        model = self.local_model
        if backend == "layerwise":
            def fast(vecs: Sequence[Tensor]) -> Tensor:
                return layerwise.layerwise_sq_trace(
                    model, self.loss_fn, cx, cy, dist=self.dist, generator=self.generator,
                    probe_vectors=vecs, first_linear_output=first,
                )
            return fast

        def slow(vecs: Sequence[Tensor]) -> Tensor:
            loss = self.loss_fn(call_model(model, cx), cy)
            return sq_trace(loss, params, probe_vectors=vecs, create_graph=True)

        if backend == "autograd":
            return slow
        return lambda vecs: self._verified(cx, cy, vecs, slow(vecs))

    def _verified(self, cx: Any, cy: Any, vecs: Sequence[Tensor], slow: Tensor) -> Tensor:
        """auto's first pass: the closed form on the same probes, kept if it agrees."""
        fast = layerwise.layerwise_sq_trace(self.local_model, self.loss_fn, cx, cy, probe_vectors=vecs)
        a, b = float(fast.detach()), float(slow.detach())
        if not (math.isfinite(a) and math.isfinite(b)):
            return slow  # nothing to compare: check again on the next pass
        rtol = {torch.float64: 1e-8, torch.float32: 1e-4}.get(slow.dtype, 1e-2)
        self._layerwise_agrees = abs(a - b) <= rtol * max(abs(a), abs(b))
        if not self._layerwise_agrees:
            warnings.warn(
                f"the layer-wise closed form gives Tr(H²) = {a:.6g} where autograd gives {b:.6g}: "
                "loss_fn is not a function of the model output alone (e.g. it adds a weight "
                "penalty), so this penalty uses autograd from now on; pass backend='autograd' "
                "to skip the check",
                RuntimeWarning,
                stacklevel=6,
            )
            return slow
        return fast

    def _estimate(
        self, cx: Any, cy: Any, params: list[Tensor], first: Tensor | None, prefix: SharedPrefix | None
    ) -> Tensor:
        """The Tr(H²) estimate with graph, by the chosen backend and estimator (inside the pass)."""
        model = self.local_model
        if self.backend == "kfac":
            return kfac_sq_trace(model, self.loss_fn, cx, cy, generator=self.generator, prefix=prefix)
        if self.estimator == "cv":
            if prefix is not None and prefix.source is cx and prefix.calls:
                first = prefix.calls[0].output  # the task forward's input-layer output
            engine = self._engine(cx, cy, params, first)
            linears = [m for m in model if type(m) is nn.Linear] if self._backend(cx) == "layerwise" else []
            return cv_sq_trace(
                model, self.loss_fn, cx, cy, self.probes, self.dist, generator=self.generator,
                sq_norm_mean=engine, prefix=prefix,
                # Gaussian: the closed form draws the input layer's block in the data's image
                drawn_by_engine=linears[0].weight if self.dist == "gaussian" and len(linears) > 1 else None,
            )
        if self.dist == "gaussian" and self._backend(cx) == "layerwise":
            # its own draw: the input layer's Gaussian block in the data's image (same law, cheaper)
            return layerwise.layerwise_sq_trace(
                model, self.loss_fn, cx, cy, self.probes, "gaussian", generator=self.generator,
                first_linear_output=first,
            )
        vecs = sample_probes(params, self.probes, self.dist, generator=self.generator)
        return self._engine(cx, cy, params, first)(vecs)

    def _finite_difference(
        self, cx: Any, cy: Any, params: list[Tensor], grad0: Sequence[Tensor] | None, kinks: FrozenKinks | None
    ) -> Tensor:
        """The first-order Tr(H²) estimate: its value, and its gradient through a surrogate."""
        probes = sample_probes(params, self.probes, self.dist, generator=self.generator)
        fd = fd_sq_trace(
            self.local_model, self.loss_fn, cx, cy, params, probes, h=self.fd_step, grad0=grad0,
            kinks=kinks, dropout=not self.eval_during_curvature,
        )
        if fd.grads is None:
            raise RuntimeError("the finite-difference estimator returned no gradient")
        return fd_surrogate(params, fd.values.mean(), fd.grads)

    def _penalty(
        self, x: Any, y: Any, first: Tensor | None, prefix: SharedPrefix | None,
        log: dict[str, float] | None, *, grad0: Sequence[Tensor] | None = None,
        kinks: FrozenKinks | None = None,
    ) -> Tensor:
        full_batch = batch_size_of(self.local_model, x)
        if full_batch == 0:
            raise ValueError("empty batch: x holds no samples")
        step = self.calls
        decision = self.policy.decide(step)
        self.calls += 1
        params = self.params
        if not params:
            raise ValueError("the model has no parameters that require grad")
        ref = params[0]
        if not decision.active:
            return torch.zeros((), device=ref.device, dtype=ref.dtype)
        cx, cy = self._curvature_batch(x, y)
        if first is not None:
            first = first[: batch_size(cx)]
        if prefix is not None and cx is not x and prefix.source is x:
            prefix = prefix.first_rows(cx)  # a sub-batch: the first rows of the shared prefix
        if self.backend == "finite-difference":  # its own passes (curvature_pass policy)
            with self._precision(ref.device.type, lambda: False):
                estimate = self._finite_difference(cx, cy, params, grad0, kinks)
        else:
            with curvature_pass(self.local_model, dropout=not self.eval_during_curvature), \
                    self._precision(ref.device.type, lambda: self._backend(cx) == "verify"):
                estimate = self._estimate(cx, cy, params, first, prefix)
        value = float(estimate.detach())
        ratio_control = getattr(self.policy, "needs_grad_norms", False)
        lam = float(self.policy.lam) if ratio_control else float(self.policy.decide(step).lam)
        # in the estimate's dtype: λ·Tr(H²)/B may overflow float32 where Tr(H²) does not
        penalty_value = float(lam * estimate.detach() / full_batch)
        if not (math.isfinite(value) and math.isfinite(penalty_value)):
            what = "Tr(H²) estimate" if not math.isfinite(value) else "penalty λ·Tr(H²)/B"
            shown = value if not math.isfinite(value) else penalty_value
            message = (
                f"non-finite {what} ({shown}) at call {self.calls - 1}; "
                "lower the learning rate or λ, or pass on_nonfinite='skip'"
            )
            if self.on_nonfinite == "raise":
                raise NonFiniteCurvatureError(message)
            warnings.warn(message + " (step skipped)", RuntimeWarning, stacklevel=3)
            return torch.zeros((), device=ref.device, dtype=ref.dtype)
        unit = estimate / full_batch
        if ratio_control:
            penalty = self._ratio_surrogate(unit, params, step, lam, prefix is not None or first is not None, log)
        else:
            lam = float(self.policy.update(step, sq_trace=value))
            penalty = lam * unit
            entry = self.policy.log[-1] if self.policy.log else {}
            if log is not None and entry.get("step") == step and "next_interval" in entry:
                log["lam_interval"] = float(entry["next_interval"])
                log["lam_spike"] = float(str(entry["reason"]).startswith("spike"))
        if log is not None and self._varying_lam:
            log["lam"] = lam
        self.last_lam = lam
        self.last_sq_trace = value
        self.last_penalty = lam * value / full_batch
        return penalty

    def _ratio_surrogate(
        self, unit: Tensor, params: list[Tensor], step: int, lam: float, shared: bool,
        log: dict[str, float] | None,
    ) -> Tensor:
        """λ·Tr(H²)/B for a gradient-ratio controller: value λ·P, gradient λ·g_P.

        g_P = ∇(Tr(H²)/B) is computed here, by the backward the penalty needs anyway (its graph
        is its own, so this is no extra work), and enters the loss through a surrogate whose
        gradient is λ·g_P. A hook on the parameters' gradients (``register_multi_grad_hook``)
        reads the step's backward: its gradient minus λ·g_P is the task gradient (plus any other
        term's), whose norm goes to the controller with ‖g_P‖ — O(d) work, no extra pass. The
        new λ applies from the next active step (λ = 0 on the first one: it only measures).
        Under DDP the hook sees this rank's gradients: each rank's controller follows its own.
        """
        grads = torch.autograd.grad(unit, params, allow_unused=True, retain_graph=shared)
        g_pen = [torch.zeros_like(p) if g is None else g.detach() for p, g in zip(params, grads)]
        pen_norm = float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in g_pen])))
        if self._pending_hook is not None:
            self._pending_hook.remove()

        def hook(step_grads: Sequence[Tensor | None]) -> None:
            handle, self._pending_hook = self._pending_hook, None
            if handle is not None:
                handle.remove()
            task = [g - lam * gp for g, gp in zip(step_grads, g_pen) if g is not None]
            task_norm = float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(t) for t in task]))) if task else 0.0
            self.policy.update(step, task_grad_norm=task_norm, penalty_grad_norm=pen_norm)
            if log is not None:
                log["task_grad_norm"] = task_norm
                log["penalty_grad_norm"] = pen_norm

        self._pending_hook = torch.autograd.graph.register_multi_grad_hook(params, hook, mode="all")
        linear = sum((p * (lam * g)).sum() for p, g in zip(params, g_pen))
        return lam * unit.detach() + linear - linear.detach()

    def state_dict(self) -> dict[str, Any]:
        """Schedule position, generator state and the closed-form check's verdict, to resume a
        run exactly."""
        return {
            "calls": self.calls,
            "generator": None if self.generator is None else self.generator.get_state(),
            "last_sq_trace": self.last_sq_trace,
            "layerwise_agrees": self._layerwise_agrees,
            "policy": self.policy.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the state of :meth:`state_dict` (resume a run exactly)."""
        self.calls = int(state["calls"])
        if state.get("generator") is not None:
            if self.generator is None:
                self.generator = torch.Generator(device="cpu")
            self.generator.set_state(state["generator"])
        self.last_sq_trace = state.get("last_sq_trace")
        self._layerwise_agrees = state.get("layerwise_agrees")
        if "policy" in state:
            self.policy.load_state_dict(state["policy"])

    def __repr__(self) -> str:
        return (
            f"FlatnessPenalty(lam={self.lam}, probes={self.probes}, every={self.every}, "
            f"dist={self.dist!r}, sub_batch={self.sub_batch}, backend={self.backend!r}, "
            f"estimator={self.estimator!r}, policy={self.policy!r})"
        )
