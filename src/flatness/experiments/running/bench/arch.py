"""``flatness bench arch``: FA on a CIFAR ResNet-20 and a small ViT, autograd vs first-order.

CIFAR-shaped random data (B = 128, 100 classes), SGD with momentum, CPU, every case of a model
timed in interleaved rounds in one process (:func:`flatness.experiments.running.bench.time_interleaved`).
Per model prefix (``resnet_``: ResNet-20, width 16, BatchNorm; ``vit_``: ViT, patch 4, dim 96,
depth 4, 3 heads, MLP ratio 2):

- ``plain_ms``: a plain SGD step (the ratios' denominator);
- ``fa_autodiff_m1_k1``: FA with one probe every step by double backward
  (``backend="autograd"``; the ViT's curvature pass on the math attention kernel);
- ``fa_fd_m1_k1`` / ``fa_fd_m1_k10``: the first-order estimator
  (``backend="finite-difference"``) every step / every 10 steps (timed over whole windows);
- ``curvature``: Geng et al.'s curvature method (α·mean per-example ‖∇ℓ_i‖², every step), by
  the per-example closed form of :mod:`flatness.per_example` (unfolded-patch-free convolutions);
- ``fd_rel_err``: ``|first-order / autograd − 1|`` of the Tr(H²) estimate on the same 4 probes,
  float32, the default step;
- ``params``: the model's number of parameters.

The machine's load average at the start and the end is part of the result (the figures are
ratios within one run, but a busy machine still blurs them).
"""

from __future__ import annotations

import copy
import os
from collections.abc import Callable

import torch
from torch import nn

from ....finite_difference import fd_sq_trace
from ....hutchinson import sq_trace
from ....methods import make_method
from ....passes import curvature_pass
from ....probes import sample_probes
from ...world.architectures import VisionTransformer, cifar_resnet, vit_small
from . import platform_facts, time_interleaved

__all__ = ["run_arch_bench"]

LAM = 0.01
REL_ERR_PROBES = 4


def _models(quick: bool) -> dict[str, Callable[[], nn.Module]]:
    if quick:
        return {
            "resnet": lambda: cifar_resnet(8, 4, 100),
            "vit": lambda: VisionTransformer(100, dim=12, depth=1, heads=2, mlp_ratio=2.0),
        }
    return {"resnet": lambda: cifar_resnet(20, 16, 100), "vit": lambda: vit_small(100)}


def _rel_err(model: nn.Module, x: torch.Tensor, y: torch.Tensor, seed: int) -> float:
    """First-order vs autograd Tr(H²) estimate on the same probes (the curvature pass's function)."""
    loss_fn = nn.functional.cross_entropy
    params = [p for p in model.parameters() if p.requires_grad]
    probes = sample_probes(params, REL_ERR_PROBES, seed=seed)
    with curvature_pass(model):
        exact = sq_trace(loss_fn(model(x), y), params, probe_vectors=probes, create_graph=False)
    fd = fd_sq_trace(model, loss_fn, x, y, params, probes, with_grad=False)
    return abs(float(fd.values.mean()) / float(exact) - 1.0)


def _bench_model(
    prefix: str, build: Callable[[], nn.Module], batch: int, rounds: int, reps: int, seed: int
) -> dict[str, object]:
    torch.manual_seed(seed)
    base = build().train()
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 3, 32, 32, generator=gen)
    y = torch.randint(0, 100, (batch,), generator=gen)
    loss_fn = nn.CrossEntropyLoss()

    def case(method: str, **hp: object) -> Callable[[], None]:
        model = copy.deepcopy(base)
        opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
        m = make_method(method, model, loss_fn, **hp)
        return lambda: m.step(x, y, opt) and None

    def window(fn: Callable[[], None], length: int) -> Callable[[], None]:
        def run() -> None:
            for _ in range(length):
                fn()

        return run

    fa = {"lam": LAM, "probes": 1, "seed": seed}
    cases = {
        "plain": case("none"),
        "fa_autodiff_m1_k1": case("fa", every=1, backend="autograd", **fa),
        "fa_fd_m1_k1": case("fa", every=1, backend="finite-difference", **fa),
        "fa_fd_m1_k10": window(case("fa", every=10, backend="finite-difference", **fa), 10),
        "curvature": case("curvature", alpha=LAM),
    }
    ms = time_interleaved(cases, rounds=rounds, reps_per_round=reps, warmup=1, per_call_steps={"fa_fd_m1_k10": 10})
    out: dict[str, object] = {
        f"{prefix}_params": sum(p.numel() for p in base.parameters()),
        f"{prefix}_plain_ms": ms["plain"],
    }
    for name, value in ms.items():
        if name != "plain":
            out[f"{prefix}_{name}_ms"] = value
            out[f"{prefix}_{name}_ratio"] = value / ms["plain"]
    out[f"{prefix}_fd_rel_err"] = _rel_err(copy.deepcopy(base), x, y, seed)
    return out


def run_arch_bench(
    batch: int = 128,
    rounds: int = 3,
    reps: int = 2,
    threads: int | None = None,
    seed: int = 0,
    quick: bool = False,
) -> dict[str, object]:
    """Run the benchmark on both models; one flat dictionary of figures (see the module docs)."""
    if threads:
        torch.set_num_threads(threads)
    result: dict[str, object] = {
        "batch": batch,
        **platform_facts(),
        "load_average_start": os.getloadavg()[0],
        "quick": quick,
    }
    for prefix, build in _models(quick).items():
        result.update(_bench_model(prefix, build, batch, rounds, reps, seed))
    result["load_average_end"] = os.getloadavg()[0]
    return result
