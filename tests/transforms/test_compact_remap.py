"""compaction returns new groups: the passed ones are untouched, report.neuron_groups and remap match discovery."""

import pytest
import torch
from compact_models import (
    Concat,
    DepthwiseBlock,
    GroupedConsumer,
    assert_groups_equal,
    cnn,
    kill,
    layout,
    mlp,
    summary,
    trained_stats,
)
from torch import nn

import lightning_bv as lbv
from lightning_bv.transforms.compact import compact

REMAP_CASES = [
    (mlp, (8, 5), {"0": [1, 4, 7], "2": [0, 3]}),
    (cnn, (8, 1, 8, 8), {"0": [1], "6": [2]}),
    (Concat, (8, 3), {"right": [1, 3], "left": [0]}),
    (GroupedConsumer, (2, 3, 5, 5), {"a": [1, 6]}),
    (DepthwiseBlock, (2, 3, 6, 6), {"pw1": [4], "dw": [4, 5]}),
]


@pytest.mark.parametrize(("make", "shape", "which"), REMAP_CASES, ids=lambda c: getattr(c, "__name__", None))
def test_passed_groups_are_untouched_and_new_groups_match_discovery(make, shape, which):
    model = make()
    x = torch.randn(shape)
    if any(isinstance(m, nn.BatchNorm2d) for m in model.modules()):
        trained_stats(model, x)
    model.eval()
    groups = lbv.find_neurons(model, x)
    kill(groups, which)
    before, sizes = layout(groups), summary(groups)
    report = compact(model, groups)
    assert report.params_after < report.params_before
    assert layout(groups) == before  # same counts, same slot objects, same indices
    assert summary(groups) == sizes
    new = report.neuron_groups
    assert isinstance(new, lbv.NeuronGroups)
    assert not {id(g) for g in new} & {id(g) for g in groups}
    assert not {id(s) for g in new for s in g.slots()} & {id(s) for g in groups for s in g.slots()}
    fresh = lbv.find_neurons(model, x)
    assert_groups_equal(new, fresh)
    assert [r.after for r in report.groups] == [g.num_neurons for g in new]
    # usable on the compacted model: the same seminorm as groups found on it
    want = lbv.rbv_norm(fresh)
    torch.testing.assert_close(lbv.rbv_norm(new), want, rtol=16 * torch.finfo(want.dtype).eps, atol=0.0)


@pytest.mark.parametrize(("make", "shape", "which"), REMAP_CASES, ids=lambda c: getattr(c, "__name__", None))
def test_remap_gives_other_groups_of_the_model_as_discovery_finds_them(make, shape, which):
    model = make()
    x = torch.randn(shape)
    model.eval()
    mine, theirs = lbv.find_neurons(model, x), lbv.find_neurons(model, x)
    kill(mine, which)
    before = layout(theirs)
    report = compact(model, mine)
    remapped = report.remap(theirs)
    assert layout(theirs) == before  # left as they were
    assert isinstance(remapped, lbv.NeuronGroups)
    assert remapped.skipped == theirs.skipped
    assert_groups_equal(remapped, lbv.find_neurons(model, x))
    assert_groups_equal(report.remap(report.neuron_groups), report.neuron_groups)  # already current: copied
    # update_groups_ still updates in place, and leaves groups that are already current alone
    assert report.update_groups_(theirs) is theirs
    assert_groups_equal(theirs, remapped)
    current = layout(report.neuron_groups)
    report.update_groups_(report.neuron_groups)
    assert layout(report.neuron_groups) == current


def test_new_groups_of_a_merged_lifted_chain_read_the_dense_weights():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 1))
    x = torch.randn(8, 4)
    groups = lbv.find_neurons(model, x)
    other = lbv.find_neurons(model, x)  # found before the lift: on the dense weight
    lbv.lift_shared_weights(model, groups)
    kill(groups, {"0": [1, 2]})
    before = layout(groups)
    report = compact(model, groups)
    assert report.merged == ["2"]
    assert layout(groups) == before

    def factors(gs):
        return [s.factor for g in gs for s in g.w_slots + g.v_slots if s.module_name == "2"]

    assert factors(groups) == [True, True]
    assert factors(report.neuron_groups) == [False, False]
    assert report.neuron_groups.lifted == groups.lifted == ["2"]
    fresh = lbv.find_neurons(model, x)
    assert_groups_equal(report.neuron_groups, fresh)
    assert_groups_equal(report.remap(other), fresh)
