"""``flatness study TASK``: which flatness measures predict generalisation over a population.

The work is done by :mod:`flatness.experiments.reporting.study` (grid, runs, measurements) and
:mod:`flatness.experiments.reporting.study_report` (rank statistics, tables, plots); this module parses
and checks the command line, every argument before any work starts.
"""

from __future__ import annotations

import argparse

from ..experiments.reporting.study import GRIDS, get_grid, run_study
from ..experiments.running.specs import parse_shard
from ..experiments.world.plugins import resolve_task
from ..utils import FlatnessError

__all__ = ["add_cli"]


def _cmd_study(args: argparse.Namespace) -> int:
    args.task = resolve_task(args.task).name
    grid = get_grid(args.task, args.grid)
    if args.jobs < 1:
        raise FlatnessError(f"--jobs must be >= 1, got {args.jobs}")
    if args.shard:
        parse_shard(args.shard)  # before the --reparam check below: a malformed shard is the first error
        if args.reparam:
            raise FlatnessError("--reparam needs the whole population: drop --shard")
    if args.list:
        for spec, settings in grid.entries():
            print(spec.name, " ".join(f"{k}={v}" for k, v in settings.items()))
        return 0
    text = run_study(
        args.task,
        args.grid,
        args.out,
        jobs=args.jobs,
        shard=args.shard,
        data_dir=args.data_dir,
        download=False if args.no_download else None,
        progress=not args.quiet,
        retry_failed=args.retry_failed,
        plots=not args.no_plots,
        reparam=args.reparam,
        resamples=args.resamples,
    )
    print(text)
    return 0


def add_cli(sub: argparse._SubParsersAction) -> None:
    """Register ``flatness study`` on the subparsers ``sub``."""
    grids = sorted({f"{g} ({t})" for t, g in GRIDS})
    p = sub.add_parser(
        "study",
        help="does flatness predict generalisation? rank every measure over a population of models",
        description=(
            "Train (resumably) a population of TASK models over a declared crossed grid of learning "
            "rate, batch size, width, weight decay, dropout and method strength, every setting at "
            "every seed, each to the grid's stopping rule; measure every model with every flatness "
            "and reference measure; write Kendall's τ_a with the generalisation gap, the conditional "
            "τ given the training loss, Jiang et al.'s granulated ψ per axis and Ψ with crossed "
            "bootstrap intervals (settings × seeds), scatter plots and the viable lr × wd plane per "
            "method into OUT/TASK/study/GRID/."
        ),
    )
    p.add_argument("task", metavar="TASK", help="breast-cancer-mlp, cifar100-mlp, cifar100-resnet, or a task plugin "
                   "(FILE.py:FACTORY, package.module:FACTORY, an installed one)")
    p.add_argument("--grid", default=None,
                   help="the population (default: small, or crossed where a task has no small one); "
                        f"{', '.join(grids)}; "
                        "a plugin task: small or full, crossed around its protocol (lr, weight decay, method; full: "
                        "also batch size; its model's width and dropout are not varied)")
    p.add_argument("--out", default="runs", help="results root; runs in OUT/TASK (default: runs)")
    p.add_argument("--jobs", type=int, default=1, help="training runs in parallel processes (default 1)")
    p.add_argument("--shard", metavar="I/N", help="train and measure only the I-th of N slices (no report)")
    p.add_argument("--reparam", action="store_true",
                   help="also rescale one model's layers (Dinh et al.): which measures change")
    p.add_argument("--resamples", type=int, default=1000, help="bootstrap resamples (default 1000)")
    p.add_argument("--list", action="store_true", help="print the grid's runs and settings, train nothing")
    p.add_argument("--data-dir", help="data directory (default: $FLATNESS_DATA or ~/.cache/flatness)")
    p.add_argument("--no-download", action="store_true", help="never download missing data")
    p.add_argument("--retry-failed", action="store_true", help="re-run runs recorded as failed")
    p.add_argument("--no-plots", action="store_true", help="tables only")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=_cmd_study)
