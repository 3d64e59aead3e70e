"""``flatness measure`` and ``flatness landscape`` on breast-cancer checkpoints (bundled data)."""

import json

import numpy as np
import pytest
import torch

from flatness.cli import main
from flatness.experiments.running.checkpoints import save_checkpoint
from flatness.experiments.world.data import iterate_batches
from flatness.experiments.world.tasks import get_task

TASK = "breast-cancer-mlp"
FAST = ["--examples", "64", "--threads", "1"]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A tiny run laid out like the runner's: checkpoints/NAME.pt and trajectories/NAME.pt."""
    root = tmp_path_factory.mktemp("run")
    task = get_task(TASK)
    splits = task.load()
    torch.manual_seed(0)
    model = task.build_model()
    save_checkpoint(root / "init.pt", model, task=TASK, meta={"step": 0})
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    states = []
    for _ in range(3):
        for x, y in list(iterate_batches(splits.x_train, splits.y_train, 64, shuffle=False))[:3]:
            opt.zero_grad()
            task.loss_fn(model(x), y).backward()
            opt.step()
        states.append({k: v.clone() for k, v in model.state_dict().items()})
    (root / "checkpoints").mkdir()
    (root / "trajectories").mkdir()
    save_checkpoint(root / "checkpoints" / "fa_seed0.pt", model, task=TASK, meta={"step": 9})
    torch.save({"format": "flatness-trajectory", "task": TASK, "name": "fa_seed0",
                "steps": [3, 6, 9], "state_dicts": states}, root / "trajectories" / "fa_seed0.pt")
    return root


def _run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_measure_prints_one_json_object(run_dir, capsys, tmp_path):
    ckpt = run_dir / "checkpoints" / "fa_seed0.pt"
    code, out, err = _run(
        capsys, "measure", ckpt, "--task", TASK, *FAST, "--json", "--matvecs", "6", "--k", "2",
        "--sharpness-steps", "2", "--measures", "loss,lambda_max", "hessian_trace",
        "last_layer_lambda_max", "eps_sharpness", "fisher_trace", "hessian_sq_trace",
        "--out", tmp_path / "m.json",
    )
    assert code == 0, err
    result = json.loads(out)
    assert result == json.loads((tmp_path / "m.json").read_text())
    for key in ("loss", "lambda_max", "hessian_trace", "hessian_sq_trace", "eps_sharpness",
                "fisher_trace", "last_layer_lambda_max"):
        assert np.isfinite(result[key]), key
    assert result["examples"] == 64 and len(result["top_eigenvalues"]) == 2
    # Cauchy interlacing: a diagonal block's λ_max cannot exceed the full Hessian's
    assert result["last_layer_lambda_max"] <= result["lambda_max"] * (1 + 1e-3)
    assert result["function"] == "deployed"
    # this MLP has no BatchNorm: the function training differentiated (dropout off) is the same
    code, out, err = _run(capsys, "measure", ckpt, "--task", TASK, *FAST, "--json", "--measures", "loss",
                          "--function", "batch_stats")
    assert code == 0, err
    other = json.loads(out)
    assert other["function"] == "batch_stats" and other["loss"] == pytest.approx(result["loss"], rel=1e-6)


def test_measure_text_output_and_extra_measures(run_dir, capsys, tmp_path):
    ckpt = run_dir / "checkpoints" / "fa_seed0.pt"
    code, out, err = _run(
        capsys, "measure", ckpt, "--task", TASK, *FAST, "--measures", "noise_loss",
        "model_divergence", "spectral_density", "--noise-samples", "3", "--density-steps", "4",
        "--plot-dir", tmp_path,
    )
    assert code == 0, err
    assert "noise_loss_ci" in out and "model_divergence" in out
    assert (tmp_path / "fa_seed0_density.png").read_bytes()[:4] == b"\x89PNG"
    assert np.load(tmp_path / "fa_seed0_density.npz")["density"].ndim == 1


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--task", "cifar100-mlp"], "checkpoint of task 'breast-cancer-mlp', not 'cifar100-mlp'"),
        (["--task", "nope"], "unknown task"),
        (["--task", TASK, "--measures", "lambda_max", "--k", "10000000"],
         "larger than the number of parameters"),
        (["--task", TASK, "--measures", "sharpest"], "unknown measure"),
        (["--task", TASK, "--measures", "spectral_density"], "--plot-dir"),
        (["--task", TASK, "--examples", "0"], "--examples must be >= 1"),
        (["--task", TASK, "--eps", "-1"], "--eps must be"),
    ],
)
def test_measure_bad_input_is_one_error_line(run_dir, capsys, argv, message):
    code, out, err = _run(capsys, "measure", run_dir / "checkpoints" / "fa_seed0.pt", *FAST, *argv)
    assert code == 2
    assert err.count("\n") == 1 and err.startswith("flatness: error:") and message in err
    assert "Traceback" not in err and out == ""


