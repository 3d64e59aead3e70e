"""Tables, statistics and plots of a results directory: ``flatness report DIR``.

Reads every run record (``*.json`` written by :mod:`flatness.experiments.running.runner`) in ``DIR``,
groups runs by (task, method, method settings, protocol) (:mod:`.groups`), and writes,
atomically:

* ``summary.csv`` — one row per (group, strength): mean and std over seeds of every metric and
  the comparison of final test accuracy with the group's baseline (:mod:`.stats`);
* ``summary.md`` — tables shaped like the paper's Tables 1–3 plus std and p-value columns, and
  per group a statistics table: the difference from the baseline paired by seed with its 95 %
  interval, the effect size, paired t and Wilcoxon p-values raw and Holm-adjusted, the minimum
  detectable effect;
* ``<group>_accuracy.png``, ``<group>_flatness.png``, ``<group>_curves.png`` and, for records
  with calibration fields, ``<group>_reliability.png`` (:mod:`.plots`).

Degenerate comparisons (fewer than 2 pairs, identical values, zero variance) show a note
instead of a p-value. The footnotes take their numbers from the measurement protocol
(:mod:`.measure`) and each group's training config.

Example:
    >>> from flatness.experiments.running.record import RunRecord
    >>> from flatness.experiments.reporting.report import markdown, summarize
    >>> records = [RunRecord(status="complete", name=f"fa_lam{v:g}_seed{s}",
    ...             task="breast-cancer-mlp", method="fa", hparam="lam", value=v,
    ...             seed=s, config={"epochs": 1, "batch_size": 32, "lr": 1e-3,
    ...             "weight_decay": 0.0}, final_test_acc=acc)
    ...            for v, accs in ((0.0, (0.90, 0.92, 0.91)), (0.1, (0.93, 0.93, 0.95)))
    ...            for s, acc in enumerate(accs)]
    >>> (group,) = summarize(records)
    >>> c = group.rows[1].vs_baseline
    >>> c.n_pairs, round(c.difference, 4), round(c.p_t, 3), round(c.p_wilcoxon, 3)
    (3, 0.0267, 0.094, 0.25)
    >>> "| 0.1 | 3 pairs | +0.0267 [" in markdown([group])
    True
"""

from __future__ import annotations

import csv
import io
import math
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ...methods import method_class
from ...utils import FlatnessError, atomic_write_bytes
from ..running.platforms import platform_note
from ..running.progress import progress_bar, tracked
from ..running.record import RunRecord
from ..world.plugins import known_task
from .groups import METRICS, Group, Row, load_records, paper_results, strength_symbol, summarize, variant_settings
from .plots import plot_group
from .tables import (
    comparison_note,
    comparison_table,
    epoch_flatness_note,
    final_flatness_note,
    final_measures_note,
    fmt,
    p_cell,
    protocol_line,
)

__all__ = [
    "Row",
    "Group",
    "load_records",
    "summarize",
    "markdown",
    "csv_text",
    "add_final_measures",
    "write_report",
]


def _label(row: Row) -> str:
    if row.value is None:
        return "—"
    if row.twin is None:
        return f"{row.value:g}"
    method, value = row.twin
    return f"{row.value:g} (≡ {method.upper()} {strength_symbol(method, None)} = {value:g})"


def _group_table(g: Group) -> list[str]:
    paper = paper_results(g)
    head = [
        g.symbol or "setting", "runs", "Final acc", "Best acc†", "Val-chosen acc", "Avg. flatness (train est.)",
        "Avg. flatness (measured)", "Final Tr(H²)/B (measured)", "λ_max", "Tr(H)",
        "Train time (s)", "s/epoch", "p (final acc), t / Holm",
    ]
    if paper:
        head.append("Paper final acc")
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in g.rows:
        s = row.stats
        runs = f"{len(row.runs)}" + (f" (+{len(row.failed)} failed)" if row.failed else "")
        measured = {k: fmt(*s[k][:2], sci=True) if s[k][2] else "not measured" for k in ("lambda_max", "hessian_trace")}
        cells = [
            _label(row),
            runs,
            fmt(*s["final_test_acc"][:2]),
            fmt(*s["best_test_acc"][:2]),
            fmt(*s["val_chosen_test_acc"][:2]),
            ("not computed" if not s["avg_train_sq_trace_per_B"][2]
             else fmt(*s["avg_train_sq_trace_per_B"][:2], sci=True)),
            fmt(*s["avg_epoch_sq_trace_per_B"][:2], sci=True),
            fmt(*s["measured_sq_trace_per_B"][:2], sci=True),
            measured["lambda_max"],
            measured["hessian_trace"],
            fmt(*s["train_seconds"][:2], digits=1),
            fmt(s["seconds_per_epoch"][0], digits=2),
            p_cell(row.vs_baseline, row.role),
        ]
        if paper:
            ref = paper.get(float(row.value)) if row.value is not None else None
            cells.append("—" if ref is None else f"{ref:.4f}")
        out.append("| " + " | ".join(cells) + " |")
    return out


