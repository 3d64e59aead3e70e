r"""Methods at equal compute: ``flatness compare TASK --equal-compute``.

A method that costs r× a plain step per step looks no worse than one that costs 1.1× when both
train for the same number of epochs. Here every configuration (method × strength) of a
comparison (:mod:`flatness.experiments.reporting.compare`) is set against the baseline ``none`` trained
with the **same wall-clock training budget**: the baseline spends it on more epochs
(E′ = round(E · r), r = the configuration's median training seconds over the baseline's at E epochs,
both from the run records of this comparison; capped at ``max_factor``·E), the method on
curvature. The baseline keeps its protocol otherwise (the learning-rate schedule stretches over
its E′ epochs).

Why wall clock and not a count of gradient evaluations: the methods' extra work is not made of
gradient evaluations of one kind — the FA penalty runs Hessian-vector products through a
closed-form layer-wise engine (:mod:`flatness.layerwise`), K-FAC one forward and a backward to
the layer outputs, SAM a second full gradient — so a count would weigh unlike things alike.
Training seconds measure what a user pays on the machine that ran the comparison. They are
noisy on a shared machine (and with ``--jobs`` > 1 runs share the cores): E′ is derived from
the recorded means once, and the same records always give the same E′ (the runs of a rerun
are reused).

Written into ``OUT/TASK/compare/``: ``equal_compute.md`` (each configuration against the
budget-matched baseline, paired by seed, Holm-adjusted over the table), ``equal_compute.json``
and ``equal_compute.png``: final test accuracy against training wall time per configuration
(accuracy: mean ± std over seeds; time: median, min–max), the baseline's accuracy-vs-budget curve, and the Pareto front (the
configurations no other one beats with less or equal time).

Example:
    >>> from flatness.experiments.reporting.equal_compute import budget_epochs, pareto_front
    >>> budget_epochs(10, 2.34), budget_epochs(10, 0.9), budget_epochs(10, 50.0, max_factor=8.0)
    (23, 10, 80)
    >>> pareto_front([(1.0, 0.20), (2.0, 0.25), (1.5, 0.19), (3.0, 0.24)])
    [0, 1]
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from ...utils import FlatnessError, atomic_write_bytes
from .compare import COMPARE_METHODS, comparison_specs
from .groups import SYMBOLS
from .plots import figure, save_png
from ..running.record import RunRecord, read_record, write_json
from ..running.runner import run_grid
from ..running.specs import RunSpec, build_grid, format_value
from .stats import Comparison, adjust_holm, compare_samples, mean_std
from .tables import comparison_note, comparison_table, fmt, protocol_line
from ..world.tasks import get_task

__all__ = ["Configuration", "budget_epochs", "pareto_front", "run_equal_compute"]


def budget_epochs(epochs: int, cost_ratio: float, max_factor: float = 10.0) -> int:
    """E′ = round(E·r), at least E and at most ``max_factor``·E: the baseline's epochs at the budget."""
    if not math.isfinite(cost_ratio):
        return epochs
    return int(min(max(epochs, round(epochs * cost_ratio)), math.floor(max_factor * epochs)))


def pareto_front(points: Sequence[tuple[float, float]]) -> list[int]:
    """Indices of the (time, accuracy) points no other point beats with less or equal time,
    in increasing time."""
    order = sorted(range(len(points)), key=lambda i: (points[i][0], -points[i][1]))
    front, best = [], -math.inf
    for i in order:
        if points[i][1] > best:
            front.append(i)
            best = points[i][1]
    return front


@dataclass
class Configuration:
    """One method × strength: its runs, cost and accuracy, and the matched baseline's."""

    method: str
    hparam: str | None
    value: float | None
    runs: list[str]
    seconds: float  # median training seconds over seeds
    seconds_range: tuple[float, float]  # their min and max
    test_acc: float
    test_acc_std: float
    test_accs: dict[int, float]
    cost_ratio: float = math.nan  # seconds / the baseline's at E epochs
    budget_epochs: int = 0  # E′ of the matched baseline
    baseline_acc: float = math.nan
    baseline_seconds: float = math.nan
    vs_baseline: Comparison | None = None

    @property
    def label(self) -> str:
        """The configuration as Markdown table text, the method in backticks and its strength."""
        if self.hparam is None or self.value is None:
            return f"`{self.method}`"
        return f"`{self.method}` {SYMBOLS.get(self.hparam, self.hparam)} = {format_value(float(self.value))}"


