"""The skip trio (lightning_bv/transforms/skip.py): add_skip, is_skip, remove_skip and AffineSkip."""

import pytest
import torch
from helpers import assert_unchanged, snapshot
from skip_models import make_cnn, make_mlp, randomize_skips
from torch import nn

from lightning_bv._layers import is_null_space
from lightning_bv._select import TargetsMatchNothingError
from lightning_bv.transforms.low_rank import apply_low_rank
from lightning_bv.transforms.skip import AffineSkip, add_skip, affine_skip_for, is_skip, remove_skip


@pytest.mark.parametrize(
    ("make", "targets", "shape"),
    [
        (make_mlp, ["0", "2", "4"], (5, 6)),
        (make_cnn, ["0", "2", "4"], (2, 3, 9, 9)),
        (lambda: nn.Sequential(nn.Conv1d(2, 4, 3, stride=2, padding=2, dilation=2)), ["0"], (2, 2, 11)),
        (lambda: nn.Sequential(nn.Conv3d(2, 3, 3, padding=1)), ["0"], (1, 2, 4, 5, 3)),
    ],
)
def test_affine_skip_preserves_the_function(make, targets, shape):
    model = make()
    x = torch.randn(shape)
    y = model(x)
    inner = {t: model.get_submodule(t) for t in targets}
    model = add_skip(model, targets)
    assert torch.equal(model(x), y)
    for t in targets:
        wrapper = model.get_submodule(t)
        assert is_skip(wrapper)
        assert wrapper.module is inner[t]
        assert is_null_space(wrapper.skip)
        assert all(torch.count_nonzero(p) == 0 for p in wrapper.skip.parameters())
        assert wrapper.skip.bias is not None
        if isinstance(inner[t], nn.Linear):
            assert (wrapper.skip.in_features, wrapper.skip.out_features) == (
                inner[t].in_features,
                inner[t].out_features,
            )
        else:
            assert isinstance(wrapper.skip, type(inner[t]))  # a skip-path subclass of the same conv
            assert wrapper.skip.kernel_size == (1,) * len(inner[t].kernel_size)
            assert wrapper.skip.stride == inner[t].stride
    randomize_skips(model)
    out = model(x)
    assert out.shape == y.shape
    assert not torch.allclose(out, y)


def test_affine_skip_trains_from_zero():
    model = add_skip(make_mlp(), ["2"])
    model(torch.randn(8, 6)).pow(2).sum().backward()
    assert model[2].skip.weight.grad is not None
    assert model[2].skip.weight.grad.abs().sum() > 0


def test_state_dict_keys_move_under_the_wrapper():
    model = add_skip(make_mlp(), ["2"])
    keys = list(model.state_dict())
    assert "2.module.weight" in keys
    assert "2.skip.weight" in keys
    assert "2.skip.bias" in keys
    assert "2.weight" not in keys


def test_identity_skip_adds_the_input():
    model = nn.Sequential(nn.Linear(5, 5), nn.ReLU(), nn.Conv1d(3, 3, 3, padding=1))
    model = add_skip(model, ["0", "2"], kind="identity")
    assert isinstance(model[0].skip, nn.Identity)
    x = torch.randn(2, 5)
    assert torch.allclose(model[0](x), model[0].module(x) + x)
    z = torch.randn(2, 3, 7)
    assert torch.allclose(model[2](z), model[2].module(z) + z)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        (
            {"targets": ["0"], "kind": "dense"},
            ValueError,
            r"`kind` must be one of \('affine', 'identity'\), got 'dense'",
        ),
        ({"targets": None}, ValueError, r"`targets` is required"),
        ({"targets": ["0", "fc9"]}, TargetsMatchNothingError, r"'fc9' matched no module"),
        ({"targets": ["0", "1"]}, TypeError, r"Cannot read the input and output sizes of '1' \(ReLU\).*example_input="),
        ({"targets": ["0", "2"], "kind": "identity"}, ValueError, r"maps 10 to 10 features|maps 6 to 10 features"),
    ],
)
def test_bad_arguments_leave_model_unchanged(kwargs, error, match):
    model = make_mlp()
    before = snapshot(model)
    with pytest.raises(error, match=match):
        add_skip(model, **kwargs)
    assert_unchanged(model, before)


