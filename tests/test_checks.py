"""The shared validators of lightning_bv/_checks.py (the messages each public function shows are pinned in
tests/test_bad_input.py)."""

import pytest
import torch
from torch import nn

import lightning_bv as lbv
from lightning_bv._checks import check_groups, check_int, check_nonnegative, check_tau, check_tol


def test_check_groups_takes_one_group_or_any_iterable_of_them():
    net = nn.Sequential(nn.Linear(2, 3), nn.ReLU(), nn.Linear(3, 2), nn.ReLU(), nn.Linear(2, 1))
    groups = lbv.find_neurons(net, torch.randn(1, 2))
    assert check_groups(groups[0], lbv.NeuronGroup) == [groups[0]]
    assert check_groups(groups, lbv.NeuronGroup) == list(groups)
    assert check_groups((g for g in groups), lbv.NeuronGroup) == list(groups)  # a generator is read once
    assert check_groups([], lbv.NeuronGroup) == []
    for bad, got in ((net, "got Sequential"), ("0", "got str"), (torch.ones(2), "got Tensor"), (3, "got int")):
        with pytest.raises(TypeError, match=r"`groups` must be a NeuronGroup or an iterable of them .*" + got):
            check_groups(bad, lbv.NeuronGroup)
    with pytest.raises(TypeError, match=r"got an iterable holding a str"):
        check_groups([groups[0], "2"], lbv.NeuronGroup)


def test_check_int_and_check_nonnegative_return_the_plain_type():
    assert check_int("n", 3, 1) == 3
    assert type(check_int("n", torch.tensor(3).item(), 1)) is int
    with pytest.raises(ValueError, match=r"`n` must be an int >= 2 for classification, got 1"):
        check_int("n", 1, 2, " for classification")
    for bad in (True, 2.0, "2", 0):
        with pytest.raises(ValueError, match=r"`n` must be an int >= 1, got "):
            check_int("n", bad, 1)
    assert check_nonnegative("lr", 1) == 1.0
    assert type(check_nonnegative("lr", 1)) is float
    for bad in (-1e-9, float("inf"), float("nan"), True, "1", None):
        with pytest.raises(ValueError, match=r"`lr` must be a finite float >= 0, got "):
            check_nonnegative("lr", bad)
    with pytest.raises(ValueError, match=r"`tol` must be a finite float >= 0 \(neurons with score <= tol are removed"):
        check_tol(-1)


def test_check_tau_gives_every_group_its_threshold():
    sizes = [("a", 2), ("b", 3)]
    assert check_tau(0.5, sizes) == {"a": 0.5, "b": 0.5}
    per = torch.tensor([0.1, 0.2, 0.3])
    taus = check_tau({"a": 1, "b": per, "c": 7}, sizes)
    assert list(taus) == ["a", "b"]
    assert taus["a"] == 1
    assert taus["b"] is per
    with pytest.raises(ValueError, match=r"`tau` has no value for group\(s\) \['b'\]; it has \['a'\]"):
        check_tau({"a": 1.0}, sizes)
    with pytest.raises(TypeError, match=r"shape \[2\] \(one per neuron\), got Tensor of shape \(3,\).*\(group 'a'\)"):
        check_tau({"a": per, "b": per}, sizes)
