"""lift_shared_weights: a plain chain's shared matrices written as A B, the groups owning the factors."""

import copy

import pytest
import torch
from helpers import neurons_killed_after_rescales
from torch import nn
from torch.nn.utils import parametrize

import lightning_bv as lbv


def chain(seed=0, conv=False):
    torch.manual_seed(seed)
    if conv:  # plain VGG-style: conv-relu-conv-relu-pool-linear
        net = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 6, 3, padding=1), nn.ReLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, 2),
        )  # fmt: skip
        return net, torch.randn(4, 3, 5, 5)
    net = nn.Sequential(
        nn.Linear(5, 12), nn.ReLU(), nn.Linear(12, 9), nn.ReLU(), nn.Linear(9, 7), nn.ReLU(), nn.Linear(7, 2)
    )
    return net, torch.randn(6, 5)


def rel(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


@pytest.mark.parametrize("conv", [False, True])
def test_lift_keeps_the_function_and_unshares_every_weight(conv):
    net, x = chain(conv=conv)
    y = net(x)
    groups = lbv.find_neurons(net, x)
    assert lbv.neurons.shared_weights(groups) == (["2"] if conv else ["2", "4"])
    report = lbv.lift_shared_weights(net, groups)
    assert report.lifted == (["2"] if conv else ["2", "4"])
    assert report.skipped == []
    assert report.ranks == ({"2": 6} if conv else {"2": 9, "4": 7})
    assert all(lbv.is_lifted(net[int(n)]) for n in report.lifted)
    assert rel(net(x), y) <= 1e-5
    assert lbv.neurons.shared_weights(groups) == []  # the groups were updated in place
    written = [id(s.written()) for g in groups for s in g.w_slots + g.v_slots if s.regularized]
    assert len(written) == len(set(written))  # no tensor is written by two groups
    assert "lifted to a product A B: " + ", ".join(report.lifted) in str(groups)
    # discovery of the lifted model finds the same groups (no rank groups for the lifted layers)
    again = lbv.find_neurons(net, x)
    assert again.names == groups.names
    assert [[s.factor for s in g.v_slots] for g in again] == [[s.factor for s in g.v_slots] for g in groups]


@pytest.mark.parametrize("conv", [False, True])
def test_a_lifted_chain_has_the_same_function_after_compaction_and_merging(conv):
    net, x = chain(conv=conv)
    groups = lbv.find_neurons(net, x)
    lbv.lift_shared_weights(net, groups)
    lbv.prox_(groups, float(torch.cat(list(lbv.neuron_scores(groups).values())).median()))  # kills about half
    reference = copy.deepcopy(net)
    report = lbv.compact(net, groups)
    assert report.neurons_after < report.neurons_before
    assert report.merged == (["2"] if conv else ["2", "4"])  # dense is smaller than A B at these sizes
    assert not any(lbv.is_low_rank(m) for m in net.modules())
    assert rel(net(x), reference(x)) <= 1e-5
    assert lbv.neurons.shared_weights(groups) == []  # the groups passed in are left as they were: on the factors
    # merged back: the new groups read the dense weights again
    assert lbv.neurons.shared_weights(report.neuron_groups) != []
    assert str(report).endswith("lifted products A B merged back into one weight: " + ", ".join(report.merged))
    kept = copy.deepcopy(reference)
    report = lbv.compact(kept, lbv.find_neurons(kept, x), merge_lifted=False)
    assert report.merged == []
    assert lbv.is_lifted(kept[2])


def test_rescaling_before_prox_does_not_change_which_neurons_die_in_lifted_groups():
    net, x = chain()
    groups = lbv.find_neurons(net, x)
    lbv.lift_shared_weights(net, groups)
    scores = torch.cat(list(lbv.neuron_scores(groups).values())).detach().sort().values
    tau = float(scores[13] + scores[14]) / 2  # between two scores: no neuron sits on the boundary
    died = neurons_killed_after_rescales(net, x, tau, seed=3)
    assert died[0] == died[1] == died[2]
    assert 0 < sum(len(v) for v in died[0].values()) < sum(gr.num_neurons for gr in groups)


def test_weights_that_cannot_be_factorized_are_skipped_with_the_reason():
    net, x = chain()
    lbv.find_neurons(net, x)

    class Scale(nn.Module):
        def forward(self, w):
            return 2 * w

    parametrize.register_parametrization(net[4], "weight", Scale())
    # discovery itself skips the groups that read or write net.4 (it cannot rescale it): nothing is shared any more
    assert lbv.lift_shared_weights(net, lbv.find_neurons(net, x)).lifted == []
    net2, _ = chain()
    groups2 = lbv.find_neurons(net2, x)
    parametrize.register_parametrization(net2[2], "weight", Scale())  # after discovery: someone else's
    report2 = lbv.lift_shared_weights(net2, groups2)
    assert report2.lifted == ["4"]
    assert report2.skipped == [
        ("2", "its weight already has a parametrization (someone else's): it cannot be factorized as well")
    ]
    assert "not lifted 2: its weight already has a parametrization" in str(report2)
