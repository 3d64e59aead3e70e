"""``flatness measure`` and ``flatness landscape``: flatness of a saved checkpoint, and pictures.

Both commands load a checkpoint written by the experiment runner (``flatness run``) for a task,
and evaluate it on a fixed subset of a split (default: the first 1,000 training examples, in
their stored order, the model in eval mode)::

    flatness measure runs/cifar100-mlp/checkpoints/fa_lam0.01_seed0.pt --task cifar100-mlp --json
    flatness measure CKPT --task breast-cancer-mlp --measures lambda_max hessian_trace
    flatness landscape CKPT --task cifar100-mlp --kind 2d --out pictures/
    flatness landscape CKPT_LAM0 --other CKPT_LAM001 --task cifar100-mlp --kind interp --out pictures/
    flatness landscape CKPT --task cifar100-mlp --kind pca --out pictures/   # needs --trajectory N runs

``landscape --kind interp`` re-estimates BatchNorm running statistics at every point on the first
``--examples`` training examples (as ``flatness connect`` does). ``measure`` prints one JSON object
with ``--json`` (keys such as ``hessian_trace``,
``hessian_sq_trace``, ``lambda_max``, ``eps_sharpness``, ``fisher_trace``), else one line per
key. ``landscape`` writes ``NAME_KIND.npz`` and ``NAME_KIND.png`` into ``--out`` (atomically).
Bad input (a checkpoint of another task, k above the number of parameters, an unknown measure)
is one error line and exit code 2; non-finite losses on a landscape grid are marked and reported
as warnings, and the picture is still drawn.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from ..utils import FlatnessError, take_first

__all__ = [
    "add_cli", "emit_warnings", "landscape_command", "load_for_task", "measure_command", "print_result",
    "task_accuracy", "training_batches",
]

SPLITS = ("train", "test", "val")
KINDS = ("1d", "2d", "interp", "pca")
EXTRA_MEASURES = ("spectral_density",)
SPARSE_NOTES = "Sparse (CSR tensor support|invariant checks)"  # torch's notes, not for the user


def _split(splits: Any, split: str) -> tuple[Any, Tensor]:
    if split == "val":
        if getattr(splits, "x_val", None) is None:
            raise FlatnessError("this task has no validation split")
        return splits.x_val, splits.y_val
    return (splits.x_train, splits.y_train) if split == "train" else (splits.x_test, splits.y_test)


def load_for_task(
    checkpoint: str | Path,
    task_name: str,
    *,
    split: str = "train",
    examples: int = 1000,
    batch_size: int | None = None,
    data_dir: str | None = None,
) -> tuple[Any, nn.Module, dict[str, Any], list[tuple[Any, Tensor]]]:
    """``(task, model, meta, batches)``: the checkpoint's model and the first ``examples`` of a split.

    Raises:
        FlatnessError: unknown task, missing data, or a checkpoint that does not fit the task.
    """
    from ..experiments.running.checkpoints import load_checkpoint
    from ..experiments.world.data import iterate_batches
    from ..experiments.world.plugins import resolve_task

    task = resolve_task(task_name)
    task_name = task.name
    if examples < 1:
        raise FlatnessError(f"--examples must be >= 1, got {examples}")
    if split not in SPLITS:
        raise FlatnessError(f"--split must be one of {SPLITS}, got {split!r}")
    model, meta = load_checkpoint(checkpoint, task=task_name)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=SPARSE_NOTES)
        splits = task.load(data_dir)
        x, y = _split(splits, split)
        x, y = take_first(x, examples), y[:examples]
    features = int(x.shape[1]) if x.dim() == 2 else None
    expected = getattr(task, "num_features", None)
    if features is not None and expected is not None and features != expected:
        raise FlatnessError(f"the data has {features} features, the {task_name} model expects {expected}")
    size = batch_size or getattr(task.config, "eval_batch_size", 1024)
    batches = list(iterate_batches(x, y, size, shuffle=False))
    return task, model, meta, batches


def training_batches(
    task: Any, examples: int | None, batch_size: int, data_dir: str | None
) -> list[tuple[Any, Tensor]]:
    """The first ``examples`` (``None``: all) of the task's training split, in batches, in order."""
    from ..experiments.world.data import iterate_batches

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=SPARSE_NOTES)
        splits = task.load(data_dir)
        x, y = splits.x_train, splits.y_train
        if examples is not None:
            x, y = take_first(x, examples), y[:examples]
        return list(iterate_batches(x, y, batch_size, shuffle=False))


