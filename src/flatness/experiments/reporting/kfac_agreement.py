r"""How well K-FAC's Tr(H²) tracks Hutchinson's across a directory's final models.

Every run record carries ``measured_sq_trace_per_B`` (Hutchinson, the fixed protocol of
:mod:`flatness.experiments.running.measure`) and, for models made of Linear layers,
``measured_kfac_sq_trace_per_B`` (K-FAC, :mod:`flatness.kfac`, on the same batches). Per
(method, strength) group: both means over seeds and their ratio; over all models: Kendall's τ
between the two (with a bootstrap 95% interval, :func:`flatness.experiments.reporting.stats.kendall_tau_ci`)
— does the cheap penalty rank models like the paper's? — and the spread of the ratio.
``flatness report DIR --kfac-agreement`` writes ``DIR/kfac_agreement.md`` and ``.json``.

Example:
    >>> from flatness.experiments.reporting.kfac_agreement import agreement
    >>> runs = [{"name": f"r{i}", "method": "fa", "value": v, "status": "complete",
    ...          "measured_sq_trace_per_B": h, "measured_kfac_sq_trace_per_B": k}
    ...         for i, (v, h, k) in enumerate([(0.0, 40.0, 6.0), (0.1, 20.0, 3.5), (1.0, 5.0, 1.0)])]
    >>> result = agreement(runs)
    >>> result["kendall_tau"], result["models"]
    (1.0, 3)
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ...utils import FlatnessError, atomic_write_bytes
from ..running.record import load_records, write_json
from ..running.specs import format_value
from .groups import strength_symbol
from .stats import kendall_tau_ci, mean_std

__all__ = ["agreement", "write_kfac_agreement"]

HUTCHINSON = "measured_sq_trace_per_B"
KFAC = "measured_kfac_sq_trace_per_B"


def agreement(records: Sequence[Any]) -> dict[str, Any]:
    r"""Both measurements per group and over all models (records lacking either are left out).

    ``records``: :class:`~flatness.experiments.running.record.RunRecord`\ s (or dicts of their fields).
    """
    runs = [
        r for r in records
        if r.get("status") == "complete" and isinstance(r.get(HUTCHINSON), (int, float))
        and isinstance(r.get(KFAC), (int, float))
    ]
    if not runs:
        raise FlatnessError(f"no complete run records with both {HUTCHINSON} and {KFAC}")
    groups: dict[tuple[str, Any, str], list[Any]] = {}
    for r in runs:
        groups.setdefault((r.get("method"), r.get("value"), r.get("variant_id") or ""), []).append(r)
    rows = []
    for (method, value, variant), mine in sorted(groups.items(), key=lambda kv: str(kv[0])):
        hutch, hutch_std, n = mean_std([r.get(HUTCHINSON) for r in mine])
        kfac, kfac_std, _ = mean_std([r.get(KFAC) for r in mine])
        rows.append({"method": method, "hparam": mine[0].get("hparam"), "value": value,
                     "variant_id": variant, "runs": n, "hutchinson": hutch, "hutchinson_std": hutch_std,
                     "kfac": kfac, "kfac_std": kfac_std, "ratio": kfac / hutch if hutch else math.nan})
    x, y = [r.get(HUTCHINSON) for r in runs], [r.get(KFAC) for r in runs]
    tau, low, high = kendall_tau_ci(x, y)
    ratios = [k / h for h, k in zip(x, y, strict=True) if h > 0]
    return {
        "models": len(runs),
        "kendall_tau": tau,
        "kendall_tau_ci95": [low, high],
        "ratio_median": statistics.median(ratios) if ratios else math.nan,
        "ratio_range": [min(ratios), max(ratios)] if ratios else [math.nan, math.nan],
        "groups": rows,
    }


def _markdown(directory: Path, result: dict[str, Any]) -> str:
    out = [
        f"# K-FAC against Hutchinson Tr(H²)/B: {directory.name}", "",
        "| method | setting | runs | Hutchinson Tr(H²)/B | K-FAC Tr(H²)/B | K-FAC / Hutchinson |",
        "|---|---|---|---|---|---|",
    ]
    for g in result["groups"]:
        setting = "—" if g["value"] is None else (
            f"{strength_symbol(g['method'], g['hparam'])} = {format_value(float(g['value']))}"
        )
        if g["variant_id"]:
            setting += f" (k{g['variant_id']})"
        out.append(
            f"| `{g['method']}` | {setting} | {g['runs']} | {g['hutchinson']:.4g} ± {g['hutchinson_std']:.2g} | "
            f"{g['kfac']:.4g} ± {g['kfac_std']:.2g} | {g['ratio']:.3f} |"
        )
    low, high = result["kendall_tau_ci95"]
    lo_r, hi_r = result["ratio_range"]
    out += [
        "",
        (
            f"Over the {result['models']} final models: Kendall τ = {result['kendall_tau']:.3f} "
            f"(95% bootstrap interval {low:.3f} to {high:.3f}) between the two; K-FAC / Hutchinson "
            f"median {result['ratio_median']:.3f} (range {lo_r:.3f}–{hi_r:.3f})."
        ),
        "",
        (
            "Both on the runner's fixed measurement batches (the first 1024 training samples in "
            "batches of B, eval mode): Hutchinson with 10 Rademacher probes per batch, K-FAC "
            "Σ_l Tr(A_l²)·Tr(G_l²) with labels sampled from the model (one draw per example, a "
            "fixed seed). K-FAC keeps only the Gauss-Newton part of each layer's diagonal block, "
            "as a Kronecker product; the rest of Tr(H²) — cross-layer blocks and the second-order "
            "terms — it does not see."
        ),
        "",
    ]
    return "\n".join(out)


def write_kfac_agreement(directory: str | Path) -> str:
    """Write ``DIR/kfac_agreement.md`` and ``.json`` from the run records; returns the markdown."""
    directory = Path(directory)
    result = agreement(load_records(directory))
    text = _markdown(directory, result)
    atomic_write_bytes(directory / "kfac_agreement.md", lambda fh: fh.write(text.encode()))
    write_json(directory / "kfac_agreement.json", result)
    return text
