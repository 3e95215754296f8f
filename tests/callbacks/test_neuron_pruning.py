import copy
import csv
import math
import pickle

import pytest
import pytorch_lightning as pl
import torch
from helpers import EvalMLP, MLPModule, regression_data, trainer
from torch import nn

import lightning_bv as lbv
from lightning_bv.callbacks import RBVRegularization
from lightning_bv.callbacks.neuron_pruning import NeuronPruning
from lightning_bv.transforms.compact import compact, resize_to_state_dict_

FIXED = regression_data(16, 4, seed=7).tensors  # a fixed batch, not a training batch


def fixed_loss(module):
    with torch.no_grad():
        return nn.functional.mse_loss(module(FIXED[0]), FIXED[1]).item()


def n_params(module):
    return sum(p.numel() for p in module.parameters())


class Probe(pl.Callback):
    """Record the loss on a fixed batch and the parameter count at the end of each training epoch and of training."""

    def __init__(self):
        self.epoch_end = []
        self.train_end = None

    def on_train_epoch_end(self, trainer, pl_module):
        self.epoch_end.append((fixed_loss(pl_module), n_params(pl_module)))

    def on_train_end(self, trainer, pl_module):
        self.train_end = (fixed_loss(pl_module), pl_module(FIXED[0]).detach().clone())


def test_compacts_at_fit_end_same_function_logs_and_updates_other_callbacks(tmp_path):
    torch.manual_seed(0)
    module = MLPModule(lr=0.05)
    path_norm = RBVRegularization(lam=2.0)
    pruning = NeuronPruning()
    probe = Probe()
    logger = pl.loggers.CSVLogger(tmp_path, name="run")
    trainer(callbacks=[path_norm, pruning, probe], max_epochs=3, max_steps=-1, logger=logger).fit(module)
    report = pruning.report
    assert report is not None
    assert report.neurons_before == 32
    assert report.neurons_after < 32
    assert report.param_map == {}  # old Parameters are not kept alive
    # the same function, now smaller
    torch.testing.assert_close(module(FIXED[0]).detach(), probe.train_end[1], atol=1e-6, rtol=0)
    assert n_params(module) == report.params_after < report.params_before
    widths = [g.after for g in report.groups]
    assert [module.net[0].out_features, module.net[2].out_features] == widths
    assert module.net[2].in_features == widths[0]
    assert module.net[4].in_features == widths[1]
    # RBVRegularization reads the groups of the compacted model, which match discovery on the new module; both
    # callbacks read the one set of groups of the module (NeuronPruning edits no other callback)
    assert [g.num_neurons for g in path_norm.groups] == widths
    assert path_norm.groups is pruning.groups is report.neuron_groups
    assert [g.num_neurons for g in lbv.find_neurons(module, FIXED[0])] == widths
    lbv.rbv_norm(path_norm.groups)  # usable
    # logged on rank zero to the logger (pl_module.log is not allowed in on_fit_end)
    with open(f"{logger.log_dir}/metrics.csv") as f:
        rows = list(csv.DictReader(f))
    logged = [r for r in rows if r.get("bv/neurons_after")]
    assert len(logged) == 1
    assert float(logged[0]["bv/neurons_after"]) == report.neurons_after
    assert float(logged[0]["bv/params_before"]) == report.params_before
    assert pruning.history[-1]["neurons_after"] == report.neurons_after


