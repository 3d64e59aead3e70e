"""End to end on breast-cancer-mlp at toy size: adaptive λ, K-FAC, the control variate and
FA + SAM in the training loop and through ``flatness run``; ``flatness compare --equal-compute``.
"""

from __future__ import annotations

import json
import math

import pytest
import torch

from flatness.cli import main
from flatness.experiments.running.record import load_records
from flatness.experiments.running.training import make_optimizer, train
from flatness.experiments.world.tasks import get_task
from flatness.methods import make_method


def _run(tmp_path, *args: str) -> dict:
    out = tmp_path / "runs"
    code = main(["run", "breast-cancer-mlp", "--seeds", "1", "--epochs", "1", "--out", str(out),
                 "--quiet", *args])
    assert code == 0
    (record,) = [json.loads(p.read_text()) for p in (out / "breast-cancer-mlp").glob("*.json")]
    assert record["status"] == "complete"
    return record


@pytest.mark.parametrize(
    "method, kwargs, logged",
    [
        ("fa", {"lam": 0.1, "lam_schedule": "warmup:0.5+cosine", "total_steps": 7, "every": 2}, "lam"),
        ("fa", {"lam": 1.0, "lam_control": "ratio:0.1", "every": 2}, "task_grad_norm"),
        ("fa", {"lam": 0.1, "lam_control": "spike:2", "every": 2}, "lam_spike"),
        ("fa", {"lam": 0.1, "backend": "kfac"}, "sq_trace"),
        ("fa", {"lam": 0.1, "estimator": "cv"}, "sq_trace"),
        ("sam+fa", {"rho": 0.05, "lam": 0.1, "backend": "kfac"}, "perturbed_loss"),
    ],
)
def test_each_option_trains_on_the_task(method, kwargs, logged):
    task = get_task("breast-cancer-mlp")
    data = task.load()
    config = task.config.replace(epochs=1, batch_size=64)  # 7 steps
    torch.manual_seed(0)
    model = task.build_model()
    trainer = make_method(method, model, task.loss_fn, probes=2, seed=0, **kwargs)
    history = train(model, trainer, make_optimizer(model, config), data, config,
                    predict=task.predict, generator=torch.Generator().manual_seed(0))
    (epoch,) = history.epochs
    assert math.isfinite(epoch[logged]) and epoch.get("sq_trace", 0) >= 0
    assert 0.5 < epoch["test_acc"] <= 1


def test_a_schedule_through_the_cli_is_in_the_run_record_with_kfac_measured(tmp_path, capsys):
    out = tmp_path / "runs"
    code = main(["run", "breast-cancer-mlp", "--seeds", "1", "--epochs", "1", "--out", str(out),
                 "--quiet", "--no-plots", "--method", "fa", "--lambdas", "0", "0.1",
                 "--method-arg", "lam_schedule=delay:0.5+warmup:0.2+cosine"])
    assert code == 0
    records = {r.value: r for r in load_records(out / "breast-cancer-mlp")}
    assert all(r.complete for r in records.values())
    # 13 steps: no pass while λ = 0 (the first 6 or 7 steps), then every 10th step: step 10
    assert records[0.1].curves["lam"][0] > 0 and records[0.1].curves["lam_steps"] == [1]
    assert "lam" not in records[0.0].curves  # λ = 0: never active
    for r in records.values():
        assert r.get("measured_kfac_sq_trace_per_B") > 0
    capsys.readouterr()
    assert main(["report", str(out / "breast-cancer-mlp"), "--kfac-agreement"]) == 0
    assert "Kendall τ" in capsys.readouterr().out
    assert (out / "breast-cancer-mlp" / "kfac_agreement.json").exists()


def test_a_bad_schedule_is_a_one_line_error(tmp_path, capsys):
    code = main(["run", "breast-cancer-mlp", "--method", "fa", "--lambdas", "0.1", "--seeds", "1",
                 "--epochs", "1", "--out", str(tmp_path), "--quiet", "--method-arg", "lam_schedule=nope:3"])
    assert code == 2
    err = capsys.readouterr().err
    assert err.startswith("flatness: error:") and "λ schedule" in err and len(err.strip().splitlines()) == 1


