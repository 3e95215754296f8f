import copy

import pytest
import pytorch_lightning as pl
import torch
from helpers import MLPModule, regression_data, trainer
from torch import nn
from torch.utils.data import DataLoader

import lightning_bv as lbv
from lightning_bv.callbacks.skip_connections import SkipConnections


class EvalMLP(MLPModule):
    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_loss", nn.functional.mse_loss(self(x), y))

    def test_step(self, batch, batch_idx):
        x, y = batch
        self.log("test_loss", nn.functional.mse_loss(self(x), y))

    def val_dataloader(self):
        return DataLoader(regression_data(32, self.hparams.d, seed=1), batch_size=16)

    test_dataloader = val_dataloader


def test_applied_before_the_optimizer_is_built_and_the_skip_trains():
    torch.manual_seed(0)
    module = MLPModule()
    cb = SkipConnections(targets=["net.2"])
    t = trainer(callbacks=[cb], max_steps=3)
    t.fit(module)
    assert cb.wrapped == ["net.2"]
    skip = module.net[2].skip
    assert lbv.is_skip(module.net[2])
    assert isinstance(skip, nn.Linear)
    optimized = {id(p) for g in t.optimizers[0].param_groups for p in g["params"]}
    assert optimized == {id(p) for p in module.parameters()}
    assert {id(skip.weight), id(skip.bias)} <= optimized
    assert skip.weight.abs().sum() > 0  # started at zero
    assert list(module.state_dict())[2:6] == [
        "net.2.module.weight",
        "net.2.module.bias",
        "net.2.skip.weight",
        "net.2.skip.bias",
    ]


def test_resume_matches_uninterrupted_fit(tmp_path):
    def run(max_steps, module, folder, ckpt=None):
        cb = SkipConnections(targets=r"net\.[02]")
        save = pl.callbacks.ModelCheckpoint(dirpath=tmp_path / folder, save_last=True, every_n_train_steps=1)
        trainer(callbacks=[cb, save], max_steps=max_steps, enable_checkpointing=True).fit(module, ckpt_path=ckpt)
        return module, cb

    torch.manual_seed(0)
    start = MLPModule(lr=0.05)
    full, cb_full = run(12, copy.deepcopy(start), "full")
    run(8, copy.deepcopy(start), "part")  # an epoch boundary (4 batches an epoch)
    ckpt = torch.load(tmp_path / "part" / "last.ckpt", weights_only=True)
    assert ckpt["callbacks"][cb_full.state_key] == {"wrapped": ["net.0", "net.2"], "kind": "affine"}
    torch.manual_seed(1)
    resumed, cb = run(12, MLPModule(lr=0.05), "resumed", ckpt=str(tmp_path / "part" / "last.ckpt"))
    assert cb.wrapped == ["net.0", "net.2"]
    assert list(resumed.state_dict()) == list(full.state_dict())
    for (n, p), e in zip(resumed.named_parameters(), full.parameters()):
        torch.testing.assert_close(p, e, atol=1e-6, rtol=0, msg=n)


def test_fit_then_test_and_validate_from_a_checkpoint(tmp_path):
    torch.manual_seed(0)
    module = EvalMLP()
    cb = SkipConnections(targets=r"net\.2.*")  # after the first setup this also matches net.2.module and net.2.skip
    save = pl.callbacks.ModelCheckpoint(dirpath=tmp_path, save_last=True)
    t = trainer(callbacks=[cb, save], max_steps=4, enable_checkpointing=True)
    t.fit(module)
    wrapper = module.net[2]
    tested = t.test(module, verbose=False)[0]["test_loss"]
    assert module.net[2] is wrapper
    assert not lbv.is_skip(wrapper.module)  # not wrapped twice
    assert cb.wrapped == ["net.2"]
    validated = t.validate(module, verbose=False)[0]["val_loss"]
    assert validated == pytest.approx(tested)
    torch.manual_seed(1)
    t2 = trainer(callbacks=[SkipConnections(targets=r"net\.2.*")])
    assert t2.validate(EvalMLP(), ckpt_path=str(tmp_path / "last.ckpt"), verbose=False)[0]["val_loss"] == validated


def test_identity_kind_and_example_input():
    torch.manual_seed(0)
    module = MLPModule()
    x = torch.randn(3, 4)
    y = module(x)
    cb = SkipConnections(targets=["net"], example_input=x)  # a Sequential 4 -> 1: its sizes come from a trial forward
    trainer(callbacks=[cb, SkipConnections(targets=["net.module.2"], kind="identity")], max_steps=0).fit(module)
    assert isinstance(module.net.skip, nn.Linear)
    assert (module.net.skip.in_features, module.net.skip.out_features) == (4, 1)
    assert torch.equal(module.net.skip(x), torch.zeros(3, 1))
    assert isinstance(module.net.module[2].skip, nn.Identity)
    inner = module.net.module
    h = inner[1](inner[0](x))
    torch.testing.assert_close(module(x), inner[4](inner[3](inner[2].module(h) + h)))
    assert not torch.allclose(module(x), y)  # the identity skip adds its input


