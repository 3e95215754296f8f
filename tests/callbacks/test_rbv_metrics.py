import pytest
import torch
from torch import nn

import lightning_bv as lbv
from lightning_bv.callbacks._rbv_metrics import PROGRESS_BAR, rbv_metrics


def test_norm_and_live_neurons_of_relu_groups():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 6), nn.ReLU(), nn.Linear(6, 4), nn.ReLU(), nn.Linear(4, 1))
    with torch.no_grad():
        model[0].weight[:2] = 0.0  # two dead neurons of the first group
    groups = lbv.find_neurons(model, torch.randn(2, 3))
    scores = torch.cat(list(lbv.neuron_scores(groups).values()))
    values = rbv_metrics(groups)
    assert list(values) == ["bv/rbv_norm", "bv/active_neurons", "bv/active_fraction"]
    assert values["bv/rbv_norm"] == pytest.approx(lbv.rbv_norm(groups).item(), rel=1e-6)
    assert values["bv/rbv_norm"] == pytest.approx(scores.sum().item(), rel=1e-6)
    assert values["bv/active_neurons"] == 8.0
    assert values["bv/active_fraction"] == pytest.approx(8 / 10)
    assert set(PROGRESS_BAR) <= set(values)
    assert rbv_metrics(groups, q=1)["bv/rbv_norm"] == pytest.approx(lbv.rbv_norm(groups, q=1).item(), rel=1e-6)


def test_rank_components_are_counted_apart():
    torch.manual_seed(0)
    model = lbv.apply_low_rank(nn.Sequential(nn.Linear(3, 6), nn.ReLU(), nn.Linear(6, 1)), rank=2, targets=["0"])
    groups = lbv.find_neurons(model, torch.randn(2, 3))
    assert sorted(g.name for g in groups if g.activation == "identity") == ["0:rank"]
    values = rbv_metrics(groups)
    assert values["bv/active_rank_components"] == 2.0
    assert values["bv/active_neurons"] == 6.0
    assert values["bv/active_fraction"] == 1.0
