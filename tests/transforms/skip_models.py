"""The models of the skip tests (test_skip.py, test_skip_shapes.py), built by tests/models.py."""

import torch
from models import cnn_same_padding, mlp
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
    return mlp([6, 10, 10, 3])


make_cnn = cnn_same_padding


def randomize_skips(model: nn.Module) -> None:
    with torch.no_grad():
        for m in model.modules():
            if is_skip(m):
                for p in m.skip.parameters():
                    p.normal_()
