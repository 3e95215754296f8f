import warnings
from types import SimpleNamespace

import pytest
import torch
from helpers import trainer
from models import mlp
from torch import nn

from lightning_bv import RBVNet
from lightning_bv.modules import BVModule, DiabetesData, DigitsData, SplineData


def test_reads_sizes_from_the_model():
    module = BVModule(RBVNet(in_features=5, out_features=4, width=8, bottleneck=2, depth=2))
    assert module.num_classes == 4
    assert module.example_input_array.shape == (2, 5)
    assert BVModule(mlp([4, 16, 3], seed=None), task="classification").num_classes == 3
    assert BVModule(mlp([4, 16, 1], seed=None), task="regression").num_classes is None
    assert BVModule(mlp([4, 16, 3], seed=None), num_classes=7).num_classes == 7


def test_no_input_size_read_from_a_linear_head_after_a_convolution():
    cnn = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 10))
    module = BVModule(cnn)
    assert module.example_input_array is None
    assert module.num_classes == 10


def test_example_input_from_the_datamodule_when_the_model_has_none():
    class NoLinear(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv1d(1, 1, 1)

        def forward(self, x):
            return self.conv(x.unsqueeze(1)).squeeze(1)

    module = BVModule(NoLinear(), task="regression")
    assert module.example_input_array is None
    data = SplineData()
    module._trainer = SimpleNamespace(datamodule=data)
    assert torch.equal(module.example_input_array, data.example_input_array)
    module.example_input_array = torch.zeros(3, 1)  # an explicit one wins
    assert module.example_input_array.shape == (3, 1)


def test_no_nn_module_hparam_warning_outside_the_cli():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        module = BVModule(mlp([4, 16, 3], seed=None), lr=0.01)
    assert "model" not in module.hparams
    assert module.hparams.lr == 0.01


@pytest.mark.parametrize(
    ("name", "cls"), [("adam", torch.optim.Adam), ("adamw", torch.optim.AdamW), ("sgd", torch.optim.SGD)]
)
def test_optimizers(name, cls):
    module = BVModule(mlp([4, 16, 3], seed=None), optimizer=name, lr=0.1, weight_decay=0.01, momentum=0.5)
    opt = module.configure_optimizers()
    assert type(opt) is cls
    group = opt.param_groups[0]
    assert group["lr"] == 0.1
    assert group["weight_decay"] == 0.01
    assert len(group["params"]) == 4
    if name == "sgd":
        assert group["momentum"] == 0.5


def test_classification_fit_logs_loss_and_accuracy():
    data = DigitsData(batch_size=128)
    module = BVModule(RBVNet(64, 10, width=32, bottleneck=8, depth=2), optimizer="adam", lr=0.01)
    t = trainer(max_steps=20, limit_val_batches=2, val_check_interval=10)
    t.fit(module, data)
    assert {"train_loss_step", "train_loss_epoch", "val_loss", "val_acc"} <= set(t.callback_metrics)
    result = t.test(module, data, verbose=False)[0]
    assert set(result) == {"test_loss", "test_acc"}
    assert result["test_acc"] > 0.5
    ours = module.evaluate(data.test_dataloader())
    assert ours["acc"] == pytest.approx(result["test_acc"], abs=1e-6)
    assert ours["loss"] == pytest.approx(result["test_loss"], rel=1e-5)


def test_regression_fit_logs_loss_and_r2():
    data = DiabetesData(batch_size=64)
    module = BVModule(mlp([10, 16, 1], seed=None), task="regression", optimizer="adam", lr=0.01)
    t = trainer(max_steps=10, limit_val_batches=1)
    t.fit(module, data)
    result = t.test(module, data, verbose=False)[0]
    assert set(result) == {"test_loss", "test_r2"}
    assert result["test_r2"] > 0.0  # better than the mean


def test_evaluate_restores_training_flags():
    module = BVModule(nn.Sequential(nn.Linear(3, 4), nn.Dropout(0.5), nn.Linear(4, 1)), task="regression")
    module.train()
    module.model[1].eval()
    x = torch.randn(6, 3)
    module.evaluate([(x, torch.zeros(6, 1))])
    assert module.training
    assert module.model[0].training
    assert not module.model[1].training
    with pytest.raises(ValueError, match="`evaluate` got no batches"):
        module.evaluate([])
