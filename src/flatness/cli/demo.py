"""``flatness demo``: the Breast-Cancer MLP trained with and without the FA penalty.

A one-minute example of the library on scikit-learn's bundled data: same seed, same protocol,
λ = 0 and λ > 0; prints test accuracy and the measured Tr(H²) of each final model.
"""

from __future__ import annotations

import argparse
import time

import torch
from torch import nn

from ..experiments.data import load_breast_cancer
from ..experiments.models import mlp
from ..hutchinson import measure_sq_trace
from ..methods import make_method
from ..utils import eval_mode

__all__ = ["run_demo"]


def _bce(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return nn.functional.binary_cross_entropy_with_logits(logits.squeeze(-1), y)


def run_demo(lam: float = 0.01, epochs: int = 50, seed: int = 0) -> list[dict[str, float]]:
    data = load_breast_cancer()
    rows = []
    for value in (0.0, lam):
        torch.manual_seed(seed)
        model = mlp(data.num_features, 1, (512, 256), dropout=0.3)
        opt = torch.optim.Adam(model.parameters(), lr=1e-3, weight_decay=1e-4)
        method = make_method("fa", model, _bce, lam=value, probes=5, every=10, seed=seed)
        gen = torch.Generator().manual_seed(seed)
        start = time.perf_counter()
        model.train()
        for _ in range(epochs):
            order = torch.randperm(len(data.y_train), generator=gen)
            for idx in order.split(32):
                method.step(data.x_train[idx], data.y_train[idx], opt)
        seconds = time.perf_counter() - start
        with eval_mode(model):
            with torch.no_grad():
                pred = (model(data.x_test).squeeze(-1) > 0).float()
            acc = float((pred == data.y_test).float().mean())
            loss = _bce(model(data.x_train), data.y_train)
            params = [p for p in model.parameters() if p.requires_grad]
            trace = measure_sq_trace(loss, params, probes=50, seed=1234)
        rows.append(
            {
                "lam": value,
                "test_acc": acc,
                "sq_trace": trace.value,
                "sq_trace_stderr": trace.stderr,
                "seconds": seconds,
            }
        )
    return rows


def _cmd(args: argparse.Namespace) -> int:
    if args.lam < 0:
        raise ValueError(f"--lam must be >= 0, got {args.lam}")
    if args.epochs < 1:
        raise ValueError(f"--epochs must be >= 1, got {args.epochs}")
    rows = run_demo(args.lam, args.epochs, args.seed)
    print("Breast-Cancer MLP (512-256, dropout .3), Adam lr 1e-3, B=32, M=5 probes every 10 steps")
    print(f"{'lambda':>8}  {'test acc':>8}  {'Tr(H^2) (train, ±se)':>24}  {'time s':>7}")
    for r in rows:
        tr = f"{r['sq_trace']:.4g} ± {r['sq_trace_stderr']:.2g}"
        print(f"{r['lam']:>8g}  {r['test_acc']:>8.4f}  {tr:>24}  {r['seconds']:>7.1f}")
    return 0


def add_cli(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="Breast-Cancer MLP with and without the FA penalty")
    p.add_argument("--lam", type=float, default=0.01)
    p.add_argument("--epochs", type=int, default=50)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_cmd)
