"""Run records grouped for the report, and each strength compared with its baseline.

A *group* is every run of one (task, method, method settings, protocol); its *rows* are the
strengths, each summarised over seeds (:func:`flatness.experiments.reporting.stats.mean_std`). The
baseline of a group is its strength-0 row, or else the ``none`` method's runs with the same
protocol in the same directory. Each other row's final test accuracy is compared with the
baseline's, paired by seed (same seed: same initial weights and data order), by
:func:`flatness.experiments.reporting.stats.compare_samples`; the p-values of every comparison
with the same baseline runs are Holm-adjusted together (a sweep with its own strength 0: one
table; every method against ``none``: one family across their tables). A group with non-default
method settings (a λ schedule or controller) or a composed method (``sam+fa``) is also set against its
*reference* (:func:`reference_group`: fixed λ; ``sam`` alone) at the same strength, paired by
seed, Holm-adjusted over all such comparisons of the report (one family).

What a method *is* comes from its class (:mod:`flatness.methods.base`): the symbol of its
strength and its twin (a configuration identical to another method's, shown once).

Example:
    >>> from flatness.experiments.reporting.groups import strength_symbol, twin_of
    >>> twin_of("gnp", 0.1, {}), twin_of("gnp", 0.05, {}), twin_of("gnp", 0.1, {"squared": True})
    (('sam', 0.1), None, None)
    >>> strength_symbol("fa", "lam"), strength_symbol("sam+fa", "rho"), strength_symbol("none", None)
    ('λ', 'ρ', '')
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from ...methods import method_class
from ..running.record import RunRecord, load_records
from ..running.specs import short_hash
from ..world.plugins import known_task
from .stats import Comparison, adjust_holm, compare_samples, mean_std

__all__ = [
    "METRICS",
    "load_records",
    "strength_symbol",
    "twin_of",
    "by_strength",
    "paper_results",
    "variant_settings",
    "reference_group",
    "Row",
    "Group",
    "summarize",
]

# the curvature every run has, by one fixed protocol (its second comparison with the baseline)
FLATNESS_METRIC = "measured_sq_trace_per_B"
METRICS = (
    "final_test_acc",
    "final_val_acc",
    "final_train_loss",
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


def strength_symbol(method: str, hparam: str | None) -> str:
    """The symbol of ``method``'s swept strength (its class's ``symbol``: ``λ``, ``ρ``, ...).

    Else the hyper-parameter's name (a method this process does not know: its name as recorded).
    """
    try:
        symbol = method_class(method).symbol
    except ValueError:
        symbol = None
    return symbol or hparam or ""


def twin_of(method: str, value: float | None, method_kwargs: Mapping[str, Any]) -> tuple[str, float] | None:
    """``(other method, strength)`` when this configuration *is* another method's, else ``None``.

    Read from the method class's ``twin`` (:mod:`flatness.methods.base`): its ``settings`` over
    the class's defaults match, and the strength equals the setting ``strength_equals`` (gnp's
    finite-difference form at ρ = its radius r is SAM at ρ = r, :mod:`flatness.methods.gnp`).
    Tables show that configuration once, as the other method.
    """
    try:
        cls = method_class(method)
    except ValueError:
        return None
    twin = cls.twin
    if twin is None or value is None:
        return None
    settings = {**cls.keyword_defaults(), **method_kwargs}
    if any(settings.get(k) != v for k, v in twin["settings"].items()):
        return None
    at = settings.get(twin["strength_equals"])
    if at is None or not math.isclose(float(value), float(at), rel_tol=1e-9):
        return None
    return twin["method"], float(at)


@dataclass
class Row:
    """All runs of one strength in a group, summarised over seeds.

    ``vs_baseline``: the final-accuracy comparison with the group's baseline (Holm-adjusted
    over every comparison with the same baseline runs); ``flatness_vs_baseline``: the same for
    log10 of the final measured Tr(H²)/B (a ratio of curvatures is what compares across strengths);
    ``role``: ``"baseline"``, ``"no baseline"`` or ``""`` (compared).
    ``twin``: ``(method, strength)`` when this configuration is another method's (:func:`twin_of`).
    ``reference``/``vs_reference``/``flatness_vs_reference``: the same strength of the group's
    reference (:func:`reference_group`) and the two comparisons with it.
    """

    value: float | None
    runs: list[RunRecord]
    failed: list[RunRecord]
    stats: dict[str, tuple[float, float, int]] = field(default_factory=dict)
    vs_baseline: Comparison | None = None
    flatness_vs_baseline: Comparison | None = None
    role: str = ""
    twin: tuple[str, float] | None = None
    vs_reference: Comparison | None = None
    flatness_vs_reference: Comparison | None = None
    reference: Row | None = None

    @property
    def seeds(self) -> list[int]:
        """The seeds of the row's runs, sorted."""
        return sorted(r.seed for r in self.runs)

    def by_seed(self, metric: str) -> dict[int, float | None]:
        """``{seed: metric}`` over the complete runs (the pairing key of the tests)."""
        return {r.seed: r.get(metric) for r in self.runs}

    def log10_by_seed(self, metric: str) -> dict[int, float | None]:
        """``{seed: log10(metric)}``; ``None`` where the value is missing or not positive."""
        return log10_by_seed(self.by_seed(metric))


