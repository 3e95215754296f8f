"""The op rewrites of path_norm's TorchFunctionMode (lightning_bv/functional/_path_norm_mode.py), through path_norm."""

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from path_norm_references import chain_norm, conv_layer, dense, enumerate_paths, linear_layer, randomize_bn
from torch import nn
from torch.nn.utils import parametrize

from lightning_bv import find_neurons
from lightning_bv.functional import _path_norm_mode as mode_module
from lightning_bv.functional.path_norm import path_norm


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


@pytest.mark.parametrize("p", [1, 2, 3])
def test_weights_read_in_blocks_of_rows_give_the_same_norm_and_gradient(monkeypatch, p):
    torch.manual_seed(21)
    conv, l1, l2 = nn.Conv2d(2, 5, 3, padding=1), nn.Linear(5 * 4 * 4, 7), nn.Linear(7, 3)
    net = nn.Sequential(conv, nn.ReLU(), nn.Flatten(), l1, nn.ReLU(), l2)
    x = torch.randn(2, 2, 4, 4)
    whole = path_norm(net, x, p=p)  # every weight fits in one block
    grads = torch.autograd.grad(whole, list(net.parameters()))
    monkeypatch.setattr(mode_module, "_BLOCK", 20)  # blocks of 1 conv row, 1 row of l1, 2 + 1 rows of l2
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
    monkeypatch.setattr(mode_module, "_BLOCK", 6)  # one output channel a block
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
