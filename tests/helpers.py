"""Small real Lightning modules and data for the tests (generated in code; nothing downloads)."""

from __future__ import annotations

from typing import Any

import pytorch_lightning as pl
import torch
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset


def regression_data(n: int = 64, d: int = 4, seed: int = 0) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g)
    y = torch.sin(x.sum(1, keepdim=True)) + 0.1 * torch.randn(n, 1, generator=g)
    return TensorDataset(x, y)


class MLPModule(pl.LightningModule):
    """An ordinary LightningModule: nothing in it knows about lightning_bv."""

    def __init__(
        self,
        d: int = 4,
        width: int = 16,
        lr: float = 0.05,
        n: int = 64,
        batch_size: int = 16,
        deterministic_sampler: bool = False,
        optimizer: str = "sgd",
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = nn.Sequential(
            nn.Linear(d, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU(), nn.Linear(width, 1)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = nn.functional.mse_loss(self(x), y)
        self.log("train_loss", loss)
        return loss

    def configure_optimizers(self):
        if self.hparams.optimizer == "adam":
            return torch.optim.Adam(self.parameters(), lr=self.hparams.lr)
        return torch.optim.SGD(self.parameters(), lr=self.hparams.lr, momentum=0.9)

    def train_dataloader(self):
        ds = regression_data(self.hparams.n, self.hparams.d)
        if self.hparams.deterministic_sampler:
            # same global batches on 1 and 2 processes: rank r takes every other sample of each global batch
            sampler = DistributedSampler(ds, self.trainer.world_size, self.trainer.global_rank, shuffle=False)
            return DataLoader(ds, batch_size=self.hparams.batch_size // self.trainer.world_size, sampler=sampler)
        return DataLoader(ds, batch_size=self.hparams.batch_size)


class EvalMLP(MLPModule):
    """``MLPModule`` with a validation and a test split (``val_loss``, ``test_loss``)."""

    def _loss(self, batch):
        x, y = batch
        return nn.functional.mse_loss(self(x), y)

    def validation_step(self, batch, batch_idx):
        self.log("val_loss", self._loss(batch))

    def test_step(self, batch, batch_idx):
        self.log("test_loss", self._loss(batch))

    def val_dataloader(self):
        return DataLoader(regression_data(32, self.hparams.d, seed=1), batch_size=16)

    test_dataloader = val_dataloader


class ManualMLP(MLPModule):
    """``MLPModule`` with manual optimization (``automatic_optimization = False``)."""

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.automatic_optimization = False

    def training_step(self, batch, batch_idx):
        opt = self.optimizers()
        opt.zero_grad()
        loss = super().training_step(batch, batch_idx)
        self.manual_backward(loss)
        opt.step()
        return loss


def trainer(**kwargs) -> pl.Trainer:
    defaults = {
        "accelerator": "cpu",
        "devices": 1,
        "max_steps": 8,
        "logger": False,
        "enable_checkpointing": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "log_every_n_steps": 1,
    }
    defaults.update(kwargs)
    return pl.Trainer(**defaults)


class SaveWeights(pl.Callback):
    """Save every rank's final weights (picklable, for ddp_spawn)."""

    def __init__(self, folder: str) -> None:
        self.folder = folder

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        state = {k: v.detach().cpu().clone() for k, v in pl_module.state_dict().items()}
        torch.save(state, f"{self.folder}/rank{trainer.global_rank}.pt")


def neurons_killed_after_rescales(net, x, tau: float, seed: int) -> list[dict[str, list[int]]]:
    """Which neurons ``lightning_bv.prox_(tau)`` kills in copies of ``net``: as is, after ``balance_``, and after a
    random positive per-neuron rescale (all three keep the function)."""
    import copy

    import lightning_bv as lbv
    from lightning_bv.functional.rbv import _rescale_

    died = []
    for how in ("none", "balance", "random"):
        m = copy.deepcopy(net)
        g = lbv.find_neurons(m, x)
        if how == "balance":
            lbv.balance_(g)
        elif how == "random":
            torch.manual_seed(seed)
            with torch.no_grad():
                for grp in g:
                    _rescale_(grp, torch.rand(grp.num_neurons) * 10 + 0.1)
        lbv.prox_(g, tau)
        died.append({n: (s == 0).nonzero().flatten().tolist() for n, s in lbv.neuron_scores(g).items()})
    return died


class ShardedMLP(MLPModule):
    """``MLPModule`` whose ``configure_model`` shards it with FSDP2 under ``ModelParallelStrategy`` (as a user would:
    ``fully_shard`` on each Linear, then on the net); on one process it is the plain ``MLPModule``."""

    def configure_model(self) -> None:
        from torch.distributed.fsdp import FSDPModule, fully_shard

        if self.device_mesh is None or isinstance(self.net, FSDPModule):  # one process; or already sharded
            return
        mesh = self.device_mesh["data_parallel"]
        for layer in self.net:
            if isinstance(layer, nn.Linear):  # a lifted or low-rank layer is one too
                fully_shard(layer, mesh=mesh)
        fully_shard(self.net, mesh=mesh)


def fsdp2_strategy() -> pl.strategies.Strategy:
    """Lightning's FSDP2 on 2 CPU processes (the default sizes would put both on the tensor-parallel axis)."""
    from pytorch_lightning.strategies import ModelParallelStrategy

    return ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1)


def gathered_state(module: nn.Module) -> dict[str, torch.Tensor]:
    """The module's whole state dict on every rank (DTensors gathered: a collective, so every rank calls it)."""
    out = {}
    for k, v in module.state_dict().items():
        v = v.full_tensor() if hasattr(v, "full_tensor") else v
        out[k] = v.detach().cpu().clone()
    return out


def snapshot(model: nn.Module) -> dict[str, Any]:
    """Everything a failed call must leave as it was."""
    return {
        "state": {k: v.detach().clone() for k, v in model.state_dict().items()},
        "types": [(n, type(m)) for n, m in model.named_modules()],
        "params": [(n, id(p)) for n, p in model.named_parameters()],
        "grads": [None if p.grad is None else p.grad.clone() for p in model.parameters()],
        "hooks": [
            (len(m._forward_hooks), len(m._forward_pre_hooks), len(m._load_state_dict_pre_hooks))
            for m in model.modules()
        ],
        "training": [m.training for m in model.modules()],
    }


def assert_unchanged(model: nn.Module, before: dict[str, Any]) -> None:
    after = snapshot(model)
    for key in ("types", "params", "hooks", "training"):
        assert after[key] == before[key], key
    assert list(after["state"]) == list(before["state"])
    for k, v in before["state"].items():
        torch.testing.assert_close(after["state"][k], v, rtol=0, atol=0, equal_nan=True, msg=k)
    for g, h in zip(after["grads"], before["grads"]):
        assert (g is None) == (h is None)
        if g is not None:
            torch.testing.assert_close(g, h, rtol=0, atol=0, equal_nan=True)
