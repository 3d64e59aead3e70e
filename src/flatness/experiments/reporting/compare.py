r"""Every training method at its best strength on one task: ``flatness compare TASK``.

For each method (``none``, ``fa``, ``sam``, ``gnp``, ``curvature``, ``nrs``, ``rpr`` by default)
the runs of its small grid (:func:`comparison_grid`) times the seeds are trained by the
experiment runner (:func:`flatness.experiments.run_grid`: same loop, same per-run JSON records,
resumable, ``--jobs``), into ``OUT/TASK/``. Then, per method:

* the strength is **chosen on the validation split** — the highest mean over seeds of the final
  model's validation accuracy, ties broken by the lower mean validation loss (then the smaller
  strength); test accuracy never enters the choice. Small validation sets (Breast Cancer: 46
  samples) often tie on accuracy, hence the loss;
* at that strength: final test accuracy, mean ± std over seeds, compared with ``none`` paired by
  seed (same seed: same initial weights and data order) by
  :func:`flatness.experiments.reporting.stats.compare_samples`: the mean difference with its 95 %
  interval, d_z, paired t and Wilcoxon p-values raw and Holm-adjusted over the methods of the
  table, and the minimum detectable effect at the seed count used;
* flatness of the final models: Tr(H²)/B as recorded by the runner (its fixed measurement
  protocol, :mod:`flatness.experiments.running.measure`), and λ_max and Tr(H) from
  :func:`flatness.measures.compute_measures` on the same fixed training samples (cached per run
  under ``OUT/TASK/measures/``, the cache ``flatness report --measures`` uses too), unless the
  run record already holds them; the final Tr(H²)/B is compared with ``none``'s like the
  accuracy (paired by seed, on log10, Holm over the methods: its own table);
* training time per epoch relative to ``none`` (means over seeds; with ``--jobs`` > 1 runs share
  the cores, so these ratios are rough).

Written atomically into ``OUT/TASK/compare/``: ``summary.md`` (the table, and each method's
grid of validation accuracies), ``compare.json`` (every number) and ``compare.png`` (test
accuracy per method; accuracy vs measured Tr(H²)/B per run). The runner's own per-method
report (``OUT/TASK/summary.md``) is refreshed too.

``gnp`` at ρ equal to its finite-difference radius r is SAM at ρ = r (c = ρ/r = 1,
gnp's declared ``twin``, :func:`flatness.experiments.reporting.groups.twin_of`): that configuration
is left out of gnp's grid,
and, when its runs exist anyway, shown in gnp's grid marked as SAM and never chosen for gnp.

Example:
    >>> from flatness.experiments.reporting.compare import comparison_grid
    >>> comparison_grid("sam"), comparison_grid("none"), comparison_grid("fa")
    ([0.01, 0.05, 0.1], [None], [0.001, 0.01, 0.1, 1.0])
    >>> comparison_grid("gnp")  # ρ = 0.1 = r would be SAM at ρ = 0.1
    [0.01, 0.05]
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ...methods import METHODS
from ...utils import FlatnessError, atomic_write_bytes
from ..running.measure import FLATNESS_KEYS, final_model_extras
from ..running.platforms import platform_note
from ..running.record import RunRecord, write_json
from ..running.runner import read_finished, run_grid
from ..running.specs import RunSpec, build_grid, default_values, format_value, method_class
from ..world.errors import SettingError
from ..world.plugins import known_task
from ..world.tasks import get_task
from .groups import FLATNESS_METRIC, by_strength, log10_by_seed, strength_symbol, twin_of
from .plots import figure, save_png
from .report import write_report
from .stats import Comparison, adjust_holm, compare_samples, mean_std
from .tables import (
    comparison_note,
    comparison_table,
    final_flatness_note,
    final_measures_note,
    fmt,
    p_cell,
    protocol_line,
)

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
    """The strengths tried for ``method``: its default grid without 0 (``none`` covers 0).

    Configurations identical to another method's (gnp at ρ = r is SAM) are left out.
    """
    values = default_values(method)
    if values == [None]:
        return [None]
    grid = [v for v in values if v is not None and v > 0 and twin_of(method, v, {}) is None]
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
    method_kwargs: dict[str, dict[str, Any]] | None = None,
    protocol: str | None = None,
) -> list[RunSpec]:
    """All runs of a comparison: each method's grid times the seeds (``none`` always included).

    Methods may be compositions (``"sam+fa"``); ``method_kwargs[method]`` are its settings.
    """
    if "none" not in methods:
        methods = ["none", *methods]
    grids = grids or {}
    method_kwargs = method_kwargs or {}
    unknown = [m for m in [*methods, *grids, *method_kwargs] if not _known(m)]
    if unknown:
        raise FlatnessError(f"unknown method(s) {unknown}; expected some of {sorted(METHODS)} or A+B")
    for name, given in (("grids", grids), ("method_kwargs", method_kwargs)):
        stray = [m for m in given if m not in methods]
        if stray:  # it would be ignored without a word
            raise SettingError(
                f"`{name}` {stray[0]}: {stray[0]!r} is not among the compared methods "
                f"({', '.join(dict.fromkeys(methods))}); add it to `methods` or drop the `{name}`",
                name, "methods",
            )
    specs: list[RunSpec] = []
    for method in dict.fromkeys(methods):
        values = grids.get(method)
        if values is not None and any(not (math.isfinite(v) and v > 0) for v in values):
            raise SettingError(f"`grids` values for {method} must be finite and > 0, got {values}", "grids")
        grid = comparison_grid(method) if values is None else list(values)
        specs += build_grid(
            task,
            method,
            None if grid == [None] else grid,
            seeds,
            config_overrides=config_overrides,
            method_kwargs=method_kwargs.get(method),
            protocol=protocol,
        )
    return specs


def _known(method: str) -> bool:
    try:
        method_class(method)
    except FlatnessError:
        return False
    return True


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
    test_accs: list[float] = field(default_factory=list)  # per seed (same order as seeds)
    vs_none: Comparison | None = None  # test accuracy against `none`, paired by seed, Holm-adjusted
    flatness_vs_none: Comparison | None = None  # log10 final Tr(H²)/B against `none`, likewise
    sq_trace_per_B: list[float | None] = field(default_factory=list)  # final Tr(H²)/B per seed
    role: str = ""  # "baseline" (`none` itself), "no `none` runs", or "" (compared)
    scan_seeds: list[int] = field(default_factory=list)  # the grid was scanned at these seeds only
    flatness: dict[str, float] = field(default_factory=dict)  # key -> mean over seeds
    flatness_std: dict[str, float] = field(default_factory=dict)
    seconds_per_epoch: float = math.nan
    time_ratio: float = math.nan


def select_and_summarize(
    records: Sequence[RunRecord], methods: Sequence[str] = COMPARE_METHODS
) -> list[MethodResult]:
    """Choose each method's strength on validation accuracy and summarise its runs there.

    ``records`` are run records of one task and protocol (complete or failed), optionally with
    ``final_val_loss`` (the tie-break). Per-run flatness entries listed in :data:`FLATNESS_KEYS`
    (and ``measured_sq_trace_per_B``) are averaged when present. ``none`` is the baseline of the
    tests (paired by seed, Holm over the methods) and of the time ratios. A grid entry that is
    another method's configuration (:func:`twin_of`: gnp at ρ = r is SAM) is never chosen; its
    ``sam_rho`` holds the twin's strength (the key keeps its name: gnp's is the one twin).
    """
    results: list[MethodResult] = []
    for method in dict.fromkeys(["none", *methods]):
        mine = [r for r in records if r.method == method]
        result = _method_result(method, mine) if mine else None
        if result is not None:
            results.append(result)
    _compare_with_baseline(results)
    return results


def _strength_grid(method: str, mine: Sequence[RunRecord]) -> tuple[dict[Any, list[RunRecord]], list[dict[str, Any]]]:
    """A method's runs by strength, and each strength's validation summary (the grid, weakest first)."""
    by_value = by_strength(mine)
    grid = []
    for value, recorded in by_value.items():
        done = [r for r in recorded if r.complete]
        mean, std, _ = mean_std([r.get("final_val_acc") for r in done])
        loss, loss_std, _ = mean_std([r.get("final_val_loss") for r in done])
        twin = twin_of(method, value, mine[0].method_kwargs)
        grid.append({"value": value, "val_acc": mean, "val_acc_std": std, "val_loss": loss,
                     "val_loss_std": loss_std, "runs": len(done),
                     "failed": len(by_value[value]) - len(done), "sam_rho": None if twin is None else twin[1]})
    return by_value, grid


def _preference(g: dict[str, Any]) -> tuple[float, float, float]:
    """How a grid entry is chosen: validation accuracy, then lower validation loss, then the weaker strength."""
    loss = g["val_loss"] if math.isfinite(g["val_loss"]) else math.inf
    return (g["val_acc"], -loss, -(g["value"] or 0.0))


def _method_result(method: str, mine: Sequence[RunRecord]) -> MethodResult | None:
    """A method's runs at its chosen strength, summarised (``None``: no strength has a usable run)."""
    by_value, grid = _strength_grid(method, mine)
    usable = [g for g in grid if g["runs"] and math.isfinite(g["val_acc"]) and g["sam_rho"] is None]
    if not usable:
        return None
    best = max(usable, key=_preference)
    chosen = sorted(
        (r for r in by_value[best["value"]] if r.complete), key=lambda r: r.seed
    )
    failed = [r.name for r in by_value[best["value"]] if not r.complete]
    test, test_std, _ = mean_std([r.final_test_acc for r in chosen])
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
        sq_trace_per_B=[r.get(FLATNESS_METRIC) for r in chosen],
    )
    for key in ("measured_sq_trace_per_B", *FLATNESS_KEYS):
        values = [r.get(key) for r in chosen if isinstance(r.get(key), (int, float))]
        if len(values) == len(chosen):
            result.flatness[key], result.flatness_std[key], _ = mean_std(values)
    result.seconds_per_epoch = mean_std([r.get("seconds_per_epoch") for r in chosen])[0]
    return result


