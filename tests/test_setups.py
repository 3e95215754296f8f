"""The training set-ups users have: both Lightning packages, torch.compile, mixed precision, gradient accumulation
under DDP, several parameter groups, manual optimization with two optimizers, and FSDP (refused)."""

from __future__ import annotations

import copy
import types
from typing import Any

import pytest
import pytorch_lightning as pl
import torch
from helpers import MLPModule, SaveWeights, regression_data, trainer
from torch import nn
from torch.utils.data import DataLoader

import lightning_bv as lbv
from lightning_bv.callbacks import LowRank, NeuronPruning, RBVRegularization, SkipConnections
from lightning_bv.callbacks._base import refuse_sharded, refuse_unsupported

L = pytest.importorskip("lightning")


def batches(n: int = 64, d: int = 4, batch_size: int = 16) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return list(DataLoader(regression_data(n, d), batch_size=batch_size))


# ---- `import lightning as L` as well as `pytorch_lightning` ---------------------------------------------------------
def unified_module() -> Any:
    """The same MLP as a ``lightning.pytorch.LightningModule`` (its Trainer accepts no other)."""

    class Unified(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 1))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.net(x)

        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            return nn.functional.mse_loss(self(batch[0]), batch[1])

        def configure_optimizers(self) -> Any:
            return torch.optim.SGD(self.parameters(), lr=0.05)

        def train_dataloader(self) -> Any:
            return DataLoader(regression_data(64, 4), batch_size=16)

    return Unified()


class Plain(MLPModule):
    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        return nn.functional.mse_loss(self(batch[0]), batch[1])

    def configure_optimizers(self) -> Any:
        return torch.optim.SGD(self.parameters(), lr=0.05)


@pytest.mark.parametrize("package", ["pytorch_lightning", "lightning"])
def test_callbacks_work_with_both_trainers(package):
    torch.manual_seed(0)
    module = Plain() if package == "pytorch_lightning" else unified_module()
    callbacks = [
        LowRank(rank=3, targets=["net.2"]),
        SkipConnections(targets=["net.0"]),  # a skip around a consumer would read the neurons: they could not go
        RBVRegularization(lam=1.0),
        NeuronPruning(every_n_epochs=1),
    ]
    assert all(isinstance(cb, L.Callback) and isinstance(cb, pl.Callback) for cb in callbacks)
    Trainer = pl.Trainer if package == "pytorch_lightning" else L.Trainer
    t = Trainer(
        accelerator="cpu",
        devices=1,
        max_epochs=2,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        log_every_n_steps=1,
        callbacks=callbacks,
    )
    t.fit(module)
    low_rank, skips, path_norm, pruning = callbacks
    assert low_rank.ranks == {"net.2": 3}
    assert lbv.is_low_rank(module.net[2])
    assert skips.wrapped == ["net.0"]
    assert lbv.is_skip(module.net[0])
    assert path_norm.groups is not None
    # net.2 is low-rank between two groups: they own its factors, it has no group of its own
    assert path_norm.groups.names == ["net.0.module+net.0.skip", "net.2"]
    assert "bv/rbv_norm" in t.callback_metrics
    assert len(pruning.history) == 3  # two epochs and the end of fit
    assert pruning.history[0]["neurons_after"] < pruning.history[0]["neurons_before"]
    assert path_norm.groups[0].num_neurons == module.net[0].module.out_features == module.net[2].in_features


def test_mid_fit_compaction_refused_under_ddp_of_either_package():
    from lightning.pytorch.strategies import DDPStrategy as UnifiedDDP
    from pytorch_lightning.strategies import DDPStrategy

    for strategy in (DDPStrategy(), UnifiedDDP()):
        with pytest.raises(ValueError, match="compacts during training only on a single device: under DDPStrategy"):
            NeuronPruning(every_n_epochs=1).setup(types.SimpleNamespace(strategy=strategy), MLPModule(), "fit")


# ---- torch.compile -------------------------------------------------------------------------------------------------
class Compiled(Plain):
    def __init__(self) -> None:
        super().__init__()
        self.net = torch.compile(self.net)


