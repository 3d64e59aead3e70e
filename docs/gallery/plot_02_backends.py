"""
The penalty's backends compared on one batch
============================================

:class:`flatness.FlatnessPenalty` computes Tr(H²) in one of several ways (``backend=``):

- ``"autograd"``: Hutchinson's estimator with Hessian-vector products by double backward;
- ``"layerwise"``: the same estimator in closed form for stacks of ``Linear`` layers and
  elementwise activations (:mod:`flatness.layerwise`) — same probes, same number;
- ``"finite-difference"``: Hv and the penalty's gradient from differences of ordinary gradients
  (:mod:`flatness.finite_difference`), no double backward, so it also runs where double backward
  cannot (``torch.compile``, fused attention kernels);
- ``"kfac"``: the Kronecker-factored approximation Σ_l Tr(A_l²)·Tr(G_l²) (:mod:`flatness.kfac`),
  a different quantity (the Gauss-Newton part of each layer's diagonal block), no probes.

``"auto"`` (the default) picks the closed form where the model allows it and autograd
otherwise. Below, each backend computes the penalty on the same mini-batch with the same probe
seed, and we time one training step with it against a plain step.
"""

# %%
import statistics
import time

import matplotlib.pyplot as plt
import torch
from sklearn.datasets import load_digits
from torch import nn

from flatness import FlatnessPenalty

digits = load_digits()
x = torch.tensor(digits.data[:128] / 16.0, dtype=torch.float32)
y = torch.tensor(digits.target[:128])
torch.manual_seed(0)
model = nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 128), nn.ReLU(), nn.Linear(128, 10))
loss_fn = nn.CrossEntropyLoss()

# %%
# Values
# ------
# ``penalty.objective(x, y)`` returns the task loss and task loss + penalty (the sum to
# back-propagate; the finite-difference backend reuses the task gradient through it).
# ``last_sq_trace`` is the Tr(H²) estimate of that call (K-FAC's Σ Tr(A²)Tr(G²) for ``"kfac"``).
BACKENDS = ("autograd", "layerwise", "finite-difference", "kfac")
values = {}
for backend in BACKENDS:
    penalty = FlatnessPenalty(model, loss_fn, lam=1.0, probes=10, backend=backend, seed=0)
    loss, total = penalty.objective(x, y)
    values[backend] = penalty.last_sq_trace
    print(f"{backend:>17}: Tr(H²) estimate {penalty.last_sq_trace:.6g}, penalty λ·Tr(H²)/B "
          f"{(total - loss).item():.6g}")

# %%
# ``autograd`` and ``layerwise`` agree to rounding (same probes); the finite-difference value
# approaches them as its step shrinks; K-FAC estimates another quantity.
#
# Cost of a training step
# ------------------------
# On the paper's CIFAR-100 MLP shape (3072-512-256-100, B = 128, random inputs, as ``flatness
# bench overhead`` times it): the median of 15 steps (forward, penalty, backward, Adam) per
# backend, in three interleaved rounds of 5, against a plain step — on the machine and at the
# load that built this page, so the figures are indicative only; ``benchmarks/RESULTS.md`` has
# the benchmark's figures with their machines and spreads.
shape_x = torch.randn(128, 3072)
shape_y = torch.randint(0, 100, (128,))


def make_case(backend: str | None):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3072, 512), nn.ReLU(), nn.Linear(512, 256), nn.ReLU(), nn.Linear(256, 100))
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-3)
    penalty = None if backend is None else FlatnessPenalty(net, loss_fn, lam=0.01, probes=5,
                                                            backend=backend, seed=0)

    def step() -> None:
        optimizer.zero_grad()
        if penalty is None:
            loss_fn(net(shape_x), shape_y).backward()
        else:
            penalty.objective(shape_x, shape_y)[1].backward()
        optimizer.step()

    step()  # warm-up (and the first call's one-time work)
    return step


cases = {"plain": make_case(None), **{backend: make_case(backend) for backend in BACKENDS}}
times: dict[str, list[float]] = {name: [] for name in cases}
for _ in range(3):
    for name, step in cases.items():
        for _ in range(5):
            start = time.perf_counter()
            step()
            times[name].append(time.perf_counter() - start)
median_ms = {name: 1000 * statistics.median(ts) for name, ts in times.items()}
ratios = {backend: median_ms[backend] / median_ms["plain"] for backend in BACKENDS}
print(f"plain step: {median_ms['plain']:.1f} ms ({torch.get_num_threads()} thread(s))")
for backend, ratio in ratios.items():
    print(f"{backend:>17}: {ratio:.2f} × a plain step (5 probes, curvature every step)")

fig, ax = plt.subplots(figsize=(6, 3))
ax.barh(list(ratios), list(ratios.values()))
ax.axvline(1.0, color="k", lw=0.8)
ax.set(xlabel="step time / plain step time (curvature every step)")
fig.tight_layout()
plt.show()

# %%
# In training the pass usually runs every k-th step (``every=k``), which divides its extra cost
# by about k. Which backend to use for which model: :doc:`/guide/penalty`.
