"""Report: grouping, paired statistics against the baseline (incl. degenerate cases), summary
files, footnotes that follow the protocol, plots, CLI.
"""

from __future__ import annotations

import csv
import dataclasses
import math

import numpy as np
import pytest
from scipy import stats

from flatness.cli import main
from flatness.experiments import measure
from flatness.experiments.reporting.report import markdown, summarize, write_report
from flatness.experiments.reporting.stats import holm
from flatness.experiments.running.record import RunRecord, write_record
from flatness.experiments.world.tasks import get_task

BC = "breast-cancer-mlp"


def _record(value, seed, acc, *, method="fa", hparam="lam", status="complete", protocol_id="", flat=1.0):
    name = (f"{method}" + (f"_{hparam}{value:g}" if hparam else "") + f"_seed{seed}"
            + (f"_p{protocol_id}" if protocol_id else ""))
    r = RunRecord(
        status=status,
        name=name,
        task=BC,
        method=method,
        hparam=hparam,
        value=value,
        seed=seed,
        config=get_task(BC).config.as_dict(),
        method_kwargs={"probes": 5, "every": 10} if method == "fa" else {},
        protocol_id=protocol_id,
    )
    if status == "complete":
        r = dataclasses.replace(
            r,
            final_test_acc=acc,
            best_test_acc=acc + 0.01,
            val_chosen_test_acc=acc - 0.01,
            avg_train_sq_trace_per_B=None if not value else 2.0 * flat,
            avg_epoch_sq_trace_per_B=1.5 * flat,
            measured_sq_trace_per_B=flat,
            train_seconds=10.0 + seed,
            seconds_per_epoch=0.2,
            curves={"test_acc": [acc - 0.02, acc - 0.01, acc]},
        )
    else:
        r.error = "TrainingDiverged: loss is nan"
    return r


def _write(directory, records):
    directory.mkdir(parents=True, exist_ok=True)
    for r in records:
        write_record(directory / f"{r.name}.json", r)


def test_summarize_groups_by_method_and_protocol_with_baselines():
    records = [_record(v, s, 0.9 + 0.01 * s + v / 10) for v in (0.0, 0.01, 0.1) for s in range(3)]
    records += [_record(0.01, 0, 0.5, status="failed")]
    records += [_record(None, s, 0.9 + 0.01 * s, method="none", hparam=None) for s in range(3)]
    records += [_record(0.1, s, 0.8, method="sam", hparam="rho") for s in range(2)]
    records += [_record(0.0, s, 0.7, protocol_id="abc123") for s in range(2)]
    groups = {(g.method, g.protocol_id): g for g in summarize(records)}
    fa = groups[("fa", "")]
    assert [row.value for row in fa.rows] == [0.0, 0.01, 0.1]
    assert fa.rows[0].role == "baseline" and fa.rows[0].vs_baseline is None and fa.baseline == "λ = 0"
    row = fa.rows[1]
    assert len(row.runs) == 3 and len(row.failed) == 1 and row.seeds == [0, 1, 2]
    mean, std, n = row.stats["final_test_acc"]
    assert n == 3 and mean == pytest.approx(0.911) and std == pytest.approx(0.01)
    # every seed gains exactly 0.001 over λ = 0: zero variance, a note and no p-value
    c = row.vs_baseline
    assert c.n_pairs == 3 and c.difference == pytest.approx(0.001) and math.isnan(c.p_t)
    assert "zero variance" in c.note
    c = fa.rows[2].vs_baseline  # gains 0.01 each: zero variance too
    assert math.isnan(c.p_t) and math.isnan(c.p_t_holm)
    assert fa.rows[0].stats["avg_train_sq_trace_per_B"][2] == 0  # λ = 0 computes no penalty
    sam = groups[("sam", "")]
    assert sam.baseline == "method none"
    c = sam.rows[0].vs_baseline  # seeds 0, 1 of `none` pair with sam's; seed 2 is left out
    assert c.n_pairs == 2 and c.left_out == 1 and c.paired
    assert c.p_t == pytest.approx(stats.ttest_rel([0.8, 0.8], [0.9, 0.91]).pvalue)
    other_protocol = groups[("fa", "abc123")]
    assert other_protocol.rows[0].role == "baseline"


