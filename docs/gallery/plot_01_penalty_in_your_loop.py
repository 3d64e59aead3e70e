"""
The penalty in your own training loop
=====================================

:class:`flatness.FlatnessPenalty` adds the FA term λ·Tr(H²)/B to the loss of any PyTorch loop:
construct it with the model and the task loss, then add ``penalty(x, y)`` to the loss of each
mini-batch. Here it trains a small MLP on scikit-learn's digits, once without the penalty
(λ = 0) and once with it, from the same initial weights and data order.
"""

# %%
# Data and model
# --------------
# 1,797 8×8 images of digits (pixel values 0–16, scaled to [0, 1]); a fixed stratified test
# split of 20 %.
import matplotlib.pyplot as plt
import torch
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch import nn

from flatness import FlatnessPenalty
from flatness.measures import hessian_sq_trace

digits = load_digits()
x_train, x_test, y_train, y_test = train_test_split(
    digits.data, digits.target, test_size=0.2, stratify=digits.target, random_state=0
)
x_train, x_test = (torch.tensor(a / 16.0, dtype=torch.float32) for a in (x_train, x_test))
y_train, y_test = torch.tensor(y_train), torch.tensor(y_test)


def make_model() -> nn.Module:
    return nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Dropout(0.2), nn.Linear(128, 10))


loss_fn = nn.CrossEntropyLoss()

# %%
# The training loop
# -----------------
# The only lines the penalty adds to an ordinary loop are its construction and ``+ penalty(x, y)``.
# With ``every=2`` the curvature pass runs on every second mini-batch (the penalty is an exact
# zero on the others); ``seed`` makes the probes reproducible. After each epoch we measure the
# eval-mode Tr(H²) of the test loss with :func:`flatness.measures.hessian_sq_trace` (30
# Hutchinson products), the same way for both models.


def train(lam: float, epochs: int = 15, batch_size: int = 64) -> dict[str, list[float]]:
    torch.manual_seed(0)
    model = make_model()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    penalty = FlatnessPenalty(model, loss_fn, lam=lam, probes=5, every=2, seed=0)
    order = torch.Generator().manual_seed(0)
    history: dict[str, list[float]] = {"test_acc": [], "sq_trace": []}
    for _ in range(epochs):
        model.train()
        for idx in torch.randperm(len(x_train), generator=order).split(batch_size):
            x, y = x_train[idx], y_train[idx]
            loss = loss_fn(model(x), y) + penalty(x, y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        model.eval()
        with torch.no_grad():
            history["test_acc"].append((model(x_test).argmax(1) == y_test).float().mean().item())
        estimate = hessian_sq_trace(model, loss_fn, [(x_test, y_test)], num_matvecs=30, seed=0)
        history["sq_trace"].append(estimate.value)
    return history


runs = {lam: train(lam) for lam in (0.0, 0.1)}
for lam, history in runs.items():
    print(f"λ = {lam}: final test accuracy {history['test_acc'][-1]:.4f}, "
          f"final Tr(H²) of the test loss {history['sq_trace'][-1]:.3g}")

# %%
# What the two runs did
# ---------------------
# Test accuracy and the measured Tr(H²) after every epoch. One seed on a small problem: this
# shows the mechanics, not an effect of the penalty (see the results pages for tests over seeds).
fig, (ax_acc, ax_tr) = plt.subplots(1, 2, figsize=(9, 3.5))
for lam, history in runs.items():
    epochs = range(1, len(history["test_acc"]) + 1)
    ax_acc.plot(epochs, history["test_acc"], marker="o", ms=3, label=f"λ = {lam}")
    ax_tr.plot(epochs, history["sq_trace"], marker="o", ms=3, label=f"λ = {lam}")
ax_acc.set(xlabel="epoch", ylabel="test accuracy")
ax_tr.set(xlabel="epoch", ylabel="Tr(H²) of the test loss", yscale="log")
ax_acc.legend()
fig.tight_layout()
plt.show()
