import copy

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from models import cnn_bn_avgpool, mlp
from torch import nn

from lightning_bv import (
    add_rbv_grad_,
    add_skip,
    add_weight_decay_grad_,
    balance_,
    find_neurons,
    group_norms,
    neuron_scores,
    neuron_weight_decay,
    prox_,
    rbv_norm,
)


def tv_of_derivative(f, lo, hi, n=200_001):
    """TV(f') of a 1-D function measured on the function itself: the sum of slope jumps on a fine grid."""
    x = torch.linspace(lo, hi, n, dtype=torch.float64).unsqueeze(1)
    with torch.no_grad():
        y = f(x).squeeze(1)
    slopes = torch.diff(y) / torch.diff(x.squeeze(1))
    return torch.diff(slopes).abs().sum().item()


def shallow_1d(weights, biases, outs):
    net = nn.Sequential(nn.Linear(1, len(weights)), nn.ReLU(), nn.Linear(len(weights), 1)).double()
    with torch.no_grad():
        net[0].weight.copy_(torch.tensor(weights, dtype=torch.float64).unsqueeze(1))
        net[0].bias.copy_(torch.tensor(biases, dtype=torch.float64))
        net[2].weight.copy_(torch.tensor(outs, dtype=torch.float64).unsqueeze(0))
    return net


def test_rbv_norm_equals_tv_of_derivative_in_1d():
    torch.manual_seed(0)
    k = 16
    net = nn.Sequential(nn.Linear(1, k), nn.ReLU(), nn.Linear(k, 1)).double()
    knots = -net[0].bias / net[0].weight.squeeze(1)
    lo, hi = knots.min().item() - 1, knots.max().item() + 1
    groups = find_neurons(net, torch.zeros(2, 1, dtype=torch.float64))
    tv = tv_of_derivative(net, lo, hi)
    assert rbv_norm(groups).item() == pytest.approx(tv, rel=1e-4)


def test_equal_knots_merge_before_comparing():
    # two neurons share the knot t=0.5 with opposite slope jumps: R counts both, TV(f') their merged jump
    net = shallow_1d([1.0, 2.0, -1.0, 1.0], [-0.5, -1.0, 0.2, 1.0], [1.0, -0.75, 2.0, 0.5])
    groups = find_neurons(net, torch.zeros(2, 1, dtype=torch.float64))
    tv = tv_of_derivative(net, -3, 3)
    r = rbv_norm(groups).item()
    assert r == pytest.approx(1 + 1.5 + 2 + 0.5)
    assert tv == pytest.approx(abs(1 - 1.5) + 2 + 0.5, rel=1e-4)
    merged = shallow_1d([1.0, -1.0, 1.0], [-0.5, 0.2, 1.0], [1.0 - 1.5, 2.0, 0.5])  # same function
    assert rbv_norm(find_neurons(merged, torch.zeros(1, 1, dtype=torch.float64))).item() == pytest.approx(tv, rel=1e-4)


F64 = {"seed": None, "dtype": torch.float64}  # the tests seed the generator themselves
MODELS = {
    "mlp": (lambda: mlp([3, 9, 7, 2], **F64), (6, 3)),
    "mlp_bn_leaky": (lambda: mlp([3, 9, 7, 2], bn=True, leaky=True, **F64), (6, 3)),
    "cnn": (cnn_bn_avgpool, (3, 2, 8, 8)),
}


def randomize_bn(model):
    for m in model.modules():
        if isinstance(m, nn.BatchNorm1d | nn.BatchNorm2d):
            with torch.no_grad():
                m.weight.uniform_(-2, 2)
                m.bias.normal_()
                m.running_mean.normal_()
                m.running_var.uniform_(0.5, 2)


@pytest.mark.parametrize("q", [1, 2])
@pytest.mark.parametrize("name", sorted(MODELS))
def test_balance_and_prox_zero_preserve_function(name, q):
    torch.manual_seed(1)
    make, shape = MODELS[name]
    model = make()
    randomize_bn(model)
    model.eval()
    x = torch.randn(*shape, dtype=torch.float64)
    groups = find_neurons(model, x)
    y0 = model(x)
    # in a chain the middle matrices are shared between groups, so R itself may move; the function may not
    balance_(groups, q)
    assert (model(x) - y0).abs().max().item() <= 1e-5
    prox_(groups, 0.0, q)
    assert (model(x) - y0).abs().max().item() <= 1e-5
    # the last group owns its consumer alone: its scores are invariant under its own rescaling
    last = groups[-1]
    s0 = neuron_scores(last, q)[last.name]
    balance_(last, q)
    torch.testing.assert_close(neuron_scores(last, q)[last.name], s0)


