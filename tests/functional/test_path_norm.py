import copy
import importlib
import itertools
import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torch.nn.utils import parametrize

from lightning_bv import find_neurons
from lightning_bv.functional.path_norm import path_norm

path_norm_module = importlib.import_module("lightning_bv.functional.path_norm")  # the package's name is the function

# ---------------------------------------------------------------- references


def enumerate_paths(layers, p):
    """Sum over every path of prod |w|^p, by explicit enumeration.

    ``layers`` is a list of dense ``(M, b)`` (``M``: out x in, ``b``: out or None) of a feed-forward chain; a path
    starts at an input coordinate or at a bias of some layer and ends at an output coordinate.
    """
    dims = [layers[0][0].shape[1]] + [m.shape[0] for m, _ in layers]
    total = 0.0
    for start in range(len(layers) + 1):
        if start > 0 and layers[start - 1][1] is None:
            continue
        for idx in itertools.product(*(range(d) for d in dims[start:])):
            w = 1.0 if start == 0 else abs(float(layers[start - 1][1][idx[0]])) ** p
            for j, k in enumerate(range(start, len(layers))):
                w *= abs(float(layers[k][0][idx[j + 1], idx[j]])) ** p
            total += w
    return total ** (1 / p)


def chain_norm(layers, p):
    """The same sum, layer by layer on an all-ones vector (a reference for larger dense chains)."""
    v = torch.ones(layers[0][0].shape[1], dtype=torch.float64)
    for m, b in layers:
        v = m.abs().pow(p) @ v + (0 if b is None else b.abs().pow(p))
    return float(v.sum()) ** (1 / p)


def dense(fn, in_shape):
    """Matrix of a map on tensors of shape ``in_shape``: column j is ``fn(e_j)`` flattened."""
    n = math.prod(in_shape)
    cols = [fn(torch.eye(n, dtype=torch.float64)[j].reshape(1, *in_shape)).reshape(-1) for j in range(n)]
    return torch.stack(cols, dim=1)


def conv_layer(conv, in_shape):
    """Dense ``(M, b)`` of a conv layer on inputs of shape ``in_shape`` (bias repeated over positions)."""
    w = conv.weight.detach().double()
    kw = {"stride": conv.stride, "padding": conv.padding, "dilation": conv.dilation, "groups": conv.groups}
    fn = getattr(F, f"conv{w.dim() - 2}d")
    m = dense(lambda x: fn(x, w, None, **kw), in_shape)
    if conv.bias is None:
        return m, None
    out = fn(torch.zeros(1, *in_shape, dtype=torch.float64), w, conv.bias.detach().double(), **kw)
    return m, out.reshape(-1)


def linear_layer(lin):
    return lin.weight.detach().double(), None if lin.bias is None else lin.bias.detach().double()


def randomize_bn(bn):
    with torch.no_grad():
        bn.weight.uniform_(-2, 2)
        bn.bias.uniform_(-1, 1)
        bn.running_mean.uniform_(-1, 1)
        bn.running_var.uniform_(0.2, 3)


def fold(conv, bn):
    """Conv followed by eval-mode BatchNorm, as one conv (by hand)."""
    scale = bn.weight.detach().double() / torch.sqrt(bn.running_var.double() + bn.eps)
    shift = bn.bias.detach().double() - bn.running_mean.double() * scale
    out = nn.Conv2d(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding).double()
    with torch.no_grad():
        out.weight.copy_(conv.weight.double() * scale.reshape(-1, 1, 1, 1))
        out.bias.copy_(shift if conv.bias is None else conv.bias.double() * scale + shift)
    return out


# ---------------------------------------------------------------- plain networks against enumeration


@pytest.mark.parametrize("p", [1, 2, 3])
@pytest.mark.parametrize("bias", [True, False])
def test_mlp_equals_path_enumeration(p, bias):
    torch.manual_seed(0)
    lins = [nn.Linear(3, 4, bias=bias), nn.Linear(4, 3, bias=bias), nn.Linear(3, 2, bias=bias)]
    net = nn.Sequential(lins[0], nn.ReLU(), lins[1], nn.ReLU(), lins[2])
    expected = enumerate_paths([linear_layer(lin) for lin in lins], p)
    assert path_norm(net, torch.randn(7, 3), p=p).item() == pytest.approx(expected, rel=1e-12)


