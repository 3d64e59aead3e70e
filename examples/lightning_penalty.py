"""PyTorch Lightning: the FA penalty in ``training_step`` (automatic optimization).

A CurvatureCallback writes λ_max, Tr(H), Tr(H²)/B to TensorBoard every 20 steps.

Needs ``pip install 'flatness[lightning,tensorboard]'``. About 15 s on a CPU.

    python examples/lightning_penalty.py --out runs/lightning_penalty
    tensorboard --logdir runs/lightning_penalty
"""

import argparse
import warnings
from pathlib import Path

import lightning.pytorch as pl
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from torch import nn

from _digits import digits_loaders
from flatness import FlatnessPenalty
from flatness.integrations.lightning import CurvatureCallback

F = nn.functional


class PenalisedMLP(pl.LightningModule):
    def __init__(self, lam: float = 0.01):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))
        self.loss_fn = F.cross_entropy  # CurvatureCallback measures this loss
        self.penalty = FlatnessPenalty(self.net, self.loss_fn, lam=lam, probes=5, every=10, seed=0)

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = self.loss_fn(self.net(x), y)
        self.log("train_loss", loss)
        return loss + self.penalty(x, y)  # the penalty: one more term (zero on 9 steps in 10)

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_acc", (self(x).argmax(1) == y).float().mean())

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=1e-3)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("runs/lightning_penalty"))
    parser.add_argument("--epochs", type=int, default=2)
    args = parser.parse_args()
    pl.seed_everything(0, verbose=False)
    train, val = digits_loaders()
    logger = TensorBoardLogger(str(args.out), name="digits")
    trainer = pl.Trainer(
        max_epochs=args.epochs, accelerator="cpu", devices=1, logger=logger,
        callbacks=[CurvatureCallback(every=20)], enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, log_every_n_steps=10,
    )
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*(num_workers|LeafSpec).*")
        trainer.fit(PenalisedMLP(), train, val)
    metrics = {k: round(float(v), 4) for k, v in trainer.callback_metrics.items()
               if k in ("val_acc", "curvature/lambda_max", "curvature/hessian_trace")}
    print(f"final: {metrics}; TensorBoard event files in {logger.log_dir}")


if __name__ == "__main__":
    main()
