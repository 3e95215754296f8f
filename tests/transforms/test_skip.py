import pytest
import torch
from torch import nn

from lightning_bv._layers import is_null_space
from lightning_bv._select import TargetsMatchNothingError
from lightning_bv.transforms.low_rank import apply_low_rank
from lightning_bv.transforms.skip import AffineSkip, add_skip, affine_skip_for, is_skip, remove_skip


class Block(nn.Module):
    """A module with no in_features/out_features: shapes only from a trial forward."""

    def __init__(self, d_in: int, d_out: int) -> None:
        super().__init__()
        self.a = nn.Linear(d_in, 16)
        self.b = nn.Linear(16, d_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(torch.relu(self.a(x)))


def make_mlp() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 10), nn.ReLU(), nn.Linear(10, 10), nn.ReLU(), nn.Linear(10, 3))


def make_cnn() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, stride=2, padding=1),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(8, 4, 5, padding=2, bias=False),
    )


def snapshot(model: nn.Module):
    return (
        str(model),
        {k: v.detach().clone() for k, v in model.state_dict().items()},
        {n: id(m) for n, m in model.named_modules()},
    )


def assert_unchanged(model: nn.Module, before) -> None:
    text, state, ids = before
    assert str(model) == text
    now = model.state_dict()
    assert list(now) == list(state)
    for k, v in state.items():
        assert torch.equal(now[k], v), k
    assert {n: id(m) for n, m in model.named_modules()} == ids


def randomize_skips(model: nn.Module) -> None:
    with torch.no_grad():
        for m in model.modules():
            if is_skip(m):
                for p in m.skip.parameters():
                    p.normal_()


@pytest.mark.parametrize(
    ("make", "targets", "shape"),
    [
        (make_mlp, ["0", "2", "4"], (5, 6)),
        (make_cnn, ["0", "2", "4"], (2, 3, 9, 9)),
        (lambda: nn.Sequential(nn.Conv1d(2, 4, 3, stride=2, padding=2, dilation=2)), ["0"], (2, 2, 11)),
        (lambda: nn.Sequential(nn.Conv3d(2, 3, 3, padding=1)), ["0"], (1, 2, 4, 5, 3)),
    ],
)
def test_affine_skip_preserves_the_function(make, targets, shape):
    model = make()
    x = torch.randn(shape)
    y = model(x)
    inner = {t: model.get_submodule(t) for t in targets}
    model = add_skip(model, targets)
    assert torch.equal(model(x), y)
    for t in targets:
        wrapper = model.get_submodule(t)
        assert is_skip(wrapper)
        assert wrapper.module is inner[t]
        assert is_null_space(wrapper.skip)
        assert all(torch.count_nonzero(p) == 0 for p in wrapper.skip.parameters())
        assert wrapper.skip.bias is not None
        if isinstance(inner[t], nn.Linear):
            assert (wrapper.skip.in_features, wrapper.skip.out_features) == (
                inner[t].in_features,
                inner[t].out_features,
            )
        else:
            assert isinstance(wrapper.skip, type(inner[t]))  # a skip-path subclass of the same conv
            assert wrapper.skip.kernel_size == (1,) * len(inner[t].kernel_size)
            assert wrapper.skip.stride == inner[t].stride
    randomize_skips(model)
    out = model(x)
    assert out.shape == y.shape
    assert not torch.allclose(out, y)


def test_affine_skip_trains_from_zero():
    model = add_skip(make_mlp(), ["2"])
    model(torch.randn(8, 6)).pow(2).sum().backward()
    assert model[2].skip.weight.grad is not None
    assert model[2].skip.weight.grad.abs().sum() > 0


def test_state_dict_keys_move_under_the_wrapper():
    model = add_skip(make_mlp(), ["2"])
    keys = list(model.state_dict())
    assert "2.module.weight" in keys
    assert "2.skip.weight" in keys
    assert "2.skip.bias" in keys
    assert "2.weight" not in keys


def test_identity_skip_adds_the_input():
    model = nn.Sequential(nn.Linear(5, 5), nn.ReLU(), nn.Conv1d(3, 3, 3, padding=1))
    model = add_skip(model, ["0", "2"], kind="identity")
    assert isinstance(model[0].skip, nn.Identity)
    x = torch.randn(2, 5)
    assert torch.allclose(model[0](x), model[0].module(x) + x)
    z = torch.randn(2, 3, 7)
    assert torch.allclose(model[2](z), model[2].module(z) + z)


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


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        (
            {"targets": ["0"], "kind": "dense"},
            ValueError,
            r"`kind` must be one of \('affine', 'identity'\), got 'dense'",
        ),
        ({"targets": None}, ValueError, r"`targets` is required"),
        ({"targets": ["0", "fc9"]}, TargetsMatchNothingError, r"'fc9' matched no module"),
        ({"targets": ["0", "1"]}, TypeError, r"Cannot read the input and output sizes of '1' \(ReLU\).*example_input="),
        ({"targets": ["0", "2"], "kind": "identity"}, ValueError, r"maps 10 to 10 features|maps 6 to 10 features"),
    ],
)
def test_bad_arguments_leave_model_unchanged(kwargs, error, match):
    model = make_mlp()
    before = snapshot(model)
    with pytest.raises(error, match=match):
        add_skip(model, **kwargs)
    assert_unchanged(model, before)


