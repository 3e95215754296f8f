import copy
import re

import pytest
import torch
from torch import nn

import lightning_bv as lbv
from lightning_bv._layers import null_space
from lightning_bv.transforms import shrinkers
from lightning_bv.transforms._layer_shrinkers import (
    BatchNormShrinker,
    Conv1DShrinker,
    ConvShrinker,
    GroupedConvShrinker,
    LowRankShrinker,
    PReLUShrinker,
)
from lightning_bv.transforms.shrinkers import LayerShrinker, LinearShrinker, register_layer_shrinker, shrinker_for


@pytest.fixture(autouse=True)
def registry():
    """Each test registers on a copy of the registry; the library's is restored afterwards."""
    saved = dict(shrinkers._REGISTRY)
    yield
    shrinkers._REGISTRY.clear()
    shrinkers._REGISTRY.update(saved)


class GainLinear(nn.Linear):
    """A Linear with a per-output gain after it and a per-output buffer (say, a usage count)."""

    def __init__(self, n_in, n_out):
        super().__init__(n_in, n_out)
        self.gain = nn.Parameter(torch.linspace(0.5, 1.5, n_out))
        self.register_buffer("usage", torch.arange(n_out, dtype=torch.float32))

    def forward(self, x):
        return super().forward(x) * self.gain


class GainLinearShrinker(LinearShrinker):
    parameters = ("weight", "bias", "gain")
    buffers = ("usage",)

    def plan(self, module, keep, plan):
        super().plan(module, keep, plan)
        plan.param(module, "gain", (keep.get("out"),))
        plan.buffer(module, "usage", (keep.get("out"),))

    def resize(self, module, saved, grow=False):
        if not super().resize(module, saved, grow):
            return False
        module.gain = nn.Parameter(module.gain.new_empty(module.out_features))
        module.usage = module.usage.new_empty(module.out_features)
        return True


class Conv1D(nn.Module):
    """Hugging Face's transformers.pytorch_utils.Conv1D: weight [in, out]."""

    def __init__(self, nf, nx):
        super().__init__()
        self.nf, self.nx = nf, nx
        self.weight = nn.Parameter(torch.randn(nx, nf))
        self.bias = nn.Parameter(torch.zeros(nf))

    def forward(self, x):
        return torch.addmm(self.bias, x.view(-1, x.size(-1)), self.weight).view(*x.shape[:-1], self.nf)


def gain_net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 6), nn.ReLU(), GainLinear(6, 5), nn.ReLU(), nn.Linear(5, 2))


def kill_columns(model, which):
    """Zero the columns of the consumer of each listed producer: {index of consumer: [k, ...]}."""
    with torch.no_grad():
        for i, ks in which.items():
            model[i].weight[:, ks] = 0.0


# ---------------------------------------------------------------------------------------------------------------
# lookup
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("module", "kind"),
    [
        (nn.Linear(2, 3), LinearShrinker),
        (null_space(nn.Linear(2, 3)), LinearShrinker),  # a skip path: a subclass of nn.Linear
        (nn.Conv1d(2, 3, 1), ConvShrinker),
        (nn.Conv2d(2, 4, 3), ConvShrinker),
        (nn.Conv3d(2, 4, 1), ConvShrinker),
        (nn.Conv2d(4, 4, 3, groups=2), GroupedConvShrinker),
        (nn.Conv2d(4, 8, 3, groups=4), GroupedConvShrinker),
        (nn.BatchNorm1d(3), BatchNormShrinker),
        (nn.BatchNorm2d(3), BatchNormShrinker),
        (nn.SyncBatchNorm(3), BatchNormShrinker),
        (nn.PReLU(3), PReLUShrinker),
        (Conv1D(3, 2), Conv1DShrinker),
    ],
)
def test_built_in_layer_types_have_their_shrinker(module, kind):
    assert type(shrinker_for(module)) is kind


def test_low_rank_layers_get_the_low_rank_shrinker():
    model = nn.Sequential(nn.Linear(6, 5), nn.Conv2d(3, 4, 3))
    lbv.apply_low_rank(model, rank=2)
    assert type(shrinker_for(model[0])) is LowRankShrinker
    assert type(shrinker_for(model[1])) is LowRankShrinker
    assert shrinker_for(model[0]).size(model[0], "rank") == 2


def test_lookup_follows_the_mro_and_a_registered_subclass_wins():
    class MyLinear(nn.Linear):
        pass

    class MySubLinear(MyLinear):
        pass

    assert type(shrinker_for(MyLinear(2, 3))) is LinearShrinker  # a subclass is shrunk as a Linear
    mine = LinearShrinker()
    register_layer_shrinker(MyLinear, mine)
    assert shrinker_for(MyLinear(2, 3)) is mine
    assert shrinker_for(MySubLinear(2, 3)) is mine  # the nearest registered class
    assert type(shrinker_for(nn.Linear(2, 3))) is LinearShrinker
    again = LinearShrinker()
    register_layer_shrinker(MyLinear, again)  # registering again replaces
    assert shrinker_for(MySubLinear(2, 3)) is again


def test_unknown_layer_types_have_none():
    assert shrinker_for(nn.ReLU()) is None
    assert shrinker_for(nn.LayerNorm(3)) is None
    assert shrinker_for(nn.Embedding(3, 2)) is None


