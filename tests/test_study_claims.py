"""The study's tests of the overview's claims (issue 31 item 5) on constructed populations."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest

from flatness.experiments.reporting.study_claims import (
    _markdown,
    has_validation_tie,
    model_selection,
    select_in_group,
)
from flatness.experiments.running.study_barriers import seed_pairs
from flatness.experiments.running.study_population import Population


def _row(name: str, lr: float, seed: int, val: float, test: float, sharp: float) -> dict:
    settings = {"lr": lr, "batch_size": 32, "width": 1.0, "weight_decay": 0.0, "dropout": 0.0,
                "method": "none", "seed": seed}
    return {"name": name, "settings": settings, "generalization": {"val_acc": val, "test_acc": test},
            "measures": {"lambda_max": sharp}}


def test_a_flatness_tie_break_that_picks_better_models_shows_a_positive_difference() -> None:
    # in every seed's group two models tie on validation; the flatter one tests better
    rows = []
    for seed in range(6):
        rows += [_row(f"a{seed}", 1e-3, seed, 0.9, 0.80, 5.0), _row(f"b{seed}", 3e-3, seed, 0.9, 0.90, 1.0),
                 _row(f"c{seed}", 1e-2, seed, 0.7, 0.99, 0.0)]
    population = Population("t", "g", rows, [], {}, 0.0, 0.0)
    result = model_selection(population)
    (row,) = [r for r in result["rows"] if r["measure"] == "lambda_max"]
    assert result["groups"] == 6 and row["groups_changed"] == 6
    assert row["difference"] == pytest.approx(0.05)  # 0.90 against the tie's mean 0.85
    assert result["validation_alone_mean"] == pytest.approx(0.85)
    assert result["groups_with_ties"] == 6


def test_without_validation_ties_the_report_says_so_and_prints_no_nan_interval() -> None:
    rows = []
    for seed in range(4):
        rows += [_row(f"a{seed}", 1e-3, seed, 0.9, 0.80, 5.0), _row(f"b{seed}", 3e-3, seed, 0.8, 0.90, 1.0)]
    population = Population("t", "g", rows, [], {}, 0.0, 0.0)
    selection = model_selection(population)
    assert selection["groups_with_ties"] == 0 and not has_validation_tie(rows[:2])
    (row,) = [r for r in selection["rows"] if r["measure"] == "lambda_max"]
    assert row["groups_changed"] == 0 and row["difference"] == 0
    text = _markdown(population, SimpleNamespace(name="g"), [], [], selection)  # type: ignore[arg-type]
    assert "In 0 of them two or more models tie" in text and "nan" not in text.lower()


def test_no_tie_means_no_change_and_a_missing_measure_is_left_out() -> None:
    rows = [_row("a", 1e-3, 0, 0.9, 0.8, 5.0), _row("b", 3e-3, 0, 0.8, 0.9, 1.0)]
    assert select_in_group(rows, "lambda_max") == select_in_group(rows, None) == 0.8
    rows[0]["measures"] = {}
    assert select_in_group(rows, "lambda_max") == 0.9  # only b has the measure
    assert math.isnan(select_in_group([], None))


def test_seed_pairs_pair_only_replicates_of_one_setting() -> None:
    rows = [_row("a", 1e-3, 0, 0, 0, 0), _row("b", 1e-3, 1, 0, 0, 0), _row("c", 3e-3, 0, 0, 0, 0)]
    assert [(x["name"], y["name"]) for x, y in seed_pairs(rows)] == [("a", "b")]
