"""Markdown pieces shared by ``flatness report`` and ``flatness compare``.

Number formats, the protocol line (from the run's :class:`~flatness.experiments.world.config.TrainConfig`),
the footnotes of the measured columns (from the measurement protocol of
:mod:`flatness.experiments.running.measure`, read when the text is made, so they follow the protocol),
and the statistics table of :class:`~flatness.experiments.reporting.stats.Comparison` rows with its note.

Example:
    >>> from flatness.experiments.reporting.tables import fmt, fmt_p
    >>> fmt(0.95612, 0.0152), fmt(1234.5, sci=True), fmt_p(0.0361), fmt_p(float("nan"))
    ('0.9561 ± 0.0152', '1.23e+03', '0.036', 'n/a')
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from ..running import measure
from .stats import ALPHA, CONFIDENCE, POWER, Comparison

__all__ = [
    "fmt",
    "fmt_p",
    "p_cell",
    "protocol_line",
    "epoch_flatness_note",
    "final_flatness_note",
    "final_measures_note",
    "comparison_table",
    "comparison_note",
]


def fmt(mean: float, std: float = math.nan, digits: int = 4, sci: bool = False) -> str:
    """``mean ± std`` (``std`` left out when not finite); ``n/a`` for a non-finite mean."""
    if not math.isfinite(mean):
        return "n/a"
    f = (lambda x: f"{x:.3g}") if sci else (lambda x: f"{x:.{digits}f}")
    return f(mean) if not math.isfinite(std) else f"{f(mean)} ± {f(std)}"


def fmt_p(p: float) -> str:
    """A p-value to two significant digits (three below 0.001 are shown as ``<0.001``)."""
    if not math.isfinite(p):
        return "n/a"
    return "<0.001" if p < 0.001 else f"{p:.2g}"


def p_cell(c: Comparison | None, role: str = "") -> str:
    """``raw / Holm`` of the t-test, for a compact column; the note when there is no test."""
    if c is None:
        return "—" if role == "baseline" else f"n/a ({role or 'no comparison'})"
    if not math.isfinite(c.p_t):
        return f"n/a ({c.note})"
    return f"{fmt_p(c.p_t)} / {fmt_p(c.p_t_holm)}"


def protocol_line(config: Mapping[str, Any], method_kwargs: Mapping[str, Any] | None = None) -> str:
    """The training protocol in words, from a run's config (a ``TrainConfig`` as a dict)."""
    c = config
    sched = c.get("schedule", "constant")
    if sched != "constant":
        sched = f"{sched} decay to {c.get('final_lr_fraction', 0):g}·lr"
    if c.get("warmup_epochs"):
        sched = f"{c['warmup_epochs']:g}-epoch warm-up, {sched}"
    optimizer = c.get("optimizer", "adam")
    if optimizer == "sgd":
        name = f"SGD (momentum {c.get('momentum', 0.9):g}{', Nesterov' if c.get('nesterov') else ''})"
        decay = "L2 weight decay"
    else:
        name = {"adam": "Adam", "adamw": "AdamW"}.get(optimizer, optimizer)
        decay = "decoupled weight decay" if optimizer == "adamw" else "L2 weight decay"
    text = (
        f"{c['epochs']} epoch{'s' if c['epochs'] != 1 else ''}, B = {c['batch_size']}, "
        f"{name} lr {c['lr']:g} ({sched}), "
        f"{decay} {c['weight_decay']:g}, validation split {c.get('val_fraction', 0):g}"
    )
    extras = []
    if c.get("augment"):
        extras.append("crop + flip augmentation")
    if c.get("train_subset"):
        extras.append(f"training subset of {c['train_subset']:,} samples")
    if c.get("model"):
        extras.append(f"model {c['model']}")
    if extras:
        text += ", " + ", ".join(extras)
    if method_kwargs:
        text += "; method settings " + ", ".join(f"{k}={v}" for k, v in sorted(method_kwargs.items()))
    return text


def _plural(n: int, word: str, plural: str = "") -> str:
    return f"{n} {word if n == 1 else plural or word + 's'}"


def epoch_flatness_note() -> str:
    """How the per-epoch Tr(H²)/B curve of every run is measured (:mod:`.measure`)."""
    return (
        "Tr(H²)/B measured after each epoch on the first "
        f"{_plural(measure.EPOCH_MEASURE_BATCHES, 'training batch', 'training batches')} "
        f"of B (eval mode, {_plural(measure.EPOCH_MEASURE_PROBES, 'fixed probe')} per batch)"
    )


def final_flatness_note() -> str:
    """How the final model's Tr(H²)/B is measured (:func:`.measure.measure_sq_trace_per_B`)."""
    return (
        f"the first {measure.MEASURE_SAMPLES} training samples in fixed batches of B, eval mode, "
        f"{measure.MEASURE_PROBES} fixed Rademacher probes per batch, probe seed {measure.MEASURE_SEED}"
    )


