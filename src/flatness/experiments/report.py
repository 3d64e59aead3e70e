"""Tables, statistics and plots of a results directory: ``flatness report DIR``.

Reads every run record (``*.json`` written by :mod:`flatness.experiments`) in ``DIR``, groups
runs by (task, method, method settings, protocol), and writes, atomically:

* ``summary.csv`` — one row per (group, strength): mean and std over seeds of every metric,
  Welch's t-test p-value of final accuracy against the baseline;
* ``summary.md`` — tables shaped like the paper's Tables 1–3 plus std and p-value columns;
* ``<group>_accuracy.png`` (final / validation-chosen accuracy vs strength, error bars = std),
  ``<group>_flatness.png`` (measured final Tr(H²)/B vs strength, log axis),
  ``<group>_curves.png`` (test accuracy per epoch for each strength).

The baseline of a group is its strength-0 row, or else the ``none`` method's runs with the same
protocol in the same directory. Welch's test is ``scipy.stats.ttest_ind(equal_var=False)``;
with fewer than 2 runs on a side, or identical values on both sides (zero variance), the
p-value is reported as ``n/a`` with the reason.

Example:
    >>> from flatness.experiments.report import welch_p
    >>> welch_p([0.95, 0.96, 0.97], [0.95, 0.96, 0.97])[0]
    1.0
    >>> welch_p([0.9, 0.9, 0.9], [0.9, 0.9, 0.9])
    (nan, 'identical constant values')
"""

from __future__ import annotations

import csv
import io
import math
import statistics
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..utils import FlatnessError, atomic_write_bytes
from .record import RunRecord, load_records
from .tasks import TASKS

__all__ = [
    "PAPER_FINAL_ACC",
    "Row",
    "Group",
    "load_records",
    "summarize",
    "welch_p",
    "markdown",
    "write_report",
]

# The paper's final test accuracies (its Tables 1–3), for comparison in the tables.
PAPER_FINAL_ACC: dict[str, dict[float, float]] = {
    "cifar100-mlp": {0.0: 0.2633, 0.001: 0.2633, 0.01: 0.2700, 0.1: 0.2667, 1.0: 0.2583},
    "newsgroups-logreg": {0.0: 0.0535, 0.001: 0.0535, 0.01: 0.0534, 0.1: 0.053, 1.0: 0.053},
    "breast-cancer-mlp": {0.0: 0.5556, 0.001: 0.5585, 0.01: 0.5859},
}
SYMBOLS = {"lam": "λ", "rho": "ρ", "alpha": "α", "eps": "ε"}
METRICS = (
    "final_test_acc",
    "best_test_acc",
    "val_chosen_test_acc",
    "avg_train_sq_trace_per_B",
    "avg_epoch_sq_trace_per_B",
    "measured_sq_trace_per_B",
    "train_seconds",
    "seconds_per_epoch",
    "lambda_max",
    "hessian_trace",
)


def _mean_std(values: Sequence[float | None]) -> tuple[float, float, int]:
    xs = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    if not xs:
        return math.nan, math.nan, 0
    std = statistics.stdev(xs) if len(xs) > 1 else math.nan
    return statistics.fmean(xs), std, len(xs)


def welch_p(a: Sequence[float], b: Sequence[float]) -> tuple[float, str]:
    """Welch's two-sample t-test p-value of ``a`` vs ``b``, or ``(nan, reason)``."""
    from scipy import stats

    a, b = [float(x) for x in a], [float(x) for x in b]
    if len(a) < 2 or len(b) < 2:
        return math.nan, "fewer than 2 runs"
    if statistics.pvariance(a) == 0 and statistics.pvariance(b) == 0:
        if statistics.fmean(a) == statistics.fmean(b):
            return math.nan, "identical constant values"
        return 0.0, "zero variance, different means"
    result = stats.ttest_ind(a, b, equal_var=False)
    p = float(result.pvalue)
    return (p, "") if math.isfinite(p) else (math.nan, "undefined")


@dataclass
class Row:
    """All runs of one strength in a group, summarised over seeds."""

    value: float | None
    runs: list[RunRecord]
    failed: list[RunRecord]
    stats: dict[str, tuple[float, float, int]] = field(default_factory=dict)
    p_value: float = math.nan
    p_note: str = "baseline"

    @property
    def seeds(self) -> list[int]:
        return sorted(r.seed for r in self.runs)


