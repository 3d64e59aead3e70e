"""The record layer and the CLI under faults: full or read-only disks, the umask, concurrent
runs on one results directory, bad demo arguments, logs that are not terminals, short warm-ups.
"""

from __future__ import annotations

import errno
import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import flatness.utils as utils
from flatness.cli import main
from flatness.experiments import claims
from flatness.experiments.running.checkpoints import save_checkpoint
from flatness.experiments.running.progress import LineProgress
from flatness.experiments.running.record import read_record, write_record
from flatness.experiments.running.runner import run_grid
from flatness.experiments.running.specs import build_grid
from flatness.experiments.world.tasks import get_task
from flatness.utils import FlatnessError, atomic_write_bytes
from test_record import _record

BC = "breast-cancer-mlp"
QUICK = ["--epochs", "1", "--quiet", "--no-plots"]


@pytest.fixture
def full_disk(monkeypatch):
    """Writes into atomic_write_bytes' temp files fail half-way with ENOSPC; other writes work."""
    temp_fds: set[int] = set()
    real_create, real_write = utils._create_temp_file, os.write

    def tracking(path):
        fd, tmp = real_create(path)
        if path.name != ".write-test":  # the runner's check before any work: the disk was not full yet
            temp_fds.add(fd)
        return fd, tmp

    def write(fd, data):
        if fd in temp_fds:
            real_write(fd, bytes(data[:64]))
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_write(fd, data)

    monkeypatch.setattr(utils, "_create_temp_file", tracking)
    monkeypatch.setattr(os, "write", write)


def _files(directory: Path) -> dict[str, bytes]:
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


def test_full_disk_leaves_the_old_file_and_no_temp_file(tmp_path, full_disk):
    path = tmp_path / "fa_lam0.01_seed0.json"
    path.write_text("old")
    with pytest.raises(FlatnessError) as info:
        write_record(path, _record())
    assert str(info.value) == f"disk full: could not write {path} (No space left on device); nothing was written there"
    model = torch.nn.Linear(30, 1)
    with pytest.raises(FlatnessError, match=f"disk full: could not write {re.escape(str(tmp_path / 'm.pt'))}"):
        save_checkpoint(tmp_path / "m.pt", model, task=BC, meta={})
    assert _files(tmp_path) == {"fa_lam0.01_seed0.json": b"old"}


