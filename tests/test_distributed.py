"""DDP semantics: shards, rank seeds, the one-process twin, and a real 2-process gloo run."""

import copy
import glob
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from flatness.experiments.running.distributed import EmulatedRanks, shard_bounds, take_shard
from flatness.experiments.running.specs import build_grid, select_shard
from flatness.experiments.world.errors import SettingError
from flatness.methods import make_method
from flatness.probes import rank_seed

CE = nn.CrossEntropyLoss()


def test_shards_partition_the_batch():
    for n in (1, 7, 32, 33):
        for world in (1, 2, 3):
            bounds = [shard_bounds(n, r, world) for r in range(world)]
            assert bounds[0][0] == 0 and bounds[-1][1] == n
            assert all(a[1] == b[0] for a, b in zip(bounds, bounds[1:], strict=False))
            sizes = [b - a for a, b in bounds]
            assert max(sizes) - min(sizes) <= 1


def test_take_shard_handles_dense_and_sparse_csr():
    x = torch.randn(5, 4)
    x[x < 0.3] = 0
    y = torch.arange(5)
    xs, ys = take_shard(x.to_sparse_csr(), y, 1, 2)
    dense, _ = take_shard(x, y, 1, 2)
    assert torch.equal(xs.to_dense(), dense) and torch.equal(ys, torch.tensor([3, 4]))


def test_rank_zero_keeps_the_run_seed_and_ranks_differ():
    assert rank_seed(5, 0) == 5
    assert len({rank_seed(5, r) for r in range(4)}) == 4


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Dropout(0.2), nn.Linear(16, 3))


def test_one_emulated_rank_is_an_ordinary_step():
    x, y = torch.randn(12, 6), torch.randint(0, 3, (12,))
    a, b = _model(), _model()
    opt_a = torch.optim.Adam(a.parameters(), lr=1e-2)
    opt_b = torch.optim.Adam(b.parameters(), lr=1e-2)
    plain = make_method("fa", a, CE, lam=0.1, probes=2, every=1, seed=3)
    emulated = EmulatedRanks([make_method("fa", b, CE, lam=0.1, probes=2, every=1, seed=3)], [11])
    torch.manual_seed(11)  # the plain run's dropout stream = the emulated rank's stream
    for _ in range(3):
        plain.step(x, y, opt_a)
        emulated.step(x, y, opt_b)  # runs on its own saved stream, leaves the global one alone
    for p, q in zip(a.parameters(), b.parameters(), strict=True):
        assert torch.equal(p, q)


def test_two_emulated_ranks_average_the_shard_gradients():
    x, y = torch.randn(10, 6), torch.randint(0, 3, (10,))
    model = _model().eval()  # no dropout: the shard gradients are deterministic
    ref = copy.deepcopy(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    methods = [make_method("fa", model, CE, lam=0.5, probes=2, every=1, seed=rank_seed(1, r))
               for r in range(2)]
    EmulatedRanks(methods, [rank_seed(1, r) for r in range(2)]).step(x, y, opt)
    grads = []
    for r in range(2):
        xs, ys = take_shard(x, y, r, 2)
        m = make_method("fa", ref, CE, lam=0.5, probes=2, every=1, seed=rank_seed(1, r))
        ref.zero_grad()
        loss = CE(ref(xs), ys) + m.penalty(xs, ys)
        grads.append(torch.autograd.grad(loss, list(ref.parameters())))
    with torch.no_grad():
        for p, q, g0, g1 in zip(model.parameters(), ref.parameters(), *grads, strict=True):
            torch.testing.assert_close(p, q - 0.1 * (g0 / 2 + g1 / 2), rtol=0, atol=1e-7)


# --- real 2-process gloo runs through the CLI, against their one-process twin -------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run_cli(args, out, extra_env=None, torchrun=False):
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(extra_env or {})}
    env.pop("RANK", None)
    prefix = [sys.executable, "-m"]
    if torchrun:
        prefix += ["torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
                   "--master-port", str(_free_port()), "--max-restarts", "0", "-m"]
    cmd = prefix + ["flatness", "run", "breast-cancer-mlp", "--seeds", "1", "--epochs", "2",
                    "--out", str(out), "--quiet", "--no-plots", *args]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]


def _weights(out):
    (path,) = glob.glob(str(Path(out) / "breast-cancer-mlp" / "checkpoints" / "*.pt"))
    return torch.load(path, weights_only=False)["state_dict"]


def _max_diff(a, b):
    return max(float((a[k] - b[k]).abs().max()) for k in a)


@pytest.mark.slow
@pytest.mark.parametrize("method_args", [["--method", "fa", "--lambdas", "0.1"],
                                         ["--method", "sam", "--lambdas", "0.05"],
                                         ["--method", "curvature", "--lambdas", "0.001"]])
def test_two_gloo_ranks_equal_the_one_process_twin(tmp_path, method_args):
    _run_cli(method_args, tmp_path / "ddp", torchrun=True)
    _run_cli(method_args + ["--emulate-ranks", "2"], tmp_path / "twin")
    _run_cli(method_args, tmp_path / "single")  # one rank: a different computation
    ddp, twin, single = (_weights(tmp_path / d) for d in ("ddp", "twin", "single"))
    assert _max_diff(ddp, twin) <= 1e-5
    assert _max_diff(ddp, single) > 1e-3  # the comparison can tell DDP semantics apart


def test_shards_are_disjoint_and_cover_the_grid():
    grid = build_grid("breast-cancer-mlp", "fa", [0, 0.01, 0.1], 3)
    parts = [select_shard(grid, i, 4) for i in range(1, 5)]
    names = [s.name for part in parts for s in part]
    assert sorted(names) == sorted(s.name for s in grid) and len(set(names)) == len(names)
    with pytest.raises(SettingError, match="`index` must be from 1 to `count`, got 5 of 4"):
        select_shard(grid, 5, 4)


@pytest.mark.slow
def test_concurrent_shards_share_one_results_directory(tmp_path):
    out = tmp_path / "shared"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    base = [sys.executable, "-m", "flatness", "run", "breast-cancer-mlp", "--seeds", "1",
            "--epochs", "1", "--lambdas", "0", "0.01", "0.1", "--out", str(out), "--quiet",
            "--no-plots"]
    procs = [subprocess.Popen(base + ["--shard", f"{i}/2"], env=env, stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE, text=True) for i in (1, 2)]
    for p in procs:
        assert p.wait(timeout=300) == 0, p.stderr.read()[-2000:]
    runs = sorted(p.name for p in (out / "breast-cancer-mlp").glob("*.json"))
    assert len([r for r in runs if r.startswith("fa_")]) == 3
    report = subprocess.run([sys.executable, "-m", "flatness", "report",
                             str(out / "breast-cancer-mlp")], env=env, capture_output=True,
                            text=True, timeout=120)
    assert report.returncode == 0, report.stderr
    for lam in ("| 0 |", "| 0.01 |", "| 0.1 |"):
        assert lam in report.stdout
