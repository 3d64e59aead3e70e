"""Issue 30's pipeline findings, tried again: every bad command line is one clear error line
(exit 2) naming its cause, written before any work and leaving nothing behind; an empty shard
says so.
"""

from __future__ import annotations

from argparse import Namespace
from pathlib import Path

import pytest

from flatness.cli import main
from flatness.cli.run import protocol_overrides
from flatness.experiments.reporting.compare import comparison_specs
from flatness.experiments.running.specs import build_grid
from flatness.experiments.world.errors import SettingError
from flatness.experiments.world.tasks import TrainConfig, get_task
from flatness.utils import FlatnessError

BC = "breast-cancer-mlp"
HUGE = "99999999999999999999"  # more than 64 bits
QUICK = ["--seeds", "1", "--epochs", "1", "--quiet", "--no-plots"]


def _one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert err[0].startswith("flatness: error: "), err
    return err[0]


def _files(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()) if root.exists() else []


# ---------------------------------------------------------------- finding 2: --method-arg vs the sweep


@pytest.mark.parametrize(
    ("method", "assignment", "swept"),
    [("sam", "rho=0.1", "rho"), ("fa", "lam=0.5", "lam"), ("sam+fa", "sam.rho=0.1", "rho")],
)
def test_a_method_arg_setting_the_swept_strength_is_refused(tmp_path, capsys, method, assignment, swept):
    out = tmp_path / "runs"
    args = ["run", BC, "--method", method, "--lambdas", "0.05", "--method-arg", assignment, "--out", str(out)]
    assert main([*args, *QUICK]) == 2
    line = _one_error_line(capsys)
    assert f"--method-arg {assignment.split('=')[0]} sets {swept}" in line and "--lambdas" in line
    assert _files(out) == []
    with pytest.raises(FlatnessError, match=f"sets {swept}, the strength the sweep varies"):
        build_grid(BC, method, None, 1, method_kwargs={assignment.split("=")[0]: 0.1})
    # compare's own settings go through the same grid
    with pytest.raises(FlatnessError, match=f"sets {swept}"):
        comparison_specs(BC, [method], 1, method_kwargs={method: {assignment.split("=")[0]: 0.1}})


def test_other_method_args_still_reach_the_record(tmp_path):
    # a composition's second strength is a setting, not the swept one
    (spec,) = build_grid(BC, "sam+fa", [0.05], 1, method_kwargs={"lam": 0.01})
    assert spec.hparam == "rho" and spec.value == 0.05 and spec.method_kwargs["lam"] == 0.01


# ---------------------------------------------------------------- finding 5: compare's grids


def test_compare_refuses_a_grid_or_setting_of_a_method_it_does_not_compare(tmp_path, capsys):
    out = tmp_path / "runs"
    base = ["compare", BC, "--methods", "sam", "--out", str(out), *QUICK]
    assert main([*base, "--grid", "fa=0.1"]) == 2
    line = _one_error_line(capsys)
    assert "--grid fa" in line and "not among the compared methods" in line and "none, sam" in line
    assert main([*base, "--method-arg", "fa.probes=2"]) == 2
    line = _one_error_line(capsys)
    assert "--method-arg fa" in line and "not among the compared methods" in line
    assert _files(out) == []
    # the pipeline names its parameters; the CLI line above names the flags
    with pytest.raises(FlatnessError, match="`grids` fa: 'fa' is not among the compared methods"):
        comparison_specs(BC, ["sam"], 1, grids={"fa": [0.1]})
    assert {s.method for s in comparison_specs(BC, ["sam"], 1, grids={"sam": [0.1]})} == {"none", "sam"}


# ---------------------------------------------------------------- finding 6: integers with bounds


@pytest.mark.parametrize("flag", ["--batch-size", "--epochs", "--train-eval-samples", "--seeds"])
def test_an_integer_option_beyond_its_bound_names_the_flag(tmp_path, capsys, flag):
    out = tmp_path / "runs"
    argv = ["run", BC, "--lambdas", "0", "--out", str(out), *QUICK, flag, HUGE]
    assert main(argv) == 2
    line = _one_error_line(capsys)
    assert flag in line and HUGE in line  # the pipeline names its parameter, the CLI line the flag
    assert _files(out) == []


@pytest.mark.parametrize(
    ("flag", "value", "message"),
    [
        ("--epochs", "0", "--epochs must be an integer from 1 to 2**63 - 1, got 0"),
        ("--batch-size", "0", "--batch-size must be an integer from 1 to 2**63 - 1, got 0"),
        ("--lr", "0", "--lr must be finite and > 0, got 0.0"),
        ("--lr", "nan", "--lr must be finite and > 0, got nan"),
        ("--lr", "-1", "--lr must be finite and > 0, got -1.0"),
        ("--warmup-epochs", "-1", "--warmup-epochs must be finite and in [0, 1] (at most --epochs), got -1.0"),
        ("--train-eval-samples", "0",
         "--train-eval-samples must be an integer from 1 to 2**63 - 1 (None: all samples), got 0"),
    ],
)
def test_a_protocol_flag_out_of_range_is_the_protocols_error_naming_the_flag(tmp_path, capsys, flag, value, message):
    out = tmp_path / "runs"
    assert main(["run", BC, "--lambdas", "0", "--out", str(out), *QUICK, flag, value]) == 2
    assert _one_error_line(capsys) == f"flatness: error: invalid training protocol for {BC}: {message}"
    assert _files(out) == []


