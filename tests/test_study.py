"""`flatness study`: model settings of runs, initial weights, the grid design, and the small study end to end."""

from __future__ import annotations

import csv
import dataclasses
import json
from pathlib import Path

import pytest
import torch

from flatness.cli import main
from flatness.experiments import study_population
from flatness.experiments.reporting.study import AXES, get_grid, parse_method_label, run_study
from flatness.experiments.running.checkpoints import (
    checkpoint_initial_model,
    initial_model,
    load_checkpoint,
)
from flatness.experiments.running.runner import execute_run
from flatness.experiments.running.specs import RunSpec, build_grid, identity
from flatness.measures import distance_from_init
from flatness.utils import FlatnessError


def test_model_settings_are_part_of_the_run_identity() -> None:
    (default,) = build_grid("breast-cancer-mlp", "none", None, [0], model_kwargs={"dropout": 0.3})
    assert default.model_kwargs == {} and "_m" not in default.name  # the default is dropped
    (narrow,) = build_grid("breast-cancer-mlp", "none", None, [0], model_kwargs={"hidden": (16, 8)})
    assert narrow.model_kwargs == {"hidden": [16, 8]} and "_m" in narrow.name
    assert identity(RunSpec.from_dict(json.loads(json.dumps(narrow.as_dict())))) == identity(narrow)
    with pytest.raises(FlatnessError, match="no model setting"):
        build_grid("breast-cancer-mlp", "none", None, [0], model_kwargs={"depth": 3})
    with pytest.raises(FlatnessError, match="no model setting"):
        build_grid("newsgroups-logreg", "none", None, [0], model_kwargs={"dropout": 0.1})


def test_initial_weights_are_rebuilt_exactly(tmp_path: Path) -> None:
    (spec,) = build_grid("breast-cancer-mlp", "none", None, [3], config_overrides={"epochs": 1},
                         model_kwargs={"hidden": [16, 8], "dropout": 0.0}, trajectory=2)
    state = torch.get_rng_state()
    record = execute_run(spec, tmp_path)
    assert record.complete and record.model_kwargs == spec.model_kwargs
    snapshots = torch.load(tmp_path / str(record.trajectory_file), weights_only=True)
    assert snapshots["steps"][0] == 0
    first = snapshots["state_dicts"][0]
    rebuilt = initial_model("breast-cancer-mlp", 3, model_kwargs=spec.model_kwargs)
    assert rebuilt.state_dict().keys() == first.keys()
    assert all(torch.equal(rebuilt.state_dict()[k], first[k]) for k in first)
    from_checkpoint = checkpoint_initial_model(tmp_path / str(record.checkpoint))
    assert all(torch.equal(from_checkpoint.state_dict()[k], first[k]) for k in first)
    model, _ = load_checkpoint(tmp_path / str(record.checkpoint))  # built with the run's widths
    assert model[0].weight.shape == (16, 30) and not torch.equal(model[0].weight, first["0.weight"])
    torch.set_rng_state(state)
    initial_model("breast-cancer-mlp", 3)
    assert torch.equal(torch.get_rng_state(), state)  # the caller's random state is kept
    # `flatness measure` rebuilds the same initial weights from the checkpoint
    assert main(["measure", str(tmp_path / str(record.checkpoint)), "--task", "breast-cancer-mlp",
                 "--measures", "distance_from_init", "--json", "--out", str(tmp_path / "m.json")]) == 0
    measured = json.loads((tmp_path / "m.json").read_text())
    assert measured["distance_from_init"] == pytest.approx(distance_from_init(model, rebuilt))