def _compare_with_baseline(results: list[MethodResult]) -> None:
    """Each result's role, time ratio and paired tests against ``none`` (Holm-adjusted), in place."""
    base = next((r for r in results if r.method == "none"), None)
    for r in results:
        if base is None:
            r.role = "no `none` runs"
            continue
        r.time_ratio = r.seconds_per_epoch / base.seconds_per_epoch
        if r is base:
            r.role = "baseline"
            continue
        r.vs_none = compare_samples(
            dict(zip(r.seeds, r.test_accs, strict=True)), dict(zip(base.seeds, base.test_accs, strict=True))
        )
        if any(v is not None for v in r.sq_trace_per_B) and any(v is not None for v in base.sq_trace_per_B):
            r.flatness_vs_none = compare_samples(
                log10_by_seed(dict(zip(r.seeds, r.sq_trace_per_B, strict=True))),
                log10_by_seed(dict(zip(base.seeds, base.sq_trace_per_B, strict=True))),
            )
    for attr in ("vs_none", "flatness_vs_none"):  # each table its own Holm family
        compared = [r for r in results if getattr(r, attr) is not None]
        for r, c in zip(compared, adjust_holm([getattr(r, attr) for r in compared]), strict=True):
            setattr(r, attr, c)


def _setting(r: MethodResult) -> str:
    if r.hparam is None or r.value is None:
        return "—"
    return f"{strength_symbol(r.method, r.hparam)} = {format_value(float(r.value))}"


