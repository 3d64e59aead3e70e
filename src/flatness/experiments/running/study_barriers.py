"""Linear-path barriers between the seed replicates of one setting of a study (issue 31).

For every hyper-parameter setting of a population and every pair of its seeds, the loss and
error barrier on the straight line between the two final models (:func:`flatness.connectivity.linear_path`,
BatchNorm statistics re-estimated at each point, Frankle et al. 2020), on the study's fixed
measurement batches (the first 1,024 training examples). Cached per pair in
``OUT/TASK/study/barriers/`` and recomputed when either record changes.

Example:
    >>> from flatness.experiments.running.study_barriers import seed_pairs
    >>> rows = [{"name": n, "settings": {"lr": lr, "seed": s}} for n, lr, s in
    ...         (("a", 1, 0), ("b", 1, 1), ("c", 1, 2), ("d", 2, 0))]
    >>> [(x["name"], y["name"]) for x, y in seed_pairs(rows)]
    [('a', 'b'), ('a', 'c'), ('b', 'c')]
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from torch import Tensor

from ...connectivity import linear_path
from ...utils import FlatnessError
from .progress import progress_bar, tracked
from .record import read_record, write_json
from .study_population import Population, measurement_inputs

__all__ = ["BARRIER_POINTS", "seed_pairs", "pair_barriers"]

BARRIER_POINTS = 11  # t = 0, 0.1, ..., 1


def seed_pairs(rows: Sequence[dict[str, Any]]) -> list[tuple[dict[str, Any], dict[str, Any]]]:
    """Every pair of rows that share all settings but the seed, lower seed first, in row order."""
    groups: dict[tuple[Any, ...], list[dict[str, Any]]] = {}
    for row in rows:
        key = tuple(sorted((k, str(v)) for k, v in row["settings"].items() if k != "seed"))
        groups.setdefault(key, []).append(row)
    out = []
    for members in groups.values():
        members = sorted(members, key=lambda r: r["settings"]["seed"])
        out += list(itertools.combinations(members, 2))
    return out


def _one_pair(directory: Path, names: tuple[str, str], cache: Path, data_dir: str | None,
              download: bool | None) -> dict[str, Any]:
    records = [read_record(directory / f"{n}.json") for n in names]
    if any(r is None for r in records):
        raise FlatnessError(f"no finished record for the pair {names} in {directory}")
    stamp = [r.finished_at for r in records if r is not None]
    path = cache / f"{names[0]}__{names[1]}.json"
    try:
        hit = json.loads(path.read_text())
        if hit.get("finished_at") == stamp and hit.get("points") == BARRIER_POINTS:
            return hit
    except (OSError, ValueError):
        pass
    task, model_a, batches, _ = measurement_inputs(records[0], directory, data_dir, download)  # type: ignore[arg-type]
    _, model_b, _, _ = measurement_inputs(records[1], directory, data_dir, download)  # type: ignore[arg-type]

    def accuracy(logits: Tensor, y: Tensor) -> Tensor:
        return task.score(logits, y).float().mean()

    curve = linear_path(model_a, model_b, task.loss_fn, batches, num=BARRIER_POINTS, accuracy=accuracy)
    entry = {"pair": list(names), "finished_at": stamp, "points": BARRIER_POINTS,
             "barrier_loss": curve.barrier_loss, "barrier_error": curve.barrier_error}
    write_json(path, entry)
    return entry


def pair_barriers(
    population: Population,
    out_root: Path,
    *,
    data_dir: str | None = None,
    download: bool | None = None,
    progress: bool = False,
) -> list[dict[str, Any]]:
    """The loss and error barrier of every seed pair of the population (cached)."""
    directory = Path(out_root) / population.task
    cache = directory / "study" / "barriers"
    pairs = seed_pairs(population.rows)
    bar = progress_bar(len(pairs), "barriers", "pair", leave=False, enabled=progress)
    return [_one_pair(directory, (a["name"], b["name"]), cache, data_dir, download) for a, b in tracked(pairs, bar)]
