"""The first-training-step runner that callbacks use at setup, on real Trainers."""

from __future__ import annotations

import pytorch_lightning as pl
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_bv.callbacks._first_step import first_train_batch, run_first_training_step
from tests.helpers import MLPModule, trainer


class BNModule(MLPModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 1))


class Probe(pl.Callback):
    """Runs the first training step at setup and records what it saw."""

    def __init__(self) -> None:
        self.why = None
        self.inputs: list[torch.Tensor] = []

    def setup(self, trainer, pl_module, stage):
        hook = pl_module.net[0].register_forward_pre_hook(lambda m, args: self.inputs.append(args[0]))
        before = {k: v.clone() for k, v in pl_module.state_dict().items()}
        rng = torch.get_rng_state()
        try:
            self.why = run_first_training_step(trainer, pl_module)
        finally:
            hook.remove()
        after = pl_module.state_dict()
        self.unchanged = all(torch.equal(before[k], after[k]) for k in before) and torch.equal(
            rng, torch.get_rng_state()
        )


def test_runs_training_step_on_the_first_batch_and_changes_nothing():
    probe = Probe()
    module = BNModule()
    trainer(callbacks=[probe], max_steps=1).fit(module)
    assert probe.why == ""
    assert len(probe.inputs) == 1
    assert probe.inputs[0].shape == (16, 4)
    assert probe.unchanged  # BatchNorm statistics and the RNG restored; logging in training_step muted
    assert "log" not in vars(module)


def test_datamodule_batches_are_used():
    class DM(pl.LightningDataModule):
        def train_dataloader(self):
            return DataLoader(TensorDataset(torch.randn(10, 4), torch.randn(10, 1)), batch_size=5)

    probe = Probe()
    module = MLPModule()
    trainer(callbacks=[probe], max_steps=1).fit(module, datamodule=DM())
    assert probe.why == ""
    assert probe.inputs[0].shape == (5, 4)


def test_a_dataloader_built_in_the_module_setup_is_reported():
    class Late(MLPModule):
        def setup(self, stage):
            self.ds = TensorDataset(torch.randn(8, 4), torch.randn(8, 1))

        def train_dataloader(self):
            return DataLoader(self.ds, batch_size=4)

    probe = Probe()
    trainer(callbacks=[probe], max_steps=1).fit(Late())
    assert "cannot be built at setup" in probe.why
    assert "AttributeError" in probe.why


def test_no_trainer_data_gives_a_reason():
    class T:
        fit_loop = None

    batch, why = first_train_batch(T(), MLPModule())
    assert batch is None
    assert why == "the fit has no train dataloader yet"
