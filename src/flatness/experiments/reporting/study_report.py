r"""Tables and plots of a study (:mod:`flatness.experiments.reporting.study`), written into ``OUT/TASK/study/GRID/``.

* ``ranking.md`` / ``ranking.csv`` / ``ranking.json`` — one row per measure, with one τ
  throughout, Kendall's τ_a (:mod:`.rank_stats`): τ with each target (the accuracy gap
  train − test, test accuracy, the loss gap test − train; targets are data,
  :data:`TARGETS`), the conditional τ with the primary target given the training loss
  (Kendall's partial τ: what the measure says beyond how well a model fits), Jiang et al.'s
  granulated ψ per hyper-parameter axis and Ψ, their mean over those axes (the seed is a
  replicate, not an axis). Every interval is a 95 % crossed bootstrap resampling the
  hyper-parameter settings and the seeds (models sharing a seed are not independent).
  Measures are oriented as complexities (larger = sharper or more complex: 1/margin², 1/σ²
  rather than margin or σ), so τ > 0 means "predicts a larger gap". Rows are sorted by τ with
  the primary target. Only models that met the grid's stopping rule enter; the others are
  counted (``population.json``: ``missed``).
* ``population.csv`` — every measured model: its axis values, seed, epochs, accuracies, losses,
  gaps and measures.
* ``scatter_AXIS.png`` — each measure against the accuracy gap, coloured by one varied axis.
* ``plane.md`` / ``plane.png`` — Geng et al.'s Fig. 2 from the same population: per method
  strength, the fraction of its models (each a point of a learning-rate × weight-decay plane)
  whose test accuracy reaches each threshold (the 10/25/50/75/90th percentiles of the
  population's test accuracy), pooled over the other axes.
* ``reparam.md`` / ``reparam.json`` (``--reparam``) — Dinh et al.'s rescaling of one model: each
  measure before and after α = 10 and α = 0.1 (:func:`flatness.measures.reparametrization_check`).
"""

from __future__ import annotations

import csv
import io
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ...utils import atomic_write_bytes, write_png
from ..running.record import read_record, write_json
from ..running.study_population import (
    AXES,
    STUDY_MEASURES,
    Population,
    StudyGrid,
    measurement_inputs,
)
from .rank_stats import AxisCoefficient, crossed_partial_tau, crossed_tau, granulated_kendall, mean_granulated

__all__ = ["RANKED", "varied_axes", "rank_measures", "plane_fractions", "write_study_report",
           "write_reparam_report"]

# (key, label) of the ranked measures, each oriented as a complexity (larger = sharper)
RANKED: tuple[tuple[str, str], ...] = (
    ("measured_sq_trace_per_B", "Tr(H²)/B (run's fixed protocol)"),
    ("hessian_sq_trace", "Tr(H²)"),
    ("hessian_trace", "Tr(H), Hutchinson"),
    ("hessian_trace_hutchpp", "Tr(H), Hutch++"),
    ("lambda_max", "λ_max"),
    ("last_layer_lambda_max", "λ_max of the last layer"),
    ("condition_number_topk", "λ_1/λ_k (top k)"),
    ("effective_dimension_topk", "effective dimension (top k)"),
    ("eps_sharpness", "ε-sharpness"),
    ("adaptive_sharpness", "adaptive sharpness"),
    ("noise_loss_increase", "loss rise under weight noise"),
    ("local_entropy_sharpness", "local-entropy sharpness −F(w; γ) − L(w)"),
    ("fisher_trace", "empirical Fisher trace"),
    ("model_divergence", "NRS model divergence"),
    ("param_norm", "parameter norm"),
    ("path_norm", "path norm"),
    ("distance_from_init", "distance from initialisation"),
    ("inverse_margin_sq", "1/margin² (10th percentile)"),
    ("pacbayes_flatness", "PAC-Bayes flatness 1/σ²"),
    ("pacbayes_orig", "PAC-Bayes bound (orig)"),
    ("pacbayes_init", "PAC-Bayes bound (init)"),
    ("pacbayes_mag_flatness", "PAC-Bayes mag. flatness 1/σ'²"),
    ("pacbayes_mag_orig", "PAC-Bayes mag. bound (orig)"),
    ("pacbayes_mag_init", "PAC-Bayes mag. bound (init)"),
    ("loss", "training loss (measure data)"),
)
# (key, label) of the generalisation targets, keys of a row's "generalization"; the first is
# the primary one (ψ, Ψ and the conditional τ are computed for it).
TARGETS: tuple[tuple[str, str], ...] = (("gap_acc", "accuracy gap"), ("test_acc", "test accuracy"),
                                        ("gap_loss", "loss gap"))
