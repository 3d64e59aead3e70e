r"""Methods at equal compute: ``flatness compare TASK --equal-compute``.

A method that costs r× a plain step per step looks no worse than one that costs 1.1× when both
train for the same number of epochs. Here **every** configuration (method × strength, ``none``
included) is trained at each of several epoch counts (``budget_epochs``, default 1× and 2× the
protocol's), so each has its own accuracy-against-compute curve, and the Pareto front is taken
over all of them: no method is given more epochs than the others by construction.

**Compute** is counted, not clocked: a run's budget is its number of optimisation steps (from its
record) times its method's *cost per step*, the median process CPU milliseconds of one step of
that configuration on the task's model and a mini-batch of B training samples, all
configurations timed in one process in interleaved rounds (:func:`step_costs`; a window of
``every`` steps for methods that do extra work every k-th step). CPU time of interleaved
rounds moves far less with other load on a shared machine than wall time beside other jobs
does, and the same cost applies to every run of a configuration. The costs are measured once
and cached in ``OUT/TASK/compare/step_costs.json`` (with the CPU, threads and load they were
measured at): the same records and costs always give the same budgets. Delete the file to
re-measure (ideally on a quiet machine). Budgets are shown in plain-step equivalents (steps ×
cost / ``none``'s cost) and CPU seconds.

**Tests.** Each configuration at E epochs is also set against ``none`` trained for the
budget-matched E′ = round(E · r) epochs (r: its cost per step over ``none``'s, capped at
``max_factor``·E), paired by seed; one Holm family per table: all the rows of the table.

Written into ``OUT/TASK/compare/``: ``equal_compute.md``, ``equal_compute.json`` and
``equal_compute.png`` (test accuracy, mean ± std over seeds, against budget; one curve per
configuration; the Pareto front).

Example:
    >>> from flatness.experiments.reporting.equal_compute import budget_epochs, pareto_front
    >>> budget_epochs(10, 2.34), budget_epochs(10, 0.9), budget_epochs(10, 50.0, max_factor=8.0)
    (23, 10, 80)
    >>> pareto_front([(1.0, 0.20), (2.0, 0.25), (1.5, 0.19), (3.0, 0.24)])
    [0, 1]
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from ...utils import FlatnessError, atomic_write_bytes
from ..running.record import RunRecord, write_json
from ..running.runner import read_finished, run_grid
from ..running.specs import RunSpec, build_grid, format_value
from ..world.errors import SettingError
from ..world.tasks import TrainConfig, get_task
from .compare import COMPARE_METHODS, comparison_specs
from .groups import strength_symbol
from .plots import figure, save_png
from .stats import Comparison, adjust_holm, compare_samples, mean_std
from .tables import comparison_note, comparison_table, fmt, protocol_line

__all__ = ["Configuration", "budget_epochs", "pareto_front", "step_costs", "run_equal_compute"]


def budget_epochs(epochs: int, cost_ratio: float, max_factor: float = 10.0) -> int:
    """E′ = round(E·r), at least E and at most ``max_factor``·E: the baseline's epochs at the budget."""
    if not math.isfinite(cost_ratio):
        return epochs
    return int(min(max(epochs, round(epochs * cost_ratio)), math.floor(max_factor * epochs)))


def pareto_front(points: Sequence[tuple[float, float]]) -> list[int]:
    """Indices of the (budget, accuracy) points no other point beats with less or equal budget.

    In increasing budget.
    """
    order = sorted(range(len(points)), key=lambda i: (points[i][0], -points[i][1]))
    front, best = [], -math.inf
    for i in order:
        if points[i][1] > best:
            front.append(i)
            best = points[i][1]
    return front


def _key(spec_or_record: RunSpec | RunRecord) -> str:
    """A configuration's name for the cost table: method, strength, settings (not epochs or seed)."""
    s = spec_or_record
    strength = "" if s.value is None else f"_{s.hparam}{format_value(float(s.value))}"
    return f"{s.method}{strength}" + (f"_k{s.variant_id}" if s.variant_id else "")


