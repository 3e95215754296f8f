"""compact on architectures: shapes, the same function, reports, low-rank components, tol."""

import copy

import pytest
import torch
from compact_models import (
    Concat,
    ResidualMLP,
    TinyResNet,
    assert_groups_equal,
    assert_same_function,
    cnn,
    compact_and_check,
    kill,
    mlp,
    param_count,
    summary,
    warm_batchnorm,
)
from torch import nn

import lightning_bv as lbv
from lightning_bv.transforms.compact import CompactionReport, compact
from lightning_bv.transforms.low_rank import LowRankWeight, apply_low_rank, is_low_rank, low_rank_factors


def test_mlp_shapes_report_and_reload():
    model = mlp()
    x = torch.randn(16, 5)
    with torch.no_grad():
        model[2].weight[5].zero_()  # group "2", neuron 5: w = 0 and relu(bias) = 0: its output is 0
        model[2].bias[5] = -1.0
        model[2].weight[6].zero_()  # neuron 6: w = 0 but relu(bias) > 0: a constant that still counts
        model[2].bias[6] = 0.5
    before = param_count(model)
    report, groups = compact_and_check(model, x, {"0": [1, 4, 7], "2": [0, 3]})
    assert [tuple(m.weight.shape) for m in model[::2]] == [(9, 5), (7, 9), (3, 7)]
    assert (model[0].out_features, model[2].in_features, model[2].out_features, model[4].in_features) == (9, 9, 7, 7)
    assert isinstance(report, CompactionReport)
    rows = {r.name: r for r in report.groups}
    assert (rows["0"].before, rows["0"].after, rows["2"].before, rows["2"].after) == (12, 9, 10, 7)
    assert rows["2"].kept == 1
    assert "1 with zero input weights but a nonzero output" in rows["2"].note
    assert rows["0"].removed_score == 0.0
    assert (report.params_before, report.params_after) == (before, param_count(model))
    assert report.params_after == 9 * 5 + 9 + 7 * 9 + 7 + 3 * 7 + 3
    text = str(report)
    assert "neurons 22 -> 16" in text
    assert f"parameters {before:,} -> {report.params_after:,}" in text
    assert "12 -> 9" in text
    # the new groups have the new sizes, and discovery on the new model agrees
    assert summary(groups) == {"0": 9, "2": 7}
    assert_groups_equal(groups, lbv.find_neurons(model, x))
    # the state_dict loads into a model built at the new sizes
    fresh = nn.Sequential(nn.Linear(5, 9), nn.ReLU(), nn.Linear(9, 7), nn.ReLU(), nn.Linear(7, 3))
    fresh.load_state_dict(model.state_dict())
    assert_same_function(fresh, model, [x])


def test_parameters_are_new_and_keep_dtype_device_requires_grad():
    model = mlp().double()
    model[0].bias.requires_grad_(False)
    old = dict(model.named_parameters())
    x = torch.randn(4, 5, dtype=torch.float64)
    report, _ = compact_and_check(model, x, {"0": [2]})
    new = dict(model.named_parameters())
    for name in ("0.weight", "0.bias", "2.weight"):
        assert new[name] is not old[name]
        assert isinstance(new[name], nn.Parameter)
        assert new[name].dtype == torch.float64
        assert report.param_map[old[name]][0] is new[name]
    assert new["2.bias"] is old["2.bias"]  # not shrunk, not replaced
    assert not new["0.bias"].requires_grad
    assert new["0.weight"].requires_grad
    keep = report.param_map[old["0.weight"]][1]
    assert torch.equal(keep[0], torch.tensor([0, 1, 3, 4, 5, 6, 7, 8, 9, 10, 11]))
    assert keep[1] is None


def test_cnn_batchnorm_flatten_prelu():
    model = cnn()
    x = torch.randn(8, 1, 8, 8)
    warm_batchnorm(model, x)
    with torch.no_grad():
        model[1].weight[3] = 0.0  # channel 3: gamma = 0 and beta < 0: relu(beta) = 0
        model[1].bias[3] = -0.2
    running = model[1].running_mean.clone()
    report, groups = compact_and_check(model, x, {"0": [1], "6": [2]})
    assert tuple(model[0].weight.shape) == (2, 1, 3, 3)
    assert model[0].out_channels == 2
    assert model[1].num_features == 2
    assert torch.equal(model[1].running_mean, running[[0, 2]])
    assert tuple(model[1].running_var.shape) == (2,)
    # channel k owned columns 9k..9k+8 after the flatten: channels 0 and 2 remain
    assert (model[6].in_features, model[6].out_features) == (18, 4)
    assert model[7].num_parameters == 4
    assert model[7].weight.shape == (4,)
    assert (model[8].in_features, tuple(model[8].weight.shape)) == (4, (2, 4))
    assert summary(groups) == {"0": 2, "6": 4}
    assert_groups_equal(groups, lbv.find_neurons(model, x))
    assert report.neurons_after == 6


