import copy
import math
import re
import socket

import models
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lightning_bv as lbv
from lightning_bv.transforms.compact import CompactionReport, compact, slice_optimizer_state_
from lightning_bv.transforms.low_rank import LowRankWeight, apply_low_rank, is_low_rank, low_rank_factors


# ---------------------------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------------------------
def kill(groups, which, regularized_only=True):
    """Zero the output weights v_k of the listed neurons: {group name: [k, ...]}."""
    for name, ks in which.items():
        g = groups[name]
        factor = torch.ones(g.num_neurons)
        factor[ks] = 0.0
        for s in g.v_slots:
            if s.regularized or not regularized_only:
                s.scale_(factor)


def assert_same_function(model, reference, inputs):
    """Equal up to rounding: compaction drops exact zeros, but the sums run in another order and length.

    The tolerance is relative to the output's scale: a few units in the last place of the largest output (16 eps
    of the dtype times max |y|), which is what float32 accumulation over a few layers leaves; an absolute 1e-6
    failed for outputs of size ~40 (a difference of 3.8e-6: one float32 ulp at 42.5).
    """
    model.eval()
    reference.eval()
    with torch.no_grad():
        for x in inputs:
            want = reference(x)
            diff = (model(x) - want).abs().max().item()
            tol = 16 * torch.finfo(want.dtype).eps * max(want.abs().max().item(), 1.0)
            assert diff <= tol, (diff, tol)


def compact_and_check(model, x, which, tol=0.0, regularized_only=True):
    """Kill neurons, compact with tol, check the function on fresh inputs; return the report and its new groups.

    The groups passed to compact are left as they were.
    """
    model.eval()
    groups = lbv.find_neurons(model, x)
    kill(groups, which, regularized_only)
    reference = copy.deepcopy(model)
    before = layout(groups)
    report = compact(model, groups, tol=tol)
    assert layout(groups) == before
    g = torch.Generator().manual_seed(1)
    fresh = [torch.randn(x.shape, generator=g, dtype=x.dtype), 3 * torch.randn(x.shape, generator=g, dtype=x.dtype)]
    assert_same_function(model, reference, [x, *fresh])
    return report, report.neuron_groups


def layout(groups):
    """Everything a group says about where its neurons are: counts, slot objects, indices, conv groups."""
    return [
        (
            g.name,
            g.num_neurons,
            [
                (id(s), s.module_name, s.param, s.dim, s.factor, getattr(s, "groups", None))
                + (None if s.index is None else (id(s.index), s.index.tolist()),)
                for s in g.slots()
            ],
        )
        for g in groups
    ]


def summary(groups):
    return {g.name: g.num_neurons for g in groups}


def assert_groups_equal(updated, found):
    """The groups compaction made (or updated) are the ones discovery finds on the compacted model."""
    assert [g.name for g in updated] == [g.name for g in found]
    for a, b in zip(updated, found):
        assert a.num_neurons == b.num_neurons, a.name
        for sa, sb in zip(a.slots(), b.slots()):
            assert (sa.module_name, sa.param, sa.dim) == (sb.module_name, sb.param, sb.dim)
            assert (sa.index is None) == (sb.index is None), (a.name, sa)
            if sa.index is not None:
                assert torch.equal(sa.index, sb.index), (a.name, sa)


def param_count(model):
    return sum(p.numel() for p in model.parameters())


def warm_batchnorm(model, x):
    """A few train-mode passes so running statistics are not the defaults."""
    model.train()
    with torch.no_grad():
        for _ in range(3):
            model(x + 0.5 * torch.randn_like(x))
    model.eval()


# ---------------------------------------------------------------------------------------------------------------
# models
# ---------------------------------------------------------------------------------------------------------------
def mlp():
    return models.mlp([5, 12, 10, 3])


cnn = models.cnn_bn_prelu


class BasicBlock(nn.Module):
    """torchvision-style ResNet block with a downsample branch: the second group sums two conv+BN producers."""

    def __init__(self, cin=3, cout=6):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride=2, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride=2, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        identity = self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out += identity
        return self.relu(out)


