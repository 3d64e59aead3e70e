r"""Every training method at its best strength on one task: ``flatness compare TASK``.

For each method (``none``, ``fa``, ``sam``, ``gnp``, ``curvature``, ``nrs``, ``rpr`` by default)
the runs of its small grid (:func:`comparison_grid`) times the seeds are trained by the
experiment runner (:func:`flatness.experiments.run_grid`: same loop, same per-run JSON records,
resumable, ``--jobs``), into ``OUT/TASK/``. Then, per method:

* the strength is **chosen on the validation split** — the highest mean over seeds of the final
  model's validation accuracy, ties broken by the lower mean validation loss (then the smaller
  strength); test accuracy never enters the choice. Small validation sets (Breast Cancer: 46
  samples) often tie on accuracy, hence the loss;
* at that strength: final test accuracy, mean ± std over seeds; Welch's t-test p-value against
  ``none`` (``scipy.stats.ttest_ind(equal_var=False)``);
* flatness of the final models: Tr(H²)/B as recorded by the runner (its fixed measurement
  protocol), and λ_max and Tr(H) from :func:`flatness.measures.final_measures` on the same
  fixed data (the first 1024 training samples in batches of B; cached per run under
  ``OUT/TASK/measures/``, the cache ``flatness report --measures`` uses too), unless the run
  record already holds them;
* training time per epoch relative to ``none`` (means over seeds; with ``--jobs`` > 1 runs share
  the cores, so these ratios are rough).

Written atomically into ``OUT/TASK/compare/``: ``summary.md`` (the table, and each method's
grid of validation accuracies), ``compare.json`` (every number) and ``compare.png`` (test
accuracy per method; accuracy vs measured Tr(H²)/B per run). The runner's own per-method
report (``OUT/TASK/summary.md``) is refreshed too.

Example:
    >>> from flatness.experiments.compare import comparison_grid
    >>> comparison_grid("sam"), comparison_grid("none"), comparison_grid("fa")
    ([0.01, 0.05, 0.1], [None], [0.001, 0.01, 0.1, 1.0])
"""

from __future__ import annotations

import io
import math
import statistics
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ..methods import METHODS
from ..utils import FlatnessError, atomic_write_bytes
from .measure import FLATNESS_KEYS, final_model_extras
from .record import RunRecord, read_record, write_json
from .report import welch_p, write_report
from .runner import run_grid
from .specs import RunSpec, build_grid, default_values, format_value
from .tasks import TASKS, get_task

__all__ = [
    "COMPARE_METHODS",
    "comparison_grid",
    "comparison_specs",
    "MethodResult",
    "select_and_summarize",
    "comparison_markdown",
    "run_comparison",
]

COMPARE_METHODS: tuple[str, ...] = ("none", "fa", "sam", "gnp", "curvature", "nrs", "rpr")


def comparison_grid(method: str) -> list[float | None]:
    """The strengths tried for ``method``: its default grid without 0 (``none`` covers 0)."""
    values = default_values(method)
    if values == [None]:
        return [None]
    grid = [v for v in values if v is not None and v > 0]
    if not grid:
        raise FlatnessError(f"method {method!r} has no positive strength in its grid")
    return grid


def comparison_specs(
    task: str,
    methods: Sequence[str] = COMPARE_METHODS,
    seeds: int = 3,
    *,
    grids: dict[str, Sequence[float]] | None = None,
    config_overrides: dict[str, Any] | None = None,
) -> list[RunSpec]:
    """All runs of a comparison: each method's grid times the seeds (``none`` always included)."""
    if "none" not in methods:
        methods = ["none", *methods]
    grids = grids or {}
    unknown = [m for m in [*methods, *grids] if m not in METHODS]
    if unknown:
        raise FlatnessError(f"unknown method(s) {unknown}; expected some of {sorted(METHODS)}")
    specs: list[RunSpec] = []
    for method in dict.fromkeys(methods):
        values = grids.get(method)
        if values is not None and any(not (math.isfinite(v) and v > 0) for v in values):
            raise FlatnessError(f"--grid values for {method} must be finite and > 0, got {values}")
        grid = comparison_grid(method) if values is None else list(values)
        specs += build_grid(
            task,
            method,
            None if grid == [None] else grid,
            seeds,
            config_overrides=config_overrides,
        )
    return specs