def test_residual_block_with_two_batchnorms():
    model = TinyResNet()
    x = torch.randn(4, 3, 8, 8)
    warm_batchnorm(model, x)
    both = "block.conv2+block.downsample.0"
    report, groups = compact_and_check(model, x, {"block.conv1": [0, 2], both: [1, 4]})
    b = model.block
    assert tuple(b.conv1.weight.shape) == (4, 3, 3, 3)
    assert b.bn1.num_features == 4
    assert tuple(b.conv2.weight.shape) == (4, 4, 3, 3)
    assert (b.conv2.in_channels, b.conv2.out_channels) == (4, 4)
    assert b.bn2.num_features == 4
    assert tuple(b.bn2.running_var.shape) == (4,)
    assert tuple(b.downsample[0].weight.shape) == (4, 3, 1, 1)
    assert b.downsample[1].num_features == 4
    assert tuple(model.fc.weight.shape) == (2, 4)
    assert_groups_equal(groups, lbv.find_neurons(model, x))
    assert [r.after for r in report.groups] == [4, 4]


def test_residual_mlp():
    model = ResidualMLP()
    x = torch.randn(8, 3)
    compact_and_check(model, x, {"fc1": [0, 1, 2], "fc3": [9]})
    assert (model.fc1.out_features, model.fc2.in_features, model.fc3.out_features, model.fc4.in_features) == (
        7,
        7,
        9,
        9,
    )


def test_concat_branches_and_two_consumers():
    model = Concat()
    x = torch.randn(8, 3)
    report, groups = compact_and_check(model, x, {"right": [1, 3], "left": [0]})
    assert (model.left.out_features, model.right.out_features) == (3, 3)
    assert (model.head.in_features, model.aux.in_features) == (6, 3)
    assert_groups_equal(groups, lbv.find_neurons(model, x))
    head = next(s for s in groups["right"].v_slots if s.module_name == "head")
    assert torch.equal(head.index.flatten(), torch.tensor([3, 4, 5]))


def test_rbvnet_with_prox():
    torch.manual_seed(0)
    model = lbv.RBVNet(3, 2, width=16, bottleneck=4, depth=3)
    with torch.no_grad():
        for block in model.blocks:
            block.skip.weight.normal_()
    x = torch.randn(32, 3)
    groups = lbv.find_neurons(model, x)
    scores = lbv.neuron_scores(groups)
    taus = {name: float(s.detach().median()) for name, s in scores.items()}
    lbv.prox_(groups, taus)
    dead = {g.name: int((lbv.neuron_scores(g)[g.name] == 0).sum()) for g in groups}
    assert all(0 < d < 16 for d in dead.values())
    reference = copy.deepcopy(model)
    report = compact(model, groups)
    assert_same_function(model, reference, [x, torch.randn(64, 3)])
    for block, g in zip(model.blocks, groups):
        assert block.fc1.out_features == block.fc2.in_features == 16 - dead[g.name]
        assert tuple(block.skip.weight.shape) == (block.fc2.out_features, block.fc1.in_features)  # skips untouched
    assert report.neurons_after == 48 - sum(dead.values())


def test_transformer_feed_forward_and_a_single_group():
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.1, batch_first=True)
    model = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False).eval()
    x = torch.randn(3, 5, 8)
    groups = lbv.find_neurons(model, x)
    kill(groups, {"layers.0.linear1": [0, 1, 2], "layers.1.linear1": [5]})
    reference = copy.deepcopy(model)
    report = compact(model, groups["layers.0.linear1"])  # one group; the other stays as it is
    assert_same_function(model, reference, [x, torch.randn(2, 7, 8)])
    assert [r.name for r in report.groups] == ["layers.0.linear1"]
    assert (model.layers[0].linear1.out_features, model.layers[0].linear2.in_features) == (13, 13)
    assert model.layers[1].linear1.out_features == 16


