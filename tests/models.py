"""The small models the unit tests build: one builder per shape of model, parametrized (sizes, BatchNorm, activation,
low rank, skip connections, seed, dtype).

Each builder makes its layers in order (so a seed gives the same weights as the builders it replaced, which
tests/test_models.py checks). ``seed=None`` leaves the global generator alone (the caller seeded it).
tests/zoo.py is the other zoo: the real architectures.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

import lightning_bv as lbv


def _seeded(seed: int | None) -> None:
    if seed is not None:
        torch.manual_seed(seed)


def _typed(model: nn.Sequential, dtype: torch.dtype | None) -> nn.Sequential:
    return model if dtype is None else model.to(dtype)


def mlp(
    widths: Sequence[int] = (3, 6, 6, 2),
    *,
    bn: bool = False,
    leaky: bool = False,
    seed: int | None = 0,
    dtype: torch.dtype | None = None,
) -> nn.Sequential:
    """``Linear(widths[0], widths[1]), [BatchNorm1d], ReLU (LeakyReLU(0.1) with leaky), ..., Linear`` (no activation
    after the last Linear)."""
    _seeded(seed)
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(widths[:-1], widths[1:])):
        layers.append(nn.Linear(a, b))
        if i < len(widths) - 2:
            if bn:
                layers.append(nn.BatchNorm1d(b))
            layers.append(nn.LeakyReLU(0.1) if leaky else nn.ReLU())
    return _typed(nn.Sequential(*layers), dtype)


def mlp_and_groups(widths: Sequence[int] = (3, 5, 2), seed: int | None = 0) -> tuple[nn.Sequential, lbv.NeuronGroups]:
    """:func:`mlp` and its neuron groups, found on one random input drawn after the weights."""
    net = mlp(widths, seed=seed)
    return net, lbv.find_neurons(net, torch.randn(1, widths[0]))


def low_rank_mlp(
    rank: int, targets: list[str], widths: Sequence[int] = (3, 6, 6, 2), seed: int | None = 0
) -> nn.Module:
    """:func:`mlp` with ``targets`` made low-rank (``lightning_bv.apply_low_rank``)."""
    return lbv.apply_low_rank(mlp(widths, seed=seed), rank=rank, targets=targets)


def skip_mlp(targets: list[str], widths: Sequence[int] = (3, 6, 6, 2), seed: int | None = 0) -> nn.Module:
    """:func:`mlp` with affine skip connections around ``targets`` (``lightning_bv.add_skip``)."""
    return lbv.add_skip(mlp(widths, seed=seed), targets)


def cnn_bn_avgpool(seed: int | None = None, dtype: torch.dtype | None = torch.float64) -> nn.Sequential:
    """Conv-BN-ReLU, Conv-ReLU, average pooling, then a Linear-ReLU-Linear head; input ``[N, 2, 8, 8]``."""
    _seeded(seed)
    return _typed(
        nn.Sequential(
            nn.Conv2d(2, 5, 3, padding=1),
            nn.BatchNorm2d(5),
            nn.ReLU(),
            nn.Conv2d(5, 4, 3),
            nn.ReLU(),
            nn.AvgPool2d(2),
            nn.Flatten(),
            nn.Linear(36, 6),
            nn.ReLU(),
            nn.Linear(6, 3),
        ),
        dtype,
    )


def cnn_bn_prelu(seed: int | None = 0) -> nn.Sequential:
    """Conv-BN-ReLU(inplace), max pooling, Dropout, Linear-PReLU(per neuron)-Linear; input ``[N, 1, 8, 8]``."""
    _seeded(seed)
    return nn.Sequential(
        nn.Conv2d(1, 4, 3),
        nn.BatchNorm2d(4),
        nn.ReLU(inplace=True),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Dropout(0.1),
        nn.Linear(36, 5),
        nn.PReLU(5),
        nn.Linear(5, 2),
    )


def cnn_strided(seed: int | None = 0) -> nn.Sequential:
    """Conv-ReLU, a strided Conv, then a Linear head; input ``[N, 3, 8, 8]``."""
    _seeded(seed)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 4, 3, stride=2), nn.Flatten(), nn.Linear(4 * 3 * 3, 2)
    )


def cnn_same_padding(seed: int | None = 0) -> nn.Sequential:
    """Three convolutions (the first strided) with ``padding = (kernel_size - 1) / 2``, the last without bias."""
    _seeded(seed)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, stride=2, padding=1),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(8, 4, 5, padding=2, bias=False),
    )
