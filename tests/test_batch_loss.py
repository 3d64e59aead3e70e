"""Any batch, any loss: a model that takes a dict batch and computes its own loss, declared with
ModelLoss(fn(model, batch)), gets the same penalty, method steps and measures as the same model with
loss_fn(output, target) on (x, y) batches; what needs the output says so in one line.
"""

import pytest
import torch
from torch import nn

from flatness import FlatnessError, FlatnessPenalty, ModelLoss
from flatness.measures import MEASURES, HessianOperator, MeasureOptions, compute_measures, fisher_trace, hessian_trace
from flatness.measures.summary import NEEDS_OUTPUT
from flatness.methods import make_method

F = nn.functional


class DictNet(nn.Module):
    """``model(features=..., labels=...)`` is the batch-mean loss; ``model(features)`` the logits."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.lin = nn.Linear(5, 8)
        self.bn = nn.BatchNorm1d(8)
        self.out = nn.Linear(8, 3)

    def forward(self, features, labels=None):
        logits = self.out(torch.tanh(self.bn(self.lin(features))))
        return logits if labels is None else F.cross_entropy(logits, labels)


LOSS = ModelLoss(lambda model, batch: model(**batch))


def _batch(n: int = 16, seed: int = 1) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "features": torch.randn(n, 5, generator=g, dtype=torch.float64),
        "labels": torch.randint(0, 3, (n,), generator=g),
    }


def _pair(batch):
    return batch["features"], batch["labels"]


def _net() -> DictNet:
    return DictNet().double()


@pytest.mark.parametrize("backend", ["auto", "autograd", "finite-difference"])
def test_penalty_on_a_dict_batch_is_the_penalty_on_x_y(backend):
    batch = _batch()
    a, b = _net(), _net()
    pa = FlatnessPenalty(a, LOSS, lam=0.3, probes=3, seed=0, backend=backend)
    pb = FlatnessPenalty(b, F.cross_entropy, lam=0.3, probes=3, seed=0, backend=backend)
    va, vb = pa(batch), pb(*_pair(batch))
    va.backward()
    vb.backward()
    assert float(va) == pytest.approx(float(vb), rel=1e-10)
    for p, q in zip(a.parameters(), b.parameters(), strict=True):
        assert torch.allclose(p.grad, q.grad, rtol=1e-8, atol=1e-12)
    # objective(batch): the task loss and the sum, from the same module
    loss, total = pa.objective(batch)
    assert float(loss) == pytest.approx(float(F.cross_entropy(b(*_pair(batch)[:1]), batch["labels"])), rel=1e-12)


def test_batch_size_is_inferred_or_given():
    batch = _batch()
    inferred = FlatnessPenalty(_net(), LOSS, lam=1.0, probes=2, seed=0, backend="autograd")
    given = FlatnessPenalty(_net(), ModelLoss(LOSS.fn, batch_size=8), lam=1.0, probes=2, seed=0, backend="autograd")
    assert float(given(batch)) == pytest.approx(2 * float(inferred(batch)), rel=1e-12)  # λ·Tr(H²)/B
    with pytest.raises(FlatnessError, match="batch size"):
        ModelLoss(LOSS.fn).size_of({"mask": None})
    with pytest.raises(ValueError, match="batch_size"):
        ModelLoss(LOSS.fn, batch_size=0)


@pytest.mark.parametrize("kw", [{"backend": "layerwise"}, {"backend": "kfac"}, {"estimator": "cv"}])
def test_backends_that_need_the_output_say_so(kw):
    with pytest.raises(ValueError, match="needs the model output, and a ModelLoss gives only the loss"):
        FlatnessPenalty(_net(), LOSS, **kw)


def test_a_penalty_with_a_model_loss_takes_the_whole_batch():
    with pytest.raises(TypeError, match=r"penalty\(batch\)"):
        FlatnessPenalty(_net(), LOSS)(_batch(), torch.zeros(3))


HPARAMS = {"none": {}, "fa": {"lam": 0.2, "seed": 0, "probes": 2}, "sam": {"rho": 0.1}, "gnp": {"rho": 0.05},
           "rpr": {"eps": 0.1, "seed": 0}, "curvature": {"alpha": 0.05}}


@pytest.mark.parametrize("name", sorted(HPARAMS))
def test_every_method_steps_on_dict_batches_as_on_x_y(name):
    a, b = _net(), _net()
    ma = make_method(name, a, LOSS, **HPARAMS[name])
    mb = make_method(name, b, nn.CrossEntropyLoss(), **HPARAMS[name])
    oa, ob = torch.optim.SGD(a.parameters(), lr=0.1), torch.optim.SGD(b.parameters(), lr=0.1)
    for seed in range(2):
        batch = _batch(seed=seed)
        ia = ma.step(batch, oa)
        ib = mb.step(*_pair(batch), ob)
        assert sorted(ia) == sorted(ib)
    for (n, p), q in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        assert torch.allclose(p.double(), q.double(), rtol=1e-9, atol=1e-12), n


def test_nrs_needs_the_output_and_says_so():
    with pytest.raises(ValueError, match="nrs needs the model output"):
        make_method("nrs", _net(), LOSS)


def test_every_measure_on_dict_batches_is_the_measure_on_x_y():
    a = _net().eval()
    batches = [_batch(12, seed=3), _batch(20, seed=4)]
    names = [m for m in MEASURES if m not in NEEDS_OUTPUT]
    initial = {k: v + 0.01 for k, v in a.state_dict().items()}
    options = MeasureOptions(matvecs=8, k=2, sharpness_steps=3, noise_samples=3, pacbayes_samples=2, initial=initial)
    on_dicts = compute_measures(a, LOSS, batches, names, options)
    on_pairs = compute_measures(a, F.cross_entropy, [_pair(b) for b in batches], names, options)
    assert sorted(on_dicts) == sorted(on_pairs)
    for key, value in on_pairs.items():
        if isinstance(value, float):
            assert on_dicts[key] == pytest.approx(value, rel=1e-8, abs=1e-12), key
    # direct calls of the measure functions, and the operator, take it too
    assert hessian_trace(a, LOSS, batches, 6).value == pytest.approx(
        hessian_trace(a, F.cross_entropy, [_pair(b) for b in batches], 6).value, rel=1e-10)
    assert fisher_trace(a, LOSS, batches).value == pytest.approx(
        fisher_trace(a, F.cross_entropy, [_pair(b) for b in batches]).value, rel=1e-10)
    H, G = HessianOperator(a, LOSS, batches), HessianOperator(a, F.cross_entropy, [_pair(b) for b in batches])
    assert torch.allclose(H.dense(), G.dense(), rtol=1e-10, atol=1e-12)


def test_measures_of_the_output_say_so():
    for name in sorted(NEEDS_OUTPUT):
        with pytest.raises(FlatnessError, match="need the model's output"):
            compute_measures(_net(), LOSS, [_batch()], [name])