def test_grids_are_crossed_with_seeds_as_replicates() -> None:
    for task, name, models in (("cifar100-mlp", None, 64), ("cifar100-resnet", None, 32),
                               ("breast-cancer-mlp", None, 16), ("breast-cancer-mlp", "crossed", 192)):
        grid = get_grid(task, name)
        entries = grid.entries()
        assert len(entries) == models and len({s.name for s, _ in entries}) == models
        settings = [e[1] for e in entries]
        # every combination of the crossed factors appears once per seed
        combos = {tuple(st[a] for a in grid.factors) for st in settings}
        assert len(combos) * len(grid.seeds) == models and len(grid.seeds) >= 2
        assert "seed" not in AXES and all(set(st) == {*AXES, "seed"} for st in settings)
        if grid.name == "crossed":
            assert len(grid.factors) >= 4 and all(len(v) >= 2 for v in grid.factors.values())
            assert grid.protocol["stop_train_acc"] == 0.99 and grid.protocol["schedule"] == "constant"
    spec, settings = next(e for e in get_grid("cifar100-mlp").entries()
                          if e[1]["width"] == 0.5 and e[1]["method"] == "fa:3e-05")
    assert spec.model_kwargs["hidden"] == [256, 128] and spec.method == "fa" and spec.value == 3e-05
    assert spec.config["lr"] == settings["lr"] and spec.config["train_subset"] == 2000
    cnn, cnn_settings = get_grid("cifar100-resnet").entries()[0]
    assert cnn.config["model"] == f"resnet8-w{cnn_settings['width']}" and cnn.model_kwargs == {}
    assert parse_method_label("fa:0.1") == ("fa", 0.1) and parse_method_label("none") == ("none", None)
    for bad in ("fa", "none:1", "fa:x", "nope:1"):
        with pytest.raises(FlatnessError):
            parse_method_label(bad)

    base = get_grid("cifar100-mlp")
    for broken, message in (
        ({"fixed": {**base.fixed, "lr": 1e-3}}, "both crossed and fixed"),
        ({"factors": {**base.factors, "dropout": (0.1,)}, "fixed": {}}, "fewer than two"),
        ({"fixed": {}}, "given no value"),
        ({"seeds": (0, 0)}, "seeds"),
    ):
        with pytest.raises(FlatnessError, match=message):
            dataclasses.replace(base, **broken).entries()


def test_models_that_miss_the_stopping_rule_are_counted_and_left_out(tmp_path: Path) -> None:
    from flatness.experiments.running.study_population import StudyGrid, collect_population

    grid = StudyGrid("t", "breast-cancer-mlp", factors={"lr": (1e-3, 3e-2)},
                     fixed={"batch_size": 32, "width": 0.25, "dropout": 0.0, "weight_decay": 0.0, "method": "none"},
                     seeds=(0,), protocol={"epochs": 2, "stop_train_loss": 1e-9})
    entries = grid.entries()
    from flatness.experiments.running.runner import run_grid

    run_grid([s for s, _ in entries], tmp_path, progress=False, log=lambda m: None)
    population = collect_population(grid, entries, tmp_path)
    assert population.rows == [] and sorted(population.missed) == sorted(s.name for s, _ in entries)
    assert not (tmp_path / "breast-cancer-mlp" / "study" / "measures").exists()  # nothing measured