def test_unreadable_or_unfitting_checkpoints(run_dir, capsys, tmp_path):
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    code, _, err = _run(capsys, "measure", tmp_path / "junk.pt", "--task", TASK)
    assert code == 2 and "not a readable" in err
    code, _, err = _run(capsys, "measure", tmp_path / "missing.pt", "--task", TASK)
    assert code == 2 and "does not exist" in err
    wrong = torch.nn.Sequential(torch.nn.Linear(30, 8), torch.nn.ReLU(), torch.nn.Linear(8, 1))
    torch.save({"format": "flatness-checkpoint", "version": 1, "task": TASK, "num_features": 30,
                "state_dict": wrong.state_dict(), "meta": {}}, tmp_path / "wrong.pt")
    code, _, err = _run(capsys, "landscape", tmp_path / "wrong.pt", "--task", TASK, "--kind", "1d",
                        "--out", tmp_path)
    assert code == 2 and "does not fit" in err and "Traceback" not in err


def test_landscape_kinds_write_npz_and_png(run_dir, capsys, tmp_path):
    ckpt = run_dir / "checkpoints" / "fa_seed0.pt"
    runs = {
        "1d": ["--num", "3"],
        "2d": ["--num", "3"],
        "interp": ["--num", "3", "--other", ckpt, "--interp-range", "0", "1"],
        "pca": ["--num", "3"],  # finds trajectories/fa_seed0.pt next to checkpoints/
    }
    for kind, extra in runs.items():
        first = run_dir / "init.pt" if kind == "interp" else ckpt
        code, out, err = _run(capsys, "landscape", first, "--task", TASK, "--kind", kind,
                              "--out", tmp_path, "--json", *FAST, *extra)
        assert code == 0, err
        result = json.loads(out)
        npz = np.load(result["npz"])
        assert npz["loss"].size == result["points"] == (3 if kind in ("1d", "interp") else 9)
        assert np.all(np.isfinite(npz["loss"])) and result["nonfinite_points"] == 0
        assert open(result["png"], "rb").read(4) == b"\x89PNG"
    assert json.loads(out)["num_checkpoints"] == 3
    # interpolation from init (t = 0) to the trained model (t = 1): the ends are their losses
    interp = np.load(tmp_path / "init_to_fa_seed0_interp.npz")
    assert interp["xs"].tolist() == [0.0, 0.5, 1.0]
    for t, path in [(0, run_dir / "init.pt"), (2, ckpt)]:
        code, out, _ = _run(capsys, "measure", path, "--task", TASK, *FAST, "--json", "--measures", "loss")
        assert interp["loss"][t] == pytest.approx(json.loads(out)["loss"], rel=1e-5)


def test_landscape_bad_input(run_dir, capsys, tmp_path):
    ckpt = run_dir / "checkpoints" / "fa_seed0.pt"
    cases = [
        (["--kind", "interp"], "needs --other"),
        (["--kind", "1d", "--other", ckpt], "only used with --kind interp"),
        (["--kind", "2d", "--trajectory", ckpt], "only used with --kind pca"),
        (["--kind", "pca", "--trajectory", ckpt], "not a flatness trajectory"),
        (["--kind", "1d", "--num", "1"], "--num must be >= 2"),
    ]
    for argv, message in cases:
        code, out, err = _run(capsys, "landscape", ckpt, "--task", TASK, "--out", tmp_path, *argv, *FAST)
        assert code == 2 and message in err and err.count("\n") == 1, (argv, err)
    lonely = tmp_path / "lonely.pt"
    lonely.write_bytes(ckpt.read_bytes())
    code, _, err = _run(capsys, "landscape", lonely, "--task", TASK, "--kind", "pca", "--out", tmp_path, *FAST)
    assert code == 2 and "--trajectory FILE" in err


def test_landscape_non_finite_points_are_warnings_not_errors(run_dir, capsys, tmp_path):
    """Weights so large that far grid points overflow float32: marked, warned, picture drawn."""
    task = get_task(TASK)
    torch.manual_seed(1)
    model = task.build_model()
    with torch.no_grad():
        for module in model:
            if isinstance(module, torch.nn.Linear):
                module.weight.mul_(1e12)  # logits ~1e35: finite at θ, inf further out
    save_checkpoint(tmp_path / "huge.pt", model, task=TASK, meta={})
    code, out, err = _run(capsys, "landscape", tmp_path / "huge.pt", "--task", TASK, "--kind", "1d",
                          "--num", "9", "--span", "100", "--out", tmp_path, "--json", *FAST)
    assert code == 0, err
    result = json.loads(out)
    assert 0 < result["nonfinite_points"] < 9
    assert "flatness: warning: the loss is not finite at" in err and "Traceback" not in err
    assert np.isnan(np.load(result["npz"])["loss"]).sum() == result["nonfinite_points"]


def test_bench_measures_quick_smoke(capsys):
    code, out, err = _run(capsys, "bench", "measures", "--quick", "--examples", "50", "--grid", "3",
                          "--matvecs", "5", "--train-steps", "2", "--threads", "1", "--json")
    assert code == 0, err
    result = json.loads(out)
    assert result["hessian_trace_matvecs"] == 5 and result["surface_grid"] == "3x3"
    assert np.isfinite(result["lambda_max"]) and result["lambda_max_matvecs"] > 0
    assert isinstance(result["eig_plus_trace_pass"], bool) and "data" in result
