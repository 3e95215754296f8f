"""lightning_bv._layers: the library's own layer objects are recognized by class."""

import pickle

import pytest
import torch
from torch import nn

from lightning_bv._layers import is_null_space, low_rank_factors, low_rank_weight, null_space
from lightning_bv.transforms.low_rank import apply_low_rank


@pytest.mark.parametrize("layer", [nn.Linear(3, 2), nn.Conv1d(3, 2, 1), nn.Conv2d(3, 2, 1), nn.Conv3d(3, 2, 1)])
def test_null_space_marks_in_place_and_keeps_the_layer(layer):
    keys, repr_before = list(layer.state_dict()), repr(layer)
    marked = null_space(layer)
    assert marked is layer
    assert is_null_space(layer)
    assert list(layer.state_dict()) == keys
    assert repr(layer) == repr_before
    assert is_null_space(pickle.loads(pickle.dumps(layer)))  # ddp_spawn pickles modules built before the fit
    assert not is_null_space(nn.Linear(3, 2))
    assert not is_null_space(nn.Conv2d(3, 2, 1))


def test_null_space_of_a_subclass_and_bad_input():
    class MyLinear(nn.Linear):
        pass

    skip = null_space(MyLinear(2, 2))
    assert is_null_space(skip)
    assert isinstance(skip, MyLinear)
    assert repr(skip).startswith("MyLinear(")
    with pytest.raises(TypeError, match=r"`module` must be an nn.Linear, nn.Conv1d, nn.Conv2d or nn.Conv3d.*ReLU"):
        null_space(nn.ReLU())


def test_low_rank_weight_is_recognized_by_class_alone():
    layer = apply_low_rank(nn.Linear(4, 3), rank=2)
    u, v = low_rank_factors(layer)
    assert low_rank_weight(layer) is layer.parametrizations.weight[0]
    assert torch.equal(u @ v, layer.weight)
    plain = nn.Linear(4, 3)
    torch.nn.utils.parametrize.register_parametrization(plain, "weight", nn.Identity())
    assert low_rank_weight(plain) is None
    assert low_rank_factors(plain) is None
