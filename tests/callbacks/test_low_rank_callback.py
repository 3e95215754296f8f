import copy

import pytest
import pytorch_lightning as pl
import torch
from helpers import EvalMLP, ManualMLP, MLPModule, SaveWeights, trainer
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import lightning_bv as lbv
from lightning_bv.callbacks.low_rank import LowRank
from lightning_bv.callbacks.rbv_regularization import RBVRegularization
from lightning_bv.callbacks.skip_connections import SkipConnections


def factors(module):
    return {n: lbv.low_rank_factors(m) for n, m in module.named_modules() if lbv.is_low_rank(m)}


def test_applied_before_the_optimizer_is_built_and_training_moves_the_factors():
    torch.manual_seed(0)
    module = MLPModule()
    start = lbv.apply_low_rank(copy.deepcopy(module.net), rank=3, exclude=["4"])
    cb = LowRank(rank=3, exclude=["net.4"])
    t = trainer(callbacks=[cb], max_steps=4)
    t.fit(module)
    assert cb.ranks == {"net.0": 3, "net.2": 3}
    optimized = {id(p) for g in t.optimizers[0].param_groups for p in g["params"]}
    assert optimized == {id(p) for p in module.parameters()}
    for name, (U, V) in factors(module).items():
        assert id(U) in optimized, name
        assert id(V) in optimized, name
        assert t.optimizers[0].state[U]["momentum_buffer"].shape == U.shape  # SGD stepped the factors themselves
        U0, V0 = lbv.low_rank_factors(start.get_submodule(name.removeprefix("net.")))
        assert not torch.allclose(U, U0), name
        assert not torch.allclose(V, V0), name
    assert not lbv.is_low_rank(module.net[4])
    assert "net.0.parametrizations.weight.original0" in module.state_dict()


def test_resume_with_energy_matches_uninterrupted_fit(tmp_path):
    def run(max_steps, module, folder, ckpt=None):
        cb = LowRank(energy=0.8)
        save = pl.callbacks.ModelCheckpoint(dirpath=tmp_path / folder, save_last=True, every_n_train_steps=1)
        trainer(callbacks=[cb, save], max_steps=max_steps, enable_checkpointing=True).fit(module, ckpt_path=ckpt)
        return module, cb

    torch.manual_seed(0)
    start = MLPModule(lr=0.05)
    full, cb_full = run(12, copy.deepcopy(start), "full")
    # stop at an epoch boundary (4 batches an epoch): Lightning replays a part-done epoch's batches differently
    run(8, copy.deepcopy(start), "part")
    torch.manual_seed(1)
    fresh = MLPModule(lr=0.05)  # other weights, so energy=0.8 picks other ranks at setup than the checkpoint holds
    _, cb_fresh = run(0, copy.deepcopy(fresh), "fresh")
    assert cb_fresh.ranks != cb_full.ranks
    ckpt = torch.load(tmp_path / "part" / "last.ckpt", weights_only=True)
    assert ckpt["callbacks"][cb_full.state_key] == {"ranks": cb_full.ranks}
    resumed, cb = run(12, fresh, "resumed", ckpt=str(tmp_path / "part" / "last.ckpt"))
    assert cb.ranks == cb_full.ranks
    assert {n: lbv.low_rank_rank(resumed.get_submodule(n)) for n in cb.ranks} == cb_full.ranks
    assert list(resumed.state_dict()) == list(full.state_dict())
    for (n, p), e in zip(resumed.named_parameters(), full.parameters()):
        torch.testing.assert_close(p, e, atol=1e-6, rtol=0, msg=n)


def test_fit_then_test_and_validate_from_a_checkpoint(tmp_path):
    torch.manual_seed(0)
    module = EvalMLP()
    cb = LowRank(rank=2, targets=["net.0", "net.2"])
    save = pl.callbacks.ModelCheckpoint(dirpath=tmp_path, save_last=True)
    t = trainer(callbacks=[cb, save], max_steps=4, enable_checkpointing=True)
    t.fit(module)
    U = lbv.low_rank_factors(module.net[0])[0]
    tested = t.test(module, verbose=False)[0]["test_loss"]
    assert lbv.low_rank_factors(module.net[0])[0] is U  # the second setup did not apply it again
    assert lbv.low_rank_rank(module.net[0]) == 2
    validated = t.validate(module, verbose=False)[0]["val_loss"]
    assert validated == pytest.approx(tested)  # the same data
    # a new model and Trainer, restored from the checkpoint: setup makes it low-rank, then the weights load
    torch.manual_seed(1)
    fresh = EvalMLP()
    t2 = trainer(callbacks=[LowRank(rank=2, targets=["net.0", "net.2"])])
    assert t2.validate(fresh, ckpt_path=str(tmp_path / "last.ckpt"), verbose=False)[0]["val_loss"] == validated