def log10_by_seed(values: Mapping[int, Any]) -> dict[int, float | None]:
    """``{seed: log10(value)}``.

    ``None`` where the value is missing or not positive (the flatness tests compare Tr(H²)/B on a
    log scale: it spans orders of magnitude across seeds).
    """
    return {
        seed: math.log10(v) if isinstance(v, (int, float)) and v > 0 else None
        for seed, v in values.items()
    }


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
    reference: str = ""
    model_kwargs: dict[str, Any] = field(default_factory=dict)  # non-default model settings
    base_row: Row | None = None  # the runs every row is compared with
    holm_family: str = ""  # what the accuracy tests' Holm ran over, when wider than this group
    holm_family_flatness: str = ""  # the same for the flatness tests

    @property
    def model_id(self) -> str:
        """The model tag of the group's non-default model settings (``""`` for the default model)."""
        return model_tag(self.model_kwargs)

    @property
    def slug(self) -> str:
        """A file-name-safe identifier of the group (method and the tags of its settings)."""
        parts = [self.method]
        if self.variant_id:
            parts.append(f"k{self.variant_id}")
        if self.model_id:
            parts.append(f"m{self.model_id}")
        if self.protocol_id:
            parts.append(f"p{self.protocol_id}")
        return "_".join(parts)

    @property
    def symbol(self) -> str:
        """The symbol of the swept strength (``λ``, ``ρ``, ...), or its name."""
        return strength_symbol(self.method, self.hparam)

    @property
    def comparisons(self) -> list[tuple[Row, Comparison]]:
        """The rows compared with the baseline, in table order."""
        return [(row, row.vs_baseline) for row in self.rows if row.vs_baseline is not None]

    @property
    def flatness_comparisons(self) -> list[tuple[Row, Comparison]]:
        """The rows' log10 final Tr(H²)/B compared with the baseline's, in table order."""
        return [(row, row.flatness_vs_baseline) for row in self.rows if row.flatness_vs_baseline is not None]

    def reference_comparisons(self, flatness: bool = False) -> list[tuple[Row, Comparison]]:
        """The rows compared with the same strength of the reference group, in table order."""
        pairs = [(row, row.flatness_vs_reference if flatness else row.vs_reference) for row in self.rows]
        return [(row, c) for row, c in pairs if c is not None]


