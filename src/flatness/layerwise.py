r"""Closed-form, layer-by-layer Tr(H²) estimate for stacks of Linear layers and activations.

Same estimate as :func:`flatness.sq_trace` (same probes give the same number up to rounding, and
the same gradient), computed with the structure of the network instead of generic double
backward — BackPACK-style. For a probe v, H v is the directional derivative of the gradient,
ġ = d/dε ∇L(θ + εv). Propagating tangents through the explicit backward pass of an MLP gives,
for a Linear layer with input X, output pre-activation Z = X Wᵀ + b and back-propagated signal
δ = ∂L/∂Z:

.. math::

    (Hv)_W = \dot\delta^\top X + \delta^\top \dot X, \qquad (Hv)_b = \textstyle\sum_i \dot\delta_i,

with the tangents Ż = Ẋ Wᵀ + X V_Wᵀ + v_b, Ẋ = σ'(Z)⊙Ż, δ̇ = σ'(Z)⊙(δ̇_next W + δ_next V)
+ σ''(Z)⊙Ż⊙(δ_next W), and δ̇ at the output = (∂²L/∂out²)·Ż_out by autograd (any loss).
For the input layer Ẋ = 0, so ‖(Hv)_W‖² = ⟨δ̇ δ̇ᵀ, X Xᵀ⟩: the B×B Gram matrix of the data
replaces the d_out×d_in product. The only per-probe work on the wide input layer is X V_Wᵀ, a
constant that needs no backward. Autograd then differentiates the result (the penalty's
third-order gradient) through these small tensors.

Supported (:func:`unsupported_reason` says why not, :func:`supports` whether): a model of exactly
the type :class:`torch.nn.Sequential` (a subclass may override ``forward``) of modules of exactly
the types ``Linear``, ``ReLU``, ``LeakyReLU``, ``Tanh``, ``Sigmoid``, ``Identity``, ``Flatten``
(``start_dim=1`` before the first Linear) and ``Dropout`` (identity in eval mode, the paper's
curvature pass), each used once, with no shared parameter, no forward or backward hook on any
module and no global module hook, on a dense input that is 2-D where it meets the first Linear.
What the structure cannot show is that the loss depends on the model output only (a loss that
adds, say, an L2 term on the weights has a different Hessian): the estimate assumes it, and
:class:`flatness.FlatnessPenalty` checks it against autograd on its first call.

In training, the task loss (train mode) and the curvature pass (eval mode) differ only after the
first Linear: :meth:`flatness.FlatnessPenalty.sharing_first_layer` hands the task loss's first
Linear output to ``layerwise_sq_trace(first_linear_output=...)``, which saves one input-layer
product forward and one backward.

Gaussian probes are drawn in the data's image (:func:`input_tangent_in_image`): the estimate
depends on the input layer's probe block V only through X Vᵀ, whose columns are independent
N(0, X Xᵀ) when V's entries are i.i.d. N(0, 1). Drawing them as L ξ with L Lᵀ = X Xᵀ gives an
estimate with exactly the distribution of Gaussian Hutchinson's, without the B × d_in × d_out
product and the d_in × d_out normal draws per probe — the largest cost of a curvature step on the
paper's MLP. The draws then differ from :func:`flatness.sample_probes`' for the same seed; pass
``probe_vectors`` for identical probes on both paths.

Example:
    >>> import torch
    >>> from torch import nn
    >>> from flatness import sample_probes, sq_trace
    >>> from flatness.layerwise import layerwise_sq_trace
    >>> model = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3)).double().eval()
    >>> x, y = torch.randn(4, 5, dtype=torch.float64), torch.tensor([0, 1, 2, 1])
    >>> loss_fn = nn.CrossEntropyLoss()
    >>> params = list(model.parameters())
    >>> v = sample_probes(params, 3, seed=0)
    >>> fast = layerwise_sq_trace(model, loss_fn, x, y, probe_vectors=v)
    >>> slow = sq_trace(loss_fn(model(x), y), params, probe_vectors=v)
    >>> bool(torch.isclose(fast, slow, rtol=1e-10))
    True
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.modules import module as _module_globals

from .probes import Distribution, draw, make_generator, sample_probes

__all__ = [
    "first_linear",
    "input_tangent_in_image",
    "layerwise_sq_trace",
    "supports",
    "unsupported_reason",
]

_ACTIVATIONS: tuple[type[nn.Module], ...] = (nn.ReLU, nn.LeakyReLU, nn.Tanh, nn.Sigmoid)
_PASSTHROUGH: tuple[type[nn.Module], ...] = (nn.Identity, nn.Dropout, nn.Flatten)
_HOOK_DICTS = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")
_GLOBAL_HOOKS = ("_global_forward_hooks", "_global_forward_pre_hooks", "_global_backward_hooks",
                 "_global_backward_pre_hooks")


def _hook_reason(model: nn.Module) -> str | None:
    for name in _GLOBAL_HOOKS:
        if getattr(_module_globals, name, None):
            return f"a global module hook is registered ({name.strip('_')})"
    for mod_name, module in model.named_modules():
        for name in _HOOK_DICTS:
            if getattr(module, name, None):
                where = f"module {mod_name!r}" if mod_name else "the model"
                return f"{where} has a {name.strip('_').replace('_', ' ')[:-1]}"
    return None


def unsupported_reason(
    model: nn.Module, x: Any, params: Sequence[Tensor] | None = None
) -> str | None:
    """Why :func:`layerwise_sq_trace` cannot compute ``model``'s function on ``x``, or ``None``.

    The checks are structural (see the module docstring); dropout counts as active when its
    module is in training mode with ``p > 0``.
    """
    if type(model) is not nn.Sequential:
        return f"the model is a {type(model).__name__}, not exactly an nn.Sequential"
    if not isinstance(x, Tensor) or x.layout != torch.strided:
        return "the input is not a dense tensor"
    modules = list(model)
    if len({id(m) for m in modules}) != len(modules):
        return "a module is used twice"
    return _hook_reason(model) or _modules_reason(modules, x.dim()) or _params_reason(model, params)


def _modules_reason(modules: list[nn.Module], ndim: int) -> str | None:
    """Why the closed form does not cover the modules in this order (on an ``ndim``-D input), or ``None``."""
    seen_linear = False
    for i, m in enumerate(modules):
        kind = type(m)
        if kind not in (nn.Linear, *_ACTIVATIONS, *_PASSTHROUGH):
            return f"module {i} is a {kind.__name__}, which the closed form does not cover"
        if kind is nn.Dropout and m.training and m.p > 0:
            return f"module {i} is a Dropout in training mode"
        if kind is nn.Flatten:
            if seen_linear:
                return f"module {i} is a Flatten after a Linear"
            if (m.start_dim, m.end_dim) != (1, -1):
                return f"module {i} is a Flatten that does not keep the batch dimension alone"
            ndim = 2
        if kind is nn.Linear and not seen_linear:
            seen_linear = True
            if ndim != 2:
                return f"the first Linear gets a {ndim}-D input; only (batch, features) is covered"
    return None if seen_linear else "the model has no Linear layer"


def _params_reason(model: nn.Module, params: Sequence[Tensor] | None) -> str | None:
    """Why the closed form does not cover ``model``'s parameters (or ``params`` of them), or ``None``."""
    model_params = list(model.parameters())
    if len(list(model.named_parameters(remove_duplicate=False))) != len(model_params):
        return "a parameter is shared between layers"
    if not all(p.requires_grad for p in model_params):
        return "some parameters do not require grad"
    if params is not None:
        given = list(params)
        if len(given) != len(model_params) or any(a is not b for a, b in zip(given, model_params, strict=True)):
            return "params is not the list of all the model's parameters"
    return None


