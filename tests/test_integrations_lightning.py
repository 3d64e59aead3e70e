"""Lightning, for real: CurvatureCallback into TensorBoard event files, the penalty under automatic
optimization, SAM/GNP/NRS under manual optimization with BatchNorm statistics updated once per step.
"""

import warnings

import pytest
import torch
from torch import nn

pl = pytest.importorskip("lightning.pytorch")  # a guard for installs without the extra; CI has it

from flatness import FlatnessError, FlatnessPenalty  # noqa: E402
from flatness.batch_loss import ModelLoss  # noqa: E402
from flatness.integrations.lightning import CurvatureCallback  # noqa: E402
from flatness.methods import make_method  # noqa: E402
from flatness.methods.gnp import GNP  # noqa: E402
from flatness.methods.nrs import NRS  # noqa: E402
from flatness.methods.sam import SAM  # noqa: E402

F = nn.functional
STEPS = 4
pytestmark = pytest.mark.filterwarnings("ignore:.*LeafSpec.*:DeprecationWarning")  # inside Lightning 2.6


def _net(dropout: float = 0.2) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Dropout(dropout), nn.Linear(16, 3))


# the SAM and GNP wrappers leave the dropout mask to the closure (the methods replay the clean
# pass's mask), so they are compared with the methods without dropout; NRS replays it itself
DROPOUT = {"sam": 0.0, "gnp": 0.0, "nrs": 0.2}


def _data() -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(3)
    return [(torch.randn(16, 6, generator=g), torch.randint(0, 3, (16,), generator=g)) for _ in range(STEPS)]


def _loader() -> torch.utils.data.DataLoader:
    """The batches of :func:`_data`, in order."""
    x, y = (torch.cat(t) for t in zip(*_data(), strict=True))
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=16, shuffle=False)


def _fit(module: "pl.LightningModule", callbacks=(), logger=False, steps: int = STEPS) -> "pl.Trainer":
    trainer = pl.Trainer(
        max_steps=steps, accelerator="cpu", devices=1, logger=logger, callbacks=list(callbacks),
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        log_every_n_steps=1, num_sanity_val_steps=0,
    )
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*(num_workers|does not have many workers|log_every_n_steps).*")
        trainer.fit(module, train_dataloaders=_loader())
    return trainer


class Plain(pl.LightningModule):
    def __init__(self, lam: float = 0.0):
        super().__init__()
        self.net = _net()
        self.loss_fn = F.cross_entropy
        self.penalty = FlatnessPenalty(self.net, F.cross_entropy, lam=lam, probes=2, seed=0) if lam else None

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.cross_entropy(self.net(x), y)
        if self.penalty is not None:
            loss = loss + self.penalty(x, y)
        self.log("train_loss", loss, batch_size=len(x))
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def _state(module: nn.Module) -> list[torch.Tensor]:
    return [t.detach().clone() for t in module.state_dict().values()]


def test_callback_logs_curvature_to_tensorboard_and_leaves_the_run_unchanged(tmp_path):
    from lightning.pytorch.loggers import TensorBoardLogger
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    torch.manual_seed(1)
    plain = Plain()
    _fit(plain)
    torch.manual_seed(1)
    watched = Plain()
    logger = TensorBoardLogger(str(tmp_path), name="tb")
    callback = CurvatureCallback(every=2)
    _fit(watched, [callback], logger)

    for a, b in zip(_state(plain), _state(watched), strict=True):  # weights, BN statistics: bitwise the same run
        assert torch.equal(a, b)
    events = EventAccumulator(logger.log_dir)
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"curvature/lambda_max", "curvature/hessian_trace", "curvature/hessian_sq_trace_per_B",
            "curvature/seconds", "curvature/hvps"} <= tags
    assert [e.step for e in events.Scalars("curvature/lambda_max")] == [2, 4]
    assert all(e.value > 0 for e in events.Scalars("curvature/lambda_max"))
    assert callback.last is not None and callback.last["step"] == 4
    logged = float(watched.trainer.callback_metrics["curvature/lambda_max"])
    assert logged == pytest.approx(callback.last["lambda_max"], rel=1e-6)


