"""prox_thresholds: lam times the step each optimizer really took on a neuron's output weights, against hand sums."""

import pytest
import torch
from models import mlp_and_groups
from torch import nn

import lightning_bv as lbv


def one_step(net, opt, steps=1):
    for _ in range(steps):
        opt.zero_grad()
        x = torch.randn(16, 3)
        net(x).pow(2).mean().backward()
        opt.step()


@pytest.mark.parametrize(
    ("kwargs", "factor"),
    [
        ({}, 1.0),
        ({"momentum": 0.9}, 10.0),
        ({"momentum": 0.9, "dampening": 0.5}, 5.0),
        ({"momentum": 0.9, "nesterov": True}, 1.0 + 0.9 / 0.1),
    ],
)
def test_sgd_is_lam_lr_times_the_heavy_ball_step(kwargs, factor):
    net, groups = mlp_and_groups([3, 5, 2])
    opt = torch.optim.SGD(net.parameters(), lr=0.1, **kwargs)
    taus = lbv.prox_thresholds(groups, opt, lam=0.01)
    assert taus["0"] == pytest.approx(0.01 * 0.1 * factor, rel=1e-12)


def test_each_group_takes_the_lr_of_the_parameter_group_holding_its_output_weights():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 5), nn.ReLU(), nn.Linear(5, 4), nn.ReLU(), nn.Linear(4, 1))
    groups = lbv.find_neurons(net, torch.randn(1, 3))
    opt = torch.optim.SGD(
        [{"params": net[2].parameters(), "lr": 0.5}, {"params": [*net[0].parameters(), *net[4].parameters()]}], lr=0.01
    )
    taus = lbv.prox_thresholds(groups, opt, lam=2.0)
    assert taus == pytest.approx({"0": 2.0 * 0.5, "2": 2.0 * 0.01})
    # a scheduler moved the lr on since the step: the lr the step used wins
    assert lbv.prox_thresholds(groups, opt, lam=2.0, lrs=[0.25, 0.01])["0"] == pytest.approx(0.5)
    frozen = torch.optim.SGD(net[0].parameters(), lr=0.1)  # nobody steps the output weights: no shrink
    assert lbv.prox_thresholds(groups, frozen, lam=2.0) == {"0": 0.0, "2": 0.0}


def adam_hand(opt, weight, lam, lr, amsgrad=False):
    state = opt.state[weight]
    beta2 = opt.param_groups[0]["betas"][1]
    eps = opt.param_groups[0]["eps"]
    sq = state["max_exp_avg_sq"] if amsgrad else state["exp_avg_sq"]
    d = ((sq / (1 - beta2 ** float(state["step"]))).sqrt() + eps) / lr
    return lam / d.mean(0)  # column k of the consumer holds v_k


@pytest.mark.parametrize("cls", [torch.optim.Adam, torch.optim.AdamW])
@pytest.mark.parametrize("amsgrad", [False, True])
def test_adam_is_prox_gen_per_neuron(cls, amsgrad):
    net, groups = mlp_and_groups([3, 5, 2])
    opt = cls(net.parameters(), lr=1e-3, amsgrad=amsgrad, weight_decay=0.0)
    before = lbv.prox_thresholds(groups, opt, lam=0.1)  # no state yet: lam * lr
    assert before["0"] == pytest.approx(0.1 * 1e-3)
    one_step(net, opt, steps=3)
    taus = lbv.prox_thresholds(groups, opt, lam=0.1)
    assert taus["0"].shape == (5,)
    torch.testing.assert_close(taus["0"], adam_hand(opt, net[2].weight, 0.1, 1e-3, amsgrad), rtol=1e-5, atol=0)
    assert bool((taus["0"] > 0.1 * 1e-3).all())  # Adam's small second moments: a far larger threshold than lam * lr


def test_rmsprop_and_adagrad():
    net, groups = mlp_and_groups([3, 5, 2])
    opt = torch.optim.RMSprop(net.parameters(), lr=1e-2, momentum=0.5, eps=1e-8)
    one_step(net, opt, steps=2)
    sq = opt.state[net[2].weight]["square_avg"]
    expected = 0.3 / ((sq.sqrt() + 1e-8) * 0.5 / 1e-2).mean(0)
    torch.testing.assert_close(lbv.prox_thresholds(groups, opt, lam=0.3)["0"], expected, rtol=1e-5, atol=0)

    net, groups = mlp_and_groups([3, 5, 2])
    opt = torch.optim.Adagrad(net.parameters(), lr=0.1, lr_decay=0.01, eps=1e-10)
    one_step(net, opt, steps=3)
    total = opt.state[net[2].weight]["sum"]
    clr = 0.1 / (1 + 2 * 0.01)
    expected = 0.3 / ((total.sqrt() + 1e-10) / clr).mean(0)
    torch.testing.assert_close(lbv.prox_thresholds(groups, opt, lam=0.3)["0"], expected, rtol=1e-5, atol=0)


def test_lifted_factor_and_conv_consumer_read_the_state_of_the_tensor_they_write():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(2, 4, 3), nn.ReLU(), nn.Conv2d(4, 3, 3), nn.ReLU(), nn.Flatten(), nn.Linear(12, 1))
    x = torch.randn(2, 2, 6, 6)
    groups = lbv.find_neurons(net, x)
    assert lbv.lift_shared_weights(net, groups).lifted == ["2"]
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    for _ in range(2):
        opt.zero_grad()
        net(x).pow(2).mean().backward()
        opt.step()
    taus = lbv.prox_thresholds(groups, opt, lam=1.0)
    _, v = lbv.low_rank_factors(net[2])  # V: [r, 4 * 3 * 3], channel k owns columns 9k .. 9k+8
    state = opt.state[v]
    d = ((state["exp_avg_sq"] / (1 - 0.999 ** float(state["step"]))).sqrt() + 1e-8) / 1e-3
    expected = 1.0 / d.reshape(d.shape[0], 4, 9).mean((0, 2))
    torch.testing.assert_close(taus["0"], expected, rtol=1e-5, atol=0)
    # the flatten consumer: neuron c of group '2' owns columns 4c .. 4c+3 of the Linear
    w = net[5].weight
    state = opt.state[w]
    d = ((state["exp_avg_sq"] / (1 - 0.999 ** float(state["step"]))).sqrt() + 1e-8) / 1e-3
    torch.testing.assert_close(taus["2"], 1.0 / d.reshape(1, 3, 4).mean((0, 2)), rtol=1e-5, atol=0)


def test_unknown_optimizers_get_lam_lr():
    net, groups = mlp_and_groups([3, 5, 2])
    opt = torch.optim.NAdam(net.parameters(), lr=0.02)
    one_step(net, opt)
    assert lbv.prox_thresholds(groups, opt, lam=0.5)["0"] == pytest.approx(0.01)
