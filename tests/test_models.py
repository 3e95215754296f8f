"""tests/models.py builds, for a seed, exactly the models of the builders it replaced (written out here)."""

import pytest
import torch
from models import cnn_bn_avgpool, cnn_bn_prelu, cnn_same_padding, cnn_strided, low_rank_mlp, mlp, mlp_and_groups
from torch import nn

import lightning_bv as lbv


def seeded(seed, make):
    torch.manual_seed(seed)
    return make()


def assert_same(a: nn.Module, b: nn.Module) -> None:
    assert str(a) == str(b)
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    for k in sa:
        assert sa[k].dtype == sb[k].dtype, k
        assert torch.equal(sa[k], sb[k]), k


def written_mlp(widths, bn=False, leaky=False):
    layers = []
    for i, (a, b) in enumerate(zip(widths[:-1], widths[1:])):
        layers.append(nn.Linear(a, b))
        if i < len(widths) - 2:
            if bn:
                layers.append(nn.BatchNorm1d(b))
            layers.append(nn.LeakyReLU(0.1) if leaky else nn.ReLU())
    return nn.Sequential(*layers)


@pytest.mark.parametrize(
    ("widths", "written"),
    [
        ((3, 6, 6, 2), lambda: nn.Sequential(nn.Linear(3, 6), nn.ReLU(), nn.Linear(6, 6), nn.ReLU(), nn.Linear(6, 2))),
        ((3, 8, 6, 2), lambda: nn.Sequential(nn.Linear(3, 8), nn.ReLU(), nn.Linear(8, 6), nn.ReLU(), nn.Linear(6, 2))),
        (
            (5, 12, 10, 3),
            lambda: nn.Sequential(nn.Linear(5, 12), nn.ReLU(), nn.Linear(12, 10), nn.ReLU(), nn.Linear(10, 3)),
        ),
        (
            (6, 10, 8, 3),
            lambda: nn.Sequential(nn.Linear(6, 10), nn.ReLU(), nn.Linear(10, 8), nn.ReLU(), nn.Linear(8, 3)),
        ),
        ((4, 16, 3), lambda: nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 3))),
    ],
)
def test_mlp_with_a_seed_is_the_written_out_model(widths, written):
    assert_same(mlp(widths), seeded(0, written))
    assert_same(mlp(widths, seed=3), seeded(3, written))


@pytest.mark.parametrize(("bn", "leaky"), [(False, False), (True, True), (True, False)])
def test_mlp_without_a_seed_continues_the_global_generator(bn, leaky):
    torch.manual_seed(1)
    ours = mlp([3, 9, 7, 2], bn=bn, leaky=leaky, seed=None, dtype=torch.float64)
    torch.manual_seed(1)
    assert_same(ours, written_mlp([3, 9, 7, 2], bn, leaky).double())


def test_mlp_and_groups_draws_the_input_after_the_weights():
    net, groups = mlp_and_groups([4, 10, 2], seed=2)
    after = torch.randn(3)
    torch.manual_seed(2)
    written = nn.Sequential(nn.Linear(4, 10), nn.ReLU(), nn.Linear(10, 2))
    x = torch.randn(1, 4)
    assert_same(net, written)
    assert torch.equal(torch.randn(3), after)  # the generator is where the replaced builders left it
    assert groups.names == lbv.find_neurons(written, x).names


def test_low_rank_mlp_is_apply_low_rank_of_the_mlp():
    assert_same(low_rank_mlp(2, ["2"]), lbv.apply_low_rank(mlp(), rank=2, targets=["2"]))


def test_cnns_are_the_written_out_models():
    assert_same(
        seeded(1, cnn_bn_avgpool),
        seeded(
            1,
            lambda: nn.Sequential(
                nn.Conv2d(2, 5, 3, padding=1), nn.BatchNorm2d(5), nn.ReLU(), nn.Conv2d(5, 4, 3), nn.ReLU(),
                nn.AvgPool2d(2), nn.Flatten(), nn.Linear(36, 6), nn.ReLU(), nn.Linear(6, 3),
            ).double(),
        ),
    )  # fmt: skip
    assert_same(
        cnn_bn_prelu(),
        seeded(
            0,
            lambda: nn.Sequential(
                nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(inplace=True), nn.MaxPool2d(2), nn.Flatten(),
                nn.Dropout(0.1), nn.Linear(36, 5), nn.PReLU(5), nn.Linear(5, 2),
            ),
        ),
    )  # fmt: skip
    assert_same(
        cnn_strided(),
        seeded(
            0,
            lambda: nn.Sequential(
                nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 4, 3, stride=2), nn.Flatten(),
                nn.Linear(4 * 3 * 3, 2),
            ),
        ),
    )  # fmt: skip
    assert_same(
        cnn_same_padding(),
        seeded(
            0,
            lambda: nn.Sequential(
                nn.Conv2d(3, 8, 3, stride=2, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(),
                nn.Conv2d(8, 4, 5, padding=2, bias=False),
            ),
        ),
    )  # fmt: skip
    for make, shape in ((cnn_bn_avgpool, (2, 2, 8, 8)), (cnn_bn_prelu, (2, 1, 8, 8)), (cnn_strided, (2, 3, 8, 8))):
        model = make()
        assert model(torch.randn(*shape, dtype=next(model.parameters()).dtype)).shape[0] == 2
