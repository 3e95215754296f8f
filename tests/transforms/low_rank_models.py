"""The models of the low-rank tests (test_low_rank.py, test_low_rank_checks.py), built by tests/models.py."""

import torch
from models import cnn_strided, mlp
from torch import nn


def make_mlp() -> nn.Sequential:
    return mlp([6, 10, 8, 3])


make_cnn = cnn_strided


def matrix(weight: torch.Tensor) -> torch.Tensor:
    return weight.detach().reshape(weight.shape[0], -1)
