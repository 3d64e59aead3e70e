"""Where the time of two unmet speed targets goes (a diagnostic, not a `flatness bench` figure).

    python benchmarks/profile_costs.py kfac     # issue 14: K-FAC penalty step on the paper's MLP
    python benchmarks/profile_costs.py norms    # issue 12: autograd FA on ResNet-20, norm layers
    python benchmarks/profile_costs.py ops [B]  # issue 12: the same step's time by operator kind
    python benchmarks/profile_costs.py mlp [M]  # issue 15: a curvature step of FA on the paper's MLP
    FLATNESS_DATA=DATA python benchmarks/profile_costs.py eig   # issue 15: where λ_max's time goes

``kfac``: median step time of a plain step and of FA with ``backend="kfac"`` every step (the
case of ``flatness bench overhead``), then the K-FAC step's operators by self CPU time per step.
``norms``: median step time of a plain step and of autograd FA (M = 1, every step) on ResNet-20
with the curvature pass's norm layers from primitives (the library's policy, exact third
derivatives) and, for comparison only, with torch's fused norm kernels (wrong third derivatives):
how much of the autograd step the exact norms cost. ``ops``: the plain and the autograd FA step
on ResNet-20 (B = 32), each operator timed at the dispatcher (median over steps, alternating the
two steps), grouped into convolutions (forward and backward kernels) and the rest: the
convolution kernels alone, which an exact third derivative cannot skip, against the whole plain
step. ``mlp``: a plain step and an FA curvature step (M probes, default 5, every step) on the
paper's MLP, median wall times, then the curvature step's operators timed at the dispatcher
(largest first, by input shapes). ``eig``: `flatness bench measures`' λ_max case (1,000 CIFAR-100
images, the MLP after 50 Adam steps, relative accuracy 1e-3), three times: its wall time against
its products × the median single product, and the time inside the products, the rest of each
Lanczos step (α, the reorthogonalisation against the basis, β) and the basis updates. One
thread; cases interleaved.
"""

from __future__ import annotations

import copy
import statistics
import sys
import time
from collections import Counter
from collections.abc import Callable

import torch
from torch import nn
from torch.profiler import ProfilerActivity, profile
from torch.utils._python_dispatch import TorchDispatchMode

import flatness.passes as passes
import flatness.penalties as penalties
from flatness.experiments.running.bench import paper_mlp_setup, platform_facts, time_interleaved, training_adam
from flatness.experiments.world.architectures import cifar_resnet
from flatness.methods import make_method


def _paper_mlp_cases(**specs: tuple[str, dict[str, object]]) -> dict[str, Callable[[], object]]:
    """One training step per case (name -> (method, hyper-parameters)) on the benchmarks' paper
    MLP and batch, each case with its own copy of the model and its own optimiser.
    """
    base, loss_fn, x, y = paper_mlp_setup(128, 0, False, 1)

    def case(name: str, hp: dict[str, object]) -> Callable[[], object]:
        model = copy.deepcopy(base).train()
        opt = training_adam(model, 1e-3)
        method = make_method(name, model, loss_fn, **hp)
        return lambda: method.step(x, y, opt)

    return {label: case(name, hp) for label, (name, hp) in specs.items()}


def kfac() -> None:
    cases = _paper_mlp_cases(plain=("none", {}), fa_kfac_k1=("fa", dict(lam=0.01, every=1, seed=0, backend="kfac")))
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


class _OperatorTimer(TorchDispatchMode):
    """Seconds and calls per aten operator of the code run inside it, keyed by the operator's
    name, or by name and input shapes with ``by_shapes``.
    """

    def __init__(self, by_shapes: bool = False) -> None:
        super().__init__()
        self.by_shapes = by_shapes
        self.seconds: Counter[object] = Counter()
        self.calls: Counter[object] = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        start = time.perf_counter()
        out = func(*args, **(kwargs or {}))
        if self.by_shapes:
            key: object = (func.__name__, tuple(tuple(a.shape) for a in args if isinstance(a, torch.Tensor))[:3])
        else:
            key = func.__name__.split(".")[0]
        self.seconds[key] += time.perf_counter() - start
        self.calls[key] += 1
        return out


