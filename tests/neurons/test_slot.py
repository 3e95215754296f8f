"""Slots (lightning_bv/neurons/slot.py): reading and writing the entries of each neuron in place."""

import pytest
import torch
from torch import nn

from lightning_bv import apply_low_rank
from lightning_bv.neurons import GroupedSlot, Slot, is_conv1d


def test_rows_are_read_reduced_and_scaled_in_place():
    layer = nn.Linear(3, 4)
    w = layer.weight.detach().clone()
    slot = Slot(layer, "fc", "weight", 0)
    assert torch.allclose(slot.reduce(slot.tensor().detach()), (w * w).sum(1))
    assert torch.allclose(slot.reduce(slot.tensor().detach(), "abs"), w.abs().sum(1))
    assert torch.equal(slot.entries(slot.tensor()), w)
    assert torch.equal(slot.entries_per_neuron(w.shape), torch.full((4,), 3.0))
    assert slot.covers_all(4)
    assert not slot.covers_all(3)
    s = torch.tensor([1.0, 2.0, 0.0, -1.0])
    slot.scale_(s)
    assert torch.equal(layer.weight.detach(), w * s[:, None])
    assert repr(slot) == "Slot(fc.weight, dim=0, regularized=True)"


def test_columns_owned_through_an_index():
    layer = nn.Linear(6, 2)
    w = layer.weight.detach().clone()
    index = torch.arange(6).reshape(3, 2)  # neuron k owns input columns 2k and 2k+1
    slot = Slot(layer, "head", "weight", 1, index)
    per_column = (w * w).sum(0)
    assert torch.allclose(slot.reduce(w), per_column.reshape(3, 2).sum(1))
    assert torch.equal(slot.entries(w), w.T.reshape(3, 4))
    assert torch.equal(slot.entries_per_neuron(w.shape), torch.full((3,), 4.0))
    assert slot.covers_all(3)
    assert not Slot(layer, "head", "weight", 1, index[:2]).covers_all(2)
    s = torch.tensor([2.0, 0.0, 3.0])
    assert torch.equal(slot.broadcast(s, w), s.repeat_interleave(2).reshape(1, 6))
    slot.scale_(s)
    assert torch.equal(layer.weight.detach(), w * s.repeat_interleave(2))
    assert repr(slot) == "Slot(head.weight, dim=1, index=(3, 2), regularized=True)"


def test_soft_threshold_touches_only_the_owned_columns():
    layer = nn.Linear(3, 2, bias=False)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([[1.0, -2.0, 0.5], [-0.25, 3.0, -1.0]]))
    Slot(layer, "fc", "weight", 1, torch.tensor([[0], [1]])).soft_threshold_(0.5)
    assert torch.equal(layer.weight.detach(), torch.tensor([[0.5, -1.5, 0.5], [0.0, 2.5, -1.0]]))


@pytest.mark.parametrize("sign", [False, True])
def test_closed_form_gradient_is_added_per_neuron(sign):
    layer = nn.Linear(3, 2)
    w = layer.weight.detach().clone()
    coef = torch.tensor([0.5, 2.0])
    slot = Slot(layer, "fc", "weight", 0)
    slot.add_scaled_grad_(coef, sign=sign)
    slot.add_scaled_grad_(coef, sign=sign)  # accumulates
    e = w.sign() if sign else w
    assert torch.allclose(layer.weight.grad, 2 * coef[:, None] * e)


def test_half_precision_entries_are_summed_in_float32():
    layer = nn.Linear(4, 2).half()
    with torch.no_grad():
        layer.weight.fill_(300.0)  # 4 * 300^2 overflows float16
    r = Slot(layer, "fc", "weight", 0).reduce(layer.weight.detach())
    assert r.dtype == torch.float32
    assert torch.equal(r, torch.full((2,), 4 * 300.0**2))


def test_low_rank_weight_rows_scale_the_factor_u_and_factor_slots_read_u_and_v():
    layer = apply_low_rank(nn.Linear(5, 4), rank=2)
    u, v = layer.parametrizations.weight.original0, layer.parametrizations.weight.original1
    before = layer.weight.detach().clone()
    rows = Slot(layer, "fc", "weight", 0)
    assert rows.written() is u
    assert Slot(layer, "fc", "weight", 1).written() is v
    assert not rows.covers_all(4)  # a product: its entries are not the neurons' own
    s = torch.tensor([1.0, 2.0, 3.0, 0.5])
    rows.scale_(s)
    assert torch.allclose(layer.weight.detach(), before * s[:, None], atol=1e-6)
    assert rows.owning_factor().tensor() is u
    assert torch.equal(Slot(layer, "fc", "weight", 1, factor=True).tensor(), v.view(2, 5))
    assert not rows.owning_factor().owning_product().factor


def test_grouped_slot_owns_the_filters_of_each_input_channel():
    conv = nn.Conv2d(4, 8, 3, groups=4)  # two filters read each input channel
    w = conv.weight.detach().clone()
    slot = GroupedSlot(conv, "dw", groups=4)
    assert torch.allclose(slot.reduce(w), (w * w).reshape(4, 2, 1, 9).sum((1, 2, 3)))
    assert torch.equal(slot.entries(w), w.reshape(4, 2, 9).reshape(4, 18))
    assert slot.covers_all(4)
    s = torch.tensor([1.0, 0.0, 2.0, 3.0])
    slot.scale_(s)
    assert torch.equal(conv.weight.detach(), w * s.repeat_interleave(2)[:, None, None, None])
    assert repr(slot) == "Slot(dw.weight, dim=1, regularized=True, groups=4)"


def test_is_conv1d_recognizes_the_hugging_face_layer_by_its_shape_attributes():
    class Conv1D(nn.Module):  # transformers.pytorch_utils.Conv1D: weight [in, out]
        def __init__(self, nf, nx):
            super().__init__()
            self.nf = nf
            self.weight = nn.Parameter(torch.zeros(nx, nf))

    assert is_conv1d(Conv1D(3, 2))
    assert not is_conv1d(nn.Linear(2, 3))
    assert not is_conv1d(nn.Conv1d(2, 3, 1))