def _twin_note(g: Group) -> list[str]:
    """Why a row is marked as another method (the method class's ``twin``, its ``why``)."""
    row = next((row for row in g.rows if row.twin is not None), None)
    if row is None:
        return []
    method, value = row.twin
    why = method_class(g.method).twin["why"].format(value=value)
    return ["", f"`{g.method}` at {g.symbol} = {value:g} {why} (marked ≡ {method.upper()}; not a separate method)."]


def _sharper_note(g: Group) -> list[str]:
    """One line where a strength left the final model detectably *sharper* than the baseline.

    With the reason the records show when they show it: a training loss kept away from zero.
    """
    base = next((row for row in g.rows if row.role == "baseline"), None)
    if base is None and g.baseline == "method none":
        return []  # the baseline lives in another group; its loss is in that group's table
    sharper = [row for row, c in g.flatness_comparisons
               if c.difference > 0 and math.isfinite(c.p_t_holm) and c.p_t_holm < 0.05]
    if not sharper:
        return []
    row = sharper[-1]
    loss, base_loss = row.stats["final_train_loss"][0], base.stats["final_train_loss"][0] if base else math.nan
    line = f"Why Tr(H²)/B can rise under the penalty here ({g.symbol} = {_label(row)}): "
    if math.isfinite(loss) and math.isfinite(base_loss) and loss > 2 * base_loss:
        line += (f"the final training loss is {loss:.3g} against {base_loss:.3g} at the baseline — near zero "
                 "loss the cross-entropy Hessian shrinks with the loss (its output block is diag(p) − ppᵀ, "
                 "p(1 − p) for one logit), "
                 "so a penalty that keeps the loss off zero leaves a less confident, higher-curvature model.")
    else:
        line += ("not explained by the training loss (within 2× of the baseline's); the penalty is estimated "
                 "on mini-batches with dropout off, the measure on the final eval-mode model.")
    return ["", line]


def _median_seconds(row: Row | None) -> float:
    values = [r.get("train_seconds") for r in row.runs] if row is not None else []
    values = [float(v) for v in values if isinstance(v, (int, float)) and math.isfinite(v)]
    return statistics.median(values) if values else math.nan


def _time_ratio(row: Row) -> float:
    """Median training seconds over the reference's (a median: one slowed run moves a mean)."""
    mine, ref = _median_seconds(row), _median_seconds(row.reference)
    return mine / ref if math.isfinite(mine) and math.isfinite(ref) and ref > 0 else math.nan


def _reference_section(g: Group, groups: Sequence[Group]) -> list[str]:
    """This group against its reference (fixed λ, or the first method of a composition)."""
    acc, flat = g.reference_comparisons(), g.reference_comparisons(flatness=True)
    if not acc and not flat:
        return []
    family = {f: sum(len(h.reference_comparisons(f)) for h in groups) for f in (False, True)}

    def over(n: int) -> str:
        return f"the {n} comparison{'s' if n != 1 else ''} of variants with their references in this report"

    sym = g.symbol or "setting"
    out = ["", f"### Against {g.reference}, at the same {sym}", ""]
    if acc:
        out += comparison_table(sym, [(_label(row), c) for row, c in acc])
        out += ["", comparison_note("the final test accuracy", f"the reference ({g.reference})", [c for _, c in acc],
                                    family=over(family[False]))]
    if flat:
        out += ["", "Final Tr(H²)/B (measured), log10:", ""]
        out += comparison_table(sym, [(_label(row), c) for row, c in flat], digits=2)
        out += ["", comparison_note("log10 of the final measured Tr(H²)/B", f"the reference ({g.reference})",
                                    [c for _, c in flat], digits=2, family=over(family[True]))]
    costs = [f"{_label(row)}: ×{_time_ratio(row):.2f}" for row, _ in acc if math.isfinite(_time_ratio(row))]
    if costs:
        out += ["", "Cost: median training seconds over the reference's at the same strength "
                    "(from the run records; runs that shared the machine differently are not comparable): "
                    f"{'; '.join(costs)}."]
    return out


