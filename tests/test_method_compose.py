"""Composed methods (sam+fa, ...): the update equals the hand-written two-step update, keywords
are routed to components, run names and protocol defaults come from the method classes, and
a composed method trains from the command line.
"""

import copy
import json

import pytest
import torch
from torch import nn

from flatness.cli import main
from flatness.experiments.running.specs import build_grid, default_values
from flatness.hutchinson import sq_trace
from flatness.methods import make_method, method_class
from flatness.probes import sample_probes
from helpers import tiny_batch, tiny_mlp

CE = nn.CrossEntropyLoss()


def _hand_sam_fa_update(model, x, y, rho, lam, probes, seed, lr):
    """SAM ascent from ∇L(θ); at θ + ε̂ the gradient of L + λ·Tr(H²)/B with the penalty's
    probes; θ - lr·that gradient.
    """
    theta = [p.detach().clone() for p in model.parameters()]
    near = copy.deepcopy(model)
    g = torch.autograd.grad(CE(near(x), y), list(near.parameters()))
    norm = torch.sqrt(sum((t * t).sum() for t in g))
    far = copy.deepcopy(model)
    with torch.no_grad():
        for q, t in zip(far.parameters(), g, strict=True):
            q.add_(rho * t / norm)
    params = list(far.parameters())
    vectors = sample_probes(params, probes, "rademacher", seed=seed)
    total = CE(far(x), y) + lam * sq_trace(CE(far(x), y), params, probe_vectors=vectors,
                                           create_graph=True) / x.shape[0]
    grads = torch.autograd.grad(total, params)
    return [t - lr * gr for t, gr in zip(theta, grads, strict=True)]


def test_sam_plus_fa_update_equals_the_hand_written_two_step_update():
    model = tiny_mlp()
    x, y = tiny_batch()
    expected = _hand_sam_fa_update(model, x, y, rho=0.2, lam=0.5, probes=3, seed=4, lr=0.1)
    method = make_method("sam+fa", model, CE, rho=0.2, lam=0.5, probes=3, every=1, seed=4)
    info = method.step(x, y, torch.optim.SGD(model.parameters(), lr=0.1))
    for p, e in zip(model.parameters(), expected, strict=True):
        torch.testing.assert_close(p.detach(), e, rtol=1e-10, atol=1e-12)
    assert set(info) == {"loss", "perturbed_loss", "penalty", "sq_trace"}
    assert info["perturbed_loss"] > info["loss"]


def test_composition_with_zero_strengths_is_the_component_alone():
    x, y = tiny_batch()
    a, b = tiny_mlp(), tiny_mlp()
    make_method("sam+fa", a, CE, rho=0.3, lam=0.0).step(x, y, torch.optim.SGD(a.parameters(), lr=0.1))
    make_method("sam", b, CE, rho=0.3).step(x, y, torch.optim.SGD(b.parameters(), lr=0.1))
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters(), strict=True))


def test_keywords_are_routed_by_name_or_prefix():
    cls = method_class("fa+nrs")
    routed = cls.route({"seed": 3, "fa.probes": 2, "eps": 0.2, "alpha": 0.5})
    assert routed == {"fa": {"seed": 3, "probes": 2}, "nrs": {"seed": 3, "eps": 0.2, "alpha": 0.5}}
    assert cls.accepts("probes") and cls.accepts("nrs.alpha") and not cls.accepts("rho")
    assert cls.hparam == "lam" and cls.default_grid == method_class("fa").default_grid
    with pytest.raises(TypeError, match="rho"):
        cls.route({"rho": 0.1})
    with pytest.raises(TypeError, match="sam"):
        cls.route({"sam.rho": 0.1})
    method = make_method("fa+nrs", tiny_mlp(), CE, lam=0.1, eps=0.2, seed=3, **{"fa.probes": 2})
    assert method.parts["fa"].penalty.probes == 2 and method.parts["nrs"].eps == 0.2


def test_composed_state_dict_round_trip_resumes_identically():
    x, y = tiny_batch()
    a = tiny_mlp()
    method = make_method("rpr+fa", a, CE, eps=0.3, lam=0.1, probes=2, every=1, seed=1)
    method.step(x, y, torch.optim.SGD(a.parameters(), lr=0.1))
    b = copy.deepcopy(a)
    twin = make_method("rpr+fa", b, CE, eps=0.3, lam=0.1, probes=2, every=1, seed=9)
    twin.load_state_dict(copy.deepcopy(method.state_dict()))
    method.step(x, y, torch.optim.SGD(a.parameters(), lr=0.1))
    twin.step(x, y, torch.optim.SGD(b.parameters(), lr=0.1))
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters(), strict=True))


def test_run_names_and_defaults_come_from_the_method_classes():
    [spec] = build_grid("breast-cancer-mlp", "fa", [0.01], seeds=1)
    assert spec.name == "fa_lam0.01_seed0" and spec.method_kwargs == {"probes": 5, "every": 10}
    [tagged] = build_grid("breast-cancer-mlp", "fa", [0.01], seeds=1, method_kwargs={"probes": 2})
    assert tagged.name.startswith("fa_lam0.01_k") and tagged.name.endswith("_seed0")
    assert default_values("fa") == [0.0, 0.001, 0.01, 0.1, 1.0]
    assert default_values("sam") == [0.01, 0.05, 0.1]
    [both] = build_grid("breast-cancer-mlp", "sam+fa", [0.05], seeds=1)
    assert both.name == "sam+fa_rho0.05_seed0" and both.method_kwargs == {"probes": 5, "every": 10}


@pytest.mark.slow
def test_sam_plus_fa_trains_on_breast_cancer_from_the_cli(tmp_path, capsys):
    code = main([
        "run", "breast-cancer-mlp", "--method", "sam+fa", "--lambdas", "0.05",
        "--method-arg", "lam=0.01", "--seeds", "1", "--epochs", "2", "--out", str(tmp_path),
        "--quiet", "--no-plots",
    ])
    assert code == 0
    [path] = (tmp_path / "breast-cancer-mlp").glob("sam+fa_rho0.05_k*_seed0_p*.json")
    record = json.loads(path.read_text())
    assert record["method"] == "sam+fa" and record["method_kwargs"]["lam"] == 0.01
    assert record["final_test_acc"] > 0.8
    assert record["avg_train_sq_trace_per_B"] > 0  # FA's own Tr(H²) estimates were logged
    assert main(["run", "breast-cancer-mlp", "--method", "sam+rpr", "--out", str(tmp_path)]) == 2
    assert "at most one" in capsys.readouterr().err