@settings(max_examples=25, deadline=None)
@given(
    widths=st.lists(st.integers(1, 3), min_size=2, max_size=4),
    p=st.sampled_from([1, 1.5, 2]),
    bias=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_random_mlp_equals_path_enumeration(widths, p, bias, seed):
    torch.manual_seed(seed)
    lins = [nn.Linear(a, b, bias=bias) for a, b in itertools.pairwise(widths)]
    net = nn.Sequential(*itertools.chain.from_iterable((lin, nn.ReLU()) for lin in lins))
    expected = enumerate_paths([linear_layer(lin) for lin in lins], p)
    assert path_norm(net, torch.randn(2, widths[0]), p=p).item() == pytest.approx(expected, rel=1e-10)


def test_one_hidden_layer_l2_is_sum_of_neuron_norm_products():
    torch.manual_seed(1)
    net = nn.Sequential(nn.Linear(5, 7, bias=False), nn.ReLU(), nn.Linear(7, 3, bias=False))
    w, v = net[0].weight.detach().double(), net[2].weight.detach().double()
    expected = (w.norm(dim=1) ** 2 * v.norm(dim=0) ** 2).sum()
    assert path_norm(net, torch.randn(4, 5), p=2).item() ** 2 == pytest.approx(expected.item(), rel=1e-12)


@pytest.mark.parametrize("p", [1, 2])
def test_conv_net_equals_path_enumeration(p):
    torch.manual_seed(2)
    c1, c2, lin = nn.Conv2d(1, 2, 2, padding=1), nn.Conv2d(2, 2, 2, stride=2), nn.Linear(8, 2)
    net = nn.Sequential(c1, nn.ReLU(), c2, nn.ReLU(), nn.Flatten(), lin)
    layers = [conv_layer(c1, (1, 3, 3)), conv_layer(c2, (2, 4, 4)), linear_layer(lin)]
    assert path_norm(net, torch.randn(2, 1, 3, 3), p=p).item() == pytest.approx(enumerate_paths(layers, p), rel=1e-12)


def test_conv1d_with_dilation_and_groups():
    torch.manual_seed(3)
    c1, c2 = nn.Conv1d(2, 4, 3, dilation=2, groups=2, padding=2), nn.Conv1d(4, 1, 2, bias=False)
    net = nn.Sequential(c1, nn.ReLU(), c2)
    layers = [conv_layer(c1, (2, 5)), conv_layer(c2, (4, 5))]
    assert path_norm(net, torch.randn(1, 2, 5), p=2).item() == pytest.approx(enumerate_paths(layers, 2), rel=1e-12)


# ---------------------------------------------------------------- pooling


@pytest.mark.parametrize(
    "pool",
    [
        nn.MaxPool2d(2),
        nn.MaxPool2d(3, stride=2, padding=1),
        nn.MaxPool2d(2, stride=2, ceil_mode=True),
        nn.MaxPool2d(3, stride=2, padding=1, dilation=2, ceil_mode=True),
        nn.AdaptiveMaxPool2d((2, 3)),
    ],
)
@pytest.mark.parametrize("p", [1, 2])
def test_max_pool_is_a_sum_over_the_window(pool, p):
    torch.manual_seed(4)
    conv = nn.Conv2d(1, 2, 2)
    out_shape = pool(torch.zeros(1, 2, 6, 5)).shape
    lin = nn.Linear(math.prod(out_shape), 2)
    net = nn.Sequential(conv, nn.ReLU(), pool, nn.Flatten(), lin)
    # max over a window of one 1 among 0s is 1 exactly for the windows holding that entry
    membership = dense(pool, (2, 6, 5))
    assert set(membership.unique().tolist()) <= {0.0, 1.0}
    expected = chain_norm([conv_layer(conv, (1, 7, 6)), (membership, None), linear_layer(lin)], p)
    assert path_norm(net, torch.randn(3, 1, 7, 6), p=p).item() == pytest.approx(expected, rel=1e-12)


def test_max_pool_1d():
    torch.manual_seed(5)
    pool, lin = nn.MaxPool1d(3, stride=2, padding=1, ceil_mode=True), nn.Linear(8, 1)
    net = nn.Sequential(pool, nn.Flatten(), lin)
    expected = chain_norm([(dense(pool, (2, 7)), None), linear_layer(lin)], 2)
    assert path_norm(net, torch.randn(1, 2, 7), p=2).item() == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize(
    "pool",
    [
        nn.AvgPool2d(2),
        nn.AvgPool2d(3, stride=2, padding=1),
        nn.AvgPool2d(3, stride=2, padding=1, ceil_mode=True, count_include_pad=False),
        nn.AvgPool2d(2, divisor_override=3),
        nn.AdaptiveAvgPool2d((2, 4)),
        nn.AdaptiveAvgPool2d(1),
    ],
)
@pytest.mark.parametrize("p", [1, 2, 3])
def test_average_pools_weigh_each_entry_by_one_over_window_to_the_p(pool, p):
    torch.manual_seed(6)
    out_shape = pool(torch.zeros(1, 2, 6, 5)).shape
    lin = nn.Linear(math.prod(out_shape), 2)
    net = nn.Sequential(pool, nn.Flatten(), lin)
    expected = chain_norm([(dense(pool, (2, 6, 5)), None), linear_layer(lin)], p)
    assert path_norm(net, torch.randn(3, 2, 6, 5), p=p).item() == pytest.approx(expected, rel=1e-12)


def test_avg_pool_1d_and_mean_over_dims():
    torch.manual_seed(7)
    pool, lin = nn.AvgPool1d(3, stride=2, padding=1), nn.Linear(6, 1)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.pool, self.lin = pool, lin

        def forward(self, x):
            return self.lin(self.pool(x).mean(dim=1))

    expected = chain_norm([(dense(lambda x: pool(x).mean(dim=1), (5, 11)), None), linear_layer(lin)], 2)
    assert path_norm(Net(), torch.randn(2, 5, 11), p=2).item() == pytest.approx(expected, rel=1e-12)


# ---------------------------------------------------------------- BatchNorm and skip connections


class Block(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)
        self.conv2, self.bn2 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out += x
        return self.relu(out)


class ResNetLike(nn.Module):
    def __init__(self, c=2, classes=3):
        super().__init__()
        self.stem, self.bn = nn.Conv2d(1, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)
        self.block = Block(c)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(c, classes)

    def forward(self, x):
        x = self.block(F.relu(self.bn(self.stem(x))))
        return self.fc(torch.flatten(self.pool(x), 1))


class FoldedResNetLike(nn.Module):
    def __init__(self, net):
        super().__init__()
        self.stem = fold(net.stem, net.bn)
        self.conv1, self.conv2 = fold(net.block.conv1, net.block.bn1), fold(net.block.conv2, net.block.bn2)
        self.fc = net.fc

    def forward(self, x):
        x = F.relu(self.stem(x))
        x = F.relu(self.conv2(F.relu(self.conv1(x))) + x)
        return self.fc(x.mean(dim=(2, 3)))


@pytest.fixture
def resnet():
    torch.manual_seed(8)
    net = ResNetLike()
    for bn in (net.bn, net.block.bn1, net.block.bn2):
        randomize_bn(bn)
    return net.train()


@pytest.mark.parametrize("p", [1, 2])
def test_resnet_block_equals_batchnorm_folded_by_hand(resnet, p):
    folded = FoldedResNetLike(resnet)
    x = torch.randn(4, 1, 4, 4)
    value = path_norm(resnet, x, p=p).item()
    assert value == pytest.approx(path_norm(folded, x, p=p).item(), rel=1e-10)
    # and against the dense DAG: stem, then conv1 -> conv2 plus the identity, then the mean, then fc
    stem, c1, c2 = (
        conv_layer(folded.stem, (1, 4, 4)),
        conv_layer(folded.conv1, (2, 4, 4)),
        conv_layer(folded.conv2, (2, 4, 4)),
    )
    v = stem[0].abs().pow(p) @ torch.ones(16, dtype=torch.float64) + stem[1].abs().pow(p)
    h = c1[0].abs().pow(p) @ v + c1[1].abs().pow(p)
    v = c2[0].abs().pow(p) @ h + c2[1].abs().pow(p) + v
    pooled = dense(lambda t: t.mean(dim=(2, 3)), (2, 4, 4)).abs().pow(p) @ v
    fc_w, fc_b = linear_layer(folded.fc)
    expected = float((fc_w.abs().pow(p) @ pooled + fc_b.abs().pow(p)).sum()) ** (1 / p)
    assert value == pytest.approx(expected, rel=1e-10)


def test_batchnorm1d_is_an_affine_layer_and_affine_false_works():
    torch.manual_seed(9)
    lin1, bn, lin2 = nn.Linear(3, 4), nn.BatchNorm1d(4, affine=False), nn.Linear(4, 2)
    with torch.no_grad():
        bn.running_mean.uniform_(-1, 1)
        bn.running_var.uniform_(0.5, 2)
    net = nn.Sequential(lin1, bn, nn.ReLU(), lin2).train()
    # BatchNorm is its own affine layer x -> scale * x + shift (the bias of lin1 and the shift are two biases)
    scale = 1 / torch.sqrt(bn.running_var.double() + bn.eps)
    shift = -bn.running_mean.double() * scale
    expected = enumerate_paths([linear_layer(lin1), (torch.diag(scale), shift), linear_layer(lin2)], 2)
    assert path_norm(net, torch.randn(1, 3), p=2).item() == pytest.approx(expected, rel=1e-10)


def test_concatenated_branches_add_their_p_th_powers():
    torch.manual_seed(10)

    class TwoBranches(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(3, 2), nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 1))

        def forward(self, x):
            return torch.cat([self.a(x), self.b(x)], dim=1)

    net, x, p = TwoBranches(), torch.randn(2, 3), 2
    expected = path_norm(net.a, x, p=p) ** p + path_norm(net.b, x, p=p) ** p
    assert path_norm(net, x, p=p).item() ** p == pytest.approx(expected.item(), rel=1e-12)


