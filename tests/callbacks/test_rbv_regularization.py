import copy
import inspect
import types
import warnings

import pytest
import pytorch_lightning as pl
import torch
from helpers import ManualMLP, MLPModule, SaveWeights, regression_data, trainer
from torch import nn
from torch.utils.data import DataLoader

import lightning_bv as lbv
from lightning_bv.callbacks import RBVRegularization
from lightning_bv.callbacks._base import refuse_unsupported


def manual_run(module, mode, lam, steps, lr, q=2, accumulate=1):
    """The same training as Lightning's, written out in plain PyTorch with the library's functions."""
    model = copy.deepcopy(module.net)
    groups = lbv.find_neurons(model, torch.randn(2, module.hparams.d))
    if mode == "prox":  # the callback lifts the chain's shared hidden matrix to A B before the optimizer exists
        assert lbv.lift_shared_weights(model, groups, normalize=True).lifted == ["2"]
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    batches = list(DataLoader(regression_data(module.hparams.n, module.hparams.d), batch_size=16))
    it = iter(batches * 10)
    for step in range(steps):
        opt.zero_grad()
        for _ in range(accumulate):
            x, y = next(it)
            (nn.functional.mse_loss(model(x), y) / accumulate).backward()
        if mode == "penalty":
            (lam * lbv.rbv_norm(groups, q)).backward()
        elif mode == "weight_decay":
            (lam * lbv.neuron_weight_decay(groups, 2)).backward()
        opt.step()
        if mode == "prox":  # prox_ at the first update, PathProx's projection and shrink afterwards
            lbv.proximal_step_(groups, lbv.prox_thresholds(groups, opt, lam), q, first=step == 0)
    return model


class PlainSGD(MLPModule):
    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.hparams.lr)


@pytest.mark.parametrize(("mode", "q"), [("prox", 2), ("prox", 1), ("penalty", 2), ("penalty", 1), ("weight_decay", 2)])
def test_matches_plain_pytorch_loop(mode, q):
    torch.manual_seed(0)
    module = PlainSGD(lr=0.05)
    expected = manual_run(module, mode, lam=0.2, steps=6, lr=0.05, q=q)
    cb = RBVRegularization(lam=0.2, q=q, mode=mode, every_n_steps=1)
    trainer(callbacks=[cb], max_steps=6).fit(module)
    for (n, p), e in zip(module.net.named_parameters(), expected.parameters()):
        torch.testing.assert_close(p, e, atol=1e-5, rtol=1e-5, msg=n)
    assert [g.name for g in cb.groups] == ["net.0", "net.2"]


def test_gradient_accumulation_adds_penalty_once_per_optimizer_step():
    torch.manual_seed(0)
    module = PlainSGD(lr=0.05)
    expected = manual_run(module, "penalty", lam=0.3, steps=3, lr=0.05, accumulate=2)
    cb = RBVRegularization(lam=0.3, mode="penalty", every_n_steps=1)
    trainer(callbacks=[cb], max_steps=3, accumulate_grad_batches=2).fit(module)
    for p, e in zip(module.net.parameters(), expected.parameters()):
        torch.testing.assert_close(p, e, atol=1e-5, rtol=1e-5)


class ZeroLoss(PlainSGD):
    """A loss with zero gradient: a step then moves the weights by -lr * (what the callback added) alone."""

    def training_step(self, batch, batch_idx):
        return 0.0 * self(batch[0]).sum()


def penalty_grad(net, lam):
    net64 = copy.deepcopy(net).double()
    (lam * lbv.rbv_norm(lbv.find_neurons(net64, torch.zeros(1, 4, dtype=torch.float64)))).backward()
    return [p.grad.float() if p.grad is not None else torch.zeros_like(p).float() for p in net64.parameters()]