def final_measures_note() -> str:
    """How λ_max and Tr(H) of a final model are measured (:func:`.measure.final_model_extras`)."""
    return (
        "the largest Hessian eigenvalue (Lanczos) and the Hutchinson trace "
        f"({measure.FINAL_TRACE_MATVECS} Hessian-vector products) of the final model's training loss on the first "
        f"{measure.MEASURE_SAMPLES} training samples in batches of B, eval mode"
    )


def _signed(x: float, digits: int) -> str:
    return "n/a" if not math.isfinite(x) else f"{x:+.{digits}f}"


def _interval(low: float, high: float, digits: int) -> str:
    if not (math.isfinite(low) and math.isfinite(high)):
        return ""
    return f" [{low:+.{digits}f}, {high:+.{digits}f}]"


def comparison_table(head: str, rows: Sequence[tuple[str, Comparison]], digits: int = 4) -> list[str]:
    """Markdown lines: one row per comparison (label, comparison) with every statistic."""
    level = f"{CONFIDENCE:.0%}"
    out = [
        f"| {head} | n | Δ ({level} CI) | effect ({level} CI) | p t | p t Holm | p perm | p perm Holm "
        "| p Wilcoxon | p Wilcoxon Holm | MDE |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for label, c in rows:
        n = f"{c.n_pairs} pairs" if c.paired else f"{c.n_a} vs {c.n_b}"
        if c.left_out:
            n += f" ({c.left_out} unpaired left out)"
        delta = _signed(c.difference, digits) + _interval(*c.ci, digits)
        if math.isfinite(c.effect):
            effect = f"{c.effect_name} = {c.effect:+.2f}" + _interval(*c.effect_ci, 2)
        else:
            effect = "n/a"
        if math.isfinite(c.p_t):
            ps = [fmt_p(c.p_t), fmt_p(c.p_t_holm), fmt_p(c.p_perm), fmt_p(c.p_perm_holm),
                  fmt_p(c.p_wilcoxon), fmt_p(c.p_wilcoxon_holm)]
        else:
            ps = [f"n/a: {c.note}", "n/a", "n/a", "n/a", "n/a", "n/a"]
        mde = "n/a" if not math.isfinite(c.mde) else f"{c.mde:.{digits}f}"
        out.append("| " + " | ".join([label, n, delta, effect, *ps, mde]) + " |")
    return out


def _span(values: Sequence[float], digits: int) -> str:
    lo, hi = min(values), max(values)
    return f"{lo:.{digits}f}" if f"{lo:.{digits}f}" == f"{hi:.{digits}f}" else f"{lo:.{digits}f}–{hi:.{digits}f}"


def comparison_note(
    what: str, against: str, comparisons: Sequence[Comparison], digits: int = 4, family: str | None = None
) -> str:
    """The paragraph under :func:`comparison_table`: tests, family, effects, and the MDE line.

    ``family``: what the Holm adjustment ran over, when it is wider than this table.
    """
    if not comparisons:
        return ""
    tested = [c for c in comparisons if math.isfinite(c.p_t)]
    paired = [c for c in comparisons if c.paired]
    parts = [f"*Δ*: {what} minus that of {against}."]
    if paired:
        pairs = sorted({c.n_pairs for c in paired})
        parts.append(
            "Runs are paired by seed (same seed: same initial weights and data order); Δ is the mean "
            "of the per-seed differences. *p t*: paired t-test; *p perm*: exact sign-flip permutation "
            "test of the mean difference (all 2^n sign patterns); *p Wilcoxon*: Wilcoxon signed-rank "
            "test on the differences"
            + (f" (with {pairs[0]} pairs neither exact test's two-sided p can fall below "
               f"{min(1.0, 2.0 ** (1 - pairs[0])):.2g})" if len(pairs) == 1 and 1 < pairs[0] <= 20 else "")
            + ". *Effect* d_z: mean difference over the SD of the differences."
        )
    if len(paired) < len(comparisons):
        parts.append(
            "Rows shown as `a vs b` are unpaired: Welch's t-test; effect g: Hedges' g (pooled SD)."
        )
    if tested:
        parts.append(
            "*Holm*: Holm–Bonferroni adjustment over "
            f"{family or 'the ' + _plural(len(tested), 'test') + ' of this table'} "
            "(each kind of test its own family). Effect intervals invert the noncentral t distribution."
        )
    else:
        parts.append("No comparison here can be tested (see its note).")
    mdes = [c.mde for c in comparisons if math.isfinite(c.mde)]
    if mdes:
        ns = sorted({c.n_pairs if c.paired else min(c.n_a, c.n_b) for c in comparisons if math.isfinite(c.mde)})
        n_text = "/".join(map(str, ns)) + (" pairs" if paired else " runs a side")
        parts.append(
            f"*MDE* (minimum detectable effect): the smallest true Δ that the t-test detects with power "
            f"{POWER:g} at two-sided α = {ALPHA:g} with {n_text}, from the observed SD of the differences: "
            f"{_span(mdes, digits)} here; smaller true effects are likely to go unseen."
        )
    return " ".join(parts)