def step_costs(
    task: str,
    specs: Sequence[RunSpec],
    data_dir: str | None = None,
    rounds: int = 5,
    reps: int = 3,
) -> dict[str, Any]:
    """CPU milliseconds per step of each configuration of ``specs``, timed interleaved.

    Each configuration gets a fresh model of the task (seed 0), its optimiser, its method at its
    strength and settings, and the first B training samples; a call runs ``every`` steps for
    methods that have that setting. Returns ``{"cpu_ms": {key: ms}, "facts": {...}}``.
    """
    import os

    import torch

    from ...methods import make_method
    from ...utils import take_first
    from ..running.bench import platform_facts, time_interleaved
    from ..running.specs import accepts
    from ..running.training import make_optimizer

    task_obj = get_task(task)
    first = {_key(s): s for s in specs}
    config = TrainConfig.from_dict(specs[0].config)
    splits = task_obj.splits(config, data_dir)
    x, y = take_first(splits.x_train, config.batch_size), splits.y_train[: config.batch_size]
    cases: dict[str, Callable[[], None]] = {}
    per_call: dict[str, int] = {}
    for key, spec in first.items():
        torch.manual_seed(0)
        model = task_obj.build_model(num_features=splits.num_features, config=config, **spec.model_kwargs)
        kwargs = dict(spec.method_kwargs)
        if spec.hparam is not None and spec.value is not None:
            kwargs[spec.hparam] = spec.value
        if accepts(spec.method, "seed"):
            kwargs.setdefault("seed", 0)
        method = make_method(spec.method, model, task_obj.loss_fn, **kwargs)
        optimizer = make_optimizer(model, config)
        window = int(kwargs.get("every", 1) or 1)
        per_call[key] = window

        def call(method: Any = method, optimizer: Any = optimizer, window: int = window, model: Any = model) -> None:
            model.train()
            xb = task_obj.augment(x) if config.augment else x
            for _ in range(window):
                method.step(xb, y, optimizer)

        cases[key] = call
    cpu: dict[str, float] = {}
    time_interleaved(cases, rounds, reps, warmup=1, per_call_steps=per_call, cpu_ms=cpu)
    return {"cpu_ms": cpu, "facts": {**platform_facts(), "load_average_1min": os.getloadavg()[0],
                                     "batch_size": config.batch_size, "rounds": rounds, "reps": reps}}


@dataclass
class Configuration:
    """One method × strength × epoch count: its runs, budget and accuracy, and the matched `none`."""

    method: str
    hparam: str | None
    value: float | None
    key: str
    epochs: int
    runs: list[str]
    steps: int  # optimisation steps of one run (the seeds agree)
    cost_ms: float  # CPU milliseconds per step (step_costs)
    budget: float  # steps x cost / none's cost: plain-step equivalents
    test_acc: float
    test_acc_std: float
    test_accs: dict[int, float]
    cost_ratio: float = math.nan  # cost per step over none's
    matched_epochs: int = 0  # E′ of the budget-matched `none`
    baseline_acc: float = math.nan
    vs_baseline: Comparison | None = None

    @property
    def label(self) -> str:
        """The configuration as Markdown table text — the method in backticks, its strength, its epochs."""
        name = f"`{self.method}`"
        if self.hparam is not None and self.value is not None:
            name += f" {strength_symbol(self.method, self.hparam)} = {format_value(float(self.value))}"
        return f"{name}, {self.epochs} ep"


def _configurations(records: Sequence[RunRecord], costs: dict[str, float]) -> list[Configuration]:
    groups: dict[tuple[str, int], list[RunRecord]] = {}
    for r in records:
        if r.complete:
            groups.setdefault((_key(r), int(r.config["epochs"])), []).append(r)
    plain = costs.get("none", math.nan)
    out = []
    for (key, epochs), runs in sorted(groups.items(), key=lambda kv: (kv[0][0] != "none", kv[0])):
        runs = sorted(runs, key=lambda r: r.seed)
        acc, acc_std, _ = mean_std([r.final_test_acc for r in runs])
        steps = int(runs[0].steps or 0)
        cost = costs.get(key, math.nan)
        out.append(Configuration(
            runs[0].method, runs[0].hparam, runs[0].value, key, epochs, [r.name for r in runs], steps, cost,
            steps * cost / plain, acc, acc_std, {int(r.seed): float(r.get("final_test_acc")) for r in runs},
            cost_ratio=cost / plain,
        ))
    return out


def _read(specs: Sequence[RunSpec], directory: Path) -> list[RunRecord]:
    return [read_finished(directory, spec.name) for spec in specs]


