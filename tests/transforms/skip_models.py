"""Models and snapshots shared by the skip tests (test_skip.py, test_skip_shapes.py)."""

import torch
from torch import nn

from lightning_bv.transforms.skip import is_skip


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
