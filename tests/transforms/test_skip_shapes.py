"""Sizing a skip and checking its shapes (lightning_bv/transforms/_skip_shapes.py), through add_skip."""

import pytest
import torch
from helpers import assert_unchanged, snapshot
from skip_models import Block, make_mlp
from torch import nn

from lightning_bv.transforms.skip import add_skip


@pytest.mark.parametrize(
    ("layer", "match"),
    [
        (nn.Linear(4, 8), r"needs '0' to keep its input shape, but it maps 4 to 8 features"),
        (nn.Conv2d(4, 4, 3, stride=2, padding=1), r"maps 4 to 4 channels with stride \(2, 2\)"),
        (nn.Conv2d(4, 6, 1), r"maps 4 to 6 channels"),
        (nn.Conv2d(4, 4, 3), r"padding=\(0, 0\).* would not match its output shape"),
    ],
)
def test_identity_shape_mismatch_is_refused(layer, match):
    model = nn.Sequential(layer, nn.ReLU(), nn.Linear(4, 4))
    before = snapshot(model)
    with pytest.raises(ValueError, match=match):
        add_skip(model, ["2", "0"], kind="identity")
    assert_unchanged(model, before)


def test_conv_padding_that_changes_the_shape_is_refused():
    model = nn.Sequential(nn.Linear(3, 3), nn.Conv2d(3, 4, 3))
    before = snapshot(model)
    with pytest.raises(ValueError, match=r"around '1' \(Conv2d, kernel_size=\(3, 3\), padding=\(0, 0\).*padding = "):
        add_skip(model, ["0", "1"])
    assert_unchanged(model, before)


def test_generic_module_with_features_and_with_example_input():
    torch.manual_seed(0)
    model = nn.Sequential(Block(4, 6), nn.ReLU(), nn.Linear(6, 2))
    x = torch.randn(3, 7, 4)  # leading dims (3, 7): features in the last dimension
    y = model(x)
    before = snapshot(model)
    with pytest.raises(TypeError, match=r"'0' \(Block\).*Pass `example_input=`"):
        add_skip(model, ["0"])
    assert_unchanged(model, before)
    model.train()
    model = add_skip(model, ["0"], example_input=x)
    assert model.training
    assert isinstance(model[0].skip, nn.Linear)
    assert (model[0].skip.in_features, model[0].skip.out_features) == (4, 6)
    assert torch.equal(model(x), y)

    class Features(nn.Module):
        in_features, out_features = 6, 6

        def forward(self, x):
            return 2 * x

    model = add_skip(nn.Sequential(Features()), ["0"])
    assert model[0].skip.in_features == 6
    model = add_skip(nn.Sequential(Features()), ["0"], kind="identity")
    assert torch.allclose(model(torch.ones(1, 6)), torch.full((1, 6), 3.0))


def test_example_input_checks_shapes_and_calls():
    class Pool(nn.Module):
        def forward(self, x):
            return x.mean(1)

    model = nn.Sequential(nn.Linear(4, 4), Pool(), nn.Linear(4, 2))
    unused = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4))
    unused.forward = lambda x: unused[0](x)
    x = torch.randn(2, 5, 4)
    before = snapshot(model)
    with pytest.raises(
        ValueError, match=r"skip around '1' would give shape \(2, 5, 4\) .* but the module gives \(2, 4\)"
    ):
        add_skip(model, ["1"], example_input=x)
    with pytest.raises(ValueError, match=r"'1' to keep its input shape, but it maps \(2, 5, 4\) to \(2, 4\)"):
        add_skip(model, ["1"], kind="identity", example_input=x)
    assert_unchanged(model, before)
    with pytest.raises(ValueError, match=r"'1' was not called"):
        add_skip(unused, ["1"], example_input=torch.randn(2, 4))


def conv_bn_relu(c_in, c_out, stride=1, padding=1):
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, stride=stride, padding=padding), nn.BatchNorm2d(c_out), nn.ReLU())


class ConvNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(conv_bn_relu(1, 8), conv_bn_relu(8, 8), conv_bn_relu(8, 16, stride=2))
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def test_a_skip_around_a_conv_block_mixes_channels_at_any_input_size():
    # no example input: the sizes come from the block's first and last conv layers
    torch.manual_seed(0)
    model = ConvNet().eval()
    x = torch.randn(2, 1, 8, 8)
    y = model(x)
    model = add_skip(model, ["features.1", "features.2"])
    same, strided = model.features[1].skip, model.features[2].skip
    assert isinstance(same, nn.Conv2d)
    assert isinstance(strided, nn.Conv2d)
    assert (same.in_channels, same.out_channels, same.kernel_size, same.stride) == (8, 8, (1, 1), (1, 1))
    assert (strided.in_channels, strided.out_channels, strided.stride) == (8, 16, (2, 2))
    assert torch.equal(model(x), y)  # zero at the start
    with torch.no_grad():
        same.weight.normal_()
        strided.weight.normal_()
    for size in [(8, 8), (9, 11), (5, 4), (1, 1)]:
        assert tuple(model(torch.randn(2, 1, *size)).shape) == (2, 10)


def test_the_own_skip_of_a_conv_block_keeps_its_neighbour_a_neuron_group():
    import lightning_bv as lbv

    model = add_skip(ConvNet(), ["features.1"])
    groups = lbv.find_neurons(model, torch.randn(2, 1, 8, 8))
    assert groups["features.0.0"].consumers == ("features.1.module.0", "features.1.skip")
    assert not any("features.1.skip" in why for _, why in groups.skipped)


@pytest.mark.parametrize(
    ("layers", "stride", "padding"),
    [
        ([nn.Conv1d(3, 4, 3, stride=2, padding=2), nn.ReLU(), nn.Conv1d(4, 5, 5, stride=3, padding=2)], (6,), (1,)),
        ([nn.Conv1d(3, 4, 1, stride=2), nn.BatchNorm1d(4), nn.Conv1d(4, 5, 3, stride=2, padding=2)], (4,), (2,)),
        ([nn.Conv1d(3, 5, 3, padding="same"), nn.Sequential(nn.Dropout(), nn.AvgPool1d(3, 2, 1))], (2,), (0,)),
    ],
)
def test_a_conv_chain_skip_matches_the_output_length_at_every_length(layers, stride, padding):
    block = nn.Sequential(*layers).eval()
    model = add_skip(nn.Sequential(block), "0")
    assert (model[0].skip.stride, model[0].skip.padding) == (stride, padding)
    for length in range(1, 30):
        x = torch.randn(2, 3, length)
        assert model[0].skip(x).shape == block(x).shape, length


def test_a_linear_sequential_is_sized_by_its_first_and_last_layers():
    model = nn.Sequential(make_mlp(), nn.ReLU(), nn.Linear(3, 2))
    model = add_skip(model, "0")
    assert (model[0].skip.in_features, model[0].skip.out_features) == (6, 3)
    model = add_skip(nn.Sequential(nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 4))), "0", kind="identity")
    assert isinstance(model[0].skip, nn.Identity)


@pytest.mark.parametrize(
    ("block", "match"),
    [
        (
            nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2)),
            r"A skip around '0' cannot match its output size at every input size: its layer MaxPool2d\(kernel_size=2",
        ),
        (
            nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU()),
            r"its layer Conv2d\(kernel_size=\(3, 3\), stride=\(1, 1\), padding=\(0, 0\)\) changes the size",
        ),
        (
            nn.Sequential(nn.Conv1d(3, 4, 1), nn.Flatten(), nn.Linear(8, 2)),
            r"Cannot read the input and output sizes of '0' \(Sequential\).*Pass `example_input=`",
        ),
        (
            nn.Sequential(nn.Conv1d(3, 4, 1), nn.Sequential(nn.Linear(2, 2))),
            r"cannot be sized from its layers: it mixes Linear and Conv layers \(Conv1d, Linear\)",
        ),
    ],
)
def test_a_block_without_a_matching_skip_is_refused(block, match):
    model = nn.Sequential(block)
    before = snapshot(model)
    with pytest.raises((ValueError, TypeError), match=match):
        add_skip(model, "0")
    assert_unchanged(model, before)


def test_shape_hooks_record_the_first_call_of_each_target_and_are_removable():
    from lightning_bv.transforms.skip import shape_hooks

    model = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
    seen: dict = {}
    handles = shape_hooks({"0": model[0], "2": model[2]}, seen)
    model(torch.randn(5, 4))
    model(torch.randn(7, 4))  # later calls do not overwrite the first
    assert seen == {"0": ((5, 4), (5, 3)), "2": ((5, 3), (5, 2))}
    for handle in handles:
        handle.remove()
    assert not model[0]._forward_hooks