COVARIATE = "train_loss"  # the conditional τ holds the fit fixed
SHORT = {"lr": "lr", "batch_size": "B", "width": "width", "weight_decay": "wd", "dropout": "dropout",
         "method": "method", "seed": "seed"}


def varied_axes(population: Population) -> list[str]:
    """The hyper-parameter axes that take two or more values in the population (never the seed)."""
    return [a for a in AXES if len({r["settings"][a] for r in population.rows}) > 1]


def _column(population: Population, key: str) -> np.ndarray:
    return np.asarray([r["measures"].get(key, math.nan) for r in population.rows], dtype=float)


def _target(population: Population, key: str) -> np.ndarray:
    return np.asarray([r["generalization"].get(key, math.nan) for r in population.rows], dtype=float)


def _seeds(population: Population) -> list[Any]:
    return [r["settings"].get("seed", 0) for r in population.rows]


def rank_measures(
    population: Population,
    resamples: int = 1000,
    seed: int = 0,
    measures: Sequence[tuple[str, str]] = RANKED,
    targets: Sequence[tuple[str, str]] = TARGETS,
) -> list[dict[str, Any]]:
    """One entry per measure present in ≥ 3 models.

    τ_a with each target, the conditional τ with the primary (first) target given the training loss,
    ψ per axis and Ψ, each with its crossed bootstrap interval (settings × seeds).
    """
    axes = varied_axes(population)
    settings = [r["settings"] for r in population.rows]
    seeds = _seeds(population)
    primary = targets[0][0]
    main = _target(population, primary)
    fit = _target(population, COVARIATE)
    common = {"resamples": resamples, "seed": seed}
    rows = []
    for key, label in measures:
        values = _column(population, key)
        if np.isfinite(values).sum() < 3:
            continue
        entry: dict[str, Any] = {"measure": key, "label": label, "models": int(np.isfinite(values).sum())}
        for target, _ in targets:
            tau = crossed_tau(values, _target(population, target), settings, seeds, axes, **common)
            entry[f"tau_{target}"] = tau.value
            entry[f"tau_{target}_low"], entry[f"tau_{target}_high"] = tau.low, tau.high
        cond = crossed_partial_tau(values, main, fit, settings, seeds, axes, **common)
        entry["ctau"], entry["ctau_low"], entry["ctau_high"] = cond.value, cond.low, cond.high
        psi: dict[str, AxisCoefficient] = granulated_kendall(values, main, settings, axes, seeds=seeds, **common)
        for axis, c in psi.items():
            entry[f"psi_{axis}"], entry[f"psi_{axis}_low"], entry[f"psi_{axis}_high"] = c.value, c.low, c.high
            entry[f"psi_{axis}_cells"] = c.num_cells
        big_psi = mean_granulated(psi)
        entry["psi_mean"], entry["psi_mean_low"], entry["psi_mean_high"] = big_psi.value, big_psi.low, big_psi.high
        rows.append(entry)
    rows.sort(key=lambda e: -e[f"tau_{primary}"] if math.isfinite(e[f"tau_{primary}"]) else math.inf)
    return rows


def plane_fractions(population: Population, thresholds: Sequence[float] | None = None) -> dict[str, Any]:
    """Geng et al.'s Fig. 2: per method strength, the share of its models with test accuracy ≥ t."""
    acc = _target(population, "test_acc")
    if thresholds is None:
        thresholds = sorted({round(float(q), 4) for q in np.quantile(acc, [0.1, 0.25, 0.5, 0.75, 0.9])})
    methods = list(dict.fromkeys(r["settings"]["method"] for r in population.rows))
    table = {}
    for m in methods:
        mine = np.asarray([a for a, r in zip(acc, population.rows, strict=True) if r["settings"]["method"] == m])
        table[m] = {"models": int(mine.size), "fractions": [float((mine >= t).mean()) for t in thresholds]}
    return {"thresholds": list(thresholds), "methods": table}


def _fmt(value: float, low: float | None = None, high: float | None = None) -> str:
    if not math.isfinite(value):
        return "—"
    text = f"{value:+.2f}"
    if low is not None and high is not None and math.isfinite(low) and math.isfinite(high):
        text += f" [{low:+.2f}, {high:+.2f}]"
    return text


