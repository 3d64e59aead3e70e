r"""Measurements of a run's model by the pipeline's fixed protocols, and their cache.

The measured flatness uses one fixed protocol for every run of a task (including λ = 0): the
first 1024 training samples in their fixed order, in batches of the task's B, the model in eval
mode, 10 Rademacher probes per batch from a generator seeded identically for every run:

.. math:: \widehat{F} = \frac{1}{n_b}\sum_{b=1}^{n_b} \frac{1}{B}\,\widehat{\operatorname{Tr}}(H_b^2)

λ_max and Tr(H) of final models (:func:`final_model_extras`) are computed on demand from the
checkpoints and cached in ``OUT/TASK/measures/NAME.json``.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ...hutchinson import measure_sq_trace
from ...kfac import kfac_sq_trace
from ...passes import measure_pass
from ...utils import eval_mode
from ..world.data import Splits, iterate_batches
from ..world.plugins import recorded_task
from ..world.tasks import Task, TrainConfig
from .checkpoints import check_checkpoint_matches, load_checkpoint
from .final_eval import final_calibration, final_robustness
from .record import RunRecord, write_json

__all__ = [
    "EPOCH_MEASURE_BATCHES",
    "EPOCH_MEASURE_PROBES",
    "FINAL_TRACE_MATVECS",
    "FLATNESS_KEYS",
    "MEASURE_PROBES",
    "MEASURE_SAMPLES",
    "MEASURE_SEED",
    "cached_extras",
    "final_flatness",
    "final_model_extras",
    "measure_final",
    "measure_kfac_per_B",
    "measure_kfac_sq_trace_per_B",
    "measure_sq_trace_per_B",
]

# The fixed flatness-measurement protocol (identical for every run of a task).
MEASURE_SAMPLES = 1024
MEASURE_PROBES = 10
MEASURE_SEED = 20240601
# The lighter per-epoch version (a flatness curve for every run, λ = 0 included): the first
# two batches of B, 5 probes each.
EPOCH_MEASURE_BATCHES = 2
EPOCH_MEASURE_PROBES = 5
# Hutchinson products of the final model's Tr(H) (:func:`final_model_extras`).
FINAL_TRACE_MATVECS = 30


def measure_sq_trace_per_B(
    model: nn.Module,
    task: Task,
    x: Tensor,
    y: Tensor,
    batch_size: int,
    *,
    num_samples: int = MEASURE_SAMPLES,
    probes: int = MEASURE_PROBES,
    seed: int = MEASURE_SEED,
) -> dict[str, float]:
    """Mean over fixed batches of Tr(H_b²)/B: the first ``num_samples`` rows of ``x``, in order.

    Only full batches of ``batch_size`` are used (B is the same for every batch). The model is
    in eval mode; probes come from one generator seeded with ``seed``, so two models of the same
    architecture see the same probes. Returns the value, the Monte-Carlo standard error of the
    probes, and the number of samples and probes used.
    """
    n = min(num_samples, int(y.shape[0]))
    n_batches = n // batch_size
    if n_batches == 0:
        batch_size, n_batches = n, 1  # fewer samples than one batch: use them all as one
    params = [p for p in model.parameters() if p.requires_grad]
    generator = torch.Generator().manual_seed(seed)
    values, variances = [], []
    with measure_pass(model):  # eval mode; math attention kernel (HVPs need double backward)
        batches = iterate_batches(x, y, batch_size, shuffle=False)
        for _, (xb, yb) in zip(range(n_batches), batches, strict=False):
            loss = task.loss_fn(model(xb), yb)
            est = measure_sq_trace(loss, params, probes=probes, generator=generator)
            values.append(est.value / batch_size)
            se = est.stderr / batch_size if math.isfinite(est.stderr) else 0.0
            variances.append(se**2)
    value = sum(values) / len(values)
    stderr = math.sqrt(sum(variances)) / len(values)
    return {
        "value": value,
        "stderr": stderr,
        "samples": n_batches * batch_size,
        "batch_size": batch_size,
        "probes": probes,
    }


def measure_kfac_sq_trace_per_B(
    model: nn.Module,
    task: Task,
    x: Tensor,
    y: Tensor,
    batch_size: int,
    *,
    num_samples: int = MEASURE_SAMPLES,
    seed: int = MEASURE_SEED,
) -> float | None:
    """Mean over the batches of :func:`measure_sq_trace_per_B` of the K-FAC Tr(H_b²)/B.

    K-FAC from :mod:`flatness.kfac`, labels sampled from a generator seeded with ``seed``; ``None``
    for a model K-FAC does not cover (parameters outside Linear layers, a loss other than the
    cross-entropy of the logits).
    """
    n = min(num_samples, int(y.shape[0]))
    n_batches = n // batch_size
    if n_batches == 0:
        batch_size, n_batches = n, 1
    generator = torch.Generator().manual_seed(seed)
    values = []
    with eval_mode(model), torch.no_grad():
        for _, (xb, yb) in zip(range(n_batches), iterate_batches(x, y, batch_size, shuffle=False), strict=False):
            try:
                values.append(float(kfac_sq_trace(model, task.loss_fn, xb, yb, generator=generator)) / batch_size)
            except ValueError:
                return None
    return sum(values) / len(values)


measure_kfac_per_B = measure_kfac_sq_trace_per_B  # its former name (docs/glossary.md)

def measure_final(model: nn.Module, task: Task, splits: Splits, config: TrainConfig) -> dict[str, Any]:
    """Every measurement of a final model, as flat record entries (extend here, e.g. λ_max).

    ``measured_sq_trace_per_B`` is Tr(H²)/B by the fixed protocol of this module; the training
    set is the one the model was trained on (validation split excluded).
    ``measured_kfac_sq_trace_per_B`` is the K-FAC approximation of the same quantity on the
    same batches (absent for models K-FAC does not cover, and for regression tasks). Then, after
    them and with their own random numbers (:mod:`.final_eval`), the test split's calibration
    (``final_test_ece``, ``final_test_nll``, ``final_test_brier``, ``final_test_reliability``)
    and robustness (``final_test_robustness``).
    """
    start = time.perf_counter()
    m = measure_sq_trace_per_B(model, task, splits.x_train, splits.y_train, config.batch_size)
    # K-FAC samples class labels from the model's output: classification losses only
    kfac = (measure_kfac_sq_trace_per_B(model, task, splits.x_train, splits.y_train, config.batch_size)
            if task.task_type == "classification" else None)
    extra = {} if kfac is None else {"measured_kfac_sq_trace_per_B": kfac}
    out = {
        "measured_sq_trace_per_B": m["value"],
        "measured_sq_trace_per_B_stderr": m["stderr"],
        **extra,
        "measurement": {
            "what": "mean over fixed batches of Tr(H_b^2)/B, eval mode, Rademacher probes",
            "samples": m["samples"],
            "batch_size": m["batch_size"],
            "probes_per_batch": m["probes"],
            "probe_seed": MEASURE_SEED,
            "seconds": time.perf_counter() - start,
        },
    }
    out.update(final_calibration(model, task, splits, config))
    out.update(final_robustness(model, task, splits, config))
    return out


FLATNESS_KEYS: tuple[str, ...] = ("lambda_max", "hessian_trace")
# λ_max of final models to this relative tolerance (Lanczos), as flatness.measures.final_measures
FINAL_EIGEN_TOL = 1e-3


def _read_cache_entry(record: RunRecord, cache: Path) -> dict[str, Any]:
    path = cache / f"{record.name}.json"
    if not path.exists():
        return {}
    try:
        cached = json.loads(path.read_text())
    except ValueError:
        return {}
    if not isinstance(cached, dict) or cached.get("finished_at") != record.finished_at:
        return {}  # the run was redone: its cache entry is stale
    return cached


def cached_extras(
    record: RunRecord,
    cache: Path,
    wanted: Sequence[str],
    cached: dict[str, Any] | None = None,
) -> dict[str, float]:
    """``wanted`` values already known for a run: from its record, else from ``cache/NAME.json``.

    Computes nothing (see :func:`final_model_extras`); keys known nowhere are left out.
    """
    out = {k: float(record.get(k)) for k in wanted if isinstance(record.get(k), (int, float))}
    cached = _read_cache_entry(record, cache) if cached is None else cached
    out.update({k: float(cached[k]) for k in wanted if k not in out and isinstance(cached.get(k), (int, float))})
    return out


def final_model_extras(
    record: RunRecord,
    directory: Path,
    cache: Path,
    wanted: Sequence[str],
    data_dir: str | None,
    download: bool | None,
) -> dict[str, float]:
    """``wanted`` of ``final_val_loss`` and :data:`FLATNESS_KEYS` for one run's final model.

    Taken from the run record when it has them, else from ``cache/NAME.json`` (valid while the
    record's ``finished_at`` matches), else computed from the checkpoint and added to the cache.
    Validation loss: the task loss over the validation split, eval mode. λ_max and Tr(H):
    :func:`final_flatness` (one call into :mod:`flatness.measures`).
    """
    cached = _read_cache_entry(record, cache)
    out = cached_extras(record, cache, wanted, cached)
    missing = [k for k in wanted if k not in out]
    if not missing:
        return out
    task = recorded_task(record.task, record.task_source)  # a plugin task: loaded again from its file
    config = TrainConfig.from_dict(record.config)
    splits = task.splits(config, data_dir, download)
    model, meta = load_checkpoint(directory / str(record.checkpoint), task=record.task)
    check_checkpoint_matches(record, meta, directory / str(record.checkpoint))
    new: dict[str, Any] = {}
    if "final_val_loss" in missing and splits.x_val is not None and splits.y_val is not None:
        from .training import evaluate

        result = evaluate(model, splits.x_val, splits.y_val, task.predict, config.eval_batch_size, task.loss_fn,
                          task.score)
        new["final_val_loss"] = result["loss"]
    if any(k in missing for k in FLATNESS_KEYS):
        new.update(final_flatness(model, task, splits, config))
    cached.update(new)
    cached.update({"name": record.name, "finished_at": record.finished_at})
    write_json(cache / f"{record.name}.json", cached)
    out.update({k: float(new[k]) for k in missing if k in new})
    return out


def final_flatness(model: nn.Module, task: Task, splits: Splits, config: TrainConfig) -> dict[str, Any]:
    """λ_max and Tr(H) (:data:`FLATNESS_KEYS`) of a final model.

    By one call to :func:`flatness.measures.compute_measures` on the first :data:`MEASURE_SAMPLES`
    training samples in fixed batches of B, with the sample count, batch size and seconds
    (``measure_*``).

    λ_max to :data:`FINAL_EIGEN_TOL` relative, Tr(H) by Hutchinson with
    :data:`FINAL_TRACE_MATVECS` products, seed 0, the deployed (eval-mode) function: the values
    :func:`flatness.measures.final_measures` gives, without its loss and Fisher passes.
    """
    from ... import measures

    options = measures.MeasureOptions(seed=0, matvecs=FINAL_TRACE_MATVECS, k=1, eigen_tol=FINAL_EIGEN_TOL)
    n = min(MEASURE_SAMPLES, int(splits.y_train.shape[0]))
    batch = min(config.batch_size, n)
    train_batches = iterate_batches(splits.x_train, splits.y_train, batch, shuffle=False)
    batches = [b for _, b in zip(range(n // batch), train_batches, strict=False)]
    start = time.perf_counter()
    values = measures.compute_measures(model, task.loss_fn, batches, FLATNESS_KEYS, options)
    return {
        **{k: float(values[k]) for k in FLATNESS_KEYS},
        "measure_samples": batch * len(batches),
        "measure_batch_size": batch,
        "measure_seconds": time.perf_counter() - start,
    }