def _markdown(task: str, config: dict[str, Any], configs: Sequence[Configuration], front: set[int],
              facts: dict[str, Any], max_factor: float, matched: bool = True) -> str:
    plain_ms = next(c.cost_ms for c in configs if c.method == "none")
    out = [
        f"# {task}: accuracy against compute, every method at several epoch counts", "",
        f"{get_task(task).description}. Protocol: {protocol_line(config)}.", "",
        "| configuration | steps | CPU ms/step | × `none` | budget (plain steps) | test acc | Pareto |",
        "|---|---|---|---|---|---|---|",
    ]
    for i, c in enumerate(configs):
        out.append(f"| {c.label} | {c.steps} | {c.cost_ms:.1f} | {c.cost_ratio:.2f} | {c.budget:.0f} | "
                   f"{fmt(c.test_acc, c.test_acc_std)} | {'yes' if i in front else ''} |")
    out += ["", (
        "*CPU ms/step*: median process CPU time of one optimisation step of the configuration "
        "(the task's model, B training samples, one process, configurations timed in interleaved "
        f"rounds; {facts.get('threads')} thread(s), {facts.get('cpu')}, load average "
        f"{facts.get('load_average_1min', math.nan):.1f} when measured; `step_costs.json`). *Budget*: "
        f"steps × CPU ms/step ÷ `none`'s {plain_ms:.1f} ms, in plain-step equivalents. *Test acc*: "
        "final, mean ± std over seeds. *Pareto*: no configuration reaches a higher mean test accuracy "
        "with a smaller or equal budget.")]
    compared = [(c.label, c.vs_baseline) for c in configs if c.vs_baseline is not None]
    if not matched:
        out += ["", "No budget-matched `none` runs were trained (`--no-matched`): this table has the "
                "budget curves and the Pareto front, and no test against `none` at equal budget."]
    if compared:
        out += ["", "## Each configuration against `none` at the same budget", ""]
        out += comparison_table("configuration", compared)
        out += ["", comparison_note(
            "the final test accuracy", f"`none` trained for E′ = round(E × cost ratio) epochs (at most "
            f"{max_factor:g} × E)", [c for _, c in compared],
            family=f"the {len(compared)} rows of this table (one family)")]
        out += ["", "E′ per row: " + "; ".join(f"{c.label}: {c.matched_epochs}" for c in configs
                                               if c.vs_baseline is not None) + "."]
    return "\n".join(out) + "\n"


def _plot(task: str, configs: Sequence[Configuration], front: set[int], path: Path) -> None:
    fig, ax = figure(figsize=(7, 4.5))
    for i, key in enumerate(dict.fromkeys(c.key for c in configs)):
        mine = sorted((c for c in configs if c.key == key), key=lambda c: c.budget)
        ax.errorbar([c.budget for c in mine], [c.test_acc for c in mine], yerr=[c.test_acc_std for c in mine],
                    fmt="o-", color=f"C{i % 10}", capsize=3, label=mine[0].label.rsplit(",", 1)[0].replace("`", ""))
        for c in mine:
            ax.annotate(f"{c.epochs} ep", (c.budget, c.test_acc), fontsize=7, xytext=(3, 3), textcoords="offset points")
    best = sorted((configs[i] for i in front), key=lambda c: c.budget)
    ax.step([c.budget for c in best], [c.test_acc for c in best], where="post", color="black", alpha=0.6,
            label="Pareto front")
    ax.set_xscale("log")
    ax.set_xlabel("budget: steps × CPU cost per step, in plain-step equivalents (log)")
    ax.set_ylabel("final test accuracy (mean ± std over seeds)")
    ax.set_title(f"{task}: accuracy against compute")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7)
    save_png(fig, path)


def _costs(task: str, specs: Sequence[RunSpec], path: Path, data_dir: str | None) -> dict[str, Any]:
    """The cached step costs, measured for the configurations that lack one."""
    try:
        cached = json.loads(path.read_text())
    except (OSError, ValueError):
        cached = {"cpu_ms": {}, "facts": {}}
    wanted = {_key(s) for s in specs}
    if not wanted <= set(cached.get("cpu_ms", {})):
        measured = step_costs(task, specs, data_dir)  # all together: their ratios come from one run
        cached = {"format": "flatness-step-costs", "task": task, **measured}
        write_json(path, cached)
    return cached