class BuiltInConfigureModel(MLPModule):
    def __init__(self):
        super().__init__()
        self.net = None

    def configure_model(self):
        if self.net is None:  # idempotent, as Lightning asks
            self.net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 1))


def test_configure_model_is_called_first():
    torch.manual_seed(0)
    module = BuiltInConfigureModel()
    cb = LowRank(rank=2, targets=["net.0"])
    t = trainer(callbacks=[cb], max_steps=2)
    t.fit(module)
    assert cb.ranks == {"net.0": 2}
    U, V = lbv.low_rank_factors(module.net[0])
    optimized = [p for g in t.optimizers[0].param_groups for p in g["params"]]
    assert any(p is U for p in optimized)
    assert any(p is V for p in optimized)


def test_manual_optimization_is_fine():
    torch.manual_seed(0)
    module = ManualMLP()
    trainer(callbacks=[LowRank(rank=2, exclude=["net.4"])], max_steps=2).fit(module)
    assert [lbv.is_low_rank(module.net[i]) for i in (0, 2, 4)] == [True, True, False]


class RankTwoRegression(pl.LightningModule):
    """A linear map fit to targets of rank 2: a low-rank layer of rank 6 needs only 2 of its components."""

    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(8, 8))

    def training_step(self, batch, batch_idx):
        return nn.functional.mse_loss(self.net(batch[0]), batch[1])

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05)

    def train_dataloader(self):
        g = torch.Generator().manual_seed(0)
        m = torch.randn(8, 2, generator=g) @ torch.randn(2, 8, generator=g) / 2
        x = torch.randn(256, 8, generator=g)
        return DataLoader(TensorDataset(x, x @ m.T), batch_size=32)


def test_prox_drops_components_of_a_low_rank_layer():
    torch.manual_seed(0)
    module = RankTwoRegression()
    cb = LowRank(rank=6)
    pnr = RBVRegularization(lam=0.2, mode="prox")
    # the projection keeps ||V_j|| = 1 and shrinks U's columns; 100 steps killed none yet, 300 kill two
    trainer(callbacks=[cb, pnr], max_steps=300).fit(module)
    assert pnr.groups.names == ["net.0:rank"]
    live = lbv.low_rank_live_components(module.net[0])
    assert 2 <= live < cb.ranks["net.0"] == lbv.low_rank_rank(module.net[0]) == 6
    U, V = lbv.low_rank_factors(module.net[0])
    assert int((U.detach().abs().sum(0) == 0).sum()) == 6 - live  # output weights of the components: exact zeros


def test_default_targets_leave_affine_skips_dense():
    torch.manual_seed(0)
    module = MLPModule()
    cb = LowRank(rank=2, exclude=["net.4"])
    trainer(callbacks=[SkipConnections(targets=["net.2"]), cb], max_steps=1).fit(module)
    assert cb.ranks == {"net.0": 2, "net.2.module": 2}
    assert not lbv.is_low_rank(module.net[2].skip)
    assert module.net[2].skip.weight.abs().sum() > 0  # it trains


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"rank": 0}, ValueError, r"`rank` must be an int >= 1, got 0"),
        ({"rank": True}, ValueError, r"`rank` must be an int >= 1, got True"),
        ({"energy": 1.5}, ValueError, r"`energy` must be a float in \(0, 1\] \(the fraction .*\), got 1.5"),
        ({"rank": 2, "energy": 0.5}, ValueError, r"exactly one of `rank` and `energy`, got rank=2 and energy=0.5"),
        ({}, ValueError, r"exactly one of `rank` and `energy`, got rank=None and energy=None"),
        ({"rank": 1, "targets": 5}, TypeError, r"`targets` must be None, a regex string or a list of module names"),
        ({"rank": 1, "exclude": "("}, ValueError, r"`exclude`='\(' is not a valid regular expression"),
    ],
)
def test_bad_arguments(kwargs, error, match):
    with pytest.raises(error, match=match):
        LowRank(**kwargs)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"rank": 1, "targets": ["nope"]}, lbv.TargetsMatchNothingError, r"'nope' matched no module.*Available: \["),
        (
            {"rank": 2, "targets": ["0", "net.4"]},
            ValueError,
            r"`rank`=2 is too large for layer 'net.4' \(Linear\(.*\)\): its weight is a 1 x 16",
        ),
        ({"rank": 1, "targets": "net"}, TypeError, r"selected 'net' \(Sequential\), which is not an nn.Linear"),
    ],
)
def test_bad_targets_raise_at_setup_and_change_nothing(kwargs, error, match):
    module = MLPModule()
    keys = list(module.state_dict())
    with pytest.raises(error, match=match):
        trainer(callbacks=[LowRank(**kwargs)], max_steps=1).fit(module)
    assert list(module.state_dict()) == keys


