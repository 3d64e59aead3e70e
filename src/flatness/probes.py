r"""Random probes and seeding: the one place where ``flatness`` draws random vectors.

Every estimator and method that needs random vectors — Hutchinson probes for Tr(H) and Tr(H²),
Lanczos start vectors, ε-ball perturbations (NRS/RPR), random landscape directions, weight
noise — gets its generator from :func:`make_generator` and its ±1 entries from
:func:`rademacher`. Probe kinds are named (:data:`DISTRIBUTIONS`): ``"rademacher"`` (±1
entries) and ``"gaussian"`` (standard normal entries); both satisfy E[v vᵀ] = I.

Seeding has one meaning everywhere (:func:`make_generator`):

- ``generator=`` a :class:`torch.Generator`: used as given (its state advances);
- ``seed=`` an int: a fresh private CPU generator seeded with it (the draws do not touch
  torch's global random state, so the same seed gives the same vectors on CPU and CUDA);
- ``seed=None`` and no generator: torch's global generator, i.e. reproducible under
  :func:`torch.manual_seed` like any other PyTorch randomness.

Training-time objects (the penalty, the methods) default to ``seed=None``; post-hoc measures
default to ``seed=0`` so that two models measured with default arguments see the same probes.
A private generator is resumed exactly with :func:`generator_state` and :func:`restore_generator`.

Example:
    >>> import torch
    >>> from flatness.probes import sample_probes
    >>> w = torch.zeros(3, 2)
    >>> (v,) = sample_probes([w], 4, seed=0)
    >>> v.shape, sorted(v.unique().tolist())
    (torch.Size([4, 3, 2]), [-1.0, 1.0])
    >>> torch.equal(v, sample_probes([w], 4, seed=0)[0])
    True
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Literal, TypeVar

import torch
from torch import Tensor

__all__ = [
    "DISTRIBUTIONS",
    "Distribution",
    "categorical",
    "check_distribution",
    "check_probes",
    "chunked_samples",
    "draw",
    "generator_state",
    "make_generator",
    "matrix_probes",
    "rademacher",
    "random_matrix",
    "rank_seed",
    "restore_generator",
    "sample_probes",
]

Distribution = Literal["rademacher", "gaussian"]
Probes = TypeVar("Probes")
DISTRIBUTIONS: tuple[str, ...] = ("rademacher", "gaussian")


def check_distribution(dist: str) -> str:
    """``dist`` if it names a probe kind, else a ``ValueError`` listing the kinds."""
    if dist not in DISTRIBUTIONS:
        raise ValueError(f"unknown probe distribution {dist!r}; expected one of {DISTRIBUTIONS}")
    return dist


MAX_PROBES = 1_000_000  # far above any useful M; a larger count would only hang or overflow


def check_probes(probes: object) -> int:
    """``probes`` if it is an integer from 1 to :data:`MAX_PROBES`, else a ``ValueError`` naming M.

    >>> check_probes(5)
    5
    """
    if isinstance(probes, bool) or not isinstance(probes, int) or not 1 <= probes <= MAX_PROBES:
        raise ValueError(f"probes (M) must be an integer from 1 to {MAX_PROBES:,}, got {probes!r}")
    return probes


def make_generator(
    seed: int | None = None,
    generator: torch.Generator | None = None,
    device: torch.device | str = "cpu",
) -> torch.Generator | None:
    """The generator to draw from: ``generator`` if given, else a fresh one seeded with ``seed``.

    ``None`` (no generator, no seed) means torch's global generator. A ``bool`` or negative seed
    is refused.
    """
    if generator is not None:
        return generator
    if seed is None:
        return None
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed must be an integer >= 0 or None, got {seed!r}")
    gen = torch.Generator(device=device)
    gen.manual_seed(int(seed))
    return gen


def generator_state(generator: torch.Generator | None) -> Tensor | None:
    """``generator``'s state, to resume its draws exactly (``None`` for torch's global one, not saved here)."""
    return None if generator is None else generator.get_state()


def restore_generator(generator: torch.Generator | None, state: Tensor | None) -> torch.Generator | None:
    """``generator`` set to ``state`` (:func:`generator_state`; a new CPU one if ``None``), as is for no state."""
    if state is None:
        return generator
    generator = torch.Generator(device="cpu") if generator is None else generator
    generator.set_state(state)
    return generator


def rank_seed(seed: int, rank: int) -> int:
    """The seed of DDP rank ``rank``'s own random streams (probes, dropout) in run ``seed``.

    Rank 0 keeps ``seed`` itself, so a one-process run is the one-rank case of a DDP run.
    """
    return int(seed) + 1_000_003 * int(rank)


_SHIFTS: dict[torch.device, Tensor] = {}
_SIGN_BIT = -(2**31)  # 0x80000000 as int32
_ONE_F32 = 0x3F800000  # bit pattern of 1.0f; with the sign bit set it is -1.0f


def rademacher(
    shape: tuple[int, ...],
    generator: torch.Generator | None = None,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    out: Tensor | None = None,
) -> Tensor:
    """±1 entries from the bits of random int32 words: 32 signs per draw of the generator.

    Bit k of a word is shifted into the sign bit of the float32 pattern of 1.0, so the result is
    built in three integer passes with no float conversion. Drawing one random number per entry
    dominated a CPU curvature step on the paper's MLP (1.6 M parameters x M probes). ``out``: a
    contiguous float32 tensor of ``shape`` on ``device`` to fill (the same entries as without it):
    reusing one saves the first-touch cost of fresh memory, which for the measures' (P, 20)
    blocks on a virtual machine exceeded the draw itself.
    """
    device = torch.device(device)
    numel = math.prod(shape)
    words = torch.randint(
        -(2**31), 2**31, ((numel + 31) // 32, 1), generator=generator, device=device,
        dtype=torch.int32,
    )
    shifts = _SHIFTS.get(device)
    if shifts is None:
        shifts = _SHIFTS[device] = torch.arange(31, -1, -1, dtype=torch.int32, device=device)
    if out is not None:
        if out.dtype != torch.float32 or not out.is_contiguous() or tuple(out.shape) != tuple(shape):
            raise ValueError("out must be a contiguous float32 tensor of the drawn shape")
        full = numel // 32
        bits = out.view(-1).view(torch.int32)
        torch.bitwise_left_shift(words[:full], shifts, out=bits[: full * 32].view(full, 32))
        if full * 32 < numel:  # the last, partial word
            bits[full * 32 :] = words[full:].bitwise_left_shift(shifts).reshape(-1)[: numel - full * 32]
        bits.bitwise_and_(_SIGN_BIT).bitwise_or_(_ONE_F32)
        return out
    bits = words.bitwise_left_shift(shifts).bitwise_and_(_SIGN_BIT).bitwise_or_(_ONE_F32)
    signs = bits.view(torch.float32).reshape(-1)[:numel].reshape(shape)
    return signs if dtype == torch.float32 else signs.to(dtype)


def draw(
    shape: tuple[int, ...],
    dist: Distribution,
    generator: torch.Generator | None = None,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    out: Tensor | None = None,
) -> Tensor:
    """One tensor of probe entries of kind ``dist`` (on ``generator``'s device if given).

    ``out``: a contiguous tensor of ``shape`` (float32 for Rademacher entries) on the
    generator's device to fill instead of allocating; the entries are those drawn without it.
    """
    check_distribution(dist)
    gen_device = generator.device if generator is not None else torch.device(device)
    if out is not None:
        if out.device != gen_device or tuple(out.shape) != tuple(shape):
            raise ValueError("out must have the drawn shape, on the generator's device")
        if dist == "rademacher":
            return rademacher(shape, generator, gen_device, out=out)
        return out.normal_(generator=generator)  # the entries torch.randn draws
    if dist == "rademacher":
        v = rademacher(shape, generator, gen_device, dtype)
    else:
        v = torch.randn(shape, generator=generator, device=gen_device, dtype=dtype)
    return v.to(device, non_blocking=True)


def sample_probes(
    params: Sequence[Tensor],
    num: int,
    dist: Distribution = "rademacher",
    generator: torch.Generator | None = None,
    seed: int | None = None,
) -> list[Tensor]:
    """Draw ``num`` probe vectors, one block per parameter, each of shape ``(num, *p.shape)``.

    Probes are drawn on ``generator``'s device (a CPU generator for ``seed``) and moved to each
    parameter's device and dtype, so a seed gives the same probes on CPU and CUDA.
    """
    check_distribution(dist)
    if num < 1:
        raise ValueError(f"number of probes must be >= 1, got {num}")
    generator = make_generator(seed, generator)
    return [draw((num, *p.shape), dist, generator, p.device, p.dtype) for p in params]


def random_matrix(
    dim: int,
    num: int,
    dist: Distribution,
    generator: torch.Generator | None,
    dtype: torch.dtype,
    device: torch.device | str,
    out: Tensor | None = None,
) -> Tensor:
    """``(dim, num)`` probes (one per column) for a matrix-free operator on flat vectors.

    The columns are drawn as the rows of a contiguous ``(num, dim)`` block and returned as its
    transposed view: each probe is one contiguous vector, which an operator that multiplies one
    column at a time (:class:`flatness.measures.HessianOperator` on the CPU) reads without
    copying the block (transposing a (1.73 M, 20) block cost 0.5 s in 100 products).
    ``out``: an earlier block of the same shape, dtype and device to refill (float32 on the
    generator's device; otherwise a new block is drawn).

    Example:
        >>> G = random_matrix(5, 3, "rademacher", make_generator(0), torch.float32, "cpu")
        >>> G.shape, G.T.is_contiguous(), torch.equal(G[:, 1], draw((3, 5), "rademacher", make_generator(0))[1])
        (torch.Size([5, 3]), True, True)
    """
    gen_device = generator.device if generator is not None else torch.device(device)
    if (
        out is not None and out.dtype == torch.float32 == dtype and out.device == gen_device
        and torch.device(device) == gen_device and out.T.is_contiguous() and tuple(out.shape) == (dim, num)
    ):
        return draw((num, dim), dist, generator, device, dtype, out=out.T).T
    return draw((num, dim), dist, generator, device, dtype).T


def matrix_probes(
    dim: int,
    dist: Distribution,
    generator: torch.Generator | None,
    dtype: torch.dtype,
    device: torch.device | str,
) -> Callable[[int], Tensor]:
    """``draw(m)``: a ``(dim, m)`` block of probes (:func:`random_matrix`).

    One buffer is refilled block after block where it can be (for :func:`chunked_samples`).
    """
    buffer: Tensor | None = None

    def draw_block(num: int) -> Tensor:
        nonlocal buffer
        buffer = random_matrix(dim, num, dist, generator, dtype, device, out=buffer)
        return buffer

    return draw_block


def chunked_samples(
    num: int, chunk: int, draw_chunk: Callable[[int], Probes], evaluate: Callable[[Probes], Tensor]
) -> Tensor:
    """The per-probe values of ``num`` probes, concatenated in drawing order: the loop of every Hutchinson measure.

    The probes are drawn ``draw_chunk(m)`` and evaluated ``evaluate(probes) -> (m,)`` at most
    ``chunk`` at a time (which bounds the memory of the products).

    Example:
        >>> A = torch.diag(torch.tensor([3.0, 2.0, 1.0], dtype=torch.float64))
        >>> draw_chunk = matrix_probes(3, "rademacher", make_generator(0), torch.float64, "cpu")
        >>> chunked_samples(7, 3, draw_chunk, lambda v: (v * (A @ v)).sum(0))  # vᵀAv = Tr(A) for ±1
        tensor([6., 6., 6., 6., 6., 6., 6.], dtype=torch.float64)
    """
    if num < 1 or chunk < 1:
        raise ValueError(f"the number of probes and the chunk size must be >= 1, got {num} and {chunk}")
    return torch.cat([evaluate(draw_chunk(min(chunk, num - start))) for start in range(0, num, chunk)])


def categorical(
    probs: Tensor, generator: torch.Generator | None = None
) -> Tensor:
    """One class id per row of ``probs`` (N, C), drawn with probabilities ``probs`` (no grad).

    Drawn on ``generator``'s device (a CPU generator for a seed) and returned on ``probs``'
    device: the sampled labels of K-FAC's Fisher factors (:mod:`flatness.kfac`).
    """
    gen_device = generator.device if generator is not None else probs.device
    draws = torch.multinomial(probs.detach().to(gen_device), 1, generator=generator)
    return draws.squeeze(1).to(probs.device)
