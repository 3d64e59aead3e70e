"""A ``--jobs 2`` sweep killed with SIGKILL (its whole process group) at random moments, then
resumed, ends with the records of an uninterrupted sweep and leaves no claim or temporary file.

Design: the sweep runs in its own session (``start_new_session``), so one ``killpg`` kills the
parent and both pool workers wherever they are. Each attempt draws (seeded) a phase — starting
up, a run training (a claim exists), a run just finished (a new record) — and a random delay
into it, so that the kills land in the sweep's work whatever the machine's speed.
After every kill each record on disk must be a complete, readable record (atomic writes); after
the final, unkilled resume the records must equal an uninterrupted sweep's in every field but
timings, pids, host and the epochs a run resumed after (:mod:`flatness.experiments.running.resume`),
and nothing else may be left behind. ``chaos_sweep`` is also the
by-hand version (``python tests/test_chaos.py OUT KILLS SEED`` with a bigger grid).
"""

from __future__ import annotations

import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from flatness.experiments.running import claims
from flatness.utils import process_start, writer_tag

BC = "breast-cancer-mlp"
# a CI-sized grid: 4 short runs (2 strengths x 2 seeds), the per-epoch measure kept small
SMALL = ["--lambdas", "0", "0.01", "--seeds", "2", "--epochs", "1", "--batch-size", "64",
         "--train-eval-samples", "64"]
TIMING_KEYS = {"train_seconds", "seconds_per_epoch", "eval_seconds", "total_seconds", "finished_at"}
PROCESS_KEYS = {"pid", "host", "resumed_after_epochs"}  # which processes made it


def _sweep_command(out: Path, grid: list[str]) -> list[str]:
    return [sys.executable, "-m", "flatness", "run", BC, *grid, "--jobs", "2", "--out", str(out),
            "--quiet", "--no-plots"]


def _comparable(value: Any) -> Any:
    """A record without its timings, pid and host (what may differ between two runs), at any
    depth (``curves["seconds"]``, ``measurement["seconds"]``, ``environment["pid"]``).
    """
    if isinstance(value, dict):
        return {k: _comparable(v) for k, v in value.items()
                if k not in TIMING_KEYS | PROCESS_KEYS and "seconds" not in k}
    return value


def _records(directory: Path) -> dict[str, dict[str, Any]]:
    """Every run record in ``directory``; each must be complete and valid JSON."""
    out = {}
    for path in sorted(directory.glob("*.json")):
        data = json.loads(path.read_text())  # a half-written record would fail here
        assert data["format"] == "flatness-run" and data["status"] == "complete", path
        out[path.stem] = data
    return out


def leftovers(out: Path) -> list[str]:
    """Claims, take-over files and temporary files anywhere under ``out``."""
    return sorted(
        str(p.relative_to(out)) for p in out.rglob("*")
        if p.suffix in (".claim", ".tmp", ".stale") or p.name == ".write-test"
    )


def _phase_reached(out: Path, phase: str, records_before: int, launched: float) -> bool:
    directory = out / BC
    if phase == "training":  # this attempt claimed a run: a worker is training it
        return directory.exists() and any(_newer(p, launched) for p in directory.glob("*.claim"))
    if phase == "mid-run":  # a run of this attempt has just saved an epoch state
        return directory.exists() and any(_newer(p, launched) for p in directory.glob("checkpoints/*.state.pt"))
    # "writing": a run has just written its record (its claim release, the next claim follow)
    return directory.exists() and len(list(directory.glob("*.json"))) > records_before


def _newer(path: Path, since: float) -> bool:
    try:
        return path.stat().st_mtime >= since
    except FileNotFoundError:
        return False


PHASES = ("start", "training", "writing")
# seconds into each phase a kill may land (uniform): "mid-run" just after an epoch state was saved
DELAYS = {"start": (0.2, 3.0), "training": (0.0, 1.0), "writing": (0.0, 0.2), "mid-run": (0.0, 0.05)}


def chaos_sweep(out: Path, grid: list[str], kills: int, seed: int, phases: tuple[str, ...] = PHASES) -> list[str]:
    """Start the sweep ``kills`` times and SIGKILL its process group at a random moment of a
    randomly chosen phase — while starting up, while a run trains, just after a run wrote its
    record, just after a run saved an epoch state (``"mid-run"``) — then let it finish; returns a
    line per attempt.
    """
    rng = random.Random(seed)
    order: list[str] = []
    while len(order) < kills:  # every phase in turn, in a random order each round
        order += rng.sample(list(phases), len(phases))
    log = []
    for attempt, phase in enumerate(order[:kills]):
        delay = rng.uniform(*DELAYS[phase])
        before = len(list((out / BC).glob("*.json"))) if (out / BC).exists() else 0
        launched = time.time() - 0.02  # file times are kept at a coarser clock (a jiffy)
        proc = subprocess.Popen(_sweep_command(out, grid), stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL, start_new_session=True)
        deadline = time.monotonic() + 300
        while phase != "start" and proc.poll() is None and not _phase_reached(out, phase, before, launched):
            assert time.monotonic() < deadline, f"the sweep never reached {phase}"
            time.sleep(0.01)
        try:
            proc.wait(timeout=delay)
            log.append(f"attempt {attempt + 1} ({phase}): finished before its kill")
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            log.append(f"attempt {attempt + 1}: killed {delay:.2f} s into phase {phase!r}")
        if (out / BC).exists():
            done = _records(out / BC)  # never a half-written record
            log[-1] += f"; {len(done)} records on disk; left behind: {leftovers(out) or 'nothing'}"
        print(log[-1], flush=True)
    final = subprocess.run(_sweep_command(out, grid), capture_output=True, text=True, timeout=900)
    assert final.returncode == 0, final.stderr
    log.append("resumed: " + " / ".join(final.stderr.strip().splitlines()))
    return log