@dataclass
class Group:
    """Runs of one task, method, method settings and protocol, by strength."""

    task: str
    method: str
    hparam: str | None
    variant_id: str
    protocol_id: str
    config: dict[str, Any]
    method_kwargs: dict[str, Any]
    rows: list[Row]
    baseline: str = ""

    @property
    def slug(self) -> str:
        parts = [self.method]
        if self.variant_id:
            parts.append(f"k{self.variant_id}")
        if self.protocol_id:
            parts.append(f"p{self.protocol_id}")
        return "_".join(parts)

    @property
    def symbol(self) -> str:
        return SYMBOLS.get(self.hparam or "", self.hparam or "")


def summarize(records: Sequence[RunRecord]) -> list[Group]:
    """Group records and compute per-strength statistics and p-values against the baseline."""
    keyed: dict[tuple[Any, ...], list[RunRecord]] = {}
    for r in records:
        key = (r.task, r.method, r.hparam, r.variant_id, r.protocol_id)
        keyed.setdefault(key, []).append(r)
    groups = []
    for (task, method, hparam, variant, protocol), recs in sorted(keyed.items(), key=lambda kv: str(kv[0])):
        by_value: dict[Any, list[RunRecord]] = {}
        for r in recs:
            by_value.setdefault(r.value, []).append(r)
        rows = []
        for value in sorted(by_value, key=lambda v: -1.0 if v is None else float(v)):
            runs = [r for r in by_value[value] if r.complete]
            failed = [r for r in by_value[value] if not r.complete]
            row = Row(value, runs, failed)
            row.stats = {m: _mean_std([r.get(m) for r in runs]) for m in METRICS}
            rows.append(row)
        groups.append(
            Group(task, method, hparam, variant, protocol, recs[0].config, recs[0].method_kwargs, rows)
        )
    for g in groups:
        base_runs: list[RunRecord] | None = None
        zero = [row for row in g.rows if row.value == 0]
        if zero and zero[0].runs:
            base_runs, g.baseline = zero[0].runs, f"{g.symbol} = 0"
        else:
            plain = [
                h for h in groups
                if h.method == "none" and h.task == g.task and h.protocol_id == g.protocol_id and h is not g
            ]
            if plain and plain[0].rows and plain[0].rows[0].runs:
                base_runs, g.baseline = plain[0].rows[0].runs, "method none"
        for row in g.rows:
            if base_runs is None:
                row.p_note = "no baseline"
                continue
            if row.runs is base_runs:
                row.p_note = "baseline"
                continue
            row.p_value, row.p_note = welch_p(
                [r.final_test_acc for r in row.runs], [r.final_test_acc for r in base_runs]
            )
    return groups


# --------------------------------------------------------------------------------------------
# Text


def _fmt(mean: float, std: float, digits: int = 4, sci: bool = False) -> str:
    if not math.isfinite(mean):
        return "n/a"
    f = (lambda x: f"{x:.3g}") if sci else (lambda x: f"{x:.{digits}f}")
    return f(mean) if not math.isfinite(std) else f"{f(mean)} ± {f(std)}"


def _fmt_p(row: Row) -> str:
    if row.p_note == "baseline":
        return "—"
    if math.isfinite(row.p_value):
        return f"{row.p_value:.3g}" + ("" if not row.p_note else f" ({row.p_note})")
    return f"n/a ({row.p_note})"


def _protocol_line(g: Group) -> str:
    c = g.config
    sched = c.get("schedule", "constant")
    if sched != "constant":
        sched = f"{sched} decay to {c.get('final_lr_fraction', 0):g}·lr"
    if c.get("warmup_epochs"):
        sched = f"{c['warmup_epochs']:g}-epoch warm-up, {sched}"
    text = (
        f"{c['epochs']} epoch{'s' if c['epochs'] != 1 else ''}, B = {c['batch_size']}, Adam lr {c['lr']:g} ({sched}), "
        f"L2 weight decay {c['weight_decay']:g}, validation split {c.get('val_fraction', 0):g}"
    )
    if g.method_kwargs:
        text += "; method settings " + ", ".join(f"{k}={v}" for k, v in sorted(g.method_kwargs.items()))
    return text


