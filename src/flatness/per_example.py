r"""Per-example squared gradient norms :math:`\lVert \nabla_\theta \ell_i \rVert^2`: the one engine.

Used by the curvature method (differentiable: it back-propagates through the norms) and the
empirical Fisher trace (detached).

**Closed forms** (``impl="closed-form"``), from one forward pass and one backward pass to the
layer outputs. A layer :math:`z_{it} = W a_{it} + b` applied at T positions per example
(T = 1 for a ``Linear`` on (batch, features), the output pixels for a convolution, whose
:math:`a_{it}` are the unfolded input patches, BackPACK style) has the per-example gradient
:math:`\nabla_W \ell_i = \delta_i^\top A_i` with :math:`\delta_i = \partial \ell_i/\partial z_i`
(T × out) and :math:`A_i` (T × in), so

.. math::

    \lVert \nabla_W \ell_i \rVert^2 = \lVert \delta_i^\top A_i \rVert_F^2
        = \langle \delta_i \delta_i^\top, A_i A_i^\top \rangle_F,
    \qquad \lVert \nabla_b \ell_i \rVert^2 = \bigl\lVert \textstyle\sum_t \delta_{it} \bigr\rVert^2 .

The explicit route costs T·in·out per example, the Gram route T²·(in + out); the cheaper is
taken per layer (T = 1: :math:`\lVert\delta_i\rVert^2 \lVert a_i\rVert^2`, sparse CSR/COO inputs
stay sparse). A convolution's explicit route is one weight-gradient call with the batch as
groups, which never forms the unfolded patches (n·in·T numbers). Covered: ``nn.Linear`` and
:class:`flatness.layers.SparseLinear` (any batch-first input), ``nn.Conv1d``/``nn.Conv2d``
(stride, padding, dilation, groups; zero padding), and the affine parameters of BatchNorm
(:math:`\nabla_\gamma \ell_i = \sum_s \delta_{is} \hat x_{is}`).
Every parametrised layer must run once per forward; a layer whose input or output is modified
in place afterwards (``ReLU(inplace=True)``) is detected by its version counter and the pass is
re-run with the layer's input and output copied (the right value, one more forward).

**Fallback** (``impl="vmap"``, any model): ``torch.func.vmap(grad(...))`` over chunks of
examples (sparse inputs densified chunk by chunk; a loop over examples where torch.func cannot
transform an op). ``impl="auto"`` takes the closed form when it applies.

**BatchNorm with batch statistics** couples the examples of a batch, so the per-example losses
are not functions of one example each. The engine holds the batch statistics fixed: each such
layer normalises every example with the mean and (biased) variance of the whole batch, computed
in the same forward pass and treated as constants (detached) — the function value is the
train-mode one, the per-example gradients (and the curvature penalty's gradient) do not flow
through the statistics. BatchNorm with running statistics (eval mode) needs nothing special.

The model is run as it is (wrap the call in :func:`flatness.passes.curvature_pass` or
:func:`flatness.passes.measure_pass`). ``loss_fn`` is the batch mean (or sum) of per-example losses.

Example:
    >>> import torch
    >>> from torch import nn
    >>> from flatness.per_example import per_example_sq_grad_norms
    >>> model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8, 3)).double()
    >>> x, y = torch.randn(5, 1, 4, 4, dtype=torch.float64), torch.tensor([0, 1, 2, 0, 1])
    >>> fast = per_example_sq_grad_norms(model, nn.CrossEntropyLoss(), x, y)
    >>> slow = per_example_sq_grad_norms(model, nn.CrossEntropyLoss(), x, y, impl="vmap")
    >>> fast.impl, fast.sq_norms.shape, torch.allclose(fast.sq_norms, slow.sq_norms)
    ('closed-form', torch.Size([5]), True)
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from typing import Any, Literal, NamedTuple

import torch
from torch import Tensor, nn
from torch.func import functional_call, grad_and_value, vmap
from torch.nn.modules.batchnorm import _BatchNorm

from ._layer_sq_norms import (
    add_batchnorm_sq_norms,
    add_conv_sq_norms,
    add_linear_sq_norms,
    batch_stats,
    channel_view,
    normalised,
)
from .layers import LINEAR_TYPES
from .linear_io import SharedPrefix
from .passes import ExactNormDerivatives, math_attention
from .utils import batch_size, call_model

__all__ = [
    "Impl",
    "PER_EXAMPLE_IMPLS",
    "PerExampleNorms",
    "ClosedFormUnavailable",
    "InPlaceModification",
    "ClosedForm",
    "per_example_sq_grad_norms",
    "closed_form_sq_grad_norms",
    "vmap_sq_grad_norms",
    "coupling_batch_norms",
    "fixed_batch_statistics",
    "sum_scale",
]

LossFn = Callable[[Tensor, Any], Tensor]
Impl = Literal["auto", "closed-form", "vmap"]
PER_EXAMPLE_IMPLS: tuple[str, ...] = ("auto", "closed-form", "vmap")
PER_EXAMPLE_BUDGET = 1 << 25  # numbers of per-example gradients vmapped at once (128 MiB float32)
CONV_TYPES: tuple[type[nn.Module], ...] = (nn.Conv1d, nn.Conv2d)


class PerExampleNorms(NamedTuple):
    """The batch loss and the per-example squared gradient norms of one pass.

    ``loss``: the batch loss of the pass (``loss_fn``'s reduction); ``sq_norms``: (n,) per-example
    ‖∇θ ℓ_i‖²; ``impl``: ``"closed-form"`` or ``"vmap"``. Both tensors carry a graph when computed
    with ``create_graph=True``.
    """

    loss: Tensor
    sq_norms: Tensor
    impl: str


class ClosedFormUnavailable(ValueError):
    """The closed form does not apply to this model or input (the message says why)."""


def sum_scale(loss_fn: LossFn, n: int) -> float:
    """Factor turning the batch loss into Σ_i ℓ_i (n for a mean, 1 for a sum)."""
    reduction = getattr(loss_fn, "reduction", "mean")
    if reduction == "mean":
        return float(n)
    if reduction == "sum":
        return 1.0
    raise ValueError(f"loss_fn must reduce to a scalar ('mean' or 'sum'), got {reduction!r}")


# ----------------------------------------------------------------------------- BatchNorm


def coupling_batch_norms(model: nn.Module) -> list[_BatchNorm]:
    """BatchNorm layers that would normalise with batch statistics now (coupling examples)."""
    return [
        m for m in model.modules()
        if isinstance(m, _BatchNorm)
        and (m.training or (m.running_mean is None and m.running_var is None))
    ]


def _affine(m: _BatchNorm, xhat: Tensor) -> Tensor:
    if m.weight is not None:
        xhat = xhat * channel_view(m.weight, xhat)
    if m.bias is not None:
        xhat = xhat + channel_view(m.bias, xhat)
    return xhat


@contextlib.contextmanager
def fixed_batch_statistics(
    layers: Sequence[_BatchNorm], stats: dict[int, tuple[Tensor, Tensor]] | None = None
) -> Iterator[dict[int, tuple[Tensor, Tensor]]]:
    """``layers`` normalise with constant (detached) batch statistics for the body.

    Without ``stats`` each layer uses the mean and biased variance of its input batch and
    records them in the yielded dict (by ``id(layer)``); with ``stats`` it uses those (so that a
    vmapped pass over single examples sees the whole batch's). Running statistics are neither
    read nor written; the layers' own ``forward`` is restored on exit.
    """
    recorded: dict[int, tuple[Tensor, Tensor]] = {} if stats is None else stats

    def make_forward(m: _BatchNorm) -> Callable[[Tensor], Tensor]:
        def forward(a: Tensor) -> Tensor:
            if stats is None:
                recorded[id(m)] = batch_stats(a)
            mean, var = recorded[id(m)]
            return _affine(m, normalised(a, mean, var, m.eps))

        return forward

    try:
        for m in layers:
            m.forward = make_forward(m)  # type: ignore[method-assign]
        yield recorded
    finally:
        for m in layers:
            m.__dict__.pop("forward", None)


# ----------------------------------------------------------------------------- closed form


def _conv_geometry(m: nn.Module) -> tuple[tuple[int, int], ...]:
    """(kernel, stride, padding, dilation) of a Conv1d/2d as 2-D tuples for ``F.unfold``."""
    if m.padding_mode != "zeros":
        raise ClosedFormUnavailable(f"a convolution with padding_mode={m.padding_mode!r}")
    kernel, stride, dilation = m.kernel_size, m.stride, m.dilation
    if isinstance(m.padding, str):
        if m.padding == "valid":
            padding = (0,) * len(kernel)
        else:  # "same" (stride 1): symmetric only if every total padding is even
            totals = [d * (k - 1) for d, k in zip(dilation, kernel, strict=True)]
            if any(t % 2 for t in totals):
                raise ClosedFormUnavailable("a convolution with asymmetric 'same' padding")
            padding = tuple(t // 2 for t in totals)
    else:
        padding = m.padding
    if isinstance(m, nn.Conv1d):
        return (1, kernel[0]), (1, stride[0]), (0, padding[0]), (1, dilation[0])
    return tuple(kernel), tuple(stride), tuple(padding), tuple(dilation)  # type: ignore[return-value]


def _add_layer_sq_norms(sq: Tensor, m: nn.Module, a: Tensor, delta: Tensor, wanted: set[int]) -> Tensor:
    """``sq`` + ‖∇ ℓ_i‖² of each of ``m``'s wanted parameters, shape (n,)."""
    if isinstance(m, _BatchNorm):
        return add_batchnorm_sq_norms(sq, m, a, delta, wanted)
    if isinstance(m, CONV_TYPES):
        return add_conv_sq_norms(sq, m, a, delta, wanted, _conv_geometry(m))
    return add_linear_sq_norms(sq, m, a, delta, wanted)


def _covered_layers(model: nn.Module, params: Sequence[Tensor]) -> list[nn.Module]:
    wanted = {id(p) for p in params}
    layers: list[nn.Module] = []
    owner: dict[int, nn.Module] = {}
    for m in model.modules():
        if not isinstance(m, (*LINEAR_TYPES, *CONV_TYPES, _BatchNorm)):
            continue
        owned = [p for p in m.parameters(recurse=False) if id(p) in wanted]
        for p in owned:
            if id(p) in owner and owner[id(p)] is not m:
                raise ClosedFormUnavailable("a parameter is shared by two layers")
            owner[id(p)] = m
        if owned and m not in layers:
            layers.append(m)
    if set(owner) != wanted:
        raise ClosedFormUnavailable(
            "some trainable parameters do not belong to a layer with a closed form "
            "(nn.Linear, SparseLinear, nn.Conv1d/2d, BatchNorm)"
        )
    return layers


def _sequence_first(model: nn.Module) -> bool:
    return any(getattr(m, "batch_first", True) is False for m in model.modules())


@contextlib.contextmanager
def _recording(
    layers: Sequence[nn.Module], copy: bool
) -> Iterator[dict[nn.Module, list[tuple[Any, Tensor, int, int]]]]:
    """Forward hooks recording (input, output, their versions) per call of each layer.

    With ``copy`` the layer sees a copy of its input and the model a copy of its output, so that
    later in-place ops cannot change the recorded tensors.
    """
    records: dict[nn.Module, list[tuple[Any, Tensor, int, int]]] = {m: [] for m in layers}

    def pre_hook(module: nn.Module, inputs: tuple[Any, ...]) -> tuple[Any, ...] | None:
        if not inputs or not isinstance(inputs[0], Tensor) or inputs[0].layout != torch.strided:
            return None
        return (inputs[0].clone(), *inputs[1:])

    def hook(module: nn.Module, inputs: tuple[Any, ...], output: Any) -> Any:
        a = inputs[0] if inputs else None
        version = a._version if isinstance(a, Tensor) and a.layout == torch.strided else 0
        records[module].append((a, output, version, output._version))
        return output.clone() if copy else None

    handles = [m.register_forward_hook(hook) for m in layers]
    if copy:
        handles += [m.register_forward_pre_hook(pre_hook) for m in layers]
    try:
        yield records
    finally:
        for h in handles:
            h.remove()


class InPlaceModification(ClosedFormUnavailable):
    """A recorded layer input or output was modified in place after the layer ran."""


class ClosedForm:
    """Closed-form per-example norms of a forward pass the caller runs inside :meth:`record`.

    ``ClosedForm(model, params)`` raises :class:`ClosedFormUnavailable` for models it does not
    cover; :meth:`sq_norms` raises it for a pass it cannot use (a layer run twice, inputs that
    are not batch-first, or :class:`InPlaceModification`: record again with ``copy=True``).
    """

    def __init__(self, model: nn.Module, params: Sequence[Tensor] | None = None) -> None:
        self.model = model
        params = _trainable(model) if params is None else list(params)
        self.wanted = {id(p) for p in params}
        self.layers = _covered_layers(model, params)
        self._records: dict[nn.Module, list[tuple[Any, Tensor, int, int]]] = {}

    @contextlib.contextmanager
    def record(self, copy: bool = False, prefix: SharedPrefix | None = None) -> Iterator[None]:
        """Record the covered layers' inputs and outputs of the forward pass in the body.

        Train-mode BatchNorm runs on fixed batch statistics (see the module docs). A ``prefix``
        recorded in another pass (:func:`flatness.linear_io.share_prefix`) stands for its layers'
        calls: the body runs the rest of the model from the prefix's output.
        """
        with _recording(self.layers, copy) as records, \
                fixed_batch_statistics(coupling_batch_norms(self.model)):
            for c in prefix.calls if prefix is not None else ():
                version = c.inputs._version if c.inputs.layout == torch.strided else 0
                records.get(c.module, []).append((c.inputs, c.output, version, c.output._version))
            self._records = records
            yield

    def sq_norms(self, loss: Tensor, loss_fn: LossFn, n: int, *, create_graph: bool) -> Tensor:
        """‖∇θ ℓ_i‖² (n,) from the recorded pass whose batch loss is ``loss``."""
        inputs, outputs = [], []
        for m in self.layers:
            calls = self._records.get(m, [])
            if len(calls) != 1:
                raise ClosedFormUnavailable(
                    f"a {type(m).__name__} layer ran {len(calls)} times in one forward"
                )
            a, z, a_version, z_version = calls[0]
            if not isinstance(a, Tensor) or not isinstance(z, Tensor) or a.shape[0] != n or z.shape[0] != n:
                raise ClosedFormUnavailable("the closed form needs batch-first layer inputs and outputs")
            if isinstance(m, LINEAR_TYPES) and a.dim() > 2 and _sequence_first(self.model):
                raise ClosedFormUnavailable("a sequence-first module: the batch is not the first dimension")
            if z._version != z_version or (a.layout == torch.strided and a._version != a_version):
                raise InPlaceModification("a layer's input or output was modified in place")
            inputs.append(a)
            outputs.append(z)
        deltas = torch.autograd.grad(
            loss * sum_scale(loss_fn, n), outputs, create_graph=create_graph, allow_unused=True
        )
        sq = torch.zeros(n, dtype=loss.dtype, device=loss.device)
        with torch.set_grad_enabled(create_graph):
            for m, a, delta in zip(self.layers, inputs, deltas, strict=True):
                if delta is None:  # this layer does not reach the loss: zero gradient
                    continue
                sq = _add_layer_sq_norms(sq, m, a if create_graph else a.detach(), delta, self.wanted)
        return sq


def closed_form_sq_grad_norms(
    model: nn.Module, loss_fn: LossFn, x: Any, y: Any,
    params: Sequence[Tensor] | None = None, *, create_graph: bool = False,
) -> tuple[Tensor, Tensor]:
    """(batch loss, ‖∇θ ℓ_i‖² per example) by the closed forms (module docs).

    Raises :class:`ClosedFormUnavailable` (naming the reason) where they do not apply. A pass
    whose layer inputs or outputs are modified in place is run again on copies.
    """
    closed = ClosedForm(model, params)
    n = batch_size(x)
    with closed.record():
        loss = loss_fn(call_model(model, x), y)
    try:
        return loss, closed.sq_norms(loss, loss_fn, n, create_graph=create_graph)
    except InPlaceModification:  # e.g. ReLU(inplace=True) after a layer: again, on copies
        pass
    with closed.record(copy=True):
        loss = loss_fn(call_model(model, x), y)
    return loss, closed.sq_norms(loss, loss_fn, n, create_graph=create_graph)


# ----------------------------------------------------------------------------- vmap fallback


def _trainable(model: nn.Module) -> list[Tensor]:
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("the model has no parameters that require grad")
    return params


def _rows(x: Any, start: int, stop: int) -> Any:
    """Examples [start, stop) of ``x``, sparse tensors densified."""
    if isinstance(x, Tensor):
        if x.layout == torch.sparse_csr or x.is_sparse:
            coo = x.to_sparse_coo() if x.layout == torch.sparse_csr else x
            return coo.index_select(0, torch.arange(start, stop, device=x.device)).to_dense()
        return x[start:stop]
    if isinstance(x, (tuple, list)):
        return type(x)(_rows(t, start, stop) for t in x)
    if isinstance(x, dict):
        return {k: _rows(v, start, stop) for k, v in x.items()}
    return x


def _unsqueeze0(x: Any) -> Any:
    if isinstance(x, Tensor):
        return x.unsqueeze(0)
    if isinstance(x, (tuple, list)):
        return type(x)(_unsqueeze0(t) for t in x)
    if isinstance(x, dict):
        return {k: _unsqueeze0(v) for k, v in x.items()}
    return x


def _call_at(model: nn.Module, params: dict[str, Tensor], x: Any) -> Tensor:
    if isinstance(x, tuple):
        return functional_call(model, params, x)
    if isinstance(x, dict):
        return functional_call(model, params, (), x)
    return functional_call(model, params, (x,))


_TRANSFORM_MESSAGES = ("vmap", "transform", "batching rule", "functorch")


def _transform_limitation(exc: BaseException) -> bool:
    """Whether ``exc`` says torch.func cannot transform an op.

    Such as ``.item()``, data-dependent control flow, in-place ops on captured tensors, a missing
    batching rule.
    """
    text = str(exc).lower()
    return any(m in text for m in _TRANSFORM_MESSAGES)


def _loop_chunk(
    model: nn.Module, loss_fn: LossFn, named: dict[str, Tensor], xs: Any, ys: Any, m: int,
    create_graph: bool,
) -> tuple[Tensor, Tensor]:
    """(per-example losses, sq norms) one example at a time: ops without a batching rule."""
    if not create_graph:  # fresh leaves to differentiate in (``named`` holds detached tensors)
        named = {k: v.detach().requires_grad_(True) for k, v in named.items()}
    params = list(named.values())
    losses, sqs = [], []
    for i in range(m):
        with torch.enable_grad():
            loss = loss_fn(_call_at(model, named, _rows(xs, i, i + 1)), _rows(ys, i, i + 1))
            grads = torch.autograd.grad(loss, params, create_graph=create_graph, allow_unused=True)
        sqs.append(sum((g.square().sum() for g in grads if g is not None), loss.new_zeros(())))
        losses.append(loss)
    return torch.stack(losses), torch.stack(sqs)


def vmap_sq_grad_norms(
    model: nn.Module, loss_fn: LossFn, x: Any, y: Any,
    params: Sequence[Tensor] | None = None, *, create_graph: bool = False, chunk: int | None = None,
) -> tuple[Tensor, Tensor]:
    """(batch loss, ‖∇θ ℓ_i‖² per example) from per-example gradients; any model.

    ``chunk`` examples are vmapped at once (default: as many as keep the per-example gradients
    under about 2²⁵ numbers, at most 64); sparse inputs are densified one chunk at a time.
    """
    params = _trainable(model) if params is None else list(params)
    wanted = {id(p) for p in params}
    named = {name: p for name, p in model.named_parameters() if id(p) in wanted}
    if len(named) != len(wanted):
        raise ValueError("params must be trainable parameters of the model")
    if not create_graph:
        named = {name: p.detach() for name, p in named.items()}
    n = batch_size(x)
    if chunk is None:
        chunk = max(1, min(64, PER_EXAMPLE_BUDGET // sum(p.numel() for p in named.values())))
    coupled = coupling_batch_norms(model)
    stats = None
    if coupled:  # the whole batch's statistics, for every example's pass
        with torch.no_grad(), fixed_batch_statistics(coupled) as stats:
            call_model(model, x)

    def example_loss(p: dict[str, Tensor], xi: Any, yi: Any) -> Tensor:
        return loss_fn(_call_at(model, p, _unsqueeze0(xi)), _unsqueeze0(yi))

    per_example = vmap(grad_and_value(example_loss), in_dims=(None, 0, 0), randomness="different")
    losses, sqs = [], []
    # the math attention kernel: the fused ones lack batching rules (and double backward);
    # differentiated, fused layer norm's batched backward rule is wrong (pytorch/functorch#534:
    # a gradient entry 1.4 % off on a Linear-LayerNorm-Linear net), so norms from primitives
    composite = ExactNormDerivatives() if create_graph else contextlib.nullcontext()
    with fixed_batch_statistics(coupled, stats), math_attention(), composite:
        for start in range(0, n, chunk):
            stop = min(n, start + chunk)
            xs, ys = _rows(x, start, stop), _rows(y, start, stop)
            with torch.set_grad_enabled(create_graph):
                try:
                    grads, loss_i = per_example(named, xs, ys)
                    sq = sum(g.flatten(1).square().sum(dim=1) for g in grads.values())
                except (RuntimeError, NotImplementedError) as exc:
                    if not _transform_limitation(exc):
                        raise  # the model's own error, not vmap's
                    loss_i, sq = _loop_chunk(model, loss_fn, named, xs, ys, stop - start, create_graph)
            losses.append(loss_i)
            sqs.append(sq)
    loss = torch.cat(losses).sum() / sum_scale(loss_fn, n)
    return loss, torch.cat(sqs)


# ----------------------------------------------------------------------------- entry point


def per_example_sq_grad_norms(
    model: nn.Module,
    loss_fn: LossFn,
    x: Any,
    y: Any,
    params: Sequence[Tensor] | None = None,
    *,
    impl: Impl = "auto",
    create_graph: bool = False,
    chunk: int | None = None,
) -> PerExampleNorms:
    """‖∇θ ℓ(f(x_i), y_i)‖² for every example of the batch, and the batch loss.

    Args:
        model: the network.
        loss_fn: ``loss_fn(model(x), y)``, the batch mean (or sum) of per-example losses.
        x: the batch's inputs.
        y: the batch's targets.
        params: the parameters the gradient is taken in (default: all trainable ones).
        impl: ``"auto"`` (the closed form where it applies, else vmap), ``"closed-form"``
            (:class:`ClosedFormUnavailable` where it does not apply) or ``"vmap"``.
        create_graph: keep the graph (to differentiate the norms); else detached.
        chunk: examples per vmap call (the fallback).
    """
    if impl not in PER_EXAMPLE_IMPLS:
        raise ValueError(f"impl must be one of {PER_EXAMPLE_IMPLS}, got {impl!r}")
    sum_scale(loss_fn, 1)  # refuses unreduced losses before any work
    if impl != "vmap":
        try:
            loss, sq = closed_form_sq_grad_norms(model, loss_fn, x, y, params, create_graph=create_graph)
            return PerExampleNorms(loss, sq, "closed-form")
        except ClosedFormUnavailable:
            if impl == "closed-form":
                raise
    loss, sq = vmap_sq_grad_norms(model, loss_fn, x, y, params, create_graph=create_graph, chunk=chunk)
    return PerExampleNorms(loss, sq, "vmap")

