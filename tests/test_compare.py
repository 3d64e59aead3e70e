"""``flatness compare``: grids, choice on validation (never test), statistics, outputs, errors."""

from __future__ import annotations

import json
import math

import pytest

import flatness.measures
from flatness.cli import main
from flatness.experiments import measure
from flatness.experiments.reporting.compare import (
    comparison_grid,
    comparison_markdown,
    comparison_specs,
    plot_comparison,
    select_and_summarize,
)
from flatness.experiments.reporting.stats import holm
from flatness.experiments.running.record import RunRecord
from flatness.experiments.running.specs import format_value
from flatness.experiments.world.tasks import get_task
from flatness.utils import FlatnessError

BC = "breast-cancer-mlp"


def _record(method, value, seed, val, test, seconds=1.0, hparam="rho", status="complete"):
    return RunRecord(
        name=f"{method}_{value}_{seed}",
        task=BC,
        method=method,
        hparam=None if method == "none" else hparam,
        value=value,
        seed=seed,
        status=status,
        final_val_acc=val,
        final_test_acc=test,
        seconds_per_epoch=seconds,
        measured_sq_trace_per_B=0.5 + seed,
    )


def test_grids_drop_zero_and_always_include_none():
    assert comparison_grid("none") == [None]
    assert 0.0 not in comparison_grid("fa") and comparison_grid("fa")
    for method in ("sam", "gnp", "curvature", "nrs", "rpr"):
        assert all(v > 0 for v in comparison_grid(method))
    # gnp at ρ = its finite-difference radius (0.1) is SAM at ρ = 0.1: shown once, as sam
    assert 0.1 in comparison_grid("sam") and 0.1 not in comparison_grid("gnp")
    specs = comparison_specs(BC, ["sam"], seeds=2, grids={"sam": [0.05]})
    assert [s.name for s in specs] == ["none_seed0", "none_seed1", "sam_rho0.05_seed0", "sam_rho0.05_seed1"]
    with pytest.raises(FlatnessError, match="unknown method"):
        comparison_specs(BC, ["nope"])
    with pytest.raises(FlatnessError, match="> 0"):
        comparison_specs(BC, ["sam"], grids={"sam": [-0.1]})


def test_strength_is_chosen_on_validation_not_test():
    records = [_record("none", None, s, 0.90, 0.80 + 0.01 * s) for s in range(3)]
    # ρ = 0.01: best validation; ρ = 0.1: best test (must not be chosen)
    records += [_record("sam", 0.01, s, 0.95, (0.85, 0.87, 0.86)[s], seconds=2.0) for s in range(3)]
    records += [_record("sam", 0.1, s, 0.91, 0.99, seconds=2.0) for s in range(3)]
    results = {r.method: r for r in select_and_summarize(records, ["sam"])}
    sam, none = results["sam"], results["none"]
    assert sam.value == 0.01 and sam.val_acc == pytest.approx(0.95)
    assert sam.test_acc == pytest.approx(0.86) and sam.test_acc_std == pytest.approx(0.01)
    assert sam.time_ratio == pytest.approx(2.0) and none.time_ratio == pytest.approx(1.0)
    from scipy import stats

    c = sam.vs_none  # paired by seed: same seed, same initial weights and data order
    assert c.paired and c.n_pairs == 3
    assert c.p_t == pytest.approx(stats.ttest_rel([0.85, 0.87, 0.86], [0.80, 0.81, 0.82]).pvalue)
    assert c.p_t_holm == pytest.approx(c.p_t)  # a family of one
    assert none.role == "baseline" and none.vs_none is None
    assert sam.flatness["measured_sq_trace_per_B"] == pytest.approx(1.5)


def test_equal_validation_accuracy_is_decided_by_validation_loss():
    records = [_record("none", None, s, 0.9, 0.9) for s in range(2)]
    for value, loss in ((0.01, 0.30), (0.05, 0.20), (0.1, 0.25)):
        for s in range(2):
            r = _record("gnp", value, s, 0.95, 0.5 if value == 0.1 else 0.9)
            r.final_val_loss = loss
            records.append(r)
    gnp = {r.method: r for r in select_and_summarize(records, ["gnp"])}["gnp"]
    assert gnp.value == 0.05 and gnp.val_loss == pytest.approx(0.20)


def test_ties_pick_the_smaller_strength_and_failed_runs_are_listed():
    records = [_record("none", None, s, 0.9, 0.9) for s in range(2)]
    records += [_record("nrs", v, s, 0.93, 0.9, hparam="eps") for v in (0.5, 0.05) for s in range(2)]
    records.append(_record("nrs", 0.05, 2, None, None, hparam="eps", status="failed"))
    nrs = {r.method: r for r in select_and_summarize(records, ["nrs"])}["nrs"]
    assert nrs.value == 0.05 and nrs.seeds == [0, 1] and nrs.failed == ["nrs_0.05_2"]