@dataclass
class MethodResult:
    """One method of a comparison, at its validation-chosen strength."""

    method: str
    hparam: str | None
    value: float | None
    grid: list[dict[str, Any]]  # per strength: value, val_acc mean/std, runs
    runs: list[str]
    seeds: list[int]
    failed: list[str]
    test_acc: float
    test_acc_std: float
    val_acc: float
    val_loss: float = math.nan
    test_accs: list[float] = field(default_factory=list)  # per seed, for the t-test
    p_value: float = math.nan
    p_note: str = ""
    flatness: dict[str, float] = field(default_factory=dict)  # key -> mean over seeds
    flatness_std: dict[str, float] = field(default_factory=dict)
    seconds_per_epoch: float = math.nan
    time_ratio: float = math.nan


def _mean_std(values: Sequence[float]) -> tuple[float, float]:
    xs = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    if not xs:
        return math.nan, math.nan
    return statistics.fmean(xs), statistics.stdev(xs) if len(xs) > 1 else math.nan


def select_and_summarize(
    records: Sequence[RunRecord], methods: Sequence[str] = COMPARE_METHODS
) -> list[MethodResult]:
    """Choose each method's strength on validation accuracy and summarise its runs there.

    ``records`` are run records of one task and protocol (complete or failed), optionally with
    ``final_val_loss`` (the tie-break). Per-run flatness entries listed in :data:`FLATNESS_KEYS`
    (and ``measured_sq_trace_per_B``) are averaged when present. ``none`` is the baseline of the
    p-values and time ratios.
    """
    results: list[MethodResult] = []
    for method in dict.fromkeys(["none", *methods]):
        mine = [r for r in records if r.method == method]
        if not mine:
            continue
        by_value: dict[Any, list[RunRecord]] = {}
        for r in mine:
            by_value.setdefault(r.value, []).append(r)
        grid = []
        for value in sorted(by_value, key=lambda v: -1.0 if v is None else float(v)):
            done = [r for r in by_value[value] if r.complete]
            mean, std = _mean_std([r.get("final_val_acc") for r in done])
            loss, loss_std = _mean_std([r.get("final_val_loss") for r in done])
            grid.append({"value": value, "val_acc": mean, "val_acc_std": std, "val_loss": loss,
                         "val_loss_std": loss_std, "runs": len(done),
                         "failed": len(by_value[value]) - len(done)})
        usable = [g for g in grid if g["runs"] and math.isfinite(g["val_acc"])]
        if not usable:
            continue

        def preference(g: dict[str, Any]) -> tuple[float, float, float]:
            loss = g["val_loss"] if math.isfinite(g["val_loss"]) else math.inf
            return (g["val_acc"], -loss, -(g["value"] or 0.0))

        best = max(usable, key=preference)
        chosen = sorted(
            (r for r in by_value[best["value"]] if r.complete), key=lambda r: r.seed
        )
        failed = [r.name for r in by_value[best["value"]] if not r.complete]
        test, test_std = _mean_std([r.final_test_acc for r in chosen])
        result = MethodResult(
            method=method,
            hparam=mine[0].hparam,
            value=best["value"],
            grid=grid,
            runs=[r.name for r in chosen],
            seeds=[r.seed for r in chosen],
            failed=failed,
            test_acc=test,
            test_acc_std=test_std,
            val_acc=best["val_acc"],
            val_loss=best["val_loss"],
            test_accs=[float(r.final_test_acc) for r in chosen],
        )
        for key in ("measured_sq_trace_per_B", *FLATNESS_KEYS):
            values = [r.get(key) for r in chosen if isinstance(r.get(key), (int, float))]
            if len(values) == len(chosen):
                result.flatness[key], result.flatness_std[key] = _mean_std(values)
        result.seconds_per_epoch = _mean_std([r.get("seconds_per_epoch") for r in chosen])[0]
        results.append(result)
    base = next((r for r in results if r.method == "none"), None)
    for r in results:
        if base is None:
            r.p_note = "no `none` runs"
            continue
        r.time_ratio = r.seconds_per_epoch / base.seconds_per_epoch
        if r is base:
            r.p_note = "baseline"
            continue
        r.p_value, r.p_note = welch_p(r.test_accs, base.test_accs)
    return results


def _fmt(mean: float, std: float = math.nan, digits: int = 4, sci: bool = False) -> str:
    if not math.isfinite(mean):
        return "n/a"
    f = (lambda x: f"{x:.3g}") if sci else (lambda x: f"{x:.{digits}f}")
    return f(mean) if not math.isfinite(std) else f"{f(mean)} ± {f(std)}"


SYMBOLS = {"lam": "λ", "rho": "ρ", "alpha": "α", "eps": "ε"}