def markdown(groups: Sequence[Group]) -> str:
    """The ``summary.md`` text: one table per group, notes on every column."""
    out = ["# Results", ""]
    for g in groups:
        task = TASKS.get(g.task)
        title = f"## {g.task} — method `{g.method}`"
        if task is not None and task.paper_table and g.method == "fa":
            title += f" (the paper's {task.paper_table})"
        out += [title, ""]
        if task is not None:
            out.append(f"{task.description}. Protocol: {_protocol_line(g)}.")
        seeds = sorted({s for row in g.rows for s in row.seeds})
        out += [f"Seeds: {seeds}. Mean ± std over seeds. p: Welch's t-test of final accuracy vs {g.baseline or 'n/a'}.", ""]
        paper = PAPER_FINAL_ACC.get(g.task, {}) if g.method == "fa" and not g.protocol_id else {}
        sym = g.symbol or "setting"
        head = [
            sym, "runs", "Final acc", "Best acc†", "Val-chosen acc", "Avg. flatness (train est.)",
            "Avg. flatness (measured)", "Final Tr(H²)/B (measured)", "λ_max", "Tr(H)",
            "Train time (s)", "s/epoch", "p (final acc)",
        ]
        if paper:
            head.append("Paper final acc")
        out += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for row in g.rows:
            s = row.stats
            runs = f"{len(row.runs)}" + (f" (+{len(row.failed)} failed)" if row.failed else "")
            cells = [
                "—" if row.value is None else f"{row.value:g}",
                runs,
                _fmt(*s["final_test_acc"][:2]),
                _fmt(*s["best_test_acc"][:2]),
                _fmt(*s["val_chosen_test_acc"][:2]),
                "not computed" if not s["avg_train_sq_trace_per_B"][2] else _fmt(*s["avg_train_sq_trace_per_B"][:2], sci=True),
                _fmt(*s["avg_epoch_sq_trace_per_B"][:2], sci=True),
                _fmt(*s["measured_sq_trace_per_B"][:2], sci=True),
                _fmt(*s["lambda_max"][:2], sci=True) if s["lambda_max"][2] else "not measured",
                _fmt(*s["hessian_trace"][:2], sci=True) if s["hessian_trace"][2] else "not measured",
                _fmt(*s["train_seconds"][:2], digits=1),
                _fmt(s["seconds_per_epoch"][0], math.nan, digits=2),
                _fmt_p(row),
            ]
            if paper:
                ref = paper.get(float(row.value)) if row.value is not None else None
                cells.append("—" if ref is None else f"{ref:.4f}")
            out.append("| " + " | ".join(cells) + " |")
        for row in g.rows:
            for r in row.failed:
                out.append(f"\nFailed: `{r.name}`: {r.error}")
        out.append("")
    out += [
        "Columns. *Final acc*: test accuracy after the last epoch. *Best acc†*: the best test "
        "accuracy over epochs — optimistic, since it selects on the test set. *Val-chosen acc*: "
        "test accuracy at the epoch of best accuracy on the validation split carved from the "
        "training set. *Avg. flatness (train est.)*: the paper's column, the mean of the "
        "penalty's own Tr(H²)/B estimates during training; a run without the penalty computes "
        "none (the paper printed 0.000 there). *Avg. flatness (measured)*: mean over epochs of "
        "Tr(H²)/B measured after each epoch on the first two training batches of B (eval mode, 5 "
        "fixed probes per batch). *Final Tr(H²)/B (measured)*: the final model by one fixed protocol for "
        "every run — first 1024 training samples in fixed batches of B, eval mode, 10 fixed "
        "Rademacher probes per batch. *λ_max*, *Tr(H)*: the largest Hessian eigenvalue (Lanczos) "
        "and the Hutchinson trace (30 products) of the final model's training loss on the same "
        "1024 samples, eval mode (`flatness report --measures` computes them from the checkpoints "
        "and caches them in `measures/`). *Train time*: optimisation steps only "
        "(no evaluation).",
        "",
    ]
    return "\n".join(out)


CSV_FIELDS = [
    "task", "method", "hparam", "value", "variant_id", "protocol_id", "runs", "failed", "seeds",
] + [f"{m}_{s}" for m in METRICS for s in ("mean", "std")] + ["p_value", "p_note"]


