"""``flatness bench gpu``: the dry run (CPU, tiny sizes) runs every case and writes a complete
JSON; a corrupted case fails the command after the JSON is written; a short budget skips timing,
not correctness; without CUDA and without ``--dry-run`` it is one error line. No timing
assertions (the figures are checked by running the command on a GPU).
"""

import json

import pytest
import torch

from flatness.cli import main
from flatness.experiments.running.bench.gpu import BACKENDS, UPDATE_METHODS, default_out
from flatness.experiments.running.bench.gpu_checks import PRECISIONS, TOLERANCES, relative_error, tf32
from flatness.experiments.running.bench.gpu_timing import TIMED_CASES


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu") / "dry.json"
    code = main(["bench", "gpu", "--dry-run", "--out", str(out)])
    return code, json.loads(out.read_text())


def test_dry_run_checks_every_backend_method_and_measure(dry_run):
    code, result = dry_run
    assert code == 0 and result["ok"] is True and result["dry_run"] is True and result["complete"] is True
    ids = {case["id"] for case in result["correctness"]["cases"]}
    expected = {
        f"penalty:{model}:{backend}:{p}"
        for model, backends in BACKENDS.items() for backend in backends for p in PRECISIONS
    }
    expected |= {
        f"update:{model}:{method}:{p}" for model in ("mlp", "resnet20") for method in UPDATE_METHODS for p in PRECISIONS
    }
    expected |= {f"measure:small:{name}:{p}" for name in ("lambda_max", "trace") for p in PRECISIONS}
    assert ids == expected
    for case in result["correctness"]["cases"]:
        assert case["passed"] is True and "error" not in case, case["id"]
        errors = [k for k in case if k.endswith("_rel_err") and not k.startswith("cpu_")]
        assert errors and all(0 <= case[k] <= case[k[: -len("_rel_err")] + "_rtol"] for k in errors), case["id"]
    tolerances = result["correctness"]["tolerances"]
    assert set(TOLERANCES) <= set(tolerances) and "finite-difference" in tolerances
    fd = next(c for c in result["correctness"]["cases"] if c["id"] == "penalty:resnet20:finite-difference:fp32")
    assert fd["cpu_float32_grad_rel_err"] > 0  # its tolerance is calibrated on the CPU's float32 error


def test_dry_run_records_device_protocol_and_every_timing_block(dry_run):
    _, result = dry_run
    for key in ("name", "driver", "torch", "cuda", "cudnn", "tf32_defaults"):
        assert key in result["device"], key
    assert result["environment"]["flatness"] and len(result["source_sha256"]) == 64
    epoch = result["protocol_epoch"]
    assert epoch["data"].startswith("synthetic") and epoch["protocol_epochs"] == 200
    for method in ("none", "fa", "sam"):
        entry = epoch[method]
        assert entry["status"] == "timed" and entry["projected_hours"] > entry["projected_train_hours"] > 0, method
    fa_kwargs = epoch["fa"]["method_kwargs"]
    assert fa_kwargs["backend"] == "finite-difference" and fa_kwargs["every"] == 10
    blocks = result["timing"]
    assert set(blocks) == {f"{m}_{p}" for m in ("mlp", "resnet18", "vit_tiny") for p in ("float32", "bf16")}
    for key, block in blocks.items():
        assert block["status"] == "timed" and block["plain_ms"] > 0, key
        for case in block["cases"]:
            if case == "plain":
                continue
            # under bf16 autocast a backend may refuse; then the error is recorded, never dropped
            assert block.get(f"{case}_ratio", 0) > 0 or case in block.get("errors", {}), (key, case)
        if key.endswith("float32"):
            assert not block.get("errors"), key
    assert "fa_kfac_k1_ratio" in blocks["mlp_float32"] and "fa_kfac_k1" not in blocks["resnet18_float32"]["cases"]
    assert set(blocks["mlp_float32"]["cases"]) == set(TIMED_CASES)


def test_corrupted_case_fails_after_writing_json_and_short_budget_skips_timing(tmp_path, capsys):
    out = tmp_path / "fault.json"
    code = main(["bench", "gpu", "--dry-run", "--out", str(out), "--budget-s", "0.5",
                 "--inject-fault", "penalty:mlp:autograd:fp32"])
    assert code == 1
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "correctness" in err
    result = json.loads(out.read_text())
    assert result["ok"] is False
    assert result["correctness"]["failures"] == ["penalty:mlp:autograd:fp32"]
    case = next(c for c in result["correctness"]["cases"] if c["id"] == "penalty:mlp:autograd:fp32")
    assert case["fault_injected"] and case["grad_rel_err"] > case["grad_rtol"]
    # correctness ran in full; every timing case after it was skipped, and says why
    assert len(result["correctness"]["cases"]) > 30
    assert all(b["status"] == "skipped" and "budget" in b["reason"] for b in result["timing"].values())
    assert all(result["protocol_epoch"][m]["status"] == "skipped" for m in ("none", "fa", "sam"))


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_without_cuda_and_without_dry_run_one_error_line(tmp_path, capsys):
    out = tmp_path / "none.json"
    assert main(["bench", "gpu", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("flatness: error:") and "CUDA" in err and len(err.strip().splitlines()) == 1
    assert not out.exists()


def test_help_says_what_it_checks_and_how_long(capsys):
    with pytest.raises(SystemExit):
        main(["bench", "gpu", "--help"])
    text = capsys.readouterr().out
    for words in ("8 minutes", "float64", "TF32", "bf16", "--dry-run", "--budget-s", "exits"):
        assert words in text, words


def test_relative_error_and_tf32_switch():
    assert relative_error(1.0 + 1e-3, 1.0) == pytest.approx(1e-3)
    assert relative_error(torch.tensor([float("nan"), 1.0]), torch.ones(2)) == float("inf")
    before = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    with tf32(True):
        assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32
        with tf32(False):
            assert not (torch.backends.cuda.matmul.allow_tf32 or torch.backends.cudnn.allow_tf32)
    assert (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32) == before
    assert default_out(torch.device("cpu"), True).name.endswith("-cpu-dryrun.json")


def test_full_run_models_build_and_take_their_batches():
    """The GPU run's own models (the dry run uses stand-ins): each builds and maps a batch of
    its inputs to 100 logits, so a wrong builder cannot first show on a lent GPU.
    """
    from flatness.experiments.running.bench.gpu import FULL

    builders = {**FULL.check_models, **{f"update-{k}": b for k, b in FULL.update_models.items()},
                "measure": FULL.measure_model, **{k: b for k, (b, _, _) in FULL.timing_models.items()}}
    with torch.no_grad():
        for name, build in builders.items():
            features = FULL.check_features.get(name.removeprefix("update-"), FULL.timing_features)
            assert build().eval()(torch.randn(2, features)).shape == (2, FULL.classes), name
    assert FULL.check_features == {"mlp": 3072, "resnet20": 3072, "vit": 3072, "measure": 3072}