def _setting(r: MethodResult) -> str:
    if r.hparam is None or r.value is None:
        return "—"
    return f"{SYMBOLS.get(r.hparam, r.hparam)} = {format_value(float(r.value))}"


def comparison_markdown(
    task: str,
    results: Sequence[MethodResult],
    config: dict[str, Any],
    wall: float | None = None,
    run_seconds: tuple[int, float] | None = None,
) -> str:
    """The comparison's ``summary.md``; ``run_seconds``: (number of runs, sum of their times)."""
    task_obj = TASKS.get(task)
    seeds = sorted({s for r in results for s in r.seeds})
    out = [f"# {task}: methods compared at their validation-chosen strength", ""]
    if task_obj is not None:
        out.append(f"{task_obj.description}.")
    out += [
        f"Protocol: {config['epochs']} epochs, B = {config['batch_size']}, Adam lr {config['lr']:g}, "
        f"L2 weight decay {config['weight_decay']:g}, validation split {config.get('val_fraction', 0):g}. "
        f"Seeds: {seeds}; mean ± std over seeds.",
        "",
        "| method | chosen on val. | val acc | val loss | test acc | p vs none | Tr(H²)/B | λ_max | Tr(H) | time/epoch vs none |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        f = r.flatness
        if r.p_note == "baseline":
            p = "—"
        elif math.isfinite(r.p_value):
            p = f"{r.p_value:.3g}" + (f" ({r.p_note})" if r.p_note else "")
        else:
            p = f"n/a ({r.p_note})"
        cells = [
            f"`{r.method}`" + (f" ({len(r.failed)} failed)" if r.failed else ""),
            _setting(r),
            _fmt(r.val_acc),
            _fmt(r.val_loss),
            _fmt(r.test_acc, r.test_acc_std),
            p,
            _fmt(f.get("measured_sq_trace_per_B", math.nan), r.flatness_std.get("measured_sq_trace_per_B", math.nan), sci=True),
            _fmt(f.get("lambda_max", math.nan), r.flatness_std.get("lambda_max", math.nan), sci=True),
            _fmt(f.get("hessian_trace", math.nan), r.flatness_std.get("hessian_trace", math.nan), sci=True),
            "n/a" if not math.isfinite(r.time_ratio) else f"{r.time_ratio:.2f}× ({r.seconds_per_epoch:.2f} s)",
        ]
        out.append("| " + " | ".join(cells) + " |")
    out += [
        "",
        "*Chosen on val.*: the strength with the highest mean final validation accuracy over the "
        "seeds, ties broken by the lower mean validation loss (validation split carved from the "
        "training set; the test set plays no part). "
        "*Test acc*: final test accuracy at that strength. *p*: Welch's t-test of the final test "
        "accuracies against `none`. *Tr(H²)/B*: the runner's fixed measurement of the final model "
        "(first 1024 training samples, eval mode, fixed Rademacher probes). *λ_max*, *Tr(H)*: "
        "largest Hessian eigenvalue and Hutchinson trace of the training loss on the same samples "
        "(`flatness.measures.final_measures`). *Time/epoch*: optimisation time per epoch (no "
        "evaluation), relative to `none`.",
        "",
        "## Grids (mean final validation accuracy / loss over seeds)",
        "",
    ]
    for r in results:
        if r.hparam is None:
            continue
        sym = SYMBOLS.get(r.hparam, r.hparam)
        cells = []
        for g in r.grid:
            mark = " **(chosen)**" if g["value"] == r.value else ""
            extra = f", {g['failed']} failed" if g["failed"] else ""
            cells.append(
                f"{sym} = {format_value(float(g['value']))}: {_fmt(g['val_acc'], g['val_acc_std'])}"
                f" / {_fmt(g['val_loss'])}{extra}{mark}"
            )
        out.append(f"- `{r.method}`: " + "; ".join(cells))
    if run_seconds is not None:
        count, seconds = run_seconds
        out += ["", f"The {count} runs took {seconds:.0f} s in all (training, evaluation and the "
                    "runner's measurements, summed over the run records)."]
    if wall is not None:
        out.append(f"Wall time of the `flatness compare` call that wrote this file: {wall:.0f} s "
                   "(finished runs are reused, not retrained).")
    out.append("")
    return "\n".join(out)


def plot_comparison(task: str, results: Sequence[MethodResult], records: dict[str, RunRecord], path: Path) -> None:
    """``compare.png``: test accuracy per method; accuracy vs measured Tr(H²)/B per run."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    names = [r.method for r in results]
    means = [r.test_acc for r in results]
    stds = [0.0 if not math.isfinite(r.test_acc_std) else r.test_acc_std for r in results]
    colors = [f"C{i}" for i in range(len(results))]
    left.bar(range(len(results)), means, yerr=stds, capsize=4, color=colors)
    # compact "α=1e-04": full-width settings of neighbouring bars overlap
    ticks = [f"{r.method}\n{_setting(r).replace(' = ', '=')}" for r in results]
    left.set_xticks(range(len(results)), ticks, fontsize=8, rotation=30, ha="right", rotation_mode="anchor")
    finite = [m for m in means if math.isfinite(m)]
    if finite:
        spread = max(max(finite) - min(finite), max(stds) if stds else 0.0, 0.01)
        left.set_ylim(max(0.0, min(finite) - 3 * spread), min(1.0, max(finite) + 2 * spread))
    left.set_ylabel("final test accuracy (mean ± std)")
    left.set_title(f"{task}: each method at its val-chosen strength")
    left.grid(alpha=0.3, axis="y")
    for r, color in zip(results, colors):
        pts = [(records[n].measured_sq_trace_per_B, records[n].final_test_acc) for n in r.runs]
        pts = [(x, y) for x, y in pts if isinstance(x, (int, float)) and x > 0]
        if pts:
            right.scatter([p[0] for p in pts], [p[1] for p in pts], color=color, label=r.method)
    right.set_xscale("log")
    right.set_xlabel("final Tr(H²)/B, measured (per run)")
    right.set_ylabel("final test accuracy")
    right.set_title("accuracy vs flatness")
    right.grid(alpha=0.3, which="both")
    if names:
        right.legend(fontsize=8)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    atomic_write_bytes(path, lambda fh: fh.write(buf.getvalue()))


def run_comparison(
    task: str,
    out_root: str | Path = "runs",
    *,
    methods: Sequence[str] = COMPARE_METHODS,
    seeds: int = 3,
    grids: dict[str, Sequence[float]] | None = None,
    config_overrides: dict[str, Any] | None = None,
    jobs: int = 1,
    data_dir: str | None = None,
    download: bool | None = None,
    progress: bool = True,
    measures: bool = True,
    plots: bool = True,
) -> tuple[list[MethodResult], str]:
    """Train what is missing, choose, measure, and write ``OUT/TASK/compare/``; returns the results and markdown."""
    get_task(task)
    specs = comparison_specs(task, methods, seeds, grids=grids, config_overrides=config_overrides)
    start = time.perf_counter()
    run_grid(specs, out_root, jobs=jobs, data_dir=data_dir, download=download, progress=progress)
    directory = Path(out_root) / task
    records = {}
    for spec in specs:
        record = read_record(directory / f"{spec.name}.json")
        if record is None:
            raise FlatnessError(f"run {spec.name} left no record in {directory}")
        records[spec.name] = record
    compare_dir = directory / "compare"
    cache = directory / "measures"  # shared with `flatness report --measures`: one cache per run
    for name, record in records.items():  # the validation loss breaks ties in the choice
        if record.complete:
            record.extras.update(final_model_extras(record, directory, cache, ["final_val_loss"], data_dir, download))
    results = select_and_summarize(list(records.values()), methods)
    if measures:
        for r in results:
            per_run = [
                final_model_extras(records[name], directory, cache, FLATNESS_KEYS, data_dir, download)
                for name in r.runs
            ]
            for key in FLATNESS_KEYS:
                r.flatness[key], r.flatness_std[key] = _mean_std([m[key] for m in per_run])
    wall = time.perf_counter() - start
    config = specs[0].config
    seconds = sum(float(r.total_seconds or 0.0) for r in records.values())
    text = comparison_markdown(task, results, config, wall, (len(records), seconds))
    summary = {
        "format": "flatness-compare",
        "task": task,
        "config": config,
        "seeds": seeds,
        "wall_seconds": wall,
        "runs": len(records),
        "run_seconds": seconds,
        "methods": [asdict(r) for r in results],
    }
    atomic_write_bytes(compare_dir / "summary.md", lambda fh: fh.write(text.encode()))
    write_json(compare_dir / "compare.json", summary)
    if plots:
        plot_comparison(task, results, records, compare_dir / "compare.png")
    # the per-method tables show the λ_max and Tr(H) measured above (same cache); the other
    # strengths' runs stay "not measured" until `flatness report DIR --measures`
    write_report(directory, plots=plots)
    return results, text