def test_balance_makes_weight_decay_equal_rbv_norm():
    torch.manual_seed(2)
    # blocks separated by a linear bottleneck: no weight matrix is shared between groups
    net = nn.Sequential(
        nn.Linear(3, 10), nn.ReLU(), nn.Linear(10, 2), nn.Linear(2, 10), nn.ReLU(), nn.Linear(10, 1)
    ).double()
    groups = find_neurons(net, torch.randn(2, 3, dtype=torch.float64))
    for q in (1, 2):
        assert neuron_weight_decay(groups, q).item() > rbv_norm(groups, q).item()
        balance_(groups, q)
        assert neuron_weight_decay(groups, q).item() == pytest.approx(rbv_norm(groups, q).item(), rel=1e-12)
        w, v = group_norms(groups[0], q)
        assert torch.allclose(w, v)


@pytest.mark.parametrize("q", [1, 2])
def test_prox_zeroes_exactly_the_small_neurons(q):
    torch.manual_seed(3)
    net = mlp([4, 30, 3], **F64)
    x = torch.randn(5, 4, dtype=torch.float64)
    groups = find_neurons(net, x)
    g = groups[0]
    scores = neuron_scores(groups, q)[g.name]  # after normalizing, ||v_k|| equals the score
    tau = scores.median().item()
    prox_(groups, tau, q)
    w, v = group_norms(g, q)
    assert torch.allclose(w, torch.ones_like(w))
    dead = v == 0
    if q == 2:
        assert torch.equal(dead, scores <= tau)
        assert torch.allclose(v[~dead], scores[~dead] - tau)
    else:  # elementwise: a neuron dies when every |entry| <= tau
        normalized = net[2].weight.detach().abs()
        assert dead.sum() >= 1
        assert (normalized[:, dead] == 0).all()


@pytest.mark.parametrize("q", [1, 2])
@pytest.mark.parametrize("name", sorted(MODELS))
def test_closed_form_gradients_match_autograd(name, q):
    torch.manual_seed(4)
    make, shape = MODELS[name]
    model = make()
    randomize_bn(model)
    x = torch.randn(*shape, dtype=torch.float64)
    groups = find_neurons(model, x)
    lam = 0.3
    (lam * rbv_norm(groups, q)).backward()
    expected = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    add_rbv_grad_(groups, lam, q)
    got = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert got.keys() == expected.keys()
    for n in expected:
        torch.testing.assert_close(got[n], expected[n], msg=n)
    model.zero_grad(set_to_none=True)
    (lam * neuron_weight_decay(groups, 2)).backward()
    expected = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    add_weight_decay_grad_(groups, lam)
    for n, p in model.named_parameters():
        if n in expected:
            torch.testing.assert_close(p.grad, expected[n], msg=n)
        else:
            assert p.grad is None, n  # biases and everything ungrouped untouched


@settings(max_examples=25, deadline=None)
@given(
    widths=st.lists(st.integers(1, 12), min_size=2, max_size=5),
    bn=st.booleans(),
    q=st.sampled_from([1, 2]),
    tau_frac=st.floats(0.0, 1.5),
    seed=st.integers(0, 2**16),
)
def test_property_random_mlps(widths, bn, q, tau_frac, seed):
    torch.manual_seed(seed)
    model = mlp([3, *widths, 2], bn=bn, **F64)
    randomize_bn(model)
    model.eval()
    x = torch.randn(4, 3, dtype=torch.float64)
    groups = find_neurons(model, x)
    assert len(groups) == len(widths)
    y0 = model(x)
    balance_(groups, q)
    assert (model(x) - y0).abs().max().item() <= 1e-5
    before = copy.deepcopy(model.state_dict())
    prox_(groups, 0.0, q)
    assert (model(x) - y0).abs().max().item() <= 1e-5
    model.load_state_dict(before)
    g = groups[-1]  # the last group's consumer is the output layer: no later group rescales it
    tau = tau_frac * neuron_scores(g, q)[g.name].max().item()
    scores = neuron_scores(g, q)[g.name]
    prox_(g, tau, q)
    _, v = group_norms(g, q)
    if q == 2:
        assert torch.equal(v == 0, scores <= tau)
    else:
        assert bool((v[scores <= tau] == 0).all())


