"""The group model (lightning_bv/neurons/group.py): NeuronGroup's slots and NeuronGroups, the report."""

import pytest
import torch
from torch import nn

from lightning_bv.neurons import NeuronGroup, NeuronGroups, Slot


def group(name="0", activation="relu"):
    fc1, fc2 = nn.Linear(3, 4), nn.Linear(4, 2)
    return NeuronGroup(
        name,
        [name],
        [None],
        activation,
        ["2"],
        4,
        [Slot(fc1, name, "weight", 0)],
        [Slot(fc1, name, "bias", 0, regularized=False)],
        [Slot(fc2, "2", "weight", 1)],
    )


def test_a_group_lists_its_slots_and_distinct_parameters():
    g = group()
    assert g.producer == "0"
    assert g.norm is None
    assert [(s.param, s.dim) for s in g.slots()] == [("weight", 0), ("bias", 0), ("weight", 1)]
    fc1, fc2 = g.w_slots[0].module, g.v_slots[0].module
    assert [id(p) for p in g.parameters()] == [id(fc1.weight), id(fc1.bias), id(fc2.weight)]
    assert repr(g) == "NeuronGroup('0', producers=('0',), activation='relu', consumers=('2',), num_neurons=4)"


@pytest.mark.parametrize(
    ("activation", "expected"), [("relu", [True, True, False, False]), ("leaky_relu", [False, True, False, False])]
)
def test_silent_without_input_reads_the_activation_of_the_bias(activation, expected):
    g = group(activation=activation)
    with torch.no_grad():
        g.b_slots[0].module.bias.copy_(torch.tensor([-1.0, 0.0, 0.5, 2.0]))
    assert g.silent_without_input().tolist() == expected


def test_groups_are_a_sequence_indexable_by_name():
    groups = NeuronGroups([group("0"), group("4")], skipped=[("relu (op 9 in '<root>')", "no Linear/Conv reads it")])
    assert len(groups) == 2
    assert groups.names == ["0", "4"]
    assert groups["4"] is groups[1]
    assert [g.name for g in groups[:1]] == ["0"]
    assert [g.name for g in groups] == ["0", "4"]
    with pytest.raises(KeyError, match=r"no group named 'nope'; groups: \['0', '4'\]"):
        groups["nope"]
    assert repr(groups) == "NeuronGroups(['0', '4'], skipped=1)"
    assert groups.non_homogeneous() == {}
    assert groups.found_instead() == ""


def test_the_report_is_a_table_with_lifted_layers_and_skips():
    groups = NeuronGroups([group("0")], skipped=[("relu (op 9 in '<root>')", "no Linear/Conv reads it")])
    groups.lifted = ["2"]
    assert str(groups).splitlines() == [
        "1 neuron group(s), 4 neurons",
        "  group  neurons  activation  producers  norm  consumers",
        "  0      4        relu        0          -     2",
        "shared weights lifted to a product A B: 2",
        "skipped 1:",
        "  relu (op 9 in '<root>'): no Linear/Conv reads it",
    ]