def csv_text(groups: Sequence[Group]) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=CSV_FIELDS, lineterminator="\n")
    writer.writeheader()
    for g in groups:
        for row in g.rows:
            line: dict[str, Any] = {
                "task": g.task, "method": g.method, "hparam": g.hparam or "", "value": "" if row.value is None else row.value,
                "variant_id": g.variant_id, "protocol_id": g.protocol_id, "runs": len(row.runs),
                "failed": len(row.failed), "seeds": " ".join(map(str, row.seeds)),
                "p_value": "" if not math.isfinite(row.p_value) else f"{row.p_value:.6g}", "p_note": row.p_note,
            }
            for m in METRICS:
                mean, std, _ = row.stats[m]
                line[f"{m}_mean"] = "" if not math.isfinite(mean) else f"{mean:.6g}"
                line[f"{m}_std"] = "" if not math.isfinite(std) else f"{std:.6g}"
            writer.writerow(line)
    return buf.getvalue()


# --------------------------------------------------------------------------------------------
# Plots


def _save_png(fig: Any, path: Path) -> None:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    atomic_write_bytes(path, lambda fh: fh.write(buf.getvalue()))


def _x_axis(ax: Any, values: Sequence[float], label: str) -> None:
    positive = [v for v in values if v > 0]
    if positive and 0 in values:
        ax.set_xscale("symlog", linthresh=min(positive))
    elif positive and len(positive) > 1 and max(positive) / min(positive) > 20:
        ax.set_xscale("log")
    ax.set_xlabel(label)