def _task_lines(g: Group, task: Any) -> list[str]:
    """The task's description and protocol.

    A plugin task's from its records (so a report needs no plugin file), with where it came from and
    what its *acc* columns hold.
    """
    source = next((r.task_source for row in g.rows for r in (*row.runs, *row.failed) if r.task_source), None)
    description = task.description if task is not None and source is None else (source or {}).get("description")
    if not description:
        return []
    lines = [f"{description}. Protocol: {protocol_line(g.config, g.method_kwargs)}."]
    if source:
        metric = source.get("metric", "accuracy")
        held = "" if metric == "accuracy" else f" The *acc* columns hold its score `{metric}` (higher is better)."
        lines.append(f"Task plugin `{source.get('reference')}` ({source.get('file')}, SHA-256 "
                     f"{str(source.get('sha256'))[:12]}).{held}")
    return lines


def _columns_note() -> str:
    return (
        "Columns. *Final acc*: test accuracy after the last epoch. *Best acc†*: the best test "
        "accuracy over epochs — optimistic, since it selects on the test set. *Val-chosen acc*: "
        "test accuracy at the epoch of best accuracy on the validation split carved from the "
        "training set. *Avg. flatness (train est.)*: the paper's column, the mean of the "
        "penalty's own Tr(H²)/B estimates during training; a run without the penalty computes "
        "none (the paper printed 0.000 there). *Avg. flatness (measured)*: mean over epochs of "
        f"{epoch_flatness_note()}. *Final Tr(H²)/B (measured)*: the final model by one fixed "
        f"protocol for every run — {final_flatness_note()}. *λ_max*, *Tr(H)*: {final_measures_note()} "
        "(`flatness report --measures` computes them from the checkpoints and caches them in "
        "`measures/`). *Train time*: optimisation steps only (no evaluation), from the run records. "
        "*p (final acc), t / Holm*: the paired t-test of final test accuracy against the baseline, raw / "
        "Holm-adjusted (details in each group's statistics table)."
    )


def markdown(groups: Sequence[Group]) -> str:
    """The ``summary.md`` text: per group a results table and a statistics table; notes."""
    out = ["# Results", ""]
    mixed = platform_note(r for g in groups for row in g.rows for r in (*row.runs, *row.failed))
    if mixed:
        out += [mixed, ""]
    for g in groups:
        task = known_task(g.task)
        title = f"## {g.task} — method `{g.method}`"
        if g.variant_id:
            changed = variant_settings(g, groups)
            title += ", " + ", ".join(f"{k}={v}" for k, v in sorted(changed.items()))
        elif task is not None and task.paper_table and g.method in task.paper_final_acc and not g.model_id:
            title += f" (the paper's {task.paper_table})"
        if g.model_id:
            title += ", model " + ", ".join(f"{k}={v}" for k, v in sorted(g.model_kwargs.items()))
        out += [title, ""]
        out += _task_lines(g, task)
        seeds = sorted({s for row in g.rows for s in row.seeds})
        out += [f"Seeds: {seeds}. Mean ± std over seeds. Baseline of the tests: {g.baseline or 'none found'}.", ""]
        out += _group_table(g)
        for row in g.rows:
            for r in row.failed:
                out.append(f"\nFailed: `{r['name']}`: {r.get('error')}")
        out += _twin_note(g)
        if g.comparisons:
            sym = g.symbol or "setting"
            out += ["", f"Final test accuracy against {g.baseline}:", ""]
            out += comparison_table(sym, [(_label(row), c) for row, c in g.comparisons])
            out += ["", comparison_note("the final test accuracy", f"the baseline ({g.baseline})",
                                        [c for _, c in g.comparisons], family=g.holm_family or None)]
        if g.flatness_comparisons:
            sym = g.symbol or "setting"
            out += ["", f"Final Tr(H²)/B (measured), log10, against {g.baseline}:", ""]
            out += comparison_table(sym, [(_label(row), c) for row, c in g.flatness_comparisons], digits=2)
            out += ["", comparison_note("log10 of the final measured Tr(H²)/B", f"the baseline ({g.baseline})",
                                        [c for _, c in g.flatness_comparisons], digits=2,
                                        family=g.holm_family_flatness or None)
                    + " A Δ of -0.30 halves Tr(H²)/B; +1 multiplies it by 10."]
            out += _sharper_note(g)
        out += _reference_section(g, groups)
        out.append("")
    out += [_columns_note(), ""]
    return "\n".join(out)