class BuiltInConfigureModel(MLPModule):
    def __init__(self):
        super().__init__()
        self.net = None

    def configure_model(self):
        if self.net is None:
            self.net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 1))


def test_configure_model_is_called_first():
    module = BuiltInConfigureModel()
    t = trainer(callbacks=[SkipConnections(targets=["net.0"])], max_steps=1)
    t.fit(module)
    assert lbv.is_skip(module.net[0])
    optimized = [p for g in t.optimizers[0].param_groups for p in g["params"]]
    assert any(p is module.net[0].skip.weight for p in optimized)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"targets": ["net.0"], "kind": "residual"}, ValueError, r"`kind` must be one of \('affine', 'identity'\)"),
        ({"targets": None}, ValueError, r"`targets` is required: name the modules to put a skip connection around"),
        ({"targets": 5}, TypeError, r"`targets` must be None, a regex string or a list of module names, got 5"),
        ({"targets": ["net.0"], "exclude": "("}, ValueError, r"`exclude`='\(' is not a valid regular expression"),
    ],
)
def test_bad_arguments(kwargs, error, match):
    with pytest.raises(error, match=match):
        SkipConnections(**kwargs)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"targets": ["nope"]}, lbv.TargetsMatchNothingError, r"'nope' matched no module.*Available: \['net', 'net.0'"),
        ({"targets": [""]}, lbv.TargetsMatchNothingError, r"'' matched no module"),  # not the LightningModule itself
        ({"targets": ["net.0"], "kind": "identity"}, ValueError, r"kind=\"identity\" needs 'net.0' to keep its input"),
    ],
)
def test_bad_targets_raise_at_setup_and_change_nothing(kwargs, error, match):
    module = MLPModule()
    keys = list(module.state_dict())
    with pytest.raises(error, match=match):
        trainer(callbacks=[SkipConnections(**kwargs)], max_steps=1).fit(module)
    assert list(module.state_dict()) == keys


def test_spawn_warns():
    spawn = trainer(strategy="ddp_spawn", devices=2)  # not started: only its launcher is read
    with pytest.warns(UserWarning, match=r"SkipConnections changes the model inside the worker processes"):
        SkipConnections(targets=["net.0"]).setup(spawn, MLPModule(), "fit")


class Generic(nn.Module):
    """No in_features/out_features and not a Sequential: its sizes need a forward pass."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(4, 8)

    def forward(self, x):
        return torch.relu(self.a(x))


class GenericMLP(MLPModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(Generic(), nn.Linear(8, 1))


class NoForward(GenericMLP):
    """A LightningModule without ``forward`` (training_step calls its layers): no example input can be passed."""

    forward = pl.LightningModule.forward

    def training_step(self, batch, batch_idx):
        x, y = batch
        self.log("train_loss", 1.0)
        return nn.functional.mse_loss(self.net(x), y)


def test_a_sequential_block_is_sized_without_an_example_input():
    torch.manual_seed(0)
    module = MLPModule()
    x = torch.randn(3, 4)
    y = module(x)
    cb = SkipConnections(targets=["net"])  # Linear(4, 16) first, Linear(16, 1) last
    trainer(callbacks=[cb], max_steps=1).fit(module)
    assert (module.net.skip.in_features, module.net.skip.out_features) == (4, 1)
    assert cb.wrapped == ["net"]
    assert module(x).shape == y.shape


def test_sizes_from_the_first_training_step_without_forward_or_example_input():
    torch.manual_seed(0)
    module = NoForward()
    before = {k: v.clone() for k, v in module.state_dict().items()}
    cb = SkipConnections(targets=["net.0"])
    t = trainer(callbacks=[cb], max_steps=2)
    t.fit(module)
    assert isinstance(module.net[0].skip, nn.Linear)
    assert (module.net[0].skip.in_features, module.net[0].skip.out_features) == (4, 8)
    optimized = [p for g in t.optimizers[0].param_groups for p in g["params"]]
    assert any(p is module.net[0].skip.weight for p in optimized)  # before the optimizer was built
    assert not torch.equal(module.net[0].module.a.weight, before["net.0.a.weight"])  # trained from the same start


def test_sizes_from_example_input_array():
    module = GenericMLP()
    module.example_input_array = torch.randn(2, 4)
    trainer(callbacks=[SkipConnections(targets=["net.0"])], max_steps=1).fit(module)
    assert (module.net[0].skip.in_features, module.net[0].skip.out_features) == (4, 8)


def test_no_batch_at_setup_and_no_example_input_raises():
    class Late(NoForward):
        def setup(self, stage):
            self.ds = regression_data(16, 4)

        def train_dataloader(self):
            return DataLoader(self.ds, batch_size=4)

    module = Late()
    keys = list(module.state_dict())
    with pytest.raises(
        ValueError,
        match=r"SkipConnections cannot read the input and output sizes of 'net.0'.*"
        r"could not run at setup \(its train dataloader cannot be built at setup.*Pass `example_input=`",
    ):
        trainer(callbacks=[SkipConnections(targets=["net.0"])], max_steps=1).fit(module)
    assert list(module.state_dict()) == keys