def test_paired_tests_with_holm_across_the_rows_of_a_group():
    accs = {0.0: [0.90, 0.92, 0.91, 0.93], 0.01: [0.92, 0.93, 0.94, 0.94], 0.1: [0.89, 0.93, 0.90, 0.92],
            1.0: [0.80, 0.85, 0.81, 0.86]}
    records = [_record(v, s, a) for v, row in accs.items() for s, a in enumerate(row)]
    (g,) = summarize(records)
    cs = [row.vs_baseline for row in g.rows[1:]]
    raw = [stats.ttest_rel(accs[v], accs[0.0]).pvalue for v in (0.01, 0.1, 1.0)]
    assert [c.p_t for c in cs] == pytest.approx(raw)
    assert [c.p_t_holm for c in cs] == pytest.approx(holm(raw))
    wil = [stats.wilcoxon(np.subtract(accs[v], accs[0.0])).pvalue for v in (0.01, 0.1, 1.0)]
    assert [c.p_wilcoxon for c in cs] == pytest.approx(wil)
    assert [c.p_wilcoxon_holm for c in cs] == pytest.approx(holm(wil))
    md = markdown([g])
    row = next(line for line in md.splitlines() if line.startswith("| 1 | 4 pairs |"))
    c = cs[2]
    cells = [x.strip() for x in row.strip("|").split("|")]
    assert cells[2] == f"{c.difference:+.4f} [{c.ci[0]:+.4f}, {c.ci[1]:+.4f}]"
    assert cells[3].startswith(f"d_z = {c.effect:+.2f} [")
    assert cells[4:10] == [f"{c.p_t:.2g}", f"{c.p_t_holm:.2g}", f"{c.p_perm:.2g}", f"{c.p_perm_holm:.2g}",
                           f"{c.p_wilcoxon:.2g}", f"{c.p_wilcoxon_holm:.2g}"]
    assert c.p_perm == pytest.approx(2 / 16)  # 4 pairs, all below the baseline: the extreme pattern
    assert cells[10] == f"{c.mde:.4f}"
    assert f"| {c.p_t:.2g} / {c.p_t_holm:.2g} |" in md  # raw / Holm in the results table too
    assert "Holm–Bonferroni adjustment over the 3 tests of this table" in md
    assert "with 4 pairs neither exact test's two-sided p can fall below 0.12" in md
    assert "*MDE* (minimum detectable effect)" in md and "with 4 pairs" in md


def test_methods_against_none_share_one_holm_family_across_their_tables():
    # a per-method table must not show a p-value less adjusted than the cross-method comparison's
    none = [0.90, 0.92, 0.91, 0.93, 0.90]
    accs = {("sam", "rho", 0.05): [0.88, 0.91, 0.89, 0.92, 0.88],
            ("gnp", "rho", 0.01): [0.90, 0.91, 0.91, 0.92, 0.89],
            ("nrs", "eps", 0.1): [0.91, 0.92, 0.92, 0.93, 0.91]}
    records = [_record(None, s, a, method="none", hparam=None) for s, a in enumerate(none)]
    records += [_record(v, s, a, method=m, hparam=h) for (m, h, v), row in accs.items() for s, a in enumerate(row)]
    records += [_record(v, s, a + v, flat=1 + v) for v in (0.0, 0.1) for s, a in enumerate(none)]  # own λ = 0
    groups = {g.method: g for g in summarize(records)}
    order = [("sam", "rho", 0.05), ("gnp", "rho", 0.01), ("nrs", "eps", 0.1)]
    raw = [stats.ttest_rel(accs[k], none).pvalue for k in order]
    got = [groups[m].rows[0].vs_baseline for m, _, _ in sorted(order)]
    assert sorted(c.p_t for c in got) == pytest.approx(sorted(raw))
    by_raw = {round(c.p_t, 12): c.p_t_holm for c in got}
    assert [by_raw[round(p, 12)] for p in raw] == pytest.approx(holm(raw))  # one family of three
    assert groups["fa"].baseline == "λ = 0" and groups["fa"].holm_family == ""  # its own table
    md = markdown(list(groups.values()))
    assert md.count("over the 3 tests against method none in this report (tables of `gnp`, `nrs`, `sam`)") == 3


