"""Issue 29 items 2–3, the pipeline's part: what a task and a method know is declared on them and
read by the report; the report labels runs from their records; ``--method-arg`` has one syntax;
the pipeline names its parameters and the CLI names its flags; ``report --measures`` is one call
into the measures library.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import nn

import flatness.experiments as fx
from flatness.cli import main
from flatness.cli.run import parse_method_args
from flatness.experiments.reporting.groups import paper_results, strength_symbol, summarize, twin_of, variant_settings
from flatness.experiments.reporting.report import markdown
from flatness.experiments.running import measure
from flatness.experiments.running.record import RunRecord
from flatness.experiments.running.specs import build_grid
from flatness.experiments.world.data import Splits
from flatness.experiments.world.errors import SettingError
from flatness.experiments.world.tasks import PAPER_TASKS, get_task
from flatness.measures import final_measures
from flatness.methods import METHODS, method_class
from flatness.utils import FlatnessError

BC = "breast-cancer-mlp"


# ---------------------------------------------------------------- a: task knowledge on Task


def test_each_paper_task_holds_its_tables_accuracies_and_its_run_cost():
    for name in PAPER_TASKS:
        task = get_task(name)
        assert task.paper_table and set(task.paper_final_acc) == {"fa"} and 0.0 in task.paper_final_acc["fa"]
    assert get_task("cifar100-mlp").paper_final_acc["fa"][0.01] == 0.2700
    assert [get_task(n).cost for n in ("cifar100-mlp", "newsgroups-logreg", BC)] == [8.0, 5.0, 1.0]
    bc = get_task(BC)
    assert bc.run_cost(bc.config.as_dict()) == 1.0 and bc.run_cost({"epochs": 2 * bc.config.epochs}) == 2.0
    # a run's cost: the task's, the longer protocol's, and a penalised run's
    (plain, penalised) = build_grid(BC, "fa", [0.0, 0.01], 1, config_overrides={"epochs": 100})
    assert (plain.cost, penalised.cost) == (2.0, 5.0)


def test_a_plugin_task_gets_neutral_defaults():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(60, 4, generator=g)
    y = (x.sum(1) > 0).long()
    task = fx.custom_task(name="knowledge-toy", model=lambda: nn.Linear(4, 2), train=(x[:40], y[:40]),
                          test=(x[40:], y[40:]), loss=nn.functional.cross_entropy,
                          config=fx.TrainConfig(epochs=3, batch_size=20, lr=1e-2, weight_decay=0.0))
    assert task.paper_final_acc == {} and task.cost == 1.0 and task.run_cost({"epochs": 6}) == 2.0


# ---------------------------------------------------------------- b: method knowledge on the method


def test_every_swept_strength_has_a_symbol_on_its_method():
    for name, cls in METHODS.items():
        assert (cls.symbol is None) == (cls.hparam is None), name
    assert [strength_symbol(m, method_class(m).hparam) for m in ("fa", "sam", "gnp", "nrs", "curvature")] == \
        ["λ", "ρ", "ρ", "ε", "α"]
    assert strength_symbol("sam+fa", "rho") == "ρ"  # a composition: its first strength's
    assert strength_symbol("not-a-method", "beta") == "beta"  # a record of a method unknown here


def test_gnp_declares_its_sam_twin_and_the_report_reads_it():
    assert method_class("gnp").twin["method"] == "sam" and method_class("sam").twin is None
    radius = method_class("gnp").keyword_defaults()["fd_radius"]
    assert twin_of("gnp", radius, {}) == ("sam", radius)
    assert twin_of("gnp", radius, {"form": "exact"}) is None
    assert twin_of("gnp", 0.02, {"fd_radius": 0.02}) == ("sam", 0.02)
    assert twin_of("sam", radius, {}) is None and twin_of("gnp", None, {}) is None


# ---------------------------------------------------------------- c: labels from the records


def _record(method, value, seed, kwargs, task=BC, protocol_id="", variant_id=""):
    hparam = method_class(method).hparam
    return RunRecord(name=f"{method}_{value}_{seed}_{variant_id}", task=task, method=method, hparam=hparam,
                     value=value, seed=seed, status="complete", method_kwargs=kwargs, protocol_id=protocol_id,
                     variant_id=variant_id, config=get_task(task).config.as_dict(), final_test_acc=0.9)


def test_a_variant_is_labelled_by_what_its_records_change():
    default = {"probes": 5, "every": 10, "backend": "finite-difference"}
    variant = {**default, "lam_schedule": "warmup:0.5+cosine"}
    records = [_record("fa", 0.01, s, default, task="cifar100-resnet") for s in range(2)]
    records += [_record("fa", 0.01, s, variant, task="cifar100-resnet", variant_id="abc") for s in range(2)]
    groups = summarize(records)
    (g,) = [g for g in groups if g.variant_id]
    assert variant_settings(g, groups) == {"lam_schedule": "warmup:0.5+cosine"}  # the task's backend is no change
    assert "method `fa`, lam_schedule=warmup:0.5+cosine" in markdown(groups)
    # without the default runs in the report: the method's own defaults are the reference
    alone = summarize(records[2:])
    assert variant_settings(alone[0], alone) == {"backend": "finite-difference", "lam_schedule": "warmup:0.5+cosine"}


def test_the_paper_column_comes_from_the_task():
    records = [_record("fa", v, s, {"probes": 5, "every": 10}) for v in (0.0, 0.01) for s in range(2)]
    (g,) = summarize(records)
    assert paper_results(g) == get_task(BC).paper_final_acc["fa"]
    assert "Paper final acc" in markdown([g]) and "| 0.5859 |" in markdown([g])
    assert paper_results(dataclasses.replace(g, protocol_id="x")) == {}
    (none,) = summarize([_record("none", None, s, {}) for s in range(2)])
    assert paper_results(none) == {}


# ---------------------------------------------------------------- d: one call into the measures library


def test_final_flatness_equals_final_measures():
    torch.manual_seed(0)
    x, y = torch.randn(96, 6), torch.randint(0, 3, (96,))
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Dropout(0.2), nn.Linear(8, 3))

    class Toy:
        loss_fn = staticmethod(nn.functional.cross_entropy)

    splits = Splits(x_train=x, y_train=y, x_test=x, y_test=y, num_classes=3)
    config = get_task(BC).config.replace(batch_size=32)
    got = measure.final_flatness(model, Toy(), splits, config)
    batches = list(zip(x.split(32), y.split(32), strict=True))
    want = final_measures(model, nn.functional.cross_entropy, batches, seed=0, matvecs=measure.FINAL_TRACE_MATVECS)
    assert {k: got[k] for k in measure.FLATNESS_KEYS} == {k: want[k] for k in measure.FLATNESS_KEYS}
    assert (got["measure_samples"], got["measure_batch_size"]) == (96, 32) and model.training


# ---------------------------------------------------------------- e: parameters in the pipeline, flags in the CLI


def test_the_pipeline_names_parameters_and_the_cli_names_flags(tmp_path, capsys):
    with pytest.raises(SettingError, match=r"`values` \(lam\) must be finite and >= 0") as caught:
        build_grid(BC, "fa", [-1.0], 1)
    assert "--" not in str(caught.value)
    assert caught.value.spelled({"values": "--lambdas"}).startswith("--lambdas (lam) must be")
    with pytest.raises(SettingError, match="`seeds` must be a count"):
        build_grid(BC, "fa", [0.0], 0)
    for argv, flag in ((["--lambdas", "-1"], "--lambdas"), (["--seeds", "0"], "--seeds"),
                       (["--jobs", "0"], "--jobs"), (["--trajectory", "-1"], "--trajectory"),
                       (["--method-arg", "lam=0.1"], "--method-arg lam"),
                       (["--emulate-ranks", "0"], "--emulate-ranks")):
        assert main(["run", BC, "--out", str(tmp_path), "--quiet", *argv]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith(f"flatness: error: {flag}") and "`" not in err[0], err
    assert not any(tmp_path.iterdir())


# ---------------------------------------------------------------- f: one --method-arg syntax


def test_method_args_of_a_run():
    assert parse_method_args(["probes=3", "fa.every=5"], ["fa"]) == {"fa": {"probes": 3, "every": 5}}
    # a composition: its own name, or a component's prefix kept for the method to route
    assert parse_method_args(["sam+fa.lam=0.01", "fa.probes=2", "lam_schedule=cosine"], ["sam+fa"]) == {
        "sam+fa": {"lam": 0.01, "fa.probes": 2, "lam_schedule": "cosine"}
    }


def test_method_args_of_a_comparison():
    methods = ["none", "fa", "sam+fa"]
    # a bare key: every compared method taking it as a setting (fa sweeps lam: not fa)
    assert parse_method_args(["lam=0.01", "probes=3"], methods, compared=True) == {
        "fa": {"probes": 3}, "sam+fa": {"lam": 0.01, "probes": 3}
    }
    assert parse_method_args(["fa.estimator=cv"], methods, compared=True) == {"fa": {"estimator": "cv"}}
    with pytest.raises(FlatnessError, match="'sam' is not among the compared methods"):
        parse_method_args(["sam.rho=0.1"], methods, compared=True)
    with pytest.raises(FlatnessError, match="no compared method"):
        parse_method_args(["nothing=1"], methods, compared=True)


def test_the_former_compare_spelling_still_works_with_one_deprecation_line(capsys):
    assert parse_method_args(["sam+fa:lam=0.01"], ["none", "sam+fa"], compared=True) == {"sam+fa": {"lam": 0.01}}
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "deprecated" in err[0] and "write sam+fa.lam=0.01" in err[0]
    parsed = parse_method_args(["lam_schedule=warmup:0.5+cosine"], ["fa"])
    assert parsed == {"fa": {"lam_schedule": "warmup:0.5+cosine"}}
    assert capsys.readouterr().err == ""  # a colon in a value is no old spelling
