"""Benchmarks behind ``flatness bench NAME``: one module per benchmark, shared timing helpers.

Every figure is a ratio of median step times measured interleaved in one run
(:func:`time_interleaved`), so that a noisy machine slows every case alike.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable


def median_ms(times: list[float]) -> float:
    return 1000.0 * statistics.median(times)


def time_interleaved(
    cases: dict[str, Callable[[], None]],
    rounds: int,
    reps_per_round: int,
    warmup: int = 3,
    per_call_steps: dict[str, int] | None = None,
) -> dict[str, float]:
    """Median milliseconds per step of each case, timing the cases in interleaved rounds.

    Interleaving spreads any drift of the machine (other load, clock changes) over all cases
    alike, so ratios taken from one run stay meaningful. ``per_call_steps[name]`` divides a
    call's time when one call runs several steps (e.g. a whole window of ``every`` steps).
    """
    per_call_steps = per_call_steps or {}
    for fn in cases.values():
        for _ in range(warmup):
            fn()
    samples: dict[str, list[float]] = {name: [] for name in cases}
    for _ in range(rounds):
        for name, fn in cases.items():
            for _ in range(reps_per_round):
                start = time.perf_counter()
                fn()
                samples[name].append((time.perf_counter() - start) / per_call_steps.get(name, 1))
    return {name: median_ms(ts) for name, ts in samples.items()}


def paper_mlp_setup(
    batch: int, seed: int, quick: bool = False, threads: int | None = None
) -> tuple[object, object, object, object]:
    """The benchmarks' shared case: the paper's CIFAR-100 MLP and one synthetic batch.

    Returns ``(model, loss_fn, x, y)``; ``quick`` shrinks the model for smoke tests.
    """
    import torch
    from torch import nn

    from ..models import mlp

    if threads:
        torch.set_num_threads(threads)
    torch.manual_seed(seed)
    in_dim, hidden, classes = (3072, (512, 256), 100) if not quick else (64, (32, 16), 10)
    model = mlp(in_dim, classes, hidden, dropout=0.3)
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, in_dim, generator=gen)
    y = torch.randint(0, classes, (batch,), generator=gen)
    return model, nn.CrossEntropyLoss(), x, y


def ratio_result(ms: dict[str, float], batch: int, steps_timed: int) -> dict[str, object]:
    """``plain_ms``, run facts, then ``NAME_ms`` and ``NAME_ratio`` (= NAME / plain) per case."""
    import platform

    import torch

    plain = ms["plain"]
    result: dict[str, object] = {
        "plain_ms": plain,
        "batch": batch,
        "steps_timed_per_case": steps_timed,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "machine": platform.machine(),
    }
    for name, value in ms.items():
        if name != "plain":
            result[f"{name}_ms"] = value
            result[f"{name}_ratio"] = value / plain
    return result