@pytest.fixture(scope="module")
def small_study(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    out = tmp_path_factory.mktemp("study")
    text = run_study("breast-cancer-mlp", "small", out, progress=False, reparam=True, resamples=200,
                     log=lambda msg: None)
    return out, text


@pytest.mark.slow
def test_small_study_end_to_end(small_study: tuple[Path, str]) -> None:
    out, text = small_study
    study_dir = out / "breast-cancer-mlp" / "study" / "small"
    for name in ("ranking.md", "ranking.csv", "ranking.json", "population.csv", "population.json",
                 "plane.png", "scatter_lr.png", "scatter_method.png", "reparam.md", "reparam.json"):
        assert (study_dir / name).is_file(), name
    ranking = json.loads((study_dir / "ranking.json").read_text())
    keys = {m["measure"] for m in ranking["measures"]}
    for key in ("lambda_max", "hessian_trace", "hessian_sq_trace", "eps_sharpness", "adaptive_sharpness",
                "fisher_trace", "noise_loss_increase", "param_norm", "path_norm", "distance_from_init",
                "inverse_margin_sq", "pacbayes_flatness", "pacbayes_mag_flatness", "measured_sq_trace_per_B"):
        assert key in keys, key
    assert ranking["axes"] == ["lr", "weight_decay", "method"] and ranking["tau"] == "tau_a"
    first = ranking["measures"][0]
    assert -1 <= first["tau_gap_acc"] <= 1 and first["psi_lr_cells"] == 8  # (wd, method) x seed
    assert first["tau_gap_acc_low"] <= first["tau_gap_acc"] <= first["tau_gap_acc_high"]
    assert "ctau" in first and "psi_mean_low" in first
    assert "| measure | τ gap | τ test acc | τ loss gap | τ gap | fit |" in text and "Reparametrisation check" in text
    assert "16 models met it" in text and "Kendall's τ_a" in text
    rows = list(csv.DictReader((study_dir / "population.csv").open()))
    assert len(rows) == 16 and {r["seed"] for r in rows} == {"0", "1"}
    population = json.loads((study_dir / "population.json").read_text())
    for row in population["rows"]:  # the gap is the record's; the study's own evaluation agrees
        record = json.loads((out / "breast-cancer-mlp" / f"{row['name']}.json").read_text())
        cached = json.loads((out / "breast-cancer-mlp" / "study" / "measures" / f"{row['name']}.json").read_text())
        assert row["generalization"]["gap_acc"] == record["final_train_acc"] - record["final_test_acc"]
        assert row["generalization"]["gap_loss"] == record["final_test_loss"] - record["final_train_loss"]
        for key in ("train_acc", "test_acc", "train_loss", "test_loss"):
            assert cached["evaluation"][key] == pytest.approx(record[f"final_{key}"], rel=1e-5), key
    reparam = json.loads((study_dir / "reparam.json").read_text())
    verdict = {m["measure"]: m["invariant"] for m in reparam["measures"]}
    assert verdict["adaptive_sharpness"] and verdict["path_norm"] and not verdict["lambda_max"]
    # the claims (issue 31): calibration / robustness τ, seed-pair barriers, model selection
    claims = json.loads((study_dir / "claims.json").read_text())
    first = claims["calibration_robustness"][0]
    for target in ("test_ece", "test_nll", "test_brier", "test_robust_acc"):
        tau, low, high = first[target]
        assert low <= tau <= high and len(first[f"{target}_given_fit"]) == 3, target
    assert len(claims["barrier_pairs"]) == 8  # 8 settings x one pair of seeds (0, 1)
    assert all(p["barrier_loss"] >= -1e-6 or p["barrier_loss"] != p["barrier_loss"] for p in claims["barrier_pairs"])
    selection = claims["model_selection"]
    assert selection["groups"] == 4 and selection["plane"] == ["lr", "weight_decay"]  # method x seed
    assert {r["measure"] for r in selection["rows"]} >= {"lambda_max", "local_entropy_sharpness"}
    assert "## Model selection" in text and "## Mode connectivity between seeds" in text


@pytest.mark.slow
def test_small_study_resumes_without_work(small_study: tuple[Path, str], monkeypatch: pytest.MonkeyPatch) -> None:
    out, _ = small_study

    def no_measuring(*args: object, **kwargs: object) -> None:
        raise AssertionError("a cached measurement was recomputed")

    monkeypatch.setattr(study_population, "compute_measures", no_measuring)
    messages: list[str] = []
    run_study("breast-cancer-mlp", "small", out, progress=False, plots=False, resamples=200,
              log=messages.append)
    assert "16 of 16 runs already finished; skipping them" in messages


def test_study_cli_rejects_bad_input(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    cases = [
        (["study", "breast-cancer-mlp", "--grid", "huge"], "no study grid"),
        (["study", "newsgroups-logreg"], "no study grid"),
        (["study", "breast-cancer-mlp", "--jobs", "0"], "--jobs"),
        (["study", "breast-cancer-mlp", "--shard", "1/2", "--reparam"], "--reparam"),
        (["study", "breast-cancer-mlp", "--shard", "x"], "--shard"),
        (["study", "breast-cancer-mlp", "--resamples", "5"], "--resamples"),
    ]
    for argv, message in cases:
        assert main([*argv, "--out", str(tmp_path)]) == 2
        err = capsys.readouterr().err
        assert err.startswith("flatness: error:") and message in err, (argv, err)
    assert not any(tmp_path.iterdir())  # nothing started
    assert main(["study", "breast-cancer-mlp", "--list"]) == 0
    assert len(capsys.readouterr().out.strip().splitlines()) == 16