def supports(model: nn.Module, x: Any, params: Sequence[Tensor] | None = None) -> bool:
    """Whether :func:`layerwise_sq_trace` applies to ``model`` on input ``x``.

    :func:`unsupported_reason` says why not.
    """
    return unsupported_reason(model, x, params) is None


def first_linear(model: nn.Sequential) -> int:
    """The index of the first ``nn.Linear`` module of ``model``."""
    return next(i for i, m in enumerate(model) if type(m) is nn.Linear)


def _cross_entropy_closed_form(
    loss_fn: Callable[[Tensor, Any], Tensor], out: Tensor, y: Any
) -> tuple[Tensor, Tensor] | None:
    """(softmax(out), per-row weights) where ``loss_fn`` is exactly a plain ``nn.CrossEntropyLoss``; otherwise None.

    Plain: mean reduction, no class weights and no label smoothing, on logits ``out`` (B, C) and
    class ids ``y`` (B,). The weights are 1/n on the n rows whose label is not ``ignore_index`` and
    0 on the others (the loss's mean; all 0 when every label is ignored, where torch's own backward
    gives zero gradients), so that ∂L/∂out = w ⊙ (p - onehot(y)) and the Hessian applied to ż is w ⊙
    (p ⊙ ż - p (pᵀż)) — with no host synchronisation.
    """
    if not (
        type(loss_fn) is nn.CrossEntropyLoss and loss_fn.weight is None and loss_fn.label_smoothing == 0.0
        and loss_fn.reduction == "mean" and out.dim() == 2 and out.is_floating_point()
        and isinstance(y, Tensor) and y.dim() == 1 and y.dtype == torch.int64
        and y.shape[0] == out.shape[0] and y.device == out.device
    ):
        return None
    kept = y != loss_fn.ignore_index
    weights = kept.to(out.dtype) / kept.sum().clamp_min(1)  # all ignored: zero, as torch's backward
    return torch.softmax(out, dim=1), weights.unsqueeze(1)


