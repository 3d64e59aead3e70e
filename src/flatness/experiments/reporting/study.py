r"""Does flatness predict generalisation? A population of models: ``flatness study TASK``.

A study trains a population of models of one task over a declared grid of hyper-parameters
(:class:`StudyGrid`), measures every model with every measure of the library
(:data:`flatness.measures.MEASURES`: curvature, sharpness, noise, Fisher, spectral summaries and
Jiang et al.'s reference measures), and ranks the measures by how well they predict the
generalisation gap (:mod:`flatness.experiments.reporting.study_report`).

**Design** (Jiang et al. 2019). The hyper-parameter axes are learning rate ``lr``, batch size
``batch_size``, ``width`` (a factor on an MLP's hidden widths, or a CNN's channel width),
``weight_decay``, ``dropout`` and ``method`` (a training method at one strength: ``none``,
``fa:0.1`` for λ = 0.1, ``sam:0.05`` for ρ = 0.05, ...). A grid crosses its *factors* fully (a
factorial design: every combination), fixes the other axes, and trains every setting at every
one of its *seeds*: the seeds are replicates, not an axis. Every model trains to the grid's
stopping rule (after Jiang et al.: training accuracy ≥ 0.99 at a constant learning rate, with
an epoch cap; :class:`~flatness.experiments.world.config.TrainConfig` ``stop_train_acc``, or
``stop_train_loss`` for their cross-entropy criterion); a model that reaches the cap first is
counted and left out, so the gap compares models that fit their training sets rather than how
far training got.

**Runs** are ordinary runs of :mod:`flatness.experiments.running.runner` (same records, resumable,
``--jobs``, ``--shard``) in ``OUT/TASK/``; width and dropout travel as the runs' model settings
(:attr:`flatness.experiments.running.specs.RunSpec.model_kwargs`).

**Measurements** (:func:`~flatness.experiments.running.study_population.measure_run`) use one fixed
protocol for every model: the first 1,024 training examples in their stored order, as one
batch, eval mode, seed 0, the options of
:data:`~flatness.experiments.running.study_population.STUDY_OPTIONS`; the initial weights for the
distance from initialisation are
rebuilt from the run's seed (:func:`flatness.experiments.running.checkpoints.initial_model`). The
generalisation gap is the run record's (final eval-mode training accuracy and loss minus the
test ones, :func:`flatness.experiments.running.study_population.generalization`); the study also
evaluates each checkpoint on the whole training and test splits, which stands in for
version-1 records that lack the training values. All of it is cached per run in
``OUT/TASK/study/measures/NAME.json``, valid while the run's ``finished_at`` stamp and the
protocol match: a second call computes nothing.
A measure that fails on one model (e.g. a PAC-Bayes search on a model whose error noise cannot
raise) is recorded as missing for that model, with the reason.

The population (grid, measurements, cache) lives in :mod:`flatness.experiments.running.study_population`,
the statistics and pictures in :mod:`flatness.experiments.reporting.study_report`; :func:`run_study` runs
the three steps.

Example:
    >>> from flatness.experiments.reporting.study import get_grid
    >>> [len(get_grid(task, "crossed").entries()) for task in ("cifar100-mlp", "cifar100-resnet")]
    [64, 32]
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

from ..running.runner import run_grid
from ..running.specs import parse_shard, select_shard
from ..running.study_barriers import pair_barriers
from ..running.study_population import (
    AXES,
    GRIDS,
    StudyGrid,
    collect_population,
    get_grid,
    parse_method_label,
)
from ..world.errors import SettingError
from .study_claims import write_claims_report
from .study_report import write_reparam_report, write_study_report

__all__ = ["AXES", "GRIDS", "StudyGrid", "get_grid", "parse_method_label", "run_study"]


def run_study(
    task: str,
    grid_name: str | None = None,
    out_root: str | Path = "runs",
    *,
    jobs: int = 1,
    shard: str | None = None,
    data_dir: str | None = None,
    download: bool | None = None,
    progress: bool = True,
    retry_failed: bool = False,
    plots: bool = True,
    reparam: bool = False,
    resamples: int = 1000,
    log: Any = None,
) -> str:
    """Train what is missing, measure, and write ``OUT/TASK/study/GRID/``; returns the summary.

    With ``shard="I/N"`` only that slice of the population is trained and measured (several
    machines sharing ``OUT``); the report is written by a call without ``shard``.
    """
    say = log or (lambda msg: print(msg, file=sys.stderr))
    grid = get_grid(task, grid_name)
    grid_name = grid.name
    entries = grid.entries()
    if resamples < 100:
        raise SettingError(f"`resamples` must be >= 100, got {resamples}", "resamples")
    if shard is not None:
        chosen = {s.name for s in select_shard([s for s, _ in entries], *parse_shard(shard))}
        entries = [e for e in entries if e[0].name in chosen]
    out_root = Path(out_root)
    start = time.perf_counter()
    run_grid([s for s, _ in entries], out_root, jobs=jobs, data_dir=data_dir, download=download,
             progress=progress, retry_failed=retry_failed, log=log)
    population = collect_population(grid, entries, out_root, data_dir=data_dir, download=download,
                                    progress=progress)
    if shard is not None:
        return (f"shard {shard} of the {task} {grid_name} study: {len(population.rows)} models "
                f"trained and measured; run without --shard for the report")
    study_dir = out_root / task / "study" / grid_name
    text = write_study_report(population, grid, study_dir, plots=plots, resamples=resamples)
    barriers = pair_barriers(population, out_root, data_dir=data_dir, download=download, progress=progress)
    text += "\n" + write_claims_report(population, grid, study_dir, barriers, resamples=resamples)
    if reparam:
        text += "\n" + write_reparam_report(population, grid, out_root, study_dir, data_dir, download)
    say(f"study of {len(population.rows)} models written to {study_dir} "
        f"({time.perf_counter() - start:.1f} s)")
    return text
