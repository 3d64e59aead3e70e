r"""``flatness connect CKPT_A CKPT_B``: mode connectivity of two checkpoints of one task.

Loss and accuracy along the straight line between the two models and along a quadratic Bézier
curve trained between them (:mod:`flatness.connectivity`), BatchNorm statistics re-estimated at
every point on the first ``--stat-examples`` training examples; evaluated on the first
``--examples`` of ``--split``. Prints both barriers (loss and error) and writes
``A_to_B_connect.png`` and ``A_to_B_connect.json`` into ``--out``::

    flatness connect runs/breast-cancer-mlp/checkpoints/none_seed0.pt \
        runs/breast-cancer-mlp/checkpoints/none_seed1.pt --task breast-cancer-mlp --out pictures/
"""

from __future__ import annotations

import argparse
import math
import time
import warnings
from pathlib import Path
from typing import Any

import torch

from ..utils import FlatnessError
from .inspect import SPARSE_NOTES, SPLITS, emit_warnings, load_for_task, print_result, task_accuracy, training_batches

__all__ = ["add_cli", "connect_command"]


def connect_command(args: argparse.Namespace) -> int:
    """Run ``flatness connect`` with the parsed ``args``; returns the exit status."""
    from ..connectivity import connect, plot_connectivity
    from ..experiments.running.checkpoints import load_checkpoint

    if args.num < 2:
        raise FlatnessError("--num must be >= 2")
    if args.curve_steps < 0 or args.stat_examples < 1:
        raise FlatnessError("--curve-steps must be >= 0 and --stat-examples >= 1")
    if not (math.isfinite(args.curve_lr) and args.curve_lr > 0):
        raise FlatnessError("--curve-lr must be a finite number > 0")
    if args.threads:
        torch.set_num_threads(args.threads)
    task, model_a, _, batches = load_for_task(
        args.checkpoint_a, args.task, split=args.split, examples=args.examples,
        batch_size=args.batch_size, data_dir=args.data_dir,
    )
    args.task = task.name  # a plugin reference names the task it made
    model_b, _ = load_checkpoint(args.checkpoint_b, task=args.task)
    size = args.curve_batch_size or task.config.batch_size
    train = training_batches(task, None, size, args.data_dir) if args.curve_steps else None
    stats = training_batches(task, args.stat_examples, task.config.batch_size, args.data_dir)
    start = time.perf_counter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        warnings.filterwarnings("ignore", message=SPARSE_NOTES)
        result = connect(model_a, model_b, task.loss_fn, batches, train, num=args.num, accuracy=task_accuracy(task),
                         stat_batches=stats, curve_steps=args.curve_steps, curve_lr=args.curve_lr, seed=args.seed)
    stem = f"{Path(args.checkpoint_a).stem}_to_{Path(args.checkpoint_b).stem}_connect"
    out = Path(args.out)
    result.info.update(task=args.task, split=args.split, examples=sum(int(y.shape[0]) for _, y in batches),
                       stat_examples=sum(int(y.shape[0]) for _, y in stats),
                       checkpoint_a=str(args.checkpoint_a), checkpoint_b=str(args.checkpoint_b),
                       seconds=time.perf_counter() - start)
    json_path = result.save_json(out / f"{stem}.json")
    png = plot_connectivity(result, out / f"{stem}.png", title=f"{args.task}: {stem[:-8]}")
    summary: dict[str, Any] = {
        "linear_barrier_loss": result.linear.barrier_loss,
        "linear_barrier_error": result.linear.barrier_error,
    }
    if result.bezier is not None:
        summary.update(bezier_barrier_loss=result.bezier.barrier_loss,
                       bezier_barrier_error=result.bezier.barrier_error)
    summary.update({k: v for k, v in result.info.items() if k not in ("checkpoint_a", "checkpoint_b")})
    summary.update(json=str(json_path), png=str(png))
    messages = emit_warnings(caught)
    if messages:
        summary["warnings"] = messages
    print_result(summary, args.json)
    return 0


def add_cli(sub: argparse._SubParsersAction) -> None:
    """Register ``flatness connect`` on the subparsers ``sub``."""
    p = sub.add_parser("connect", help="mode connectivity of two checkpoints: barriers, plot, JSON",
                       description="Loss and accuracy along the linear path and a trained quadratic Bézier "
                                   "curve between two checkpoints of one task, BatchNorm statistics "
                                   "re-estimated at each point; barrier = the largest rise above the "
                                   "line between the endpoints' values.")
    p.add_argument("checkpoint_a", metavar="CKPT_A", help="a checkpoint written by `flatness run`")
    p.add_argument("checkpoint_b", metavar="CKPT_B", help="another checkpoint of the same task")
    p.add_argument("--task", required=True, help="the checkpoints' task, e.g. breast-cancer-mlp, or its plugin "
                   "FILE.py:FACTORY / package.module:FACTORY")
    p.add_argument("--out", default=".", metavar="DIR", help="where the PNG and JSON go (default: .)")
    p.add_argument("--data-dir", default=None, help="data directory (default: $FLATNESS_DATA, ~/.cache/flatness)")
    p.add_argument("--split", default="train", choices=SPLITS, help="evaluation split (default: train)")
    p.add_argument("--examples", type=int, default=1000, help="the first N examples of the split (1000)")
    p.add_argument("--batch-size", type=int, default=None, help="evaluation batch size (memory only)")
    p.add_argument("--num", type=int, default=21, help="points per path, t from 0 to 1 (21)")
    p.add_argument("--stat-examples", type=int, default=2000,
                   help="training examples for re-estimating BatchNorm statistics (2000)")
    p.add_argument("--curve-steps", type=int, default=200, help="Adam steps of the Bézier curve (200; 0: none)")
    p.add_argument("--curve-lr", type=float, default=1e-3, help="its learning rate (1e-3)")
    p.add_argument("--curve-batch-size", type=int, default=None,
                   help="its training batch size (default: the task's B)")
    p.add_argument("--seed", type=int, default=0, help="seed of the curve's t and batch draws (0)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=connect_command)