def reference_group(g: Group, groups: Sequence[Group]) -> Group | None:
    """What a configured variant is measured against, strength by strength.

    A group with non-default method settings (a λ schedule or controller, another estimator)
    is set against the same method with its default settings (fixed λ); a composed method
    ``A+B`` without such a group against ``A`` alone (``sam+fa`` against ``sam`` at the same ρ).
    Same task and protocol; ``None`` when there is no such group.
    """
    same = [h for h in groups if h is not g and h.task == g.task and h.protocol_id == g.protocol_id
            and h.model_id == g.model_id and not h.variant_id]
    if g.variant_id:
        fixed = [h for h in same if h.method == g.method and h.hparam == g.hparam]
        if fixed:
            return fixed[0]
    if "+" in g.method:
        first = [h for h in same if h.method == g.method.split("+")[0]]
        if first:
            return first[0]
    return None


def variant_settings(g: Group, groups: Sequence[Group]) -> dict[str, Any]:
    """The method settings in which a configured variant differs from the method's defaults.

    Read from the records: those of the same task and method's default-settings runs in ``groups``,
    else the method class's ``protocol_defaults`` (a task's own defaults, e.g. FA's backend on the
    CIFAR image tasks, then show too).
    """
    plain = next((h for h in groups if h.task == g.task and h.method == g.method and not h.variant_id), None)
    if plain is not None:
        default = plain.method_kwargs
    else:
        try:
            default = method_class(g.method).protocol_defaults
        except ValueError:
            default = {}
    return {k: v for k, v in g.method_kwargs.items() if default.get(k, _MISSING) != v}


_MISSING = object()


def paper_results(g: Group) -> dict[float, float]:
    """The paper's final test accuracies by strength for this group's table (the task's ``paper_final_acc``).

    At the task's default protocol and model only.
    """
    task = known_task(g.task)
    if task is None or g.protocol_id or g.model_id:
        return {}
    return task.paper_final_acc.get(g.method, {})


def _settings_label(g: Group) -> str:
    return ", ".join(f"{k}={v}" for k, v in sorted(g.method_kwargs.items())) or "default settings"


def _compare_with_reference(g: Group, groups: Sequence[Group]) -> None:
    ref = reference_group(g, groups)
    if ref is None:
        return
    g.reference = f"`{ref.method}`, {_settings_label(ref)}"
    by_value = {row.value: row for row in ref.rows if row.runs}
    for row in g.rows:
        other = by_value.get(row.value)
        if other is None or not row.runs:
            continue
        row.reference = other
        row.vs_reference = compare_samples(row.by_seed("final_test_acc"), other.by_seed("final_test_acc"))
        row.flatness_vs_reference = compare_samples(
            row.log10_by_seed(FLATNESS_METRIC), other.log10_by_seed(FLATNESS_METRIC)
        )


def _adjust_reference_family(groups: Sequence[Group]) -> None:
    """Holm over every reference comparison of the report, accuracy and flatness each their own family.

    One question: does a variant differ from its reference?
    """
    for flatness in (False, True):
        compared = [pair for g in groups for pair in g.reference_comparisons(flatness)]
        for (row, _), c in zip(compared, adjust_holm([c for _, c in compared]), strict=True):
            if flatness:
                row.flatness_vs_reference = c
            else:
                row.vs_reference = c


def _adjust_baseline_families(groups: Sequence[Group]) -> None:
    """Holm over every comparison with the same baseline runs, accuracy and flatness each their own family.

    One question: does anything in this report differ from them? A sweep with its own strength-0 row
    is its own family; every method set against ``none`` shares one, so a per-method table never
    shows a p-value less adjusted than the cross-method comparison's.
    """
    by_base: dict[int, list[Group]] = {}
    for g in groups:
        if g.base_row is not None:
            by_base.setdefault(id(g.base_row), []).append(g)
    for family in by_base.values():
        for flatness in (False, True):
            compared = [pair for g in family for pair in (g.flatness_comparisons if flatness else g.comparisons)]
            for (row, _), c in zip(compared, adjust_holm([c for _, c in compared]), strict=True):
                if flatness:
                    row.flatness_vs_baseline = c
                else:
                    row.vs_baseline = c
            if len(family) > 1:
                n = sum(math.isfinite(c.p_t) for _, c in compared)
                methods = ", ".join(dict.fromkeys(f"`{g.method}`" for g in family))
                text = (f"the {n} test{'s' if n != 1 else ''} against {family[0].baseline} in this report "
                        f"(tables of {methods})")
                for g in family:
                    if flatness:
                        g.holm_family_flatness = text
                    else:
                        g.holm_family = text


