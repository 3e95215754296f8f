"""GroupsCallback, the base of the callbacks that need neuron groups, and ModuleGroups, the one holder of them."""

import pickle

import pytorch_lightning as pl
import torch
from helpers import MLPModule, trainer
from torch import nn

import lightning_bv as lbv
from lightning_bv.callbacks import BVMonitor, NeuronPruning, RBVRegularization
from lightning_bv.callbacks._groups import GroupsCallback, ModuleGroups, groups_of, selection
from lightning_bv.transforms.compact import compact


class Recorder(GroupsCallback):
    """A user's callback: told of each set of groups it gets, reads the current ones at every epoch end."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.found, self.widths = [], []

    def on_groups_found(self, trainer, pl_module, groups):
        self.found.append(groups)

    def on_train_epoch_end(self, trainer, pl_module):
        self.widths.append([g.num_neurons for g in self.groups])


def test_the_callbacks_of_a_fit_share_one_set_of_groups_and_compaction_replaces_it():
    torch.manual_seed(0)
    module = MLPModule(lr=0.05)
    reg, monitor, recorder = RBVRegularization(lam=5.0), BVMonitor(every_n_steps=2), Recorder()
    pruning = NeuronPruning(every_n_epochs=1)
    t = trainer(callbacks=[reg, monitor, pruning, recorder], max_epochs=3, max_steps=-1)
    t.fit(module)
    assert reg.groups is monitor.groups is pruning.groups is recorder.groups is pruning.report.neuron_groups
    assert recorder.groups is groups_of(t, module).get(selection(None, None))
    widths = [g.num_neurons for g in pruning.groups]
    assert widths == [module.net[0].out_features, module.net[2].out_features] < [16, 16]
    assert [g.num_neurons for g in lbv.find_neurons(module, torch.randn(2, 4))] == widths
    assert recorder.found[0].names == ["net.0", "net.2"]  # found once (by the regularizer, at setup), then told
    # listed after NeuronPruning, the recorder reads at each epoch end the groups of the model just compacted
    assert [sum(w) for w in recorder.widths] == [h["neurons_after"] for h in pruning.history[:-1]]  # -1: fit end
    assert pruning.history[0]["neurons_after"] < 32
    assert recorder.widths[-1] == widths


def test_other_targets_are_brought_to_the_new_sizes():
    torch.manual_seed(0)
    module = MLPModule(lr=0.05)
    reg, pruning = RBVRegularization(lam=5.0), NeuronPruning(targets=["net.0"])
    trainer(callbacks=[reg, pruning], max_steps=12).fit(module)
    assert [g.name for g in pruning.groups] == ["net.0"]
    assert reg.groups is not pruning.groups
    assert [g.num_neurons for g in reg.groups] == [module.net[0].out_features, module.net[2].out_features]
    assert module.net[0].out_features < 16
    lbv.rbv_norm(reg.groups)  # usable


def test_replace_after_compaction_in_plain_torch():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 6), nn.ReLU(), nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 1))
    x = torch.randn(4, 3)
    holder = ModuleGroups()
    every, first = selection(None, None), selection(["0"], None)
    holder.set(every, lbv.find_neurons(model, x))
    holder.set(first, lbv.find_neurons(model, x, targets=["0"]))
    with torch.no_grad():
        model[0].weight[:2] = 0.0
        model[0].bias[:2] = -1.0
    report = compact(model, holder.get(first))
    holder.replace_after_compaction(first, report)
    assert holder.get(first) is report.neuron_groups
    assert [g.num_neurons for g in holder.get(every)] == [4, 5] == [g.num_neurons for g in lbv.find_neurons(model, x)]
    holder.set(every, None)
    assert holder.get(every) is None


def test_one_holder_per_module_and_trainer():
    module, other = MLPModule(), MLPModule()
    t1, t2 = trainer(), trainer()
    assert groups_of(t1, module) is groups_of(t1, module)
    assert groups_of(t1, other) is not groups_of(t1, module)
    first = groups_of(t1, module)
    assert groups_of(t2, module) is not first  # a new Trainer finds the groups again
    assert groups_of(t2, module).get(selection(None, None)) is None


def test_groups_are_not_pickled_and_a_new_trainer_finds_them_again():
    module = MLPModule()
    module.example_input_array = torch.randn(2, 4)
    pruning = NeuronPruning(every_n_epochs=1)
    trainer(callbacks=[pruning], max_steps=2).fit(module)
    assert pruning.groups is not None
    assert pickle.loads(pickle.dumps(pruning)).groups is None  # ddp_spawn pickles callbacks; the groups hold the module
    t = trainer(max_steps=2)
    pruning.bind(t, module)
    assert pruning.groups is None


def test_setting_groups_before_any_fit():
    cb = Recorder()
    assert cb.groups is None
    groups = lbv.find_neurons(nn.Sequential(nn.Linear(2, 3), nn.ReLU(), nn.Linear(3, 1)), torch.zeros(1, 2))
    cb.groups = groups
    assert cb.groups is groups


def test_example_input_resolution_and_check():
    import pytest

    cb = Recorder(example_input=torch.zeros(1, 4))
    module = MLPModule()
    module.example_input_array = torch.ones(2, 4)
    assert cb.setup_example_input(module).shape == (1, 4)  # the argument first
    assert Recorder().setup_example_input(module).shape == (2, 4)  # else the module's example_input_array
    assert Recorder().setup_example_input(MLPModule()) is None  # else the first training step's
    with pytest.raises(TypeError, match=r"`example_input` must be None, a tensor or a tuple.*got list"):
        Recorder(example_input=[1.0])
    with pytest.raises(TypeError, match=r"`exclude` must be None, a regex string or a list"):
        Recorder(exclude=3)


def test_discovery_on_the_first_step_without_example():
    torch.manual_seed(0)
    module = MLPModule()
    recorder = Recorder(targets=["net.2"])
    trainer(callbacks=[recorder], max_steps=2).fit(module)
    assert [g.names for g in recorder.found] == [["net.2"]]
    assert recorder.groups is recorder.found[0]


class Failing(pl.Callback):
    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        raise RuntimeError("stop")


def test_an_exception_stops_the_recording():
    import pytest

    module = MLPModule()
    recorder = Recorder()
    with pytest.raises(RuntimeError, match="stop"):
        trainer(callbacks=[recorder, Failing()], max_steps=2).fit(module)
    assert not recorder._discovery.running