def emit_warnings(caught: Sequence[warnings.WarningMessage]) -> list[str]:
    """Print each distinct caught warning once on stderr (``flatness: warning: ...``); return them."""
    messages = list(dict.fromkeys(str(w.message) for w in caught))
    for message in messages:
        print(f"flatness: warning: {message}", file=sys.stderr)
    return messages


def _jsonable(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None if math.isnan(value) else ("inf" if value > 0 else "-inf")
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    return value


def print_result(result: dict[str, Any], as_json: bool) -> None:
    """``result`` on stdout: one JSON object (``as_json``), else aligned ``key  value`` lines."""
    if as_json:
        print(json.dumps(_jsonable(result), sort_keys=True))
        return
    width = max(len(k) for k in result)
    for key, value in result.items():
        if isinstance(value, float):
            text = f"{value:.6g}"
        elif isinstance(value, list):
            text = ", ".join(f"{v:.6g}" if isinstance(v, float) else str(v) for v in value)
        else:
            text = str(value)
        print(f"{key:<{width}}  {text}")


def _parse_measures(raw: Sequence[str] | None) -> list[str]:
    from ..measures import DEFAULT_MEASURES, MEASURES

    if not raw:
        return list(DEFAULT_MEASURES)
    names = [n.strip() for item in raw for n in item.split(",") if n.strip()]
    if "all" in names:
        return list(MEASURES) + list(EXTRA_MEASURES)
    known = set(MEASURES) | set(EXTRA_MEASURES)
    unknown = [n for n in names if n not in known]
    if unknown:
        raise FlatnessError(
            f"unknown measure(s) {', '.join(unknown)}; choose from {', '.join(sorted(known))} or all"
        )
    return names


def _require_positive(args: argparse.Namespace, flags: Sequence[str]) -> None:
    """A :class:`FlatnessError` naming the first of ``flags`` that is set but not a finite number > 0."""
    for flag in flags:
        value = getattr(args, flag)
        if value is not None and not (math.isfinite(value) and value > 0):
            raise FlatnessError(f"--{flag.replace('_', '-')} must be a finite number > 0")


def _check_measure_args(args: argparse.Namespace, names: list[str]) -> None:
    """A :class:`FlatnessError` naming the first of ``flatness measure``'s settings out of its range."""
    if "spectral_density" in names and not args.plot_dir:
        raise FlatnessError("the spectral_density measure writes a plot: give --plot-dir DIR")
    for flag in ("matvecs", "k", "sharpness_steps", "noise_samples", "density_steps"):
        if getattr(args, flag) < 1:
            raise FlatnessError(f"--{flag.replace('_', '-')} must be >= 1")
    _require_positive(args, ("eps", "adaptive_eps", "sigma", "divergence_eps"))
    if args.noise_samples < 2:
        raise FlatnessError("--noise-samples must be >= 2")
    _require_positive(args, ("entropy_gamma", "entropy_noise", "entropy_step_size"))
    if args.entropy_steps < 6 or args.entropy_nodes < 1:
        raise FlatnessError("--entropy-steps must be >= 6 and --entropy-nodes >= 1")


def _spectral_density_files(
    args: argparse.Namespace, model: nn.Module, loss_fn: Callable[..., Tensor], batches: list[Any]
) -> dict[str, Any]:
    """The SLQ spectral density written to ``--plot-dir`` (a PNG and an NPZ): the result's entries."""
    from ..measures import plot_spectral_density, spectral_density

    dens = spectral_density(model, loss_fn, batches, args.density_steps, args.density_repeats, seed=args.seed)
    stem = Path(args.checkpoint).stem
    out = Path(args.plot_dir)
    return {
        "spectral_density_png": str(plot_spectral_density(dens, out / f"{stem}_density.png")),
        "spectral_density_npz": str(dens.save(out / f"{stem}_density.npz")),
        "spectral_density_ritz_range": list(dens.ritz_range),
    }


def measure_command(args: argparse.Namespace) -> int:
    """Run ``flatness measure`` with the parsed ``args``; returns the exit status."""
    from ..measures import MeasureOptions, compute_measures
    from ..measures.io import save_json

    names = _parse_measures(args.measures)
    _check_measure_args(args, names)
    if args.threads:
        torch.set_num_threads(args.threads)
    task, model, meta, batches = load_for_task(
        args.checkpoint, args.task, split=args.split, examples=args.examples,
        batch_size=args.batch_size, data_dir=args.data_dir,
    )
    args.task = task.name  # a plugin reference names the task it made
    from ..experiments.running.checkpoints import checkpoint_initial_model

    initial = checkpoint_initial_model(args.checkpoint, args.task)  # rebuilt from the run's seed
    options = MeasureOptions(
        seed=args.seed, matvecs=args.matvecs, k=args.k, eps=args.eps, adaptive_eps=args.adaptive_eps,
        sharpness_steps=args.sharpness_steps, sigma=args.sigma, noise_samples=args.noise_samples,
        divergence_eps=args.divergence_eps, initial=None if initial is None else initial.state_dict(),
        entropy_gamma=args.entropy_gamma, entropy_noise=args.entropy_noise, entropy_steps=args.entropy_steps,
        entropy_step_size=args.entropy_step_size, entropy_nodes=args.entropy_nodes,
        function=args.function,
    )
    start = time.perf_counter()
    result: dict[str, Any] = {
        "checkpoint": str(args.checkpoint),
        "task": args.task,
        "split": args.split,
        "function": args.function,
        "examples": sum(int(y.shape[0]) for _, y in batches),
        "num_params": sum(p.numel() for p in model.parameters() if p.requires_grad),
    }
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        warnings.filterwarnings("ignore", message=SPARSE_NOTES)
        regular = [n for n in names if n not in EXTRA_MEASURES]
        result.update(compute_measures(model, task.loss_fn, batches, regular, options,
                                       timings=args.timings))
        if "spectral_density" in names:
            result.update(_spectral_density_files(args, model, task.loss_fn, batches))
    result["seconds"] = time.perf_counter() - start
    messages = emit_warnings(caught)
    if messages:
        result["warnings"] = messages
    if args.out:
        save_json(args.out, _jsonable(result))
    print_result(result, args.json)
    return 0


def _load_trajectory(path: Path, task_name: str) -> list[dict[str, Tensor]]:
    if not path.is_file():
        raise FlatnessError(f"trajectory file {path} does not exist")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise FlatnessError(f"{path} is not a readable trajectory file ({type(exc).__name__})") from None
    if not isinstance(payload, dict) or payload.get("format") != "flatness-trajectory":
        raise FlatnessError(f"{path} is not a flatness trajectory file (written by `flatness run --trajectory N`)")
    if payload.get("task") not in (None, task_name):
        raise FlatnessError(f"{path} is a trajectory of task {payload.get('task')!r}, not {task_name!r}")
    states = payload.get("state_dicts") or []
    if not isinstance(states, list) or not all(isinstance(s, dict) for s in states):
        raise FlatnessError(f"{path} holds no state dicts")
    return states


def _landscape_progress(args: argparse.Namespace) -> Any:
    """``--progress``: the pipeline's bar (plain periodic lines when stderr is not a terminal)."""
    if not args.progress:
        return False
    from ..experiments.running.progress import progress_bar

    return lambda total: progress_bar(total, "landscape", "point", leave=False)


def _default_trajectory(checkpoint: Path) -> Path | None:
    """``OUT/TASK/trajectories/NAME.pt`` next to ``OUT/TASK/checkpoints/NAME.pt``, if present."""
    candidate = checkpoint.parent.parent / "trajectories" / checkpoint.name
    return candidate if checkpoint.parent.name == "checkpoints" and candidate.is_file() else None


def task_accuracy(task: Any) -> Callable[[Tensor, Tensor], Tensor]:
    """The batch mean of the task's per-example score (hits, or a plugin task's own score)."""
    def accuracy(logits: Tensor, y: Tensor) -> Tensor:
        return task.score(logits, y).float().mean()  # hits, or a plugin task's own score

    return accuracy


def landscape_command(args: argparse.Namespace) -> int:
    """Run ``flatness landscape`` with the parsed ``args``; returns the exit status."""
    from ..landscape import plot_surface

    _check_landscape_args(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    task, model, meta, batches = load_for_task(
        args.checkpoint, args.task, split=args.split, examples=args.examples,
        batch_size=args.batch_size, data_dir=args.data_dir,
    )
    args.task = task.name  # a plugin reference names the task it made
    start = time.perf_counter()
    checkpoint = Path(args.checkpoint)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        warnings.filterwarnings("ignore", message=SPARSE_NOTES)
        surface, stem = _surface(args, task, model, batches, checkpoint)
    out = Path(args.out)
    npz = surface.save(out / f"{stem}_{args.kind}.npz")
    png = plot_surface(surface, out / f"{stem}_{args.kind}.png",
                       title=f"{args.task}: {stem} ({args.kind})")
    finite = surface.loss[np.isfinite(surface.loss)]
    result: dict[str, Any] = {
        "checkpoint": str(checkpoint),
        "task": args.task,
        "kind": args.kind,
        "examples": sum(int(y.shape[0]) for _, y in batches),
        "points": int(surface.loss.size),
        "nonfinite_points": surface.num_nonfinite,
        "loss_min": float(finite.min()) if finite.size else None,
        "loss_max": float(finite.max()) if finite.size else None,
        "npz": str(npz),
        "png": str(png),
        "seconds": time.perf_counter() - start,
        **{k: v for k, v in surface.info.items() if isinstance(v, (int, float, list))},
    }
    messages = emit_warnings(caught)
    if messages:
        result["warnings"] = messages
    print_result(result, args.json)
    return 0


def _check_landscape_args(args: argparse.Namespace) -> None:
    if args.kind not in KINDS:
        raise FlatnessError(f"--kind must be one of {', '.join(KINDS)}")
    if args.kind == "interp" and not args.other:
        raise FlatnessError("--kind interp needs --other CHECKPOINT (the second model)")
    if args.kind != "interp" and args.other:
        raise FlatnessError("--other is only used with --kind interp")
    if args.kind != "pca" and (args.trajectory or args.checkpoints):
        raise FlatnessError("--trajectory/--checkpoints are only used with --kind pca")
    if args.num is not None and args.num < 2:
        raise FlatnessError("--num must be >= 2")
    _require_positive(args, ("span",))


def _surface(
    args: argparse.Namespace, task: Any, model: nn.Module, batches: list[Any], checkpoint: Path
) -> tuple[Any, str]:
    """The surface ``args.kind`` asks for, and the stem of its file names."""
    from ..experiments.running.checkpoints import load_checkpoint
    from ..landscape import interpolate, pca_surface, surface_1d, surface_2d

    metric, num, stem = task_accuracy(task), args.num, checkpoint.stem
    shared = dict(metric=metric, metric_name=task.metric_name, progress=_landscape_progress(args))
    if args.kind == "1d":
        surface = surface_1d(model, task.loss_fn, batches, span=args.span, num=num or 41, seed=args.seed,
                             include_1d=args.include_1d, **shared)
    elif args.kind == "2d":
        surface = surface_2d(model, task.loss_fn, batches, span=args.span, num=num or 21, seed=args.seed,
                             include_1d=args.include_1d, **shared)
    elif args.kind == "interp":
        other, _ = load_checkpoint(args.other, task=args.task)
        low, high = args.interp_range
        # BatchNorm statistics re-estimated at each point on the first --examples training examples
        stats = training_batches(task, args.examples, task.config.batch_size, args.data_dir)
        surface = interpolate(model, other, task.loss_fn, batches, alphas=torch.linspace(low, high, num or 41).tolist(),
                              stat_batches=stats, **shared)
        stem = f"{stem}_to_{Path(args.other).stem}"
    else:
        states: list[Any] = []
        if args.checkpoints:
            states += [load_checkpoint(p, task=args.task)[0] for p in args.checkpoints]
        traj = Path(args.trajectory) if args.trajectory else _default_trajectory(checkpoint)
        if traj is not None:
            states += _load_trajectory(traj, args.task)
        if not states:
            raise FlatnessError(
                "--kind pca needs checkpoints along training: --trajectory FILE (written by "
                "`flatness run ... --trajectory N`) or --checkpoints CKPT CKPT ..."
            )
        surface = pca_surface(model, task.loss_fn, batches, states, num=num or 21, margin=args.margin, **shared)
    return surface, stem


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("checkpoint", metavar="CHECKPOINT", help="a checkpoint written by `flatness run`")
    p.add_argument("--task", required=True,
                   help="the checkpoint's task, e.g. cifar100-mlp, "
                         "or its plugin FILE.py:FACTORY / package.module:FACTORY")
    p.add_argument("--data-dir", default=None, help="data directory (default: $FLATNESS_DATA, ~/.cache/flatness)")
    p.add_argument("--split", default="train", choices=SPLITS, help="data split (default: train)")
    p.add_argument("--examples", type=int, default=1000,
                   help="the first N examples of the split (default: 1000)")
    p.add_argument("--batch-size", type=int, default=None,
                   help="evaluation batch size (memory only; default: the task's eval batch size)")
    p.add_argument("--seed", type=int, default=0, help="seed of probes/directions (default: 0)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--json", action="store_true", help="print one JSON object")


def add_cli(sub: argparse._SubParsersAction) -> None:
    """Register ``flatness measure`` and ``flatness landscape`` on the subparsers ``sub``."""
    p = sub.add_parser("measure", help="flatness measures of a checkpoint (one JSON object)",
                       description="Flatness measures of a saved checkpoint on a fixed data subset.")
    _common(p)
    p.add_argument("--measures", nargs="+", default=None, metavar="NAME",
                   help="measures to compute (space- or comma-separated, or 'all'); default: loss "
                        "hessian_trace hessian_sq_trace lambda_max last_layer_lambda_max "
                        "eps_sharpness fisher_trace; also: hutchpp_trace adaptive_sharpness "
                        "noise_loss local_entropy model_divergence spectral_density param_norm "
                        "path_norm distance_from_init margin pacbayes pacbayes_mag")
    p.add_argument("--function", default="deployed", choices=("deployed", "batch_stats"),
                   help="the function measured: deployed = eval mode, BatchNorm on running statistics "
                        "(default); batch_stats = BatchNorm on each batch's statistics (as trained)")
    p.add_argument("--matvecs", type=int, default=100, help="Hessian-vector products per trace (100)")
    p.add_argument("--k", type=int, default=3, help="number of top eigenvalues (3)")
    p.add_argument("--eps", type=float, default=1e-3, help="ε of the ε-sharpness box (1e-3)")
    p.add_argument("--adaptive-eps", type=float, default=1e-2, help="ε of adaptive sharpness (1e-2)")
    p.add_argument("--sharpness-steps", type=int, default=20, help="gradient-ascent steps (20)")
    p.add_argument("--sigma", type=float, default=0.01, help="σ of the weight noise (0.01)")
    p.add_argument("--noise-samples", type=int, default=20, help="Monte-Carlo draws (20)")
    p.add_argument("--divergence-eps", type=float, default=0.1, help="NRS radius ε (0.1)")
    p.add_argument("--entropy-gamma", type=float, default=100.0, help="local entropy: scope γ (100)")
    p.add_argument("--entropy-noise", type=float, default=0.1,
                   help="local entropy: thermal noise ε, temperature ε² (0.1)")
    p.add_argument("--entropy-steps", type=int, default=30,
                   help="local entropy: Langevin steps per quadrature node, a third burn-in (30)")
    p.add_argument("--entropy-step-size", type=float, default=None,
                   help="local entropy: Langevin step size (default 0.05/γ)")
    p.add_argument("--entropy-nodes", type=int, default=6, help="local entropy: quadrature nodes in λ (6)")
    p.add_argument("--density-steps", type=int, default=80, help="Lanczos steps of the SLQ density (80)")
    p.add_argument("--density-repeats", type=int, default=1, help="SLQ probes (1)")
    p.add_argument("--plot-dir", default=None, help="where spectral_density writes its PNG and .npz")
    p.add_argument("--timings", action="store_true", help="add seconds_<measure> keys")
    p.add_argument("--out", default=None, help="also write the JSON object to this file")
    p.set_defaults(func=measure_command)

    q = sub.add_parser("landscape", help="loss-landscape pictures of a checkpoint (PNG + .npz)",
                       description="1D/2D loss surfaces along filter-normalised random directions, "
                                   "linear interpolation to --other, or the PCA plane of a trajectory.")
    _common(q)
    q.add_argument("--kind", required=True, choices=KINDS, help="1d, 2d, interp or pca")
    q.add_argument("--out", required=True, metavar="DIR", help="output directory")
    q.add_argument("--other", default=None, metavar="CHECKPOINT", help="second model (--kind interp)")
    q.add_argument("--trajectory", default=None, metavar="FILE",
                   help="trajectory file of `flatness run --trajectory N` (--kind pca; default: "
                        "trajectories/NAME.pt next to checkpoints/NAME.pt)")
    q.add_argument("--checkpoints", nargs="+", default=None, metavar="CKPT",
                   help="checkpoints along training (--kind pca), instead of or with --trajectory")
    q.add_argument("--num", type=int, default=None,
                   help="points per axis (default: 41 for 1d/interp, 21 for 2d/pca)")
    q.add_argument("--span", type=float, default=1.0, help="1d/2d: α in [-span, span] (1.0)")
    q.add_argument("--interp-range", type=float, nargs=2, default=(-0.5, 1.5), metavar=("LOW", "HIGH"),
                   help="interp: t from LOW to HIGH (default -0.5 1.5)")
    q.add_argument("--margin", type=float, default=0.3, help="pca: grid margin around the path (0.3)")
    q.add_argument("--include-1d", action="store_true",
                   help="also perturb biases and normalisation parameters (default: left out)")
    q.add_argument("--progress", action="store_true",
                   help="progress on stderr: a bar on a terminal, else a plain line every 30 s")
    q.set_defaults(func=landscape_command)