def test_the_protocol_checks_the_overrides_once_naming_the_field():
    assert protocol_overrides(Namespace(epochs=0, batch_size=None, lr=float("inf"), warmup_epochs=None,
                                        train_eval_samples=None)) == {"epochs": 0, "lr": float("inf")}  # unchecked
    with pytest.raises(SettingError, match=r"^invalid training protocol for breast-cancer-mlp: `lr` must be finite "
                                           r"and > 0, got inf$") as caught:
        build_grid(BC, "none", None, 1, config_overrides={"lr": float("inf")})
    assert caught.value.parameters == ("lr",)
    with pytest.raises(ValueError, match=r"^`warmup_epochs` must be finite and in \[0, 2\] \(at most `epochs`\)"):
        get_task(BC).config.replace(epochs=2, warmup_epochs=3.0)  # still a ValueError, as TrainConfig's always were


@pytest.mark.parametrize("field", ["epochs", "batch_size", "eval_batch_size", "train_eval_samples", "train_subset"])
def test_the_training_protocol_bounds_its_integers(field):
    config = get_task(BC).config
    with pytest.raises(ValueError, match=rf"{field}.* must be .*integers? from \d+ .*to 2\*\*63 - 1"):
        config.replace(**{field: 2**64})
    assert config.replace(**{field: 2**63 - 1}).as_dict()[field] == 2**63 - 1  # the largest allowed
    with pytest.raises(ValueError, match=f"{field}.* must be"):
        TrainConfig.from_dict({**config.as_dict(), field: 2.5})


def test_more_jobs_snapshots_or_ranks_than_there_is_work_for(tmp_path, capsys):
    out = tmp_path / "runs"
    # --jobs: never more worker processes than pending runs (was: OverflowError from the pool)
    assert main(["run", BC, "--lambdas", "0", "--out", str(out), *QUICK, "--jobs", HUGE]) == 0
    capsys.readouterr()
    # --trajectory: at most a snapshot per step (was: a loop over 10**20 snapshot indices)
    assert main(["run", BC, "--lambdas", "0.01", "--out", str(out), *QUICK, "--trajectory", HUGE,
                 "--batch-size", "200"]) == 0
    capsys.readouterr()
    import torch

    (trajectory,) = (out / BC / "trajectories").glob("*.pt")
    steps = torch.load(trajectory, weights_only=False)["steps"]
    assert steps == list(range(len(steps))) and len(steps) >= 2  # 0..total: every step once
    # --emulate-ranks: each rank needs a sample of the batch (was: building 10**20 ranks)
    assert main(["run", BC, "--lambdas", "0", "--out", str(out), *QUICK, "--emulate-ranks", HUGE]) == 2
    line = _one_error_line(capsys)
    assert "--emulate-ranks" in line and "batch size" in line and HUGE in line


def test_an_unexpected_error_with_a_multiline_message_is_still_one_line(capsys, monkeypatch):
    import flatness.cli.run as run_cli

    def boom(*args, **kwargs):
        raise RuntimeError("first line\nframe #0: c10::something\nframe #1: more")

    monkeypatch.setattr(run_cli, "run_grid", boom)
    assert main(["run", BC, "--lambdas", "0", *QUICK]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["flatness: internal error: RuntimeError: first line (set FLATNESS_DEBUG=1 for the traceback)"]


# ---------------------------------------------------------------- finding 7: an empty shard


def test_an_empty_shard_says_so_and_succeeds(tmp_path, capsys):
    out = tmp_path / "runs"
    assert main(["run", BC, "--lambdas", "0", "--out", str(out), *QUICK, "--shard", "2/2"]) == 0
    captured = capsys.readouterr()
    assert captured.err.strip().splitlines() == [
        "flatness: shard 2/2 of this grid has no runs (the grid has 1 run, fewer than 2 shards); nothing to do"
    ]
    assert captured.out == "" and _files(out) == []


# ---------------------------------------------------------------- finding 8: λ settings at λ = 0


@pytest.mark.parametrize(
    ("assignment", "message", "jobs"),
    [
        ("lam_schedule=bogus:3", "unknown λ schedule part 'bogus:3'", "1"),
        ("lam_control=bogus", "unknown λ controller 'bogus'", "1"),
        ("lam_schedule=bogus:3", "unknown λ schedule part 'bogus:3'", "2"),  # in a worker process
    ],
)
def test_lam_settings_are_checked_whatever_lam_is(tmp_path, capsys, assignment, message, jobs):
    out = tmp_path / "runs"
    argv = ["run", BC, "--lambdas", "0", "--method-arg", assignment, "--out", str(out), *QUICK, "--jobs", jobs]
    assert main(argv) == 2
    line = _one_error_line(capsys)
    assert message in line and "method 'fa' rejects its settings" in line
    assert not list((out / BC).glob("*.json")) if (out / BC).exists() else True
    assert [f for f in _files(out) if not f.endswith(".write-test")] == []


def test_valid_lam_settings_at_lam_zero_still_run(tmp_path, capsys):
    out = tmp_path / "runs"
    argv = ["run", BC, "--lambdas", "0", "--method-arg", "lam_schedule=warmup:0.5+cosine", "--out", str(out), *QUICK]
    assert main(argv) == 0
    assert len(list((out / BC).glob("*.json"))) == 1