def _relations(population: Population) -> str:
    """How the targets relate to each other and to the fit here: read every τ below against it."""
    axes = varied_axes(population)
    settings, seeds = [r["settings"] for r in population.rows], _seeds(population)
    gap, acc, fit = (_target(population, k) for k in ("gap_acc", "test_acc", COVARIATE))
    pairs = [("the accuracy gap and test accuracy", gap, acc), ("the accuracy gap and the training loss", gap, fit)]
    parts = []
    for what, x, y in pairs:
        t = crossed_tau(x, y, settings, seeds, axes)
        parts.append(f"τ between {what}: {_fmt(t.value, t.low, t.high)}")
    return "Kendall " + "; ".join(parts) + "."


def _design_lines(population: Population, grid: StudyGrid) -> list[str]:
    seeds = sorted({r["settings"].get("seed", 0) for r in population.rows})
    cells = len(grid.settings())
    rule = []
    if grid.protocol.get("stop_train_loss") is not None:
        rule.append(f"training cross-entropy ≤ {grid.protocol['stop_train_loss']:g}")
    if grid.protocol.get("stop_train_acc") is not None:
        rule.append(f"training accuracy ≥ {grid.protocol['stop_train_acc']:g}")
    subset = grid.protocol.get("train_subset")
    lines = [
        f"Design: {' × '.join(f'{SHORT[a]} {list(v)}' for a, v in grid.factors.items())} crossed "
        f"({cells} settings) × seeds {list(grid.seeds)} as replicates = {cells * len(grid.seeds)} models. "
        f"Fixed: {', '.join(f'{SHORT[a]} = {v}' for a, v in grid.fixed.items()) or 'nothing'}."
        + (f" Training subset: {subset:,} images (fixed, stratified)." if subset else ""),
        ("Stopping rule: " + " or ".join(rule) + f" (eval mode, whole training set), cap "
         f"{grid.protocol.get('epochs', '?')} epochs; " if rule else "No stopping rule: every model at the cap; ")
        + f"{len(population.rows)} models met it and are measured, {len(population.missed)} reached the cap "
        f"first and are left out" + (f" ({', '.join(population.missed)})" if population.missed else "")
        + f", {len(population.failed)} diverged" + (f" ({', '.join(population.failed)})" if population.failed else "")
        + (f". Seeds present: {seeds}." if seeds else "."),
    ]
    return lines