@pytest.mark.parametrize("precision", ["bf16-mixed", "16-mixed"])
def test_mixed_precision_adds_an_unscaled_gradient(precision):
    torch.manual_seed(0)
    module = ZeroLoss(lr=0.1)
    before = [p.detach().clone() for p in module.net.parameters()]
    grads = penalty_grad(module.net, lam=0.5)
    trainer(callbacks=[RBVRegularization(lam=0.5, mode="penalty")], max_steps=1, precision=precision).fit(module)
    for p, b, g in zip(module.net.parameters(), before, grads):
        torch.testing.assert_close(p.detach(), b - 0.1 * g, atol=1e-6, rtol=1e-5)


def test_gradient_clipping_clips_the_penalty_with_the_rest():
    torch.manual_seed(0)
    module = ZeroLoss(lr=0.1)
    before = torch.cat([p.detach().flatten().clone() for p in module.net.parameters()])
    grads = penalty_grad(module.net, lam=5.0)
    assert torch.cat([g.flatten() for g in grads]).norm() > 1.0  # so clipping to 0.01 really acts
    cb = RBVRegularization(lam=5.0, mode="penalty")
    trainer(callbacks=[cb], max_steps=1, gradient_clip_val=0.01, gradient_clip_algorithm="norm").fit(module)
    after = torch.cat([p.detach().flatten() for p in module.net.parameters()])
    assert (before - after).norm().item() == pytest.approx(0.1 * 0.01, rel=1e-3)


def test_resume_matches_uninterrupted_fit(tmp_path):
    def run(max_steps, ckpt=None, seed_model=None, folder="full"):
        module = copy.deepcopy(seed_model)
        cb = RBVRegularization(lam=0.05, mode="prox", every_n_steps=3)
        save = pl.callbacks.ModelCheckpoint(dirpath=tmp_path / folder, save_last=True, every_n_train_steps=1)
        t = trainer(
            callbacks=[cb, save],
            max_steps=max_steps,
            enable_checkpointing=True,
        )
        t.fit(module, ckpt_path=ckpt)
        return module, cb

    torch.manual_seed(0)
    start = MLPModule(lr=0.05)
    full, cb_full = run(12, seed_model=start)
    # stop at an epoch boundary (4 batches an epoch): Lightning replays a part-done epoch's batches differently
    run(8, seed_model=start, folder="part")
    ckpt = torch.load(tmp_path / "part" / "last.ckpt", weights_only=True)
    key = cb_full.state_key
    assert ckpt["callbacks"][key]["steps"] == 8  # every_n_steps=3: the counter's phase matters
    resumed, cb = run(12, ckpt=str(tmp_path / "part" / "last.ckpt"), seed_model=MLPModule(lr=0.05), folder="resumed")
    assert cb._steps == 12
    for p, e in zip(resumed.parameters(), full.parameters()):
        torch.testing.assert_close(p, e, atol=1e-6, rtol=0)


def test_logs_metrics_and_prox_makes_neurons_dead():
    torch.manual_seed(0)
    module = MLPModule(lr=0.05)
    cb = RBVRegularization(lam=0.5, mode="prox")
    t = trainer(callbacks=[cb], max_steps=60)
    t.fit(module)
    m = t.callback_metrics
    assert {"bv/rbv_norm", "bv/active_neurons", "bv/active_fraction"} <= m.keys()
    scores = torch.cat(list(lbv.neuron_scores(cb.groups).values()))
    assert m["bv/active_neurons"].item() == (scores > 0).sum().item() < 32
    assert m["bv/rbv_norm"].item() == pytest.approx(scores.sum().item(), rel=1e-5)
    assert "bv/rbv_norm" in t.progress_bar_metrics
    assert "bv/active_rank_components" not in m  # no low-rank layer


