"""
Loss landscapes in one and two dimensions
=========================================

:mod:`flatness.landscape` evaluates the loss of a model along directions in weight space: a 1-D
line or a 2-D plane through the trained weights along random, filter-normalised directions (Li
et al., 2018), and the straight line between two models. The model itself is never modified:
every point is evaluated functionally.
"""

# %%
import copy

import matplotlib.pyplot as plt
import numpy as np
import torch
from sklearn.datasets import load_digits
from torch import nn

from flatness.landscape import interpolate, surface_1d, surface_2d

digits = load_digits()
x = torch.tensor(digits.data[:1400] / 16.0, dtype=torch.float32)
y = torch.tensor(digits.target[:1400])
torch.manual_seed(0)
model = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 10))
initial = copy.deepcopy(model)
loss_fn = nn.CrossEntropyLoss()
optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
for _epoch in range(10):
    for idx in torch.randperm(len(x)).split(64):
        optimizer.zero_grad()
        loss_fn(model(x[idx]), y[idx]).backward()
        optimizer.step()
batches = [(x[:500], y[:500])]


def accuracy(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return (logits.argmax(1) == target).float().mean()


# %%
# A line and a plane through the trained weights
# ----------------------------------------------
# ``span`` is the range of the coordinates along the filter-normalised directions; ``seed``
# fixes the random directions. A metric (here accuracy) can be evaluated at the same points.
line = surface_1d(model, loss_fn, batches, span=1.0, num=41, seed=0, metric=accuracy, metric_name="accuracy")
plane = surface_2d(model, loss_fn, batches, span=1.0, num=21, seed=0)
path = interpolate(initial, model, loss_fn, batches, num=41)

fig, axes = plt.subplots(1, 3, figsize=(12, 3.6))
axes[0].plot(line.xs, line.loss, label="loss")
axes[0].set(xlabel="α (random direction)", ylabel="loss", title="1-D")
twin = axes[0].twinx()
twin.plot(line.xs, line.metric, color="C1", label="accuracy")
twin.set_ylabel("accuracy")
contour = axes[1].contourf(plane.xs, plane.ys, np.log10(plane.loss), levels=20)
axes[1].plot(0, 0, "w*", ms=10)
axes[1].set(xlabel="α", ylabel="β", title="2-D, log10 loss")
fig.colorbar(contour, ax=axes[1])
axes[2].plot(path.xs, path.loss)
axes[2].set(xlabel="t (0: initial weights, 1: trained)", ylabel="loss", title="interpolation")
fig.tight_layout()
plt.show()

# %%
# ``flatness landscape CHECKPOINT --task TASK --kind 1d|2d|interp|pca`` draws the same pictures
# for a checkpoint of the pipeline (:func:`flatness.landscape.plot_surface`), and
# :func:`flatness.landscape.pca_surface` lays the plane through a training trajectory.
print(f"loss at the trained weights {line.loss[len(line.xs) // 2]:.4f}; "
      f"largest loss on the plane {np.nanmax(plane.loss):.3g}; non-finite points {plane.num_nonfinite}")