def _twin_note(results: Sequence[MethodResult]) -> str:
    twins = sorted({g["sam_rho"] for r in results for g in r.grid if g.get("sam_rho") is not None})
    radii = ", ".join(f"{x:g}" for x in twins)
    if not twins and not any(r.method == "gnp" for r in results):
        return ""
    text = (
        "`gnp` (finite-difference form) steps along (1 − c)·g + c·∇L(θ + r·ĝ) with c = ρ/r, r its "
        "finite-difference radius: at ρ = r, c = 1 and it is SAM's update at ρ = r. "
    )
    if twins:
        return text + (f"Its runs at ρ = r = {radii} are SAM's configuration: marked in gnp's grid, "
                       "never chosen for gnp.")
    return text + "That configuration is left out of gnp's grid: it is `sam` at ρ = r."


def _loss_scale(task: str) -> str:
    task_obj = known_task(task)
    k = getattr(task_obj, "num_classes", 0)
    if not k or k < 2:
        return ""
    return f" For scale: the uniform prediction over the {k} classes has loss ln {k} = {math.log(k):.2f}."


def comparison_markdown(
    task: str,
    results: Sequence[MethodResult],
    config: dict[str, Any],
    wall: float | None = None,
    run_seconds: tuple[int, float] | None = None,
    records: Sequence[RunRecord] = (),
) -> str:
    """The comparison's ``summary.md``.

    ``run_seconds``: (number of runs, sum of their times); ``records``: the runs behind it (a note
    when they come from more than one platform).
    """
    task_obj = known_task(task)
    seeds = sorted({s for r in results for s in r.seeds})
    out = [f"# {task}: methods compared at their validation-chosen strength", ""]
    if task_obj is not None:
        out.append(f"{task_obj.description}.")
    out += [
        f"Protocol: {protocol_line(config)}. Seeds: {seeds}; mean ± std over seeds.",
        "",
        *([mixed, ""] if (mixed := platform_note(records)) else []),
        *_results_table(results),
    ]
    out += _tests_against_none(results)
    twin = _twin_note(results)
    if twin:
        out += ["", twin]
    out += _grids(task, results)
    if run_seconds is not None:
        count, seconds = run_seconds
        out += ["", f"The {count} runs took {seconds:.0f} s in all (training, evaluation and the "
                    "runner's measurements, summed over the run records)."]
    if wall is not None:
        out.append(f"Wall time of the `flatness compare` call that wrote this file: {wall:.0f} s "
                   "(finished runs are reused, not retrained).")
    out.append("")
    return "\n".join(out)


