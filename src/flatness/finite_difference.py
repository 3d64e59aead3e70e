r"""First-order FA: Tr(H²) and its gradient from finite differences of ordinary gradients.

With :math:`g(\theta) = \nabla L(\theta)` on the curvature batch, a probe :math:`v` and
:math:`u = H v`, the Hutchinson term :math:`\lVert Hv\rVert^2` and its gradient
:math:`\nabla_\theta \lVert H(\theta) v\rVert^2 = 2\,T[v, u, \cdot\,]` (:math:`T = \nabla^3 L`)
are estimated by forward differences:

.. math::

    u \approx \frac{g(\theta + r v) - g(\theta)}{r}, \qquad
    T[v, u, \cdot\,] \approx
    \frac{g(\theta + s u + r v) - g(\theta + s u) - g(\theta + r v) + g(\theta)}{r\,s}.

One probe costs three gradient evaluations beyond :math:`g(\theta)` (which all probes share, and
which a training step can take from its own task gradient, see :func:`fd_sq_trace`), and no
double backward: the estimator works where autograd's second derivatives do not —
models compiled with ``torch.compile``, fused attention kernels — and its result is a gradient,
carried to the parameters by a surrogate term (:func:`surrogate`) so that one ``backward()`` (and
DDP's all-reduce) applies it. ReLU kinks are frozen at θ (:class:`FrozenKinks`), so that the
differences see the Hessian autograd defines. The errors are :math:`O(r + s)` truncation plus
rounding that grows like :math:`\varepsilon\lVert g\rVert / (r s)`; both vanish as the steps
shrink towards the optimum (``tests/test_finite_difference.py`` shows the convergence in float64).

**Step-size rule** (:func:`step_sizes`): each step moves θ by a fixed fraction of its norm,

.. math::

    r = h_v\,\frac{1 + \lVert\theta\rVert}{\lVert v\rVert}, \qquad
    s = h_u\,\frac{1 + \lVert\theta\rVert}{\lVert u\rVert},

so that the perturbation is scale-free (``1 +`` guards θ ≈ 0). :data:`RELATIVE_STEP` gives the
defaults by dtype. The loss varies fastest along u = Hv (the top curvature directions), so the
truncation error of the gradient is dominated by the step along u and :math:`h_u < h_v`. float32:
:math:`(h_v, h_u) = (3\cdot10^{-3}, 10^{-4})`, chosen on one batch of 64 random CIFAR-shaped images
at initialisation against a float64 reference — relative gradient error 2.9 % on ResNet-20 and
4.0 % on the small ViT (:math:`(10^{-2}, 10^{-2})`: 100 %+, truncation; :math:`(3\cdot10^{-3},
10^{-5})`: 24 % on ResNet-20, rounding), value error ≤ 1e-3. float64: :math:`(10^{-5}, 10^{-5})`.

Every evaluation runs under the curvature-pass policy (:func:`flatness.passes.curvature_pass`:
BatchNorm on batch statistics with running statistics untouched, dropout off; fused attention
kernels are kept — they need no double backward here), at shifted parameters through
:func:`torch.func.functional_call` (the model's own tensors are never modified), and from the same
random state.

Example:
    >>> import torch
    >>> from torch import nn
    >>> from flatness.probes import sample_probes
    >>> from flatness.hutchinson import sq_trace
    >>> from flatness.finite_difference import fd_sq_trace
    >>> _ = torch.manual_seed(0)
    >>> model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).double()
    >>> x, y = torch.randn(8, 4, dtype=torch.float64), torch.randint(0, 3, (8,))
    >>> params = list(model.parameters())
    >>> v = sample_probes(params, 2, seed=0)
    >>> fd = fd_sq_trace(model, nn.functional.cross_entropy, x, y, params, v)
    >>> exact = sq_trace(nn.functional.cross_entropy(model(x), y), params, probe_vectors=v)
    >>> abs(float(fd.values.mean()) / float(exact) - 1) < 1e-4
    True
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call
from torch.nn import functional as F
from torch.overrides import TorchFunctionMode

from .passes import curvature_pass

__all__ = [
    "RELATIVE_STEP",
    "FDEstimate",
    "relative_step",
    "step_sizes",
    "parameter_names",
    "same_function_in_train_mode",
    "FrozenKinks",
    "fd_sq_trace",
    "surrogate",
]

LossFn = Callable[[Tensor, Any], Tensor]

# (h_v, h_u) of the step-size rule by dtype (see the module docs); other dtypes use float32's.
RELATIVE_STEP: dict[torch.dtype, tuple[float, float]] = {
    torch.float64: (1e-5, 1e-5),
    torch.float32: (3e-3, 1e-4),
}


def relative_step(dtype: torch.dtype, h: float | tuple[float, float] | None = None) -> tuple[float, float]:
    """``(h_v, h_u)``: ``h`` (one number for both, or a pair), else the default for ``dtype``."""
    if h is None:
        return RELATIVE_STEP.get(dtype, RELATIVE_STEP[torch.float32])
    h_v, h_u = (h, h) if isinstance(h, (int, float)) else h
    if not (h_v > 0 and h_u > 0):
        raise ValueError(f"the relative steps must be > 0, got {h}")
    return float(h_v), float(h_u)


def _norm(tensors: Sequence[Tensor]) -> Tensor:
    return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(t) for t in tensors]))


def step_sizes(theta: Sequence[Tensor], direction: Sequence[Tensor], h: float) -> float:
    """The step along ``direction``: ``h·(1 + ‖θ‖)/‖direction‖`` (norms over all blocks)."""
    d = float(_norm(direction))
    if d == 0.0:
        return 0.0
    return h * (1.0 + float(_norm(theta))) / d


def parameter_names(model: nn.Module, params: Sequence[Tensor]) -> list[str]:
    """The name of each of ``params`` in ``model`` (``ValueError`` for a foreign tensor)."""
    by_id = {id(p): n for n, p in model.named_parameters()}
    missing = [i for i, p in enumerate(params) if id(p) not in by_id]
    if missing:
        raise ValueError(f"params {missing} are not parameters of the model")
    return [by_id[id(p)] for p in params]


def same_function_in_train_mode(model: nn.Module) -> bool:
    r"""Whether the model in its current modes computes the curvature pass's function.

    True when no module is stochastic in training: no ``nn.Dropout*`` with ``p > 0`` and no
    module with a positive float ``dropout`` attribute (``nn.MultiheadAttention``, ViT
    attention) in train mode. BatchNorm uses batch statistics in both. Then the task loss's
    gradient is the curvature pass's :math:`g(\theta)` and can be shared.
    """
    for m in model.modules():
        if not m.training:
            continue
        if isinstance(m, nn.modules.dropout._DropoutNd) and m.p > 0:
            return False
        rate = getattr(m, "dropout", None)
        if isinstance(rate, float) and rate > 0:
            return False
    return True


_RELU = {F.relu, F.relu_, torch.relu, torch.relu_, Tensor.relu, Tensor.relu_}
_LEAKY_RELU = {F.leaky_relu, F.leaky_relu_}
_IN_PLACE = {F.relu_, torch.relu_, Tensor.relu_, F.leaky_relu_}


class FrozenKinks(TorchFunctionMode):
    """ReLU and LeakyReLU with their kinks frozen at θ: what autograd's Hessian differentiates.

    Autograd takes ReLU'' = 0, i.e. the activation pattern of θ held fixed. A finite difference
    g(θ + r v) − g(θ) also sees the units whose sign flips within the step; each adds an O(1)
    jump, their number grows like r, so ‖Hv‖² would pick up a term growing like 1/r and the
    estimate would never converge. Under :meth:`recording` every ``relu``/``leaky_relu`` call
    (functional, tensor method or ``nn.ReLU``/``nn.LeakyReLU``) runs as usual and keeps its mask
    ``z > 0``, in call order; under :meth:`replaying` the same calls return ``z·mask`` (LeakyReLU:
    slope where the mask is off), a smooth function of θ whose derivatives at θ are autograd's.
    Other kinks (max-pooling, ``abs``, ``clamp``) are differenced as they are.
    """

    def __init__(self) -> None:
        super().__init__()
        self.masks: list[Tensor] = []
        self._replay = False
        self._position = 0
        self._recorded = False

    @property
    def recorded(self) -> bool:
        """A forward pass has been recorded (a model without ReLU records no mask at all)."""
        return self._recorded

    @contextlib.contextmanager
    def recording(self) -> Iterator[None]:
        """Run the forward pass as usual and record each ReLU's mask, in call order."""
        self.masks, self._replay, self._recorded = [], False, False
        with self:
            yield
        self._recorded = True

    @contextlib.contextmanager
    def replaying(self) -> Iterator[None]:
        """Run the forward pass with the recorded masks; ``RuntimeError`` if the ReLU calls differ."""
        self._replay, self._position = True, 0
        with self:
            yield
        if self._position != len(self.masks):
            raise RuntimeError(
                f"the forward pass called ReLU {self._position} times, {len(self.masks)} when recorded"
            )

    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        if func not in _RELU and func not in _LEAKY_RELU:
            return func(*args, **kwargs)
        z = args[0]
        if not self._replay:
            self.masks.append(z.detach() > 0)
            return func(*args, **kwargs)
        if self._position >= len(self.masks) or self.masks[self._position].shape != z.shape:
            raise RuntimeError("the forward pass's ReLU calls differ from the recorded ones")
        mask = self.masks[self._position]
        self._position += 1
        if func in _RELU:
            factor = mask.to(z.dtype)
            in_place = func in _IN_PLACE or bool(kwargs.get("inplace", args[1] if len(args) > 1 else False))
        else:
            slope = kwargs.get("negative_slope", args[1] if len(args) > 1 else 0.01)
            factor = torch.where(mask, 1.0, float(slope)).to(z.dtype)
            in_place = func in _IN_PLACE or bool(kwargs.get("inplace", args[2] if len(args) > 2 else False))
        return z.mul_(factor) if in_place else z * factor