def test_a_skip_is_not_wrapped_again():
    model = add_skip(make_mlp(), ["2"])
    before = snapshot(model)
    for target in (["2"], ["2.skip"]):
        with pytest.raises(ValueError, match=r"already a skip connection or part of one"):
            add_skip(model, target)
        assert_unchanged(model, before)


def test_root_target_returns_the_wrapper():
    layer = nn.Linear(3, 3)
    wrapped = add_skip(layer, [""])
    assert isinstance(wrapped, AffineSkip)
    assert wrapped.module is layer
    assert remove_skip(wrapped) is layer


def test_remove_skip_restores_the_original_modules():
    model = make_cnn()
    before = snapshot(model)
    x = torch.randn(2, 3, 9, 9)
    y = model(x)
    model = add_skip(model, ["0", "4"])
    randomize_skips(model)
    assert remove_skip(model) is model  # merge=False: the trained skips are dropped
    assert_unchanged(model, before)
    assert torch.equal(model(x), y)
    assert not any(is_skip(m) for m in model.modules())


def test_remove_skip_with_targets_and_nested_wrappers():
    model = make_mlp()
    before = snapshot(model)
    model = add_skip(model, ["0", "2"])
    model = add_skip(model, ["2.module"], kind="identity")  # a wrapper inside the wrapper
    assert is_skip(model[2].module)
    model = remove_skip(model, targets=["0"])
    assert not is_skip(model[0])
    assert is_skip(model[2])
    model = remove_skip(model)
    assert_unchanged(model, before)


@pytest.mark.parametrize(
    ("make", "targets", "kind", "shape"),
    [
        (make_mlp, ["0", "2", "4"], "affine", (5, 6)),
        (make_mlp, ["2"], "identity", (5, 6)),
        (make_cnn, ["0", "2", "4"], "affine", (2, 3, 9, 9)),
        (make_cnn, ["2"], "identity", (2, 3, 9, 9)),
        (lambda: nn.Sequential(nn.Linear(4, 4, bias=False)), ["0"], "affine", (3, 4)),
        (lambda: nn.Sequential(nn.Conv1d(2, 3, 3, stride=2, padding=2, dilation=2)), ["0"], "affine", (2, 2, 11)),
    ],
)
def test_remove_skip_merge_keeps_the_function(make, targets, kind, shape):
    model = add_skip(make(), targets, kind=kind)
    randomize_skips(model)
    x = torch.randn(shape)
    y = model(x)
    model = remove_skip(model, merge=True)
    assert not any(is_skip(m) for m in model.modules())
    assert [type(m) for m in model] == [type(m) for m in make()]
    assert torch.allclose(model(x), y, atol=1e-5)


def test_remove_skip_merge_refuses_what_it_cannot_fold():
    model = nn.Sequential(nn.Linear(4, 4), nn.Conv2d(4, 4, 3, padding=1, groups=2))
    model = add_skip(model, ["0", "1"])
    randomize_skips(model)
    before = snapshot(model)
    with pytest.raises(ValueError, match=r"Cannot merge the skip of '1' \(Conv2d\).*Use merge=False"):
        remove_skip(model, merge=True)
    assert_unchanged(model, before)
    low = apply_low_rank(nn.Linear(4, 4), rank=2)
    wrapped = add_skip(nn.Sequential(low), ["0"])
    with pytest.raises(ValueError, match=r"'0': its weight is parametrized"):
        remove_skip(wrapped, merge=True)


def test_affine_skip_for_keeps_dtype():
    skip = affine_skip_for(nn.Linear(3, 2).double())
    assert skip.weight.dtype == torch.float64
    assert is_null_space(skip)


def test_names_the_callback_imports_stay_in_skip():
    from lightning_bv.transforms import _skip_shapes, skip

    assert skip.shape_hooks is _skip_shapes.shape_hooks
    for name in ("_add_skip", "_check_skip_args", "is_skip", "needs_trial", "shape_hooks"):
        assert callable(getattr(skip, name)), name