def _reference(out: Path, grid: list[str]) -> dict[str, dict[str, Any]]:
    done = subprocess.run(_sweep_command(out, grid), capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr
    return _records(out / BC)


def check_chaos(tmp: Path, grid: list[str], kills: int, seed: int, phases: tuple[str, ...] = PHASES) -> list[str]:
    reference = _reference(tmp / "reference", grid)
    start = time.perf_counter()
    log = chaos_sweep(tmp / "chaos", grid, kills, seed, phases)
    log.append(f"chaos sweep wall time {time.perf_counter() - start:.1f} s")
    resumed = _records(tmp / "chaos" / BC)
    assert sorted(resumed) == sorted(reference)
    for name in reference:
        assert _comparable(resumed[name]) == _comparable(reference[name]), name
    assert leftovers(tmp / "chaos") == []
    assert leftovers(tmp / "reference") == []
    return log


# ---------------------------------------------------------------- the pieces, one at a time


def _claim_file(directory: Path, name: str, **holder: Any) -> Path:
    path = claims.claim_path(directory, name)
    path.write_text(json.dumps({"host": socket.gethostname(), "token": "t", **holder}))
    return path


def _zombie() -> subprocess.Popen:
    """A child that has exited but is not reaped yet (what a killed worker is for a moment)."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    deadline = time.monotonic() + 60
    while Path(f"/proc/{proc.pid}/stat").read_text().rpartition(")")[2].split()[0] != "Z":
        assert time.monotonic() < deadline
        time.sleep(0.05)
    return proc


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs Linux's /proc")
def test_a_claim_is_stale_once_its_process_is_gone_even_if_its_pid_lives_on(tmp_path):
    me, started = os.getpid(), process_start()
    ours = _claim_file(tmp_path, "a", pid=me, start=started)
    assert not claims.is_stale(ours, claims.read_claim(ours))
    reused = _claim_file(tmp_path, "b", pid=me, start=started + 1)  # a dead process had our pid
    assert claims.is_stale(reused, claims.read_claim(reused))
    zombie = _zombie()
    try:
        killed = _claim_file(tmp_path, "c", pid=zombie.pid)  # killed, its parent not done with it
        assert claims.is_stale(killed, claims.read_claim(killed))
    finally:
        zombie.wait()


def test_clear_leftovers_removes_only_what_dead_processes_left(tmp_path):
    directory = tmp_path / BC
    (directory / "checkpoints").mkdir(parents=True)
    # a writer killed half-way through a checkpoint and a record
    script = (
        "import os, sys; from pathlib import Path; from flatness.utils import _create_temp_file\n"
        "for name in sys.argv[1:]:\n"
        "    fd, tmp = _create_temp_file(Path(name)); os.write(fd, b'{half')\n"
        "os.kill(os.getpid(), 9)\n"
    )
    killed = subprocess.run([sys.executable, "-c", script, str(directory / "checkpoints" / "fa_seed0.pt"),
                             str(directory / "fa_seed0.json")])
    assert killed.returncode == -signal.SIGKILL
    dead_files = sorted(p for p in directory.rglob(".*.tmp"))
    assert len(dead_files) == 2
    # a live writer's file (this process), another host's, and an untagged one stay
    live = directory / f".summary.md.0123abcd.{writer_tag()}.tmp"
    other_host = directory / ".summary.csv.0123abcd.w1s1h00000000.tmp"
    untagged = directory / ".old.json.x1y2.tmp"
    for path in (live, other_host, untagged):
        path.write_text("x")
    # a claim of a run that finished just before its holder was killed, and a live claim
    finished = _claim_file(directory, "fa_seed0", pid=killed_pid(), start=1)
    held = claims.try_claim(directory, "fa_seed1")
    try:
        removed = claims.clear_leftovers(directory)
        assert sorted(removed) == sorted([finished, *dead_files])
        assert not finished.exists() and held.path.exists()
        assert all(p.exists() for p in (live, other_host, untagged))
        assert not list(directory.glob(".*.stale"))
    finally:
        held.release()


def killed_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


# ---------------------------------------------------------------- the whole sweep


@pytest.mark.slow
def test_a_killed_and_resumed_sweep_equals_an_uninterrupted_one(tmp_path):
    log = check_chaos(tmp_path, SMALL, kills=3, seed=30)
    print("\n".join(log))


@pytest.mark.slow
def test_runs_killed_mid_run_resume_from_their_epoch_states_to_the_uninterrupted_records(tmp_path, monkeypatch):
    monkeypatch.setenv("FLATNESS_EPOCH_STATE_SECONDS", "0")  # a state after every epoch
    grid = ["--lambdas", "0", "0.01", "--seeds", "1", "--epochs", "4", "--batch-size", "64",
            "--train-eval-samples", "64"]
    log = check_chaos(tmp_path, grid, kills=2, seed=31, phases=("mid-run",))
    print("\n".join(log))
    resumed = [r["environment"].get("resumed_after_epochs") for r in _records(tmp_path / "chaos" / BC).values()]
    assert any(resumed), "no run was resumed from an epoch state: the kills missed the runs"


if __name__ == "__main__":  # the by-hand version: python tests/test_chaos.py OUT KILLS SEED
    target, kills, seed = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
    grid = ["--lambdas", "0", "0.001", "0.01", "0.1", "--seeds", "3", "--epochs", "3"]
    print("\n".join(check_chaos(target, grid, kills, seed)))
