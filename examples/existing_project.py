"""A plain Lightning project (a LightningModule, a LightningDataModule, a Trainer) with lightning_bv added in 3 lines.

Nothing in the model or the data knows about lightning_bv. The three lines marked ``# lbv n/3`` are the
whole change: an import, a list of callbacks, and that list passed to the Trainer. They make the weight matrix between
the two ReLU layers a rank-32 product (LowRank: the linear bottleneck of the deep representer theorem), train with the
path-norm prox (RBVRegularization: unneeded neurons become exactly zero) and log the seminorm, the live neurons,
the ranks and the path-norms (BVMonitor) to the project's own logger, here a CSVLogger
(``<out>/lightning_logs/version_*/metrics.csv``).

    python examples/existing_project.py [--epochs 20] [--out existing_project_logs] [--smoke]
"""

from __future__ import annotations

import argparse
import warnings

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from pytorch_lightning.callbacks import ModelCheckpoint
from pytorch_lightning.loggers import CSVLogger
from torch import nn
from torch.utils.data import DataLoader, TensorDataset, random_split

from lightning_bv.callbacks import BVMonitor, LowRank, RBVRegularization  # lbv 1/3


class DigitsDataModule(pl.LightningDataModule):
    """scikit-learn's 8x8 digits as 1x8x8 images in [0, 1], split 80/10/10."""

    def __init__(self, batch_size: int = 64) -> None:
        super().__init__()
        self.batch_size = batch_size

    def setup(self, stage: str) -> None:
        from sklearn.datasets import load_digits

        images, labels = load_digits(return_X_y=True)
        x = torch.tensor(images, dtype=torch.float32).reshape(-1, 1, 8, 8) / 16.0
        y = torch.tensor(labels, dtype=torch.long)
        n_val = n_test = len(x) // 10
        self.train_set, self.val_set, self.test_set = random_split(
            TensorDataset(x, y), [len(x) - n_val - n_test, n_val, n_test], generator=torch.Generator().manual_seed(42)
        )

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.train_set, batch_size=self.batch_size, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val_set, batch_size=self.batch_size)

    def test_dataloader(self) -> DataLoader:
        return DataLoader(self.test_set, batch_size=self.batch_size)


class LitClassifier(pl.LightningModule):
    def __init__(self, hidden: int = 256, lr: float = 0.05) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.features = nn.Sequential(
            nn.Flatten(), nn.Linear(64, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU()
        )
        self.head = nn.Linear(hidden, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        self.log("train_loss", loss, prog_bar=True)
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        logits = self(x)
        self.log("val_loss", F.cross_entropy(logits, y), prog_bar=True)
        self.log("val_acc", (logits.argmax(1) == y).float().mean(), prog_bar=True)

    def test_step(self, batch, batch_idx):
        x, y = batch
        self.log("test_acc", (self(x).argmax(1) == y).float().mean())

    def configure_optimizers(self):
        optimizer = torch.optim.SGD(self.parameters(), lr=self.hparams.lr, momentum=0.9)
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=self.trainer.max_epochs)
        return {"optimizer": optimizer, "lr_scheduler": scheduler}


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--out", default="existing_project_logs")
    parser.add_argument("--smoke", action="store_true", help="one epoch of 4 batches, to check that it runs")
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore", ".*does not have many workers.*")
    pl.seed_everything(0, verbose=False)
    log_every = 2 if args.smoke else 10

    model = LitClassifier()
    data = DigitsDataModule()
    bv = [LowRank(rank=32, targets=["features.3"]), RBVRegularization(lam=0.003), BVMonitor(log_every)]  # lbv 2/3
    trainer = pl.Trainer(
        max_epochs=1 if args.smoke else args.epochs,
        limit_train_batches=4 if args.smoke else None,
        log_every_n_steps=log_every,
        logger=CSVLogger(args.out),
        callbacks=[ModelCheckpoint(monitor="val_acc", mode="max"), *bv],  # lbv 3/3
        enable_progress_bar=False,
    )
    trainer.fit(model, datamodule=data)
    result = {k: float(v) for k, v in trainer.callback_metrics.items()}  # the last logged values
    result["test_acc"] = float(trainer.test(model, datamodule=data, verbose=False)[0]["test_acc"])
    print(f"test accuracy {result['test_acc']:.4f}; metrics in {trainer.logger.log_dir}/metrics.csv")
    for key in ("bv/rbv_norm", "bv/active_neurons", "bv/path_norm_l2"):
        if key in result:
            print(f"  {key} = {result[key]:.4g}")
    return result


if __name__ == "__main__":
    main()
