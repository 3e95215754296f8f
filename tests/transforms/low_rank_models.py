"""Models and snapshots shared by the low-rank tests (test_low_rank.py, test_low_rank_checks.py)."""

import torch
from torch import nn

from lightning_bv.transforms.low_rank import (
    is_low_rank,
)


def make_mlp() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 10), nn.ReLU(), nn.Linear(10, 8), nn.ReLU(), nn.Linear(8, 3))


def make_cnn() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 4, 3, stride=2), nn.Flatten(), nn.Linear(4 * 3 * 3, 2)
    )


def snapshot(model: nn.Module) -> tuple[str, dict[str, torch.Tensor], dict[str, int]]:
    return (
        str(model),
        {k: v.detach().clone() for k, v in model.state_dict().items()},
        {n: id(p) for n, p in model.named_parameters()},
    )


def assert_unchanged(model: nn.Module, before: tuple[str, dict[str, torch.Tensor], dict[str, int]]) -> None:
    text, state, ids = before
    assert str(model) == text
    now = model.state_dict()
    assert list(now) == list(state)
    for k, v in state.items():
        assert torch.equal(now[k], v), k
    assert {n: id(p) for n, p in model.named_parameters()} == ids
    assert not any(is_low_rank(m) for m in model.modules())


def matrix(weight: torch.Tensor) -> torch.Tensor:
    return weight.detach().reshape(weight.shape[0], -1)