def test_active_neurons_count_relu_neurons_and_rank_components_apart():
    torch.manual_seed(0)
    module = MLPModule(lr=0.05)
    # 32 ReLU neurons and a 3-component 'net.0:rank' group (net.0 reads the data; a low-rank layer between two groups
    # would be owned by them and have no group of its own)
    lbv.apply_low_rank(module.net, rank=3, targets=["0"])
    cb = RBVRegularization(lam=1e-4)
    t = trainer(callbacks=[cb], max_steps=2)
    t.fit(module)
    scores = lbv.neuron_scores(cb.groups)
    relu = [g.name for g in cb.groups if g.activation != "identity"]
    assert sorted(scores.keys() - set(relu)) == ["net.0:rank"]
    m = t.callback_metrics
    assert m["bv/active_neurons"].item() == sum(int((scores[n] > 0).sum()) for n in relu) == 32
    assert m["bv/active_fraction"].item() == 1.0
    assert m["bv/active_rank_components"].item() == 3


def test_lam_schedule_callable():
    class Warmup:
        def __call__(self, step):
            return 0.0 if step < 5 else 1.0

    torch.manual_seed(0)
    module = PlainSGD(lr=0.05)
    expected = manual_run(module, "penalty", lam=0.0, steps=5, lr=0.05)
    trainer(callbacks=[RBVRegularization(lam=Warmup(), mode="penalty")], max_steps=5).fit(module)
    for p, e in zip(module.net.parameters(), expected.parameters()):
        torch.testing.assert_close(p, e, atol=1e-6, rtol=1e-6)


def test_example_input_array_discovers_at_setup():
    module = MLPModule()
    module.example_input_array = torch.randn(2, 4)
    cb = RBVRegularization(lam=0.1)
    trainer(callbacks=[cb], max_steps=1).fit(module)
    assert cb.groups.names == ["net.0", "net.2"]


def test_every_n_steps_default_is_every_step_for_the_prox_and_8_for_the_gradient_modes():
    assert inspect.signature(RBVRegularization).parameters["every_n_steps"].default is None
    assert RBVRegularization(lam=0.1).every_n_steps == 1
    assert RBVRegularization(lam=0.1, mode="penalty").every_n_steps == 8
    assert RBVRegularization(lam=0.1, mode="weight_decay").every_n_steps == 8
    assert RBVRegularization(lam=0.1, mode="weight_decay", every_n_steps=2).every_n_steps == 2


@pytest.mark.parametrize("every", [4, 8])
def test_every_n_steps_matches_k_times_strength(every):
    torch.manual_seed(0)
    module = PlainSGD(lr=0.05)
    lazy = copy.deepcopy(module)
    trainer(callbacks=[RBVRegularization(lam=0.02, mode="prox", every_n_steps=1)], max_steps=48).fit(module)
    trainer(callbacks=[RBVRegularization(lam=0.02, mode="prox", every_n_steps=every)], max_steps=48).fit(lazy)
    r1 = lbv.rbv_norm(lbv.find_neurons(module.net, torch.randn(1, 4))).item()
    r4 = lbv.rbv_norm(lbv.find_neurons(lazy.net, torch.randn(1, 4))).item()
    assert r4 == pytest.approx(r1, rel=0.05)


def _record_strengths(monkeypatch, name):
    """Spy on the update function ``name`` the callback calls: record the strength of every call, then run it."""
    import lightning_bv.callbacks.rbv_regularization as module

    calls = []
    real = getattr(module, name)

    def spy(groups, strength, *args, **kwargs):
        calls.append(strength if not isinstance(strength, dict) else max(strength.values()))
        return real(groups, strength, *args, **kwargs)

    monkeypatch.setattr(module, name, spy)
    return calls


class SinceAtEpochEnd(pl.Callback):
    """Reads the regularizer's debt of steps at every epoch end and at validation (both should see it paid)."""

    def __init__(self, cb):
        self.cb, self.seen = cb, []

    def on_validation_start(self, trainer, pl_module):
        if trainer.global_step:
            self.seen.append(self.cb._since)

    def on_train_epoch_end(self, trainer, pl_module):
        self.seen.append(self.cb._since)


class Validated(MLPModule):
    def validation_step(self, batch, batch_idx):
        self.log("val_loss", nn.functional.mse_loss(self(batch[0]), batch[1]))