def _act_derivatives(m: nn.Module, z: Tensor) -> tuple[Tensor, Tensor, Tensor | None]:
    """(σ(z), σ'(z), σ''(z)) of an activation module; σ'' is None where it vanishes a.e.

    The derivatives of ReLU and LeakyReLU are taken from z before the module runs (an in-place
    module overwrites z).
    """
    if type(m) is nn.ReLU:
        d1 = (z > 0).to(z.dtype)
        return m(z), d1, None
    if type(m) is nn.LeakyReLU:
        slope = m.negative_slope
        d1 = (z > 0).to(z.dtype) * (1 - slope) + slope
        return m(z), d1, None
    out = m(z)
    if type(m) is nn.Tanh:
        d1 = 1 - out * out
        return out, d1, -2 * out * d1
    d1 = out * (1 - out)  # Sigmoid
    return out, d1, d1 * (1 - 2 * out)


@dataclass
class _Linear:
    module: nn.Linear
    x: Tensor  # layer input (B, d_in)
    x_dot: Tensor | None = None  # its tangent (M, B, d_in); None where the input is the data


@dataclass
class _Act:
    d1: Tensor  # σ'(z)
    d2: Tensor | None  # σ''(z), None where it vanishes almost everywhere
    z_dot: Tensor | None = None  # tangent of the activation's input z


def _frobenius_sq(
    u: Tensor, x: Tensor, g: Tensor | None, x_dot: Tensor | None, gram: Tensor | None = None
) -> Tensor:
    """Σ_j ‖u_jᵀ x + gᵀ ẋ_j‖²_F by the cheaper of the explicit and the Gram route.

    u: (M, B, d_out), x: (B, d_in), g: (B, d_out), ẋ: (M, B, d_in). The Gram route expands
    ‖uᵀx + gᵀẋ‖² = ⟨u uᵀ, x xᵀ⟩ + 2⟨u gᵀ, x ẋᵀ⟩ + ⟨g gᵀ, ẋ ẋᵀ⟩ into B × B matrices, with x xᵀ
    and g gᵀ shared by the probes: O(B²(d_in + d_out)) per probe instead of O(B d_in d_out).
    ``gram``: x xᵀ if already computed.
    """
    m, b, d_out = u.shape
    d_in = x.shape[1]
    if x_dot is None:
        if b * d_in + m * b * d_out < m * d_out * d_in:
            return (torch.matmul(u, u.transpose(1, 2)) * (x @ x.T if gram is None else gram)).sum()
        return torch.matmul(u.transpose(1, 2), x).pow(2).sum()
    assert g is not None
    # multiply-adds: Gram 2MB²(d_in + d_out) + B²(d_in + d_out) shared; explicit 2MB d_in d_out
    if b * (d_in + d_out) * (2 * m + 1) < 2 * m * d_out * d_in:
        uu = torch.matmul(u, u.transpose(1, 2))
        ug = torch.matmul(u, g.T)
        xd = torch.matmul(x, x_dot.transpose(1, 2))
        dd = torch.matmul(x_dot, x_dot.transpose(1, 2))
        return (uu * (x @ x.T)).sum() + 2 * (ug * xd).sum() + (dd * (g @ g.T)).sum()
    hv = torch.matmul(u.transpose(1, 2), x) + torch.matmul(g.T, x_dot)
    return hv.pow(2).sum()