def test_every_n_epochs_keeps_training_without_a_jump():
    torch.manual_seed(0)
    module = MLPModule(lr=0.02, optimizer="adam")
    before, after = Probe(), Probe()
    pruning = NeuronPruning(every_n_epochs=1, on_fit_end=False)
    callbacks = [RBVRegularization(lam=5.0), before, pruning, after]
    t = trainer(callbacks=callbacks, max_epochs=4, max_steps=-1)
    t.fit(module)
    assert t.global_step == 16  # 4 epochs of 4 steps: training went on after each compaction
    assert len(pruning.history) == 4
    first = pruning.history[0]
    assert first["neurons_after"] < first["neurons_before"] == 32
    for (loss_before, params_before), (loss_after, params_after) in zip(before.epoch_end, after.epoch_end):
        assert math.isfinite(loss_after)
        assert abs(loss_after - loss_before) <= 1e-5  # no jump in the loss curve
        assert params_after <= params_before
    assert after.epoch_end[-1][1] < before.epoch_end[0][1]
    # the optimizer holds the module's Parameters and its moments have their shapes
    opt = t.optimizers[0]
    params = [p for g in opt.param_groups for p in g["params"]]
    assert {id(p) for p in params} == {id(p) for p in module.parameters()}
    for p in params:
        assert opt.state[p]["exp_avg"].shape == p.shape == opt.state[p]["exp_avg_sq"].shape
    assert t.callback_metrics["bv/neurons_after"].item() == pruning.history[-1]["neurons_after"]


def test_groups_from_example_input_array_and_example_input():
    module = MLPModule()
    module.example_input_array = torch.randn(2, 4)
    pruning = NeuronPruning()
    trainer(callbacks=[pruning], max_steps=1).fit(module)
    assert pruning.report.groups[0].name == "net.0"
    pruning = NeuronPruning(example_input=torch.randn(3, 4), targets=["net.2"])
    trainer(callbacks=[pruning], max_steps=1).fit(MLPModule())
    assert [g.name for g in pruning.report.groups] == ["net.2"]


def test_resume_after_mid_training_compaction_matches_uninterrupted(tmp_path):
    def run(max_epochs, start, folder, ckpt=None):
        module = copy.deepcopy(start)
        pruning = NeuronPruning(every_n_epochs=1, on_fit_end=False)
        save = pl.callbacks.ModelCheckpoint(dirpath=tmp_path / folder, save_last=True)
        callbacks = [RBVRegularization(lam=5.0), pruning, save]
        trainer(callbacks=callbacks, max_epochs=max_epochs, max_steps=-1, enable_checkpointing=True).fit(
            module, ckpt_path=ckpt
        )
        return module, pruning

    torch.manual_seed(0)
    start = MLPModule(lr=0.02, optimizer="adam")
    full, _ = run(4, start, "full")
    part, part_pruning = run(2, start, "part")
    assert part_pruning.history[0]["neurons_after"] < 32  # the checkpoint holds a compacted module
    resumed, pruning = run(4, start, "resumed", ckpt=str(tmp_path / "part" / "last.ckpt"))  # built at full size
    assert len(pruning.history) == 4  # restored from the checkpoint, then two more
    assert [p.shape for p in resumed.parameters()] == [p.shape for p in full.parameters()]
    for p, q in zip(resumed.parameters(), full.parameters()):
        torch.testing.assert_close(p, q, atol=1e-6, rtol=0)


def shapes(state_dict):
    return {k: tuple(v.shape) for k, v in state_dict.items()}


def test_any_checkpoint_of_the_run_tests_before_or_after_compaction(tmp_path):
    torch.manual_seed(0)
    module = EvalMLP(lr=0.05)
    pruning = NeuronPruning(every_n_epochs=1)
    save = pl.callbacks.ModelCheckpoint(dirpath=tmp_path, monitor="val_loss", save_top_k=-1, save_last=True)
    t = trainer(
        callbacks=[RBVRegularization(lam=2.0), pruning, save],
        max_epochs=3,
        max_steps=-1,
        enable_checkpointing=True,
    )
    t.fit(module)
    final = shapes(module.state_dict())
    loss = t.test(module, verbose=False)[0]["test_loss"]
    # the compacted model is the last checkpoint
    assert pruning.checkpoint_path == save.last_model_path
    assert shapes(torch.load(save.last_model_path, weights_only=False)["state_dict"]) == final
    epochs = sorted(str(p) for p in tmp_path.glob("epoch=*.ckpt"))
    saved = [shapes(torch.load(p, weights_only=False)["state_dict"]) for p in epochs]
    assert saved[0] != final  # saved before the first compaction: larger than the module is now
    for path in [*epochs, "best", "last"]:
        result = t.test(module, ckpt_path=path, verbose=False)[0]
        want = final if path == "last" else saved[epochs.index(save.best_model_path if path == "best" else path)]
        assert shapes(module.state_dict()) == want, path
        if path == "last":
            assert result["test_loss"] == pytest.approx(loss, rel=1e-6)
    # a fresh process: a module built at full size, and a Trainer with NeuronPruning in its callbacks
    fresh = EvalMLP()
    result = trainer(callbacks=[NeuronPruning()]).test(fresh, ckpt_path=save.last_model_path, verbose=False)[0]
    assert shapes(fresh.state_dict()) == final
    assert result["test_loss"] == pytest.approx(loss, rel=1e-6)


