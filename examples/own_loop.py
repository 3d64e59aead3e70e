"""Your own training loop: the FA penalty λ·Tr(H²)/B in three lines, and a curvature monitor.

A small MLP on scikit-learn's digits (shipped with scikit-learn, no download), trained with
Adam on task loss + penalty; a CurvatureMonitor measures λ_max, Tr(H) and Tr(H²)/B on a fixed
held-out batch every 20 steps, into ``OUT/curvature.csv`` (and TensorBoard event files in
``OUT/tb`` when tensorboard is installed). About 10 s on a CPU.

    python examples/own_loop.py --out runs/own_loop
"""

import argparse
from pathlib import Path

import torch
from sklearn.datasets import load_digits
from torch import nn

from flatness import CurvatureMonitor, FlatnessPenalty


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("runs/own_loop"))
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--lam", type=float, default=0.01)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)

    torch.manual_seed(0)
    digits = load_digits()
    x = torch.tensor(digits.data, dtype=torch.float32) / 16.0
    y = torch.tensor(digits.target)
    train_x, train_y, held_x, held_y = x[:1400], y[:1400], x[1400:1528], y[1400:1528]

    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Dropout(0.1), nn.Linear(64, 10))
    loss_fn = nn.functional.cross_entropy
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    penalty = FlatnessPenalty(model, loss_fn, lam=args.lam, probes=5, every=10, seed=0)

    writer = None
    try:
        from torch.utils.tensorboard import SummaryWriter

        writer = SummaryWriter(log_dir=str(args.out / "tb"))
    except ImportError:  # pip install 'flatness[tensorboard]' for event files
        pass
    monitor = CurvatureMonitor(model, loss_fn, (held_x, held_y), every=20, path=args.out / "curvature.csv",
                               writer=writer)

    for epoch in range(args.epochs):
        order = torch.randperm(len(train_x))
        for start in range(0, len(order), 64):
            idx = order[start : start + 64]
            xb, yb = train_x[idx], train_y[idx]
            opt.zero_grad()
            loss = loss_fn(model(xb), yb) + penalty(xb, yb)  # the penalty: one more term
            loss.backward()
            opt.step()
            record = monitor.step()  # every 20th call measures; the model is left as it was
            if record is not None:
                print(f"step {record['step']:4d}  λ_max {record['lambda_max']:.4f}  "
                      f"Tr(H) {record['hessian_trace']:.3f}  Tr(H²)/B {record['hessian_sq_trace_per_B']:.5f}  "
                      f"({record['seconds']:.2f} s, {record['hvps']} HVPs)")
        with torch.no_grad():
            model.eval()
            accuracy = (model(held_x).argmax(1) == held_y).float().mean()
            model.train()
        print(f"epoch {epoch}: held-out accuracy {accuracy:.3f}, last Tr(H²) estimate {penalty.last_sq_trace:.3f}")
    if writer is not None:
        writer.close()
    print(f"curvature log: {args.out / 'curvature.csv'}")


if __name__ == "__main__":
    main()
