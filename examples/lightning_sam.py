"""PyTorch Lightning, manual optimization: SAM, GNP or NRS as optimizer wrappers.

They are driven by ``optimizer.step(closure)``, on a network with BatchNorm, whose running
statistics are updated once per step (the wrappers get ``model=self``: their extra passes update
nothing).

Needs ``pip install 'flatness[lightning]'``. About 15 s on a CPU.

    python examples/lightning_sam.py --method sam   # or gnp, nrs
"""

import argparse
import warnings
from pathlib import Path

import lightning.pytorch as pl
import torch
from torch import nn

from _digits import digits_loaders
from flatness.methods.gnp import GNP
from flatness.methods.nrs import NRS
from flatness.methods.sam import SAM

F = nn.functional


class SharpnessAwareMLP(pl.LightningModule):
    def __init__(self, method: str = "sam"):
        super().__init__()
        self.automatic_optimization = False  # the wrappers run their own passes
        self.method = method
        self.net = nn.Sequential(nn.Linear(64, 64), nn.BatchNorm1d(64), nn.ReLU(), nn.Linear(64, 10))

    def forward(self, x):
        return self.net(x)

    def configure_optimizers(self):
        if self.method == "sam":
            return SAM(self.parameters(), torch.optim.SGD, rho=0.05, model=self, lr=0.05, momentum=0.9)
        if self.method == "gnp":
            return GNP(self.parameters(), torch.optim.SGD, rho=0.05, fd_radius=0.1, model=self, lr=0.05, momentum=0.9)
        return NRS(self.parameters(), torch.optim.SGD, eps=0.1, alpha=1.0, seed=0, model=self, lr=0.05, momentum=0.9)

    def training_step(self, batch, batch_idx):
        x, y = batch
        opt = self.optimizers()
        if self.method == "nrs":  # the wrapper runs every pass: the closure only computes
            def closure():
                out = self(x)
                return F.cross_entropy(out, y), out

            loss = opt.step(closure=closure, backward=self.manual_backward)
        else:  # SAM / GNP: the gradient at θ first, then the closure at the perturbed point
            def closure():
                loss = F.cross_entropy(self(x), y)
                self.manual_backward(loss)
                return loss

            opt.zero_grad()
            loss = closure()  # at θ: BatchNorm's running statistics are updated here, once
            opt.step(closure=closure)
        self.log("train_loss", loss, prog_bar=False)

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_acc", (self(x).argmax(1) == y).float().mean())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--method", choices=["sam", "gnp", "nrs"], default="sam")
    parser.add_argument("--out", type=Path, default=Path("runs/lightning_sam"))
    parser.add_argument("--epochs", type=int, default=2)
    args = parser.parse_args()
    pl.seed_everything(0, verbose=False)
    train, val = digits_loaders()
    module = SharpnessAwareMLP(args.method)
    trainer = pl.Trainer(
        max_epochs=args.epochs, accelerator="cpu", devices=1, default_root_dir=str(args.out), logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
    )
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*(num_workers|LeafSpec).*")
        trainer.fit(module, train, val)
    bn = module.net[1]
    print(f"{args.method}: val_acc {float(trainer.callback_metrics['val_acc']):.3f} after {trainer.global_step} steps; "
          f"BatchNorm counted {int(bn.num_batches_tracked)} batches (once per step)")


if __name__ == "__main__":
    main()
