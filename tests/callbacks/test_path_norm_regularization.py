"""The former name PathNormRegularization: a subclass of RBVRegularization that warns, with the same checkpoints."""

import copy
import inspect
import pickle
import warnings

import pytest
import pytorch_lightning as pl
import torch
from helpers import MLPModule, trainer

from lightning_bv.callbacks import PathNormRegularization, RBVRegularization
from lightning_bv.callbacks import path_norm_regularization as old_module

RENAMED = r"`PathNormRegularization` is renamed `RBVRegularization`"


def test_the_old_name_warns_and_is_the_new_class():
    with pytest.warns(FutureWarning, match=RENAMED):
        old = PathNormRegularization(lam=0.1, mode="penalty", every_n_steps=2)
    assert old_module.PathNormRegularization is PathNormRegularization
    assert isinstance(old, RBVRegularization)
    new = RBVRegularization(lam=0.1, mode="penalty", every_n_steps=2)
    assert (old.lam, old.mode, old.q, old.every_n_steps) == (new.lam, new.mode, new.q, new.every_n_steps)
    # same constructor (the CLI reads it), same key for the checkpoint state
    assert inspect.signature(PathNormRegularization) == inspect.signature(RBVRegularization)
    assert (
        old.state_key
        == new.state_key
        == "PathNormRegularization" + repr({"mode": "penalty", "q": 2, "targets": None, "exclude": None})
    )
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        RBVRegularization(lam=0.1)  # the new name does not warn
        pickle.loads(pickle.dumps(old))  # nor does unpickling the old one (ddp_spawn pickles callbacks)


def test_bad_arguments_raise_the_same_errors():
    with pytest.warns(FutureWarning), pytest.raises(ValueError, match=r"`q` must be 1 or 2.*got 3"):
        PathNormRegularization(lam=0.1, q=3)


class Subclass(RBVRegularization):
    pass


def test_a_subclass_has_its_own_state_key():
    assert Subclass(lam=0.1).state_key.startswith("Subclass{")


@pytest.mark.parametrize(("first", "then"), [("old", "new"), ("new", "old")])
def test_a_checkpoint_of_one_name_resumes_under_the_other(tmp_path, first, then):
    def make(name):
        if name == "new":
            return RBVRegularization(lam=0.05, every_n_steps=3)
        with pytest.warns(FutureWarning, match=RENAMED):
            return PathNormRegularization(lam=0.05, every_n_steps=3)

    def run(name, max_steps, folder, ckpt=None):
        module = copy.deepcopy(start)
        cb = make(name)
        save = pl.callbacks.ModelCheckpoint(dirpath=tmp_path / folder, save_last=True, every_n_train_steps=1)
        trainer(callbacks=[cb, save], max_steps=max_steps, enable_checkpointing=True).fit(module, ckpt_path=ckpt)
        return module, cb

    torch.manual_seed(0)
    start = MLPModule(lr=0.05)
    full, _ = run(then, 12, "full")
    run(first, 8, "part")  # at an epoch boundary (4 batches an epoch)
    ckpt = torch.load(tmp_path / "part" / "last.ckpt", weights_only=True)
    assert ckpt["callbacks"][make(then).state_key]["steps"] == 8
    resumed, cb = run(then, 12, "resumed", ckpt=str(tmp_path / "part" / "last.ckpt"))
    assert cb._steps == 12  # the state was found under the key of the other name
    for p, e in zip(resumed.parameters(), full.parameters()):
        torch.testing.assert_close(p, e, atol=1e-6, rtol=0)
