"""Task plugins: ``custom_task``, the three ways to name a task (FILE.py:FACTORY,
package.module:FACTORY, entry point ``flatness.tasks``), every command on the digits example and on
a second user task of its own, what the records store, resume on a changed plugin, bad plugins.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
import textwrap
from pathlib import Path

import pytest
import torch

import flatness.experiments as fx
from flatness.cli import main
from flatness.experiments.running import study_population
from flatness.experiments.running.record import load_records
from flatness.experiments.running.specs import build_grid, resolved_settings
from flatness.experiments.world import plugins
from flatness.experiments.world.custom import TaskDefinitionError
from flatness.experiments.world.tasks import PLUGIN_TASKS, TrainConfig

ROOT = Path(__file__).resolve().parents[1]
DIGITS = ROOT / "examples" / "digits_task.py"

# The issue's file, verbatim: examples/digits_task.py must stay exactly this.
ISSUE_DIGITS = '''# digits_task.py
import torch
from sklearn.datasets import load_digits
import flatness.experiments as fx

class SmallCNN(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(1, 8, 3, padding=1)
        self.bn = torch.nn.BatchNorm2d(8)
        self.head = torch.nn.Linear(8 * 8 * 8, 10)

    def forward(self, x):
        return self.head(torch.relu(self.bn(self.conv(x))).flatten(1))

def make_task():
    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(d.target)
    return fx.custom_task(
        name="digits-cnn",
        model=SmallCNN,                          # called under each run's seed
        train=(x[:1400], y[:1400]),              # a fixed validation split is carved from it
        test=(x[1400:], y[1400:]),
        loss=torch.nn.functional.cross_entropy,  # any callable(output, target) -> scalar
        config=fx.TrainConfig(epochs=3, batch_size=64, lr=1e-3, weight_decay=0.0),
    )
'''

# A second user's task: its own model (an MLP with a width setting), its own data (sklearn's
# diabetes as a torch Dataset), regression with an MSE loss, a second named protocol.
DIABETES = '''
import torch
from sklearn.datasets import load_diabetes
import flatness.experiments as fx


class Rows(torch.utils.data.Dataset):
    def __init__(self, x, y):
        self.x, self.y = x, y

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        return self.x[i], self.y[i]


def mlp(width=16):
    return torch.nn.Sequential(torch.nn.Linear(10, width), torch.nn.Tanh(), torch.nn.Linear(width, 1))


def make_task():
    d = load_diabetes()
    x = torch.tensor(d.data, dtype=torch.float32)
    x = (x - x.mean(0)) / x.std(0)
    y = torch.tensor(d.target, dtype=torch.float32).unsqueeze(1)
    y = (y - y.mean()) / y.std()
    return fx.custom_task(
        name="diabetes-mlp",
        model=mlp,
        model_kwargs={"width": 16},
        train=Rows(x[:350], y[:350]),
        test=Rows(x[350:], y[350:]),
        loss=torch.nn.functional.mse_loss,
        config=fx.TrainConfig(epochs=2, batch_size=32, lr=3e-3, weight_decay=0.0),
        protocols={"long": fx.TrainConfig(epochs=20, batch_size=32, lr=1e-3, weight_decay=1e-4)},
        description="Diabetes progression, MLP 10-16-1, MSE",
    )
'''


@pytest.fixture(autouse=True)
def fresh_plugins(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each test starts like a fresh process: no plugin task loaded."""
    monkeypatch.setattr(plugins, "_LOADED", {})
    saved = dict(PLUGIN_TASKS)
    PLUGIN_TASKS.clear()
    yield
    PLUGIN_TASKS.clear()
    PLUGIN_TASKS.update(saved)


def _forget_plugins() -> None:
    PLUGIN_TASKS.clear()
    plugins._LOADED.clear()


