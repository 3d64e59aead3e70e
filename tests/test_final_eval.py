"""Calibration and robustness of every run's final model: the new record fields, and that they
change no field a record had before them (same seed, same values).
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from flatness.cli import main
from flatness.experiments.running import measure
from flatness.experiments.running.final_eval import (
    ROBUSTNESS_EXAMPLES,
    _noisy_text,
    final_calibration,
    final_robustness,
)
from flatness.experiments.running.record import read_record
from flatness.experiments.running.runner import execute_run
from flatness.experiments.running.specs import build_grid
from flatness.experiments.world.corruptions import CORRUPTIONS
from flatness.experiments.world.data import Splits, scipy_to_torch_csr
from flatness.experiments.world.models import logistic_regression
from flatness.experiments.world.tasks import get_task

BC = "breast-cancer-mlp"
BEFORE = Path(__file__).parent / "data" / "records_before_issue31"
NEW_FIELDS = ("final_test_ece", "final_test_nll", "final_test_brier", "final_test_reliability", "final_test_robustness")
TIMINGS = {"environment", "finished_at", "train_seconds", "seconds_per_epoch", "eval_seconds", "total_seconds"}
# added by issue 26 (schema version 3): what made the run, not what it computed
PROVENANCE = {"version", "resolved", "task_source"}


def _without_timings(data: dict) -> dict:
    data = {k: v for k, v in data.items() if k not in TIMINGS | PROVENANCE and k not in NEW_FIELDS}
    data["measurement"] = {k: v for k, v in data["measurement"].items() if k != "seconds"}
    data["curves"] = {k: v for k, v in data["curves"].items() if k != "seconds"}
    return data


@pytest.fixture(scope="module")
def bc_record(tmp_path_factory):
    """The run that made ``tests/data/records_before_issue31`` (at commit 054ce8b), made now."""
    out = tmp_path_factory.mktemp("runs")
    assert main(["run", BC, "--lambdas", "0.01", "--seeds", "1", "--epochs", "3", "--out", str(out),
                 "--quiet", "--no-plots"]) == 0
    return out / BC / "fa_lam0.01_seed0_p0e2091.json"


def _close(a, b) -> bool:
    if isinstance(a, float) or isinstance(b, float):
        return a == pytest.approx(b, rel=1e-4, abs=1e-9)  # another machine's float rounding
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_close(a[k], b[k]) for k in a)
    if isinstance(a, list):
        return len(a) == len(b) and all(_close(x, y) for x, y in zip(a, b, strict=True))
    return a == b


def test_a_record_keeps_every_field_it_had_before_the_new_ones(bc_record):
    before = _without_timings(json.loads((BEFORE / bc_record.name).read_text()))
    now = json.loads(bc_record.read_text())
    assert all(now[k] is not None for k in NEW_FIELDS)
    now = _without_timings(now)
    assert now.keys() == before.keys()
    assert [k for k in before if not _close(now[k], before[k])] == []


def test_the_new_fields_change_no_other_field_exactly(tmp_path, monkeypatch):
    spec = build_grid(BC, "fa", [0.01], seeds=1, config_overrides={"epochs": 1})[0]
    with_them = execute_run(spec, tmp_path / "a")
    monkeypatch.setattr(measure, "final_calibration", lambda *args: {})
    monkeypatch.setattr(measure, "final_robustness", lambda *args: {})
    without = execute_run(spec, tmp_path / "b")
    assert all(getattr(without, k) is None for k in NEW_FIELDS)
    assert all(getattr(with_them, k) is not None for k in NEW_FIELDS)
    a, b = (_without_timings(r.to_json()) for r in (with_them, without))
    a.pop("checkpoint"), b.pop("checkpoint")
    assert a == b


def test_the_calibration_and_robustness_fields_of_a_breast_cancer_record(bc_record):
    r = read_record(bc_record)
    assert r.final_test_nll == pytest.approx(r.final_test_loss, rel=1e-5)  # BCE is the NLL
    assert 0 <= r.final_test_ece <= 1 and 0 <= r.final_test_brier <= 1
    assert r.final_test_reliability["bins"] == 15 and sum(r.final_test_reliability["count"]) == r.test_samples
    rob = r.final_test_robustness
    assert rob["examples"] == min(ROBUSTNESS_EXAMPLES, r.test_samples) == 114
    assert rob["clean_acc"] == r.final_test_acc and rob["noise_sigma"] == [0.1, 0.3, 1.0]
    assert len(rob["noise_acc"]) == 3 and rob["noise_unit"] == "standardised feature units"
    assert "corruption_acc" not in rob  # tabular: input noise only


def _image_splits(n: int = 40):
    gen = torch.Generator().manual_seed(0)
    mean, std = (0.5, 0.48, 0.44), (0.27, 0.26, 0.28)
    pixels = torch.round(torch.rand(n, 3, 32, 32, generator=gen) * 255) / 255
    x = ((pixels - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)).reshape(n, -1)
    y = torch.randint(0, 4, (n,), generator=gen)
    return Splits(x, y, x, y, 4, pixel_mean=mean, pixel_std=std)


def _task(modality: str):
    return SimpleNamespace(modality=modality, predict=lambda z: z.argmax(-1), task_type="classification",
                           score=lambda z, y: (z.argmax(-1) == y).float())


def test_image_robustness_has_noise_and_corruptions_and_touches_nothing():
    splits = _image_splits()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3072, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Dropout(0.2), nn.Linear(16, 4)).train()
    model(splits.x_test)  # non-trivial running statistics
    state = {k: v.clone() for k, v in model.state_dict().items()}
    config = get_task("cifar100-resnet").config
    rng = torch.get_rng_state()
    out = final_robustness(model, _task("image"), splits, config)["final_test_robustness"]
    calib = final_calibration(model, _task("image"), splits, config)
    assert torch.equal(torch.get_rng_state(), rng) and model.training
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    assert out["examples"] == 40 and out["noise_sigma"] == [0.04, 0.08, 0.1] and len(out["noise_acc"]) == 3
    assert set(out["corruption_acc"]) == set(CORRUPTIONS) and all(len(v) == 5 for v in out["corruption_acc"].values())
    every = [a for v in out["corruption_acc"].values() for a in v] + out["noise_acc"] + [out["clean_acc"]]
    assert all(0 <= a <= 1 for a in every)
    assert out["mean_corruption_acc"] == pytest.approx(sum(every[:20]) / 20)
    again = final_robustness(model, _task("image"), splits, config)["final_test_robustness"]
    assert {**again, "seconds": 0} == {**out, "seconds": 0}  # its own seeded generator
    assert math.isfinite(calib["final_test_ece"]) and sum(calib["final_test_reliability"]["count"]) == 40


def test_text_noise_perturbs_only_the_words_present():
    from scipy import sparse

    matrix = sparse.random(30, 50, density=0.1, random_state=0, format="csr", dtype="float32")
    x = scipy_to_torch_csr(matrix)
    noisy = _noisy_text(x, 0.3, torch.Generator().manual_seed(0))
    assert torch.equal(noisy.crow_indices(), x.crow_indices()) and torch.equal(noisy.col_indices(), x.col_indices())
    rms = float(x.values().pow(2).mean().sqrt())
    assert float((noisy.values() - x.values()).std()) == pytest.approx(0.3 * rms, rel=0.2)
    y = torch.randint(0, 3, (30,))
    torch.manual_seed(0)
    model = logistic_regression(50, 3)
    out = final_robustness(model, _task("text"), Splits(x, y, x, y, 3), get_task("newsgroups-logreg").config)
    rob = out["final_test_robustness"]
    assert rob["noise_unit"].startswith("RMS of the nonzero") and len(rob["noise_acc"]) == 3
    assert "corruption_acc" not in rob


def test_older_records_read_with_the_new_fields_none():
    r = read_record(BEFORE / "fa_lam0.01_seed0_p0e2091.json")
    assert all(getattr(r, k) is None for k in NEW_FIELDS) and r.final_test_acc is not None
    assert dataclasses.replace(r, final_test_ece=0.1).get("final_test_ece") == 0.1


def test_the_reports_reliability_diagram_pools_the_runs_bins(tmp_path):
    from flatness.experiments.reporting.plots import _pooled_reliability, plot_group
    from flatness.experiments.reporting.report import summarize
    from flatness.experiments.running.record import RunRecord
    from flatness.measures import calibration

    gen = torch.Generator().manual_seed(0)
    logits = [torch.randn(50, 4, generator=gen) for _ in range(2)]
    labels = [torch.randint(0, 4, (50,), generator=gen) for _ in range(2)]
    records = []
    for seed, (z, y) in enumerate(zip(logits, labels, strict=True)):
        c = calibration(z, y)
        records.append(RunRecord(name=f"none_seed{seed}", task=BC, method="none", seed=seed, status="complete",
                                 config={"epochs": 1, "batch_size": 32, "lr": 1e-3, "weight_decay": 0.0},
                                 final_test_acc=c.accuracy, final_test_ece=c.ece,
                                 final_test_reliability=c.reliability(),
                                 curves={"test_acc": [c.accuracy]}))
    both = calibration(torch.cat(logits), torch.cat(labels))
    conf, acc, n, runs = _pooled_reliability(records)
    assert n == 100 and runs == 2
    assert conf == pytest.approx([v for v in both.confidence if v is not None])
    assert acc == pytest.approx([v for v in both.bin_accuracy if v is not None])
    (group,) = summarize(records)
    written = plot_group(group, tmp_path)
    assert tmp_path / f"{group.slug}_reliability.png" in written
    assert _pooled_reliability([dataclasses.replace(r, final_test_reliability=None) for r in records]) is None