def test_resize_with_grow_takes_larger_sizes_and_factors_back():
    # what loading a checkpoint saved before compaction into the compacted module needs: larger sizes, and the
    # factors U, V of a product that compaction merged into one dense weight (or a dense weight saved for a product)
    torch.manual_seed(0)
    before = lbv.apply_low_rank(nn.Sequential(nn.Linear(3, 8), nn.ReLU(), nn.Linear(8, 5)), rank=4, targets=["2"])
    after = nn.Sequential(nn.Linear(3, 6), nn.ReLU(), nn.Linear(6, 5))  # smaller, and net 2 merged (dense)
    x = torch.randn(4, 3)
    assert resize_to_state_dict_(after, before.state_dict()) == []  # by default only smaller sizes are taken
    assert sorted(resize_to_state_dict_(after, before.state_dict(), grow=True)) == ["0", "2"]
    after.load_state_dict(before.state_dict())
    assert lbv.is_low_rank(after[2])
    torch.testing.assert_close(after(x), before(x))
    dense = nn.Sequential(nn.Linear(3, 8), nn.ReLU(), nn.Linear(8, 5))
    resize_to_state_dict_(after, dense.state_dict(), grow=True)
    after.load_state_dict(dense.state_dict())
    assert not lbv.is_low_rank(after[2])
    torch.testing.assert_close(after(x), dense(x))


def test_compacted_model_saved_next_to_the_checkpoints_without_save_last(tmp_path):
    torch.manual_seed(0)
    pruning = NeuronPruning()
    save = pl.callbacks.ModelCheckpoint(dirpath=tmp_path)
    module = EvalMLP()
    trainer(
        callbacks=[RBVRegularization(lam=2.0), pruning, save],
        max_epochs=2,
        max_steps=-1,
        enable_checkpointing=True,
    ).fit(module)
    assert pruning.checkpoint_path == str(tmp_path / "compacted.ckpt")
    assert shapes(torch.load(pruning.checkpoint_path, weights_only=False)["state_dict"]) == shapes(module.state_dict())
    assert pruning.report.params_after < pruning.report.params_before