def plot_group(g: Group, directory: Path) -> list[Path]:
    """The three PNGs of a group; returns their paths."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    written = []
    rows = [r for r in g.rows if r.runs]
    label = f"{g.symbol or g.hparam} ({g.method})" if g.hparam else g.method
    swept = [r for r in rows if r.value is not None]
    if swept:
        xs = [float(r.value) for r in swept]
        fig, ax = plt.subplots(figsize=(5.5, 3.8))
        for metric, name, marker in (
            ("final_test_acc", "final test acc", "o"),
            ("val_chosen_test_acc", "test acc at best-val epoch", "s"),
        ):
            ys = [r.stats[metric][0] for r in swept]
            es = [0.0 if not math.isfinite(r.stats[metric][1]) else r.stats[metric][1] for r in swept]
            ax.errorbar(xs, ys, yerr=es, marker=marker, capsize=3, label=name)
        paper = PAPER_FINAL_ACC.get(g.task, {}) if g.method == "fa" and not g.protocol_id else {}
        px = [v for v in xs if v in paper]
        if px:
            ours = [y for r in swept for y in (r.stats["final_test_acc"][0],) if math.isfinite(y)]
            low, high = min(ours) - 0.05, max(ours) + 0.05
            if all(low <= paper[v] <= high for v in px):
                ax.plot(px, [paper[v] for v in px], "x", color="grey", label="paper (final acc)")
            else:  # e.g. the paper's broken 20NG / Breast-Cancer baselines: would squash the axis
                span = f"{min(paper[v] for v in px):.3f}–{max(paper[v] for v in px):.3f}"
                ax.plot([], [], " ", label=f"paper: {span} (off scale)")
        _x_axis(ax, xs, label)
        ax.set_ylabel("test accuracy (mean ± std over seeds)")
        ax.set_title(f"{g.task}: accuracy vs {g.symbol or g.hparam}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        path = directory / f"{g.slug}_accuracy.png"
        _save_png(fig, path)
        plt.close(fig)
        written.append(path)

        fig, ax = plt.subplots(figsize=(5.5, 3.8))
        ys = [r.stats["measured_sq_trace_per_B"][0] for r in swept]
        ax.plot(xs, ys, marker="o", label="mean over seeds")
        run_x = [float(r.value) for r in swept for run in r.runs]
        run_y = [run.get("measured_sq_trace_per_B") for r in swept for run in r.runs]
        ax.plot(run_x, run_y, ".", color="grey", alpha=0.7, label="single runs")
        ax.legend(fontsize=8)
        ys = ys + [y for y in run_y if y is not None]
        _x_axis(ax, xs, label)
        if all(y > 0 for y in ys if math.isfinite(y)):
            ax.set_yscale("log")
        ax.set_ylabel("final Tr(H²)/B, measured")
        ax.set_title(f"{g.task}: measured flatness vs {g.symbol or g.hparam}")
        ax.grid(alpha=0.3, which="both")
        path = directory / f"{g.slug}_flatness.png"
        _save_png(fig, path)
        plt.close(fig)
        written.append(path)

    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    for r in rows:
        curves = [run.curves["test_acc"] for run in r.runs if run.curves.get("test_acc")]
        if not curves:
            continue
        n = min(len(c) for c in curves)
        mean = [statistics.fmean(c[i] for c in curves) for i in range(n)]
        std = [statistics.stdev([c[i] for c in curves]) if len(curves) > 1 else 0.0 for i in range(n)]
        epochs = list(range(1, n + 1))
        name = g.method if r.value is None else f"{g.symbol or g.hparam} = {r.value:g}"
        (line,) = ax.plot(epochs, mean, label=name)
        ax.fill_between(epochs, [m - s for m, s in zip(mean, std)], [m + s for m, s in zip(mean, std)], color=line.get_color(), alpha=0.15)
    ax.set_xlabel("epoch")
    ax.set_ylabel("test accuracy (mean ± std)")
    ax.set_title(f"{g.task}: test accuracy per epoch ({g.method})")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    path = directory / f"{g.slug}_curves.png"
    _save_png(fig, path)
    plt.close(fig)
    written.append(path)
    return written


def add_final_measures(
    directory: Path,
    records: list[RunRecord],
    data_dir: str | None = None,
    progress: bool = False,
) -> None:
    """Fill in λ_max and Tr(H) of every complete run from its checkpoint (cached in measures/)."""
    from .checkpoints import StaleCheckpointError
    from .measure import FLATNESS_KEYS, final_model_extras

    todo = [r for r in records if r.complete and r.checkpoint]
    from tqdm.auto import tqdm

    todo = [r for r in todo if (directory / str(r.checkpoint)).exists()]
    for r in tqdm(todo, desc="λ_max, Tr(H)", unit="run", leave=False, disable=not (progress and todo)):
        try:
            r.extras.update(final_model_extras(r, directory, directory / "measures", FLATNESS_KEYS, data_dir, None))
        except StaleCheckpointError as exc:  # one bad pairing must not sink the whole report
            # tqdm.write keeps the progress bar intact
            tqdm.write(f"flatness: warning: {exc}; its λ_max and Tr(H) are left out", file=sys.stderr)


def write_report(
    directory: str | Path,
    plots: bool = True,
    measures: bool = False,
    data_dir: str | None = None,
) -> str:
    """Write ``summary.csv``, ``summary.md`` and (``plots``) PNGs into ``directory``; return the markdown.

    ``measures``: compute the final models' λ_max and Tr(H) from their checkpoints where the
    records lack them (cached in ``directory/measures/``); without it, values already in that
    cache (from an earlier ``--measures`` or ``flatness compare``) are shown and nothing is
    computed. A directory without run records but with sub-directories holding
    some gets one report per sub-directory.
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise FlatnessError(f"no such results directory: {directory}")
    records = load_records(directory)
    if not records:
        subdirs = [d for d in sorted(directory.iterdir()) if d.is_dir() and any(d.glob("*.json"))]
        texts = [write_report(d, plots, measures, data_dir) for d in subdirs if load_records(d)]
        if not texts:
            raise FlatnessError(f"no run records (*.json from `flatness run`) in {directory}")
        return "\n".join(texts)
    if measures:
        add_final_measures(directory, records, data_dir, progress=True)
    else:  # what `--measures` or `flatness compare` measured before is shown, nothing computed
        from .measure import FLATNESS_KEYS, cached_extras

        for r in records:
            r.extras.update(cached_extras(r, directory / "measures", FLATNESS_KEYS))
    groups = summarize(records)
    text = markdown(groups)
    try:
        atomic_write_bytes(directory / "summary.csv", lambda fh: fh.write(csv_text(groups).encode()))
        atomic_write_bytes(directory / "summary.md", lambda fh: fh.write(text.encode()))
        if plots:
            for g in groups:
                plot_group(g, directory)
    except PermissionError as exc:
        raise FlatnessError(f"cannot write the report into {directory}: {exc.strerror}") from None
    return text