@pytest.mark.slow
def test_torch_compile_submodule_and_whole_module():
    torch.manual_seed(0)
    eager = Plain()
    compiled = Compiled()
    compiled.net._orig_mod.load_state_dict(eager.net.state_dict())
    whole = copy.deepcopy(eager)
    trainer(callbacks=[RBVRegularization(lam=0.5)], max_steps=6).fit(eager)

    cb = RBVRegularization(lam=0.5)  # discovered from the first step: the trace runs the compiled net eagerly
    trainer(callbacks=[cb], max_steps=6).fit(compiled)
    assert cb.groups.names == ["net._orig_mod.0", "net._orig_mod.2"]
    for p, e in zip(compiled.net.parameters(), eager.net.parameters()):
        torch.testing.assert_close(p, e, atol=1e-5, rtol=1e-5)
    assert torch._dynamo.eval_frame._stance.stance == "default"  # the trace gave the compiler back its stance
    x = torch.randn(2, 4)  # the pure-torch functions see through the compiled module too
    assert lbv.find_neurons(compiled.net, x).names == ["_orig_mod.0", "_orig_mod.2"]
    torch.testing.assert_close(lbv.path_norm(compiled.net, x), lbv.path_norm(eager.net, x))

    cb = RBVRegularization(lam=0.5)  # the LightningModule itself compiled (Lightning unwraps it)
    trainer(callbacks=[cb], max_steps=6).fit(torch.compile(whole))
    assert cb.groups.names == ["net.0", "net.2"]
    for p, e in zip(whole.net.parameters(), eager.net.parameters()):
        torch.testing.assert_close(p, e, atol=1e-5, rtol=1e-5)


# ---- mixed precision: LowRank and the proximal step under autocast ------------------------------------------------
@pytest.mark.parametrize("precision", ["bf16-mixed", "16-mixed"])
def test_low_rank_and_prox_under_mixed_precision_match_an_autocast_loop(precision):
    torch.manual_seed(0)
    module = Plain()
    lam, lr, steps = 0.5, 0.05, 6
    model = lbv.apply_low_rank(copy.deepcopy(module.net), rank=2, targets=["0", "2"])
    found = lbv.find_neurons(model, torch.randn(1, 4))
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    dtype = torch.bfloat16  # on CPU Lightning runs "16-mixed" as "bf16-mixed" (fp16 autocast is CUDA's), with a warning
    for step, (x, y) in enumerate((batches() * 2)[:steps]):
        opt.zero_grad()
        with torch.autocast("cpu", dtype=dtype):
            loss = nn.functional.mse_loss(model(x), y)
        loss.backward()
        opt.step()
        lbv.proximal_step_(found, lam * lr, first=step == 0)

    low_rank, path_norm = LowRank(rank=2, targets=["net.0", "net.2"]), RBVRegularization(lam=lam, every_n_steps=1)
    t = trainer(callbacks=[low_rank, path_norm], max_steps=steps, precision=precision)
    t.fit(module)
    assert t.precision_plugin.scaler is None  # on CPU, autocast without a GradScaler
    assert [g.name for g in path_norm.groups] == ["net." + n for n in found.names]
    assert all(p.dtype == torch.float32 for p in module.parameters())
    for (n, p), e in zip(module.net.named_parameters(), model.parameters()):
        torch.testing.assert_close(p, e, atol=1e-6, rtol=1e-5, msg=n)
    assert lbv.low_rank_live_components(module.net[2]) <= 2


# ---- gradient accumulation under 2-process DDP ---------------------------------------------------------------------
@pytest.mark.slow
def test_gradient_accumulation_under_ddp_matches_a_single_process(tmp_path):
    torch.manual_seed(0)
    start = MLPModule(lr=0.05, batch_size=16, deterministic_sampler=True)
    kw = {"max_steps": 3, "accumulate_grad_batches": 2, "use_distributed_sampler": False}
    single = copy.deepcopy(start)
    trainer(callbacks=[RBVRegularization(lam=0.3, mode="penalty")], **kw).fit(single)
    cbs = [RBVRegularization(lam=0.3, mode="penalty"), SaveWeights(str(tmp_path))]
    trainer(callbacks=cbs, strategy="ddp_spawn", devices=2, **kw).fit(copy.deepcopy(start))
    r0 = torch.load(tmp_path / "rank0.pt", weights_only=True)
    r1 = torch.load(tmp_path / "rank1.pt", weights_only=True)
    for k, v in single.state_dict().items():
        assert torch.equal(r0[k], r1[k]), k
        torch.testing.assert_close(r0[k], v, atol=1e-5, rtol=0, msg=k)