@pytest.fixture
def fake_measures(monkeypatch):
    """A stand-in for compute_measures (λ_max by Lanczos is slow); records what it was given."""
    calls = []

    def fake(model, loss_fn, batches, names, options=None, **kw):
        batches = list(batches)
        calls.append([int(x.shape[0]) for x, _ in batches])
        assert tuple(names) == ("lambda_max", "hessian_trace") and options.matvecs == measure.FINAL_TRACE_MATVECS
        weight = sum(float(p.detach().abs().sum()) for p in model.parameters())
        return {"lambda_max": weight, "hessian_trace": 2 * weight}

    monkeypatch.setattr(flatness.measures, "compute_measures", fake)
    return calls


def test_compare_cli_end_to_end_then_resume(tmp_path, fake_measures, capsys):
    args = [
        "compare", BC, "--methods", "sam", "--grid", "sam=0.01,0.1", "--seeds", "2",
        "--epochs", "1", "--quiet", "--no-plots", "--out", str(tmp_path),
    ]
    assert main(args) == 0
    out = capsys.readouterr().out
    directory = tmp_path / BC / "compare"
    summary = (directory / "summary.md").read_text()
    assert "`sam`" in out
    assert "`none`" in summary and "`sam`" in summary and "(chosen)" in summary
    assert not (directory / "compare.png").exists()  # --no-plots
    data = json.loads((directory / "compare.json").read_text())
    methods = {m["method"]: m for m in data["methods"]}
    assert set(methods) == {"none", "sam"}
    assert methods["sam"]["value"] in (0.01, 0.1) and len(methods["sam"]["test_accs"]) == 2
    assert all(math.isfinite(g["val_loss"]) for g in methods["sam"]["grid"])  # the tie-break
    assert methods["sam"]["flatness"]["hessian_trace"] == pytest.approx(
        2 * methods["sam"]["flatness"]["lambda_max"]
    )
    # the fixed measurement data: 1024 samples at most, in full batches of B = 32
    assert fake_measures and all(set(c) == {32} and sum(c) <= 1024 for c in fake_measures)
    measured = len(fake_measures)
    assert measured == 2 * 2  # two methods, two seeds, at the chosen strength only
    records = sorted(p.name for p in (tmp_path / BC).glob("*.json"))
    assert len(records) == 2 * (1 + 2)
    # the per-method report shows what the comparison measured (one cache), and only that
    chosen = format_value(methods["sam"]["value"])
    rows = {line.split(" | ")[0][2:]: line for line in (tmp_path / BC / "summary.md").read_text().splitlines()
            if line.startswith("| 0.") and line.split(" | ")[1].isdigit()}  # the results table
    assert set(rows) == {"0.01", "0.1"}
    assert "not measured" not in rows[chosen]
    assert all("not measured" in line for v, line in rows.items() if v != chosen)
    stamps = {p: p.stat().st_mtime_ns for p in (tmp_path / BC).glob("*.json")}

    assert main(args) == 0  # resumes: no run is trained again, measurements come from the cache
    assert {p: p.stat().st_mtime_ns for p in (tmp_path / BC).glob("*.json")} == stamps
    assert len(fake_measures) == measured


def test_select_seeds_scans_the_grid_at_one_seed_then_trains_the_choice_at_all(tmp_path, fake_measures, capsys):
    args = ["compare", BC, "--methods", "sam", "--grid", "sam=0.01,0.05,0.1", "--seeds", "3", "--select-seeds", "1",
            "--epochs", "1", "--quiet", "--no-plots", "--out", str(tmp_path)]
    assert main(args) == 0
    data = json.loads((tmp_path / BC / "compare" / "compare.json").read_text())
    sam = next(m for m in data["methods"] if m["method"] == "sam")
    assert data["select_seeds"] == 1 and sam["scan_seeds"] == [0] and len(sam["grid"]) == 3
    assert all(g["runs"] == 1 for g in sam["grid"])  # the scan: one seed per candidate
    best = max(sam["grid"], key=lambda g: (g["val_acc"], -g["val_loss"], -g["value"]))
    assert sam["value"] == best["value"] and sam["seeds"] == [0, 1, 2]
    records = sorted(p.name for p in (tmp_path / BC).glob("sam_*.json"))
    assert len(records) == 3 + 2  # three candidates at seed 0, the chosen one at seeds 1 and 2
    summary = (tmp_path / BC / "compare" / "summary.md").read_text()
    assert "## Scan: each method's grid at seed [0]" in summary and "scan's seeds [0]" in summary
    assert main([*args[:-2], "--select-seeds", "4", "--out", str(tmp_path)]) == 2
    assert "--select-seeds" in capsys.readouterr().err


