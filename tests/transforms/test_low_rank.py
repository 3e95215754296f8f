"""The low-rank trio (lightning_bv/transforms/low_rank.py): apply_low_rank, is_low_rank, remove_low_rank."""

import copy

import pytest
import torch
from helpers import assert_unchanged, snapshot
from hypothesis import given, settings
from hypothesis import strategies as st
from low_rank_models import make_cnn, make_mlp, matrix
from torch import nn

from lightning_bv.transforms.low_rank import (
    LowRankWeight,
    apply_low_rank,
    is_low_rank,
    low_rank_factors,
    low_rank_live_components,
    low_rank_rank,
    remove_low_rank,
)

LAYERS = {
    "linear": (lambda: nn.Linear(12, 9), (4, 12)),
    "conv1d": (lambda: nn.Conv1d(3, 6, 3, padding=1), (2, 3, 7)),
    "conv2d": (lambda: nn.Conv2d(3, 5, 3, stride=2, padding=1, dilation=1), (2, 3, 8, 8)),
    "conv3d": (lambda: nn.Conv3d(2, 4, 2), (2, 2, 4, 4, 4)),
}


@pytest.mark.parametrize("kind", list(LAYERS))
@pytest.mark.parametrize("rank", [1, 2, 3])
def test_svd_truncation_error_and_shapes(kind, rank):
    torch.manual_seed(0)
    layer = LAYERS[kind][0]()
    before = matrix(layer.weight).clone()
    s = torch.linalg.svdvals(before)
    apply_low_rank(layer, rank=rank)
    after = matrix(layer.weight)
    assert is_low_rank(layer)
    assert layer.weight.shape == layer.parametrizations.weight.original0.shape[:1] + layer.weight.shape[1:]
    U, V = low_rank_factors(layer)
    assert U is layer.parametrizations.weight.original0
    assert V is layer.parametrizations.weight.original1
    assert isinstance(U, nn.Parameter)
    assert isinstance(V, nn.Parameter)
    assert tuple(U.shape) == (before.shape[0], rank)
    assert tuple(V.shape) == (rank, before.shape[1])
    assert low_rank_rank(layer) == rank
    assert all(isinstance(p, LowRankWeight) for p in layer.parametrizations.weight)
    expected = s[rank:].square().sum().sqrt()
    assert torch.allclose((before - after).norm(), expected, atol=1e-5)
    assert torch.linalg.matrix_rank(after).item() == rank
    # sqrt(S) on each side: the column norms of U equal the row norms of V
    assert torch.allclose(U.detach().norm(dim=0), V.detach().norm(dim=1), atol=1e-5)


@settings(max_examples=15, deadline=None)
@given(out=st.integers(1, 9), inp=st.integers(1, 9), data=st.data())
def test_svd_truncation_error_any_shape(out, inp, data):
    rank = data.draw(st.integers(1, min(out, inp)))
    layer = nn.Linear(inp, out).double()
    before = layer.weight.detach().clone()
    s = torch.linalg.svdvals(before)
    apply_low_rank(layer, rank=rank)
    err = (before - layer.weight.detach()).norm()
    assert torch.allclose(err, s[rank:].square().sum().sqrt(), atol=1e-10)