def _markdown(population: Population, grid: StudyGrid, ranking: list[dict[str, Any]],
              plane: dict[str, Any]) -> str:
    axes = varied_axes(population)
    rows = population.rows
    acc = _target(population, "test_acc")
    gap = _target(population, "gap_acc")
    fit = _target(population, COVARIATE)
    epochs = [r.get("epochs", 0) for r in rows]
    lines = [
        f"# Flatness study: {population.task}, grid `{grid.name}`",
        "",
        f"{grid.description}. Protocol overrides: {json.dumps(grid.protocol) if grid.protocol else 'none'}.",
        *_design_lines(population, grid),
        f"Test accuracy {acc.min():.4f} to {acc.max():.4f}; accuracy gap (train − test, eval mode) "
        f"{gap.min():+.4f} to {gap.max():+.4f}; training loss {fit.min():.4f} to {fit.max():.4f}; "
        f"epochs {min(epochs)} to {max(epochs)}.",
        _relations(population),
        f"Time: training {population.train_seconds:.0f} s (sum of the run records), measuring "
        f"{population.measure_seconds:.0f} s.",
        "",
        "One τ throughout: Kendall's τ_a (the mean over pairs of distinct models of sign(Δ measure)·"
        "sign(Δ target); a tie counts 0). *τ*: with the accuracy gap, test accuracy and the loss gap "
        "(test − train). *τ | fit*: Kendall's partial τ with the accuracy gap given the training loss "
        "(what the measure says beyond how well a model fits). *ψ* per axis: τ with the accuracy gap "
        "over the models that differ in that axis only (same other settings, same seed), averaged over "
        "those cells; *Ψ*: the mean of the ψ over the hyper-parameter axes (the seed is a replicate). "
        "Brackets: 95 % crossed bootstrap intervals resampling the hyper-parameter settings and the "
        "seeds. τ > 0 with a gap: the measure predicts a larger gap; with test accuracy: larger values "
        "go with higher test accuracy.",
        "",
    ]
    head = ["measure", "τ gap", "τ test acc", "τ loss gap", "τ gap | fit", *[f"ψ {SHORT[a]}" for a in axes], "Ψ"]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for e in ranking:
        cells = [e["label"]]
        for target, _ in TARGETS:
            cells.append(_fmt(e[f"tau_{target}"], e[f"tau_{target}_low"], e[f"tau_{target}_high"]))
        cells.append(_fmt(e["ctau"], e["ctau_low"], e["ctau_high"]))
        cells += [_fmt(e[f"psi_{a}"], e[f"psi_{a}_low"], e[f"psi_{a}_high"]) for a in axes]
        cells.append(_fmt(e["psi_mean"], e["psi_mean_low"], e["psi_mean_high"]))
        lines.append("| " + " | ".join(cells) + " |")
    if ranking:
        cells = {a: ranking[0][f"psi_{a}_cells"] for a in axes}
        lines += ["", "Cells per axis (groups of models differing in that axis only, per seed): "
                  + ", ".join(f"{SHORT[a]} {n}" for a, n in cells.items()) + "."]
    if population.errors:
        failed = sorted({m for errs in population.errors.values() for m in errs})
        lines.append(f"Measures that failed on some models (left out there): {', '.join(failed)} "
                     f"({len(population.errors)} models; reasons in population.json).")
    lines += ["", "## Share of the learning-rate × weight-decay plane above test-accuracy thresholds",
              "", "(Geng et al.'s Fig. 2: the share of each method strength's models, i.e. of its lr × wd "
              "plane pooled over the settings of the other axes and the seeds, whose test "
              "accuracy reaches each threshold; thresholds: the 10/25/50/75/90th percentiles of the "
              "population's test accuracy.)", ""]
    head = ["method", "models", *[f"≥ {t:.4f}" for t in plane["thresholds"]]]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for m, v in plane["methods"].items():
        lines.append("| " + " | ".join([m, str(v["models"]), *[f"{f:.2f}" for f in v["fractions"]]]) + " |")
    return "\n".join(lines) + "\n"


def _csv(rows: list[dict[str, Any]]) -> str:
    fields = list(dict.fromkeys(k for r in rows for k in r))
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=fields)
    writer.writeheader()
    writer.writerows(rows)
    return buf.getvalue()


def _population_rows(population: Population) -> list[dict[str, Any]]:
    keys = [k for k, _ in RANKED]
    return [{"name": r["name"], **r["settings"], "epochs": r.get("epochs", ""), **r["generalization"],
             **{k: r["measures"].get(k, "") for k in keys}} for r in population.rows]


def _save(fig: Any, path: Path) -> None:
    write_png(fig, path, dpi=100, bbox_inches="tight")


def _scatter(population: Population, axis: str, keys: Sequence[str], path: Path) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    cols = 5
    nrows = math.ceil(len(keys) / cols)
    fig = Figure(figsize=(3.2 * cols, 2.6 * nrows), layout="constrained")
    FigureCanvasAgg(fig)
    gap = _target(population, "gap_acc")
    levels = sorted({r["settings"][axis] for r in population.rows}, key=str)
    colours = [f"C{i % 10}" for i in range(len(levels))]
    labels = dict(RANKED)
    for i, key in enumerate(keys):
        ax = fig.add_subplot(nrows, cols, i + 1)
        values = _column(population, key)
        for level, colour in zip(levels, colours, strict=True):
            mask = np.asarray([r["settings"][axis] == level for r in population.rows]) & np.isfinite(values)
            ax.scatter(values[mask], gap[mask], s=10, color=colour, label=str(level))
        finite = values[np.isfinite(values)]
        if finite.size and finite.min() > 0 and finite.max() / finite.min() > 100:
            ax.set_xscale("log")
        ax.set_title(labels[key], fontsize=8)
        ax.tick_params(labelsize=6)
        if i % cols == 0:
            ax.set_ylabel("accuracy gap", fontsize=7)
    handles, names = fig.axes[0].get_legend_handles_labels()
    fig.legend(handles, names, title=axis, loc="outside right upper", fontsize=7)
    fig.suptitle(f"{population.task}: measures vs accuracy gap, coloured by {axis}")
    _save(fig, path)