def test_footnotes_follow_the_measurement_protocol(monkeypatch):
    records = [_record(v, s, 0.9 + 0.01 * s) for v in (0.0, 0.1) for s in range(2)]
    before = markdown(summarize(records))
    assert f"first {measure.MEASURE_SAMPLES} training samples" in before
    assert f"{measure.MEASURE_PROBES} fixed Rademacher probes per batch" in before
    assert f"first {measure.EPOCH_MEASURE_BATCHES} training batches" in before
    monkeypatch.setattr(measure, "MEASURE_SAMPLES", 2048)
    monkeypatch.setattr(measure, "MEASURE_PROBES", 7)
    monkeypatch.setattr(measure, "EPOCH_MEASURE_BATCHES", 1)
    monkeypatch.setattr(measure, "EPOCH_MEASURE_PROBES", 3)
    monkeypatch.setattr(measure, "FINAL_TRACE_MATVECS", 12)
    after = markdown(summarize(records))
    assert "first 1024 training samples" not in after
    assert "first 2048 training samples" in after and "7 fixed Rademacher probes per batch" in after
    assert "first 1 training batch of B (eval mode, 3 fixed probes per batch)" in after
    assert f"({measure.FINAL_TRACE_MATVECS} Hessian-vector products)" in after and "(30 Hessian" not in after


def test_gnp_at_its_radius_is_marked_as_sam():
    records = [_record(None, s, 0.9 + 0.01 * s, method="none", hparam=None) for s in range(2)]
    records += [_record(v, s, 0.9, method="gnp", hparam="rho") for v in (0.05, 0.1) for s in range(2)]
    md = markdown(summarize(records))
    assert "| 0.1 (≡ SAM ρ = 0.1) |" in md and "| 0.05 |" in md
    assert "c = ρ/r = 1, which is exactly SAM's update at ρ = 0.1" in md


def test_write_report_files_and_tables(tmp_path):
    d = tmp_path / BC
    _write(d, [_record(v, s, 0.95 + 0.005 * s, flat=10 / (1 + 100 * v)) for v in (0.0, 0.001, 0.01) for s in range(3)])
    (d / ".fa_lam0_seed9.json.x1y2.tmp").write_text("{half")  # what a kill -9 can leave: ignored
    text = write_report(d)
    md = (d / "summary.md").read_text()
    assert md == text and "(the paper's Table 3)" in md
    assert "| λ | runs | Final acc | Best acc† | Val-chosen acc |" in md
    assert "| 0 | 3 | 0.9550 ± 0.0050 |" in md and "not computed" in md
    # identical accuracies on every seed: a note, never a p-value
    assert md.count("| n/a (identical values on every pair) |") == 2
    assert "| n/a: identical values on every pair |" in md
    assert "0.5556" in md  # the paper's column
    rows = list(csv.DictReader((d / "summary.csv").open()))
    assert [r["value"] for r in rows] == ["0.0", "0.001", "0.01"] and rows[0]["runs"] == "3"
    assert float(rows[2]["measured_sq_trace_per_B_mean"]) == pytest.approx(5.0)
    pngs = sorted(p.name for p in d.glob("*.png"))
    assert pngs == ["fa_accuracy.png", "fa_curves.png", "fa_flatness.png"]
    assert all((d / p).read_bytes()[:4] == b"\x89PNG" for p in pngs)