@contextlib.contextmanager
def _replayed_rng(device: torch.device) -> Iterator[Callable[[], None]]:
    """Yields ``rewind()``, which resets torch's RNG (CPU and ``device``) to its state at entry.

    The state is put back on exit, so the evaluations draw the same numbers and consume none.
    """
    cpu = torch.get_rng_state()
    cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None

    def rewind() -> None:
        torch.set_rng_state(cpu)
        if cuda is not None:
            torch.cuda.set_rng_state(cuda, device)

    try:
        yield rewind
    finally:
        rewind()


def _call(model: nn.Module, params: dict[str, Tensor], x: Any) -> Tensor:
    if isinstance(x, tuple):
        return functional_call(model, params, x)
    if isinstance(x, dict):
        return functional_call(model, params, (), x)
    return functional_call(model, params, (x,))


@dataclass(frozen=True)
class FDEstimate:
    """Per-probe ‖H v_j‖² and the mean over probes of ∇‖H v_j‖² per parameter.

    ``values``: shape ``(M,)``, detached; ``grads``: ``None`` if not asked for; then the steps and
    the number of gradient evaluations made.
    """

    values: Tensor
    grads: list[Tensor] | None
    steps: list[tuple[float, float]]
    evaluations: int


def fd_sq_trace(
    model: nn.Module,
    loss_fn: LossFn,
    x: Any,
    y: Any,
    params: Sequence[Tensor],
    probe_vectors: Sequence[Tensor],
    *,
    h: float | tuple[float, float] | None = None,
    with_grad: bool = True,
    grad0: Sequence[Tensor] | None = None,
    policy: bool = True,
    dropout: bool = False,
    kinks: FrozenKinks | None = None,
    freeze_kinks: bool = True,
) -> FDEstimate:
    r"""‖H v_j‖² for each probe and, with ``with_grad``, the mean of 2·T[v_j, u_j, ·].

    Args:
        model: the network (not modified: shifted parameters go through ``functional_call``).
        loss_fn: ``loss_fn(model(x), y) -> scalar``.
        x: the curvature batch's inputs.
        y: the curvature batch's targets.
        params: the parameters θ (of ``model``) the Hessian is taken over; the others stay.
        probe_vectors: one ``(M, *p.shape)`` tensor per parameter.
        h: the relative steps ``(h_v, h_u)`` of :func:`step_sizes`, or one number for both
            (default: :data:`RELATIVE_STEP` of the parameters' dtype).
        with_grad: also estimate the gradient (3 evaluations per probe; else 1).
        grad0: :math:`g(\theta)` if already known (e.g. the task gradient, when
            :func:`same_function_in_train_mode`); computed otherwise (one evaluation).
        policy: evaluate under :func:`flatness.passes.curvature_pass` (with fused attention);
            ``False`` runs the model in the modes it is in.
        dropout: keep dropout on in the curvature pass (every evaluation then draws the same
            masks: they all start from the same random state).
        kinks: the ReLU masks at θ recorded with ``grad0`` (by the pass that computed it);
            recorded here otherwise (by the ``g(θ)`` evaluation, or a forward pass at θ).
        freeze_kinks: evaluate the shifted gradients with the ReLU kinks of θ
            (:class:`FrozenKinks`), the Hessian autograd defines; ``False`` differences the
            model as it is.
    """
    params = list(params)
    theta = [p.detach() for p in params]
    h_v, h_u = relative_step(theta[0].dtype, h)
    if freeze_kinks and kinks is None:
        kinks = FrozenKinks()
    elif not freeze_kinks:
        kinks = None
    ctx = (curvature_pass(model, dropout=dropout, attention_math=False, exact_norms=False) if policy
           else contextlib.nullcontext())
    with ctx, _replayed_rng(theta[0].device) as rewind:
        gradient = _ShiftedGradients(model, loss_fn, x, y, parameter_names(model, params), theta, kinks, rewind)
        if grad0 is None:
            g0 = gradient([])
        else:
            g0 = [g.detach() for g in grad0]
            gradient.record_kinks()
        values, total, steps = _probe_terms(gradient, theta, g0, probe_vectors, h_v, h_u, with_grad)
    return FDEstimate(torch.stack(values).detach(), total, steps, gradient.count)


