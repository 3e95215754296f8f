"""The factored forms of a low-rank layer (lightning_bv/transforms/_factored.py): factorize, the fast forward."""

import pytest
import torch
from torch import nn

from lightning_bv.transforms._factored import _FactoredForward
from lightning_bv.transforms.low_rank import (
    apply_low_rank,
    factorize,
    is_low_rank,
    remove_low_rank,
)


@pytest.mark.parametrize(
    ("layer", "shape"),
    [
        (nn.Linear(12, 9), (4, 12)),
        (nn.Linear(12, 9, bias=False), (3, 2, 12)),
        (nn.Conv2d(3, 8, 3, stride=2, padding=2, dilation=2), (2, 3, 9, 9)),
        (nn.Conv2d(3, 8, (3, 1), padding="same", bias=False), (2, 3, 6, 5)),
        (nn.Conv1d(4, 6, 3, padding=1, padding_mode="circular"), (2, 4, 7)),
        (nn.Conv3d(2, 4, 3, padding=1), (1, 2, 4, 4, 4)),
    ],
)
def test_factorize_same_function(layer, shape):
    torch.manual_seed(0)
    base = type(layer)
    model = nn.Sequential(layer, nn.ReLU())
    apply_low_rank(model, rank=2)
    x = torch.randn(shape)
    y = model(x)
    model = factorize(model)
    first, second = model[0]
    assert not is_low_rank(first)
    assert not is_low_rank(second)
    assert type(first) is type(second) is base
    assert first.bias is None
    assert (second.bias is not None) == (layer.bias is not None)
    if isinstance(first, nn.Conv2d):
        assert first.out_channels == 2
        assert second.kernel_size == (1, 1)
        assert first.stride == layer.stride
        assert first.dilation == layer.dilation
        assert first.padding == layer.padding
    assert torch.allclose(model(x), y, atol=1e-5)


def test_factorize_root_returns_replacement_and_trains():
    layer = apply_low_rank(nn.Linear(6, 6), rank=3)
    x = torch.randn(2, 6)
    y = layer(x)
    new = factorize(layer)
    assert isinstance(new, nn.Sequential)
    assert torch.allclose(new(x), y, atol=1e-5)
    new(x).sum().backward()
    assert all(p.grad is not None for p in new.parameters())


def test_a_low_rank_linear_computes_two_thin_products_with_the_same_function():
    torch.manual_seed(0)
    layer = apply_low_rank(nn.Linear(64, 48), rank=2)
    assert isinstance(layer, nn.Linear)
    assert isinstance(layer, _FactoredForward)  # mixed in
    assert torch.nn.utils.parametrize.type_before_parametrizations(layer).__name__ == "Linear"
    x = torch.randn(32, 64)  # 32 * 2 * (64 + 48) < 48 * 64 * (2 + 32): the thin products are cheaper
    dense = torch.nn.functional.linear(x, layer.weight, layer.bias)
    assert torch.allclose(layer(x), dense, atol=1e-5)
    remove_low_rank(layer)
    assert type(layer) is nn.Linear
    assert torch.allclose(layer(x), dense, atol=1e-5)
