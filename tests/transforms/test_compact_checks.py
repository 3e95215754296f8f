"""compact's checks: what it leaves whole and why, and the arguments and models it refuses."""

import copy
import re

import pytest
import torch
from compact_models import (
    Aliased,
    Tied,
    assert_groups_equal,
    compact_and_check,
    free_port,
    kill,
    mlp,
    scaled,
)
from torch import nn

import lightning_bv as lbv
from lightning_bv.transforms.compact import compact


@pytest.mark.parametrize(
    ("make", "x", "which", "whole", "reason"),
    [
        (Tied, (3, 4), {"a": [1], "d": [2]}, "a", r"a parameter of 'a' is shared with \['c'\] \(tied weights\)"),
        (scaled, (3, 4), {"2": [3], "4": [1]}, "2", r"'2' \(ScaledLinear\) has tensors \['scale'\]"),
    ],
)
def test_unshrinkable_group_left_whole_others_shrunk(make, x, which, whole, reason):
    model = make()
    report, groups = compact_and_check(model, torch.randn(x), which)
    rows = {r.name: r for r in report.groups}
    assert not rows[whole].shrunk
    assert rows[whole].after == rows[whole].before
    assert rows[whole].note.startswith("left whole: ")
    assert re.search(reason, rows[whole].note), rows[whole].note
    others = [n for n in which if n != whole]
    assert all(rows[n].shrunk and rows[n].after == rows[n].before - len(which[n]) for n in others)
    assert "left whole" in str(report)


def test_module_registered_twice_is_left_whole():
    model = Aliased()
    report, _ = compact_and_check(model, torch.randn(3, 5), {"net.0": [0], "net.2": [1]})
    assert [(r.name, r.shrunk) for r in report.groups] == [("net.0", False), ("net.2", False)]
    assert "registered under several names ['net.2', 'alias']" in report.groups[0].note


def test_unknown_parametrization_raises_and_leaves_model_as_it_was():
    model = mlp()
    x = torch.randn(3, 5)
    groups = lbv.find_neurons(model, x)  # found first: discovery itself skips foreign parametrizations
    torch.nn.utils.parametrizations.weight_norm(model[2])
    assert len(lbv.find_neurons(model, x)) == 0
    with torch.no_grad():  # Slot.scale_ writes only plain and low-rank weights
        model[2].parametrizations.weight.original1[:, 1] = 0.0
    state = copy.deepcopy(model.state_dict())
    ids = [id(p) for p in model.parameters()]
    with pytest.raises(ValueError, match=r"Cannot compact '2': its `weight` is parametrized by \['_WeightNorm'\]"):
        compact(model, groups)
    assert [id(p) for p in model.parameters()] == ids
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())
    assert groups["0"].num_neurons == 12


def test_groups_of_another_model_or_stale_groups():
    model, other = mlp(), mlp()
    groups = lbv.find_neurons(other, torch.randn(2, 5))
    with pytest.raises(ValueError, match="not the one in `model`"):
        compact(model, groups)
    x = torch.randn(2, 5)
    first, second = lbv.find_neurons(model, x), lbv.find_neurons(model, x)
    kill(first, {"0": [3]})
    report = compact(model, first)
    with pytest.raises(ValueError, match="the groups are stale"):
        compact(model, second)
    assert_groups_equal(report.remap(second), report.neuron_groups)
    report.update_groups_(second)  # in place, as before
    assert_groups_equal(second, report.neuron_groups)
    compact(model, second)  # valid again


def test_ddp_wrapped_model_refused():
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    try:
        model = mlp()
        ddp = nn.parallel.DistributedDataParallel(model)
        with pytest.raises(TypeError, match=r"wrapped in DistributedDataParallel.*\(`ddp.module`\) before wrapping"):
            compact(ddp, example_input=torch.randn(2, 5))
        assert model[0].out_features == 12
    finally:
        dist.destroy_process_group()