def test_compare_equal_compute_writes_table_and_plot(tmp_path, capsys):
    out = tmp_path / "runs"
    code = main(["compare", "breast-cancer-mlp", "--equal-compute", "--methods", "sam+fa",
                 "--grid", "sam+fa=0.05", "--method-arg", "sam+fa.lam=0.1", "--seeds", "1",
                 "--epochs", "1", "--out", str(out), "--quiet"])
    assert code == 0
    compare = out / "breast-cancer-mlp" / "compare"
    summary = json.loads((compare / "equal_compute.json").read_text())
    configs = summary["configurations"]
    assert summary["epochs_grid"] == [1, 2]  # every configuration at 1x and 2x the epochs
    mine = [c for c in configs if c["method"] == "sam+fa"]
    assert sorted(c["epochs"] for c in mine) == [1, 2] and all(c["matched_epochs"] >= c["epochs"] for c in mine)
    nones = {c["epochs"] for c in configs if c["method"] == "none"}
    assert {1, 2} <= nones and all(c["matched_epochs"] in nones for c in mine)
    assert all(c["steps"] > 0 and c["budget"] > 0 for c in configs)
    assert mine[1]["steps"] == 2 * mine[0]["steps"] and mine[0]["cost_ratio"] > 1  # SAM+FA costs more per step
    costs = json.loads((compare / "step_costs.json").read_text())
    assert set(costs["cpu_ms"]) == {"none", mine[0]["key"]} and costs["facts"]["threads"] >= 1
    assert any(c["pareto"] for c in configs)
    assert (compare / "equal_compute.png").stat().st_size > 0
    assert "`sam+fa` ρ = 0.05, 2 ep" in (compare / "equal_compute.md").read_text()
    code = main(["compare", "breast-cancer-mlp", "--equal-compute", "--max-budget-factor", "0.5",
                 "--out", str(out)])
    assert code == 2 and "max-budget-factor" in capsys.readouterr().err


def test_equal_compute_without_matched_runs_trains_no_extra_none_and_tests_nothing(tmp_path, capsys):
    out = tmp_path / "runs"
    args = ["compare", "breast-cancer-mlp", "--equal-compute", "--methods", "sam", "--grid", "sam=0.05",
            "--seeds", "1", "--epochs", "1", "--out", str(out), "--quiet", "--no-plots"]
    assert main([*args, "--no-matched"]) == 0
    compare = out / "breast-cancer-mlp" / "compare"
    summary = json.loads((compare / "equal_compute.json").read_text())
    assert summary["matched"] is False
    assert sorted(c["epochs"] for c in summary["configurations"] if c["method"] == "none") == [1, 2]
    assert all(c["vs_baseline"] is None for c in summary["configurations"])
    text = (compare / "equal_compute.md").read_text()
    assert "No budget-matched `none` runs were trained" in text and "at the same budget" not in text
    assert len(list((out / "breast-cancer-mlp").glob("none_*.json"))) == 2  # 1 and 2 epochs only
    # the same records then take the matched runs: SAM costs more than 1x, so E' > 2 for 2 ep
    assert main(args) == 0
    summary = json.loads((compare / "equal_compute.json").read_text())
    assert summary["matched"] is True and any(c["vs_baseline"] for c in summary["configurations"])
    capsys.readouterr()
    assert main(["compare", "breast-cancer-mlp", "--no-matched", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "--no-matched goes with --equal-compute only" in err and len(err.strip().splitlines()) == 1


def test_equal_compute_plot_legend_names_each_configuration_without_markdown(tmp_path, monkeypatch):
    from flatness.experiments.reporting import equal_compute

    figures = []
    monkeypatch.setattr(equal_compute, "save_png", lambda fig, path: figures.append(fig))
    configs = [equal_compute.Configuration(m, h, v, k, e, ["r"], 10 * e, 1.0, 10.0 * e, 0.5, 0.01, {0: 0.5})
               for m, h, v, k in (("none", None, None, "none"), ("fa", "lam", 0.001, "fa_lam0.001"))
               for e in (1, 2)]
    equal_compute._plot("t", configs, {0, 1}, tmp_path / "x.png")
    (fig,) = figures
    labels = [t.get_text() for t in fig.axes[0].get_legend().get_texts()]
    assert "none" in labels and "fa λ = 0.001" in labels and not any("`" in t for t in labels)


def test_reading_a_run_another_process_still_trains_names_the_holder(tmp_path):
    from flatness.experiments.running.claims import try_claim
    from flatness.experiments.running.runner import read_finished
    from flatness.utils import FlatnessError

    claim = try_claim(tmp_path, "none_seed4")  # held by this (live) process, no record yet
    assert claim is not None
    with pytest.raises(FlatnessError, match="still being trained by pid .* run this command again"):
        read_finished(tmp_path, "none_seed4")
    claim.release()
    with pytest.raises(FlatnessError, match="cannot read run record"):  # no claim: the missing file itself
        read_finished(tmp_path, "none_seed4")
    import socket

    from flatness.experiments.running.claims import claim_path

    dead = {"pid": 2**22 + 12345, "host": socket.gethostname(), "since": "then"}  # beyond pid_max: gone
    claim_path(tmp_path, "none_seed4").write_text(json.dumps(dead))
    with pytest.raises(FlatnessError, match="left by a process that is gone"):
        read_finished(tmp_path, "none_seed4")