def test_prox_zero_every_step_on_a_one_sided_low_rank_layer_trains():
    """Regression: a ReLU group writing U's rows and the rank group writing U's columns diverged under SGD."""
    from lightning_bv import RBVNet, apply_low_rank

    torch.manual_seed(1)
    net = RBVNet(8, 3, 32, 4, 2)
    apply_low_rank(net, rank=4, targets=["blocks.0.fc1"])
    x = torch.randn(64, 8)
    y = torch.randint(0, 3, (64,))
    groups = find_neurons(net, x[:2])
    assert "blocks.0.fc1:rank" in groups.names  # its input side is the data: the components keep their group
    opt = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9)
    for _ in range(300):
        loss = nn.functional.cross_entropy(net(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        prox_(groups, 0.0)  # function-preserving: must not destabilize training
    assert torch.isfinite(loss)
    assert loss.item() < 1.0


def test_prox_zero_normalizes_rank_components_and_keeps_the_function():
    from lightning_bv import RBVNet, apply_low_rank

    torch.manual_seed(0)
    net = RBVNet(4, 2, 8, 3, 2).double()
    apply_low_rank(net, rank=2, targets=["blocks.0.fc2"])
    x = torch.randn(5, 4, dtype=torch.float64)
    groups = find_neurons(net, x)
    y0 = net(x)
    prox_(groups, 0.0)
    w, _ = group_norms(groups["blocks.0.fc2:rank"])
    torch.testing.assert_close(w, torch.ones_like(w))  # one rule for every group: normalized
    assert (net(x) - y0).abs().max().item() <= 1e-12 * y0.abs().max().item()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_norms_are_summed_in_float32(dtype):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(8, 6), nn.ReLU(), nn.Linear(6, 3))
    with torch.no_grad():
        net[0].weight.mul_(1000.0)  # entries near 300: finite in fp16, their squares (~1e5) are not
    net = net.to(dtype)
    if dtype == torch.float16:  # what the old half-precision sum did
        assert torch.isinf((net[0].weight * net[0].weight).sum(1)).all()
    expected = neuron_scores(find_neurons(copy.deepcopy(net).float(), torch.randn(2, 8)))["0"]
    groups = find_neurons(net, torch.randn(2, 8, dtype=dtype))
    scores = neuron_scores(groups)["0"]
    assert scores.dtype == torch.float32
    assert torch.isfinite(scores).all()
    torch.testing.assert_close(scores, expected, rtol=1e-6, atol=0)
    # the finite-weights check reads these norms: a finite half model must not be stopped as "non-finite"
    assert prox_(groups, 1e-3, on_nonfinite="raise") == []
    assert all(torch.isfinite(p).all() for p in net.parameters())


def test_balance_zeroes_the_other_side_of_dead_neurons():
    torch.manual_seed(4)
    net = nn.Sequential(nn.Linear(3, 8), nn.ReLU(), nn.Linear(8, 2)).double()
    with torch.no_grad():
        net[2].weight[:, 0] = 0.0  # neuron 0: nobody reads it
        net[0].weight[1] = 0.0  # neuron 1: zero input weights, bias <= 0: outputs 0
        net[0].bias[1] = -0.5
        net[0].weight[2] = 0.0  # neuron 2: zero input weights, bias > 0: the constant relu(b) that v carries
        net[0].bias[2] = 0.7
    x = torch.randn(16, 3, dtype=torch.float64)
    y0 = net(x)
    groups = find_neurons(net, x[:2])
    balance_(groups)
    torch.testing.assert_close(net(x), y0, rtol=0, atol=1e-12)  # the same function
    w, v = group_norms(groups[0])
    assert w[0] == 0
    assert net[0].bias[0] == 0
    assert v[1] == 0
    assert v[2] > 0  # left alone: removing it would change the function
    live = (w > 0) & (v > 0)
    torch.testing.assert_close(w[live], v[live])
    r = rbv_norm(groups).item()
    assert neuron_weight_decay(groups).item() - 0.5 * v[2].item() ** 2 == pytest.approx(r, rel=1e-12)


def test_balance_zeroes_output_weights_only_of_neurons_that_output_zero():
    torch.manual_seed(5)
    # BatchNorm: w_k is its weight and b_k its bias; with w_k = 0 the activation is relu(b_k)
    bn_net = nn.Sequential(nn.Linear(3, 6, bias=False), nn.BatchNorm1d(6), nn.ReLU(), nn.Linear(6, 2)).double()
    # an affine skip also feeds the pre-activation: a zero row of the regularized weight does not silence it
    skip_net = nn.Sequential(nn.Linear(3, 6), nn.ReLU(), nn.Linear(6, 2)).double()
    add_skip(skip_net, ["0"])
    with torch.no_grad():
        bn_net[1].weight[0], bn_net[1].bias[0] = 0.0, -0.3  # outputs 0
        bn_net[1].weight[1], bn_net[1].bias[1] = 0.0, 0.4  # outputs the constant relu(0.4)
        skip_net[0].module.weight[0], skip_net[0].module.bias[0] = 0.0, -5.0
        skip_net[0].skip.weight[0] = torch.tensor([3.0, -2.0, 1.0])  # the skip's C x (zero at add_skip) reaches it
    x = torch.randn(16, 3, dtype=torch.float64)
    for net, zeroed, kept in ((bn_net.eval(), [0], [1]), (skip_net, [], [0])):
        y0 = net(x)
        groups = find_neurons(net, x[:2])
        balance_(groups)
        torch.testing.assert_close(net(x), y0, rtol=0, atol=1e-12)
        _, v = group_norms(groups[0])
        assert all(v[k] == 0 for k in zeroed)
        assert all(v[k] > 0 for k in kept)