@pytest.mark.parametrize("targets", [None, r"net\.[024]"])
def test_a_layer_of_rank_at_most_rank_stays_dense_and_is_listed(targets, caplog):
    # net.4 is 1 x 16 (rank <= 1): rank=6 would not make it smaller, and only targets naming it explicitly raise
    module = MLPModule()
    cb = LowRank(rank=6, targets=targets)
    with caplog.at_level("INFO"):
        trainer(callbacks=[cb], max_steps=1).fit(module)
    assert cb.ranks == {"net.2": 6}  # net.0 is 16 x 4: rank <= 4 already, also left dense
    assert cb.ranks.keys().isdisjoint(cb.left_dense)
    assert cb.left_dense == {"net.0": 4, "net.4": 1}
    assert not lbv.is_low_rank(module.net[4])
    assert "LowRank(rank=6) leaves 2 layer(s) dense: 'net.0' (rank <= 4), 'net.4' (rank <= 1)" in caplog.text


def test_zero_weight_warns():
    module = MLPModule()
    nn.init.zeros_(module.net[4].weight)
    with pytest.warns(UserWarning, match=r"the weight of 'net.4' is zero, so its factors U and V are zero"):
        trainer(callbacks=[LowRank(rank=1, targets=["net.4"])], max_steps=1).fit(module)


def test_sharded_strategy_refused_and_spawn_warns():
    from pytorch_lightning.strategies import FSDPStrategy

    class Fake:
        strategy = FSDPStrategy()

    with pytest.raises(ValueError, match=r"LowRank does not support the sharded strategy FSDPStrategy: it para"):
        LowRank(rank=1).setup(Fake(), MLPModule(), "fit")
    spawn = trainer(strategy="ddp_spawn", devices=2)  # not started: only its launcher is read
    with pytest.warns(UserWarning, match=r"LowRank changes the model inside the worker processes of DDPStrategy"):
        LowRank(rank=1).setup(spawn, MLPModule(), "fit")


def test_state_key_tells_instances_apart():
    keys = {LowRank(rank=1, targets=["net.0"]).state_key, LowRank(rank=1, targets=["net.2"]).state_key}
    assert len(keys | {LowRank(energy=0.5, targets=["net.0"]).state_key}) == 3


@pytest.mark.slow
def test_ddp_low_rank_skip_and_path_norm(tmp_path):
    torch.manual_seed(0)
    start = MLPModule(lr=0.05, batch_size=16, deterministic_sampler=True)

    def callbacks():
        return [
            LowRank(energy=0.9, exclude=["net.4"]),
            SkipConnections(targets=["net.2"]),
            RBVRegularization(lam=0.05, mode="prox"),
        ]

    kw = {"max_steps": 6, "use_distributed_sampler": False}
    single = copy.deepcopy(start)
    trainer(callbacks=callbacks(), **kw).fit(single)
    trainer(callbacks=[*callbacks(), SaveWeights(str(tmp_path))], strategy="ddp_spawn", devices=2, **kw).fit(
        copy.deepcopy(start)
    )
    r0 = torch.load(tmp_path / "rank0.pt", weights_only=True)
    r1 = torch.load(tmp_path / "rank1.pt", weights_only=True)
    assert list(r0) == list(single.state_dict())
    assert "net.2.module.parametrizations.weight.original0" in r0
    assert "net.2.skip.weight" in r0
    for k in r0:
        assert torch.equal(r0[k], r1[k]), k  # identical across ranks
        torch.testing.assert_close(r0[k], single.state_dict()[k], atol=1e-5, rtol=0, msg=k)