def test_full_disk_during_a_run_is_one_line_and_leaves_no_partial_result(tmp_path, capsys, full_disk):
    out = tmp_path / "runs"
    (out / BC).mkdir(parents=True)
    assert main(["run", BC, "--lambdas", "0", "--seeds", "1", "--out", str(out), *QUICK]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("flatness: error: disk full: could not write ")
    assert f"{out / BC / 'checkpoints'}" in err[0]  # the checkpoint is written first
    assert _files(out) == {}  # no record, no checkpoint, no temp file, no claim


def test_a_read_only_directory_gives_one_line_naming_the_file(tmp_path, capsys, monkeypatch):
    directory = tmp_path / BC
    write_record(directory / "fa_lam0.01_seed0.json", _record())

    def read_only(path):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path.with_name(f".{path.name}.x.tmp")))

    monkeypatch.setattr(utils, "_create_temp_file", read_only)
    assert main(["report", str(directory), "--no-plots"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"flatness: error: {directory / 'summary.csv'}: Read-only file system"]


@pytest.mark.parametrize("umask", [0o022, 0o002, 0o077])
def test_results_and_checkpoints_honour_the_umask(tmp_path, umask):
    old = os.umask(umask)
    try:
        write_record(tmp_path / "r.json", _record())
        save_checkpoint(tmp_path / "c" / "m.pt", torch.nn.Linear(30, 1), task=BC, meta={})
        atomic_write_bytes(tmp_path / "summary.md", lambda fh: fh.write(b"table"))
    finally:
        os.umask(old)
    for name in ("r.json", "c/m.pt", "summary.md"):
        assert (tmp_path / name).stat().st_mode & 0o777 == 0o666 & ~umask


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_claimed_runs_are_skipped_and_stale_claims_taken_over(tmp_path, monkeypatch):
    specs = build_grid(BC, "fa", [0.0, 0.01, 0.1], seeds=1, config_overrides={"epochs": 1})
    directory = tmp_path / BC
    directory.mkdir()
    held = claims.try_claim(directory, specs[0].name)  # a live holder: this process
    dead = claims.claim_path(directory, specs[1].name)  # a holder killed on this host
    dead.write_text(f'{{"host": "{socket.gethostname()}", "pid": {_dead_pid()}, "token": "t"}}')
    silent = claims.claim_path(directory, specs[2].name)  # another host, not refreshed for long
    silent.write_text('{"host": "elsewhere", "pid": 1, "token": "u"}')
    old = time.time() - claims.STALE_SECONDS - 5
    os.utime(silent, (old, old))
    messages: list[str] = []
    results = run_grid(specs, tmp_path, progress=False, log=messages.append)
    assert sorted(r.name for r in results[str(directory)]) == sorted(s.name for s in specs[1:])
    holder = claims.describe_holder(claims.read_claim(held.path))
    assert f"{specs[0].name}: being trained by {holder}; skipped" in messages
    assert sorted(p.name for p in directory.glob("*.claim")) == [held.path.name]  # taken-over ones released
    assert not list(directory.glob(".*"))
    # a fresh claim from another host is respected; once released, the run is trained
    held.release()
    fresh = claims.claim_path(directory, specs[0].name)
    fresh.write_text('{"host": "elsewhere", "pid": 1, "token": "v"}')
    assert run_grid(specs, tmp_path, progress=False, log=messages.append)[str(directory)] == results[str(directory)]
    fresh.unlink()
    assert len(run_grid(specs, tmp_path, progress=False, log=lambda m: None)[str(directory)]) == 3
    assert read_record(directory / f"{specs[0].name}.json").complete


def test_two_processes_on_one_out_train_each_run_exactly_once(tmp_path):
    out = tmp_path / "runs"
    cmd = [sys.executable, "-m", "flatness", "run", BC, "--lambdas", "0", "0.01", "--seeds", "2",
           "--out", str(out), "--epochs", "1", "--quiet", "--no-plots"]
    procs = [subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    logs = [p.communicate(timeout=600)[1] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], logs
    trained = [set(re.findall(rf"^{BC}/(\S+): final acc", log, re.MULTILINE)) for log in logs]
    names = {p.stem for p in (out / BC).glob("*.json")}
    assert len(names) == 4 and trained[0] | trained[1] == names  # every run trained ...
    assert not trained[0] & trained[1]  # ... by exactly one of the processes
    pids = {read_record(out / BC / f"{n}.json").environment["pid"] for n in names}
    assert pids <= {p.pid for p in procs}
    assert not list((out / BC).glob("*.claim"))


def test_demo_validates_before_work_documents_its_flags_and_reports_progress(capsys, monkeypatch):
    import flatness.cli.demo as demo

    def no_work(name):
        raise AssertionError("the demo started work before checking its arguments")

    with monkeypatch.context() as patch:
        patch.setattr(demo, "get_task", no_work)
        for args, flag in ((["--lam", "nan"], "--lam"), (["--lam", "-1"], "--lam"), (["--epochs", "0"], "--epochs"),
                           (["--seed", "-3"], "--seed")):
            assert main(["demo", *args]) == 2
            err = capsys.readouterr().err.strip().splitlines()
            assert len(err) == 1 and err[0].startswith(f"flatness: error: {flag} must be")
    with pytest.raises(SystemExit):
        main(["demo", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    for text in ("--lam λ strength λ of the FA penalty", "--epochs N training epochs", "--seed S seed of"):
        assert text in help_text
    assert main(["demo", "--epochs", "2"]) == 0
    captured = capsys.readouterr()
    progress = captured.err.strip().splitlines()
    assert [line.split(":")[0] for line in progress] == ["λ = 0", "λ = 0", "λ = 0.01", "λ = 0.01"]
    assert "epoch 2/2, training loss" in progress[-1] and "\r" not in captured.err
    assert len(captured.out.strip().splitlines()) == 4  # title, header, two rows


def test_progress_off_a_terminal_is_plain_lines(tmp_path, capsys):
    argv = ["run", BC, "--lambdas", "0", "--seeds", "1", "--out", str(tmp_path), "--epochs", "1", "--no-plots"]
    assert main(argv) == 0
    err = capsys.readouterr().err
    assert "\r" not in err and "\x1b" not in err
    assert "runs: 1/1 runs (100 %" in err and err.count("runs: 1/1") == 1
    lines: list[str] = []
    bar = LineProgress(4, "train", "step", stream=None, interval=0.0, leave=False)  # type: ignore[arg-type]
    bar.write = lines.append  # type: ignore[method-assign]
    for _ in range(4):
        bar.update(1)
    bar.close()
    assert [line.split(" (")[0] for line in lines] == [f"train: {i}/4 steps" for i in range(1, 5)]


def test_shorter_training_scales_the_warm_up(tmp_path, capsys):
    task = get_task("cifar100-mlp")
    assert (task.config.epochs, task.config.warmup_epochs) == (10, 2.0)
    one = build_grid("cifar100-mlp", "fa", [0.0], 1, config_overrides={"epochs": 1})[0]
    assert one.config["warmup_epochs"] == pytest.approx(0.2)
    twenty = build_grid("cifar100-mlp", "fa", [0.0], 1, config_overrides={"epochs": 20})[0]
    assert twenty.config["warmup_epochs"] == pytest.approx(4.0)
    none = build_grid("cifar100-mlp", "fa", [0.0], 1, config_overrides={"epochs": 1, "warmup_epochs": 0.0})[0]
    assert none.config["warmup_epochs"] == 0.0
    empty = tmp_path / "no-data"
    empty.mkdir()
    base = ["run", "cifar100-mlp", "--data-dir", str(empty), "--no-download", "--out", str(tmp_path / "o"), "--quiet"]
    assert main([*base, "--epochs", "1"]) == 2  # the protocol is accepted: it fails on the data
    assert "CIFAR-100 not found" in capsys.readouterr().err
    assert main([*base, "--epochs", "1", "--warmup-epochs", "3"]) == 2
    assert "--warmup-epochs must be finite and in [0, 1] (at most --epochs), got 3.0" in capsys.readouterr().err
    assert main([*base, "--warmup-epochs", "nan"]) == 2
    assert "--warmup-epochs must be finite" in capsys.readouterr().err
