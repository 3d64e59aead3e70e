"""FA step / plain step as ratios of median process CPU times, one thread, for any checkout.

The same script runs on the code before and after a change, which ``flatness bench overhead``
cannot (its options and cases change with the code):

    git archive 954e2e3 src | tar -x -C /tmp/orig
    PYTHONPATH=/tmp/orig/src python benchmarks/fa_cpu_ratios.py before
    PYTHONPATH=src python benchmarks/fa_cpu_ratios.py after

The paper's CIFAR-100 MLP (3072-512-256-100, ReLU, dropout 0.3), B = 128, synthetic data,
Adam with the fused kernel for every case, 24 steps per case in 4 interleaved rounds (whole
windows of 10 steps for ``fa_m5_k10``). CPU time moves much less than wall time on a machine
shared with other work.
"""

import copy
import statistics
import sys
import time

import torch

from flatness.experiments.running.bench import paper_mlp_setup
from flatness.methods import make_method

torch.set_num_threads(1)
base, loss_fn, x, y = paper_mlp_setup(128, 0)


def case(name, window=1, **hp):
    model = copy.deepcopy(base).train()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3, fused=True)
    method = make_method(name, model, loss_fn, **hp)

    def run():
        for _ in range(window):
            method.step(x, y, opt)

    return run, window


cases = {
    "plain": case("none"),
    "fa_m1_k1": case("fa", lam=0.01, probes=1, every=1, seed=0),
    "fa_m5_k1": case("fa", lam=0.01, probes=5, every=1, seed=0),
    "fa_m5_k10": case("fa", 10, lam=0.01, probes=5, every=10, seed=0),
}
samples = {name: [] for name in cases}
for run, _ in cases.values():
    for _ in range(3):
        run()
for _ in range(4):
    for name, (run, window) in cases.items():
        for _ in range(6 if window == 1 else 1):
            start = time.process_time()
            run()
            samples[name].append((time.process_time() - start) / window)
ms = {name: 1000 * statistics.median(v) for name, v in samples.items()}
label = sys.argv[1] if len(sys.argv) > 1 else ""
print(label, {k: round(v, 2) for k, v in ms.items()}, {k: round(v / ms["plain"], 2) for k, v in ms.items()})
