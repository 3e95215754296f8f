import pytest
import torch
from torch import nn

from lightning_bv._layers import is_null_space
from lightning_bv.modules.rbvnet import RBVBlock, RBVNet

ARGS = {"in_features": 3, "out_features": 2, "width": 16, "bottleneck": 4, "depth": 3}


def param_count(d_in: int, width: int, d_out: int) -> int:
    return (d_in * width + width) + (width * d_out + d_out) + (d_in * d_out + d_out)


@pytest.mark.parametrize("depth", [1, 2, 4])
def test_shapes_forward_and_parameter_count(depth):
    net = RBVNet(in_features=5, out_features=3, width=12, bottleneck=2, depth=depth)
    assert len(net.blocks) == depth
    dims = [5] + [2] * (depth - 1) + [3]
    for i, block in enumerate(net.blocks):
        assert isinstance(block, RBVBlock)
        assert tuple(block.fc1.weight.shape) == (12, dims[i])
        assert tuple(block.fc2.weight.shape) == (dims[i + 1], 12)
        assert tuple(block.skip.weight.shape) == (dims[i + 1], dims[i])
        assert is_null_space(block.skip)
        assert isinstance(block.act, nn.ReLU)
    expected = sum(param_count(dims[i], 12, dims[i + 1]) for i in range(depth))
    assert sum(p.numel() for p in net.parameters()) == expected
    x = torch.randn(7, 5)
    y = net(x)
    assert y.shape == (7, 3)
    assert torch.isfinite(y).all()
    assert net(torch.randn(2, 4, 5)).shape == (2, 4, 3)


def test_block_computes_shallow_relu_plus_affine_skip():
    torch.manual_seed(0)
    block = RBVBlock(4, 8, 3)
    with torch.no_grad():
        block.skip.weight.normal_()
        block.skip.bias.normal_()
    z = torch.randn(5, 4)
    expected = torch.relu(z @ block.fc1.weight.T + block.fc1.bias) @ block.fc2.weight.T + block.fc2.bias
    expected = expected + z @ block.skip.weight.T + block.skip.bias
    assert torch.allclose(block(z), expected, atol=1e-6)


def test_initialization():
    torch.manual_seed(0)
    net = RBVNet(in_features=64, out_features=64, width=512, bottleneck=64, depth=4)
    for block in net.blocks:
        assert torch.count_nonzero(block.skip.weight) == 0
        assert torch.count_nonzero(block.skip.bias) == 0
        assert torch.count_nonzero(block.fc2.bias) == 0
        assert block.fc1.weight.std().item() == pytest.approx((2.0 / block.fc1.in_features) ** 0.5, rel=0.05)
        assert block.fc2.weight.std().item() == pytest.approx((1.0 / block.fc2.in_features) ** 0.5, rel=0.05)
    x = torch.randn(256, 64)
    ratio = (net(x).pow(2).mean() / x.pow(2).mean()).item()
    assert 0.1 < ratio < 10.0  # variance roughly kept through 4 blocks


def test_trains():
    torch.manual_seed(0)
    net = RBVNet(in_features=2, out_features=1, width=32, bottleneck=3, depth=2)
    x = torch.randn(128, 2)
    y = (x[:, :1] * x[:, 1:]).abs()
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    first = None
    for _ in range(50):
        opt.zero_grad()
        loss = nn.functional.mse_loss(net(x), y)
        loss.backward()
        opt.step()
        first = loss.item() if first is None else first
    assert loss.item() < 0.5 * first
    assert all(p.grad is not None for p in net.parameters())


def test_repr_names_the_sizes():
    assert "in_features=3, out_features=2, width=16, bottleneck=4, depth=3" in repr(RBVNet(**ARGS))


def test_neuron_discovery_finds_one_group_per_block():
    neurons = pytest.importorskip("lightning_bv.neurons")
    net = RBVNet(**ARGS)
    groups = neurons.find_neurons(net, torch.randn(4, 3))
    assert len(groups) == ARGS["depth"]
    for i, group in enumerate(groups):
        assert group.producer == f"blocks.{i}.fc1"
        assert group.consumers == (f"blocks.{i}.fc2",)
        assert group.num_neurons == ARGS["width"]