@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_low_rank_components_and_neurons(kind):
    torch.manual_seed(0)
    if kind == "linear":
        model = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 12), nn.ReLU(), nn.Linear(12, 3))
        x = torch.randn(8, 6)
    else:
        model = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 6, 3), nn.ReLU(), nn.Flatten(), nn.Linear(24, 2)
        )
        x = torch.randn(4, 3, 4, 4)
    apply_low_rank(model, rank=4, targets=["0", "2"])
    groups = lbv.find_neurons(model, x)
    # '2' sits between two groups: they own its factors (V's columns, U's rows) and it has no rank group; '0' reads
    # the data, so its components keep theirs
    assert groups.names == ["0", "2", "0:rank"]
    assert [s.factor for s in groups["0"].v_slots] == [True]
    assert [s.factor for s in groups["2"].w_slots] == [True]
    kill(groups, {"0": [0, 5], "0:rank": [3], "2": [1]})
    reference = copy.deepcopy(model)
    groups = compact(model, groups).neuron_groups
    assert_same_function(model, reference, [x, torch.randn_like(x)])
    assert is_low_rank(model[0])
    assert is_low_rank(model[2])
    u0, v0 = low_rank_factors(model[0])
    u2, v2 = low_rank_factors(model[2])
    assert (u0.shape[1], v0.shape[0]) == (3, 3)
    assert (u2.shape[1], v2.shape[0]) == (4, 4)  # an explicit low-rank layer keeps its rank
    width = 14 if kind == "linear" else 6
    assert u0.shape[0] == width
    assert model[0].weight.shape[0] == width
    assert model[2].weight.shape[1] == width
    assert u2.shape[0] == (11 if kind == "linear" else 5)
    lrw = next(p for p in model[2].parametrizations["weight"] if isinstance(p, LowRankWeight))
    assert lrw.rank == 4
    assert lrw.weight_shape == tuple(model[2].weight.shape)
    assert_groups_equal(groups, lbv.find_neurons(model, x))
    # loads into a freshly built model of the new sizes (apply_low_rank's load hook takes the saved rank)
    if kind == "linear":
        fresh = nn.Sequential(nn.Linear(6, 14), nn.ReLU(), nn.Linear(14, 11), nn.ReLU(), nn.Linear(11, 3))
    else:
        fresh = nn.Sequential(
            nn.Conv2d(3, 6, 3, padding=1), nn.ReLU(), nn.Conv2d(6, 5, 3), nn.ReLU(), nn.Flatten(), nn.Linear(20, 2)
        )
    apply_low_rank(fresh, rank=1, targets=["0", "2"])
    fresh.load_state_dict(model.state_dict())
    assert_same_function(fresh, model, [x])


def test_skip_connection_reader_is_kept_and_reported():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 1))
    model = lbv.add_skip(model, ["2"])
    with torch.no_grad():
        model[2].skip.weight[:, 2].normal_()  # the (unregularized) skip reads neuron 2 of group "0"
    x = torch.randn(8, 3)
    report, groups = compact_and_check(model, x, {"0": [1, 2, 3]})
    row = report.groups[0]
    assert (row.name, row.before, row.after, row.kept) == ("0", 8, 6, 1)
    assert row.note == "kept 1 read by a skip connection"
    assert model[2].module.in_features == model[2].skip.in_features == 6
    assert "read by a skip connection" in str(report)


def test_positive_tol_reports_removed_score():
    model = mlp()
    x = torch.randn(8, 5)
    groups = lbv.find_neurons(model, x)
    scores = lbv.neuron_scores(groups)
    low = min(scores.values(), key=lambda s: float(s.median())).sort().values
    mid = (low.numel() - 1) // 2
    tol = float(low[mid] + low[mid + 1]) / 2  # between two scores, not on one: compact scores in float64
    expected = {n: float(s[s <= tol].sum()) for n, s in scores.items()}
    counts = {n: int((s > tol).sum()) for n, s in scores.items()}
    # in a chain the removals of group "0" do not change the scores of group "2": both are computed first
    report = compact(model, groups, tol=tol)
    for row in report.groups:
        assert row.after == counts[row.name]
        assert row.removed_score == pytest.approx(expected[row.name], rel=1e-6)
        assert row.removed_score > 0
    assert report.removed_score == pytest.approx(sum(expected.values()), rel=1e-6)
    assert f"tol={tol:g}" in str(report)


def test_all_dead_keeps_one_neuron():
    model = mlp()
    x = torch.randn(8, 5)
    report, groups = compact_and_check(model, x, {"0": list(range(12))})
    assert model[0].out_features == 1
    assert report.groups[0].after == 1
    assert "1 so that the layer keeps a neuron" in report.groups[0].note


def test_nothing_dead_changes_nothing():
    model = mlp()
    params = [id(p) for p in model.parameters()]
    report = compact(model, example_input=torch.randn(2, 5))
    assert [id(p) for p in model.parameters()] == params
    assert report.param_map == {}
    assert report.params_before == report.params_after
    assert report.neuron_groups.names == ["0", "2"]
