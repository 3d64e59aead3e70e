r"""Neighborhood Region Smoothing (Zhao & Zhang, eq. 3) and its control, random perturbation (RPR).

.. math::

    \text{NRS:}\quad \min_\theta\; L(\theta)
        + \alpha \, \mathbb{E}_x\, D_\mathrm{KL}\bigl(f(x;\theta) \,\Vert\, f(x;\theta+\delta\theta)\bigr)
        + L(\theta + \delta\theta),
    \qquad
    \text{RPR:}\quad \min_\theta\; L(\theta + \delta\theta),

with one :math:`\delta\theta` per step drawn from the Euclidean ball :math:`B(0, \epsilon)` over
all trainable weights together (the paper draws one per device; defaults ε = 0.1, α = 1). The
radius is ε·U^(1/d) as for a uniform draw; the direction is, by default, random signs
(``dist="rademacher"``: isotropic, one random bit per weight) or, with ``dist="gaussian"``, a
Gaussian direction, which makes δθ exactly uniform in the ball but costs about as much as a
forward pass to draw on a CPU (1.7 M weights: ~7 ms with torch's generator). :math:`f` is the
predicted class distribution: softmax of the logits, or a Bernoulli for a single logit. The KL
term is differentiated through both arguments.

NRS's neighbour :math:`f(\cdot;\theta+\delta\theta)` is evaluated with
``torch.func.functional_call`` on the tensors ``p + δ``: the model's own weights are never
modified, so there is nothing to restore and the gradient reaches θ through both passes
(:class:`NeighbourTerm`). RPR moves the weights to θ + δθ in place, evaluates the loss there as
the step's only pass and restores them exactly (:class:`RandomPoint`).

Dropout and BatchNorm: NRS's neighbour pass replays the clean pass's random state (same mask),
so at ε = 0 the two outputs are identical and the KL term is exactly zero; it is an extra pass,
so BatchNorm's running statistics are updated by the clean pass only. RPR's one pass is its
main pass (it updates them, from the neighbour's activations).

Example:
    >>> import torch
    >>> from torch import nn
    >>> from flatness.methods import make_method
    >>> model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Dropout(0.3), nn.Linear(8, 3))
    >>> opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    >>> nrs = make_method("nrs", model, nn.CrossEntropyLoss(), eps=0.1, alpha=1.0, seed=0)
    >>> info = nrs.step(torch.randn(16, 4), torch.randint(0, 3, (16,)), opt)
    >>> sorted(info)
    ['kl', 'loss', 'perturbed_loss']
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

from ..batch_loss import BatchLoss
from ..passes import frozen_running_stats
from ..probes import generator_state, make_generator, rademacher, restore_generator
from ..utils import unwrap
from .base import Evaluation, LossFn, Method, Point, Term, logged, register_method
from .perturb import RandomReplay, WrappingOptimizer, extra_pass, perturbed, require_nonnegative

BallDistribution = Literal["gaussian", "rademacher"]
BALL_DISTRIBUTIONS: tuple[str, ...] = ("gaussian", "rademacher")

__all__ = [
    "BALL_DISTRIBUTIONS",
    "ball_direction",
    "sample_in_ball",
    "model_divergence",
    "NeighbourTerm",
    "RandomPoint",
    "NeighborhoodRegionSmoothing",
    "RandomPerturbation",
    "NRS",
]


def ball_direction(
    numel: int,
    eps: float,
    dist: BallDistribution = "rademacher",
    generator: torch.Generator | None = None,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> tuple[Tensor, Tensor]:
    """(flat direction of ``numel`` entries, 0-d scale): δ = scale·direction, ‖δ‖ = ε·U^(1/d).

    ``"gaussian"``: a standard Gaussian direction, so δ is uniform in the ε-ball.
    ``"rademacher"``: random ±1 entries (one random bit per weight, several times cheaper to
    draw than Gaussians), the same radius law; isotropic (covariance ∝ I) but not uniform.
    """
    if dist not in BALL_DISTRIBUTIONS:
        raise ValueError(f"dist must be one of {BALL_DISTRIBUTIONS}, got {dist!r}")
    gen_device = generator.device if generator is not None else torch.device(device)
    u = torch.rand((), generator=generator, device=gen_device, dtype=torch.float64)
    radius = eps * u.pow(1.0 / numel)
    if dist == "gaussian":
        direction = torch.randn(numel, generator=generator, device=gen_device, dtype=dtype)
        length = torch.linalg.vector_norm(direction).double().clamp_min(1e-30)
    else:
        direction = rademacher((numel,), generator, gen_device, dtype)
        length = torch.tensor(float(numel), dtype=torch.float64, device=gen_device).sqrt()
    scale = (radius / length).to(dtype)
    return direction.to(device), scale.to(device)


def _shaped_ball_direction(
    params: list[Tensor], eps: float, dist: BallDistribution, generator: torch.Generator | None
) -> tuple[list[Tensor], Tensor]:
    """:func:`ball_direction` over all ``params`` as one vector, split into their shapes."""
    direction, scale = ball_direction(
        sum(p.numel() for p in params), eps, dist, generator, params[0].device, params[0].dtype
    )
    chunks = direction.split([p.numel() for p in params])
    return [c.view_as(p).to(p.dtype) for c, p in zip(chunks, params, strict=True)], scale


def sample_in_ball(
    params: list[Tensor],
    eps: float,
    generator: torch.Generator | None = None,
    dist: BallDistribution = "rademacher",
) -> list[Tensor]:
    """δ in the Euclidean ε-ball of all ``params`` taken as one vector, shaped like ``params``.

    Radius ε·U^(1/d), U ~ U(0, 1), d the number of weights (in high dimension ‖δ‖ ≈ ε); the
    direction as in :func:`ball_direction` (``"gaussian"``: δ uniform in the ball). RPR's and
    NRS's neighbours are drawn this way.
    """
    directions, scale = _shaped_ball_direction(params, eps, dist, generator)
    return [d * scale for d in directions]


def model_divergence(logits: Tensor, neighbour_logits: Tensor) -> Tensor:
    """Mean over examples of KL(f(θ) ‖ f(θ+δθ)) from the two models' logits (NRS eq. 2).

    The last dimension holds the classes (softmax); a last dimension of size 1 is one logit of
    a Bernoulli (sigmoid). Other leading dimensions are averaged over like the batch.
    """
    if logits.shape != neighbour_logits.shape:
        raise ValueError(f"logit shapes differ: {logits.shape} vs {neighbour_logits.shape}")
    if logits.dim() == 1 or logits.shape[-1] == 1:
        a, b = logits.reshape(-1, 1), neighbour_logits.reshape(-1, 1)
        log_p = torch.cat([F.logsigmoid(a), F.logsigmoid(-a)], dim=1)
        log_q = torch.cat([F.logsigmoid(b), F.logsigmoid(-b)], dim=1)
    else:
        log_p = F.log_softmax(logits.reshape(-1, logits.shape[-1]), dim=1)
        log_q = F.log_softmax(neighbour_logits.reshape(-1, logits.shape[-1]), dim=1)
    return F.kl_div(log_q, log_p, reduction="batchmean", log_target=True)


def _call_with(model: nn.Module, params: dict[str, Tensor], x: Any) -> Tensor:
    """``model(x)`` (unpacked like :func:`flatness.utils.call_model`) with ``params`` swapped in."""
    if isinstance(x, tuple):
        return functional_call(model, params, x)
    if isinstance(x, dict):
        return functional_call(model, params, (), x)
    return functional_call(model, params, (x,))


class _Ball:
    """δθ drawn from the ε-ball over all trainable weights, from its own generator."""

    def __init__(self, eps: float, seed: int | None, dist: BallDistribution) -> None:
        self.eps = require_nonnegative("eps (ε)", eps)
        if dist not in BALL_DISTRIBUTIONS:
            raise ValueError(f"dist must be one of {BALL_DISTRIBUTIONS}, got {dist!r}")
        self.dist = dist
        self.generator = make_generator(seed)

    def draw(self, params: list[Tensor]) -> tuple[list[Tensor], Tensor]:
        """(directions shaped like ``params``, 0-d scale): δθ = scale·direction."""
        return _shaped_ball_direction(params, self.eps, self.dist, self.generator)

    def state_dict(self) -> dict[str, Any]:
        return {"generator": generator_state(self.generator)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.generator = restore_generator(self.generator, state.get("generator"))


class NeighbourTerm(_Ball, Term):
    """α·KL(f(θ) ‖ f(θ+δθ)) + L(θ+δθ) at the evaluation point θ (NRS eq. 3 without L(θ)).

    The neighbour is evaluated with ``functional_call`` on ``p + δ`` (differentiable in θ, the
    weights never written), in an extra pass: the main pass's dropout mask replayed, BatchNorm
    running statistics frozen. Logs ``kl`` and ``perturbed_loss``.
    """

    def __init__(self, eps: float, alpha: float, seed: int | None, dist: BallDistribution) -> None:
        super().__init__(eps, seed, dist)
        self.alpha = require_nonnegative("alpha (α)", alpha)

    def __call__(self, evaluation: Evaluation, info: dict[str, float]) -> Tensor:
        """α·KL(f(θ) ‖ f(θ+δθ)) + L(θ+δθ) for a fresh δθ, differentiable in θ."""
        model = evaluation.model
        named = {n: p for n, p in model.named_parameters() if p.requires_grad}
        directions, scale = self.draw(list(named.values()))
        shifted = {n: torch.addcmul(p, d, scale) for (n, p), d in zip(named.items(), directions, strict=True)}
        with evaluation.replay(), frozen_running_stats(unwrap(model)):
            neighbour_logits = _call_with(model, shifted, evaluation.x)
        perturbed_loss = evaluation.loss_fn(neighbour_logits, evaluation.y)
        kl = model_divergence(evaluation.logits, neighbour_logits)
        info["kl"] = logged(kl)
        info["perturbed_loss"] = logged(perturbed_loss)
        return self.alpha * kl + perturbed_loss


class RandomPoint(_Ball, Point):
    """RPR's point θ + δθ: the objective there, as the step's main (and only) pass.

    The weights are moved in place and restored exactly (so any term sees the neighbour); the
    gradient at θ + δθ is the update's. Logs ``loss`` (at θ + δθ).
    """

    def run(self, method: Method, x: Any, y: Any, params: list[Tensor], info: dict[str, float]) -> None:
        """The objective at θ + δθ for a fresh δθ, back-propagated there."""
        directions, scale = self.draw(params)
        with perturbed(params, directions, scale):
            replay = RandomReplay.capture(params)
            method.objective(x, y, params, replay, info, main=True).backward()


@register_method
class NeighborhoodRegionSmoothing(Method):
    """``--method nrs``: L(θ) + α·KL(f(θ) ‖ f(θ+δθ)) + L(θ+δθ); ``eps`` (ε) is swept.

    Args:
        eps: radius ε >= 0 of the ball δθ is drawn from (paper default 0.1).
        alpha: weight α >= 0 of the model divergence (paper default 1).
        seed: seed of δθ's generator (``None``: torch's global random stream).
        dist: ``"gaussian"`` (δθ uniform in the ball) or ``"rademacher"`` (random-sign
            direction, cheaper to draw); see :func:`ball_direction`.
    """

    name = "nrs"
    hparam = "eps"
    symbol = "ε"
    default_grid = (0.05, 0.1, 0.5)  # the NRS paper's ε search

    def __init__(
        self,
        model: nn.Module,
        loss_fn: LossFn,
        eps: float = 0.1,
        alpha: float = 1.0,
        seed: int | None = None,
        dist: BallDistribution = "rademacher",
    ) -> None:
        term = NeighbourTerm(eps, alpha, seed, dist)
        super().__init__(model, loss_fn, terms=[term])
        if isinstance(self.model, BatchLoss):
            raise ValueError("nrs needs the model output (its KL term), and a ModelLoss gives only the loss: "
                             "use loss_fn(output, target), or the NRS optimizer wrapper, "
                             "whose closure returns the output")
        self.eps, self.alpha = term.eps, term.alpha

    def __repr__(self) -> str:
        return f"NeighborhoodRegionSmoothing(eps={self.eps}, alpha={self.alpha})"


@register_method
class RandomPerturbation(Method):
    """``--method rpr``: train on L(θ+δθ) only (the NRS paper's control); ``eps`` is swept.

    ``loss`` in the step's info is the loss at the neighbour θ + δθ (the only one computed).
    """

    name = "rpr"
    hparam = "eps"
    symbol = "ε"
    default_grid = (0.05, 0.1, 0.5)  # the NRS paper's ε search

    def __init__(
        self,
        model: nn.Module,
        loss_fn: LossFn,
        eps: float = 0.1,
        seed: int | None = None,
        dist: BallDistribution = "rademacher",
    ) -> None:
        point = RandomPoint(eps, seed, dist)
        super().__init__(model, loss_fn, point=point)
        self.eps = point.eps

    def __repr__(self) -> str:
        return f"RandomPerturbation(eps={self.eps})"


class NRS(_Ball, WrappingOptimizer):
    """NRS as a wrapper around any optimizer class, driven by ``step(closure)``.

    For any training loop and for Lightning's manual optimization.

    The NRS objective couples the outputs at θ and θ + δθ (the KL term), so, unlike
    :class:`flatness.methods.sam.SAM`, the wrapper runs every pass itself: ``closure()`` runs
    the forward pass at the current weights and returns ``(loss, output)`` — it calls neither
    ``backward`` nor ``zero_grad``. One ``step(closure)``:

    1. draws δθ (one per step, from the wrapper's generator) and runs the closure at θ + δθ
       without a graph, for the neighbour's output q̄;
    2. runs it at θ — the step's main pass (dropout draws the step's mask, BatchNorm updates its
       running statistics) — and back-propagates L(θ) + α·KL(p ‖ q̄);
    3. runs it at θ + δθ again and back-propagates L(θ + δθ) + α·KL(p̄ ‖ q);
    4. restores θ exactly (also when a pass raises) and lets the base optimizer step.

    Steps 2 and 3 together give the exact gradient of L(θ) + α·KL(f(θ) ‖ f(θ+δθ)) + L(θ+δθ)
    (each side of the KL differentiated where its output was computed; q̄ and p̄ are the same
    numbers as q and p): the update of :class:`NeighborhoodRegionSmoothing`, at the cost of
    one more forward pass, without access to the model's inputs. The neighbour passes replay
    the main pass's dropout mask and, given ``model=``, leave the running statistics unchanged.

    Args:
        params, base_optimizer_cls, kwargs: as for :class:`flatness.methods.sam.SAM`.
        eps, alpha, seed, dist: as for :class:`NeighborhoodRegionSmoothing` (the same δθ for
            the same seed and parameters).
        model: the network the closure runs (optional; for BatchNorm, see above).

    ``step(closure, backward=...)``: how to back-propagate (default ``Tensor.backward``; in a
    LightningModule ``self.manual_backward``). It returns the loss at θ; ``last`` holds the
    step's ``loss``, ``kl`` and ``perturbed_loss`` as detached tensors.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Dropout(0.2), nn.Linear(8, 3))
        >>> opt = NRS(model.parameters(), torch.optim.SGD, eps=0.1, alpha=1.0, seed=0, lr=0.1)
        >>> x, y = torch.randn(16, 4), torch.randint(0, 3, (16,))
        >>> def closure():
        ...     out = model(x)
        ...     return nn.functional.cross_entropy(out, y), out
        >>> loss = opt.step(closure)
        >>> sorted(opt.last)
        ['kl', 'loss', 'perturbed_loss']
    """

    def __init__(
        self,
        params: Any,
        base_optimizer_cls: type[torch.optim.Optimizer],
        eps: float = 0.1,
        alpha: float = 1.0,
        *,
        seed: int | None = None,
        dist: BallDistribution = "rademacher",
        model: nn.Module | None = None,
        **kwargs: Any,
    ) -> None:
        _Ball.__init__(self, eps, seed, dist)
        self.alpha = require_nonnegative("alpha (α)", alpha)
        WrappingOptimizer.__init__(self, params, base_optimizer_cls, model, **kwargs)
        self.last: dict[str, Tensor] = {}

    def _pass(self, closure: Callable[[], Any]) -> tuple[Tensor, Tensor]:
        result = closure()
        if not (isinstance(result, (tuple, list)) and len(result) == 2):
            raise TypeError(
                "NRS.step: the closure must return (loss, output) — the forward pass at the "
                f"current weights, without backward() — got {type(result).__name__}"
            )
        return result[0], result[1]

    def step(  # type: ignore[override]
        self, closure: Callable[[], Any] | None = None, backward: Callable[[Tensor], Any] | None = None
    ) -> Tensor:
        """One NRS update (see the class docs); returns the loss at θ."""
        if closure is None:
            raise RuntimeError("NRS.step needs a closure that returns (loss, output) at the current weights")
        run_backward = backward if backward is not None else Tensor.backward
        params = [p for g in self.param_groups for p in g["params"] if p.requires_grad]
        directions, scale = self.draw(params)
        replay = RandomReplay.capture(params)
        self.zero_grad(set_to_none=True)
        with torch.enable_grad():
            with torch.no_grad(), perturbed(params, directions, scale), extra_pass(self.model), replay():
                _, neighbour = self._pass(closure)
            loss, output = self._pass(closure)  # the main pass
            kl = model_divergence(output, neighbour.detach())
            run_backward(loss + self.alpha * kl)
            with perturbed(params, directions, scale), extra_pass(self.model), replay():
                perturbed_loss, neighbour = self._pass(closure)
                run_backward(perturbed_loss + self.alpha * model_divergence(output.detach(), neighbour))
        self.last = {"loss": loss.detach(), "kl": kl.detach(), "perturbed_loss": perturbed_loss.detach()}
        self.base_optimizer.step()
        return loss.detach()

    def state_dict(self) -> dict[str, Any]:
        """The base optimizer's state and δθ's generator (to resume the same draws)."""
        return {"base": WrappingOptimizer.state_dict(self), **_Ball.state_dict(self)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore the base optimizer's and the ball's state."""
        WrappingOptimizer.load_state_dict(self, state_dict["base"])
        _Ball.load_state_dict(self, state_dict)
