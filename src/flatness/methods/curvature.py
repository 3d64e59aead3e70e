r"""Curvature regularization (Geng et al.): task loss + α · mean per-example ‖∇θ ℓ_i‖².

.. math::

    \bar L_\mathcal{B}(\theta) = L_\mathcal{B}(\theta)
        + \alpha \, \frac{1}{B} \sum_{i=1}^{B} \lVert \nabla_\theta \ell_i \rVert^2
    \qquad \text{(eq. 11)}

The mean per-example squared gradient norm is the trace of the empirical Fisher, a proxy for
Tr(H) near a minimum (eq. 9). The norms come from the one engine, :mod:`flatness.per_example`:
for Linear, SparseLinear, Conv1d/2d and BatchNorm layers the closed form of eq. 12
(:math:`\lVert \delta_i a_i^\top \rVert_F^2 = \lVert \delta_i \rVert^2 \lVert a_i \rVert^2` for a
Linear layer, BackPACK-style unfolded patches for a convolution), differentiable, so no
per-example gradient is formed; for other models ``torch.func.vmap`` (``impl="vmap"``, much
slower); ``impl="auto"`` picks the closed form when it applies.

The penalty is computed in a curvature pass (:func:`flatness.passes.curvature_pass`): dropout
off (the paper), the math attention kernel. **BatchNorm**: with batch statistics the examples of
a batch are not independent, so the per-example losses are defined with the **batch statistics
held fixed** — each example is normalised with the mean and variance of the whole (dropout-off)
batch, treated as constants; the value is that of the train-mode function, and neither the
per-example gradients nor the penalty's gradient flow through the statistics. The running
statistics are updated by the task loss's pass only. When the model has no dropout, attention
or train-mode norm layer, the task loss's own pass is the curvature pass: one forward, one
δ-pass, one backward. Otherwise the curvature pass starts where the two passes part: the
leading Linear/activation modules of a Sequential give the same values with dropout on or off,
so their outputs are taken from the task loss's pass (:func:`flatness.linear_io.share_prefix`),
and the one backward computes their weight gradients once for both terms (for the paper's MLP
the 3072 × 512 input layer, most of a step's arithmetic; ``flatness bench methods``).

Requirements: ``loss_fn`` is the batch mean (or sum, see its ``reduction``) of per-example
losses.

Example:
    >>> import torch
    >>> from torch import nn
    >>> from flatness.methods import make_method
    >>> model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
    >>> opt = torch.optim.SGD(model.parameters(), lr=0.1)
    >>> method = make_method("curvature", model, nn.CrossEntropyLoss(), alpha=0.01)
    >>> info = method.step(torch.randn(16, 4), torch.randint(0, 3, (16,)), opt)
    >>> sorted(info), method.last_impl
    (['loss', 'mean_sq_grad_norm', 'penalty'], 'closed-form')
"""

from __future__ import annotations

import contextlib
import warnings
from typing import Any

import torch
from torch import Tensor, nn

from .._relu_stack_sq_norms import relu_stack_layers, relu_stack_sq_norms
from ..linear_io import PrefixSlot, SharedPrefix
from ..passes import curvature_pass, is_curvature_function
from ..per_example import (
    PER_EXAMPLE_IMPLS,
    ClosedForm,
    ClosedFormUnavailable,
    Impl,
    per_example_sq_grad_norms,
)
from ..utils import batch_size, call_model, unwrap
from .base import Evaluation, LossFn, Method, Term, logged, register_method
from .perturb import require_nonnegative

__all__ = ["CurvatureRegularization", "CurvatureTerm"]


