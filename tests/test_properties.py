"""Property-based tests over random architectures built from the supported layers.

A drawn architecture is an optional convolutional trunk (Conv2d with or without BatchNorm, max or average pooling,
a concatenation of two branches, a residual block) flattened into an MLP (Linear with or without BatchNorm, a
concatenation of two branches, a residual block) and a last Linear; every activation is a ReLU, LeakyReLU or PReLU
(one slope, or one per neuron), or absent. Properties, in float64 and eval mode:

* ``find_neurons`` never crashes, and every activation is either in a group or in ``skipped`` with a reason;
* ``balance_``, ``prox_(tau=0)``, ``add_skip``, ``apply_low_rank`` at full rank, ``factorize`` and ``compact(tol=0)``
  (after killing some neurons) never change the function (1e-6 relative).
"""

from __future__ import annotations

import re
from typing import Any

import pytest
import torch
from torch import nn

import lightning_bv as lbv

hypothesis = pytest.importorskip("hypothesis")
st = pytest.importorskip("hypothesis.strategies")
given, settings, HealthCheck = hypothesis.given, hypothesis.settings, hypothesis.HealthCheck

SETTINGS = settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])
ACTS = ("relu", "leaky_relu", "prelu", "prelu_per_neuron", None)
ACT_TYPES = (nn.ReLU, nn.LeakyReLU, nn.PReLU)


def activation(kind: str | None, width: int) -> nn.Module | None:
    if kind == "relu":
        return nn.ReLU()
    if kind == "leaky_relu":
        return nn.LeakyReLU(0.1)
    if kind == "prelu":
        return nn.PReLU()
    if kind == "prelu_per_neuron":
        return nn.PReLU(width)
    return None


def seq(*mods: nn.Module | None) -> nn.Sequential:
    return nn.Sequential(*(m for m in mods if m is not None))


class Concat(nn.Module):
    def __init__(self, a: nn.Module, b: nn.Module, dim: int) -> None:
        super().__init__()
        self.a, self.b, self.dim = a, b, dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.a(x), self.b(x)], dim=self.dim)


class Residual(nn.Module):
    def __init__(self, body: nn.Module) -> None:
        super().__init__()
        self.body = body

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x)


@st.composite
def architectures(draw: Any) -> tuple[nn.Module, torch.Tensor]:
    """A random model of the supported layers and an input batch for it (float64, eval mode, random BN statistics)."""
    seed = draw(st.integers(0, 2**16))
    torch.manual_seed(seed)
    widths = st.integers(2, 5)
    layers: list[nn.Module] = []
    conv = draw(st.booleans())
    if conv:
        c, side = draw(st.integers(1, 3)), 4
        x = torch.randn(3, c, side, side)
        for kind in draw(st.lists(st.sampled_from(["conv", "pool", "concat", "residual"]), max_size=3)):
            if kind == "pool" and side >= 2:
                layers.append(draw(st.sampled_from([nn.MaxPool2d(2), nn.AvgPool2d(2)])))
                side //= 2
            elif kind == "concat":
                w1, w2 = draw(widths), draw(widths)
                a = seq(nn.Conv2d(c, w1, 3, padding=1), activation(draw(st.sampled_from(ACTS)), w1))
                b = seq(nn.Conv2d(c, w2, 1), nn.BatchNorm2d(w2), activation(draw(st.sampled_from(ACTS)), w2))
                layers.append(Concat(a, b, dim=1))
                c = w1 + w2
            elif kind == "residual":
                w = draw(widths)
                act = activation(draw(st.sampled_from(ACTS)), w)
                layers.append(Residual(seq(nn.Conv2d(c, w, 3, padding=1), act, nn.Conv2d(w, c, 1))))
            else:
                w = draw(widths)
                bn = nn.BatchNorm2d(w) if draw(st.booleans()) else None
                act = activation(draw(st.sampled_from(ACTS)), w)
                layers += [m for m in (nn.Conv2d(c, w, 3, padding=1), bn, act) if m is not None]
                c = w
        layers.append(nn.Flatten())
        d = c * side * side
    else:
        d = draw(st.integers(1, 4))
        x = torch.randn(5, d)
    for kind in draw(st.lists(st.sampled_from(["linear", "concat", "residual"]), min_size=1, max_size=3)):
        if kind == "concat":
            w1, w2 = draw(widths), draw(widths)
            a = seq(nn.Linear(d, w1), activation(draw(st.sampled_from(ACTS)), w1))
            b = seq(nn.Linear(d, w2), nn.BatchNorm1d(w2), activation(draw(st.sampled_from(ACTS)), w2))
            layers.append(Concat(a, b, dim=1))
            d = w1 + w2
        elif kind == "residual":
            w = draw(widths)
            layers.append(Residual(seq(nn.Linear(d, w), activation(draw(st.sampled_from(ACTS)), w), nn.Linear(w, d))))
        else:
            w = draw(widths)
            bn = nn.BatchNorm1d(w) if draw(st.booleans()) else None
            layers += [m for m in (nn.Linear(d, w), bn, activation(draw(st.sampled_from(ACTS)), w)) if m is not None]
            d = w
    layers.append(nn.Linear(d, 2))
    model = nn.Sequential(*layers).double().eval()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(-1.5, 1.5)
                m.bias.uniform_(-0.5, 0.5)
            if isinstance(m, nn.PReLU):
                m.weight.uniform_(-0.5, 0.5)
    return model, x.double()