def test_lazy_updates_also_close_every_epoch_and_the_fit(monkeypatch):
    calls = _record_strengths(monkeypatch, "add_weight_decay_grad_")
    cb = RBVRegularization(lam=0.1, mode="weight_decay", every_n_steps=3)
    probe = SinceAtEpochEnd(cb)
    module = Validated()
    val = DataLoader(regression_data(16), batch_size=16)
    # 4 batches an epoch, max_steps=10: due at steps 3, 4 (epoch end), 7, 8 (epoch end) and 10 (end of the fit)
    trainer(callbacks=[cb, probe], max_steps=10).fit(module, module.train_dataloader(), val)
    assert calls == pytest.approx([0.3, 0.1, 0.3, 0.1, 0.2])
    assert sum(calls) == pytest.approx(0.1 * 10)  # the strength of every step, none lost, none twice
    assert probe.seen
    assert all(since == 0 for since in probe.seen)


class StopsAt(MLPModule):
    def __init__(self, stop_step, **kwargs):
        super().__init__(**kwargs)
        self.stop_step = stop_step

    def on_train_batch_end(self, outputs, batch, batch_idx):
        if self.trainer.global_step == self.stop_step:
            self.trainer.should_stop = True


def test_a_fit_stopped_between_lazy_updates_gets_its_pending_prox(monkeypatch):
    calls = _record_strengths(monkeypatch, "proximal_step_")
    cb = RBVRegularization(lam=0.1, every_n_steps=8)
    module = StopsAt(6, lr=0.05)
    trainer(callbacks=[cb], max_steps=100).fit(module)
    # step 4 closes epoch 1 (4 steps owed), steps 5 and 6 are owed when should_stop ends the fit: on_train_end;
    # tau = lam * lr / (1 - momentum) for SGD's heavy ball with momentum 0.9
    assert calls == pytest.approx([4 * 0.1 * 0.05 / 0.1, 2 * 0.1 * 0.05 / 0.1])
    assert cb._since == 0
    assert cb._steps == 6


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"lam": -1.0}, r"`lam` must be a finite float >= 0 or a callable of the global step, got -1.0"),
        ({"lam": float("nan")}, r"`lam` must be a finite float >= 0"),
        ({"lam": "big"}, r"`lam` must be a finite float >= 0.*'big'"),
        ({"lam": 0.1, "q": 3}, r"`q` must be 1 or 2.*got 3"),
        ({"lam": 0.1, "mode": "l1"}, r"`mode` must be one of \('prox', 'penalty', 'weight_decay'\), got 'l1'"),
        ({"lam": 0.1, "every_n_steps": 0}, r"`every_n_steps` must be None or an int >= 1, got 0"),
        ({"lam": 0.1, "targets": 5}, r"`targets` must be None, a regex string or a list of module names, got 5"),
        ({"lam": 0.1, "targets": "("}, r"`targets`='\(' is not a valid regular expression"),
    ],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises((ValueError, TypeError), match=match):
        RBVRegularization(**kwargs)


def test_targets_that_match_nothing_raise():
    cb = RBVRegularization(lam=0.1, targets=["nope"])
    with pytest.raises(
        lbv.TargetsMatchNothingError, match=r"'nope' matched no module.*Available: \['net.0', 'net.2'\]"
    ):
        trainer(callbacks=[cb], max_steps=1).fit(MLPModule())


def test_nothing_to_regularize_warns_and_trains_on():
    class Linear(MLPModule):
        def __init__(self):
            super().__init__()
            self.net = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1), nn.ReLU())

    module = Linear()
    before = copy.deepcopy(module.state_dict())
    with pytest.warns(UserWarning, match="found no neuron group.*unsupported op 'mse_loss'"):
        trainer(callbacks=[RBVRegularization(lam=0.1)], max_steps=2).fit(module)
    assert any(not torch.equal(v, module.state_dict()[k]) for k, v in before.items())


def test_manual_optimization_refused():
    with pytest.raises(ValueError, match="does not support manual optimization"):
        trainer(callbacks=[RBVRegularization(lam=0.1)], max_steps=1).fit(ManualMLP())


