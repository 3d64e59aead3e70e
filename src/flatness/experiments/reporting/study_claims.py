r"""The study tests the overview's claims (issue 31).

Written next to the ranking as ``claims.md`` and ``claims.json``.

Three questions, each on the population the ranking uses (models that met the stopping rule):

* **Calibration and robustness.** Each measure's Kendall τ_a (crossed bootstrap interval over
  settings × seeds, :mod:`.rank_stats`) with the test split's expected calibration error (15
  equal-width bins), negative log-likelihood, Brier score and the accuracy under corruption
  (image tasks: mean over the corruptions and severities; other tasks: over the input-noise
  levels), and the conditional τ given the training loss. Measures are oriented as complexities,
  so τ > 0 with ECE says "sharper models are worse calibrated"; τ < 0 with the corruption
  accuracy says "sharper models are less robust".
* **Mode connectivity.** For every setting and every pair of its seeds, the loss and error
  barrier on the straight line between the two final models
  (:mod:`flatness.experiments.running.study_barriers`), against the pair's mean measure
  (τ_a, crossed bootstrap over settings × seed pairs).
* **Model selection.** Groups: the models that share every axis but the learning rate and
  weight decay, and the seed (a practitioner's tuning plane). In each group, *validation alone*
  picks the model of highest validation accuracy; *validation + flatness* picks, among the
  models tied at that accuracy, the one the measure calls flattest (its lowest value); tied
  picks count with their mean test accuracy. The paired difference in test accuracy over groups
  (paired t-test, 95 % interval, minimum detectable effect; the Wilcoxon signed-rank test beside
  it, as the groups are too many for the exact sign-flip test), Holm over the measures: the
  paired t over the measures is the report's one family of tests.

Example:
    >>> rows = [{"settings": {"lr": lr, "weight_decay": 0, "method": "none", "seed": 0},
    ...          "generalization": {"val_acc": v, "test_acc": t}, "measures": {"m": m}}
    ...         for lr, v, t, m in ((1, 0.9, 0.8, 2.0), (2, 0.9, 0.9, 1.0), (3, 0.5, 0.95, 0.0))]
    >>> select_in_group(rows, None), select_in_group(rows, "m")
    (0.8500000000000001, 0.9)
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ...utils import atomic_write_bytes
from ..running.record import write_json
from ..running.study_population import Population, StudyGrid
from .rank_stats import crossed_partial_tau, crossed_tau
from .stats import adjust_holm, compare_samples
from .study_report import COVARIATE, RANKED, varied_axes

__all__ = ["CLAIM_TARGETS", "PLANE", "claim_taus", "barrier_taus", "select_in_group", "model_selection",
           "write_claims_report"]

# (key of a row's "generalization", label): what the overview says flat minima give
CLAIM_TARGETS: tuple[tuple[str, str], ...] = (
    ("test_ece", "ECE"), ("test_nll", "NLL"), ("test_brier", "Brier"),
    ("test_robust_acc", "acc. under corruption/noise"),
)
PLANE: tuple[str, ...] = ("lr", "weight_decay")  # the axes model selection chooses over


def _values(rows: Sequence[dict[str, Any]], part: str, key: str) -> np.ndarray:
    return np.asarray([r[part].get(key, math.nan) for r in rows], dtype=float)


def claim_taus(population: Population, *, resamples: int = 1000, seed: int = 0) -> list[dict[str, Any]]:
    """Per measure: τ and the conditional τ given the training loss with each of :data:`CLAIM_TARGETS`."""
    rows, axes = population.rows, varied_axes(population)
    settings = [r["settings"] for r in rows]
    seeds = [r["settings"].get("seed", 0) for r in rows]
    fit = _values(rows, "generalization", COVARIATE)
    targets = [(k, label) for k, label in CLAIM_TARGETS if np.isfinite(_values(rows, "generalization", k)).sum() >= 3]
    out = []
    for key, label in RANKED:
        values = _values(rows, "measures", key)
        if np.isfinite(values).sum() < 3:
            continue
        entry: dict[str, Any] = {"measure": key, "label": label}
        for target, _ in targets:
            y = _values(rows, "generalization", target)
            tau = crossed_tau(values, y, settings, seeds, axes, resamples=resamples, seed=seed)
            cond = crossed_partial_tau(values, y, fit, settings, seeds, axes, resamples=resamples, seed=seed)
            entry[target] = [tau.value, tau.low, tau.high]
            entry[f"{target}_given_fit"] = [cond.value, cond.low, cond.high]
        out.append(entry)
    return out


def barrier_taus(population: Population, barriers: Sequence[dict[str, Any]], *, resamples: int = 1000,
                 seed: int = 0) -> list[dict[str, Any]]:
    """Per measure: τ between each pair's loss (and error) barrier and the pair's mean measure."""
    by_name = {r["name"]: r for r in population.rows}
    pairs = [(by_name[b["pair"][0]], by_name[b["pair"][1]], b) for b in barriers
             if b["pair"][0] in by_name and b["pair"][1] in by_name]
    if len(pairs) < 3:
        return []
    axes = varied_axes(population)
    settings = [{k: v for k, v in a["settings"].items() if k != "seed"} for a, _, _ in pairs]
    seeds = [f"{a['settings']['seed']}-{b['settings']['seed']}" for a, b, _ in pairs]
    out = []
    for key, label in RANKED:
        mean = np.asarray([(a["measures"].get(key, math.nan) + b["measures"].get(key, math.nan)) / 2
                           for a, b, _ in pairs], dtype=float)
        if np.isfinite(mean).sum() < 3:
            continue
        entry: dict[str, Any] = {"measure": key, "label": label, "pairs": len(pairs)}
        for target in ("barrier_loss", "barrier_error"):
            y = np.asarray([math.nan if p[2].get(target) is None else p[2][target] for p in pairs], dtype=float)
            tau = crossed_tau(mean, y, settings, seeds, axes, resamples=resamples, seed=seed)
            entry[target] = [tau.value, tau.low, tau.high]
        out.append(entry)
    return out


def select_in_group(rows: Sequence[dict[str, Any]], measure: str | None) -> float:
    """Test accuracy of the pick in one group.

    Best validation accuracy, ties broken by the lowest ``measure`` (``None``: not broken);
    remaining ties give their mean test accuracy. NaN if no model has both a validation accuracy and
    (with ``measure``) a finite measure.
    """
    usable = [r for r in rows if math.isfinite(r["generalization"].get("val_acc", math.nan))
              and (measure is None or math.isfinite(r["measures"].get(measure, math.nan)))]
    if not usable:
        return math.nan
    best = max(r["generalization"]["val_acc"] for r in usable)
    picked = [r for r in usable if r["generalization"]["val_acc"] == best]
    if measure is not None:
        flattest = min(r["measures"][measure] for r in picked)
        picked = [r for r in picked if r["measures"][measure] == flattest]
    return float(np.mean([r["generalization"]["test_acc"] for r in picked]))


def has_validation_tie(rows: Sequence[dict[str, Any]]) -> bool:
    """Whether two or more models of a group share its best validation accuracy (a tie-break can act)."""
    accs = [r["generalization"].get("val_acc", math.nan) for r in rows]
    finite = [a for a in accs if math.isfinite(a)]
    return bool(finite) and finite.count(max(finite)) >= 2


def _groups(population: Population) -> list[list[dict[str, Any]]]:
    groups: dict[tuple[Any, ...], list[dict[str, Any]]] = {}
    for r in population.rows:
        key = tuple(sorted((k, str(v)) for k, v in r["settings"].items() if k not in PLANE))
        groups.setdefault(key, []).append(r)
    return [g for g in groups.values() if len(g) >= 2]


def model_selection(population: Population) -> dict[str, Any]:
    """Validation + each measure against validation alone, paired over the groups; Holm over measures."""
    groups = _groups(population)
    alone = {i: select_in_group(g, None) for i, g in enumerate(groups)}
    keys, comparisons, changed = [], [], []
    for key, label in RANKED:
        if not any(math.isfinite(r["measures"].get(key, math.nan)) for r in population.rows):
            continue
        flat = {i: select_in_group(g, key) for i, g in enumerate(groups)}
        keys.append((key, label))
        comparisons.append(compare_samples(flat, alone))
        changed.append(sum(1 for i in flat if math.isfinite(flat[i]) and flat[i] != alone[i]))
    comparisons = adjust_holm(comparisons)
    rows = [{"measure": k, "label": label, "groups_changed": n, **_comparison(c)}
            for (k, label), c, n in zip(keys, comparisons, changed, strict=True)]
    return {"groups": len(groups), "plane": list(PLANE),
            "groups_with_ties": sum(1 for g in groups if has_validation_tie(g)),
            "validation_alone_mean": float(np.nanmean(list(alone.values()))) if groups else math.nan,
            "rows": rows}


def _comparison(c: Any) -> dict[str, Any]:
    return {"difference": c.difference, "ci": list(c.ci), "p_t": c.p_t, "p_t_holm": c.p_t_holm,
            "p_wilcoxon": c.p_wilcoxon, "p_wilcoxon_holm": c.p_wilcoxon_holm, "mde": c.mde, "n": c.n_pairs,
            "note": c.note}


def _f(v: float) -> str:
    return "—" if v is None or not math.isfinite(v) else f"{v:+.2f}"


def _interval(v: Sequence[float] | None) -> str:
    return "—" if not v else f"{_f(v[0])} [{_f(v[1])}, {_f(v[2])}]"


def _p(v: float) -> str:
    return "—" if v is None or not math.isfinite(v) else f"{v:.3g}"


def _markdown(population: Population, grid: StudyGrid, taus: list[dict[str, Any]],
              barriers: list[dict[str, Any]], selection: dict[str, Any]) -> str:
    present = [(k, label) for k, label in CLAIM_TARGETS if taus and k in taus[0]]
    lines = [f"# Study claims: {population.task}, grid `{grid.name}`", "",
             f"{len(population.rows)} models (those that met the stopping rule). Measures are oriented as "
             "complexities (larger = sharper). Every interval is a 95 % crossed bootstrap over settings × seeds.",
             "", "## Calibration and robustness", ""]
    if present:
        head = " | ".join(f"τ {label} | τ {label} given fit" for _, label in present)
        lines += [f"| measure | {head} |", "|---|" + "---|" * (2 * len(present))]
        for e in taus:
            cells = " | ".join(f"{_interval(e.get(k))} | {_interval(e.get(k + '_given_fit'))}" for k, _ in present)
            lines.append(f"| {e['label']} | {cells} |")
    else:
        lines.append("The records hold no calibration or robustness fields (written before issue 31).")
    lines += ["", "## Mode connectivity between seeds of one setting", ""]
    if barriers:
        lines += [f"{barriers[0]['pairs']} seed pairs; barrier on the straight line (11 points) on the study's "
                  "measurement batches; measure = the pair's mean.", "",
                  "| measure | τ loss barrier | τ error barrier |", "|---|---|---|"]
        lines += [f"| {e['label']} | {_interval(e['barrier_loss'])} | {_interval(e['barrier_error'])} |"
                  for e in barriers]
    else:
        lines.append("Fewer than 3 seed pairs: not computed.")
    lines += ["", "## Model selection: validation accuracy with and without a flatness tie-break", "",
              f"{selection['groups']} groups (models sharing every axis but {' and '.join(selection['plane'])}, "
              f"and the seed); validation alone picks models of mean test accuracy "
              f"{selection['validation_alone_mean']:.4f}. In {selection['groups_with_ties']} of them "
              "two or more models tie for the best validation accuracy: only there can a tie-break change "
              "the pick. Difference = validation + measure − validation alone, "
              "in test accuracy; the paired t-test, Holm over the measures, is this report's one family "
              "(the Wilcoxon signed-rank test beside it, Holm over the same measures).", "",
              "| measure | groups changed | difference [95 % CI] | p (t) | Holm p (t) "
              "| p (Wilcoxon) | Holm p (Wilcoxon) | MDE |",
              "|---|---|---|---|---|---|---|---|"]
    for r in selection["rows"]:
        ci = "—"
        if math.isfinite(r["difference"]):
            ends = f" [{r['ci'][0]:+.4f}, {r['ci'][1]:+.4f}]" if all(map(math.isfinite, r["ci"])) else ""
            ci = f"{r['difference']:+.4f}{ends}"
        lines.append(f"| {r['label']} | {r['groups_changed']} | {ci} | {_p(r['p_t'])} | {_p(r['p_t_holm'])} | "
                     f"{_p(r['p_wilcoxon'])} | {_p(r['p_wilcoxon_holm'])} | {_p(r['mde'])} |"
                     + (f" {r['note']}" if r["note"] else ""))
    return "\n".join(lines) + "\n"


def write_claims_report(population: Population, grid: StudyGrid, study_dir: Path,
                        barriers: Sequence[dict[str, Any]], *, resamples: int = 1000) -> str:
    """Compute the three tests and write ``claims.md`` and ``claims.json``; returns the Markdown."""
    taus = claim_taus(population, resamples=resamples)
    btaus = barrier_taus(population, barriers, resamples=resamples)
    selection = model_selection(population)
    text = _markdown(population, grid, taus, btaus, selection)
    study_dir.mkdir(parents=True, exist_ok=True)
    write_json(study_dir / "claims.json", {"calibration_robustness": taus, "barriers": btaus,
                                           "barrier_pairs": list(barriers), "model_selection": selection})
    atomic_write_bytes(study_dir / "claims.md", lambda fh: fh.write(text.encode()))
    return text