_STAT_FIELDS = [
    "test", "n_pairs", "difference", "ci_low", "ci_high", "effect_name", "effect", "effect_ci_low",
    "effect_ci_high", "p_t", "p_t_holm", "p_perm", "p_perm_holm", "p_wilcoxon", "p_wilcoxon_holm", "mde", "p_note",
]
CSV_FIELDS = [
    "task", "method", "hparam", "value", "variant_id", "protocol_id", "runs", "failed", "seeds",
] + [f"{m}_{s}" for m in METRICS for s in ("mean", "std")] + _STAT_FIELDS
# this strength against the same strength of the group's reference (fixed λ; SAM alone)
_REF_FIELDS = [
    "reference", "ref_acc_difference", "ref_acc_p_t", "ref_acc_p_t_holm", "ref_acc_p_wilcoxon",
    "ref_acc_p_wilcoxon_holm", "ref_log10_sq_trace_difference", "ref_log10_sq_trace_p_t",
    "ref_log10_sq_trace_p_t_holm", "ref_time_ratio",
]
CSV_FIELDS += _REF_FIELDS


def _num(x: float) -> str:
    return "" if not math.isfinite(x) else f"{x:.6g}"


def csv_text(groups: Sequence[Group]) -> str:
    """The ``summary.csv`` text (empty cells where a value is undefined)."""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=CSV_FIELDS, lineterminator="\n")
    writer.writeheader()
    for g in groups:
        for row in g.rows:
            line: dict[str, Any] = {
                "task": g.task, "method": g.method, "hparam": g.hparam or "",
                "value": "" if row.value is None else row.value,
                "variant_id": g.variant_id, "protocol_id": g.protocol_id, "runs": len(row.runs),
                "failed": len(row.failed), "seeds": " ".join(map(str, row.seeds)),
            }
            for m in METRICS:
                mean, std, _ = row.stats[m]
                line[f"{m}_mean"], line[f"{m}_std"] = _num(mean), _num(std)
            c = row.vs_baseline
            if c is None:
                line["p_note"] = row.role
            else:
                line.update(
                    test=c.test, n_pairs=c.n_pairs, difference=_num(c.difference), ci_low=_num(c.ci[0]),
                    ci_high=_num(c.ci[1]), effect_name=c.effect_name, effect=_num(c.effect),
                    effect_ci_low=_num(c.effect_ci[0]), effect_ci_high=_num(c.effect_ci[1]), p_t=_num(c.p_t),
                    p_t_holm=_num(c.p_t_holm), p_perm=_num(c.p_perm), p_perm_holm=_num(c.p_perm_holm),
                    p_wilcoxon=_num(c.p_wilcoxon),
                    p_wilcoxon_holm=_num(c.p_wilcoxon_holm), mde=_num(c.mde), p_note=c.note,
                )
            a, f = row.vs_reference, row.flatness_vs_reference
            if a is not None:
                line.update(
                    reference=g.reference, ref_acc_difference=_num(a.difference), ref_acc_p_t=_num(a.p_t),
                    ref_acc_p_t_holm=_num(a.p_t_holm), ref_acc_p_wilcoxon=_num(a.p_wilcoxon),
                    ref_acc_p_wilcoxon_holm=_num(a.p_wilcoxon_holm), ref_time_ratio=_num(_time_ratio(row)),
                )
            if f is not None:
                line.update(ref_log10_sq_trace_difference=_num(f.difference), ref_log10_sq_trace_p_t=_num(f.p_t),
                            ref_log10_sq_trace_p_t_holm=_num(f.p_t_holm))
            writer.writerow(line)
    return buf.getvalue()


def add_final_measures(
    directory: Path,
    records: list[RunRecord],
    data_dir: str | None = None,
    progress: bool = False,
) -> None:
    """Fill in λ_max and Tr(H) of every complete run from its checkpoint (cached in measures/)."""
    from ..running.checkpoints import StaleCheckpointError
    from ..running.measure import FLATNESS_KEYS, cached_extras, final_model_extras

    todo = [r for r in records if r.complete and r.checkpoint]
    for r in records:  # no checkpoint (e.g. committed results): what the cache holds is shown
        if r not in todo or not (directory / str(r.checkpoint)).exists():
            r.extras.update(cached_extras(r, directory / "measures", FLATNESS_KEYS))
    todo = [r for r in todo if (directory / str(r.checkpoint)).exists()]
    bar = progress_bar(len(todo), "λ_max, Tr(H)", "run", leave=False, enabled=progress and bool(todo))
    for r in tracked(todo, bar):
        try:
            r.extras.update(final_model_extras(r, directory, directory / "measures", FLATNESS_KEYS, data_dir, None))
        except StaleCheckpointError as exc:  # one bad pairing must not sink the whole report
            bar.write(f"flatness: warning: {exc}; its λ_max and Tr(H) are left out")


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
        from ..running.measure import FLATNESS_KEYS, cached_extras

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
