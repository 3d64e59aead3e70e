"""Where the time of two unmet speed targets goes (a diagnostic, not a `flatness bench` figure).

    python benchmarks/profile_costs.py kfac     # issue 14: K-FAC penalty step on the paper's MLP
    python benchmarks/profile_costs.py norms    # issue 12: autograd FA on ResNet-20, norm layers

``kfac``: median step time of a plain step and of FA with ``backend="kfac"`` every step (the
case of ``flatness bench overhead``), then the K-FAC step's operators by self CPU time per step.
``norms``: median step time of a plain step and of autograd FA (M = 1, every step) on ResNet-20
with the curvature pass's norm layers from primitives (the library's policy, exact third
derivatives) and, for comparison only, with torch's fused norm kernels (wrong third derivatives):
how much of the autograd step the exact norms cost. One thread; cases interleaved.
"""

from __future__ import annotations

import copy
import sys
from collections.abc import Callable

import torch
from torch import nn
from torch.profiler import ProfilerActivity, profile

import flatness.passes as passes
import flatness.penalties as penalties
from flatness.experiments.architectures import cifar_resnet
from flatness.experiments.bench import paper_mlp_setup, platform_facts, time_interleaved, training_adam
from flatness.methods import make_method


def kfac() -> None:
    base, loss_fn, x, y = paper_mlp_setup(128, 0, False, 1)

    def case(name: str, **hp: object) -> Callable[[], object]:
        model = copy.deepcopy(base).train()
        opt = training_adam(model, 1e-3)
        method = make_method(name, model, loss_fn, **hp)
        return lambda: method.step(x, y, opt)

    cases = {"plain": case("none"), "fa_kfac_k1": case("fa", lam=0.01, every=1, seed=0, backend="kfac")}
    ms = time_interleaved(cases, rounds=6, reps_per_round=10)
    print({k: round(v, 2) for k, v in ms.items()}, "ratio", round(ms["fa_kfac_k1"] / ms["plain"], 3))
    steps = 10
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        for _ in range(steps):
            cases["fa_kfac_k1"]()
    rows = sorted(prof.key_averages(group_by_input_shape=True), key=lambda e: -e.self_cpu_time_total)
    print("K-FAC step, self CPU ms per step (profiler on), by operator and input shapes:")
    for e in rows[:14]:
        print(f"  {e.self_cpu_time_total / 1e3 / steps:7.2f}  {e.count // steps:3d}×  {e.key}  {e.input_shapes}")


def norms(batch: int = 32) -> None:
    torch.manual_seed(0)
    model = cifar_resnet(20, 16, 100).train()
    x, y = torch.randn(batch, 3, 32, 32), torch.randint(0, 100, (batch,))
    opt = torch.optim.SGD(model.parameters(), lr=0.0)  # lr 0: every case sees the same weights
    loss_fn = nn.CrossEntropyLoss()
    plain = make_method("none", model, loss_fn)
    fa = make_method("fa", model, loss_fn, lam=1e-4, probes=1, every=1, seed=0, backend="autograd")
    exact = passes.curvature_pass

    def fused_norms(model: nn.Module, **kw: object):  # type: ignore[no-untyped-def]
        return exact(model, **{**kw, "exact_norms": False})

    def fa_fused() -> None:
        penalties.curvature_pass = fused_norms  # for this comparison only
        try:
            fa.step(x, y, opt)
        finally:
            penalties.curvature_pass = exact

    cases = {"plain": lambda: plain.step(x, y, opt), "fa_autograd_exact_norms": lambda: fa.step(x, y, opt),
             "fa_autograd_fused_norms": fa_fused}
    ms = time_interleaved(cases, rounds=3, reps_per_round=1, warmup=1)
    print(f"ResNet-20, B = {batch}:", {k: round(v) for k, v in ms.items()},
          {k: round(v / ms["plain"], 2) for k, v in ms.items() if k != "plain"})


if __name__ == "__main__":
    torch.set_num_threads(1)
    print(platform_facts())
    {"kfac": kfac, "norms": norms}[sys.argv[1]]()
