"""The report's figures, with matplotlib's object API (no pyplot state, no backend switching).

:func:`figure` gives a :class:`matplotlib.figure.Figure` on its own Agg canvas; :func:`save_png`
writes it atomically. :func:`plot_group` draws a report group's PNGs: accuracy and measured
flatness against the strength, test-accuracy curves, and the reliability diagram of the final
models' test predictions (one line per strength, the seeds' bins pooled; records without
calibration fields are left out).

Example:
    >>> from flatness.experiments.reporting.plots import figure
    >>> fig, ax = figure()
    >>> type(fig.canvas).__name__
    'FigureCanvasAgg'
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from ...utils import write_png
from .groups import Group, paper_results
from .stats import mean_std

__all__ = ["figure", "save_png", "plot_group"]


def figure(ncols: int = 1, figsize: tuple[float, float] = (5.5, 3.8)) -> tuple[Figure, Any]:
    """A figure on an Agg canvas and its axes (one, or an array of ``ncols``)."""
    fig = Figure(figsize=figsize)
    FigureCanvasAgg(fig)
    return fig, fig.subplots(1, ncols)


def save_png(fig: Figure, path: Path) -> None:
    """Write ``fig`` as the reports' PNG (110 dpi, tight box) by :func:`flatness.utils.write_png`."""
    write_png(fig, path, dpi=110, bbox_inches="tight")


def _x_axis(ax: Axes, values: Sequence[float], label: str) -> None:
    positive = [v for v in values if v > 0]
    if positive and 0 in values:
        ax.set_xscale("symlog", linthresh=min(positive))
    elif positive and len(positive) > 1 and max(positive) / min(positive) > 20:
        ax.set_xscale("log")
    ax.set_xlabel(label)


def _accuracy(g: Group, label: str, path: Path) -> None:
    swept = [r for r in g.rows if r.runs and r.value is not None]
    xs = [float(r.value) for r in swept if r.value is not None]
    fig, ax = figure()
    for metric, name, marker in (
        ("final_test_acc", "final test acc", "o"),
        ("val_chosen_test_acc", "test acc at best-val epoch", "s"),
    ):
        ys = [r.stats[metric][0] for r in swept]
        es = [0.0 if not math.isfinite(r.stats[metric][1]) else r.stats[metric][1] for r in swept]
        ax.errorbar(xs, ys, yerr=es, marker=marker, capsize=3, label=name)
    paper = paper_results(g)
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
    save_png(fig, path)


def _flatness(g: Group, label: str, path: Path) -> None:
    swept = [r for r in g.rows if r.runs and r.value is not None]
    xs = [float(r.value) for r in swept if r.value is not None]
    fig, ax = figure()
    ys = [r.stats["measured_sq_trace_per_B"][0] for r in swept]
    ax.plot(xs, ys, marker="o", label="mean over seeds")
    run_x = [float(r.value) for r in swept for _ in r.runs if r.value is not None]
    run_y = [run.get("measured_sq_trace_per_B") for r in swept for run in r.runs]
    ax.plot(run_x, [math.nan if y is None else y for y in run_y], ".", color="grey", alpha=0.7, label="single runs")
    ax.legend(fontsize=8)
    values = ys + [y for y in run_y if y is not None]
    _x_axis(ax, xs, label)
    if all(y > 0 for y in values if math.isfinite(y)):
        ax.set_yscale("log")
    ax.set_ylabel("final Tr(H²)/B, measured")
    ax.set_title(f"{g.task}: measured flatness vs {g.symbol or g.hparam}")
    ax.grid(alpha=0.3, which="both")
    save_png(fig, path)


def _curves(g: Group, path: Path) -> None:
    fig, ax = figure()
    for r in (r for r in g.rows if r.runs):
        curves = [run.curves["test_acc"] for run in r.runs if run.curves.get("test_acc")]
        if not curves:
            continue
        n = min(len(c) for c in curves)
        per_epoch = [mean_std(c[i] for c in curves) for i in range(n)]
        mean = [m for m, _, _ in per_epoch]
        std = [0.0 if not math.isfinite(s) else s for _, s, _ in per_epoch]
        epochs = list(range(1, n + 1))
        name = g.method if r.value is None else f"{g.symbol or g.hparam} = {r.value:g}"
        (line,) = ax.plot(epochs, mean, label=name)
        ax.fill_between(
            epochs, [m - s for m, s in zip(mean, std, strict=True)], [m + s for m, s in zip(mean, std, strict=True)],
            color=line.get_color(), alpha=0.15,
        )
    ax.set_xlabel("epoch")
    ax.set_ylabel("test accuracy (mean ± std)")
    ax.set_title(f"{g.task}: test accuracy per epoch ({g.method})")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    save_png(fig, path)


def _pooled_reliability(runs: Sequence[Any]) -> tuple[list[float], list[float], int, int] | None:
    """Mean confidence and accuracy per non-empty bin over the runs' reliability bins.

    Weighted by the bins' counts; ``None`` when no run has them.
    """
    bins = [run.final_test_reliability for run in runs if run.final_test_reliability]
    if not bins:
        return None
    width = bins[0]["bins"]
    count, conf, acc = [0] * width, [0.0] * width, [0.0] * width
    for b in (b for b in bins if b["bins"] == width):
        for i, (n, c, a) in enumerate(zip(b["count"], b["confidence"], b["accuracy"], strict=False)):
            if n:
                count[i] += n
                conf[i] += n * c
                acc[i] += n * a
    filled = [i for i in range(width) if count[i]]
    return [conf[i] / count[i] for i in filled], [acc[i] / count[i] for i in filled], sum(count), len(bins)


def _reliability(g: Group, path: Path) -> bool:
    fig, ax = figure(figsize=(4.6, 4.2))
    ax.plot([0, 1], [0, 1], ":", color="grey", label="perfect calibration")
    drawn = False
    for r in (r for r in g.rows if r.runs):
        pooled = _pooled_reliability(r.runs)
        if pooled is None:
            continue
        conf, acc, n, runs = pooled
        name = g.method if r.value is None else f"{g.symbol or g.hparam} = {r.value:g}"
        ece = mean_std(run.final_test_ece for run in r.runs if run.final_test_ece is not None)[0]
        ax.plot(conf, acc, "-o", ms=3, label=f"{name}: ECE {ece:.3f} ({runs} runs, {n} predictions)")
        drawn = True
    if not drawn:
        return False
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_xlabel("confidence (top label)")
    ax.set_ylabel("accuracy")
    ax.set_title(f"{g.task}: reliability of final test predictions ({g.method})", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    save_png(fig, path)
    return True


def plot_group(g: Group, directory: Path) -> list[Path]:
    """A group's PNGs.

    Accuracy and measured flatness vs strength, test-accuracy curves, and the reliability diagram
    when its records have calibration fields.
    """
    label = f"{g.symbol or g.hparam} ({g.method})" if g.hparam else g.method
    written = []
    if any(r.runs and r.value is not None for r in g.rows):
        written += [directory / f"{g.slug}_accuracy.png", directory / f"{g.slug}_flatness.png"]
        _accuracy(g, label, written[0])
        _flatness(g, label, written[1])
    written.append(directory / f"{g.slug}_curves.png")
    _curves(g, written[-1])
    if _reliability(g, directory / f"{g.slug}_reliability.png"):
        written.append(directory / f"{g.slug}_reliability.png")
    return written