@pytest.mark.parametrize(
    "extra, match",
    [
        (["nope-task"], "unknown task"),
        ([BC, "--seeds", "0"], "--seeds"),
        ([BC, "--grid", "sam"], "METHOD=V1"),
        ([BC, "--grid", "sam=a,b"], "numbers"),
        ([BC, "--grid", "sam=-1"], "> 0"),
        ([BC, "--methods", "nope"], "unknown method"),
        ([BC, "--epochs", "0"], "--epochs"),
        ([BC, "--lr", "-1"], "--lr"),
    ],
)
def test_bad_input_is_one_error_line(extra, match, tmp_path, capsys):
    assert main(["compare", *extra, "--quiet", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("flatness: error:") and match in err[0]
    assert not any(tmp_path.iterdir())  # nothing written


def test_plot_is_written(tmp_path):
    records = [_record("none", None, s, 0.9, 0.8 + 0.01 * s) for s in range(2)]
    records += [_record("sam", 0.05, s, 0.95, 0.85 + 0.01 * s) for s in range(2)]
    results = select_and_summarize(records, ["sam"])
    path = tmp_path / "compare.png"
    plot_comparison(BC, results, {r.name: r for r in records}, path)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [p.name for p in tmp_path.iterdir()] == ["compare.png"]  # no temp file left


def test_holm_across_methods_and_notes_in_the_table():
    records = [_record("none", None, s, 0.90, (0.80, 0.82, 0.81, 0.83)[s]) for s in range(4)]
    sam_acc = (0.82, 0.83, 0.84, 0.84)
    records += [_record("sam", 0.05, s, 0.95, sam_acc[s]) for s in range(4)]
    records += [_record("nrs", 0.1, s, 0.93, (0.80, 0.83, 0.80, 0.85)[s], hparam="eps") for s in range(4)]
    # rpr: every seed exactly as `none` -> a note instead of a p-value
    records += [_record("rpr", 0.5, s, 0.91, (0.80, 0.82, 0.81, 0.83)[s], hparam="eps") for s in range(4)]
    results = {r.method: r for r in select_and_summarize(records, ["sam", "nrs", "rpr"])}
    from scipy import stats

    raw = [stats.ttest_rel([r.final_test_acc for r in records if r.method == m],
                           [0.80, 0.82, 0.81, 0.83]).pvalue for m in ("sam", "nrs")]
    assert [results[m].vs_none.p_t for m in ("sam", "nrs")] == pytest.approx(raw)
    assert [results[m].vs_none.p_t_holm for m in ("sam", "nrs")] == pytest.approx(holm(raw))
    rpr = results["rpr"].vs_none
    assert math.isnan(rpr.p_t) and rpr.note == "identical values on every pair"
    text = comparison_markdown(BC, list(results.values()), get_task(BC).config.as_dict())
    sam = results["sam"].vs_none
    assert f"| {sam.p_t:.2g} / {sam.p_t_holm:.2g} |" in text  # raw / Holm in the main table
    line = next(x for x in text.splitlines() if x.startswith("| `sam` ρ = 0.05 | 4 pairs |"))
    assert f"| {sam.p_t:.2g} | {sam.p_t_holm:.2g} | {sam.p_wilcoxon:.2g} | {sam.p_wilcoxon_holm:.2g} |" in line
    assert f"{sam.difference:+.4f} [{sam.ci[0]:+.4f}, {sam.ci[1]:+.4f}]" in line and f"| {sam.mde:.4f} |" in line
    assert "| n/a (identical values on every pair) |" in text and "p = 0 " not in text
    assert "Holm–Bonferroni adjustment over the 2 tests of this table" in text
    assert "*MDE* (minimum detectable effect)" in text
    assert f"ln 2 = {math.log(2):.2f}" in text  # the loss scale, from the task's class count


def test_gnp_at_its_radius_is_sam_shown_once():
    records = [_record("none", None, s, 0.90, 0.80 + 0.01 * s) for s in range(2)]
    records += [_record("sam", 0.1, s, 0.97, (0.85, 0.84)[s]) for s in range(2)]
    # gnp's best validation accuracy is at ρ = 0.1 = r, i.e. SAM's configuration: not chosen
    records += [_record("gnp", 0.1, s, 0.97, (0.85, 0.84)[s]) for s in range(2)]
    records += [_record("gnp", 0.05, s, 0.93, (0.83, 0.85)[s]) for s in range(2)]
    results = {r.method: r for r in select_and_summarize(records, ["sam", "gnp"])}
    assert results["gnp"].value == 0.05 and results["sam"].value == 0.1
    text = comparison_markdown(BC, list(results.values()), get_task(BC).config.as_dict())
    assert "ρ = 0.1: 0.9700 ± 0.0000 / n/a (≡ `sam` ρ = 0.1, not chosen for gnp)" in text
    assert "at ρ = r, c = 1 and it is SAM's update at ρ = r" in text
    assert text.count("| `gnp` |") == 1 and "| `gnp` | ρ = 0.05 |" in text
    for r in records:
        r.environment = {"cpu": "AMD EPYC", "torch": "2.13.0+cpu"}
    markdown = comparison_markdown(BC, list(results.values()), get_task(BC).config.as_dict(), records=records)
    assert "Mixed platforms" not in markdown
    records[0].environment = {"cpu": "Intel Xeon", "torch": "2.13.0+cpu"}  # one run elsewhere
    mixed = comparison_markdown(BC, list(results.values()), get_task(BC).config.as_dict(), records=records)
    assert "**Mixed platforms.** These runs come from 2 platforms" in mixed


def test_footnotes_follow_the_measurement_protocol(monkeypatch):
    records = [_record("none", None, s, 0.9, 0.8 + 0.01 * s) for s in range(2)]
    records += [_record("sam", 0.05, s, 0.95, (0.85, 0.84)[s]) for s in range(2)]
    results = select_and_summarize(records, ["sam"])
    config = get_task(BC).config.as_dict()
    assert f"first {measure.MEASURE_SAMPLES} training samples" in comparison_markdown(BC, results, config)
    monkeypatch.setattr(measure, "MEASURE_SAMPLES", 512)
    monkeypatch.setattr(measure, "MEASURE_PROBES", 3)
    text = comparison_markdown(BC, results, config)
    assert "first 512 training samples" in text and "3 fixed Rademacher probes" in text
    assert "1024" not in text
    changed = get_task(BC).config.replace(epochs=7, batch_size=64).as_dict()
    assert "7 epochs, B = 64" in comparison_markdown(BC, results, changed)


def test_final_flatness_is_tested_on_log10_with_holm_over_the_methods():
    records = [_record("none", None, s, 0.90, 0.80 + 0.01 * s) for s in range(4)]
    records += [_record("sam", 0.05, s, 0.95, 0.81 + 0.01 * s) for s in range(4)]
    records += [_record("nrs", 0.1, s, 0.93, 0.80 + 0.01 * s, hparam="eps") for s in range(4)]
    sharp = {"none": (10.0, 20.0, 40.0, 10.0), "sam": (5.0, 11.0, 18.0, 6.0), "nrs": (2.0, 2.5, 9.0, 1.0)}
    for r in records:
        r.measured_sq_trace_per_B = sharp[r.method][r.seed]
    records[-1].measured_sq_trace_per_B = None  # nrs seed 3 unmeasured: 3 pairs left for nrs
    results = {r.method: r for r in select_and_summarize(records, ["sam", "nrs"])}
    from scipy import stats

    base = [math.log10(v) for v in sharp["none"]]
    raw = [stats.ttest_rel([math.log10(v) for v in sharp["sam"]], base).pvalue,
           stats.ttest_rel([math.log10(v) for v in sharp["nrs"][:3]], base[:3]).pvalue]
    got = [results[m].flatness_vs_none for m in ("sam", "nrs")]
    assert [c.p_t for c in got] == pytest.approx(raw) and [c.p_t_holm for c in got] == pytest.approx(holm(raw))
    assert got[1].n_pairs == 3 and got[0].difference == pytest.approx(
        sum(math.log10(a / b) for a, b in zip(sharp["sam"], sharp["none"], strict=True)) / 4)
    assert results["none"].flatness_vs_none is None
    text = comparison_markdown(BC, list(results.values()), get_task(BC).config.as_dict())
    section = text.split("## Final Tr(H²)/B (measured), log10, against `none`")[1]
    line = next(x for x in section.splitlines() if x.startswith("| `sam` ρ = 0.05 | 4 pairs |"))
    assert f"| {got[0].p_t:.2g} | {got[0].p_t_holm:.2g} |" in line
    assert "A Δ of -0.30 halves Tr(H²)/B" in section


def test_compare_takes_a_named_protocol():
    from flatness.experiments.reporting.compare import comparison_specs

    specs = comparison_specs("cifar100-resnet", ["sam"], 1, grids={"sam": [0.05]}, protocol="cpu-full")
    assert [s.name for s in specs] == ["none_seed0_pcpu-full", "sam_rho0.05_seed0_pcpu-full"]
    from flatness.experiments.world.tasks import get_task

    assert all(s.config == get_task("cifar100-resnet").protocol("cpu-full").as_dict() for s in specs)
