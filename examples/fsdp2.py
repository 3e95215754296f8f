"""Sharded training (FSDP2) with lightning_bv: the digits MLP split across 2 processes, regularized, pruned at the end.

The model is an ordinary LightningModule that builds its layers in ``__init__`` and shards them in
``configure_model`` with torch's ``fully_shard``, as Lightning's ``ModelParallelStrategy`` expects. The callbacks need
no change for it: the proximal step works on each process's rows of every weight (one all-reduce of the neuron norms
per group), and ``NeuronPruning`` compacts the gathered model on rank 0 at the end (``compacted.ckpt``).

    python examples/fsdp2.py [--devices 2] [--accelerator cpu] [--epochs 10] [--out fsdp2_logs] [--smoke]

On a machine without GPUs it runs on 2 CPU processes over gloo (``--accelerator cpu``, the default here).
"""

from __future__ import annotations

import argparse

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from pytorch_lightning.callbacks import ModelCheckpoint
from pytorch_lightning.loggers import CSVLogger
from pytorch_lightning.strategies import ModelParallelStrategy
from torch import nn
from torch.distributed.fsdp import FSDPModule, fully_shard

from lightning_bv.callbacks import BVMonitor, NeuronPruning, RBVRegularization
from lightning_bv.modules.data import DigitsData


class ShardedClassifier(pl.LightningModule):
    def __init__(self, width: int = 256, lr: float = 0.05) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = nn.Sequential(
            nn.Linear(64, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU(), nn.Linear(width, 10)
        )
        self.example_input_array = torch.zeros(2, 64)  # the callbacks find the neurons (and lift the chain) at setup

    def configure_model(self) -> None:
        if self.device_mesh is None or isinstance(self.net, FSDPModule):  # not sharded, or already sharded
            return
        mesh = self.device_mesh["data_parallel"]
        for layer in self.net:
            if isinstance(layer, nn.Linear):
                fully_shard(layer, mesh=mesh)
        fully_shard(self.net, mesh=mesh)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        self.log("train_loss", loss)
        return loss

    def test_step(self, batch, batch_idx):
        x, y = batch
        self.log("test_acc", (self(x).argmax(1) == y).float().mean(), sync_dist=True)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.hparams.lr, momentum=0.9)


def main(argv: list[str] | None = None) -> dict[str, float]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--devices", type=int, default=2)
    p.add_argument("--accelerator", default="cpu")
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--lam", type=float, default=0.003)
    p.add_argument("--out", default="fsdp2_logs")
    p.add_argument("--smoke", action="store_true", help="one epoch, to check that it runs")
    args = p.parse_args(argv)
    if args.smoke:
        args.epochs = 1
    pl.seed_everything(0)
    pruning = NeuronPruning()
    trainer = pl.Trainer(
        accelerator=args.accelerator,
        devices=args.devices,
        # data parallel only: the default sizes would put the processes on the tensor-parallel axis
        strategy=ModelParallelStrategy(data_parallel_size=args.devices, tensor_parallel_size=1),
        max_epochs=args.epochs,
        logger=CSVLogger(args.out),
        callbacks=[RBVRegularization(lam=args.lam), BVMonitor(), pruning, ModelCheckpoint(save_top_k=0)],
        enable_progress_bar=False,
    )
    model, data = ShardedClassifier(), DigitsData(batch_size=64)
    trainer.fit(model, data)
    result = {"test_acc": float(trainer.test(model, data, verbose=False)[0]["test_acc"])}
    if trainer.is_global_zero and pruning.report is not None:
        r = pruning.report
        result.update(neurons_before=r.neurons_before, neurons_after=r.neurons_after)
        print(
            f"test accuracy {result['test_acc']:.4f} (sharded model); compacted on rank 0: {r.neurons_before} -> "
            f"{r.neurons_after} neurons, saved to {pruning.checkpoint_path}"
        )
    return result


if __name__ == "__main__":
    main()
