import torch
from helpers import MLPModule
from torch import nn

import lightning_bv as lbv
from lightning_bv import cli


def test_snapshot_counts_neurons_ranks_params_and_norms():
    torch.manual_seed(0)
    net = lbv.RBVNet(in_features=4, out_features=2, width=8, bottleneck=3, depth=2)
    lbv.apply_low_rank(net, rank=2, targets=["blocks.0.fc1"])
    net = lbv.add_skip(net, [""])  # a skip around the whole network: names keep their canonical form
    with torch.no_grad():
        net.module.blocks[1].fc2.weight[:, :3] = 0  # three dead neurons in the second block
    x = torch.randn(5, 4)
    snap = cli.snapshot(net, x, {"acc": 0.5})
    assert snap.groups == {"blocks.0.fc1": [8, 8], "blocks.1.fc1": [8, 5]}
    assert (snap.neurons, snap.live) == (16, 13)
    assert snap.ranks["blocks.0.fc1"] == [2, 2]
    assert snap.low_rank == ["blocks.0.fc1"]
    assert snap.ranks["blocks.1.fc1"] == [3, 3]  # dense: min(out, in)
    assert snap.params == sum(p.numel() for p in net.parameters())
    assert snap.path_norm_l1 == float(lbv.path_norm(net, x, p=1).detach())
    assert snap.path_norm_l2 is not None
    text = cli.table({"initial": None, "trained": snap, "compacted": snap})
    assert "test acc" in text
    assert "13 live / 16" in text
    assert "  blocks.1.fc1" in text
    assert "2 (dense)" not in text


def test_snapshot_without_an_example_and_with_an_unsupported_model():
    snap = cli.snapshot(nn.Linear(3, 2), None)
    assert snap.groups == {}
    assert snap.ranks == {"": [2, 2]}
    net = nn.Sequential(nn.Linear(3, 4), nn.GELU(), nn.Linear(4, 1))
    snap = cli.snapshot(net, torch.randn(2, 3))
    assert snap.path_norm_l1 is None  # GELU: path_norm refuses, the rest is measured
    assert "l1 path-norm" in cli.table({"compacted": snap})


def test_small_batch():
    assert cli.small_batch(torch.zeros(5, 3)).shape == (2, 3)
    a, b = cli.small_batch((torch.zeros(5, 3), 7))
    assert a.shape == (2, 3)
    assert b == 7


def test_canonical_names_leave_out_the_skip_wrappers_module_level():
    net = lbv.add_skip(nn.Sequential(nn.Linear(2, 3), nn.ReLU(), nn.Linear(3, 1)), ["0"])
    names = cli.canonical_names(net)
    assert names[id(net[0].module)] == "0"
    assert names[id(net[2])] == "2"
    assert names[id(net)] == ""


def test_example_input_and_metric_without_a_trainer():
    module = MLPModule()
    assert cli.example_input(module) is None
    module.example_input_array = torch.zeros(3, 4)
    assert cli.example_input(module) is module.example_input_array
    data = type("Data", (), {"example_input_array": (torch.zeros(2, 4),)})()
    assert isinstance(cli.example_input(MLPModule(), data), tuple)
    assert cli.metric_on_test_split(module, data) == {}  # MLPModule has no `evaluate`, data no test_dataloader