@pytest.mark.parametrize("kind", list(LAYERS))
def test_full_rank_changes_nothing(kind):
    torch.manual_seed(1)
    layer, shape = LAYERS[kind][0](), LAYERS[kind][1]
    x = torch.randn(shape)
    y = layer(x)
    full = min(matrix(layer.weight).shape)
    apply_low_rank(layer, rank=full)
    assert torch.allclose(layer(x), y, atol=1e-5)
    layer = nn.Linear(5, 7)
    w = layer.weight.detach().clone()
    apply_low_rank(layer, energy=1.0)
    assert low_rank_rank(layer) == 5
    assert torch.allclose(layer.weight, w, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_dtype_is_kept(dtype):
    layer = nn.Conv1d(3, 4, 3).to(dtype)
    apply_low_rank(layer, rank=2)
    U, V = low_rank_factors(layer)
    assert U.dtype == V.dtype == layer.weight.dtype == dtype
    assert U.device == layer.bias.device
    assert layer(torch.randn(1, 3, 5, dtype=dtype)).dtype == dtype


def test_training_after_apply_low_rank():
    model = make_mlp()
    apply_low_rank(model, rank=2, targets=["0", "2"])
    names = [n for n, _ in model.named_parameters()]
    assert "0.parametrizations.weight.original0" in names
    assert "0.parametrizations.weight.original1" in names
    torch.manual_seed(0)
    x, y = torch.randn(64, 6), torch.randn(64, 3)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    losses = []
    for _ in range(20):
        opt.zero_grad()
        loss = nn.functional.mse_loss(model(x), y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    for m in (model[0], model[2]):
        U, V = low_rank_factors(m)
        assert U.grad is not None
        assert V.grad is not None
        assert U.grad.abs().sum() > 0
    assert low_rank_rank(model[0]) == 2
    assert torch.linalg.matrix_rank(model[0].weight.detach()).item() <= 2


@pytest.mark.parametrize(
    ("make", "shape", "kwargs"), [(make_mlp, (4, 6), {"rank": 2}), (make_cnn, (2, 3, 8, 8), {"energy": 0.6})]
)
def test_state_dict_round_trip(make, shape, kwargs):
    model = apply_low_rank(make(), **kwargs)
    with torch.no_grad():  # train a little so the factors are not what a fresh SVD would give
        for p in model.parameters():
            p.add_(0.01 * torch.randn_like(p))
    torch.manual_seed(123)
    fresh = make()
    for p in fresh.parameters():  # a different model, so that energy= picks different ranks
        nn.init.normal_(p)
    apply_low_rank(fresh, **kwargs)
    ranks = [low_rank_rank(m) for m in model.modules() if is_low_rank(m)]
    if "energy" in kwargs:  # the saved ranks differ from the fresh model's: they are taken from the state_dict
        assert ranks != [low_rank_rank(m) for m in fresh.modules() if is_low_rank(m)]
    fresh.load_state_dict(model.state_dict())
    x = torch.randn(shape)
    assert torch.equal(fresh(x), model(x))
    for a, b in zip(fresh.modules(), model.modules()):
        if is_low_rank(a):
            assert low_rank_rank(a) == low_rank_rank(b)
            assert a.parametrizations.weight[0].rank == low_rank_rank(b)


def test_load_with_mismatched_rank_fails_when_shapes_disagree():
    model = apply_low_rank(nn.Linear(4, 3), rank=2)
    other = apply_low_rank(nn.Linear(5, 3), rank=2)
    with pytest.raises(RuntimeError, match="size mismatch"):
        other.load_state_dict(model.state_dict())


def test_torch_save_refuses_parametrized_module_but_deepcopy_works(tmp_path):
    model = apply_low_rank(make_mlp(), rank=2)
    with pytest.raises(RuntimeError, match="state_dict"):
        torch.save(model, tmp_path / "model.pt")
    torch.save(model.state_dict(), tmp_path / "state.pt")
    clone = copy.deepcopy(model)
    x = torch.randn(3, 6)
    assert torch.equal(clone(x), model(x))
    # the resize-on-load hook of the copy acts on the copy only
    bigger = apply_low_rank(make_mlp(), rank=3)
    clone.load_state_dict(bigger.state_dict())
    assert low_rank_rank(clone[0]) == 3
    assert low_rank_rank(model[0]) == 2
    assert torch.equal(clone(x), bigger(x))


def test_remove_low_rank_merge_keeps_the_product():
    model = apply_low_rank(make_mlp(), rank=2)
    x = torch.randn(5, 6)
    y = model(x)
    products = [m.weight.detach().clone() for m in model if is_low_rank(m)]
    assert remove_low_rank(model) is model
    assert not any(is_low_rank(m) for m in model.modules())
    assert [type(m) for m in model] == [nn.Linear, nn.ReLU, nn.Linear, nn.ReLU, nn.Linear]
    for m, w in zip([model[0], model[2], model[4]], products):
        assert isinstance(m.weight, nn.Parameter)
        assert m.weight.requires_grad
        assert torch.equal(m.weight.detach(), w)
    assert list(model.state_dict()) == list(make_mlp().state_dict())
    assert torch.allclose(model(x), y, atol=1e-6)
    assert remove_low_rank(model) is model  # nothing low-rank: no-op


def test_remove_low_rank_without_merge_factorizes():
    model = apply_low_rank(make_mlp(), rank=2)
    x = torch.randn(5, 6)
    y = model(x)
    model = remove_low_rank(model, merge=False)
    assert isinstance(model[0], nn.Sequential)
    assert model[0][0].out_features == 2
    assert torch.allclose(model(x), y, atol=1e-5)


def test_live_components():
    layer = apply_low_rank(nn.Linear(8, 8), rank=4)
    assert low_rank_live_components(layer) == 4
    U, V = low_rank_factors(layer)
    with torch.no_grad():
        U[:, 1] = 0.0
        V[3] *= 1e-4
    assert low_rank_live_components(layer) == 3
    strength = U.detach().norm(dim=0) * V.detach().norm(dim=1)
    assert low_rank_live_components(layer, tol=float(strength[3]) * 1.01) == 2


def test_helpers_on_plain_layers():
    layer = nn.Linear(3, 3)
    assert not is_low_rank(layer)
    assert low_rank_factors(layer) is None
    with pytest.raises(ValueError, match="not low-rank"):
        low_rank_rank(layer)
    with pytest.raises(ValueError, match="not low-rank"):
        low_rank_live_components(layer)


def test_parametrization_contract():
    p = LowRankWeight(2, (4, 3, 2))
    w = torch.randn(4, 3, 2)
    U, V = p.right_inverse(w)
    assert U.shape == (4, 2)
    assert V.shape == (2, 6)
    assert p(U, V).shape == w.shape
    assert low_rank_factors(apply_low_rank(nn.Linear(3, 4), rank=2)) is not None


def test_failure_midway_restores_the_model(monkeypatch):
    model = make_mlp()
    before = snapshot(model)
    calls = []
    original = LowRankWeight.right_inverse

    def flaky(self, weight):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("boom")
        return original(self, weight)

    monkeypatch.setattr(LowRankWeight, "right_inverse", flaky)
    with pytest.raises(RuntimeError, match="boom"):
        apply_low_rank(model, rank=2)
    assert_unchanged(model, before)
    assert all(type(m) in (nn.Linear, nn.ReLU) for m in model)


def test_parametrization_internals_are_not_targets():
    model = make_mlp()
    apply_low_rank(model, rank=2, targets=["2"])
    apply_low_rank(model, rank=2, targets=["0"])  # "2.parametrizations.weight.0" must not match "0"
    assert [is_low_rank(m) for m in model] == [True, False, True, False, False]


def test_remove_low_rank_leaves_a_deepcopy_working():
    """parametrize.remove_parametrizations deletes the weight property from a class that a deepcopy shares."""
    layer = apply_low_rank(nn.Linear(6, 5), rank=2)
    twin = copy.deepcopy(layer)
    x = torch.randn(3, 6)
    y = twin(x)
    remove_low_rank(layer)
    assert torch.equal(twin(x), y)
    assert list(dict(layer.named_parameters())) == ["weight", "bias"]


def test_names_other_modules_import_stay_in_low_rank():
    from lightning_bv.transforms import _factored, _low_rank_checks, low_rank

    assert low_rank.factorize is _factored.factorize
    for name in ("_check_rank_energy", "_candidate_names", "_layer_rank"):
        assert getattr(low_rank, name) is getattr(_low_rank_checks, name), name
    for name in ("_apply_ranks", "_plist", "is_low_rank", "low_rank_rank", "low_rank_live_components"):
        assert callable(getattr(low_rank, name)), name
