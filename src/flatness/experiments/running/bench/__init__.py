"""Benchmarks behind ``flatness bench NAME``: one module per benchmark, shared timing helpers.

Every figure is a ratio of median step times measured interleaved in one run
(:func:`time_interleaved`), so that a noisy machine slows every case alike.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

__all__ = ["cifar_subset", "time_interleaved", "paper_mlp_setup", "training_adam", "platform_facts", "ratio_result"]


def median_ms(times: list[float]) -> float:
    return 1000.0 * statistics.median(times)


def time_interleaved(
    cases: dict[str, Callable[[], None]],
    rounds: int,
    reps_per_round: int,
    warmup: int = 3,
    per_call_steps: dict[str, int] | None = None,
    cpu_ms: dict[str, float] | None = None,
) -> dict[str, float]:
    """Median milliseconds per step of each case, timing the cases in interleaved rounds.

    Interleaving spreads any drift of the machine (other load, clock changes) over all cases
    alike, so ratios taken from one run stay meaningful. ``per_call_steps[name]`` divides a
    call's time when one call runs several steps (e.g. a whole window of ``every`` steps).
    ``cpu_ms``, if given, receives the median process CPU time per step of each case (summed
    over threads): on a machine shared with other work it moves much less than wall time.
    """
    per_call_steps = per_call_steps or {}
    for fn in cases.values():
        for _ in range(warmup):
            fn()
    samples: dict[str, list[float]] = {name: [] for name in cases}
    cpu: dict[str, list[float]] = {name: [] for name in cases}
    for _ in range(rounds):
        for name, fn in cases.items():
            for _ in range(reps_per_round):
                start, start_cpu = time.perf_counter(), time.process_time()
                fn()
                steps = per_call_steps.get(name, 1)
                samples[name].append((time.perf_counter() - start) / steps)
                cpu[name].append((time.process_time() - start_cpu) / steps)
    if cpu_ms is not None:
        cpu_ms.update({name: median_ms(ts) for name, ts in cpu.items()})
    return {name: median_ms(ts) for name, ts in samples.items()}


def paper_mlp_setup(
    batch: int, seed: int, quick: bool = False, threads: int | None = None
) -> tuple[object, object, object, object]:
    """The benchmarks' shared case: the paper's CIFAR-100 MLP and one synthetic batch.

    Returns ``(model, loss_fn, x, y)``; ``quick`` shrinks the model for smoke tests.
    """
    import torch
    from torch import nn

    from ...world.models import mlp

    if threads:
        torch.set_num_threads(threads)
    torch.manual_seed(seed)
    in_dim, hidden, classes = (3072, (512, 256), 100) if not quick else (64, (32, 16), 10)
    model = mlp(in_dim, classes, hidden, dropout=0.3)
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, in_dim, generator=gen)
    y = torch.randint(0, classes, (batch,), generator=gen)
    return model, nn.CrossEntropyLoss(), x, y


def training_adam(model: object, lr: float) -> object:
    """The optimiser ``flatness run`` trains with.

    :func:`~flatness.experiments.running.training.make_optimizer`: Adam, fused kernel where
    available, so that every case's step is the one training takes.
    """
    from ...world.tasks import TrainConfig
    from ..training import make_optimizer

    return make_optimizer(model, TrainConfig(epochs=1, batch_size=1, lr=lr, weight_decay=0.0))  # type: ignore[arg-type]


def platform_facts() -> dict[str, object]:
    """Where a benchmark ran, named as run records name it.

    :mod:`..platforms`: threads, torch build, architecture and CPU model — ratios from different
    CPUs are not comparable.
    """
    import platform

    import torch

    from ..platforms import cpu_model

    return {
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "machine": platform.machine(),
        "cpu": cpu_model(),
    }


def ratio_result(
    ms: dict[str, float], batch: int, steps_timed: int, cpu_ms: dict[str, float] | None = None
) -> dict[str, object]:
    """The result: ``plain_ms``, run facts, then ``NAME_ms`` and ``NAME_ratio`` per case.

    ``NAME_ratio`` = NAME / plain; ``NAME_cpu_ratio`` from CPU times when ``cpu_ms`` is given.
    """
    import os

    plain = ms["plain"]
    result: dict[str, object] = {
        "plain_ms": plain,
        "batch": batch,
        "steps_timed_per_case": steps_timed,
        **platform_facts(),
        "load_average_1min": os.getloadavg()[0],
    }
    for name, value in ms.items():
        if name != "plain":
            result[f"{name}_ms"] = value
            result[f"{name}_ratio"] = value / plain
            if cpu_ms is not None:
                result[f"{name}_cpu_ratio"] = cpu_ms[name] / cpu_ms["plain"]
    return result


def cifar_subset(examples: int, data_dir: str | None) -> tuple["torch.Tensor", "torch.Tensor", str]:
    """The first ``examples`` CIFAR-100 training images (standardised), or synthetic stand-ins.

    Synthetic inputs stand in only where no directory was named: a ``data_dir`` without the
    data raises (a benchmark told where its data is must not time something else).
    """
    import torch

    from ...world.errors import SettingError
    from ...world.tasks import get_task

    try:
        splits = get_task("cifar100-mlp").load(data_dir, download=False)
        return splits.x_train[:examples].float(), splits.y_train[:examples].long(), "cifar100"
    except Exception as exc:  # no data here: the timings do not depend on the pixel values
        if data_dir is not None:
            raise SettingError(f"no CIFAR-100 in `data_dir` {data_dir}: {exc}", "data_dir") from exc
        gen = torch.Generator().manual_seed(0)
        x = torch.randn(examples, 3072, generator=gen)
        y = torch.randint(0, 100, (examples,), generator=gen)
        return x, y, f"synthetic N(0,1) ({type(exc).__name__}: {str(exc)[:80]})"
