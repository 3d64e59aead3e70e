r"""Which function an extra pass computes: the one policy for BatchNorm, dropout and attention.

A training step computes the task loss once, in train mode (the *main pass*: dropout draws its
mask, BatchNorm normalises with the batch's statistics and updates its running statistics).
Everything else a method evaluates on the same step is an *extra pass* — the FA penalty's
curvature pass, the curvature method's per-example pass, SAM's and GNP's perturbed pass, NRS's
neighbour pass — and follows one policy:

- **BatchNorm uses the statistics of the batch it sees** (what the task loss differentiates) and
  its running statistics and ``num_batches_tracked`` stay **bitwise unchanged** (an extra pass
  must not count as a second mini-batch): :func:`frozen_running_stats`. A norm layer the user
  keeps in eval mode (frozen BN) keeps normalising with its running statistics.
- **Curvature passes** (second-order: FA penalty, curvature method) also turn **dropout off**
  (the FA paper) and select PyTorch's math attention kernel, because the fused kernels (flash,
  memory-efficient, the CPU flash kernel) have no double backward: :func:`curvature_pass`.
  They also compute batch-statistics BatchNorm, LayerNorm and GroupNorm from primitive
  operations (:class:`ExactNormDerivatives`): PyTorch's fused norm kernels give correct first
  and second derivatives but silently wrong third ones (their saved statistics carry no
  autograd history; pytorch/pytorch#186256, #175754, reproduced on torch 2.13), and the
  gradient of the FA penalty ‖Hv‖² is a third derivative.
- **Perturbed passes** (SAM, GNP, NRS) keep dropout but replay the main pass's mask (see
  :class:`flatness.methods.perturb.RandomReplay`), and freeze the running statistics.

Measures evaluate a trained model: by default the **deployed** function (eval mode: BatchNorm
with its running statistics, dropout off), or with ``function="batch_stats"`` the function
training differentiated (BatchNorm with each measured batch's statistics, dropout off):
:func:`measure_pass`. Both leave every running statistic untouched.

How: a norm layer made to use batch statistics gets ``track_running_stats=False`` and its
``running_mean``/``running_var`` references set aside (``None``) for the body, which is
PyTorch's own "batch statistics in both modes, nothing updated" configuration; the buffer
tensors themselves are never written to, and flags, references and train/eval modes are put
back on exit, also when the body raises.

Example:
    >>> import torch
    >>> from torch import nn
    >>> from flatness.passes import curvature_pass
    >>> model = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4), nn.Dropout(0.5)).train()
    >>> before = [b.clone() for b in model[1].buffers()]
    >>> x = torch.randn(8, 4)
    >>> with curvature_pass(model):
    ...     out = model(x)          # batch statistics, no dropout
    >>> all(torch.equal(a, b) for a, b in zip(before, model[1].buffers()))
    True
    >>> torch.allclose(out, model[1](model[0](x)))  # the train-mode BN (dropout off)
    True
    >>> model.training and model[2].training  # modes restored
    True
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator
from typing import Literal

import torch
from torch import Tensor, nn
from torch.nn import functional as F
from torch.nn.modules.batchnorm import _NormBase
from torch.nn.modules.dropout import _DropoutNd
from torch.overrides import TorchFunctionMode

from .utils import preserved_mode

__all__ = [
    "Function",
    "FUNCTIONS",
    "norm_layers",
    "batch_statistics",
    "frozen_running_stats",
    "math_attention",
    "ExactNormDerivatives",
    "curvature_pass",
    "measure_pass",
    "is_curvature_function",
]

Function = Literal["deployed", "batch_stats"]
FUNCTIONS: tuple[str, ...] = ("deployed", "batch_stats")


def norm_layers(model: nn.Module) -> list[_NormBase]:
    """BatchNorm / InstanceNorm layers of ``model`` (those that may keep running statistics)."""
    return [m for m in model.modules() if isinstance(m, _NormBase)]


@contextlib.contextmanager
def batch_statistics(layers: Iterable[_NormBase]) -> Iterator[None]:
    """The body runs ``layers`` on the statistics of their input batch, in either mode, updating nothing.

    Their flags and running-statistics references are restored on exit.
    """
    saved = [(m, m.track_running_stats, m.running_mean, m.running_var) for m in layers]
    try:
        for m, *_ in saved:
            m.track_running_stats = False
            m.running_mean = None
            m.running_var = None
        yield
    finally:
        for m, track, mean, var in saved:
            m.track_running_stats = track
            m.running_mean = mean
            m.running_var = var


def frozen_running_stats(model: nn.Module) -> contextlib.AbstractContextManager[None]:
    """Norm layers in train mode keep normalising with batch statistics but update nothing.

    The rest of the model (modes, dropout) is left as it is.
    """
    return batch_statistics([m for m in norm_layers(model) if m.training])


@contextlib.contextmanager
def math_attention() -> Iterator[None]:
    """Scaled-dot-product attention restricted to the math kernel (it has a double backward)."""
    try:
        from torch.nn.attention import SDPBackend, sdpa_kernel
    except ImportError:  # torch < 2.3: no kernel selection; nothing to do
        yield
        return
    with sdpa_kernel([SDPBackend.MATH]):
        yield


def _normalise_affine(
    x: Tensor, dims: list[int], eps: float, weight: Tensor | None, bias: Tensor | None, shape: list[int]
) -> Tensor:
    # Few full-size operations (centre, square, scale-and-shift): the autograd penalty
    # differentiates each of them up to three times, so fewer is faster for the same function.
    centred = x - x.mean(dim=dims, keepdim=True)
    scale = torch.rsqrt(centred.square().mean(dim=dims, keepdim=True) + eps)  # biased variance, as the fused kernels
    if weight is not None:
        scale = scale * weight.reshape(shape)
    if bias is None:
        return centred * scale
    return torch.addcmul(bias.reshape(shape), centred, scale)


class ExactNormDerivatives(TorchFunctionMode):
    """Norm layers that normalise with their input's statistics, from primitive operations.

    Inside this mode, ``F.batch_norm`` without running statistics (batch statistics, nothing
    to update: how :func:`batch_statistics` configures BatchNorm), ``F.layer_norm`` and
    ``F.group_norm`` are computed as mean, variance and ``rsqrt`` — the same function, whose
    derivatives of every order autograd gets right. BatchNorm with running statistics (eval
    mode: an affine map, exact in the fused kernel) and everything else run unchanged.

    Example:
        >>> import torch
        >>> x = torch.randn(6, 3, dtype=torch.float64)
        >>> with ExactNormDerivatives():
        ...     y = torch.nn.functional.layer_norm(x, (3,))
        >>> torch.allclose(y, torch.nn.functional.layer_norm(x, (3,)))
        True
    """

    def __torch_function__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        kwargs = dict(kwargs or {})
        if func is F.batch_norm:
            return self._batch_norm(func, *args, **kwargs)
        if func is F.layer_norm:
            return self._layer_norm(*args, **kwargs)
        if func is F.group_norm:
            return self._group_norm(*args, **kwargs)
        return func(*args, **kwargs)

    @staticmethod
    def _batch_norm(func, input, running_mean, running_var, weight=None, bias=None,  # type: ignore[no-untyped-def]
                    training=False, momentum=0.1, eps=1e-5):
        if running_mean is not None or running_var is not None:
            return func(input, running_mean, running_var, weight, bias, training, momentum, eps)
        dims = [0, *range(2, input.dim())]
        shape = [1, -1] + [1] * (input.dim() - 2)
        return _normalise_affine(input, dims, eps, weight, bias, shape)

    @staticmethod
    def _layer_norm(input, normalized_shape, weight=None, bias=None, eps=1e-5):  # type: ignore[no-untyped-def]
        k = len(tuple(normalized_shape))
        dims = list(range(input.dim() - k, input.dim()))
        return _normalise_affine(input, dims, eps, weight, bias, list(normalized_shape))

    @staticmethod
    def _group_norm(input, num_groups, weight=None, bias=None, eps=1e-5):  # type: ignore[no-untyped-def]
        n, c = input.shape[0], input.shape[1]
        grouped = input.reshape(n, num_groups, -1)
        y = _normalise_affine(grouped, [2], eps, None, None, []).reshape(input.shape)
        shape = [1, c] + [1] * (input.dim() - 2)
        if weight is not None:
            y = y * weight.reshape(shape)
        return y if bias is None else y + bias.reshape(shape)


@contextlib.contextmanager
def curvature_pass(
    model: nn.Module, *, dropout: bool = False, attention_math: bool = True, exact_norms: bool = True
) -> Iterator[nn.Module]:
    """An extra pass computing the task loss's function (see the module docs).

    Norm layers in train mode use batch statistics and leave their running statistics bitwise
    unchanged; with ``dropout=False`` (default) every module is put in eval mode for the body
    (dropout off), with ``dropout=True`` modes are kept; ``attention_math`` selects the math
    SDPA kernel; ``exact_norms`` computes batch-statistics norm layers from primitives
    (:class:`ExactNormDerivatives`; only third and higher derivatives need it). Everything is
    restored on exit, also when the body raises.
    """
    training_norms = [m for m in norm_layers(model) if m.training]
    with contextlib.ExitStack() as stack:
        stack.enter_context(preserved_mode(model))
        stack.enter_context(batch_statistics(training_norms))
        if not dropout:
            model.eval()
        if attention_math:
            stack.enter_context(math_attention())
        if exact_norms:
            stack.enter_context(ExactNormDerivatives())
        yield model


@contextlib.contextmanager
def measure_pass(model: nn.Module, function: Function = "deployed") -> Iterator[nn.Module]:
    """Eval mode (dropout off), and norm layers as ``function`` says (see the module docs).

    ``"deployed"``: running statistics (the model as it predicts); ``"batch_stats"``: every norm
    layer on the statistics of the batch it sees, running statistics untouched. The math
    attention kernel is selected (measures take Hessian-vector products).
    """
    if function not in FUNCTIONS:
        raise ValueError(f"function must be one of {FUNCTIONS}, got {function!r}")
    layers = norm_layers(model) if function == "batch_stats" else []
    with contextlib.ExitStack() as stack:
        stack.enter_context(preserved_mode(model))
        stack.enter_context(batch_statistics(layers))
        model.eval()
        stack.enter_context(math_attention())
        yield model


def is_curvature_function(model: nn.Module) -> bool:
    """Whether ``model``'s forward, as it stands, already computes what :func:`curvature_pass` would.

    That is: no active dropout, attention or norm layer in train mode (then a method may take its
    curvature quantities from the main pass instead of running an extra one).
    """
    for m in model.modules():
        if not m.training:
            continue
        if isinstance(m, (_NormBase, nn.MultiheadAttention)) or (isinstance(m, _DropoutNd) and m.p > 0):
            return False
    return True