def _plane_plot(population: Population, plane: dict[str, Any], path: Path) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(5.5, 3.6), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    for m, v in plane["methods"].items():
        ax.plot(plane["thresholds"], v["fractions"], marker="o", label=f"{m} ({v['models']})")
    ax.set_xlabel("test-accuracy threshold")
    ax.set_ylabel("share of the lr × wd plane ≥ threshold")
    ax.set_ylim(-0.02, 1.02)
    ax.legend(fontsize=7)
    ax.set_title(f"{population.task}: viable hyper-parameter plane per method")
    _save(fig, path)


def write_study_report(
    population: Population, grid: StudyGrid, directory: Path, *, plots: bool = True, resamples: int = 1000
) -> str:
    """Write the ranking, population, plane and plots into ``directory``; returns the markdown."""
    if len(population.rows) < 3:
        from ...utils import FlatnessError

        raise FlatnessError(f"only {len(population.rows)} complete models: too few for rank statistics")
    ranking = rank_measures(population, resamples)
    plane = plane_fractions(population)
    text = _markdown(population, grid, ranking, plane)
    atomic_write_bytes(directory / "ranking.md", lambda fh: fh.write(text.encode()))
    atomic_write_bytes(directory / "ranking.csv", lambda fh: fh.write(_csv(ranking).encode()))
    pop_rows = _population_rows(population)
    atomic_write_bytes(directory / "population.csv", lambda fh: fh.write(_csv(pop_rows).encode()))
    write_json(directory / "ranking.json", {
        "format": "flatness-study", "task": population.task, "grid": grid.name,
        "description": grid.description, "protocol": grid.protocol, "axes": varied_axes(population),
        "seeds": list(grid.seeds), "tau": "tau_a", "interval": "crossed bootstrap over settings and seeds",
        "missed": population.missed, "resamples": resamples, "measures": ranking, "plane": plane,
    })
    write_json(directory / "population.json", population.as_dict())
    if plots:
        keys = [k for k, _ in RANKED if np.isfinite(_column(population, k)).sum() >= 3]
        for axis in varied_axes(population):
            _scatter(population, axis, keys, directory / f"scatter_{axis}.png")
        _plane_plot(population, plane, directory / "plane.png")
    return text


def write_reparam_report(
    population: Population,
    grid: StudyGrid,
    out_root: Path,
    directory: Path,
    data_dir: str | None = None,
    download: bool | None = None,
    alphas: Sequence[float] = (10.0, 0.1),
    rtol: float = 1e-3,
) -> str:
    """Dinh et al.'s rescaling of the population's first ``none`` model (else its first model)."""
    from ...measures import reparametrization_check

    reference = next((r for r in population.rows if r["settings"]["method"] == "none"), population.rows[0])
    run_dir = out_root / population.task
    record = read_record(run_dir / f"{reference['name']}.json")
    assert record is not None  # it was measured from this record
    task, model, batches, options = measurement_inputs(record, run_dir, data_dir, download)
    results = []
    for alpha in alphas:
        drift, changes = reparametrization_check(model, task.loss_fn, batches, STUDY_MEASURES, alpha, 0, options)
        results.append((alpha, drift, {c.key: c for c in changes}))
    lines = [f"# Reparametrisation check (Dinh et al., 2017): {population.task}, model `{reference['name']}`",
             "", "First linear layer × α (weight and bias), second ÷ α: the same function "
             f"(largest output change {max(d for _, d, _ in results):.2e}). Invariant: relative change ≤ {rtol:g}.",
             "", "| measure | value | " + " | ".join(f"α = {a:g}: value, change" for a in alphas) + " | invariant |",
             "|" + "---|" * (3 + len(alphas))]
    table = []
    for key, label in RANKED:
        if not all(key in by_key for _, _, by_key in results):
            continue
        before = results[0][2][key].before
        cells, invariant = [], True
        for _alpha, _, by_key in results:
            c = by_key[key]
            invariant = invariant and c.invariant(rtol)
            cells.append(f"{c.after:.4g}, {c.relative:.1e}")
        table.append({"measure": key, "before": before, "invariant": invariant,
                      **{f"after_{a:g}": by_key[key].after for a, _, by_key in results}})
        lines.append(f"| {label} | {before:.4g} | " + " | ".join(cells) + f" | {'yes' if invariant else 'no'} |")
    text = "\n".join(lines) + "\n"
    atomic_write_bytes(directory / "reparam.md", lambda fh: fh.write(text.encode()))
    write_json(directory / "reparam.json", {"model": reference["name"], "alphas": list(alphas), "rtol": rtol,
                                            "drift": [d for _, d, _ in results], "measures": table})
    return text
