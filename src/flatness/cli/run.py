"""``flatness run``, ``flatness report`` and ``flatness compare``: sweeps and their tables.

The work is done by :mod:`flatness.experiments` (runner, report, compare), which checks the
arguments, every one before any work starts; this module parses the command lines and names
the pipeline's parameters by their flags (``flag_names``, :mod:`flatness.cli`).

``--method-arg`` has one syntax in ``run`` and ``compare`` (:func:`parse_method_args`):
``KEY=VALUE`` sets a setting of the method (``compare``: of every compared method that takes
``KEY`` other than as its swept strength), ``METHOD.KEY=VALUE`` of one method only (``run``:
the method or one of its components, ``sam+fa`` with ``fa.lam=0.01``; ``compare``: one of the
compared methods, ``sam+fa.lam=0.01``). ``VALUE`` is JSON or a bare word. ``compare``'s
former ``METHOD:KEY=VALUE`` is still read, with a deprecation line on stderr (until 0.4).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..experiments.reporting.compare import COMPARE_METHODS, run_comparison
from ..experiments.reporting.equal_compute import run_equal_compute
from ..experiments.reporting.kfac_agreement import write_kfac_agreement
from ..experiments.reporting.report import write_report
from ..experiments.running.distributed import init_distributed, launched_by_torchrun, shutdown
from ..experiments.running.runner import check_run_options, run_grid
from ..experiments.running.specs import RunSpec, accepts, build_grid, method_class, parse_shard, select_shard
from ..experiments.world.plugins import resolve_task
from ..experiments.world.tasks import PAPER_TASKS, TASKS, get_task
from ..utils import FlatnessError

__all__ = ["add_cli", "check_device", "parse_method_args", "protocol_overrides", "TASK_HELP"]

TASK_HELP = (f"a built-in task ({', '.join(TASKS)}), an installed task plugin, or your own "
             "FILE.py:FACTORY / package.module:FACTORY (docs/own-task.md; `flatness tasks` lists them)")
METHOD_ARG_HELP = ("a setting of the method, KEY=VALUE, or of one method, METHOD.KEY=VALUE (repeatable; "
                   "VALUE is JSON or a word)")


def _parse_assignments(items: Sequence[str] | None, what: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for item in items or []:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise FlatnessError(f"{what} must look like KEY=VALUE, got {item!r}")
        try:
            out[key] = json.loads(raw)
        except ValueError:
            out[key] = raw  # a bare word: a string value
    return out


def parse_method_args(
    items: Sequence[str] | None, methods: Sequence[str], *, compared: bool = False
) -> dict[str, dict[str, Any]]:
    """``--method-arg`` items (module docs) as settings by method.

    For the ``methods`` of a run (one, ``compared=False``: a ``METHOD.`` prefix that is not the
    method itself is left on the key, a component's) or of a comparison (the prefix names a compared
    method).
    """
    out: dict[str, dict[str, Any]] = {m: {} for m in methods}
    for item in items or []:
        method, colon, rest = item.partition(":")
        if colon and "=" not in method:  # 0.3's compare spelling METHOD:KEY=VALUE
            print(f"flatness: warning: --method-arg {item}: METHOD:KEY=VALUE is deprecated (removed in 0.4); "
                  f"write {method}.{rest}", file=sys.stderr)
            item = f"{method}.{rest}"
        ((key, value),) = _parse_assignments([item], "--method-arg").items()
        prefix, dot, bare = key.partition(".")
        if dot and prefix in out:
            out[prefix][bare] = value
        elif not compared:
            out[methods[0]][key] = value  # a bare key, or a component's prefixed one (sam+fa: fa.lam)
        elif dot:
            raise FlatnessError(f"--method-arg {key}: {prefix!r} is not among the compared methods "
                                f"({', '.join(methods)}); add it to --methods or drop the --method-arg")
        else:
            takers = [m for m in methods if method_class(m).accepts(key) and method_class(m).hparam != key]
            if not takers:
                raise FlatnessError(f"--method-arg {key}: no compared method ({', '.join(methods)}) takes {key!r} "
                                    "as a setting")
            for m in takers:
                out[m][key] = value
    return {m: kwargs for m, kwargs in out.items() if kwargs}


# the pipeline's parameters by the flags that set them (the rest: --NAME, flatness.cli)
RUN_FLAGS = {"values": "--lambdas", "method_kwargs": "--method-arg", "model_kwargs": "--model-arg",
             "dist_ctx": "--ddp"}
COMPARE_FLAGS = {"values": "--grid", "grids": "--grid", "method_kwargs": "--method-arg",
                 "max_factor": "--max-budget-factor", "epochs_grid": "--budget-epochs"}

PROTOCOL_FLAGS = ("epochs", "batch_size", "lr", "warmup_epochs", "train_eval_samples")


def protocol_overrides(args: argparse.Namespace) -> dict[str, Any]:
    """The training-protocol flags a user gave (``--epochs``, ``--lr``, ...).

    The protocol checks them where it is built (:class:`~flatness.experiments.world.config.TrainConfig`,
    before any run starts); its error names the field, which :mod:`flatness.cli` spells as the flag.
    """
    return {k: getattr(args, k) for k in PROTOCOL_FLAGS if getattr(args, k) is not None}


def _add_protocol_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--epochs", type=int, help="override the task's number of epochs (a warm-up keeps its share)")
    p.add_argument("--batch-size", type=int, help="override the task's batch size B")
    p.add_argument("--lr", type=float, help="override the task's learning rate")
    p.add_argument(
        "--warmup-epochs",
        type=float,
        metavar="E",
        help="learning-rate warm-up length in epochs (default: the task's, scaled with --epochs)",
    )
    p.add_argument(
        "--train-eval-samples",
        type=int,
        metavar="N",
        help="evaluate the training loss/accuracy each epoch on the first N training samples (default: all)",
    )


def check_device(name: str) -> str:
    """``name`` if it is ``cpu``, ``cuda`` or ``cuda:N`` and usable here, else a ``FlatnessError``."""
    import torch

    try:
        device = torch.device(name)
    except RuntimeError:
        raise FlatnessError(f"--device must be cpu, cuda or cuda:N, got {name!r}") from None
    if device.type not in ("cpu", "cuda"):
        raise FlatnessError(f"--device must be cpu, cuda or cuda:N, got {name!r}")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise FlatnessError("--device cuda: this machine has no usable CUDA device")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise FlatnessError(f"--device {name}: only {torch.cuda.device_count()} CUDA device(s)")
    return name


def _tasks_from_args(names: Sequence[str]) -> list[str]:
    out: list[str] = []
    for name in names:
        if name == "all":
            out += list(PAPER_TASKS)
        else:
            out.append(resolve_task(name).name)
    return list(dict.fromkeys(out))


def _cmd_run(args: argparse.Namespace) -> int:
    tasks = _tasks_from_args(args.tasks)
    overrides = protocol_overrides(args)
    if args.protocol is not None:
        for task in tasks:
            get_task(task).protocol(args.protocol)
    check_device(args.device)
    method_kwargs = parse_method_args(args.method_arg, [args.method]).get(args.method, {})
    model_kwargs = _parse_assignments(args.model_arg, "--model-arg")
    for key, value in (("probes", args.probes), ("every", args.every)):
        if value is not None:
            if not accepts(args.method, key):
                raise FlatnessError(f"method {args.method!r} takes no --{key}")
            method_kwargs[key] = value
    specs: list[RunSpec] = []
    for task in tasks:
        specs += build_grid(
            task, args.method, args.lambdas, args.seeds, config_overrides=overrides, method_kwargs=method_kwargs,
            trajectory=args.trajectory, model_kwargs=model_kwargs, protocol=args.protocol,
        )
    if args.shard:
        index, count = parse_shard(args.shard)
        grid_size = len(specs)
        specs = select_shard(specs, index, count)
        if not specs:  # more shards than runs: this machine has nothing to do, and that is fine
            runs = f"{grid_size} run" + ("" if grid_size == 1 else "s")
            print(f"flatness: shard {index}/{count} of this grid has no runs (the grid has {runs}, fewer than "
                  f"{count} shards); nothing to do", file=sys.stderr)
            return 0
    ddp = args.ddp or launched_by_torchrun()
    check_run_options(specs, jobs=args.jobs, emulate_ranks=args.emulate_ranks, distributed=ddp)
    return _train_and_report(args, specs, init_distributed(args.backend) if ddp else None)


def _train_and_report(args: argparse.Namespace, specs: list[RunSpec], dist_ctx: Any) -> int:
    start = time.perf_counter()
    try:
        results = run_grid(
            specs, args.out, jobs=args.jobs, data_dir=args.data_dir, download=False if args.no_download else None,
            progress=not args.quiet, retry_failed=args.retry_failed, dist_ctx=dist_ctx,
            emulate_ranks=args.emulate_ranks, device=args.device,
        )
    finally:
        if dist_ctx is not None:
            shutdown()
    if dist_ctx is not None and not dist_ctx.is_main:
        return 0
    wall = time.perf_counter() - start
    print(f"{len(specs)} runs in {', '.join(results)}; wall time {wall:.1f} s", file=sys.stderr)
    for directory in results:
        text = write_report(directory, plots=not args.no_plots, measures=args.measures, data_dir=args.data_dir)
        print(text)
    return 0


def _add_run(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "run",
        help="sweep a method's strength over seeds on a paper task (resumable)",
        description=(
            f"Train TASK ({', '.join(TASKS)}, 'all' for the paper's three, an installed task plugin, "
            "or your own FILE.py:FACTORY / package.module:FACTORY) for every strength and seed, "
            "write one JSON per run, checkpoints, summary.md/csv and plots "
            "under OUT/TASK/. Re-running the same command skips finished runs."
        ),
    )
    p.add_argument("tasks", nargs="+", metavar="TASK", help=f"{TASK_HELP}; or 'all' ({', '.join(PAPER_TASKS)})")
    p.add_argument(
        "--method",
        default="fa",
        help="training method (default: fa); A+B composes two, e.g. sam+fa: --lambdas sweeps the "
        "first one's strength, --method-arg KEY=VALUE (or B.KEY=VALUE) sets the others",
    )
    p.add_argument("--lambdas", "--values", dest="lambdas", type=float, nargs="+", metavar="V",
                   help="strengths of the method's hyper-parameter (default for fa: 0 0.001 0.01 0.1 1)")
    p.add_argument("--seeds", type=int, default=3, help="number of seeds, 0..N-1 (default 3)")
    _add_protocol_flags(p)
    p.add_argument(
        "--protocol",
        metavar="NAME",
        help="the task's named training protocol; CIFAR image tasks: smoke (default, formerly cpu; "
        "3 epochs on a subset, not trained), cpu-full (cifar100-resnet) or gpu; a non-default "
        "protocol is part of the run names",
    )
    p.add_argument("--device", default="cpu",
                   help="cpu (default), cuda or cuda:N (under --ddp each rank uses its own device)")
    p.add_argument("--probes", type=int, help="Hutchinson probes M per curvature step (fa: 5)")
    p.add_argument("--every", type=int, help="curvature step every K steps (fa: 10)")
    p.add_argument("--method-arg", action="append", metavar="[METHOD.]KEY=VALUE", help=METHOD_ARG_HELP)
    p.add_argument("--model-arg", action="append", metavar="KEY=VALUE",
                   help="a model setting of the task, e.g. weight_scale=1.0 or hidden=[256,128] (repeatable; "
                        "VALUE is JSON or a word); a non-default setting is part of the run names")
    p.add_argument("--data-dir", help="data directory (default: $FLATNESS_DATA or ~/.cache/flatness)")
    p.add_argument("--out", default="runs", help="results root; a folder per task (default: runs)")
    p.add_argument("--jobs", type=int, default=1, help="runs in parallel processes (default 1)")
    p.add_argument("--trajectory", type=int, default=0, metavar="N",
                   help="keep N weight snapshots evenly along training (for landscape plots; default 0)")
    p.add_argument("--no-download", action="store_true", help="never download missing data")
    p.add_argument("--retry-failed", action="store_true", help="re-run runs recorded as failed")
    p.add_argument("--no-plots", action="store_true", help="write the tables but no PNG plots")
    p.add_argument("--measures", action="store_true",
                   help="the report also computes each final model's λ_max and Tr(H) (as `flatness report --measures`)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("--shard", metavar="I/N",
                   help="run only the I-th of N disjoint slices of the grid (several machines, one --out)")
    p.add_argument("--ddp", action="store_true",
                   help="train each run with DistributedDataParallel (automatic under torchrun)")
    p.add_argument("--backend", choices=("gloo", "nccl"), help="DDP backend (default: nccl on GPU, else gloo)")
    p.add_argument("--emulate-ranks", type=int, default=1, metavar="N",
                   help="one process doing the arithmetic of an N-rank DDP run (reference for --ddp)")
    p.set_defaults(func=_cmd_run, flag_names=RUN_FLAGS)


def _cmd_report(args: argparse.Namespace) -> int:
    if args.kfac_agreement:
        print(write_kfac_agreement(args.directory))
        return 0
    print(
        write_report(
            args.directory, plots=not args.no_plots, measures=args.measures,
            data_dir=args.data_dir,
        )
    )
    return 0


def _add_report(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "report",
        help="tables, t-tests and plots of a results directory",
        description="Summarise the run records in DIR into summary.md, summary.csv and PNG plots.",
    )
    p.add_argument("directory", metavar="DIR", help="a results directory (e.g. runs/breast-cancer-mlp)")
    p.add_argument("--no-plots", action="store_true", help="tables only")
    p.add_argument(
        "--measures",
        action="store_true",
        help="add λ_max and Tr(H) of every final model (computed from checkpoints once, cached)",
    )
    p.add_argument("--data-dir", help="data directory, to measure the final models on their training data")
    p.add_argument("--kfac-agreement", action="store_true",
                   help="instead: K-FAC against Hutchinson Tr(H²)/B of the final models (kfac_agreement.md)")
    p.set_defaults(func=_cmd_report)


def _parse_grids(items: Sequence[str] | None) -> dict[str, list[float]]:
    grids: dict[str, list[float]] = {}
    for item in items or []:
        method, sep, raw = item.partition("=")
        if not sep or not method or not raw:
            raise FlatnessError(f"--grid must look like METHOD=V1,V2,..., got {item!r}")
        try:
            grids[method] = [float(v) for v in raw.split(",")]
        except ValueError:
            raise FlatnessError(f"--grid values must be numbers, got {raw!r}") from None
    return grids


def _cmd_compare(args: argparse.Namespace) -> int:
    args.task = resolve_task(args.task).name
    overrides = protocol_overrides(args)
    if args.protocol is not None:
        get_task(args.task).protocol(args.protocol)
    methods = list(dict.fromkeys(["none", *(args.methods or COMPARE_METHODS)]))
    for method in methods:
        method_class(method)  # an unknown name: one clear error, before --method-arg reads the methods
    common = dict(
        methods=methods,
        seeds=args.seeds,
        grids=_parse_grids(args.grid),
        config_overrides=overrides,
        method_kwargs=parse_method_args(args.method_arg, methods, compared=True),
        protocol=args.protocol,
        jobs=args.jobs,
        data_dir=args.data_dir,
        download=False if args.no_download else None,
        progress=not args.quiet,
        plots=not args.no_plots,
    )
    if args.select_seeds is not None and args.equal_compute:
        raise FlatnessError("--select-seeds does not go with --equal-compute")
    if args.no_matched and not args.equal_compute:
        raise FlatnessError("--no-matched goes with --equal-compute only")
    if args.equal_compute:
        _, text = run_equal_compute(args.task, args.out, max_factor=args.max_budget_factor,
                                    epochs_grid=args.budget_epochs, matched=not args.no_matched, **common)
    else:
        _, text = run_comparison(args.task, args.out, measures=not args.no_measures,
                                 select_seeds=args.select_seeds, **common)
    print(text)
    print(f"written to {Path(args.out) / args.task / 'compare'}", file=sys.stderr)
    return 0


def _add_compare(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "compare",
        help="every method at its validation-chosen strength: accuracy, p-values, flatness, time",
        description=(
            "Train each method's small grid over seeds on TASK (resumable, reusing `flatness run` "
            "records in OUT/TASK), choose each method's strength on the validation split, and "
            "write OUT/TASK/compare/summary.md, compare.json and compare.png."
        ),
    )
    p.add_argument("task", metavar="TASK", help=TASK_HELP)
    p.add_argument("--methods", nargs="+", metavar="NAME",
                   help=f"methods to compare (default: {' '.join(COMPARE_METHODS)}; none is always included)")
    p.add_argument("--grid", action="append", metavar="METHOD=V1,V2",
                   help="override a method's grid of strengths (repeatable)")
    p.add_argument("--seeds", type=int, default=3, help="number of seeds, 0..N-1 (default 3)")
    p.add_argument("--protocol", metavar="NAME",
                   help="the task's named training protocol (e.g. cpu-full for cifar100-resnet)")
    p.add_argument("--select-seeds", type=int, metavar="K",
                   help="choose each strength on validation from the grid trained at seeds 0..K-1 only "
                        "(a scan), then train the chosen strengths at all --seeds")
    _add_protocol_flags(p)
    p.add_argument("--data-dir", help="data directory (default: $FLATNESS_DATA or ~/.cache/flatness)")
    p.add_argument("--out", default="runs", help="results root; runs in OUT/TASK (default: runs)")
    p.add_argument("--jobs", type=int, default=1, help="runs in parallel processes (default 1)")
    p.add_argument("--no-download", action="store_true", help="never download missing data")
    p.add_argument("--no-measures", action="store_true", help="skip λ_max and Tr(H) of the final models")
    p.add_argument("--no-plots", action="store_true", help="tables only")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("--method-arg", action="append", metavar="[METHOD.]KEY=VALUE",
                   help="a setting of the compared methods that take KEY (not as their swept strength), or of "
                        "one, e.g. fa.estimator=cv (repeatable; VALUE is JSON or a word; METHOD:KEY=VALUE is "
                        "deprecated)")
    p.add_argument("--equal-compute", action="store_true",
                   help="train every method x strength at each --budget-epochs, count compute as steps x "
                        "CPU cost per step, set each against `none` at the same budget, the Pareto front "
                        "over all; writes equal_compute.md/.json/.png")
    p.add_argument("--budget-epochs", type=int, nargs="+", metavar="E",
                   help="with --equal-compute: the epoch counts every configuration trains for "
                        "(default: 1x and 2x the protocol's)")
    p.add_argument("--max-budget-factor", type=float, default=10.0,
                   help="with --equal-compute: at most this many times the protocol's epochs for `none`")
    p.add_argument("--no-matched", action="store_true",
                   help="with --equal-compute: train no budget-matched `none` runs (the budget curves and "
                        "the Pareto front without the tests at equal budget)")
    p.set_defaults(func=_cmd_compare, flag_names=COMPARE_FLAGS)


def add_cli(sub: argparse._SubParsersAction) -> None:
    """Register ``flatness run``, ``report`` and ``compare`` on the subparsers ``sub``."""
    _add_run(sub)
    _add_report(sub)
    _add_compare(sub)