def test_conv_padding_that_changes_the_shape_is_refused():
    model = nn.Sequential(nn.Linear(3, 3), nn.Conv2d(3, 4, 3))
    before = snapshot(model)
    with pytest.raises(ValueError, match=r"around '1' \(Conv2d, kernel_size=\(3, 3\), padding=\(0, 0\).*padding = "):
        add_skip(model, ["0", "1"])
    assert_unchanged(model, before)


def test_a_skip_is_not_wrapped_again():
    model = add_skip(make_mlp(), ["2"])
    before = snapshot(model)
    for target in (["2"], ["2.skip"]):
        with pytest.raises(ValueError, match=r"already a skip connection or part of one"):
            add_skip(model, target)
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


def test_root_target_returns_the_wrapper():
    layer = nn.Linear(3, 3)
    wrapped = add_skip(layer, [""])
    assert isinstance(wrapped, AffineSkip)
    assert wrapped.module is layer
    assert remove_skip(wrapped) is layer


def test_remove_skip_restores_the_original_modules():
    model = make_cnn()
    before = snapshot(model)
    x = torch.randn(2, 3, 9, 9)
    y = model(x)
    model = add_skip(model, ["0", "4"])
    randomize_skips(model)
    assert remove_skip(model) is model  # merge=False: the trained skips are dropped
    assert_unchanged(model, before)
    assert torch.equal(model(x), y)
    assert not any(is_skip(m) for m in model.modules())


def test_remove_skip_with_targets_and_nested_wrappers():
    model = make_mlp()
    before = snapshot(model)
    model = add_skip(model, ["0", "2"])
    model = add_skip(model, ["2.module"], kind="identity")  # a wrapper inside the wrapper
    assert is_skip(model[2].module)
    model = remove_skip(model, targets=["0"])
    assert not is_skip(model[0])
    assert is_skip(model[2])
    model = remove_skip(model)
    assert_unchanged(model, before)


@pytest.mark.parametrize(
    ("make", "targets", "kind", "shape"),
    [
        (make_mlp, ["0", "2", "4"], "affine", (5, 6)),
        (make_mlp, ["2"], "identity", (5, 6)),
        (make_cnn, ["0", "2", "4"], "affine", (2, 3, 9, 9)),
        (make_cnn, ["2"], "identity", (2, 3, 9, 9)),
        (lambda: nn.Sequential(nn.Linear(4, 4, bias=False)), ["0"], "affine", (3, 4)),
        (lambda: nn.Sequential(nn.Conv1d(2, 3, 3, stride=2, padding=2, dilation=2)), ["0"], "affine", (2, 2, 11)),
    ],
)
def test_remove_skip_merge_keeps_the_function(make, targets, kind, shape):
    model = add_skip(make(), targets, kind=kind)
    randomize_skips(model)
    x = torch.randn(shape)
    y = model(x)
    model = remove_skip(model, merge=True)
    assert not any(is_skip(m) for m in model.modules())
    assert [type(m) for m in model] == [type(m) for m in make()]
    assert torch.allclose(model(x), y, atol=1e-5)


def test_remove_skip_merge_refuses_what_it_cannot_fold():
    model = nn.Sequential(nn.Linear(4, 4), nn.Conv2d(4, 4, 3, padding=1, groups=2))
    model = add_skip(model, ["0", "1"])
    randomize_skips(model)
    before = snapshot(model)
    with pytest.raises(ValueError, match=r"Cannot merge the skip of '1' \(Conv2d\).*Use merge=False"):
        remove_skip(model, merge=True)
    assert_unchanged(model, before)
    low = apply_low_rank(nn.Linear(4, 4), rank=2)
    wrapped = add_skip(nn.Sequential(low), ["0"])
    with pytest.raises(ValueError, match=r"'0': its weight is parametrized"):
        remove_skip(wrapped, merge=True)


def test_affine_skip_for_keeps_dtype():
    skip = affine_skip_for(nn.Linear(3, 2).double())
    assert skip.weight.dtype == torch.float64
    assert is_null_space(skip)


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