def _probe_product(x: Tensor, v: Tensor) -> Tensor:
    """The products x v_jᵀ for every probe j as one matrix product: x (B, d_in), v (M, d_out, d_in) -> (M, B, d_out)."""
    m, d_out, d_in = v.shape
    return (x @ v.reshape(m * d_out, d_in).T).view(x.shape[0], m, d_out).transpose(0, 1)


def input_tangent_in_image(
    x: Tensor,
    num: int,
    d_out: int,
    generator: torch.Generator | None = None,
    gram: Tensor | None = None,
) -> Tensor:
    r"""X Vᵀ for ``num`` Gaussian probe blocks V (d_out × d_in) of a layer whose input X is data.

    .. math::

        X V^\top \overset{d}{=} L\,\Xi, \qquad L L^\top = X X^\top,\quad
        \Xi_{ij} \sim \mathcal{N}(0, 1)\ \text{i.i.d.}

    The d_out columns of X Vᵀ are independent N(0, X Xᵀ) vectors, and so are those of L Ξ: the
    same distribution from B × d_out normal draws and a B × B factor, instead of d_in × d_out
    draws and a B × d_in × d_out product (worth it when B < d_in). L is the Cholesky factor of
    X Xᵀ (in float64), or U Λ^{1/2} from its eigendecomposition when X Xᵀ is singular (repeated
    or zero rows). ``gram``: X Xᵀ if already computed. Returns ``(num, B, d_out)``.

    Example:
        >>> import torch
        >>> x = torch.randn(6, 40, dtype=torch.float64)
        >>> t = input_tangent_in_image(x, 20000, 3, torch.Generator().manual_seed(0))
        >>> cov = torch.einsum("mbj,mcj->bc", t, t) / (20000 * 3)  # → X Xᵀ
        >>> bool(((cov - x @ x.T).abs().max() / (x @ x.T).abs().max()) < 0.05)
        True
    """
    gram64 = (x @ x.T if gram is None else gram).detach().double()
    factor, info = torch.linalg.cholesky_ex(gram64)
    if int(info) != 0:  # singular X Xᵀ: any square root has the same Gaussian
        evals, evecs = torch.linalg.eigh(gram64)
        # Eigenvalues at rounding level belong to the null space: dropping them keeps repeated
        # rows' tangents equal (their noise directions would otherwise differ by ~√ε).
        null = evals <= gram64.shape[0] * torch.finfo(torch.float64).eps * evals.abs().max()
        factor = evecs * evals.masked_fill(null, 0.0).sqrt()
    xi = draw((num, x.shape[0], d_out), "gaussian", generator, x.device, x.dtype)
    return torch.matmul(factor.to(x.dtype), xi)


def _probe_blocks(
    model: nn.Sequential,
    x: Tensor,
    probes: int,
    dist: Distribution,
    generator: torch.Generator | None,
    seed: int | None,
    probe_vectors: Sequence[Tensor | None] | None,
) -> tuple[dict[int, Tensor], int, torch.Generator | None]:
    """The probe block of every parameter by ``id``, the number of probes and the generator of the rest.

    The input layer's weight is missing where it is drawn in the data's image.
    """
    params = list(model.parameters())
    first_weight = model[first_linear(model)].weight
    in_image = dist == "gaussian" and first_weight.shape[1] > x.shape[0]
    if probe_vectors is None:
        generator = make_generator(seed, generator)
        drawn = [p for p in params if not (in_image and p is first_weight)]
        drawn_vectors = sample_probes(drawn, probes, dist, generator)
        return {id(p): v for p, v in zip(drawn, drawn_vectors, strict=True)}, probes, generator
    if len(probe_vectors) != len(params):
        raise ValueError(f"probe_vectors has {len(probe_vectors)} blocks for {len(params)} parameters")
    if any(v is None and p is not first_weight for p, v in zip(params, probe_vectors, strict=True)):
        raise ValueError("only the first Linear's weight block may be None (drawn here)")
    vec_of = {id(p): v for p, v in zip(params, probe_vectors, strict=True) if v is not None}
    num = next(iter(vec_of.values())).shape[0] if vec_of else probes
    if id(first_weight) not in vec_of:
        generator = make_generator(seed, generator)
        if not in_image:  # drawn directly, after the given blocks
            vec_of[id(first_weight)] = draw(
                (num, *first_weight.shape), dist, generator, first_weight.device, first_weight.dtype
            )
    return vec_of, num, generator