def test_callback_on_a_given_dict_batch_with_a_model_loss(tmp_path):
    from lightning.pytorch.loggers import CSVLogger

    class DictModule(Plain):
        def forward(self, features, labels):
            return F.cross_entropy(self.net(features), labels)

    x, y = _data()[0]
    callback = CurvatureCallback(
        every=3, measures=["lambda_max"], batch={"features": x, "labels": y},
        loss_fn=ModelLoss(lambda m, b: m(**b)),
    )
    logger = CSVLogger(str(tmp_path), name="csv")
    _fit(DictModule(), [callback], logger)
    header = (tmp_path / "csv" / "version_0" / "metrics.csv").read_text().splitlines()[0].split(",")
    assert "curvature/lambda_max" in header and "curvature/eigen_matvecs" in header


def test_callback_without_a_loss_says_so():
    class NoLoss(Plain):
        def __init__(self):
            super().__init__()
            del self.loss_fn

    with pytest.raises(FlatnessError, match="needs a loss"):
        _fit(NoLoss(), [CurvatureCallback(every=1)])


def test_penalty_under_automatic_optimization_is_the_hand_written_loop():
    torch.manual_seed(1)
    module = Plain(lam=0.05)
    _fit(module)
    assert module.penalty.last_sq_trace is not None and module.penalty.calls == STEPS

    torch.manual_seed(1)
    net = _net()
    penalty = FlatnessPenalty(net, F.cross_entropy, lam=0.05, probes=2, seed=0)
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    net.train()
    for x, y in _loader():  # as Lightning: the loader's iterator draws its base seed
        opt.zero_grad()
        (F.cross_entropy(net(x), y) + penalty(x, y)).backward()
        opt.step()
    for a, b in zip(_state(module.net), _state(net), strict=True):
        assert torch.allclose(a.float(), b.float(), rtol=1e-5, atol=1e-6)


class Manual(pl.LightningModule):
    """SAM / GNP (the closure recomputes loss and gradient) and NRS (the wrapper runs the passes)."""

    def __init__(self, name: str):
        super().__init__()
        self.automatic_optimization = False
        self.net = _net(DROPOUT[name])
        self.name = name

    def forward(self, x):
        return self.net(x)

    def configure_optimizers(self):
        if self.name == "sam":
            return SAM(self.parameters(), torch.optim.SGD, rho=0.1, model=self, lr=0.1)
        if self.name == "gnp":
            return GNP(self.parameters(), torch.optim.SGD, rho=0.05, fd_radius=0.1, model=self, lr=0.1)
        return NRS(self.parameters(), torch.optim.SGD, eps=0.2, alpha=1.0, seed=4, model=self, lr=0.1)

    def training_step(self, batch, batch_idx):
        x, y = batch
        opt = self.optimizers()
        if self.name == "nrs":
            def closure():
                out = self(x)
                return F.cross_entropy(out, y), out

            loss = opt.step(closure=closure, backward=self.manual_backward)
        else:
            def closure():
                loss = F.cross_entropy(self(x), y)
                self.manual_backward(loss)
                return loss

            opt.zero_grad()
            loss = closure()
            opt.step(closure=closure)
        self.log("train_loss", loss, batch_size=len(x))


@pytest.mark.parametrize("name", ["sam", "gnp", "nrs"])
def test_sam_gnp_nrs_under_manual_optimization_are_the_methods_with_bn_updated_once(name):
    torch.manual_seed(1)
    module = Manual(name)
    trainer = _fit(module)
    assert trainer.global_step == STEPS
    assert int(module.net[1].num_batches_tracked) == STEPS  # once per step

    torch.manual_seed(1)
    net = _net(DROPOUT[name])
    hp = {"sam": {"rho": 0.1}, "gnp": {"rho": 0.05, "fd_radius": 0.1}, "nrs": {"eps": 0.2, "alpha": 1.0, "seed": 4}}
    method = make_method(name, net, nn.CrossEntropyLoss(), **hp[name])
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    net.train()
    for x, y in _loader():  # as Lightning: the loader's iterator draws its base seed
        method.step(x, y, opt)
    for a, b in zip(_state(module.net), _state(net), strict=True):
        assert torch.allclose(a.float(), b.float(), rtol=1e-4, atol=1e-6)