class _ShiftedGradients:
    """g(θ + Σ scale·direction) at shifted parameters (``functional_call``).

    From the same random state every time, with the ReLU kinks of θ replayed; ``count`` evaluations
    so far.
    """

    def __init__(self, model: nn.Module, loss_fn: LossFn, x: Any, y: Any, names: list[str],
                 theta: list[Tensor], kinks: FrozenKinks | None, rewind: Callable[[], None]) -> None:
        self.model, self.loss_fn, self.x, self.y = model, loss_fn, x, y
        self.names, self.theta, self.kinks, self.rewind = names, theta, kinks, rewind
        self.count = 0

    def __call__(self, shifts: Sequence[tuple[float, Sequence[Tensor]]]) -> list[Tensor]:
        self.count += 1
        point = []
        for i, t in enumerate(self.theta):
            shifted = t.clone()
            for scale, d in shifts:
                shifted.add_(d[i], alpha=scale)
            point.append(shifted.requires_grad_())
        self.rewind()
        kinks = self.kinks
        frozen = kinks.replaying() if kinks is not None and shifts else contextlib.nullcontext()
        record = kinks.recording() if kinks is not None and not shifts else contextlib.nullcontext()
        with torch.enable_grad(), frozen, record:
            loss = self.loss_fn(_call(self.model, dict(zip(self.names, point, strict=True)), self.x), self.y)
        grads = torch.autograd.grad(loss, point, allow_unused=True)
        return [torch.zeros_like(t) if g is None else g for g, t in zip(grads, self.theta, strict=True)]

    def record_kinks(self) -> None:
        """The masks at θ by one forward pass, unless the pass that gave g(θ) recorded them."""
        if self.kinks is not None and not self.kinks.recorded:
            self.rewind()
            with torch.no_grad(), self.kinks.recording():
                _call(self.model, dict(zip(self.names, self.theta, strict=True)), self.x)


