"""Progress off a terminal, everywhere: plain whole lines, no carriage returns, and the next
output (the report's tables) starts on a line of its own.
"""

from __future__ import annotations

import contextlib
import io
import re
from pathlib import Path

import pytest

import flatness
from flatness.cli import main
from flatness.experiments.running import progress

BC = "breast-cancer-mlp"


@pytest.fixture(scope="module")
def one_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("runs")
    args = ["run", BC, "--lambdas", "0", "--seeds", "1", "--epochs", "1", "--quiet", "--no-plots", "--out", str(out)]
    assert main(args) == 0
    return out / BC


def _merged(argv: list[str]) -> str:
    """What ``flatness ARGV > log 2>&1`` leaves in the log (one non-terminal stream)."""
    log = io.StringIO()
    with contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
        assert main(argv) == 0
    return log.getvalue()


def test_report_measures_progress_is_whole_lines_before_the_tables(one_run, monkeypatch):
    monkeypatch.setattr(progress, "LINE_INTERVAL", 0.0)  # a line per step, to see them
    log = _merged(["report", str(one_run), "--measures", "--no-plots"])
    assert "\r" not in log and "\x1b" not in log
    lines = log.splitlines()
    shown = [line for line in lines if line.startswith("λ_max, Tr(H): ")]
    assert shown and re.fullmatch(r"λ_max, Tr\(H\): 1/1 runs \(100 %, \d+ s\)", shown[-1])
    heading = next(i for i, line in enumerate(lines) if line.startswith("#"))
    assert lines.index(shown[-1]) < heading  # the progress came first, then the tables, each on its own line


def test_landscape_progress_is_whole_lines(one_run, tmp_path, monkeypatch):
    monkeypatch.setattr(progress, "LINE_INTERVAL", 0.0)
    (checkpoint,) = (one_run / "checkpoints").glob("*.pt")
    log = _merged(["landscape", str(checkpoint), "--task", BC, "--kind", "1d", "--num", "3",
                   "--examples", "64", "--out", str(tmp_path), "--progress"])
    assert "\r" not in log
    assert [line.split(" (")[0] for line in log.splitlines() if line.startswith("landscape:")] == [
        f"landscape: {i}/3 points" for i in (1, 2, 3)
    ]


def test_no_progress_bar_outside_the_progress_module():
    """The tqdm package is reached only through running/progress.py (and the library's landscape, where a
    user asks for a bar with ``progress=True``).
    """
    root = Path(flatness.__file__).parent
    allowed = {root / "experiments" / "running" / "progress.py", root / "landscape.py"}
    users = sorted(str(p.relative_to(root)) for p in root.rglob("*.py") if "tqdm" in p.read_text() and p not in allowed)
    assert users == []
