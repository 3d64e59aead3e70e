"""Nothing the penalty shares with the task pass outlives the weights it was computed from
(issue 30, finding 1 and item 2): the shared first layer (layer-wise closed form), the shared
prefix of K-FAC and of the control variate, and the K-FAC factors built on it.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn

from flatness import FlatnessPenalty
from flatness.linear_io import share_prefix
from flatness.methods import make_method
from helpers import tiny_batch

CE = nn.CrossEntropyLoss()

# each cache: what the estimator takes from the task forward
CACHES = {
    "first layer (layerwise)": {"backend": "layerwise"},
    "prefix (kfac factors)": {"backend": "kfac"},
    "prefix (control variate)": {"estimator": "cv", "backend": "autograd"},
    "prefix (control variate, layer-wise engine)": {"estimator": "cv", "backend": "layerwise"},
}


def _model(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Dropout(0.3), nn.Linear(6, 5), nn.Tanh(),
                         nn.Linear(5, 3)).double()


def _fresh(model: nn.Module, x, y, kwargs) -> float:
    """The penalty at the current weights, computed from scratch (the same seed, first call)."""
    return float(FlatnessPenalty(model, CE, lam=1.0, probes=3, seed=0, **kwargs)(x, y).detach())


@pytest.mark.parametrize("what", ["optimizer step", "backward"])
@pytest.mark.parametrize("cache", list(CACHES))
def test_a_cache_that_a_step_or_a_backward_made_stale_is_recomputed(cache, what):
    """The task loss computed inside ``sharing()``, then ``backward()`` (and ``optimizer.step()``),
    then the penalty: the value at the current weights, a gradient, and one warning line.
    """
    kwargs = CACHES[cache]
    x, y = tiny_batch(seed=1, n=8, d_in=4)
    model = _model()
    twin = copy.deepcopy(model)
    penalty = FlatnessPenalty(model, CE, lam=1.0, probes=3, seed=0, **kwargs)
    opt, twin_opt = (torch.optim.SGD(m.parameters(), lr=0.5) for m in (model, twin))
    torch.manual_seed(7)
    with penalty.sharing():
        loss = CE(model(x), y)
    assert penalty._shared is not None  # the task forward was recorded
    loss.backward()
    torch.manual_seed(7)
    CE(twin(x), y).backward()
    if what == "optimizer step":
        opt.step()
        twin_opt.step()
    with pytest.warns(RuntimeWarning, match="recomputed"):
        value = penalty(x, y)
    assert float(value.detach()) == pytest.approx(_fresh(twin, x, y, kwargs), rel=1e-12)
    value.backward()  # its graph is its own: no "backward through the graph a second time"
    assert all(p.grad is not None for p in model.parameters())


@pytest.mark.parametrize("cache", list(CACHES))
def test_an_unchanged_cache_is_used_silently(cache):
    kwargs = CACHES[cache]
    x, y = tiny_batch(seed=1, n=8, d_in=4)
    model = _model().eval()  # no dropout: the shared forward is the curvature pass's
    penalty = FlatnessPenalty(model, CE, lam=1.0, probes=3, seed=0, **kwargs)
    with penalty.sharing():
        loss = CE(model(x), y)
    shared = penalty._shared
    assert shared is not None and not shared.stale()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # used, not recomputed: no warning
        value = penalty(x, y)
    assert float(value.detach()) == pytest.approx(_fresh(model, x, y, kwargs), rel=1e-12)
    (loss + value).backward()
    assert shared.stale()  # the backward went through it: it can never be used again


def test_the_record_knows_the_versions_it_was_computed_from():
    model = _model()
    x, _ = tiny_batch(seed=1, n=8, d_in=4)
    with share_prefix(model) as prefix:
        model(x)
    assert prefix.length == 2 and not prefix.stale()
    with torch.no_grad():
        model[0].bias.add_(0.0)  # any in-place update bumps the version
    assert prefix.stale()
    with share_prefix(model) as prefix:
        model(x)
    x.mul_(1.0)  # the input changed in place
    assert prefix.stale()
    with share_prefix(model) as prefix:
        model(x)
    with torch.no_grad():
        model[3].weight.add_(0.0)  # a layer after the prefix: the prefix's values still hold
    assert not prefix.stale()


@pytest.mark.parametrize("kwargs", [{"estimator": "cv", "backend": "layerwise"}, {"estimator": "cv"},
                                    {"backend": "kfac"}, {}])
def test_fa_steps_with_a_sub_batch_of_a_shared_forward_equal_the_unshared_ones(kwargs):
    """The layer-wise control variate on a sub-batch took the whole batch's shared input layer
    and failed from its second step (after auto's check) on; every step now equals a loop that
    shares nothing.
    """
    x, y = tiny_batch(seed=5, n=8, d_in=4)
    method_model, loop_model = _model(), _model()
    method = make_method("fa", method_model, CE, lam=0.3, probes=2, seed=1, sub_batch=3, **kwargs)
    loop = FlatnessPenalty(loop_model, CE, lam=0.3, probes=2, seed=1, sub_batch=3, **kwargs)
    opt_a, opt_b = (torch.optim.SGD(m.parameters(), lr=0.1) for m in (method_model, loop_model))
    for step in range(3):
        torch.manual_seed(step)
        method.step(x, y, opt_a)
        torch.manual_seed(step)
        opt_b.zero_grad()
        (CE(loop_model(x), y) + loop(x, y)).backward()
        opt_b.step()
    for a, b in zip(method_model.parameters(), loop_model.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-13)
