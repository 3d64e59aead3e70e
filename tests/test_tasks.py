"""Tasks, batching, the sparse linear layer (incl. higher-order derivatives) and checkpoints."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from flatness.experiments.running.checkpoints import load_checkpoint, save_checkpoint
from flatness.experiments.world.data import iterate_batches
from flatness.experiments.world.models import logistic_regression, mlp
from flatness.experiments.world.tasks import TASKS, TrainConfig, get_task
from flatness.hutchinson import sq_trace
from flatness.layers import SparseLinear, sparse_linear
from flatness.penalties import FlatnessPenalty
from flatness.probes import sample_probes
from flatness.utils import FlatnessError
from helpers import dense_hessian


def test_registry_and_unknown_task():
    assert set(TASKS) == {
        "cifar100-mlp", "newsgroups-logreg", "breast-cancer-mlp",
        "cifar100-resnet", "cifar100-allconv", "cifar100-vit",
    }
    with pytest.raises(FlatnessError, match="breast-cancer-mlp"):
        get_task("mnist")


def test_default_protocols_follow_the_issue():
    c = get_task("cifar100-mlp").config
    assert (c.epochs, c.batch_size, c.weight_decay) == (10, 128, 5e-4)
    n = get_task("newsgroups-logreg").config
    assert n.batch_size == 32 and 1e-3 <= n.lr <= 1e-2 and 20 <= n.epochs <= 50 and n.weight_decay == 1e-4
    b = get_task("breast-cancer-mlp").config
    assert (b.epochs, b.batch_size, b.lr, b.weight_decay) == (50, 32, 1e-3, 1e-4)


@pytest.mark.parametrize(
    "bad",
    [{"epochs": 0}, {"batch_size": 0}, {"lr": 0.0}, {"weight_decay": -1.0}, {"val_fraction": 1.0}, {"schedule": "exp"}],
)
def test_train_config_validates(bad):
    with pytest.raises(ValueError):
        TrainConfig(**{"epochs": 1, "batch_size": 4, "lr": 0.1, "weight_decay": 0.0, **bad})


def test_train_config_replace_rejects_unknown_fields():
    c = get_task("breast-cancer-mlp").config
    assert c.replace(epochs=3).epochs == 3 and c.epochs == 50
    with pytest.raises(ValueError, match="unknown"):
        c.replace(beta3=0.9)
    assert TrainConfig.from_dict(c.as_dict()) == c


@pytest.mark.parametrize("sparse", [False, True])
def test_iterate_batches_covers_each_row_once_reproducibly(sparse):
    x = torch.arange(23 * 3, dtype=torch.float32).view(23, 3) + 1
    y = torch.arange(23)
    xs = x.to_sparse_csr() if sparse else x

    def collect(seed):
        g = torch.Generator().manual_seed(seed)
        batches = iterate_batches(xs, y, 5, shuffle=True, generator=g)
        return [(xb.to_dense() if sparse else xb, yb) for xb, yb in batches]

    batches = collect(0)
    assert [len(yb) for _, yb in batches] == [5, 5, 5, 5, 3]
    seen = torch.cat([yb for _, yb in batches])
    assert sorted(seen.tolist()) == list(range(23))
    for xb, yb in batches:
        assert torch.equal(xb, x[yb])
    again = collect(0)
    assert all(torch.equal(a[1], b[1]) for a, b in zip(batches, again, strict=True))
    in_order = list(iterate_batches(xs, y, 5, shuffle=False, drop_last=True))
    assert len(in_order) == 4 and torch.equal(in_order[0][1], torch.arange(5))


# ------------------------------------------------------------------------------------------
# Sparse logistic regression: values and derivatives equal those of the dense computation


def _sparse_problem(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    dense = torch.randn(6, 24, generator=g, dtype=torch.float64)
    dense = dense * (torch.rand(6, 24, generator=g) < 0.25)
    y = torch.randint(0, 4, (6,), generator=g)
    torch.manual_seed(seed)
    model = logistic_regression(24, 4).double()
    return dense, y, model


@pytest.mark.parametrize("layout", ["csr", "coo"])
def test_sparse_linear_forward_and_gradient_match_dense(layout):
    dense, y, model = _sparse_problem()
    x = dense.to_sparse_csr() if layout == "csr" else dense.to_sparse()
    ref = nn.functional.linear(dense, model.weight, model.bias)
    assert torch.allclose(model(x), ref)
    g_sparse = torch.autograd.grad(nn.functional.cross_entropy(model(x), y), list(model.parameters()))
    g_dense = torch.autograd.grad(nn.functional.cross_entropy(ref, y), list(model.parameters()))
    for a, b in zip(g_sparse, g_dense, strict=True):
        assert torch.allclose(a, b)


def test_sparse_linear_hvp_matches_dense_hessian():
    dense, y, model = _sparse_problem(1)
    params = list(model.parameters())
    loss = nn.functional.cross_entropy(model(dense.to_sparse_csr()), y)
    probes = sample_probes(params, 3, seed=0)
    from flatness.hutchinson import hvp

    prods = hvp(loss, params, probes)  # batched over probes (vmap) through the sparse op
    H = dense_hessian(model, dense, y)
    flat_v = torch.cat([v.flatten(1) for v in probes], dim=1)
    flat_hv = torch.cat([p.flatten(1) for p in prods], dim=1)
    assert torch.allclose(flat_hv, flat_v @ H.T, atol=1e-10)


def test_sparse_linear_third_order_backward_matches_dense():
    dense, y, model = _sparse_problem(2)
    params = list(model.parameters())

    def penalty_grad(x):
        loss = nn.functional.cross_entropy(sparse_linear(x, model.weight, model.bias), y)
        value = sq_trace(loss, params, probes=4, seed=3)
        return value, torch.autograd.grad(value, params)

    v_sparse, g_sparse = penalty_grad(dense.to_sparse_csr())
    v_dense, g_dense = penalty_grad(dense)
    assert torch.allclose(v_sparse, v_dense)
    for a, b in zip(g_sparse, g_dense, strict=True):
        assert torch.allclose(a, b, atol=1e-12)


def test_fa_penalty_runs_on_sparse_batches():
    dense, y, model = _sparse_problem(3)
    penalty = FlatnessPenalty(model, nn.functional.cross_entropy, lam=0.1, probes=2, every=1, seed=0)
    x = dense.to_sparse_csr()
    loss = nn.functional.cross_entropy(model(x), y) + penalty(x, y)
    loss.backward()
    assert model.weight.grad is not None and torch.isfinite(model.weight.grad).all()
    assert penalty.last_sq_trace is not None and penalty.last_sq_trace > 0


def test_sparse_linear_initialises_like_nn_linear():
    torch.manual_seed(0)
    a = SparseLinear(30, 5)
    torch.manual_seed(0)
    b = nn.Linear(30, 5)
    assert torch.equal(a.weight, b.weight) and torch.equal(a.bias, b.bias)


# ------------------------------------------------------------------------------------------
# Models, losses, predictions


def test_mlp_weight_scale_scales_default_weights_only():
    torch.manual_seed(3)
    full = mlp(12, 5, (8, 6), dropout=0.3)
    torch.manual_seed(3)
    half = mlp(12, 5, (8, 6), dropout=0.3, weight_scale=0.5)
    for a, b in zip(full, half, strict=True):
        if isinstance(a, nn.Linear):
            assert torch.equal(b.weight, 0.5 * a.weight) and torch.equal(b.bias, a.bias)
    for bad in (0.0, -1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="weight_scale"):
            mlp(12, 5, weight_scale=bad)


def test_cifar_model_uses_the_tuned_initial_scale():
    task = get_task("cifar100-mlp")
    torch.manual_seed(0)
    model = task.build_model()
    torch.manual_seed(0)
    reference = mlp(3072, 100, (512, 256), dropout=0.3)
    assert [m.out_features for m in model if isinstance(m, nn.Linear)] == [512, 256, 100]
    assert torch.equal(model[0].weight, task.model_defaults["weight_scale"] * reference[0].weight)


def test_breast_cancer_task_model_loss_predict():
    task = get_task("breast-cancer-mlp")
    splits = task.load()
    assert splits.x_val is not None and splits.x_train.shape[0] + splits.x_val.shape[0] == 455
    torch.manual_seed(0)
    model = task.build_model()
    logits = model(splits.x_test)
    assert logits.shape == (114, 1)
    assert set(task.predict(logits).tolist()) <= {0, 1}
    assert task.loss_fn(logits, splits.y_test).dim() == 0


def test_newsgroups_model_needs_its_input_width():
    task = get_task("newsgroups-logreg")
    model = task.build_model(num_features=50)
    assert isinstance(model, SparseLinear) and model.weight.shape == (20, 50)


# ------------------------------------------------------------------------------------------
# Checkpoints


def test_checkpoint_round_trip_and_errors(tmp_path):
    task = get_task("breast-cancer-mlp")
    torch.manual_seed(0)
    model = task.build_model().train()
    path = tmp_path / "ck" / "m.pt"
    save_checkpoint(path, model, task=task.name, meta={"lam": 0.01, "note": "x"})
    assert model.training  # saving does not touch the model
    assert [p.name for p in path.parent.iterdir()] == ["m.pt"]  # no temp file left
    loaded, meta = load_checkpoint(path, task="breast-cancer-mlp")
    assert meta == {"lam": 0.01, "note": "x"} and not loaded.training
    x = torch.randn(4, 30)
    with torch.no_grad():
        assert torch.equal(loaded(x), model.eval()(x))

    with pytest.raises(FlatnessError, match="not 'cifar100-mlp'"):
        load_checkpoint(path, task="cifar100-mlp")
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(FlatnessError, match="not a readable"):
        load_checkpoint(junk)
    torch.save({"weights": 1}, tmp_path / "other.pt")
    with pytest.raises(FlatnessError, match="not a flatness checkpoint"):
        load_checkpoint(tmp_path / "other.pt")
    with pytest.raises(FlatnessError, match="does not exist"):
        load_checkpoint(tmp_path / "missing.pt")


def test_checkpoint_that_does_not_fit_the_model(tmp_path):
    wrong = nn.Sequential(nn.Linear(30, 8), nn.ReLU(), nn.Linear(8, 1))
    save_checkpoint(tmp_path / "w.pt", wrong, task="breast-cancer-mlp", meta={})
    with pytest.raises(FlatnessError, match="does not fit"):
        load_checkpoint(tmp_path / "w.pt")


def test_sparse_model_checkpoint_keeps_input_width(tmp_path):
    task = get_task("newsgroups-logreg")
    model = task.build_model(num_features=77)
    save_checkpoint(tmp_path / "n.pt", model, task=task.name, meta={})
    loaded, _ = load_checkpoint(tmp_path / "n.pt")
    assert loaded.weight.shape == (20, 77) and torch.equal(loaded.weight, model.weight)