def _probe_terms(
    gradient: _ShiftedGradients, theta: list[Tensor], g0: list[Tensor], probe_vectors: Sequence[Tensor],
    h_v: float, h_u: float, with_grad: bool,
) -> tuple[list[Tensor], list[Tensor] | None, list[tuple[float, float]]]:
    """Per probe: ‖u‖² with u = (g(θ + r v) − g(θ))/r; and the steps (r, s) taken.

    With ``with_grad``, also the mean of the second differences 2·T[v, u, ·].
    """
    num = probe_vectors[0].shape[0]
    values: list[Tensor] = []
    total: list[Tensor] | None = [torch.zeros_like(t) for t in theta] if with_grad else None
    steps: list[tuple[float, float]] = []
    for j in range(num):
        v = [pv[j] for pv in probe_vectors]
        r = step_sizes(theta, v, h_v)
        if r == 0.0:  # an all-zero probe: H v = 0, no gradient
            values.append(torch.zeros((), device=theta[0].device, dtype=theta[0].dtype))
            steps.append((0.0, 0.0))
            continue
        g_r = gradient([(r, v)])
        u = [(a - b) / r for a, b in zip(g_r, g0, strict=True)]
        values.append(_norm(u).square())
        s = 0.0
        if total is not None:
            s = step_sizes(theta, u, h_u)
            if s > 0.0:
                g_s = gradient([(s, u)])
                g_rs = gradient([(s, u), (r, v)])
                for acc, a, b, c, d in zip(total, g_rs, g_s, g_r, g0, strict=True):
                    acc.add_((a - b - c + d) * (2.0 / (r * s * num)))
        steps.append((r, s))
    return values, total, steps


def surrogate(params: Sequence[Tensor], value: Tensor, grads: Sequence[Tensor]) -> Tensor:
    """A scalar equal to ``value`` whose gradient with respect to ``params`` is ``grads``.

    ``value + Σ_i ⟨p_i − stop_grad(p_i), G_i⟩``: the second term is exactly zero, its graph is
    one multiply-add per parameter (no double backward), and a ``backward()`` of a loss that
    contains it accumulates ``G_i`` into ``p_i.grad`` — through DDP's gradient hooks too.
    """
    terms = [((p - p.detach()) * g.to(p.dtype)).sum() for p, g in zip(params, grads, strict=True)]
    return value.detach() + torch.stack(terms).sum()
