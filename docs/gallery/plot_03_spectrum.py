"""
λ_max, Tr(H) and the spectral density of a trained model
========================================================

:mod:`flatness.measures` measures the curvature of a trained model's loss on a data set,
matrix-free (only Hessian-vector products): the largest eigenvalues by Lanczos
(:func:`~flatness.measures.top_eigenvalues`), the trace by Hutchinson or Hutch++
(:func:`~flatness.measures.hessian_trace`), and the whole spectrum's density by stochastic
Lanczos quadrature (:func:`~flatness.measures.spectral_density`). Every measure runs the model
in eval mode and leaves its weights, buffers and modes as they were.
"""

# %%
# A small trained model
# ---------------------
import tempfile
from pathlib import Path

import matplotlib.pyplot as plt
import torch
from sklearn.datasets import load_digits
from torch import nn

from flatness.measures import hessian_trace, plot_spectral_density, spectral_density, top_eigenvalues

digits = load_digits()
x = torch.tensor(digits.data / 16.0, dtype=torch.float32)
y = torch.tensor(digits.target)
x_train, y_train = x[:1400], y[:1400]
torch.manual_seed(0)
model = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 10))
loss_fn = nn.CrossEntropyLoss()
optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
for _epoch in range(10):
    for idx in torch.randperm(len(x_train)).split(64):
        optimizer.zero_grad()
        loss_fn(model(x_train[idx]), y_train[idx]).backward()
        optimizer.step()

# the data the measures average over: the first 500 training examples, in batches of 250
batches = [(x_train[i : i + 250], y_train[i : i + 250]) for i in (0, 250)]

# %%
# The top of the spectrum and the trace
# -------------------------------------
spectrum = top_eigenvalues(model, loss_fn, batches, k=5, seed=0)
print("top eigenvalues:", [f"{v:.4g}" for v in spectrum.eigenvalues])
print(f"λ_max = {spectrum.lambda_max:.4g}, λ_1/λ_5 = {spectrum.condition_number:.3g}, "
      f"{spectrum.num_matvecs} Hessian-vector products")
for method in ("hutchinson", "hutch++"):
    trace = hessian_trace(model, loss_fn, batches, num_matvecs=60, method=method, seed=0)
    print(f"Tr(H) by {method}: {trace.value:.4g} ± {trace.stderr:.2g} (standard error)")

# %%
# The spectral density
# --------------------
# :func:`~flatness.measures.plot_spectral_density` writes the smoothed density (log scale) with
# the Ritz values as a rug; it draws on its own figure, leaving pyplot alone, so we show the
# PNG it wrote.
density = spectral_density(model, loss_fn, batches, num_steps=40, seed=0)
print(f"Ritz values from {density.ritz_range[0]:.3g} to {density.ritz_range[1]:.3g}; "
      f"Tr(H)/P from the density: {density.moment(1):.3g}")
with tempfile.TemporaryDirectory() as tmp:
    path = plot_spectral_density(density, Path(tmp) / "density.png", title="Hessian spectral density")
    image = plt.imread(path)
fig, ax = plt.subplots(figsize=(7, 4.7))
ax.imshow(image)
ax.set_axis_off()
fig.tight_layout()
plt.show()
