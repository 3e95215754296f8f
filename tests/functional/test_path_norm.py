"""path_norm (lightning_bv/functional/path_norm.py) against path enumeration: networks, inputs, gradients."""

import copy
import itertools

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from path_norm_references import conv_layer, dense, enumerate_paths, fold, linear_layer, randomize_bn
from torch import nn

from lightning_bv.functional.path_norm import path_norm


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


@pytest.mark.parametrize("p", [0.5, 0, -1, float("inf"), float("nan"), True, "2"])
def test_bad_p_is_rejected(p):
    with pytest.raises(ValueError, match=r"`p` must be a finite number >= 1, got"):
        path_norm(nn.Linear(2, 1), torch.randn(1, 2), p=p)