def _results_table(results: Sequence[MethodResult]) -> list[str]:
    """One row per method at its chosen strength, and the columns' note."""
    out = [
        "| method | chosen on val. | val acc | val loss | test acc | p t / Holm vs none "
        "| Tr(H²)/B | λ_max | Tr(H) | time/epoch vs none |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        f, sd = r.flatness, r.flatness_std
        cells = [
            f"`{r.method}`" + (f" ({len(r.failed)} failed)" if r.failed else ""),
            _setting(r),
            fmt(r.val_acc),
            fmt(r.val_loss),
            fmt(r.test_acc, r.test_acc_std),
            p_cell(r.vs_none, r.role),
            *(fmt(f.get(k, math.nan), sd.get(k, math.nan), sci=True)
              for k in ("measured_sq_trace_per_B", *FLATNESS_KEYS)),
            "n/a" if not math.isfinite(r.time_ratio) else f"{r.time_ratio:.2f}× ({r.seconds_per_epoch:.2f} s)",
        ]
        out.append("| " + " | ".join(cells) + " |")
    out += [
        "",
        "*Chosen on val.*: the strength with the highest mean final validation accuracy over the "
        + (f"scan's seeds {sorted({s for r in results for s in r.scan_seeds})} (grid below)"
           if any(r.scan_seeds for r in results) else "seeds")
        + ", ties broken by the lower mean validation loss (validation split carved from the "
        "training set; the test set plays no part). "
        "*Test acc*: final test accuracy at that strength. *p t / Holm*: paired t-test of the final "
        "test accuracies against `none`, raw / Holm-adjusted over the methods (the statistics table "
        f"below has the rest). *Tr(H²)/B*: the runner's fixed measurement of the final model "
        f"({final_flatness_note()}). *λ_max*, *Tr(H)*: {final_measures_note()} "
        "(`flatness.measures.compute_measures`). *Time/epoch*: optimisation time per epoch (no "
        "evaluation) from the run records, relative to `none`.",
    ]
    return out


def _tests_against_none(results: Sequence[MethodResult]) -> list[str]:
    """The statistics tables: final test accuracy and log10 final Tr(H²)/B against `none`."""
    out: list[str] = []
    compared = [(r, r.vs_none) for r in results if r.vs_none is not None]
    if compared:
        out += ["", "## Final test accuracy against `none`", ""]
        out += comparison_table("method", [(f"`{r.method}` {_setting(r)}", c) for r, c in compared])
        out += ["", comparison_note("the final test accuracy", "`none`", [c for _, c in compared])]
    flat = [(r, r.flatness_vs_none) for r in results if r.flatness_vs_none is not None]
    if flat:
        out += ["", "## Final Tr(H²)/B (measured), log10, against `none`", ""]
        out += comparison_table("method", [(f"`{r.method}` {_setting(r)}", c) for r, c in flat], digits=2)
        out += ["", comparison_note("log10 of the final measured Tr(H²)/B", "`none`", [c for _, c in flat], digits=2)
                + " A Δ of -0.30 halves Tr(H²)/B; +1 multiplies it by 10."]
    return out


def _grids(task: str, results: Sequence[MethodResult]) -> list[str]:
    """Each method's grid: mean final validation accuracy / loss per strength, the choice marked."""
    scanned = sorted({s for r in results for s in r.scan_seeds})
    heading = (f"## Scan: each method's grid at seed{'s' if len(scanned) > 1 else ''} {scanned} (final validation "
               "accuracy / loss; the chosen strength was then trained at every seed)" if scanned
               else "## Grids (mean final validation accuracy / loss over seeds)")
    out = ["", heading, "", _loss_scale(task).strip(), ""]
    for r in results:
        if r.hparam is None:
            continue
        sym = strength_symbol(r.method, r.hparam)
        cells = []
        for g in r.grid:
            mark = " **(chosen)**" if g["value"] == r.value else ""
            if g.get("sam_rho") is not None:
                other = method_class(r.method).twin["method"]
                mark = f" (≡ `{other}` {strength_symbol(other, None)} = {g['sam_rho']:g}, not chosen for {r.method})"
            extra = f", {g['failed']} failed" if g["failed"] else ""
            cells.append(
                f"{sym} = {format_value(float(g['value']))}: {fmt(g['val_acc'], g['val_acc_std'])}"
                f" / {fmt(g['val_loss'])}{extra}{mark}"
            )
        out.append(f"- `{r.method}`: " + "; ".join(cells))
    return out


def plot_comparison(task: str, results: Sequence[MethodResult], records: dict[str, RunRecord], path: Path) -> None:
    """``compare.png``: test accuracy per method; accuracy vs measured Tr(H²)/B per run."""
    fig, (left, right) = figure(2, figsize=(11, 4))
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
    for r, color in zip(results, colors, strict=True):
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
    save_png(fig, path)


def _read_records(specs: Sequence[RunSpec], directory: Path, cache: Path, data_dir: str | None,
                  download: bool | None) -> dict[str, RunRecord]:
    """The specs' records, with the final validation loss (the choice's tie-break) where complete."""
    records = {}
    for spec in specs:
        record = read_finished(directory, spec.name)
        if record.complete:
            record.extras.update(final_model_extras(record, directory, cache, ["final_val_loss"], data_dir, download))
        records[spec.name] = record
    return records


def run_comparison(
    task: str,
    out_root: str | Path = "runs",
    *,
    methods: Sequence[str] = COMPARE_METHODS,
    seeds: int = 3,
    grids: dict[str, Sequence[float]] | None = None,
    config_overrides: dict[str, Any] | None = None,
    method_kwargs: dict[str, dict[str, Any]] | None = None,
    jobs: int = 1,
    data_dir: str | None = None,
    download: bool | None = None,
    progress: bool = True,
    measures: bool = True,
    plots: bool = True,
    select_seeds: int | None = None,
    protocol: str | None = None,
) -> tuple[list[MethodResult], str]:
    """Train what is missing, choose, measure, and write ``OUT/TASK/compare/``; returns the results and markdown.

    ``select_seeds=k``: choose each method's strength on validation from its grid trained at
    seeds 0..k-1 only (the scan), then train the chosen strength at all ``seeds``; the report
    shows the scan's grid and tests the chosen strengths over all seeds.
    """
    get_task(task)
    common = {"config_overrides": config_overrides, "method_kwargs": method_kwargs, "protocol": protocol}
    train = {"jobs": jobs, "data_dir": data_dir, "download": download, "progress": progress}
    directory = Path(out_root) / task
    cache = directory / "measures"  # shared with `flatness report --measures`: one cache per run
    start = time.perf_counter()
    scan: dict[str, list[dict[str, Any]]] = {}
    if select_seeds is not None:
        if not 1 <= select_seeds <= seeds:
            raise SettingError(f"`select_seeds` must be between 1 and `seeds` ({seeds}), got {select_seeds}",
                               "select_seeds", "seeds")
        scan_specs = comparison_specs(task, methods, select_seeds, grids=grids, **common)
        run_grid(scan_specs, out_root, **train)
        scan_records = _read_records(scan_specs, directory, cache, data_dir, download)
        chosen = select_and_summarize(list(scan_records.values()), methods)
        scan = {r.method: r.grid for r in chosen}
        grids = {r.method: [r.value] for r in chosen if r.value is not None}
    specs = comparison_specs(task, methods, seeds, grids=grids, **common)
    run_grid(specs, out_root, **train)
    records = _read_records(specs, directory, cache, data_dir, download)
    compare_dir = directory / "compare"
    results = select_and_summarize(list(records.values()), methods)
    for r in results:
        if r.method in scan:
            r.grid, r.scan_seeds = scan[r.method], list(range(select_seeds or 0))
    if measures:
        for r in results:
            per_run = [
                final_model_extras(records[name], directory, cache, FLATNESS_KEYS, data_dir, download)
                for name in r.runs
            ]
            for key in FLATNESS_KEYS:
                r.flatness[key], r.flatness_std[key], _ = mean_std([m[key] for m in per_run])
    wall = time.perf_counter() - start
    config = specs[0].config
    seconds = sum(float(r.total_seconds or 0.0) for r in records.values())
    text = comparison_markdown(task, results, config, wall, (len(records), seconds), list(records.values()))
    summary = {
        "format": "flatness-compare",
        "task": task,
        "config": config,
        "seeds": seeds,
        "select_seeds": select_seeds,
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