def test_constants_scale_paths_by_their_abs_to_the_p():
    torch.manual_seed(11)

    class Arith(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(3, 2), nn.Linear(3, 2)

        def forward(self, x):
            h = self.a(x) - 3 * self.b(x) / 2
            return F.leaky_relu(h.view(-1, 2), 0.1) * -0.5

    net, x, p = Arith(), torch.randn(2, 3), 3
    expected = 0.5**p * (path_norm(net.a, x, p=p) ** p + 1.5**p * path_norm(net.b, x, p=p) ** p)
    assert path_norm(net, x, p=p).item() ** p == pytest.approx(expected.item(), rel=1e-12)


def test_constant_added_to_an_activation_counts_like_a_bias():
    torch.manual_seed(15)

    class FromTwo(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(3, 2)

        def forward(self, x):
            return 2.0 - self.a(x)

    net, x, p = FromTwo(), torch.randn(2, 3), 2
    expected = path_norm(net.a, x, p=p) ** p + 2 * 2.0**p
    assert path_norm(net, x, p=p).item() ** p == pytest.approx(expected.item(), rel=1e-12)


def test_sync_batchnorm_in_training_mode_without_a_process_group():
    torch.manual_seed(16)
    net = nn.Sequential(nn.Conv2d(1, 2, 2, bias=False), nn.BatchNorm2d(2), nn.ReLU(), nn.Flatten(), nn.Linear(8, 1))
    randomize_bn(net[1])
    sync = copy.deepcopy(net)
    sync[1] = nn.SyncBatchNorm.convert_sync_batchnorm(sync[1])
    x = torch.randn(2, 1, 3, 3)
    assert path_norm(sync.train(), x, p=2).item() == pytest.approx(path_norm(net.eval(), x, p=2).item(), rel=1e-12)
    assert sync[1].training


def test_tuple_input_and_tuple_output():
    torch.manual_seed(12)

    class TwoInOut(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(3, 2), nn.Linear(4, 2)

        def forward(self, x, y):
            return self.a(x), self.a(x) + self.b(y)

    net = TwoInOut()
    pa, pb = (path_norm(m, torch.randn(1, d), p=1).item() for m, d in ((net.a, 3), (net.b, 4)))
    assert path_norm(net, (torch.randn(2, 3), torch.randn(2, 4)), p=1).item() == pytest.approx(2 * pa + pb)


def test_non_tensor_inputs_pass_through_and_autocast_is_disabled():
    class Scaled(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(3, 2)

        def forward(self, x, k):
            return self.a(x) * k

    torch.manual_seed(17)
    net, x = Scaled(), torch.randn(2, 3)
    expected = 4 * path_norm(net.a, x, p=2).item() ** 2
    with torch.autocast("cpu", dtype=torch.bfloat16):
        value = path_norm(net, (x, -2), p=2)
    assert value.dtype == torch.float64
    assert value.item() ** 2 == pytest.approx(expected, rel=1e-12)


def test_parametrized_weights_count_with_their_effective_value():
    class Triple(nn.Module):
        def forward(self, w):
            return 3 * w

    torch.manual_seed(13)
    lin, plain = nn.Linear(3, 2).double(), nn.Linear(3, 2).double()
    with torch.no_grad():
        plain.weight.copy_(3 * lin.weight)
        plain.bias.copy_(lin.bias)
    parametrize.register_parametrization(lin, "weight", Triple())
    x = torch.randn(1, 3)
    assert path_norm(lin, x, p=2).item() == pytest.approx(path_norm(plain, x, p=2).item(), rel=1e-12)


# ---------------------------------------------------------------- side effects and gradients


def test_model_unchanged_and_train_value_equals_eval_value(resnet):
    net = nn.Sequential(resnet, nn.Dropout(0.5), nn.Linear(3, 2))
    before = copy.deepcopy(net.state_dict())
    flags = [m.training for m in net.modules()]
    x = torch.randn(4, 1, 4, 4)
    values = [path_norm(net, x, p=2).item() for _ in range(2)]
    after = net.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)  # running stats, num_batches_tracked included
    assert [m.training for m in net.modules()] == flags
    assert all(m.training for m in net.modules())
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in net.modules())
    assert all(q.grad is None for q in net.parameters())
    assert all(q.dtype == torch.float32 for q in net.parameters())
    assert values[0] == values[1]  # dropout is the identity
    assert path_norm(net.eval(), x, p=2).item() == pytest.approx(values[0], rel=1e-12)


@pytest.mark.parametrize("p", [1, 2, 3])
def test_gradient_matches_finite_differences(p):
    torch.manual_seed(14)
    bn = nn.BatchNorm1d(3)
    randomize_bn(bn)
    net = nn.Sequential(nn.Linear(2, 3), bn, nn.ReLU(), nn.Linear(3, 2)).double().train()
    x = torch.randn(5, 2, dtype=torch.float64)
    path_norm(net, x, p=p).backward()
    eps = 1e-6
    for name, param in net.named_parameters():
        assert param.grad is not None, name
        for i in range(param.numel()):
            with torch.no_grad():
                flat = param.view(-1)
                flat[i] += eps
                up = path_norm(net, x, p=p).item()
                flat[i] -= 2 * eps
                down = path_norm(net, x, p=p).item()
                flat[i] += eps
            assert param.grad.view(-1)[i].item() == pytest.approx((up - down) / (2 * eps), rel=1e-5, abs=1e-8)


def test_usable_as_a_penalty_on_a_float32_model(resnet):
    loss = path_norm(resnet, torch.randn(2, 1, 4, 4), p=2)
    loss.backward()
    assert loss.dtype == torch.float64
    for name, param in resnet.named_parameters():
        assert param.grad is not None, name
        assert param.grad.dtype == torch.float32, name
        assert param.grad.abs().sum() > 0, name


@pytest.mark.parametrize("p", [1, 2, 3])
def test_weights_read_in_blocks_of_rows_give_the_same_norm_and_gradient(monkeypatch, p):
    torch.manual_seed(21)
    conv, l1, l2 = nn.Conv2d(2, 5, 3, padding=1), nn.Linear(5 * 4 * 4, 7), nn.Linear(7, 3)
    net = nn.Sequential(conv, nn.ReLU(), nn.Flatten(), l1, nn.ReLU(), l2)
    x = torch.randn(2, 2, 4, 4)
    whole = path_norm(net, x, p=p)  # every weight fits in one block
    grads = torch.autograd.grad(whole, list(net.parameters()))
    monkeypatch.setattr(path_norm_module, "_BLOCK", 20)  # blocks of 1 conv row, 1 row of l1, 2 + 1 rows of l2
    blocked = path_norm(net, x, p=p)
    assert blocked.item() == pytest.approx(whole.item(), rel=1e-12)
    layers = [conv_layer(conv, (2, 4, 4)), linear_layer(l1), linear_layer(l2)]
    assert blocked.item() == pytest.approx(chain_norm(layers, p), rel=1e-12)
    for g, h in zip(grads, torch.autograd.grad(blocked, list(net.parameters())), strict=True):
        torch.testing.assert_close(h, g, rtol=1e-6, atol=0)
    with torch.no_grad():  # the blocks share one buffer
        assert path_norm(net, x, p=p).item() == pytest.approx(whole.item(), rel=1e-12)
    l2.requires_grad_(False)  # a frozen weight's blocks are still kept for the gradient of the layers before it
    frozen = torch.autograd.grad(path_norm(net, x, p=p), [conv.weight, l1.weight])
    torch.testing.assert_close(frozen, (grads[0], grads[2]), rtol=1e-6, atol=0)


def test_blocks_of_an_unbatched_conv_are_joined_on_its_channels(monkeypatch):
    class OneSample(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv1d(2, 4, 3)

        def forward(self, x):
            return self.conv(x[0])  # [channels, length]: no batch dimension

    torch.manual_seed(22)
    net, x = OneSample(), torch.randn(1, 2, 6)
    monkeypatch.setattr(path_norm_module, "_BLOCK", 6)  # one output channel a block
    assert path_norm(net, x, p=2).item() == pytest.approx(path_norm(net.conv, x, p=2).item(), rel=1e-12)


def test_a_parameter_changed_in_place_by_forward_is_read_changed_and_left_unchanged():
    class Clipped(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(3, 2)

        def forward(self, x):
            with torch.no_grad():
                self.lin.weight.clamp_(-0.1, 0.1)  # weight clipping inside forward
            return self.lin(x)

    torch.manual_seed(23)
    net, x = Clipped(), torch.randn(2, 3)
    before = net.lin.weight.detach().clone()
    value = path_norm(net, x, p=1).item()
    assert torch.equal(net.lin.weight, before)
    clipped = copy.deepcopy(net.lin).double()  # clipped as the float64 weights are
    with torch.no_grad():
        clipped.weight.clamp_(-0.1, 0.1)
    assert value == pytest.approx(path_norm(clipped, x, p=1).item(), rel=1e-12)


# ---------------------------------------------------------------- refusals


class Wrap(nn.Module):
    def __init__(self, inner):
        super().__init__()
        self.inner, self.head = inner, nn.Linear(4, 1)

    def forward(self, x):
        return self.head(self.inner(x))


class FunctionalGelu(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, x):
        return F.gelu(self.lin(x))


class Attention(nn.Module):
    def __init__(self):
        super().__init__()
        self.attn = nn.MultiheadAttention(4, 2, batch_first=True)

    def forward(self, x):
        return self.attn(x, x, x)[0]


class Square(nn.Module):
    def forward(self, x):
        return x * x


@pytest.mark.parametrize(
    ("model", "x", "match"),
    [
        (
            nn.Sequential(nn.Linear(4, 4), nn.GELU(), nn.Linear(4, 1)),
            torch.randn(2, 4),
            r"`gelu` in module '1' \(GELU\)",
        ),
        (Wrap(nn.LayerNorm(4)), torch.randn(2, 4), r"`layer_norm` in module 'inner' \(LayerNorm\)"),
        (Wrap(nn.Sequential(nn.BatchNorm1d(4), nn.Tanh())), torch.randn(2, 4), r"`tanh` in module 'inner.1' \(Tanh\)"),
        (Wrap(FunctionalGelu()), torch.randn(2, 4), r"`gelu` in module 'inner' \(FunctionalGelu\)"),
        (Wrap(Attention()), torch.randn(2, 3, 4), r"multi_head_attention_forward` in module 'inner.attn'"),
        (Wrap(nn.Softmax(dim=1)), torch.randn(2, 4), r"`softmax` in module 'inner' \(Softmax\)"),
        (Wrap(nn.Sigmoid()), torch.randn(2, 4), r"`sigmoid` in module 'inner'"),
        (Wrap(Square()), torch.randn(2, 4), r"`mul` of two activations .* in module 'inner' \(Square\)"),
        (Wrap(nn.BatchNorm1d(4, track_running_stats=False)), torch.randn(2, 4), r"without running statistics"),
        (Wrap(nn.MaxPool1d(1, return_indices=True)), torch.randn(2, 1, 4), r"`max_pool1d_with_indices`"),
    ],
)
def test_unsupported_ops_are_refused_naming_op_and_module(model, x, match):
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(NotImplementedError, match=match):
        path_norm(model, x)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())
    assert all(m.training for m in model.modules())  # restored even though the forward raised


class Branchy(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 1)

    def forward(self, x):
        return self.lin(x) if x.sum().item() > 0 else -self.lin(x)


def test_reading_activation_values_is_refused():
    with pytest.raises(NotImplementedError, match=r"`item` in module '<root>' \(Branchy\)"):
        path_norm(Branchy(), torch.randn(2, 4))


@pytest.mark.parametrize("p", [0.5, 0, -1, float("inf"), float("nan"), True, "2"])
def test_bad_p_is_rejected(p):
    with pytest.raises(ValueError, match=r"`p` must be a finite number >= 1, got"):
        path_norm(nn.Linear(2, 1), torch.randn(1, 2), p=p)


def test_token_ids_start_paths_at_every_token_of_the_vocabulary():
    # an embedding is a Linear on the one-hot token: each position's output reads every row of E
    emb = nn.Embedding(5, 3)
    ids = torch.tensor([[0, 1, 1, 4], [2, 2, 3, 0]])
    assert torch.allclose(path_norm(emb, ids), 4 * emb.weight.detach().abs().sum().double())


class TokenClassifier(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.emb = nn.Embedding(7, 4)
        self.fc1, self.fc2 = nn.Linear(4, 6), nn.Linear(6, 2)

    def forward(self, input_ids, scale=None):
        h = self.emb(input_ids.view(input_ids.shape[0], -1)).mean(1)
        return self.fc2(torch.relu(self.fc1(h)))


def test_dict_input_with_token_ids_equals_the_one_hot_linear_model():
    model = TokenClassifier()
    ids = torch.randint(0, 7, (3, 5))
    # the same network on one-hot tokens: mean over positions of E[token] = (one-hot @ E) / 5 summed over positions
    onehot = nn.Sequential(nn.Linear(7 * 5, 4, bias=False), model.fc1, nn.ReLU(), model.fc2)
    with torch.no_grad():
        onehot[0].weight.copy_(model.emb.weight.T.repeat(1, 5) / 5)
    expected = path_norm(onehot, torch.randn(1, 35), p=2)
    assert torch.allclose(path_norm(model, {"input_ids": ids}, p=2), expected)
    groups = find_neurons(model, {"input_ids": ids})
    assert [g.name for g in groups] == ["fc1"]


def test_integer_input_that_is_not_embedded_is_refused():
    with pytest.raises(ValueError, match=r"integer token ids .* `linear` in module '<root>' reads the integer input"):
        path_norm(nn.Linear(3, 2), torch.tensor([[0, 1, 2]]))