def ops(batch: int = 32, steps: int = 5) -> None:
    torch.manual_seed(0)
    model = cifar_resnet(20, 16, 100).train()
    x, y = torch.randn(batch, 3, 32, 32), torch.randint(0, 100, (batch,))
    opt = torch.optim.SGD(model.parameters(), lr=0.0)  # lr 0: every step sees the same weights
    loss_fn = nn.CrossEntropyLoss()
    cases = {"plain": make_method("none", model, loss_fn),
             "fa_autograd": make_method("fa", model, loss_fn, lam=1e-4, probes=1, every=1, seed=0, backend="autograd")}
    for m in cases.values():
        m.step(x, y, opt)
    wall: dict[str, list[float]] = {k: [] for k in cases}
    conv: dict[str, list[float]] = {k: [] for k in cases}
    kinds: dict[str, Counter[str]] = {k: Counter() for k in cases}
    for _ in range(steps):
        for name, m in cases.items():
            timer = _OperatorTimer()
            start = time.perf_counter()
            with timer:
                m.step(x, y, opt)
            wall[name].append(time.perf_counter() - start)
            conv[name].append(sum(v for k, v in timer.seconds.items() if "convolution" in str(k)))
            kinds[name].update(timer.seconds)
    med = {k: statistics.median(v) * 1e3 for k, v in wall.items()}
    med_conv = {k: statistics.median(v) * 1e3 for k, v in conv.items()}
    print(f"ResNet-20, B = {batch}, {steps} steps each (dispatcher timer on): step ms",
          {k: round(v) for k, v in med.items()}, "ratio", round(med["fa_autograd"] / med["plain"], 2))
    print("convolution kernels ms", {k: round(v) for k, v in med_conv.items()},
          "FA's convolutions alone / whole plain step", round(med_conv["fa_autograd"] / med["plain"], 2))
    for name, c in kinds.items():
        top = ", ".join(f"{k} {v / steps * 1e3:.0f}" for k, v in c.most_common(6))
        print(f"  {name}, ms per step by operator: {top}")


def mlp(probes: int = 5, steps: int = 5) -> None:
    fa = ("fa", dict(lam=0.01, probes=probes, every=1, seed=0))
    cases = _paper_mlp_cases(**{"plain": ("none", {}), f"fa_m{probes}_k1": fa})
    ms = time_interleaved(cases, rounds=5, reps_per_round=4)
    print("median ms per step", {k: round(v, 2) for k, v in ms.items()})
    timer = _OperatorTimer(by_shapes=True)
    with timer:
        for _ in range(steps):
            cases[f"fa_m{probes}_k1"]()
    total = sum(timer.seconds.values()) / steps * 1e3
    print(f"curvature step, operators timed at the dispatcher: {total:.1f} ms per step; largest:")
    for (name, shapes), sec in timer.seconds.most_common(20):
        print(f"  {sec / steps * 1e3:7.2f} ms  {timer.calls[(name, shapes)] // steps:3d}×  {name}  {shapes}")


def eig(runs: int = 3) -> None:
    import os

    import flatness.measures.eigen as eigen
    import flatness.measures.operator as operator
    from flatness.experiments.running.bench.measures import _cifar_subset, _HvpFloor
    from flatness.experiments.world.models import mlp as paper_mlp
    from flatness.measures import top_eigenvalues

    torch.manual_seed(0)
    x, y, _ = _cifar_subset(1000, os.environ.get("FLATNESS_DATA"))
    model = paper_mlp(3072, 100, (512, 256), dropout=0.3)
    loss_fn = nn.CrossEntropyLoss()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    gen = torch.Generator().manual_seed(0)
    model.train()
    for _ in range(50):  # as the benchmark does
        idx = torch.randint(0, len(y), (128,), generator=gen)
        opt.zero_grad(set_to_none=True)
        loss_fn(model(x[idx]), y[idx]).backward()
        opt.step()
    model.eval()
    floor = _HvpFloor(model, loss_fn, [(x, y)])
    spent: Counter[str] = Counter()

    def timed(cls: type, name: str) -> None:
        original = getattr(cls, name)

        def run(*args, **kwargs):  # type: ignore[no-untyped-def]
            start = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                spent[name] += time.perf_counter() - start

        setattr(cls, name, run)

    for cls, name in ((operator.HessianOperator, "_matmat"), (operator.HessianOperator, "_graph"),
                      (eigen._Lanczos, "expand"), (eigen._Lanczos, "push")):
        timed(cls, name)
    for _ in range(runs):
        hvp_s = statistics.median(w for w, _ in floor.sample(5))
        spent.clear()
        start = time.perf_counter()
        spec = top_eigenvalues(model, loss_fn, [(x, y)], k=1, tol=1e-3, seed=0)
        wall = time.perf_counter() - start
        n = spec.num_matvecs
        print(f"λ_max {spec.lambda_max:.4f}: {wall:.3f} s, {n} products × {hvp_s * 1e3:.1f} ms = overhead "
              f"{wall / (n * hvp_s):.3f}; in products {spent['_matmat']:.3f} s (graph {spent['_graph']:.3f}), "
              f"rest of the steps {spent['expand'] - spent['_matmat']:.3f} s, basis updates {spent['push']:.3f} s")


if __name__ == "__main__":
    torch.set_num_threads(1)
    print(platform_facts())
    if sys.argv[1] == "ops" and len(sys.argv) > 2:
        ops(batch=int(sys.argv[2]))
    elif sys.argv[1] == "mlp" and len(sys.argv) > 2:
        mlp(probes=int(sys.argv[2]))
    else:
        {"kfac": kfac, "norms": norms, "ops": ops, "mlp": mlp, "eig": eig}[sys.argv[1]]()
