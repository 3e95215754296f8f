"""The training step: prox_ at the first update, PathProx's projection then the shrink afterwards."""

import copy

import pytest
import torch
from helpers import neurons_killed_after_rescales
from models import mlp_and_groups
from sklearn.datasets import load_digits
from torch import nn

import lightning_bv as lbv


def test_per_neuron_thresholds_kill_exactly_the_neurons_at_or_below_them():
    net, groups = mlp_and_groups([4, 10, 2])
    scores = lbv.neuron_scores(groups)["0"].detach()
    tau = scores.clone()
    tau[::2] = scores[::2] * 0.5  # even neurons survive, odd ones sit exactly on their threshold
    lbv.prox_(groups, {"0": tau})
    after = lbv.neuron_scores(groups)["0"].detach()
    assert bool((after[1::2] == 0).all())
    assert bool((after[::2] > 0).all())


def test_first_update_is_prox_then_projection_which_discards_radial_growth():
    net, groups = mlp_and_groups([4, 10, 2])
    ref = copy.deepcopy(net)
    lbv.proximal_step_(groups, 0.0, first=True)
    x = torch.randn(5, 4)
    torch.testing.assert_close(net(x), ref(x), rtol=1e-5, atol=1e-6)  # the first update keeps the function
    torch.testing.assert_close(net[0].weight.norm(dim=1), torch.ones(10))
    with torch.no_grad():
        net[0].weight.mul_(3.0)  # a step that grew every w_k radially
        net[0].bias.mul_(3.0)
    v = net[2].weight.detach().clone()
    lbv.proximal_step_(groups, 0.0)
    torch.testing.assert_close(net(x), ref(x), rtol=1e-5, atol=1e-6)  # the growth is discarded, not moved to v
    assert torch.equal(net[2].weight, v)


def test_rescaling_before_prox_does_not_change_which_neurons_die():
    torch.manual_seed(0)
    net = lbv.RBVNet(3, 2, width=24, bottleneck=3, depth=3)
    x = torch.randn(4, 3)
    groups = lbv.find_neurons(net, x)
    scores = torch.cat(list(lbv.neuron_scores(groups).values())).detach().sort().values
    tau = float(scores[35] + scores[36]) / 2  # between two scores: no neuron sits on the boundary
    died = neurons_killed_after_rescales(net, x, tau, seed=1)
    assert died[0] == died[1] == died[2]
    assert 0 < sum(len(v) for v in died[0].values()) < 72


# the lifted chain's products A B make the step on W2 larger: at lr 0.2 it oscillates (20 rises of 300), at 0.05 not
@pytest.mark.parametrize(("hidden", "lr"), [((64,), 0.2), ((48, 48), 0.05)])
def test_full_batch_gradient_descent_with_the_step_never_raises_its_objective(hidden, lr):
    digits = load_digits()
    x = torch.tensor(digits.data[:400], dtype=torch.float32) / 16
    y = torch.tensor(digits.target[:400])
    torch.manual_seed(0)
    sizes = [64, *hidden, 10]
    layers: list[nn.Module] = []
    for a, b in zip(sizes[:-1], sizes[1:]):
        layers += [nn.Linear(a, b), nn.ReLU()]
    net = nn.Sequential(*layers[:-1])
    groups = lbv.find_neurons(net, x[:1])
    lbv.lift_shared_weights(net, groups, normalize=True)
    lam = 0.01
    opt = torch.optim.SGD(net.parameters(), lr=lr)

    def objective():
        with torch.no_grad():
            return float(nn.functional.cross_entropy(net(x), y) + lam * lbv.rbv_norm(groups))

    values = []
    for step in range(300):
        opt.zero_grad()
        nn.functional.cross_entropy(net(x), y).backward()
        opt.step()
        lbv.proximal_step_(groups, lbv.prox_thresholds(groups, opt, lam), first=step == 0)
        values.append(objective())
    rises = [b - a for a, b in zip(values, values[1:]) if b > a * (1 + 1e-6)]
    assert rises == []
    assert values[-1] < 0.7 * values[0]
    assert any(bool((s == 0).any()) for s in lbv.neuron_scores(groups).values())  # neurons died on the way
