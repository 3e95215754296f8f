import math

import pytest
import torch
from torch import nn

from lightning_bv.functional.spectral import effective_rank, singular_values, spectrum, stable_rank
from lightning_bv.transforms.low_rank import apply_low_rank, low_rank_factors


def test_identity():
    for n in (1, 3, 17):
        assert stable_rank(torch.eye(n)).item() == pytest.approx(n)
        assert effective_rank(torch.eye(n)).item() == pytest.approx(n)


def test_rank_one_is_one_for_both():
    g = torch.Generator().manual_seed(0)
    for m, n in ((1, 5), (7, 3), (64, 128), (300, 40)):
        w = torch.outer(torch.randn(m, generator=g), torch.randn(n, generator=g))
        assert stable_rank(w).item() == pytest.approx(1.0, abs=1e-9)
        assert effective_rank(w).item() == pytest.approx(1.0, abs=1e-9)


def test_diagonal_known_values():
    s = torch.tensor([4.0, 2.0, 1.0, 1.0])
    w = torch.diag(s)
    assert stable_rank(w).item() == pytest.approx((16 + 4 + 1 + 1) / 16)
    p = s / s.sum()
    assert effective_rank(w).item() == pytest.approx(math.exp(-(p * p.log()).sum().item()))
    assert torch.allclose(singular_values(w), s.double())


def test_equal_singular_values_give_the_rank():
    q, _ = torch.linalg.qr(torch.randn(6, 6, generator=torch.Generator().manual_seed(1), dtype=torch.float64))
    w = 3.0 * q[:, :4]  # orthonormal columns: four singular values equal to 3
    assert stable_rank(w).item() == pytest.approx(4.0)
    assert effective_rank(w).item() == pytest.approx(4.0)


def test_bounds_on_random_matrices():
    g = torch.Generator().manual_seed(2)
    for shape in ((5, 9), (9, 5), (32, 32)):
        w = torch.randn(*shape, generator=g)
        rank = min(shape)
        sr, er = stable_rank(w).item(), effective_rank(w).item()
        assert 1.0 <= sr <= er <= rank + 1e-9  # stable rank <= effective rank <= rank (Roy & Vetterli, Prop. 1)


def test_matches_svd_and_is_invariant_to_orientation_and_scale():
    w = torch.randn(20, 50, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    assert torch.allclose(singular_values(w), torch.linalg.svdvals(w))
    assert torch.allclose(singular_values(w.T), torch.linalg.svdvals(w))
    for f in (stable_rank, effective_rank):
        assert f(7.0 * w).item() == pytest.approx(f(w).item())
        assert f(w.T).item() == pytest.approx(f(w).item())


def test_conv_weight_reads_out_by_in_times_kernel():
    conv = nn.Conv2d(3, 8, 3)
    w = conv.weight.detach()
    flat = w.reshape(8, 27)
    assert stable_rank(w).item() == pytest.approx(stable_rank(flat).item())
    assert effective_rank(w).item() == pytest.approx(effective_rank(flat).item())
    assert singular_values(w).shape == (8,)


def test_zero_matrix_and_empty():
    assert stable_rank(torch.zeros(3, 4)).item() == 0.0
    assert effective_rank(torch.zeros(3, 4)).item() == 0.0
    assert singular_values(torch.zeros(0, 4)).numel() == 0


def test_factored_weight_matches_dense():
    layer = apply_low_rank(nn.Linear(40, 30), rank=5)
    u, v = low_rank_factors(layer)
    dense = spectrum(layer.weight)
    factored = spectrum((u, v))
    assert factored.singular_values.shape == (5,)
    assert torch.allclose(factored.singular_values, dense.singular_values[:5], rtol=1e-5)
    assert factored.stable_rank.item() == pytest.approx(dense.stable_rank.item(), rel=1e-5)
    assert factored.effective_rank.item() == pytest.approx(dense.effective_rank.item(), rel=1e-5)


def test_does_not_track_gradients_and_keeps_device():
    w = torch.randn(4, 6, requires_grad=True)
    out = spectrum(w)
    assert not out.stable_rank.requires_grad
    assert out.singular_values.dtype == torch.float64
    assert out.effective_rank.device == w.device
