"""The allow-list and the tensor helpers of path_norm (lightning_bv/functional/_path_norm_ops.py)."""

import pytest
import torch
import torch.nn.functional as F

from lightning_bv.functional._path_norm_ops import (
    _HANDLER,
    _METADATA,
    _abs_pow,
    _abs_pow_f64,
    _adaptive_window_sizes,
    _is_inplace,
    _sum_pool,
)


@pytest.mark.parametrize("p", [1, 2, 3])
def test_abs_pow_in_float64(p):
    t = torch.tensor([-2.0, 0.5, 3.0])
    expected = t.double().abs().pow(p)
    assert torch.equal(_abs_pow(t.double(), p), expected)
    out = _abs_pow_f64(t, p)
    assert out.dtype == torch.float64
    assert torch.equal(out, expected)
    assert torch.equal(t, torch.tensor([-2.0, 0.5, 3.0]))  # computed on a copy


@pytest.mark.parametrize(
    ("kernel", "stride", "padding", "dilation", "ceil_mode"),
    [(2, None, 0, 1, False), (3, 2, 1, 1, False), (3, 2, 1, 2, True), ((2, 3), (1, 2), (1, 0), 1, True)],
)
def test_sum_pool_sums_the_windows_of_the_max_pool(kernel, stride, padding, dilation, ceil_mode):
    x = torch.rand(2, 3, 7, 8, dtype=torch.float64) + 0.5
    summed = _sum_pool(x, 2, kernel, stride, padding, dilation, ceil_mode)
    pooled = F.max_pool2d(x, kernel, stride, padding, dilation, ceil_mode)
    assert summed.shape == pooled.shape
    # every window's sum lies between its max and (entries in the window) * max
    window = (kernel if isinstance(kernel, int) else kernel[0] * kernel[1]) * (
        1 if isinstance(kernel, tuple) else kernel
    )
    assert bool((summed >= pooled - 1e-12).all())
    assert bool((summed <= window * pooled + 1e-12).all())
    ones = torch.ones(1, 1, 7, 8, dtype=torch.float64)
    counts = _sum_pool(ones, 2, kernel, stride, padding, dilation, ceil_mode)
    assert float(counts.max()) <= window


def test_sum_pool_without_dilation_is_the_average_pool_times_the_window():
    x = torch.randn(2, 3, 9, 6, dtype=torch.float64)
    expected = F.avg_pool2d(x, 3, 2, 1, count_include_pad=True) * 9
    torch.testing.assert_close(_sum_pool(x, 2, 3, 2, 1, 1, False), expected, rtol=1e-12, atol=1e-12)


def test_adaptive_window_sizes_count_the_entries_of_each_window():
    like = torch.zeros((), dtype=torch.float64)
    sizes = _adaptive_window_sizes((5, 4), (2, None), like)
    # length 5 into 2 windows: [0, 3) and [2, 5), 3 entries each; None keeps the 4 positions, one entry each
    assert torch.equal(sizes, torch.full((2, 4), 3.0, dtype=torch.float64))
    assert torch.equal(_adaptive_window_sizes((7,), 3, like), torch.tensor([3.0, 3.0, 3.0], dtype=torch.float64))


def test_the_allow_list_is_by_function_and_names_tell_in_place_ops():
    assert _HANDLER[F.relu] == "identity"
    assert _HANDLER[torch.Tensor.add_] == "add"
    assert _HANDLER[F.conv2d] == "weighted"
    assert F.gelu not in _HANDLER
    assert "shape" in _METADATA
    assert "item" not in _METADATA
    assert _is_inplace("add_")
    assert _is_inplace("__iadd__")
    assert not _is_inplace("__add__")
    assert not _is_inplace("add")