# ---- several parameter groups with different learning rates -------------------------------------------------------
class TwoHeads(pl.LightningModule):
    """Two Linear-ReLU-Linear heads, summed. The optimizer's parameter groups cross them: the neurons of head ``a``
    have their input weights at lr 0.1 and their output weights at lr 0.01; those of head ``b`` the other way round."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 1))
        self.b = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.a(x) + self.b(x)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        return nn.functional.mse_loss(self(batch[0]), batch[1])

    def configure_optimizers(self) -> Any:
        fast = [*self.a[0].parameters(), *self.b[2].parameters()]
        slow = [*self.b[0].parameters(), *self.a[2].parameters()]
        return torch.optim.SGD([{"params": fast, "lr": 0.1}, {"params": slow, "lr": 0.01}])

    def train_dataloader(self) -> Any:
        return DataLoader(regression_data(64, 4), batch_size=16)


def two_heads_by_hand(start: TwoHeads, lam: float, taus: dict[str, float], steps: int) -> nn.Module:
    model = copy.deepcopy(start)
    found = lbv.find_neurons(model, torch.randn(1, 4))
    opt = model.configure_optimizers()
    for step, (x, y) in enumerate((batches() * 2)[:steps]):
        opt.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        opt.step()
        lbv.proximal_step_(found, {name: lam * lr for name, lr in taus.items()}, first=step == 0)
    return model


def test_prox_uses_the_learning_rate_of_the_group_holding_the_output_weights():
    torch.manual_seed(0)
    start = TwoHeads()
    lam, steps = 2.0, 6
    expected = two_heads_by_hand(start, lam, {"a.0": 0.01, "b.0": 0.1}, steps)  # the lr of a.2 and of b.2
    wrong = two_heads_by_hand(start, lam, {"a.0": 0.1, "b.0": 0.01}, steps)  # the lr of the input weights
    module = copy.deepcopy(start)
    cb = RBVRegularization(lam=lam, every_n_steps=1)
    trainer(callbacks=[cb], max_steps=steps).fit(module)
    assert cb.groups.names == ["a.0", "b.0"]
    for (n, p), e in zip(module.named_parameters(), expected.parameters()):
        torch.testing.assert_close(p, e, atol=1e-6, rtol=1e-6, msg=n)
    assert not all(torch.allclose(p, w, atol=1e-4) for p, w in zip(module.parameters(), wrong.parameters()))


# ---- manual optimization with two optimizers: refused, with the helper to use instead ------------------------------
class TwoOptimizers(MLPModule):
    """Manual optimization: one optimizer for the first layer, one for the rest; prox by hand after each step."""

    def __init__(self, lam: float = 0.0) -> None:
        super().__init__()
        self.automatic_optimization = False
        self.lam = lam
        self.groups: lbv.NeuronGroups | None = None
        self.started = False

    def configure_optimizers(self) -> Any:
        rest = [p for n, p in self.named_parameters() if not n.startswith("net.0.")]
        return torch.optim.SGD(self.net[0].parameters(), lr=0.05), torch.optim.SGD(rest, lr=0.02)

    def training_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch
        if self.groups is None:
            self.groups = lbv.find_neurons(self, x[:1])
        loss = nn.functional.mse_loss(self(x), y)
        first, rest = self.optimizers()
        first.zero_grad()
        rest.zero_grad()
        self.manual_backward(loss)
        first.step()
        rest.step()
        # the helpers the refusal names: the proximal step after the steps; both groups' output weights are in `rest`
        lbv.proximal_step_(self.groups, lbv.prox_thresholds(self.groups, rest, self.lam), first=not self.started)
        self.started = True


def test_manual_optimization_with_two_optimizers_is_refused_with_the_helper_to_use():
    with pytest.raises(
        ValueError,
        match=r"RBVRegularization does not support manual optimization \(automatic_optimization=False\): there "
        r"is no optimizer step hook to attach to\. In your training_step, after each optimizer\.step\(\), call "
        r"lightning_bv\.proximal_step_\(groups, lightning_bv\.prox_thresholds\(groups, optimizer, lam\), first=",
    ):
        trainer(callbacks=[RBVRegularization(lam=0.1)], max_steps=1).fit(TwoOptimizers())
    torch.manual_seed(0)
    module = TwoOptimizers(lam=5.0)  # the helper works there: neurons die
    trainer(max_steps=20).fit(module)
    scores = torch.cat(list(lbv.neuron_scores(module.groups).values()))
    assert (scores == 0).any()


# ---- FSDP: refused at setup, naming the strategy -------------------------------------------------------------------
def test_fsdp_is_refused_by_lightning_on_cpu_and_by_the_callbacks():
    # on a CPU machine Lightning refuses FSDP itself, before any callback runs
    with pytest.raises(ValueError, match="The strategy `fsdp` requires a GPU accelerator"):
        pl.Trainer(strategy="fsdp", accelerator="cpu", devices=1)
    # where it runs (GPUs), each callback that reads or cuts whole rows refuses it at setup, naming the strategy
    from lightning.pytorch.strategies import FSDPStrategy as UnifiedFSDP
    from pytorch_lightning.strategies import FSDPStrategy

    for strategy in (FSDPStrategy(), UnifiedFSDP()):
        fake = types.SimpleNamespace(strategy=strategy)
        for who in ("RBVRegularization", "LowRank", "NeuronPruning"):
            with pytest.raises(ValueError, match=rf"{who} does not support the sharded strategy FSDPStrategy"):
                refuse_sharded(fake, who, "reads whole rows")
        with pytest.raises(ValueError, match=r"Use ModelParallelStrategy\(.*fully_shard.*\(FSDP2\), or strategy='ddp'"):
            refuse_unsupported(fake, MLPModule(), "RBVRegularization")