def _primal_forward(
    model: nn.Sequential, x: Tensor, first_linear_output: Tensor | None
) -> tuple[list[_Linear | _Act | None], Tensor]:
    """The forward pass, keeping what the explicit backward needs.

    Modules before the first Linear act on the data (no tangent reaches them).
    """
    first = first_linear(model)
    records: list[_Linear | _Act | None] = []
    h = x
    for i, m in enumerate(model):
        if i < first:
            h = m(h)
            records.append(None)
        elif type(m) is nn.Linear:
            records.append(_Linear(m, h))
            h = first_linear_output if i == first and first_linear_output is not None else m(h)
        elif type(m) in _ACTIVATIONS:
            h, d1, d2 = _act_derivatives(m, h)
            records.append(_Act(d1, d2))
        else:  # Dropout (eval), Identity: identity
            h = m(h)
            records.append(None)
    return records, h


def _tangent_forward(
    model: nn.Sequential, records: list[_Linear | _Act | None], vec_of: dict[int, Tensor], num: int,
    generator: torch.Generator | None,
) -> tuple[Tensor, Tensor | None]:
    """Ż_out along the M probes, and the input layer's X Xᵀ where the image draw computed it.

    Ż = Ẋ Wᵀ + X V_Wᵀ + v_b, Ẋ = σ'(Z) ⊙ Ż.
    """
    t: Tensor | None = None  # None: the tangent is zero (we are still at the data)
    gram: Tensor | None = None
    for m, rec in zip(model, records, strict=True):
        if isinstance(rec, _Linear):
            rec.x_dot = t
            if t is None and id(m.weight) not in vec_of:  # the input layer, Gaussian in its image
                gram = rec.x @ rec.x.T
                tz = input_tangent_in_image(rec.x, num, m.out_features, generator, gram)
            else:
                tz = _probe_product(rec.x, vec_of[id(m.weight)])  # a constant on the first layer
            if t is not None:
                tz = tz + torch.matmul(t, m.weight.T)
            if m.bias is not None:
                tz = tz + vec_of[id(m.bias)].unsqueeze(1)
            t = tz.contiguous()
        elif isinstance(rec, _Act):
            rec.z_dot = t
            t = rec.d1 * t
    assert t is not None  # the model has a Linear layer
    return t, gram


def _output_signals(loss_fn: Callable[[Tensor, Any], Tensor], out: Tensor, y: Any, t: Tensor) -> tuple[Tensor, Tensor]:
    """(g, ġ): ∂L/∂out and the loss Hessian w.r.t. the output applied to Ż_out.

    For the plain cross-entropy g = w ⊙ (p - onehot(y)) and w ⊙ (diag(p) - p pᵀ) Ż per row (an
    out-of-range label fails in scatter), for any other loss by double backward.
    """
    closed = _cross_entropy_closed_form(loss_fn, out, y)
    if closed is not None:
        probs, row_weights = closed
        labels = torch.where(y == loss_fn.ignore_index, 0, y).unsqueeze(1)  # type: ignore[attr-defined]
        g = (probs - torch.zeros_like(probs).scatter_(1, labels, 1.0)) * row_weights
        pt = probs * t
        return g, (pt - probs * pt.sum(-1, keepdim=True)) * row_weights
    loss = loss_fn(out, y)
    if not isinstance(loss, Tensor) or loss.dim() != 0:
        raise ValueError("loss must be a scalar tensor; reduce it (e.g. mean)")
    (g,) = torch.autograd.grad(loss, out, create_graph=True)  # ∂L/∂out, (B, d)
    (t_grad,) = torch.autograd.grad(g, out, grad_outputs=t, create_graph=True, is_grads_batched=True)
    return g, t_grad