def by_strength(recs: Sequence[RunRecord]) -> dict[Any, list[RunRecord]]:
    """The records by their strength value, weakest first (``None``, a method without one, first of all)."""
    by_value: dict[Any, list[RunRecord]] = {}
    for r in recs:
        by_value.setdefault(r.value, []).append(r)
    return {v: by_value[v] for v in sorted(by_value, key=lambda v: -1.0 if v is None else float(v))}


def _group_rows(recs: Sequence[RunRecord]) -> list[Row]:
    rows = []
    for value, recorded in by_strength(recs).items():
        runs = [r for r in recorded if r.complete]
        failed = [r for r in recorded if not r.complete]
        row = Row(value, runs, failed)
        row.stats = {m: mean_std([r.get(m) for r in runs]) for m in METRICS}
        rows.append(row)
    return rows


def model_tag(model_kwargs: Mapping[str, Any]) -> str:
    """``""`` for the task's default model, else a short tag of its settings (as run names)."""
    return short_hash(dict(model_kwargs)) if model_kwargs else ""


def summarize(records: Sequence[RunRecord]) -> list[Group]:
    """Group records; per strength, statistics over seeds and the comparison with the baseline."""
    keyed: dict[tuple[Any, ...], list[RunRecord]] = {}
    for r in records:
        key = (r.task, r.method, r.hparam, r.variant_id, r.protocol_id, model_tag(r.model_kwargs))
        keyed.setdefault(key, []).append(r)
    groups = []
    for (task, method, hparam, variant, protocol, _), recs in sorted(keyed.items(), key=lambda kv: str(kv[0])):
        kwargs = recs[0].method_kwargs
        rows = _group_rows(recs)
        for row in rows:
            row.twin = twin_of(method, row.value, kwargs)
        groups.append(Group(task, method, hparam, variant, protocol, recs[0].config, kwargs, rows,
                            model_kwargs=dict(recs[0].model_kwargs)))
    for g in groups:
        g.base_row = _find_baseline(g, groups)
        _compare_with_baseline(g, g.base_row)
    _adjust_baseline_families(groups)
    for g in groups:
        _compare_with_reference(g, groups)
    _adjust_reference_family(groups)
    return groups


def _find_baseline(g: Group, groups: Sequence[Group]) -> Row | None:
    """The row ``g`` is compared with (its label set in ``g.baseline``): its own strength 0, else method none's."""
    zero = [row for row in g.rows if row.value == 0]
    if zero and zero[0].runs:
        g.baseline = f"{g.symbol} = 0"
        return zero[0]
    plain = [
        h for h in groups
        if h.method == "none" and h.task == g.task and h.protocol_id == g.protocol_id
        and h.model_id == g.model_id and h is not g
    ]
    if plain and plain[0].rows and plain[0].rows[0].runs:
        g.baseline = "method none"
        return plain[0].rows[0]
    return None


def _compare_with_baseline(g: Group, base: Row | None) -> None:
    """Each row's role, and its paired tests against ``base`` (test accuracy, log10 Tr(H²)/B), in place."""
    for row in g.rows:
        if base is None:
            row.role = "no baseline"
        elif row is base:
            row.role = "baseline"
        else:
            row.vs_baseline = compare_samples(row.by_seed("final_test_acc"), base.by_seed("final_test_acc"))
            row.flatness_vs_baseline = compare_samples(
                row.log10_by_seed(FLATNESS_METRIC), base.log10_by_seed(FLATNESS_METRIC)
            )