def test_sharded_strategy_refused():
    from pytorch_lightning.strategies import FSDPStrategy

    fake_trainer = types.SimpleNamespace(strategy=FSDPStrategy())
    with pytest.raises(ValueError, match="does not support the sharded strategy FSDPStrategy"):
        refuse_unsupported(fake_trainer, MLPModule(), "RBVRegularization")


@pytest.mark.slow
def test_ddp_two_processes_match_single_process(tmp_path):
    torch.manual_seed(0)
    start = MLPModule(lr=0.05, batch_size=16, deterministic_sampler=True)
    single = copy.deepcopy(start)
    kw = {"max_steps": 6, "use_distributed_sampler": False}
    trainer(callbacks=[RBVRegularization(lam=0.1, mode="prox")], **kw).fit(single)
    ddp = copy.deepcopy(start)
    cbs = [RBVRegularization(lam=0.1, mode="prox"), SaveWeights(str(tmp_path))]
    trainer(callbacks=cbs, strategy="ddp_spawn", devices=2, **kw).fit(ddp)
    r0 = torch.load(tmp_path / "rank0.pt", weights_only=True)
    r1 = torch.load(tmp_path / "rank1.pt", weights_only=True)
    for k in r0:
        assert torch.equal(r0[k], r1[k]), k  # identical across ranks
        torch.testing.assert_close(r0[k], single.state_dict()[k], atol=1e-5, rtol=0, msg=k)


# ---- the proximal method: lifting, optimizers' thresholds, rescale invariance ---------------------------------------
def test_a_plain_chain_is_lifted_at_setup_and_merged_back_by_neuron_pruning():
    from lightning_bv.callbacks import NeuronPruning

    torch.manual_seed(0)
    module = MLPModule(lr=0.05)
    cb = RBVRegularization(lam=1.0)
    pruning = NeuronPruning()
    trainer(callbacks=[cb, pruning], max_steps=30).fit(module)
    assert cb.lift_report.lifted == ["net.2"]
    assert cb.lift_report.ranks == {"net.2": 16}
    assert pruning.report.merged == ["net.2"]  # dense net.2 is smaller than its factors: merged back
    assert not lbv.is_low_rank(module.net[2])
    assert module.net[0].out_features < 16
    assert module.net[2].out_features < 16
    x = torch.randn(8, 4)
    assert lbv.find_neurons(module, x).names == ["net.0", "net.2"]


def test_lifting_is_off_with_lift_shared_false_and_in_the_gradient_modes():
    for cb in (RBVRegularization(lam=0.1, lift_shared=False), RBVRegularization(lam=0.1, mode="penalty")):
        module = MLPModule()
        trainer(callbacks=[cb], max_steps=2).fit(module)
        assert cb.lift_report is None
        assert not lbv.is_low_rank(module.net[2])
    with pytest.raises(
        TypeError, match=r"`lift_shared` must be None \(on for mode='prox'\), True or False, got str 'yes'"
    ):
        RBVRegularization(lam=0.1, lift_shared="yes")


class RescaledMLP(MLPModule):
    """The same function as MLPModule(seed) with every neuron rescaled by a random positive factor."""

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        groups = lbv.find_neurons(self.net, torch.randn(1, 4))
        torch.manual_seed(7)
        with torch.no_grad():
            for g in groups:
                lbv.functional.rbv._rescale_(g, torch.rand(g.num_neurons) * 4 + 0.25)


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_a_model_and_a_rescale_of_it_train_identically(optimizer):
    torch.manual_seed(0)
    plain = MLPModule(optimizer=optimizer, lr=0.02)
    torch.manual_seed(0)
    rescaled = RescaledMLP(optimizer=optimizer, lr=0.02)
    x = torch.randn(5, 4)
    torch.testing.assert_close(rescaled(x), plain(x), rtol=1e-5, atol=1e-6)
    assert not torch.allclose(rescaled.net[0].weight, plain.net[0].weight)
    for module in (plain, rescaled):
        trainer(callbacks=[RBVRegularization(lam=0.5)], max_steps=10).fit(module)
    for (n, p), q in zip(plain.named_parameters(), rescaled.parameters()):
        torch.testing.assert_close(q, p, rtol=1e-4, atol=1e-5, msg=n)