def _backward_sq_norm(
    records: list[_Linear | _Act | None], g: Tensor, t_grad: Tensor, vec_of: dict[int, Tensor],
    gram: Tensor | None,
) -> Tensor:
    """Σ_j ‖H v_j‖² by the explicit backward of the primal (g) and tangent (ġ) signals.

    (Hv)_W = δ̇ᵀ X + δᵀ Ẋ, (Hv)_b = Σ_i δ̇_i, δ̇ = σ'(Z)⊙ġ + σ''(Z)⊙Ż⊙g.
    """
    # Which records still need the primal signal g from above: a curved activation (σ'' ≠ 0)
    # or a Linear with a tangent input lies below them. (Below a ReLU net's second layer
    # nothing does: its g @ W would be computed for nothing.)
    g_needed_below: list[bool] = []
    needed = False
    for rec in records:
        g_needed_below.append(needed)
        needed = needed or (isinstance(rec, _Act) and rec.d2 is not None) or (
            isinstance(rec, _Linear) and rec.x_dot is not None)
    total = torch.zeros((), dtype=t_grad.dtype, device=t_grad.device)
    signal: Tensor | None = g
    for i in reversed(range(len(records))):
        rec = records[i]
        if isinstance(rec, _Act):
            new_t = rec.d1 * t_grad
            if rec.d2 is not None:
                new_t = new_t + rec.d2 * rec.z_dot * signal
            t_grad, signal = new_t, (rec.d1 * signal if g_needed_below[i] else None)
        elif isinstance(rec, _Linear):
            lin = rec.module
            total = total + _frobenius_sq(t_grad, rec.x, signal, rec.x_dot, gram if rec.x_dot is None else None)
            if lin.bias is not None:
                total = total + t_grad.sum(1).pow(2).sum()
            if rec.x_dot is None:  # the input is the data: nothing below needs a signal
                break
            t_grad = torch.matmul(t_grad, lin.weight) + torch.matmul(signal, vec_of[id(lin.weight)])
            signal = signal @ lin.weight if g_needed_below[i] else None
    return total


def layerwise_sq_trace(
    model: nn.Sequential,
    loss_fn: Callable[[Tensor, Any], Tensor],
    x: Tensor,
    y: Any,
    probes: int = 5,
    dist: Distribution = "rademacher",
    *,
    generator: torch.Generator | None = None,
    seed: int | None = None,
    probe_vectors: Sequence[Tensor | None] | None = None,
    first_linear_output: Tensor | None = None,
) -> Tensor:
    r"""(1/M) Σ_j ‖H v_j‖² for ``loss_fn(model(x), y)``, differentiable w.r.t. the parameters.

    The model is run as it is (call it inside :func:`flatness.eval_mode` for the paper's
    dropout-off curvature pass). Rademacher probes are drawn exactly as
    :func:`flatness.sample_probes` draws them for ``list(model.parameters())``, so a seed gives
    the same estimate on both paths. Gaussian probes are drawn so for every parameter but the
    first Linear's weight, whose block is drawn in the data's image when the batch is smaller
    than the layer's input width (:func:`input_tangent_in_image`: the same distribution of the
    estimate, other draws). ``probe_vectors``: explicit blocks, one per parameter; the first
    Linear's weight block may be ``None``, to be drawn here from ``generator``/``seed`` as above
    (how :func:`flatness.control_variate.cv_sq_trace` combines with the image draw).
    ``first_linear_output``: the first Linear's output on ``x``, already computed (and shared with
    the task loss, see :meth:`flatness.FlatnessPenalty.sharing`).

    Raises:
        ValueError: the model or input is not covered (the message says why), or a block other
            than the first Linear's weight is ``None``.
    """
    reason = unsupported_reason(model, x)
    if reason is not None:
        raise ValueError(f"layerwise_sq_trace cannot compute this model's Tr(H²): {reason}; "
                         "use flatness.sq_trace instead")
    vec_of, num, generator = _probe_blocks(model, x, probes, dist, generator, seed, probe_vectors)
    records, out = _primal_forward(model, x, first_linear_output)
    t, gram = _tangent_forward(model, records, vec_of, num, generator)
    g, t_grad = _output_signals(loss_fn, out, y, t)
    return _backward_sq_norm(records, g, t_grad, vec_of, gram) / num