class TinyResNet(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.block = BasicBlock()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(6, 2)

    def forward(self, x):
        return self.fc(torch.flatten(self.pool(self.block(x)), 1))


class ResidualMLP(nn.Module):
    def __init__(self, d=6, h=10):
        super().__init__()
        torch.manual_seed(0)
        self.inp = nn.Linear(3, d)
        self.fc1, self.fc2 = nn.Linear(d, h), nn.Linear(h, d)
        self.fc3, self.fc4 = nn.Linear(d, h), nn.Linear(h, d)
        self.out = nn.Linear(d, 1)

    def forward(self, x):
        x = self.inp(x)
        x = x + self.fc2(F.relu(self.fc1(x)))
        x = x + self.fc4(torch.relu(self.fc3(x)))
        return self.out(x)


class Concat(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.left = nn.Linear(3, 4)
        self.right = nn.Linear(3, 5)
        self.head = nn.Linear(9, 2)
        self.aux = nn.Linear(5, 2)

    def forward(self, x):
        r = F.relu(self.right(x))
        return self.head(torch.cat([F.relu(self.left(x)), r], dim=1)) + self.aux(r)


# ---------------------------------------------------------------------------------------------------------------
# tol = 0: the same function, exact shapes
# ---------------------------------------------------------------------------------------------------------------
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


# ---------------------------------------------------------------------------------------------------------------
# tol > 0, edge cases
# ---------------------------------------------------------------------------------------------------------------
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


class ScaledLinear(nn.Linear):
    """A Linear with one more per-output parameter (say, read by the loss) that compaction knows nothing about."""

    def __init__(self, *args):
        super().__init__(*args)
        self.scale = nn.Parameter(torch.ones(self.out_features))


class Tied(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.a, self.b, self.c = nn.Linear(4, 6), nn.Linear(6, 4), nn.Linear(4, 6)
        self.c.weight = self.a.weight  # tied
        self.d, self.e = nn.Linear(6, 5), nn.Linear(5, 1)

    def forward(self, x):
        h = F.relu(self.c(F.relu(self.b(F.relu(self.a(x))))))
        return self.e(F.relu(self.d(h)))


class Grouped(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.g = nn.Conv2d(4, 8, 3, padding=1, groups=2)
        self.c = nn.Conv2d(8, 6, 1)
        self.fc = nn.Linear(6, 2)

    def forward(self, x):
        h = F.relu(self.c(F.relu(self.g(x))))
        return self.fc(h.mean((2, 3)))


def scaled():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(4, 6), nn.ReLU(), ScaledLinear(6, 5), nn.ReLU(), nn.Linear(5, 7), nn.ReLU(), nn.Linear(7, 1)
    )


@pytest.mark.parametrize(
    ("make", "x", "which", "whole", "reason"),
    [
        (Tied, (3, 4), {"a": [1], "d": [2]}, "a", r"a parameter of 'a' is shared with \['c'\] \(tied weights\)"),
        (scaled, (3, 4), {"2": [3], "4": [1]}, "2", r"'2' \(ScaledLinear\) has tensors \['scale'\]"),
    ],
)
def test_unshrinkable_group_left_whole_others_shrunk(make, x, which, whole, reason):
    model = make()
    report, groups = compact_and_check(model, torch.randn(x), which)
    rows = {r.name: r for r in report.groups}
    assert not rows[whole].shrunk
    assert rows[whole].after == rows[whole].before
    assert rows[whole].note.startswith("left whole: ")
    assert re.search(reason, rows[whole].note), rows[whole].note
    others = [n for n in which if n != whole]
    assert all(rows[n].shrunk and rows[n].after == rows[n].before - len(which[n]) for n in others)
    assert "left whole" in str(report)


class Aliased(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = mlp()
        self.alias = self.net[2]  # the same module under a second name

    def forward(self, x):
        return self.net(x)


def test_module_registered_twice_is_left_whole():
    model = Aliased()
    report, _ = compact_and_check(model, torch.randn(3, 5), {"net.0": [0], "net.2": [1]})
    assert [(r.name, r.shrunk) for r in report.groups] == [("net.0", False), ("net.2", False)]
    assert "registered under several names ['net.2', 'alias']" in report.groups[0].note


def test_unknown_parametrization_raises_and_leaves_model_as_it_was():
    model = mlp()
    x = torch.randn(3, 5)
    groups = lbv.find_neurons(model, x)  # found first: discovery itself skips foreign parametrizations
    torch.nn.utils.parametrizations.weight_norm(model[2])
    assert len(lbv.find_neurons(model, x)) == 0
    with torch.no_grad():  # Slot.scale_ writes only plain and low-rank weights
        model[2].parametrizations.weight.original1[:, 1] = 0.0
    state = copy.deepcopy(model.state_dict())
    ids = [id(p) for p in model.parameters()]
    with pytest.raises(ValueError, match=r"Cannot compact '2': its `weight` is parametrized by \['_WeightNorm'\]"):
        compact(model, groups)
    assert [id(p) for p in model.parameters()] == ids
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())
    assert groups["0"].num_neurons == 12


@pytest.mark.parametrize("tol", [-1.0, float("nan"), float("inf"), "0", True])
def test_bad_tol(tol):
    with pytest.raises(ValueError, match=r"`tol` must be a finite float >= 0.*got"):
        compact(mlp(), example_input=torch.randn(2, 5), tol=tol)


def test_needs_groups_or_example_input():
    with pytest.raises(ValueError, match=r"pass `groups=lightning_bv.find_neurons\(model, x\)` or `example_input=x`"):
        compact(mlp())


def test_groups_of_another_model_or_stale_groups():
    model, other = mlp(), mlp()
    groups = lbv.find_neurons(other, torch.randn(2, 5))
    with pytest.raises(ValueError, match="not the one in `model`"):
        compact(model, groups)
    x = torch.randn(2, 5)
    first, second = lbv.find_neurons(model, x), lbv.find_neurons(model, x)
    kill(first, {"0": [3]})
    report = compact(model, first)
    with pytest.raises(ValueError, match="the groups are stale"):
        compact(model, second)
    assert_groups_equal(report.remap(second), report.neuron_groups)
    report.update_groups_(second)  # in place, as before
    assert_groups_equal(second, report.neuron_groups)
    compact(model, second)  # valid again


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ddp_wrapped_model_refused():
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    try:
        model = mlp()
        ddp = nn.parallel.DistributedDataParallel(model)
        with pytest.raises(TypeError, match=r"wrapped in DistributedDataParallel.*\(`ddp.module`\) before wrapping"):
            compact(ddp, example_input=torch.randn(2, 5))
        assert model[0].out_features == 12
    finally:
        dist.destroy_process_group()


# ---------------------------------------------------------------------------------------------------------------
# optimizer state
# ---------------------------------------------------------------------------------------------------------------
def batches(n, d=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(16, d, generator=g), torch.randn(16, 3, generator=g)) for _ in range(n)]


def train(model, opt, data):
    for x, y in data:
        opt.zero_grad()
        F.mse_loss(model(x), y).backward()
        opt.step()


@pytest.mark.parametrize("make_opt", ["adam", "sgd", "adamw_amsgrad"])
def test_sliced_optimizer_matches_a_model_built_small(make_opt):
    def optimizer(params):
        if make_opt == "adam":
            return torch.optim.Adam(params, lr=1e-2)
        if make_opt == "sgd":
            return torch.optim.SGD(params, lr=1e-2, momentum=0.9)
        return torch.optim.AdamW(params, lr=1e-2, amsgrad=True)

    big = mlp()
    opt = optimizer(big.parameters())
    train(big, opt, batches(3))
    groups = lbv.find_neurons(big, torch.randn(2, 5))
    kill(groups, {"0": [1, 4, 7], "2": [0, 3]})
    keep0 = [k for k in range(12) if k not in (1, 4, 7)]
    keep2 = [k for k in range(10) if k not in (0, 3)]

    # the reference: a model built at the small size, its weights and optimizer state sliced by hand
    small = nn.Sequential(nn.Linear(5, 9), nn.ReLU(), nn.Linear(9, 8), nn.ReLU(), nn.Linear(8, 3))
    index = {
        "0.weight": (keep0, None),
        "0.bias": (keep0,),
        "2.weight": (keep2, keep0),
        "2.bias": (keep2,),
        "4.weight": (None, keep2),
        "4.bias": (None,),
    }

    def cut(t, idx):
        for dim, i in enumerate(idx):
            if i is not None:
                t = t.index_select(dim, torch.tensor(i))
        return t.clone()

    small.load_state_dict({k: cut(v, index[k]) for k, v in big.state_dict().items()})
    small_opt = optimizer(small.parameters())
    state = copy.deepcopy(opt.state_dict())  # the 0-dim `step` tensors are shared otherwise
    names = [n for n, _ in big.named_parameters()]
    state["state"] = {
        i: {k: cut(v, index[names[i]]) if torch.is_tensor(v) and v.dim() > 0 else v for k, v in s.items()}
        for i, s in state["state"].items()
    }
    small_opt.load_state_dict(state)

    report = compact(big, groups)
    assert slice_optimizer_state_(opt, report.param_map) == 5
    assert {id(p) for g in opt.param_groups for p in g["params"]} == {id(p) for p in big.parameters()}
    data = batches(4, seed=1)
    train(big, opt, data)
    train(small, small_opt, data)
    for (name, p), q in zip(big.named_parameters(), small.parameters()):
        torch.testing.assert_close(p, q, atol=1e-6, rtol=0, msg=name)
    assert all(math.isfinite(float(v["step"])) for v in opt.state.values() if "step" in v)


# ---------------------------------------------------------------------------------------------------------------
# grouped and depthwise convolutions, channels_last
# ---------------------------------------------------------------------------------------------------------------
def test_grouped_producer_loses_as_many_channels_in_every_group():
    model = Grouped()  # g: Conv2d(4, 8, groups=2), 4 output channels per group
    report, _ = compact_and_check(model, torch.randn(2, 4, 5, 5), {"g": [1]})
    row = report.groups[0]
    assert (row.name, row.after, row.kept) == ("g", 8, 1)
    assert "so that every group of the grouped convolution 'g' keeps as many channels" in row.note
    report, _ = compact_and_check(model, torch.randn(2, 4, 5, 5), {"g": [1, 6]})
    assert report.groups[0].after == 6
    assert (model.g.groups, model.g.out_channels, tuple(model.g.weight.shape)) == (2, 6, (6, 2, 3, 3))


class GroupedConsumer(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.a = nn.Conv2d(3, 8, 1)
        self.b = nn.Conv2d(8, 6, 3, padding=1, groups=2)  # reads 4 channels per group
        self.fc = nn.Linear(6, 2)

    def forward(self, x):
        return self.fc(F.relu(self.b(F.relu(self.a(x)))).mean((2, 3)))


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


class DepthwiseBlock(nn.Module):
    """MobileNet-style: pw-BN-ReLU, dw-BN-ReLU (or no activation), pw."""

    def __init__(self, act=True):
        super().__init__()
        torch.manual_seed(0)
        self.pw1, self.bn1 = nn.Conv2d(3, 6, 1, bias=False), nn.BatchNorm2d(6)
        self.dw, self.bn2 = nn.Conv2d(6, 12, 3, padding=1, groups=6, bias=False), nn.BatchNorm2d(12)  # 2 per channel
        self.pw2 = nn.Conv2d(12, 4, 1)
        self.act = act

    def forward(self, x):
        h = self.bn2(self.dw(F.relu(self.bn1(self.pw1(x)))))
        return self.pw2(F.relu(h) if self.act else h)


def trained_stats(model, x):
    model.train()
    with torch.no_grad():
        model(2 * torch.randn_like(x) + 1)
    return model


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


# ---------------------------------------------------------------------------------------------------------------
# the groups after compaction: new ones, the old ones untouched, remap
# ---------------------------------------------------------------------------------------------------------------
REMAP_CASES = [
    (mlp, (8, 5), {"0": [1, 4, 7], "2": [0, 3]}),
    (cnn, (8, 1, 8, 8), {"0": [1], "6": [2]}),
    (Concat, (8, 3), {"right": [1, 3], "left": [0]}),
    (GroupedConsumer, (2, 3, 5, 5), {"a": [1, 6]}),
    (DepthwiseBlock, (2, 3, 6, 6), {"pw1": [4], "dw": [4, 5]}),
]


@pytest.mark.parametrize(("make", "shape", "which"), REMAP_CASES, ids=lambda c: getattr(c, "__name__", None))
def test_passed_groups_are_untouched_and_new_groups_match_discovery(make, shape, which):
    model = make()
    x = torch.randn(shape)
    if any(isinstance(m, nn.BatchNorm2d) for m in model.modules()):
        trained_stats(model, x)
    model.eval()
    groups = lbv.find_neurons(model, x)
    kill(groups, which)
    before, sizes = layout(groups), summary(groups)
    report = compact(model, groups)
    assert report.params_after < report.params_before
    assert layout(groups) == before  # same counts, same slot objects, same indices
    assert summary(groups) == sizes
    new = report.neuron_groups
    assert isinstance(new, lbv.NeuronGroups)
    assert not {id(g) for g in new} & {id(g) for g in groups}
    assert not {id(s) for g in new for s in g.slots()} & {id(s) for g in groups for s in g.slots()}
    fresh = lbv.find_neurons(model, x)
    assert_groups_equal(new, fresh)
    assert [r.after for r in report.groups] == [g.num_neurons for g in new]
    # usable on the compacted model: the same seminorm as groups found on it
    want = lbv.rbv_norm(fresh)
    torch.testing.assert_close(lbv.rbv_norm(new), want, rtol=16 * torch.finfo(want.dtype).eps, atol=0.0)


@pytest.mark.parametrize(("make", "shape", "which"), REMAP_CASES, ids=lambda c: getattr(c, "__name__", None))
def test_remap_gives_other_groups_of_the_model_as_discovery_finds_them(make, shape, which):
    model = make()
    x = torch.randn(shape)
    model.eval()
    mine, theirs = lbv.find_neurons(model, x), lbv.find_neurons(model, x)
    kill(mine, which)
    before = layout(theirs)
    report = compact(model, mine)
    remapped = report.remap(theirs)
    assert layout(theirs) == before  # left as they were
    assert isinstance(remapped, lbv.NeuronGroups)
    assert remapped.skipped == theirs.skipped
    assert_groups_equal(remapped, lbv.find_neurons(model, x))
    assert_groups_equal(report.remap(report.neuron_groups), report.neuron_groups)  # already current: copied
    # update_groups_ still updates in place, and leaves groups that are already current alone
    assert report.update_groups_(theirs) is theirs
    assert_groups_equal(theirs, remapped)
    current = layout(report.neuron_groups)
    report.update_groups_(report.neuron_groups)
    assert layout(report.neuron_groups) == current


def test_new_groups_of_a_merged_lifted_chain_read_the_dense_weights():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 1))
    x = torch.randn(8, 4)
    groups = lbv.find_neurons(model, x)
    other = lbv.find_neurons(model, x)  # found before the lift: on the dense weight
    lbv.lift_shared_weights(model, groups)
    kill(groups, {"0": [1, 2]})
    before = layout(groups)
    report = compact(model, groups)
    assert report.merged == ["2"]
    assert layout(groups) == before

    def factors(gs):
        return [s.factor for g in gs for s in g.w_slots + g.v_slots if s.module_name == "2"]

    assert factors(groups) == [True, True]
    assert factors(report.neuron_groups) == [False, False]
    assert report.neuron_groups.lifted == groups.lifted == ["2"]
    fresh = lbv.find_neurons(model, x)
    assert_groups_equal(report.neuron_groups, fresh)
    assert_groups_equal(report.remap(other), fresh)