class CurvatureTerm(Term):
    """α·mean_i ‖∇θ ℓ_i‖² at the evaluation point; logs ``penalty`` and ``mean_sq_grad_norm``.

    ``impl`` as in :func:`flatness.per_example.per_example_sq_grad_norms`; with ``"auto"`` the
    first step that finds the closed form inapplicable warns once and later steps go straight
    to vmap. ``last_impl`` says which form the last step used.
    """

    def __init__(self, alpha: float, impl: Impl = "auto") -> None:
        self.alpha = require_nonnegative("alpha (α)", alpha)
        if impl not in PER_EXAMPLE_IMPLS:
            raise ValueError(f"impl must be one of {PER_EXAMPLE_IMPLS}, got {impl!r}")
        self.impl: str = impl
        self.last_impl: str | None = None
        self._shared: ClosedForm | None = None
        self._prefix = PrefixSlot()  # the task pass's prefix, for this step's curvature pass

    def observe(self, model: nn.Module) -> contextlib.AbstractContextManager[Any]:
        """Record the closed form from the pass itself, or the output of its mode-independent prefix.

        The closed form when it is a curvature pass already, else the prefix (module docs).
        """
        local = unwrap(model)
        self._shared, self._prefix.prefix = None, None
        if self.alpha == 0 or self.impl == "vmap":
            return contextlib.nullcontext()
        if not is_curvature_function(local):
            return self._prefix.record(local)
        try:
            closed = ClosedForm(local)
        except ClosedFormUnavailable:
            return contextlib.nullcontext()
        self._shared = closed
        return closed.record()

    def _from_prefix(self, evaluation: Evaluation, prefix: SharedPrefix) -> Tensor | None:
        """The norms from a curvature pass that starts at the task pass's prefix output."""
        fast = self._relu_stack(evaluation, prefix)
        if fast is not None:
            return fast
        local = unwrap(evaluation.model)
        try:
            closed = ClosedForm(local)
        except ClosedFormUnavailable:
            return None
        rest = local[prefix.length :]  # the modules the pass runs
        with curvature_pass(rest, exact_norms=False):
            with closed.record(prefix=prefix):
                logits = call_model(rest, prefix.output)
            loss = evaluation.loss_fn(logits, evaluation.y)
            try:
                return closed.sq_norms(loss, evaluation.loss_fn, batch_size(evaluation.x), create_graph=True)
            except ClosedFormUnavailable:  # e.g. a layer run twice: the whole pass below
                return None

    @staticmethod
    def _relu_stack(evaluation: Evaluation, prefix: SharedPrefix) -> Tensor | None:
        """The norms by a ReLU stack's explicit closed form where it applies (:mod:`flatness._relu_stack_sq_norms`)."""
        x, y, shared = evaluation.x, evaluation.y, prefix.output
        if not isinstance(x, Tensor) or not isinstance(y, Tensor) or shared is None:
            return None
        if x.dim() != 2 or x.layout != torch.strided or x.requires_grad or y.dim() != 1 or y.is_floating_point():
            return None
        if torch.is_autocast_enabled(x.device.type):
            return None
        layers = relu_stack_layers(unwrap(evaluation.model), prefix.length, evaluation.loss_fn)
        if layers is None:
            return None
        return relu_stack_sq_norms(layers, x, shared, y, evaluation.loss_fn.ignore_index)  # type: ignore[union-attr]

    def __call__(self, evaluation: Evaluation, info: dict[str, float]) -> Tensor | None:
        """α·mean_i ‖∇θ ℓ_i‖² on ``evaluation``, from the main pass's records where it shared them."""
        shared, self._shared = self._shared, None
        prefixed = self._prefix.take(evaluation.x)
        if self.alpha == 0:
            return None
        sq, used = None, "closed-form"
        if prefixed is not None:
            sq = self._from_prefix(evaluation, prefixed)
        if shared is not None:
            try:
                sq = shared.sq_norms(
                    evaluation.loss, evaluation.loss_fn, batch_size(evaluation.x), create_graph=True
                )
            except ClosedFormUnavailable:  # e.g. an in-place activation: a pass of its own
                sq = None
        if sq is None:
            local = unwrap(evaluation.model)
            # second derivatives only: torch's fused norm kernels are exact there (their third
            # derivatives are not, which is what the FA penalty needs; flatness.passes)
            with curvature_pass(local, exact_norms=False):
                norms = per_example_sq_grad_norms(
                    local, evaluation.loss_fn, evaluation.x, evaluation.y,
                    impl=self.impl, create_graph=True,  # type: ignore[arg-type]
                )
            sq, used = norms.sq_norms, norms.impl
        if self.impl == "auto" and used == "vmap":
            warnings.warn(
                "curvature: the per-layer closed form does not apply to this model; using the "
                "(slower) per-example vmap form",
                RuntimeWarning,
                stacklevel=4,
            )
            self.impl = "vmap"
        self.last_impl = used
        mean_sq = sq.mean()
        penalty = self.alpha * mean_sq
        info["penalty"] = logged(penalty)
        info["mean_sq_grad_norm"] = logged(mean_sq)
        return penalty


@register_method
class CurvatureRegularization(Method):
    """``--method curvature``: L + α·mean_i ‖∇θ ℓ_i‖² (Geng et al. eq. 11); ``alpha`` is swept.

    Args:
        alpha: strength α >= 0 (``alpha=0`` trains on the task loss alone, at the plain cost).
        impl: ``"auto"`` (closed form when it applies, else vmap), ``"closed-form"`` or
            ``"vmap"``.
    """

    name = "curvature"
    hparam = "alpha"
    symbol = "α"
    # at initialisation mean_i ‖∇θ ℓ_i‖² is ~10 (Breast Cancer MLP) to ~200 (CIFAR-100 MLP)
    default_grid = (0.0001, 0.001, 0.01)

    def __init__(self, model: nn.Module, loss_fn: LossFn, alpha: float = 0.001, impl: Impl = "auto") -> None:
        self.term = CurvatureTerm(alpha, impl)
        super().__init__(model, loss_fn, terms=[self.term])
        self.alpha = self.term.alpha

    @property
    def impl(self) -> str:
        """The requested form; ``"auto"`` turns into ``"vmap"`` for good once the closed form does not apply."""
        return self.term.impl

    @property
    def last_impl(self) -> str | None:
        """The form the last step used (``"closed-form"`` or ``"vmap"``; ``None`` before the first)."""
        return self.term.last_impl

    def __repr__(self) -> str:
        return f"CurvatureRegularization(alpha={self.alpha}, impl={self.impl!r})"