def test_report_cli_on_a_parent_directory_and_errors(tmp_path, capsys):
    _write(tmp_path / "runs" / BC, [_record(0.0, s, 0.95) for s in range(2)])
    assert main(["report", str(tmp_path / "runs"), "--no-plots"]) == 0
    assert "## breast-cancer-mlp" in capsys.readouterr().out
    assert (tmp_path / "runs" / BC / "summary.md").is_file()
    (tmp_path / "empty").mkdir()
    for target in ("empty", "missing"):
        assert main(["report", str(tmp_path / target)]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("flatness: error:")


def test_flatness_compared_on_log10_with_holm():
    flats = {0.0: [4.0, 5.0, 6.0, 5.5], 0.1: [2.0, 2.4, 3.1, 2.9], 1.0: [40.0, 61.0, 55.0, 70.0]}
    records = [_record(v, s, 0.9, flat=f) for v, row in flats.items() for s, f in enumerate(row)]
    (g,) = summarize(records)
    cs = [row.flatness_vs_baseline for row in g.rows[1:]]
    base = np.log10(flats[0.0])
    diffs = [np.log10(flats[v]) - base for v in (0.1, 1.0)]
    assert [c.difference for c in cs] == pytest.approx([d.mean() for d in diffs])
    raw = [stats.ttest_rel(np.log10(flats[v]), base).pvalue for v in (0.1, 1.0)]
    assert [c.p_t_holm for c in cs] == pytest.approx(holm(raw))
    md = markdown([g])
    assert "Final Tr(H²)/B (measured), log10, against λ = 0:" in md
    assert f"| 1 | 4 pairs | {cs[1].difference:+.2f} [" in md


def test_protocol_line_names_the_optimizer_and_the_subset():
    from flatness.experiments.reporting.tables import protocol_line

    resnet = get_task("cifar100-resnet").config.as_dict()
    line = protocol_line(resnet)
    assert "SGD (momentum 0.9) lr 0.1" in line and "training subset of 10,000 samples" in line
    assert "Adam lr 0.001" in protocol_line(get_task(BC).config.as_dict())
    assert "AdamW lr 0.001" in protocol_line(get_task("cifar100-vit").config.as_dict())


def test_variants_and_compositions_against_their_reference():
    """A λ controller's runs against fixed λ at the same λ; sam+fa against sam at the same ρ;
    paired by seed, Holm over all reference comparisons of the report, cost as the ratio of
    median training seconds.
    """
    fixed = {1.0: [0.10, 0.12, 0.09, 0.11], 0.1: [0.25, 0.26, 0.25, 0.27]}
    ratio = {1.0: [0.24, 0.25, 0.26, 0.24], 0.1: [0.26, 0.26, 0.27, 0.27]}
    records = [_record(v, s, a) for v, row in fixed.items() for s, a in enumerate(row)]
    for v, row in ratio.items():
        for s, a in enumerate(row):
            r = _record(v, s, a)
            records.append(dataclasses.replace(
                r, name=r.name + "_kabc", variant_id="abc", train_seconds=2 * r.train_seconds,
                method_kwargs={**r.method_kwargs, "lam_control": "ratio:0.1"}))
    sam = [0.30, 0.31, 0.30, 0.32]
    records += [_record(0.05, s, a, method="sam", hparam="rho") for s, a in enumerate(sam)]
    both = [0.31, 0.30, 0.33, 0.33]
    for s, a in enumerate(both):
        r = _record(0.05, s, a, method="sam+fa", hparam="rho")
        records.append(dataclasses.replace(r, variant_id="def", method_kwargs={"lam": 0.01}))
    groups = {(g.method, g.variant_id): g for g in summarize(records)}
    assert groups[("fa", "")].reference == "" and not groups[("fa", "")].reference_comparisons()
    g = groups[("fa", "abc")]
    assert g.reference.startswith("`fa`")
    cs = [c for _, c in g.reference_comparisons()]
    raw = [stats.ttest_rel(ratio[v], fixed[v]).pvalue for v in (0.1, 1.0)]
    raw.append(stats.ttest_rel([0.31, 0.30, 0.33, 0.33], [0.30, 0.31, 0.30, 0.32]).pvalue)  # sam+fa vs sam
    assert [c.p_t for c in cs] == pytest.approx(raw[:2])
    assert [c.p_t_holm for c in cs] == pytest.approx(holm(raw)[:2])  # one family: all three
    assert cs[1].difference == pytest.approx(np.mean(np.subtract(ratio[1.0], fixed[1.0])))
    md = markdown(list(groups.values()))
    assert "### Against `fa`, default settings" not in md  # the fixed group is the reference
    assert "0.1: ×2.00; 1: ×2.00" in md  # median training seconds, twice the reference's
    g = groups[("sam+fa", "def")]
    (c,) = [c for _, c in g.reference_comparisons()]
    assert g.reference.startswith("`sam`") and c.p_t == pytest.approx(stats.ttest_rel(both, sam).pvalue)
    assert c.n_pairs == 4 and "### Against `sam`" in md and c.p_t_holm == pytest.approx(holm(raw)[2])
    assert "over the 3 comparisons of variants with their references in this report" in md


def test_a_detectably_sharper_strength_gets_its_one_line_reason():
    flat = {0.0: [1.0, 1.2, 0.9, 1.1, 1.0], 1.0: [100.0, 150.0, 80.0, 120.0, 90.0]}
    records = []
    for v, row in flat.items():
        for s, f in enumerate(row):
            r = _record(v, s, 0.95, flat=f)
            records.append(dataclasses.replace(r, final_train_loss=0.02 if v else 0.0004))
    (g,) = summarize(records)
    why = [line for line in markdown([g]).splitlines() if line.startswith("Why Tr(H²)/B can rise")]
    assert len(why) == 1 and "0.02 against 0.0004" in why[0]
    # the same curvatures without the loss gap: a rise the training loss does not explain
    same_loss = [dataclasses.replace(r, final_train_loss=0.0004) for r in records]
    (why,) = [line for line in markdown(summarize(same_loss)).splitlines() if line.startswith("Why")]
    assert "not explained by the training loss" in why
    # no rise, no line
    (g,) = summarize([r for r in records if r.value == 0.0] + [
        dataclasses.replace(r, measured_sq_trace_per_B=r.measured_sq_trace_per_B / 100)
        for r in records if r.value == 1.0])
    assert "Why Tr(H²)/B" not in markdown([g])


def test_runs_of_another_model_setting_form_their_own_group():
    records = [_record(None, s, 0.9, method="none", hparam=None) for s in range(3)]
    records += [dataclasses.replace(r, name=r.name + "_mabc", model_kwargs={"weight_scale": 1.0},
                                    final_test_acc=0.8) for r in records]
    groups = summarize(records)
    assert len(groups) == 2
    other = next(g for g in groups if g.model_id)
    assert other.rows[0].stats["final_test_acc"][0] == pytest.approx(0.8)
    assert "model weight_scale=1.0" in markdown(groups) and other.slug.startswith("none_m")


def test_a_report_that_mixes_platforms_says_so_and_runs_record_their_cpu():
    from flatness.experiments.running.platforms import environment, platform_note

    env = environment("cpu")
    assert env["device"] == "cpu" and isinstance(env["cpu"], str) and env["torch"]
    here = {"torch": "2.13.0+cpu", "cpu": "AMD EPYC"}
    runs = [dataclasses.replace(_record(v, s, 0.9), environment=dict(here)) for v in (0.0, 0.1) for s in range(3)]
    assert platform_note(runs) == ""
    assert "Mixed platforms" not in markdown(summarize(runs))
    runs[0].environment = {"torch": "2.13.0+cpu", "cpu": "Intel Xeon"}
    runs[1].environment = {}  # a record written before the CPU was recorded
    note = platform_note(runs)
    assert "3 platforms" in note and "AMD EPYC, torch 2.13.0+cpu: 4 runs" in note
    assert "CPU not recorded, torch version not recorded: 1 run" in note
    assert note in markdown(summarize(runs))
    runs[0].environment = dict(here)  # now one named platform and one run that names none
    note = platform_note(runs)
    assert note.startswith("**Platform partly unrecorded.** 1 of 6 runs") and "ran on AMD EPYC" in note
    runs[1].environment = {"torch": "2.12.0+cpu"}  # ... but another torch build: mixed after all
    assert platform_note(runs).startswith("**Mixed platforms.** These runs come from 2 platforms")
    assert platform_note([dataclasses.replace(r, environment={}) for r in runs]) == ""


def test_cpus_behind_one_generic_name_are_told_apart_by_family_and_model():
    # VMs report "AMD EPYC" for different generations, whose numerics differ (seen: a seed's
    # ResNet-20 run ended 0.014 apart on two of them)
    from flatness.experiments.running.platforms import cpu_from_cpuinfo, platform_note

    def cpuinfo(family, model):
        block = (f"processor\t: {{}}\nvendor_id\t: AuthenticAMD\ncpu family\t: {family}\n"
                 f"model\t\t: {model}\nmodel name\t: AMD EPYC\n")
        return "\n".join(block.format(i) for i in range(2))

    zen4, zen5 = cpu_from_cpuinfo(cpuinfo(25, 17)), cpu_from_cpuinfo(cpuinfo(26, 2))
    assert (zen4, zen5) == ("AMD EPYC (family 25, model 17)", "AMD EPYC (family 26, model 2)")
    assert cpu_from_cpuinfo("processor : 0\nmodel name : Some CPU\n") == "Some CPU"
    assert cpu_from_cpuinfo("") == ""
    runs = [dataclasses.replace(_record(None, s, 0.9, method="none", hparam=None),
                                environment={"torch": "2.13.0+cpu", "cpu": cpu}) for s, cpu in enumerate((zen4, zen5))]
    assert platform_note(runs).startswith("**Mixed platforms.** These runs come from 2 platforms")