def output(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(x)


def assert_same_function(model: nn.Module, x: torch.Tensor, expected: torch.Tensor) -> None:
    got = output(model, x)
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6 * float(expected.abs().max()) + 1e-12)


def exact(names: list[str]) -> str:
    """A ``targets`` regex for exactly these names (a list would also match by suffix: "2" matches "7.b.2")."""
    return "|".join(re.escape(n) for n in names)


def layer_names(model: nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))]


@SETTINGS
@given(architectures())
def test_find_neurons_groups_or_skips_every_activation(arch):
    model, x = arch
    groups = lbv.find_neurons(model, x)
    activations = sum(isinstance(m, ACT_TYPES) for m in model.modules())
    assert len(groups) + len(groups.skipped) == activations, str(groups)
    assert all(isinstance(why, str) and why for _, why in groups.skipped)
    for g in groups:
        assert g.num_neurons >= 1
        assert g.consumers
        assert g.activation in ("relu", "leaky_relu", "prelu")
    assert "neuron group(s)" in str(groups)


@SETTINGS
@given(architectures(), st.sampled_from([1, 2]))
def test_balance_and_prox_at_zero_keep_the_function(arch, q):
    model, x = arch
    expected = output(model, x)
    groups = lbv.find_neurons(model, x)
    lbv.balance_(groups, q=q)
    assert_same_function(model, x, expected)
    lbv.prox_(groups, 0.0, q=q)
    assert_same_function(model, x, expected)


@SETTINGS
@given(architectures(), st.data())
def test_add_skip_keeps_the_function(arch, data):
    model, x = arch
    expected = output(model, x)
    targets = data.draw(st.lists(st.sampled_from(layer_names(model)), min_size=1, unique=True))
    model = lbv.add_skip(model, exact(targets))
    assert sum(lbv.is_skip(m) for m in model.modules()) == len(targets)
    assert_same_function(model, x, expected)


@SETTINGS
@given(architectures())
def test_full_rank_low_rank_and_factorize_keep_the_function(arch):
    model, x = arch
    expected = output(model, x)
    for name in layer_names(model):
        weight = model.get_submodule(name).weight
        lbv.apply_low_rank(model, rank=min(weight.shape[0], weight[0].numel()), targets=exact([name]))
    assert all(lbv.is_low_rank(model.get_submodule(n)) for n in layer_names(model))
    assert_same_function(model, x, expected)
    model = lbv.factorize(model)
    assert not any(lbv.is_low_rank(m) for m in model.modules())
    assert_same_function(model, x, expected)


@SETTINGS
@given(architectures(), st.data())
def test_compact_at_zero_tol_keeps_the_function(arch, data):
    model, x = arch
    groups = lbv.find_neurons(model, x)
    for g in groups:  # kill some neurons: zero their output weights
        dead = torch.tensor(data.draw(st.lists(st.booleans(), min_size=g.num_neurons, max_size=g.num_neurons)))
        for s in g.v_slots:
            s.scale_((~dead).double())
    expected = output(model, x)
    before = sum(p.numel() for p in model.parameters())
    report = lbv.compact(model, groups, tol=0.0)
    groups = report.neuron_groups  # new groups for the compacted model
    assert_same_function(model, x, expected)
    assert sum(p.numel() for p in model.parameters()) == report.params_after <= before
    assert [g.num_neurons for g in groups] == [r.after for r in report.groups]
    assert_same_function(model, x, expected)
    # the new groups have the new sizes: found again, they agree
    again = lbv.find_neurons(model, x)
    assert [(g.name, g.num_neurons) for g in again] == [(g.name, g.num_neurons) for g in groups]
