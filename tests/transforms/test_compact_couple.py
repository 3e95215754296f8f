"""grouped and depthwise convolutions: channels removed together, as many in every group."""

import torch
from compact_models import DepthwiseBlock, Grouped, GroupedConsumer, compact_and_check, trained_stats
from torch import nn

import lightning_bv as lbv
from lightning_bv.transforms.compact import slice_optimizer_state_


def test_grouped_producer_loses_as_many_channels_in_every_group():
    model = Grouped()  # g: Conv2d(4, 8, groups=2), 4 output channels per group
    report, _ = compact_and_check(model, torch.randn(2, 4, 5, 5), {"g": [1]})
    row = report.groups[0]
    assert (row.name, row.after, row.kept) == ("g", 8, 1)
    assert "so that every group of the grouped convolution 'g' keeps as many channels" in row.note
    report, _ = compact_and_check(model, torch.randn(2, 4, 5, 5), {"g": [1, 6]})
    assert report.groups[0].after == 6
    assert (model.g.groups, model.g.out_channels, tuple(model.g.weight.shape)) == (2, 6, (6, 2, 3, 3))


def test_grouped_consumer_keeps_other_input_channels_in_each_group():
    model = GroupedConsumer()
    x = torch.randn(2, 3, 5, 5)
    groups = lbv.find_neurons(model, x)
    slot = groups["a"].v_slots[0]
    assert (type(slot).__name__, slot.groups) == ("GroupedSlot", 2)
    # neuron k's output weights are the slice of b that reads channel k
    w = model.b.weight.detach()
    norms = torch.cat([w[:3, :].pow(2).sum((0, 2, 3)), w[3:, :].pow(2).sum((0, 2, 3))])
    assert torch.allclose(slot.reduce(model.b.weight), norms)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(x).sum().backward()
    opt.step()
    momentum = opt.state[model.b.weight]["momentum_buffer"].clone()
    report, _ = compact_and_check(model, x, {"a": [1, 6]})  # column 1 of group 0, column 2 of group 1
    assert report.groups[0].after == 6
    assert (model.b.in_channels, model.b.groups, tuple(model.b.weight.shape)) == (6, 2, (6, 3, 3, 3))
    assert torch.equal(model.b.weight[:3], w[:3, [0, 2, 3]])
    assert torch.equal(model.b.weight[3:], w[3:, [0, 1, 3]])
    slice_optimizer_state_(opt, report.param_map)
    kept = opt.state[model.b.weight]["momentum_buffer"]
    assert torch.equal(kept[:3], momentum[:3, [0, 2, 3]])
    assert torch.equal(kept[3:], momentum[3:, [0, 1, 3]])


def test_depthwise_couples_its_input_channel_to_its_output_channels():
    x = torch.randn(2, 3, 6, 6)
    model = trained_stats(DepthwiseBlock(), x)
    # channel 2 dies downstream (both dw outputs 4, 5 unread): removed through pw1, bn1, dw, bn2 and pw2
    # channel 4 dies upstream only (its dw filter is 0): its dw outputs still feed pw2 with a constant, so it stays
    report, _ = compact_and_check(model, x, {"pw1": [4], "dw": [4, 5]})
    rows = {r.name: r for r in report.groups}
    assert (rows["pw1"].after, rows["dw"].after) == (5, 10)
    assert "through the depthwise convolution 'dw'" in rows["pw1"].note
    assert (model.dw.groups, model.dw.in_channels, model.dw.out_channels) == (5, 5, 10)
    assert (model.bn1.num_features, model.bn2.num_features, model.pw2.in_channels) == (5, 10, 10)


def test_depthwise_without_a_group_after_it_is_kept():
    x = torch.randn(2, 3, 6, 6)
    model = trained_stats(DepthwiseBlock(act=False), x)
    report, _ = compact_and_check(model, x, {"pw1": [1, 2]})
    row = report.groups[0]
    assert (row.name, row.after, row.kept) == ("pw1", 6, 2)
    assert "through the depthwise convolution 'dw', whose output is not a neuron group" in row.note


def test_compact_keeps_channels_last():
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 4, 3))
    model = model.to(memory_format=torch.channels_last)
    x = torch.randn(2, 3, 8, 8).to(memory_format=torch.channels_last)
    compact_and_check(model, x, {"0": [1, 2]})
    assert model[0].weight.shape[0] == 6
    assert all(m.weight.is_contiguous(memory_format=torch.channels_last) for m in (model[0], model[3]))
    assert model(x).is_contiguous(memory_format=torch.channels_last)
