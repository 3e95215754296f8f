import copy
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from lightning_bv._select import TargetsMatchNothingError
from lightning_bv.transforms.low_rank import (
    LowRankWeight,
    apply_low_rank,
    factorize,
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


def make_mlp() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 10), nn.ReLU(), nn.Linear(10, 8), nn.ReLU(), nn.Linear(8, 3))


def make_cnn() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 4, 3, stride=2), nn.Flatten(), nn.Linear(4 * 3 * 3, 2)
    )


def snapshot(model: nn.Module) -> tuple[str, dict[str, torch.Tensor], dict[str, int]]:
    return (
        str(model),
        {k: v.detach().clone() for k, v in model.state_dict().items()},
        {n: id(p) for n, p in model.named_parameters()},
    )


def assert_unchanged(model: nn.Module, before: tuple[str, dict[str, torch.Tensor], dict[str, int]]) -> None:
    text, state, ids = before
    assert str(model) == text
    now = model.state_dict()
    assert list(now) == list(state)
    for k, v in state.items():
        assert torch.equal(now[k], v), k
    assert {n: id(p) for n, p in model.named_parameters()} == ids
    assert not any(is_low_rank(m) for m in model.modules())


def matrix(weight: torch.Tensor) -> torch.Tensor:
    return weight.detach().reshape(weight.shape[0], -1)


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


@pytest.mark.parametrize("energy", [0.01, 0.3, 0.5, 0.8, 0.95, 0.999, 1.0])
def test_energy_rule(energy):
    model = make_cnn()
    weights = {n: matrix(m.weight).clone() for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))}
    apply_low_rank(model, energy=energy)
    for name, w in weights.items():
        s2 = torch.linalg.svdvals(w.double()).square()
        fractions = s2.cumsum(0) / s2.sum()
        expected = next(k + 1 for k in range(len(s2)) if fractions[k] >= energy - 1e-12)
        assert low_rank_rank(model.get_submodule(name)) == expected, name


def test_energy_of_zero_weight_is_rank_one():
    layer = nn.Linear(4, 4)
    nn.init.zeros_(layer.weight)
    apply_low_rank(layer, energy=0.5)
    assert low_rank_rank(layer) == 1
    assert torch.count_nonzero(layer.weight) == 0


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


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"rank": 0}, ValueError, r"`rank` must be an int >= 1, got 0"),
        ({"rank": True}, ValueError, r"`rank` must be an int >= 1, got True"),
        ({"rank": 2.0}, ValueError, r"`rank` must be an int >= 1, got 2.0"),
        (
            {"rank": 4},
            ValueError,
            r"`rank`=4 is too large for layer '4' \(Linear\(.*\)\): its weight is a 3 x 8 matrix",
        ),
        ({"energy": 0.0}, ValueError, r"`energy` must be a float in \(0, 1\].*got 0.0"),
        ({"energy": 1.5}, ValueError, r"`energy` must be a float in \(0, 1\].*got 1.5"),
        ({"rank": 2, "energy": 0.5}, ValueError, r"exactly one of `rank` and `energy`, got rank=2 and energy=0.5"),
        ({}, ValueError, r"exactly one of `rank` and `energy`, got rank=None and energy=None"),
        ({"rank": 1, "targets": ["fc9"]}, TargetsMatchNothingError, r"'fc9' matched no module"),
        ({"rank": 1, "targets": r"\d"}, TypeError, r"selected '1' \(ReLU\), which is not an nn.Linear"),
        ({"rank": 1, "targets": 3}, TypeError, r"`targets` must be None"),
    ],
)
def test_bad_arguments_leave_model_unchanged(kwargs, error, match):
    model = make_mlp()
    before = snapshot(model)
    with pytest.raises(error, match=match):
        apply_low_rank(model, **kwargs)
    assert_unchanged(model, before)


def test_rank_too_large_for_a_later_layer_changes_nothing():
    model = make_mlp()
    before = snapshot(model)
    with pytest.raises(ValueError, match=r"too large for layer '4'"):
        apply_low_rank(model, rank=4)  # fits layers 0 and 2, not 4 (3 outputs)
    assert_unchanged(model, before)
    apply_low_rank(model, rank=4, exclude=["4"])
    assert [is_low_rank(m) for m in model] == [True, False, True, False, False]


def test_grouped_conv_and_double_application_are_refused():
    model = nn.Sequential(nn.Conv2d(4, 4, 3, groups=2), nn.Conv2d(4, 4, 1))
    before = snapshot(model)
    with pytest.raises(ValueError, match=r"'0' .* is a grouped conv \(groups=2\)"):
        apply_low_rank(model, rank=1)
    assert_unchanged(model, before)
    apply_low_rank(model, rank=1, targets=["1"])
    with pytest.raises(ValueError, match=r"'1' .* is already low-rank; call `remove_low_rank` first"):
        apply_low_rank(model, rank=1, targets=["1"])
    assert low_rank_rank(model[1]) == 1


def test_model_without_layers_is_refused():
    with pytest.raises(ValueError, match=r"contains no nn.Linear"):
        apply_low_rank(nn.Sequential(nn.ReLU()), rank=1)
    with pytest.raises(TypeError, match="`model` must be an nn.Module"):
        apply_low_rank("model", rank=1)


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


def test_rank_bound_is_min_of_out_and_flattened_in():
    conv = nn.Conv2d(2, 20, 3)  # weight is 20 x 18
    with pytest.raises(ValueError, match=r"20 x 18 matrix, so the rank must be <= 18"):
        apply_low_rank(conv, rank=19)
    apply_low_rank(conv, rank=18)
    assert low_rank_rank(conv) == 18 == min(20, 2 * math.prod(conv.kernel_size))


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