def cli(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    code = main(argv)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_the_digits_example_is_the_issue_file_unchanged() -> None:
    assert DIGITS.read_text() == ISSUE_DIGITS


@pytest.mark.slow
def test_digits_plugin_through_every_command(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    shutil.copy(DIGITS, tmp_path / "digits_task.py")  # a copy, so the test can take it away
    ref, out = "digits_task.py:make_task", tmp_path / "runs"
    run = ["run", ref, "--lambdas", "0", "0.01", "--seeds", "2", "--epochs", "1", "--out", str(out),
           "--quiet", "--no-plots"]
    code, printed, err = cli(run, capsys)
    assert code == 0, err
    directory = out / "digits-cnn"
    records = load_records(directory)
    assert len(records) == 4 and all(r.complete and r.task == "digits-cnn" for r in records)
    assert "| λ | runs | Final acc" in printed and "Task plugin `digits_task.py:make_task`" in printed
    r = records[0]
    assert r.task_source["reference"] == ref and r.task_source["kind"] == "file"
    assert r.task_source["file"] == str((tmp_path / "digits_task.py").resolve())
    assert r.task_source["sha256"] == _sha(DIGITS) and r.task_source["metric"] == "accuracy"
    assert set(r.resolved["config"]) == {f.name for f in dataclasses.fields(TrainConfig)}
    assert r.resolved["config"]["epochs"] == 1 and r.resolved["config"]["batch_size"] == 64
    assert r.resolved["method_kwargs"]["probes"] == 5 and r.resolved["method_kwargs"]["seed"] == r.seed
    assert r.resolved["method_kwargs"]["lam"] == r.value and r.resolved["model_kwargs"] == {}
    assert 0.3 < r.final_test_acc <= 1 and r.val_samples == 140 and r.train_samples == 1260
    stamps = {x.name: x.finished_at for x in records}

    _forget_plugins()  # resume, as a new process would: nothing is trained again
    code, _, err = cli(run, capsys)
    assert code == 0 and "4 of 4 runs already finished" in err
    assert {x.name: x.finished_at for x in load_records(directory)} == stamps

    ckpt = directory / "checkpoints" / f"{records[0].name}.pt"
    code, printed, err = cli(["measure", str(ckpt), "--task", ref, "--measures", "hessian_trace", "param_norm",
                              "--matvecs", "3", "--examples", "64", "--json"], capsys)
    assert code == 0, err
    measured = json.loads(printed)
    assert measured["task"] == "digits-cnn" and measured["hessian_trace"] > 0 and measured["examples"] == 64
    code, printed, err = cli(["landscape", str(ckpt), "--task", ref, "--kind", "1d", "--num", "3",
                              "--examples", "64", "--out", str(tmp_path / "pictures"), "--json"], capsys)
    assert code == 0 and json.loads(printed)["points"] == 3, err
    other = directory / "checkpoints" / f"{records[1].name}.pt"
    code, printed, err = cli(["connect", str(ckpt), str(other), "--task", ref, "--num", "3", "--curve-steps", "0",
                              "--examples", "64", "--stat-examples", "64", "--out", str(tmp_path / "pictures"),
                              "--json"], capsys)
    assert code == 0, err

    code, printed, err = cli(["compare", ref, "--methods", "sam", "--grid", "sam=0.05", "--seeds", "2",
                              "--epochs", "1", "--out", str(out), "--quiet", "--no-plots", "--no-measures"], capsys)
    assert code == 0, err
    assert "`sam`" in printed and (directory / "compare" / "summary.md").is_file()
    assert "SmallCNN on 1400 training" in printed  # the plugin task's description

    # A report reads the task from the records: no plugin file needed, unless --measures
    (tmp_path / "digits_task.py").unlink()
    _forget_plugins()
    code, printed, err = cli(["report", str(directory), "--no-plots"], capsys)
    assert code == 0, err
    assert "## digits-cnn — method `fa`" in printed and "## digits-cnn — method `sam`" in printed
    code, _, err = cli(["report", str(directory), "--no-plots", "--measures"], capsys)
    assert code == 2 and err.count("\n") == 1 and "no longer exists" in err and "digits_task.py" in err


@pytest.mark.slow
def test_study_on_a_plugin_task_varies_what_applies(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    # CI size: one epoch and three cheap measures (the full `--grid small` is run by hand, README of
    # docs/own-task.md); the population, the records and the ranking are those of the real command.
    monkeypatch.setattr(study_population, "STUDY_MEASURES", ("hessian_trace", "param_norm", "distance_from_init"))
    generic = study_population.generic_grid
    monkeypatch.setattr(study_population, "generic_grid",
                        lambda task, name: dataclasses.replace(generic(task, name), protocol={"epochs": 1}))
    ref = f"{DIGITS}:make_task"
    code, listed, err = cli(["study", ref, "--grid", "small", "--list"], capsys)
    assert code == 0, err
    lines = listed.strip().splitlines()
    assert len(lines) == 16 and all("width=as defined" in line and "dropout=as defined" in line for line in lines)
    assert {line.split("lr=")[1].split()[0] for line in lines} == {str(1e-3 / 3), "0.001"}
    code, printed, err = cli(["study", ref, "--grid", "small", "--out", str(tmp_path), "--quiet", "--no-plots",
                              "--resamples", "200"], capsys)
    assert code == 0, err
    ranking = json.loads((tmp_path / "digits-cnn" / "study" / "small" / "ranking.json").read_text())
    assert ranking["axes"] == ["lr", "weight_decay", "method"]
    assert {m["measure"] for m in ranking["measures"]} >= {"hessian_trace", "param_norm", "distance_from_init"}
    assert "Fixed:" in printed and "width = as defined" in printed


@pytest.mark.slow
@pytest.mark.filterwarnings("error:Using a target size:UserWarning")  # no class labels fed to its MSE
def test_a_second_users_task_file_runs_through_the_same_commands(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "diabetes_task.py").write_text(DIABETES)
    ref, out = "diabetes_task.py:make_task", tmp_path / "runs"
    code, listed, err = cli(["tasks", ref], capsys)
    assert code == 0, err
    assert "breast-cancer-mlp" in listed and "file diabetes_task.py:make_task  [protocols: default, long]" in listed
    # two worker processes: each loads the plugin again from the source the parent resolved
    run = ["run", ref, "--lambdas", "0", "0.1", "--seeds", "2", "--model-arg", "width=8", "--jobs", "2",
           "--out", str(out), "--quiet", "--no-plots"]
    code, printed, err = cli(run, capsys)
    assert code == 0, err
    directory = out / "diabetes-mlp"
    records = load_records(directory)
    assert len(records) == 4 and all(r.complete for r in records)
    r = records[0]
    assert r.model_kwargs == {"width": 8} and r.resolved["model_kwargs"] == {"width": 8}
    assert r.task_source["metric"] == "neg_mse" and r.final_test_acc < 0  # the negative MSE
    assert r.final_test_acc == pytest.approx(-r.final_test_loss, rel=1e-5)  # MSE loss, MSE score
    assert r.final_test_ece is None and r.get("measured_kfac_sq_trace_per_B") is None  # class-score measures
    assert r.final_test_robustness["clean_acc"] == pytest.approx(r.final_test_acc, rel=1e-5)  # its score
    assert "hold its score `neg_mse`" in printed
    code, _, err = cli(["run", ref, "--method", "none", "--seeds", "1", "--protocol", "long", "--epochs", "1",
                        "--out", str(out), "--quiet", "--no-plots"], capsys)
    assert code == 0, err
    (long_run,) = [x for x in load_records(directory) if x.method == "none"]
    assert long_run.resolved["config"]["weight_decay"] == 1e-4 and long_run.resolved["config"]["epochs"] == 1
    assert long_run.protocol_id and long_run.name.endswith(f"_p{long_run.protocol_id}")

    code, printed, err = cli(["compare", ref, "--methods", "sam", "--grid", "sam=0.05", "--seeds", "2",
                              "--out", str(out), "--quiet", "--no-plots"], capsys)
    assert code == 0, err
    assert "`sam`" in printed
    ckpt = directory / "checkpoints" / f"{records[0].name}.pt"
    code, printed, err = cli(["measure", str(ckpt), "--task", ref, "--measures", "lambda_max", "--json"], capsys)
    assert code == 0 and json.loads(printed)["lambda_max"] > 0, err
    _forget_plugins()
    code, printed, err = cli(["report", str(directory), "--no-plots", "--measures"], capsys)
    assert code == 0 and "Diabetes progression" in printed, err
    code, printed, err = cli(["study", ref, "--grid", "small", "--out", str(tmp_path / "study"), "--quiet",
                              "--no-plots", "--resamples", "200"], capsys)
    assert code == 0, err
    ranking = json.loads((tmp_path / "study" / "diabetes-mlp" / "study" / "small" / "ranking.json").read_text())
    measured = {m["measure"] for m in ranking["measures"]}
    assert {"lambda_max", "hessian_trace", "fisher_trace"} <= measured
    assert not measured & {"inverse_margin_sq", "pacbayes_flatness"}  # class-score measures: not for regression

    # the plugin file changes: its old runs are not runs of the new code
    (tmp_path / "diabetes_task.py").write_text(DIABETES.replace("(x - x.mean(0))", "(x - x.median(0).values)"))
    _forget_plugins()
    before = {p.name: p.read_bytes() for p in directory.glob("*.json")}
    code, _, err = cli(run, capsys)
    assert code == 2 and err.count("\n") == 1 and "its code changed since" in err and "diabetes_task.py" in err
    assert {p.name: p.read_bytes() for p in directory.glob("*.json")} == before


ENTRY_MODULE = '''
import torch
import flatness.experiments as fx


def make_task():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(120, 4, generator=g)
    y = (x.sum(1) > 0).long()
    return fx.custom_task(name="ep-toy", model=lambda: torch.nn.Linear(4, 2), train=(x[:90], y[:90]),
                          test=(x[90:], y[90:]), loss=torch.nn.functional.cross_entropy,
                          config=fx.TrainConfig(epochs=1, batch_size=30, lr=1e-2, weight_decay=0.0))


def misnamed():
    return make_task()
'''


def _install(site: Path, entries: str) -> None:
    """A tiny installed distribution: a module and a .dist-info with entry_points.txt."""
    (site / "flatness_ep_demo.py").write_text(ENTRY_MODULE)
    info = site / "flatness_ep_demo-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: flatness-ep-demo\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(f"[flatness.tasks]\n{entries}\n")


def test_installed_entry_point_task(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                    monkeypatch: pytest.MonkeyPatch) -> None:
    site = tmp_path / "site"
    site.mkdir()
    _install(site, "ep-toy = flatness_ep_demo:make_task\nep-wrong = flatness_ep_demo:misnamed")
    monkeypatch.syspath_prepend(str(site))
    code, listed, _ = cli(["tasks"], capsys)
    assert code == 1  # one installed plugin is broken: listed with its reason
    assert "entry point flatness_ep_demo:make_task  [protocols: default]" in listed
    assert "ep-wrong" in listed and "an entry point's name must be its task's name" in listed
    out = tmp_path / "runs"
    code, _, err = cli(["run", "ep-toy", "--method", "none", "--seeds", "1", "--out", str(out), "--quiet",
                        "--no-plots"], capsys)
    assert code == 0, err
    (record,) = load_records(out / "ep-toy")
    source = record.task_source
    assert source["kind"] == "entry-point" and source["distribution"] == "flatness-ep-demo 0.1"
    assert source["module"] == "flatness_ep_demo" and source["sha256"] == _sha(site / "flatness_ep_demo.py")
    code, _, err = cli(["run", "ep-wrong", "--out", str(out)], capsys)
    assert code == 2 and "must be its task's name" in err


def _plugin(tmp_path: Path, body: str) -> str:
    path = tmp_path / "bad_task.py"
    path.write_text(textwrap.dedent(body))
    return f"{path}:make_task"


GOOD = """
import torch
import flatness.experiments as fx
g = torch.Generator().manual_seed(0)
X, Y = torch.randn(100, 4, generator=g), torch.randint(0, 3, (100,), generator=g)
CONFIG = fx.TrainConfig(epochs=1, batch_size=32, lr=1e-2, weight_decay=0.0)
def model():
    return torch.nn.Linear(4, 3)
def make(**changes):
    parts = dict(name="bad", model=model, train=(X[:80], Y[:80]), test=(X[80:], Y[80:]),
                 loss=torch.nn.functional.cross_entropy, config=CONFIG)
    parts.update(changes)
    return fx.custom_task(**parts)
"""

BAD_PLUGINS = {
    "syntax": ("def make_task(:\n", "importing it failed: SyntaxError: invalid syntax (bad_task.py, line 1)"),
    "import": ("import no_such_package_xyz\n",
               "ModuleNotFoundError: No module named 'no_such_package_xyz' (bad_task.py line 1)"),
    "no factory": (GOOD + "def make_tasks():\n    return make()\n",
                   "bad_task.py has no 'make_task' (it defines: make, make_tasks, model)"),
    "raises": (GOOD + "def make_task():\n    raise RuntimeError('no data here')\n",
               "make_task() raised RuntimeError: no data here (bad_task.py line 15)"),
    "wrong type": (GOOD + "def make_task():\n    return {'model': model}\n",
                   "make_task() returned dict, expected a task"),
    "model fails": (GOOD + "def make_task():\n    return make(model=lambda: torch.nn.Linear(5, 3))\n",
                    "the model fails on a batch of 32 training inputs of shape [32, 4]: RuntimeError"),
    "not a module": (GOOD + "def make_task():\n    return make(model=lambda: 3)\n",
                     "returned int, expected a torch.nn.Module"),
    "rows differ": (GOOD + "def make_task():\n    return make(train=(X[:80], Y[:79]))\n",
                    "train: x has 80 rows but y has shape [79]"),
    "not data": (GOOD + "def make_task():\n    return make(test=[1, 2, 3])\n",
                 "test must be an (x, y) pair of tensors or a torch.utils.data.Dataset, got list"),
    "input shapes": (GOOD + "def make_task():\n    return make(test=(X[80:, :3], Y[80:]))\n",
                     "test inputs have shape [20, 3], train inputs [80, 4]"),
    "loss not scalar": (GOOD + "def make_task():\n    return make(loss=lambda o, t: "
                        "torch.nn.functional.cross_entropy(o, t, reduction='none'))\n",
                        "the loss returned [32], expected a scalar"),
    "labels": (GOOD + "def make_task():\n    return make(train=(X[:80], Y[:80] + 5))\n",
               "the targets hold class id 7 but the model outputs 3 classes"),
    "builtin name": (GOOD + "def make_task():\n    return make(name='breast-cancer-mlp')\n", "is a built-in task's"),
}


@pytest.mark.parametrize("case", sorted(BAD_PLUGINS))
def test_a_bad_plugin_is_one_line_naming_it(case: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    body, expected = BAD_PLUGINS[case]
    ref = _plugin(tmp_path, body)
    out = tmp_path / "runs"
    code, _, err = cli(["run", ref, "--out", str(out)], capsys)
    assert code == 2 and err.startswith("flatness: error: task plugin ") and err.count("\n") == 1, err
    assert ref in err and expected in err, err
    assert not out.exists()  # nothing started


@pytest.mark.parametrize(
    "argv, expected",
    [
        (["run", "missing_dir/none.py:make_task"],
         "task plugin missing_dir/none.py:make_task: no file missing_dir/none.py"),
        (["compare", "no_such_module_xyz:make_task"], "no module named 'no_such_module_xyz'"),
        (["study", "tasks.py:"], "name it as FILE.py:FACTORY or package.module:FACTORY"),
        (["measure", "x.pt", "--task", "nope/t.py:f"], "no file nope/t.py"),
        (["landscape", "x.pt", "--task", "nope/t.py:f", "--kind", "1d", "--out", "o"], "no file nope/t.py"),
        (["report", "nowhere"], "no such results directory"),
        (["run", "mnist"], "unknown task 'mnist'"),
    ],
)
def test_every_command_names_a_missing_plugin_in_one_line(argv: list[str], expected: str, tmp_path: Path,
                                                          capsys: pytest.CaptureFixture[str],
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    code, _, err = cli(argv, capsys)
    assert code == 2 and err.count("\n") == 1 and expected in err, err


def test_tasks_lists_a_broken_plugin_with_its_reason(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    ref = _plugin(tmp_path, BAD_PLUGINS["raises"][0])
    code, listed, _ = cli(["tasks", ref], capsys)
    assert code == 1 and "cannot be loaded: task plugin" in listed and "no data here" in listed
    code, listed, _ = cli(["tasks", "--json"], capsys)
    assert code == 0 and {r["name"] for r in json.loads(listed)} >= {"breast-cancer-mlp", "cifar100-resnet"}


def test_custom_task_infers_what_it_can_and_leaves_the_random_state_alone() -> None:
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(200, 6, generator=g), torch.randint(0, 4, (200,), generator=g)
    config = TrainConfig(epochs=1, batch_size=16, lr=1e-2, weight_decay=0.0)
    state = torch.get_rng_state()
    task = fx.custom_task(name="t4", model=lambda width=8: torch.nn.Sequential(
        torch.nn.Linear(6, width), torch.nn.ReLU(), torch.nn.Linear(width, 4)), model_kwargs={"width": 8},
        train=torch.utils.data.TensorDataset(x[:150], y[:150]), test=(x[150:].numpy(), y[150:].numpy()),
        loss=torch.nn.functional.cross_entropy, config=config, augment=lambda b: b + 0.0)
    assert torch.equal(torch.get_rng_state(), state)  # the check's throwaway model drew nothing here
    assert (task.num_classes, task.task_type, task.metric_name) == (4, "classification", "accuracy")
    assert task.config.augment and task.protocols["default"].augment  # augment= turns it on
    splits = task.load()
    assert int(splits.y_val.shape[0]) == 15 and torch.bincount(splits.y_val, minlength=4).min() >= 3  # stratified
    assert torch.equal(task.load().y_val, splits.y_val)  # fixed, whatever the seed
    torch.manual_seed(3)
    a = task.build_model(width=5)
    torch.manual_seed(3)
    b = task.build_model(width=5)
    assert a[0].out_features == 5 and torch.equal(a[0].weight, b[0].weight)  # seeded initial weights
    # a single logit with float 0/1 targets and BCE: binary classification, threshold at 0
    binary = fx.custom_task(name="t2", model=lambda: torch.nn.Linear(6, 1), train=(x[:150], (y[:150] > 1).float()),
                            test=(x[150:], (y[150:] > 1).float()), task_type="classification",
                            loss=lambda o, t: torch.nn.functional.binary_cross_entropy_with_logits(o.squeeze(1), t),
                            config=config, val=(x[:20], (y[:20] > 1).float()))
    assert binary.num_classes == 2 and binary.load().y_val.shape[0] == 20
    logits = torch.tensor([[2.0], [-1.0]])
    assert binary.score(logits, torch.tensor([1.0, 1.0])).tolist() == [1.0, 0.0]
    regression = fx.custom_task(name="r", model=lambda: torch.nn.Linear(6, 1), train=(x[:150], x[:150, :1]),
                                test=(x[150:], x[150:, :1]), loss=torch.nn.functional.mse_loss, config=config)
    assert regression.task_type == "regression" and regression.metric_name == "neg_mse"
    assert regression.score(torch.zeros(2, 1), torch.tensor([[1.0], [2.0]])).tolist() == [-1.0, -4.0]
    with pytest.raises(TaskDefinitionError, match="expected a TrainConfig"):
        fx.custom_task(name="t", model=torch.nn.Identity, train=(x, y), test=(x, y),
                       loss=torch.nn.functional.cross_entropy, config={"epochs": 1})
    with pytest.raises(TaskDefinitionError, match="IterableDataset"):
        fx.custom_task(name="t", model=lambda: torch.nn.Linear(6, 4), train=_Stream(), test=(x, y),
                       loss=torch.nn.functional.cross_entropy, config=config)


class _Stream(torch.utils.data.IterableDataset):
    def __iter__(self):
        return iter(())


def test_records_resolve_every_setting_of_a_built_in_task_too() -> None:
    (spec,) = build_grid("breast-cancer-mlp", "sam+fa", [0.05], [0], method_kwargs={"fa.lam": 0.1})
    resolved = resolved_settings(spec, {**spec.method_kwargs, "rho": 0.05, "seed": 0})
    assert set(resolved["config"]) == {f.name for f in dataclasses.fields(TrainConfig)}
    assert resolved["config"]["optimizer"] == "adam" and "optimizer" not in spec.config  # a later field, in full
    assert resolved["model_kwargs"] == {"hidden": [512, 256], "dropout": 0.3}
    kwargs = resolved["method_kwargs"]
    assert kwargs["sam.rho"] == 0.05 and kwargs["fa.lam"] == 0.1 and kwargs["fa.probes"] == 5
    assert kwargs["sam.adaptive"] is False and kwargs["fa.dist"] == "rademacher" and list(kwargs) == sorted(kwargs)
    json.dumps(resolved)  # JSON data


def test_a_module_plugin_in_the_working_directory(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "user_tasks_mod.py").write_text(ENTRY_MODULE)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("sys.path", [p for p in __import__("sys").path if p not in ("", str(tmp_path))])
    code, _, err = cli(["run", "user_tasks_mod:make_task", "--method", "none", "--seeds", "1", "--out", "runs",
                        "--quiet", "--no-plots"], capsys)
    assert code == 0, err
    (record,) = load_records(tmp_path / "runs" / "ep-toy")
    assert record.task_source["kind"] == "module" and record.task_source["location"] == "user_tasks_mod"
    assert record.task_source["sha256"] == _sha(tmp_path / "user_tasks_mod.py")