def _configurations(records: Sequence[RunRecord]) -> list[Configuration]:
    groups: dict[tuple[str, Any], list[RunRecord]] = {}
    for r in records:
        if r.complete:
            groups.setdefault((r.method, r.value), []).append(r)
    out = []
    for (method, value), runs in groups.items():
        runs = sorted(runs, key=lambda r: r.seed)
        times = [float(r.get("train_seconds")) for r in runs]
        acc, acc_std, _ = mean_std([r.final_test_acc for r in runs])
        out.append(Configuration(
            method, runs[0].hparam, value, [r.name for r in runs],
            statistics.median(times), (min(times), max(times)),
            acc, acc_std, {int(r.seed): float(r.get("final_test_acc")) for r in runs},
        ))
    return out


def _read(specs: Sequence[RunSpec], directory: Path) -> list[RunRecord]:
    records = []
    for spec in specs:
        record = read_record(directory / f"{spec.name}.json")
        if record is None:
            raise FlatnessError(f"run {spec.name} left no record in {directory}")
        records.append(record)
    return records


def _markdown(task: str, config: dict[str, Any], configs: Sequence[Configuration],
              baselines: dict[int, Configuration], max_factor: float) -> str:
    task_obj = get_task(task)
    epochs = int(config["epochs"])
    out = [
        f"# {task}: methods at equal compute (the baseline trains longer instead)", "",
        f"{task_obj.description}. Protocol: {protocol_line(config)}.", "",
        "| configuration | train time (s) | × `none` | test acc | `none` at the same budget | E′ | Δ vs that `none` |",
        "|---|---|---|---|---|---|---|",
    ]
    for c in configs:
        delta = "—" if c.vs_baseline is None else f"{c.vs_baseline.difference:+.4f}"
        out.append(
            f"| {c.label} | {c.seconds:.1f} ({c.seconds_range[0]:.1f}–{c.seconds_range[1]:.1f}) | {c.cost_ratio:.2f} | "
            f"{fmt(c.test_acc, c.test_acc_std)} | {fmt(c.baseline_acc)} | {c.budget_epochs} | {delta} |"
        )
    out += [
        "",
        (
            "*Train time*: optimisation seconds per run (no evaluation), median (min–max) over "
            "seeds, from the run records (the median: one slow run, e.g. the first of a process, "
            f"does not set the budget). *× `none`*: over `none` at its protocol's {epochs} epochs. "
            f"*E′*: the epochs of the budget-matched `none` run, round({epochs} × ratio), at least "
            f"{epochs} and at most {max_factor:g} × {epochs}; its own train time is in "
            "`equal_compute.json`. Budgets are wall clock on the machine that trained the runs "
            "(with parallel jobs, runs shared its cores)."
        ),
    ]
    compared = [(c.label, c.vs_baseline) for c in configs if c.vs_baseline is not None]
    if compared:
        out += ["", "## Final test accuracy against `none` at the same budget", ""]
        out += comparison_table("configuration", compared)
        out += ["", comparison_note("the final test accuracy", "`none` trained for E′ epochs",
                                    [c for _, c in compared])]
    curve = ", ".join(f"{e} epochs: {fmt(b.test_acc, b.test_acc_std)} ({b.seconds:.0f} s)"
                      for e, b in sorted(baselines.items()))
    out += ["", f"`none` at each budget: {curve}.", ""]
    return "\n".join(out)


