"""``flatness bench NAME [--json]``: speed benchmarks; figures are ratios to a plain step in one run.

The benchmarks themselves live in :mod:`flatness.experiments.running.bench`; this module parses their
arguments and prints one table or one JSON object.
"""

from __future__ import annotations

import argparse
import json
import sys

from ..experiments.running.bench.arch import run_arch_bench
from ..experiments.running.bench.ddp import run_ddp_scaling
from ..experiments.running.bench.gpu import run_gpu_bench, summary_lines
from ..experiments.running.bench.measures import run_measures_bench
from ..experiments.running.bench.methods import run_methods_bench
from ..experiments.running.bench.overhead import run_overhead
from ..experiments.running.bench.variance import run_variance_bench

__all__ = ["add_cli", "print_result"]


def print_result(result: dict[str, object], as_json: bool, title: str) -> None:
    """Print ``result`` as one JSON object, or under ``title`` as one aligned line per key."""
    if as_json:
        print(json.dumps(result, sort_keys=True))
        return
    print(title)
    width = max(len(k) for k in result)
    for key, value in result.items():
        text = f"{value:.3f}" if isinstance(value, float) else str(value)
        print(f"  {key:<{width}}  {text}")


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _threads_and_quick(p: argparse.ArgumentParser, tiny: str) -> None:
    """The flags every benchmark shares after its own: thread count and the smoke-test size."""
    p.add_argument("--threads", type=_positive_int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--quick", action="store_true", help=f"{tiny}, for smoke tests")


def _cmd_overhead(args: argparse.Namespace) -> int:
    if args.steps < 1 or args.rounds < 1 or args.batch < 1:
        raise ValueError("--steps, --rounds and --batch must be >= 1")
    result = run_overhead(
        batch=args.batch, steps=args.steps, rounds=args.rounds, threads=args.threads, quick=args.quick
    )
    print_result(result, args.json, "FA penalty overhead (median step time, ratio to a plain step)")
    return 0


def _add_overhead(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("overhead", help="FA penalty step time vs a plain step (CIFAR-100 MLP shape)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--steps", type=int, default=24, help="timed steps (or windows) per case (>= 20)")
    p.add_argument("--rounds", type=int, default=4, help="interleaved timing rounds")
    _threads_and_quick(p, "tiny model")
    p.set_defaults(func=_cmd_overhead)


def _cmd_methods(args: argparse.Namespace) -> int:
    if args.steps < 1 or args.rounds < 1:
        raise ValueError("--steps and --rounds must be >= 1")
    if args.batch < 1:
        raise ValueError("--batch must be >= 1")
    result = run_methods_bench(
        batch=args.batch,
        steps=args.steps,
        rounds=args.rounds,
        threads=args.threads,
        quick=args.quick,
        vmap=args.vmap,
        profile=args.profile,
    )
    if args.json:  # profiles, if asked for, travel inside the JSON object as strings
        print_result(result, True, "")
        return 0
    tables = {k: result.pop(k) for k in ("profile_curvature", "profile_plain") if k in result}
    print_result(result, False, "Training methods: median step time and ratio to a plain step")
    for key, table in tables.items():
        print(f"\n{key}:\n{table}")
    return 0


def _add_methods(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("methods", help="step time of each method vs a plain step (CIFAR-100 MLP)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--steps", type=int, default=24, help="timed steps per case")
    p.add_argument("--rounds", type=int, default=4, help="interleaved timing rounds")
    _threads_and_quick(p, "tiny model")
    p.add_argument("--vmap", action="store_true", help="also time the per-example vmap fallback")
    p.add_argument("--profile", action="store_true", help="print a profile of a curvature step")
    p.set_defaults(func=_cmd_methods)


def _cmd_measures(args: argparse.Namespace) -> int:
    if args.examples < 1 or args.matvecs < 1 or args.grid < 2 or args.train_steps < 0:
        raise ValueError("--examples, --matvecs must be >= 1, --grid >= 2, --train-steps >= 0")
    if args.density_steps < 2:
        raise ValueError("--density-steps must be >= 2")
    result = run_measures_bench(
        examples=args.examples, matvecs=args.matvecs, grid=args.grid, train_steps=args.train_steps,
        threads=args.threads, data_dir=args.data_dir, quick=args.quick,
        density_steps=args.density_steps,
    )
    print_result(result, args.json, "Flatness measures on the CIFAR-100 MLP (seconds; overhead = time / HVP floor)")
    return 0


def _add_measures(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "measures", help="Tr(H), SLQ density, λ_max against the HVP floor; 21×21 surface (CIFAR MLP)"
    )
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--examples", type=int, default=1000)
    p.add_argument("--matvecs", type=int, default=100, help="Hutchinson products for Tr(H)")
    p.add_argument("--density-steps", type=int, default=80, help="Lanczos steps of the density")
    p.add_argument("--grid", type=int, default=21, help="points per axis of the 2D surface")
    p.add_argument("--train-steps", type=int, default=50, help="Adam steps before measuring")
    p.add_argument("--data-dir", default=None,
                   help="CIFAR-100 directory (default: $FLATNESS_DATA, then the cache, else synthetic inputs; "
                   "a named directory without it is an error)")
    _threads_and_quick(p, "tiny model and data")
    p.set_defaults(func=_cmd_measures)


def _cmd_ddp(args: argparse.Namespace) -> int:
    if args.steps < 10 or args.batch < 2:
        raise ValueError("--steps must be >= 10 and --batch >= 2")
    result = run_ddp_scaling(args.steps, args.batch, args.quick)
    print_result(result, args.json, "DDP scaling on CPU (gloo): samples per second, 2 ranks vs 1")
    return 0


def _add_ddp(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("ddp", help="2-rank vs 1-rank gloo throughput of the CIFAR-100 MLP")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--steps", type=int, default=40, help="timed steps per world size (>= 10)")
    p.add_argument("--batch", type=int, default=128, help="global mini-batch size")
    p.add_argument("--quick", action="store_true", help="tiny model, for smoke tests")
    p.set_defaults(func=_cmd_ddp)


def _cmd_variance(args: argparse.Namespace) -> int:
    if args.batch < 2 or args.draws < 10 or args.grad_draws < 2 or args.steps < 1 or args.rounds < 1:
        raise ValueError("--batch >= 2, --draws >= 10, --grad-draws >= 2, --steps and --rounds >= 1")
    if args.train_steps < 0 or args.examples < args.batch:
        raise ValueError("--train-steps must be >= 0 and --examples >= --batch")
    result = run_variance_bench(
        batch=args.batch, train_steps=args.train_steps, examples=args.examples, draws=args.draws,
        grad_draws=args.grad_draws, steps=args.steps, rounds=args.rounds, threads=args.threads,
        data_dir=args.data_dir, quick=args.quick,
    )
    print_result(result, args.json, "Tr(H²) estimators: variance × time relative to Hutchinson M = 5")
    return 0


def _add_variance(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("variance", help="variance × time of the penalty's Tr(H²) estimators (CIFAR-100 MLP)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--train-steps", type=int, default=500, help="Adam steps before measuring")
    p.add_argument("--examples", type=int, default=10000, help="CIFAR-100 training images used")
    p.add_argument("--draws", type=int, default=200, help="single-probe draws per estimator")
    p.add_argument("--grad-draws", type=int, default=12, help="draws for the gradient variance")
    p.add_argument("--steps", type=int, default=12, help="timed calls per estimator")
    p.add_argument("--rounds", type=int, default=4, help="interleaved timing rounds")
    p.add_argument("--data-dir", default=None,
                   help="CIFAR-100 directory (default: $FLATNESS_DATA, then the cache, else synthetic inputs; "
                   "a named directory without it is an error)")
    _threads_and_quick(p, "tiny model and data")
    p.set_defaults(func=_cmd_variance)


def _cmd_arch(args: argparse.Namespace) -> int:
    if args.rounds < 1 or args.reps < 1 or args.batch < 2:
        raise ValueError("--rounds and --reps must be >= 1 and --batch >= 2")
    result = run_arch_bench(
        batch=args.batch, rounds=args.rounds, reps=args.reps, threads=args.threads, quick=args.quick
    )
    print_result(result, args.json, "FA on ResNet-20 and a small ViT: step time ratios to a plain SGD step")
    return 0


def _add_arch(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("arch", help="FA (autograd vs first-order) on ResNet-20 and a small ViT, CIFAR shapes")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--rounds", type=int, default=3, help="interleaved timing rounds")
    p.add_argument("--reps", type=int, default=2, help="timed steps (or windows) per case and round")
    _threads_and_quick(p, "tiny models")
    p.set_defaults(func=_cmd_arch)


GPU_HELP = """\
Checks and times flatness on one CUDA GPU in at most ~8 minutes (--budget-s, default 420 s;
correctness always runs in full first, then timing cases that would overrun the budget are
skipped and recorded as skipped):

1. correctness, float32 on the GPU with TF32 off and on against float64 on the CPU (same
   weights, probes and batch): the FA penalty's Tr(H²) and gradient for every backend
   (autograd, layerwise, finite-difference, kfac, control variate) on the paper's MLP,
   ResNet-20 with BatchNorm and the ViT; SAM's and NRS's one-step updates; λ_max and Tr(H) of a
   small ResNet; tolerances per precision in the JSON;
2. 40 steps of cifar100-resnet's gpu protocol (ResNet-18, B = 128) for none, FA (first-order,
   every 10 steps) and SAM, and the projected time of the full 200-epoch protocol (synthetic
   images unless --data-dir, $FLATNESS_DATA or the cache holds CIFAR-100);
3. step time (ms and ratio to a plain step) and peak memory of a plain step, FA (M = 1 every
   step, M = 5 every 10), first-order FA (k = 1, 10), K-FAC, SAM, GNP, NRS and the curvature
   regulariser on the MLP (B = 128), ResNet-18 (B = 128) and ViT-Ti (B = 256), in float32 and
   under bf16 autocast.

Writes one JSON file (device, driver, CUDA, cuDNN and torch versions, every figure) and exits
with status 1 if any correctness case failed (after writing it). --dry-run runs the same
command on the CPU at tiny sizes in under a minute (no GPU needed).
"""


def _cmd_gpu(args: argparse.Namespace) -> int:
    result, path = run_gpu_bench(
        out=args.out, budget_s=args.budget_s, data_dir=args.data_dir, dry_run=args.dry_run,
        seed=args.seed, fault=args.inject_fault,
    )
    for line in summary_lines(result, path):
        print(line)
    if not result["ok"]:
        print(f"flatness: error: {len(result['correctness']['failures'])} correctness case(s) failed; see {path}",
              file=sys.stderr)
        return 1
    return 0


def _add_gpu(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "gpu", help="correctness vs float64, step time and memory of every method on one GPU (≤ 8 min)",
        description=GPU_HELP, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--out", default=None, help="the JSON file (default: benchmarks/gpu-DATE-DEVICE.json)")
    p.add_argument("--budget-s", type=float, default=420.0, help="seconds the whole command may take (default 420)")
    p.add_argument("--data-dir", default=None,
                   help="CIFAR-100 directory for the protocol timing (default: $FLATNESS_DATA, then the cache; "
                   "else synthetic images, said so in the JSON)")
    p.add_argument("--dry-run", action="store_true", help="run on the CPU at tiny sizes (no GPU needed; < 1 minute)")
    p.add_argument("--seed", type=int, default=0, help="seed of weights, batches and probes")
    p.add_argument("--inject-fault", default=None, help=argparse.SUPPRESS)  # test hook: corrupts matching cases
    p.set_defaults(func=_cmd_gpu)


def add_cli(sub: argparse._SubParsersAction) -> None:
    """Register ``flatness bench`` and its benchmarks on the subparsers ``sub``."""
    parser = sub.add_parser("bench", help="speed and memory benchmarks (ratios in one run)")
    bench_sub = parser.add_subparsers(dest="bench", metavar="BENCHMARK", parser_class=type(parser))
    bench_sub.required = True
    for add in (_add_overhead, _add_methods, _add_measures, _add_ddp, _add_variance, _add_arch, _add_gpu):
        add(bench_sub)
