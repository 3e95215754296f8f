"""The checks of apply_low_rank (lightning_bv/transforms/_low_rank_checks.py), run before any layer changes."""

import math

import pytest
import torch
from helpers import assert_unchanged, snapshot
from low_rank_models import make_cnn, make_mlp, matrix
from torch import nn

from lightning_bv._select import TargetsMatchNothingError
from lightning_bv.transforms.low_rank import (
    apply_low_rank,
    is_low_rank,
    low_rank_rank,
)


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


def test_rank_bound_is_min_of_out_and_flattened_in():
    conv = nn.Conv2d(2, 20, 3)  # weight is 20 x 18
    with pytest.raises(ValueError, match=r"20 x 18 matrix, so the rank must be <= 18"):
        apply_low_rank(conv, rank=19)
    apply_low_rank(conv, rank=18)
    assert low_rank_rank(conv) == 18 == min(20, 2 * math.prod(conv.kernel_size))