def run_equal_compute(
    task: str,
    out_root: str | Path = "runs",
    *,
    methods: Sequence[str] = COMPARE_METHODS,
    seeds: int = 3,
    grids: dict[str, Sequence[float]] | None = None,
    config_overrides: dict[str, Any] | None = None,
    method_kwargs: dict[str, dict[str, Any]] | None = None,
    epochs_grid: Sequence[int] | None = None,
    max_factor: float = 10.0,
    matched: bool = True,
    protocol: str | None = None,
    jobs: int = 1,
    data_dir: str | None = None,
    download: bool | None = None,
    progress: bool = True,
    plots: bool = True,
) -> tuple[list[Configuration], str]:
    """Train every configuration at every epoch count and the budget-matched `none` runs.

    Write the table, the tests and the plot. ``matched=False`` trains no budget-matched `none`
    runs and so writes the budget curves, the table and the Pareto front without the tests.
    """
    if not (math.isfinite(max_factor) and max_factor >= 1):
        raise SettingError(f"`max_factor` must be >= 1, got {max_factor}", "max_factor")
    base_specs = comparison_specs(task, methods, seeds, grids=grids, config_overrides=config_overrides,
                                  method_kwargs=method_kwargs, protocol=protocol)
    protocol_epochs = int(base_specs[0].config["epochs"])
    grid = sorted(set(epochs_grid or (protocol_epochs, 2 * protocol_epochs)))
    if any(e < 1 for e in grid):
        raise SettingError(f"`epochs_grid` must be >= 1, got {grid}", "epochs_grid")
    specs = [s for e in grid for s in comparison_specs(
        task, methods, seeds, grids=grids, config_overrides={**(config_overrides or {}), "epochs": e},
        method_kwargs=method_kwargs, protocol=protocol)]
    run_grid(specs, out_root, jobs=jobs, data_dir=data_dir, download=download, progress=progress)
    directory = Path(out_root) / task
    cost_table = _costs(task, specs, directory / "compare" / "step_costs.json", data_dir)
    configs = _configurations(_read(specs, directory), cost_table["cpu_ms"])
    if not any(c.method == "none" for c in configs):
        raise FlatnessError(f"no complete `none` runs in {directory}: nothing to set a budget by")
    for c in configs:
        c.matched_epochs = budget_epochs(c.epochs, c.cost_ratio, max_factor)
    present = {c.epochs for c in configs if c.method == "none"}
    extra = sorted({c.matched_epochs for c in configs if c.method != "none"} - present) if matched else []
    matched_specs = [s for e in extra for s in build_grid(
        task, "none", None, seeds, config_overrides={**(config_overrides or {}), "epochs": e}, protocol=protocol)]
    run_grid(matched_specs, out_root, jobs=jobs, data_dir=data_dir, download=download, progress=progress)
    configs = _configurations(_read([*specs, *matched_specs], directory), cost_table["cpu_ms"])
    nones = {c.epochs: c for c in configs if c.method == "none"}
    for c in configs:
        c.matched_epochs = budget_epochs(c.epochs, c.cost_ratio, max_factor)
        baseline = nones.get(c.matched_epochs) if matched else None
        if c.method != "none" and baseline is not None:
            c.baseline_acc = baseline.test_acc
            c.vs_baseline = compare_samples(c.test_accs, baseline.test_accs)
    tested = [c for c in configs if c.vs_baseline is not None]
    for c, adjusted in zip(tested, adjust_holm([c.vs_baseline for c in tested if c.vs_baseline]), strict=True):
        c.vs_baseline = adjusted
    front = set(pareto_front([(c.budget, c.test_acc) for c in configs]))
    config = base_specs[0].config
    text = _markdown(task, config, configs, front, cost_table.get("facts", {}), max_factor, matched)
    out = directory / "compare"
    atomic_write_bytes(out / "equal_compute.md", lambda fh: fh.write(text.encode()))
    write_json(out / "equal_compute.json", {
        "format": "flatness-equal-compute", "task": task, "config": config, "seeds": seeds,
        "epochs_grid": grid, "budget": "steps x CPU ms per step (step_costs.json) / none's, plain-step equivalents",
        "max_factor": max_factor, "matched": matched, "step_costs": cost_table,
        "configurations": [{**asdict(c), "pareto": i in front} for i, c in enumerate(configs)],
    })
    if plots:
        _plot(task, configs, front, out / "equal_compute.png")
    return configs, text