def test_adam_and_the_prox_kill_neurons_with_the_same_lam_as_sgd():
    alive = {}
    for optimizer in ("sgd", "adam"):
        torch.manual_seed(0)
        module = MLPModule(optimizer=optimizer, lr=0.01 if optimizer == "adam" else 0.05, n=128)
        cb = RBVRegularization(lam=0.05)
        trainer(callbacks=[cb], max_epochs=6, max_steps=-1).fit(module)
        alive[optimizer] = int(sum((s > 0).sum() for s in lbv.neuron_scores(cb.groups).values()))
    assert 0 < alive["adam"] < 32, alive
    assert 0 < alive["sgd"] < 32, alive


class NAdamMLP(MLPModule):
    def configure_optimizers(self):
        return torch.optim.NAdam(self.parameters(), lr=1e-3, weight_decay=0.01)


def test_unknown_optimizer_and_weight_decay_each_warn_once():
    with pytest.warns(UserWarning, match="NAdam") as record:
        trainer(callbacks=[RBVRegularization(lam=0.1)], max_steps=4).fit(NAdamMLP())
    messages = [str(w.message) for w in record]
    assert sum("does not know the step size of optimizer NAdam" in m for m in messages) == 1
    assert sum("has weight_decay=0.01 on the neuron groups' weights" in m for m in messages) == 1


class OwnStep(RBVRegularization):
    """A user's optimizer with a known step: override the one method."""

    def thresholds(self, optimizer, lam, lrs):
        return {g.name: lam * 0.123 for g in self.groups}


def test_thresholds_is_the_one_method_to_override(monkeypatch):
    calls = _record_strengths(monkeypatch, "proximal_step_")
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # an overridden threshold is not an unknown optimizer
        trainer(callbacks=[OwnStep(lam=2.0)], max_steps=3).fit(NAdamMLPNoDecay())
    assert calls == pytest.approx([2.0 * 0.123] * 3)


class NAdamMLPNoDecay(MLPModule):
    def configure_optimizers(self):
        return torch.optim.NAdam(self.parameters(), lr=1e-3)


class LateData(MLPModule):
    def setup(self, stage):
        self.ds = regression_data(32, 4)

    def train_dataloader(self):
        return DataLoader(self.ds, batch_size=8)


def test_no_batch_at_setup_warns_and_discovers_on_the_first_step():
    cb = RBVRegularization(lam=0.1)
    with pytest.warns(
        UserWarning, match=r"could not find the neuron groups at setup: its train dataloader cannot be built"
    ):
        trainer(callbacks=[cb], max_steps=2).fit(LateData())
    assert cb.groups.names == ["net.0", "net.2"]
    assert cb.lift_report is None


def test_low_rank_listed_after_the_regularizer_runs_first():
    from lightning_bv.callbacks import LowRank

    torch.manual_seed(0)
    module = MLPModule()
    low_rank = LowRank(rank=3, targets=["net.2"])
    cb = RBVRegularization(lam=0.1)
    trainer(callbacks=[cb, low_rank], max_steps=2).fit(module)
    assert low_rank.ranks == {"net.2": 3}  # not lifted to full rank first
    assert cb.lift_report.lifted == []
    assert [s.factor for s in cb.groups["net.0"].v_slots] == [True]  # the explicit low-rank layer is owned the same way


class ReLU6Module(MLPModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(4, 8), nn.ReLU6(), nn.Linear(8, 1))


def test_no_relu_warning_names_what_the_model_has_instead():
    with pytest.warns(
        UserWarning,
        match=r"no neuron group to regularize.*It found 1 ReLU6 activation\(s\), which are not positively homogeneous",
    ):
        trainer(callbacks=[RBVRegularization(lam=0.1)], max_steps=1).fit(ReLU6Module())