@pytest.mark.parametrize(
    ("layer_type", "shrinker", "match"),
    [
        ("Linear", LinearShrinker(), r"`layer_type` must be an nn.Module subclass, got 'Linear'"),
        (int, LinearShrinker(), r"`layer_type` must be an nn.Module subclass, got <class 'int'>"),
        (nn.Linear(2, 3), LinearShrinker(), r"`layer_type` must be an nn.Module subclass, got Linear\("),
        (nn.Linear, LinearShrinker, r"got <class .*LinearShrinker'> \(pass an instance, not the class\)"),
        (nn.Linear, object(), r"`shrinker` must be an instance of a LayerShrinker subclass, got <object object"),
    ],
)
def test_register_rejects_bad_arguments(layer_type, shrinker, match):
    with pytest.raises(TypeError, match=match):
        register_layer_shrinker(layer_type, shrinker)
    assert type(shrinker_for(nn.Linear(2, 3))) is LinearShrinker  # nothing registered


def test_base_class_says_what_it_does_not_know():
    base = LayerShrinker()
    assert base.axis("weight", 0) == "out"
    assert base.axis("weight", 1) == "in"
    assert base.axis("running_mean", 0) is None
    assert base.resize(nn.Linear(2, 3), {"weight": torch.zeros(1, 2)}) is False
    with pytest.raises(NotImplementedError, match=r"LayerShrinker does not say the 'out' width of a Linear"):
        base.size(nn.Linear(2, 3), "out")
    with pytest.raises(NotImplementedError, match=r"LayerShrinker cannot shrink a Linear"):
        base.plan(nn.Linear(2, 3), {}, shrinkers.ShrinkPlan())


def test_exported_from_the_package():
    assert lbv.register_layer_shrinker is register_layer_shrinker
    assert lbv.LayerShrinker is LayerShrinker
    assert lbv.transforms.register_layer_shrinker is register_layer_shrinker


# ---------------------------------------------------------------------------------------------------------------
# a layer type of the user's: compact, resize, optimizer
# ---------------------------------------------------------------------------------------------------------------
def test_without_a_shrinker_a_layer_with_extra_tensors_is_left_whole():
    model = gain_net()
    kill_columns(model, {2: [0]})  # neuron 0 of group '0', read by GainLinear
    x = torch.randn(8, 3)
    groups = lbv.find_neurons(model, x)
    assert groups.names == ["0"]  # GainLinear's output is multiplied by its gain: not a producer discovery reads
    report = lbv.compact(model, groups)
    assert not report.groups[0].shrunk
    assert re.search(r"'2' \(GainLinear\) has tensors \['gain', 'usage'\]", report.groups[0].note)


def test_a_registered_layer_is_compacted_with_the_same_function():
    register_layer_shrinker(GainLinear, GainLinearShrinker())
    model = gain_net()
    kill_columns(model, {2: [0, 4]})  # neurons 0 and 4 of group '0' (read by GainLinear)
    x = torch.randn(8, 3)
    y = model(x)
    report = lbv.compact(model, example_input=x)
    assert report.groups[0].shrunk
    assert (model[0].out_features, model[2].in_features, tuple(model[2].weight.shape)) == (4, 4, (5, 4))
    torch.testing.assert_close(model(x), y, rtol=16 * torch.finfo(y.dtype).eps, atol=1e-7)


def test_a_registered_shrinker_shrinks_its_own_tensors_and_the_optimizer_follows():
    register_layer_shrinker(GainLinear, GainLinearShrinker())
    torch.manual_seed(0)
    layer = GainLinear(3, 5)
    model = nn.Sequential(layer, nn.ReLU(), nn.Linear(5, 2))
    x = torch.randn(8, 3)
    g = lbv.NeuronGroup(  # discovery does not read GainLinear as a producer: a group written by hand
        "0",
        ["0"],
        [None],
        "relu",
        ["2"],
        5,
        [lbv.Slot(layer, "0", "weight", 0)],
        [lbv.Slot(layer, "0", "bias", 0, regularized=False)],
        [lbv.Slot(model[2], "2", "weight", 1)],
    )
    opt = torch.optim.Adam(model.parameters())
    model(x).sum().backward()
    opt.step()
    kill_columns(model, {2: [1, 3]})  # after the step, which moved them
    gain, usage = layer.gain.detach().clone(), layer.usage.clone()
    moment = opt.state[layer.gain]["exp_avg"].clone()
    y = model(x)
    report = lbv.compact(model, g)
    assert report.groups[0].after == 3
    keep = torch.tensor([0, 2, 4])
    assert torch.equal(layer.gain.detach(), gain[keep])
    assert torch.equal(layer.usage, usage[keep])
    assert layer.out_features == 3
    torch.testing.assert_close(model(x), y, rtol=16 * torch.finfo(y.dtype).eps, atol=1e-7)
    assert lbv.slice_optimizer_state_(opt, report.param_map) == 4  # 0.weight, 0.bias, 0.gain, 2.weight
    assert torch.equal(opt.state[layer.gain]["exp_avg"], moment[keep])
    # and a freshly built model takes the compacted sizes to load the state_dict
    fresh = nn.Sequential(GainLinear(3, 5), nn.ReLU(), nn.Linear(5, 2))
    assert lbv.resize_to_state_dict_(fresh, model.state_dict()) == ["0", "2"]
    fresh.load_state_dict(model.state_dict())
    torch.testing.assert_close(fresh(x), model(x), rtol=0.0, atol=0.0)


def test_a_registered_shrinker_can_refuse_a_removal():
    class Refusing(LinearShrinker):
        def check_removal(self, name, module, removed):
            if "in" in removed and bool(removed["in"].any()):
                raise shrinkers.CannotShrink(f"'{name}' keeps all its inputs")

    class Keeper(nn.Linear):
        pass

    register_layer_shrinker(Keeper, Refusing())
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 6), nn.ReLU(), Keeper(6, 2))
    kill_columns(model, {2: [1]})
    state = copy.deepcopy(model.state_dict())
    report = lbv.compact(model, example_input=torch.randn(2, 3))
    assert report.groups[0].note == "left whole: '2' keeps all its inputs"
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
