"""``flatness demo``: the Breast-Cancer MLP trained with and without the FA penalty.

A one-minute example of the library on scikit-learn's bundled data: the ``breast-cancer-mlp``
task's model and protocol on all 455 training samples (no validation split), same seed, λ = 0
and λ > 0, trained by the pipeline's one loop (:func:`flatness.experiments.running.training.train`).
Prints progress as it trains, then the test accuracy and the measured Tr(H²) of each final
model.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from typing import Any

import torch

from ..experiments.running.training import make_optimizer, train
from ..experiments.world.tasks import get_task
from ..hutchinson import measure_sq_trace
from ..methods import make_method
from ..utils import FlatnessError, eval_mode

__all__ = ["run_demo"]

TASK = "breast-cancer-mlp"


def check_demo_args(lam: float, epochs: int, seed: int) -> None:
    """:class:`FlatnessError` for settings the demo cannot train with (checked before any work).

    The protocol checks ``epochs`` in full (its upper bound: :class:`~flatness.experiments.world.config.TrainConfig`).
    """
    if not (math.isfinite(lam) and lam >= 0):
        raise FlatnessError(f"--lam must be finite and >= 0, got {lam}")
    if epochs < 1:
        raise FlatnessError(f"--epochs must be >= 1, got {epochs}")
    if seed < 0:
        raise FlatnessError(f"--seed must be >= 0, got {seed}")


def run_demo(lam: float = 0.01, epochs: int = 50, seed: int = 0, log: Any = None) -> list[dict[str, float]]:
    """Train the task's MLP with λ = 0 and λ = ``lam``; one result row per model.

    ``log(message)`` receives a progress line about every tenth of each training (default:
    stderr).
    """
    check_demo_args(lam, epochs, seed)
    say = log or (lambda message: print(message, file=sys.stderr, flush=True))
    task = get_task(TASK)
    config = task.config.replace(epochs=epochs, val_fraction=0.0)
    data = task.load(val_fraction=0.0)
    every = max(1, epochs // 10)
    rows = []
    for value in (0.0, lam):
        torch.manual_seed(seed)
        model = task.build_model(num_features=data.num_features)
        method = make_method("fa", model, task.loss_fn, lam=value, probes=5, every=10, seed=seed)

        def report(epoch: int, record: dict[str, Any], value: float = value) -> None:
            if epoch % every == 0 or epoch == epochs:
                say(
                    f"λ = {value:g}: epoch {epoch}/{epochs}, training loss {record['train_loss']:.4f}, "
                    f"test acc {record['test_acc']:.4f}"
                )

        start = time.perf_counter()
        history = train(
            model, method, make_optimizer(model, config), data, config,
            predict=task.predict, generator=torch.Generator().manual_seed(seed), on_epoch_end=report,
        )
        seconds = time.perf_counter() - start
        with eval_mode(model):
            loss = task.loss_fn(model(data.x_train), data.y_train)
            params = [p for p in model.parameters() if p.requires_grad]
            trace = measure_sq_trace(loss, params, probes=50, seed=1234)
        rows.append(
            {
                "lam": value,
                "test_acc": history.epochs[-1]["test_acc"],
                "sq_trace": trace.value,
                "sq_trace_stderr": trace.stderr,
                "seconds": seconds,
                "train_seconds": history.train_seconds,
            }
        )
    return rows


def _cmd(args: argparse.Namespace) -> int:
    rows = run_demo(args.lam, args.epochs, args.seed)
    print("Breast-Cancer MLP (512-256, dropout .3), Adam lr 1e-3, B=32, M=5 probes every 10 steps")
    print(f"{'lambda':>8}  {'test acc':>8}  {'Tr(H^2) (train, ±se)':>24}  {'time s':>7}")
    for r in rows:
        tr = f"{r['sq_trace']:.4g} ± {r['sq_trace_stderr']:.2g}"
        print(f"{r['lam']:>8g}  {r['test_acc']:>8.4f}  {tr:>24}  {r['seconds']:>7.1f}")
    return 0


def add_cli(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "demo",
        help="Breast-Cancer MLP with and without the FA penalty",
        description=(
            "Train the breast-cancer-mlp task's MLP twice with the same seed, without (λ = 0) "
            "and with the FA penalty λ·Tr(H²)/B, printing progress, then each model's test "
            "accuracy and measured Tr(H²)."
        ),
    )
    p.add_argument("--lam", type=float, default=0.01, metavar="λ",
                   help="strength λ of the FA penalty for the second model (finite, >= 0; default 0.01)")
    p.add_argument("--epochs", type=int, default=50, metavar="N", help="training epochs of each model (default 50)")
    p.add_argument("--seed", type=int, default=0, metavar="S",
                   help="seed of the initial weights, shuffling, dropout and probes (default 0)")
    p.set_defaults(func=_cmd)
