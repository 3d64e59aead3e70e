"""`flatness run --model-arg KEY=VALUE`: model settings reach the model and the run names, bad
ones are one-line errors, and runs without them keep their names and committed records.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from flatness.cli import main
from flatness.cli import run as run_cli
from flatness.experiments.running.checkpoints import load_checkpoint
from flatness.experiments.running.record import read_record
from flatness.experiments.running.runner import pending_runs
from flatness.experiments.running.specs import RunSpec, build_grid
from flatness.experiments.world.models import mlp
from flatness.experiments.world.tasks import get_task
from flatness.utils import FlatnessError

BC = "breast-cancer-mlp"
CIFAR = "cifar100-mlp"
RESULTS = Path(__file__).resolve().parents[1] / "results"


def _linear_layers(model: nn.Module) -> list[nn.Linear]:
    return [m for m in model.modules() if isinstance(m, nn.Linear)]


def _specs_of(argv: list[str], monkeypatch: pytest.MonkeyPatch) -> list[RunSpec]:
    """The run specs `flatness run ARGV` would train (the runner is replaced: nothing trains)."""
    seen: list[RunSpec] = []

    def fake_run_grid(specs: list[RunSpec], *args: Any, **kwargs: Any) -> dict[str, Any]:
        seen.extend(specs)
        return {}

    monkeypatch.setattr(run_cli, "run_grid", fake_run_grid)
    assert main(["run", *argv, "--quiet", "--no-plots"]) == 0
    return seen


def test_cifar_weight_scale_is_a_model_setting() -> None:
    task = get_task(CIFAR)
    assert task.model_defaults["weight_scale"] == 0.5
    torch.manual_seed(0)
    tuned = task.build_model()
    torch.manual_seed(0)
    full = task.build_model(weight_scale=1.0)
    torch.manual_seed(0)
    reference = mlp(3072, 100, (512, 256), dropout=0.3)  # PyTorch's default initialisation
    for a, b, ref in zip(_linear_layers(tuned), _linear_layers(full), _linear_layers(reference), strict=True):
        assert torch.equal(b.weight, ref.weight) and torch.equal(b.bias, ref.bias)
        assert torch.equal(b.weight, 2 * a.weight) and torch.equal(a.bias, b.bias)


def test_model_args_reach_the_run_spec_and_its_name(monkeypatch: pytest.MonkeyPatch) -> None:
    base = [CIFAR, "--lambdas", "0.1", "--seeds", "1"]
    (plain,) = _specs_of(base, monkeypatch)
    assert plain.name == "fa_lam0.1_seed0" and plain.model_kwargs == {}
    # the default value is no setting at all: the same run, the same name
    (same,) = _specs_of([*base, "--model-arg", "weight_scale=0.5"], monkeypatch)
    assert same == plain
    (full,) = _specs_of([*base, "--model-arg", "weight_scale=1.0"], monkeypatch)
    assert full.model_kwargs == {"weight_scale": 1.0} and full.name.startswith("fa_lam0.1_m")
    (as_int,) = _specs_of([*base, "--model-arg", "weight_scale=1"], monkeypatch)
    assert as_int == full  # 1 and 1.0 are one run
    (both,) = _specs_of([*base, "--model-arg", "weight_scale=1", "--model-arg", "hidden=[64,32]"],
                        monkeypatch)
    assert both.model_kwargs == {"weight_scale": 1.0, "hidden": [64, 32]}
    assert len({plain.name, full.name, both.name}) == 3


def test_cli_run_trains_the_model_with_its_settings(tmp_path: Path) -> None:
    out = tmp_path / "runs"
    args = ["run", BC, "--method", "none", "--seeds", "1", "--epochs", "1", "--out", str(out),
            "--quiet", "--no-plots", "--model-arg", "hidden=[8,4]", "--model-arg", "dropout=0"]
    assert main(args) == 0
    (spec,) = build_grid(BC, "none", None, 1, config_overrides={"epochs": 1},
                         model_kwargs={"hidden": [8, 4], "dropout": 0})
    record = read_record(out / BC / f"{spec.name}.json")
    assert record is not None and record.complete
    assert record.model_kwargs == {"hidden": [8, 4], "dropout": 0.0}
    model, _ = load_checkpoint(out / BC / str(record.checkpoint))
    assert [m.out_features for m in _linear_layers(model)] == [8, 4, 1]
    assert not any(isinstance(m, nn.Dropout) for m in model.modules())
    assert main(args) == 0  # resumes: the record is a finished run of the same spec


@pytest.mark.parametrize(
    "argv, message",
    [
        ([CIFAR, "--model-arg", "depth=3"], "has no model setting(s) ['depth']; known: dropout, hidden, weight_scale"),
        ([CIFAR, "--model-arg", "weight_scale=-1"], "weight_scale must be > 0"),
        ([CIFAR, "--model-arg", "weight_scale=big"], "weight_scale must be a finite number"),
        ([CIFAR, "--model-arg", "hidden=512"], "hidden must be a list of positive integers"),
        ([BC, "--model-arg", "dropout=1"], "dropout must be in [0, 1)"),
        ([BC, "--model-arg", "weight_scale=1"], "has no model setting(s) ['weight_scale']"),
        (["newsgroups-logreg", "--model-arg", "hidden=[8]"], "has no model setting(s) ['hidden']"),
        ([CIFAR, "--model-arg", "weight_scale"], "--model-arg must look like KEY=VALUE"),
    ],
)
def test_bad_model_args_are_one_line_errors(
    argv: list[str], message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "runs"
    assert main(["run", *argv, "--lambdas", "0", "--seeds", "1", "--out", str(out), "--quiet"]) == 2
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("flatness: error:") and message in lines[0], err
    assert "Traceback" not in err and not out.exists()  # checked before any work starts


def test_model_settings_are_checked_in_the_library_too() -> None:
    with pytest.raises(FlatnessError, match="weight_scale must be > 0"):
        get_task(CIFAR).build_model(weight_scale=0.0)
    with pytest.raises(FlatnessError, match="hidden must be a list"):
        build_grid(BC, "none", None, 1, model_kwargs={"hidden": [8, True]})


def test_committed_cifar_records_keep_their_names_and_are_finished_runs() -> None:
    directory = RESULTS / CIFAR
    files = sorted(directory.glob("fa_*.json"))
    if not files:
        pytest.skip("no committed cifar100-mlp records")
    records = [read_record(f) for f in files]
    assert all(r is not None and r.complete for r in records)
    values = sorted({float(r.value) for r in records if r is not None and r.value is not None})
    seeds = sorted({r.seed for r in records if r is not None})
    specs = build_grid(CIFAR, "fa", values, seeds)
    assert sorted(s.name for s in specs) == sorted(f.stem for f in files)
    assert all(s.model_kwargs == {} and s.protocol_id == "" and s.variant_id == "" for s in specs)
    todo, done = pending_runs(specs, directory)  # how `flatness run` accepts finished runs
    assert todo == [] and len(done) == len(files)


def test_every_committed_record_is_a_finished_run_of_its_own_name() -> None:
    for directory in sorted(p for p in RESULTS.iterdir() if p.is_dir()):
        specs = []
        for path in sorted(directory.glob("*.json")):
            record = read_record(path)
            if record is None:
                continue
            spec = RunSpec.from_dict(dataclasses.asdict(record))
            assert spec.name == path.stem, path
            specs.append(spec)
        todo, done = pending_runs(specs, directory)
        assert todo == [] and len(done) == len(specs), directory