def test_resize_to_state_dict_for_low_rank_cnn():
    def build():
        torch.manual_seed(0)
        net = nn.Sequential(
            nn.Conv2d(3, 8, 3),
            nn.BatchNorm2d(8),
            nn.ReLU(),
            nn.Flatten(),
            nn.Linear(8 * 8, 6),
            nn.PReLU(6),
            nn.Linear(6, 1),
        )
        return lbv.apply_low_rank(net, rank=2, targets=["4"])

    x = torch.randn(4, 3, 4, 6)
    net = build().eval()
    groups = lbv.find_neurons(net, x)
    with torch.no_grad():
        net[4].parametrizations.weight.original1[:, :16] = 0.0  # channels 0 and 1 of the conv (8 columns each)
        net[6].weight[:, 3] = 0.0
    compact(net, groups)
    fresh = build().eval()
    resized = resize_to_state_dict_(fresh, net.state_dict())
    assert resized == ["0", "1", "4", "5", "6"]
    fresh.load_state_dict(net.state_dict())
    torch.testing.assert_close(fresh(x), net(x), atol=1e-6, rtol=0)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"tol": -1.0}, r"`tol` must be a finite float >= 0.*got -1.0"),
        ({"tol": float("nan")}, r"`tol` must be a finite float >= 0"),
        ({"tol": "0"}, r"`tol` must be a finite float >= 0.*got '0'"),
        ({"every_n_epochs": 0}, r"`every_n_epochs` must be None or an int >= 1, got 0"),
        ({"every_n_epochs": True}, r"`every_n_epochs` must be None or an int >= 1, got True"),
        ({"on_fit_end": "yes"}, r"`on_fit_end` must be a bool, got 'yes'"),
        ({"on_fit_end": False}, r"would never compact"),
        ({"targets": 5}, r"`targets` must be None, a regex string or a list of module names, got 5"),
    ],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises((ValueError, TypeError), match=match):
        NeuronPruning(**kwargs)


def test_mid_training_compaction_refused_under_ddp():
    t = pl.Trainer(accelerator="cpu", devices=1, strategy="ddp", logger=False, enable_progress_bar=False)
    with pytest.raises(ValueError, match=r"every_n_epochs=2\) compacts during training only on a single device"):
        NeuronPruning(every_n_epochs=2).setup(t, MLPModule(), "fit")
    NeuronPruning().setup(t, MLPModule(), "fit")  # compaction at the end of fit is fine under DDP


def test_fit_end_compaction_refused_in_spawned_workers():
    t = pl.Trainer(accelerator="cpu", devices=2, strategy="ddp_spawn", logger=False, enable_progress_bar=False)
    with pytest.raises(ValueError, match=r"cannot compact at the end of a fit under DDPStrategy with start method"):
        NeuronPruning().setup(t, MLPModule(), "fit")


def test_picklable_and_no_module_in_checkpoint_state():
    pruning = NeuronPruning(every_n_epochs=1, example_input=torch.randn(1, 4))
    pickle.loads(pickle.dumps(pruning))  # ddp_spawn pickles callbacks
    module = MLPModule()
    trainer(callbacks=[pruning], max_epochs=1, max_steps=-1).fit(module)
    assert pruning.groups is not None
    copied = pickle.loads(pickle.dumps(pruning))  # holds no module
    assert copied.groups is None
    assert copied.report is None
    state = pruning.state_dict()
    assert set(state) == {"history", "tol"}
    assert all(isinstance(v, float) for h in state["history"] for v in h.values())


DDP_SCRIPT = """
import sys
sys.path.insert(0, {tests!r})
import torch
from helpers import MLPModule, trainer
from lightning_bv.callbacks import RBVRegularization
from lightning_bv.callbacks.neuron_pruning import NeuronPruning

torch.manual_seed(0)
module = MLPModule(lr=0.05)
pruning = NeuronPruning()
t = trainer(callbacks=[RBVRegularization(lam=2.0), pruning], strategy="ddp", devices=2, max_steps=12)
t.fit(module)
torch.save(module.state_dict(), {out!r} + f"/rank{{t.global_rank}}.pt")
"""


@pytest.mark.slow
def test_ddp_ranks_compact_alike(tmp_path):
    import os
    import subprocess
    import sys

    script = tmp_path / "fit.py"
    tests = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    script.write_text(DDP_SCRIPT.format(tests=tests, out=str(tmp_path)))
    # strategy="ddp" relaunches the script itself for rank 1, so it runs as a script, not inside pytest
    subprocess.run([sys.executable, str(script)], check=True, cwd=tmp_path, timeout=300, capture_output=True)
    r0 = torch.load(tmp_path / "rank0.pt", weights_only=True)
    r1 = torch.load(tmp_path / "rank1.pt", weights_only=True)
    assert r0["net.0.weight"].shape[0] < 16  # compacted
    for k in r0:
        assert torch.equal(r0[k], r1[k]), k