def _plot(task: str, configs: Sequence[Configuration], baselines: dict[int, Configuration], path: Path) -> None:
    fig, ax = figure(figsize=(7, 4.5))
    methods = list(dict.fromkeys(c.method for c in configs))
    for i, method in enumerate(methods):
        mine = [c for c in configs if c.method == method]
        xerr = [[c.seconds - c.seconds_range[0] for c in mine], [c.seconds_range[1] - c.seconds for c in mine]]
        ax.errorbar([c.seconds for c in mine], [c.test_acc for c in mine],
                    xerr=xerr, yerr=[c.test_acc_std for c in mine],
                    fmt="o", color=f"C{i}", capsize=3, label=method)
        for c in mine:
            if c.value is not None:
                ax.annotate(format_value(float(c.value)), (c.seconds, c.test_acc), fontsize=7,
                            xytext=(3, 3), textcoords="offset points")
    curve = [baselines[e] for e in sorted(baselines)]
    ax.plot([b.seconds for b in curve], [b.test_acc for b in curve], "--", color="gray",
            label="none, more epochs")
    for e, b in sorted(baselines.items()):
        ax.annotate(f"{e} ep", (b.seconds, b.test_acc), fontsize=7, color="gray",
                    xytext=(3, -9), textcoords="offset points")
    every = [*configs, *curve]
    front = [every[i] for i in pareto_front([(c.seconds, c.test_acc) for c in every])]
    ax.step([c.seconds for c in front], [c.test_acc for c in front], where="post", color="black",
            alpha=0.6, label="Pareto front")
    ax.set_xscale("log")
    ax.set_xlabel("training wall time per run (s, log; median, min–max over seeds)")
    ax.set_ylabel("final test accuracy (mean ± std over seeds)")
    ax.set_title(f"{task}: accuracy against compute")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    save_png(fig, path)


def run_equal_compute(
    task: str,
    out_root: str | Path = "runs",
    *,
    methods: Sequence[str] = COMPARE_METHODS,
    seeds: int = 3,
    grids: dict[str, Sequence[float]] | None = None,
    config_overrides: dict[str, Any] | None = None,
    method_kwargs: dict[str, dict[str, Any]] | None = None,
    max_factor: float = 10.0,
    jobs: int = 1,
    data_dir: str | None = None,
    download: bool | None = None,
    progress: bool = True,
    plots: bool = True,
) -> tuple[list[Configuration], str]:
    """Train the comparison's runs and the budget-matched baselines; write the tables and plot."""
    if not (math.isfinite(max_factor) and max_factor >= 1):
        raise FlatnessError(f"--max-budget-factor must be >= 1, got {max_factor}")
    specs = comparison_specs(task, methods, seeds, grids=grids, config_overrides=config_overrides,
                             method_kwargs=method_kwargs)
    run_grid(specs, out_root, jobs=jobs, data_dir=data_dir, download=download, progress=progress)
    directory = Path(out_root) / task
    configs = _configurations(_read(specs, directory))
    base = next((c for c in configs if c.method == "none"), None)
    if base is None or not base.seconds > 0:
        raise FlatnessError(f"no complete `none` runs in {directory}: nothing to set a budget by")
    config = specs[0].config
    epochs = int(config["epochs"])
    for c in configs:
        c.cost_ratio = c.seconds / base.seconds
        c.budget_epochs = budget_epochs(epochs, c.cost_ratio, max_factor)
    extra = sorted({c.budget_epochs for c in configs} - {epochs})
    baseline_specs = [
        s for e in extra
        for s in build_grid(task, "none", None, seeds, config_overrides={**(config_overrides or {}), "epochs": e})
    ]
    run_grid(baseline_specs, out_root, jobs=jobs, data_dir=data_dir, download=download, progress=progress)
    baselines = {epochs: base}
    for e in extra:
        mine = [s for s in baseline_specs if s.config["epochs"] == e]
        (found,) = _configurations(_read(mine, directory)) or [None]
        if found is not None:
            baselines[e] = found
    configs = [c for c in configs if c.method != "none"]
    for c in configs:
        matched = baselines.get(c.budget_epochs)
        if matched is None:
            continue
        c.baseline_acc, c.baseline_seconds = matched.test_acc, matched.seconds
        c.vs_baseline = compare_samples(c.test_accs, matched.test_accs)
    tested = [c for c in configs if c.vs_baseline is not None]
    for c, adjusted in zip(tested, adjust_holm([c.vs_baseline for c in tested if c.vs_baseline])):
        c.vs_baseline = adjusted
    text = _markdown(task, config, configs, baselines, max_factor)
    out = directory / "compare"
    atomic_write_bytes(out / "equal_compute.md", lambda fh: fh.write(text.encode()))
    write_json(out / "equal_compute.json", {
        "format": "flatness-equal-compute", "task": task, "config": config, "seeds": seeds,
        "budget": "training wall-clock seconds (run records)", "max_factor": max_factor,
        "configurations": [asdict(c) for c in configs],
        "baselines": {str(e): asdict(b) for e, b in sorted(baselines.items())},
    })
    if plots:
        _plot(task, configs, baselines, out / "equal_compute.png")
    return configs, text
