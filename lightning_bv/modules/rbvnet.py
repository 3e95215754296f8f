"""The architecture of the deep representer theorem (docs/theory.md 5): :class:`RBVNet` and :class:`RBVBlock`.

Every layer ``f_l`` of a solution of ``min sum_n loss(y_n, f(x_n)) + lam * sum_l ||f_l||`` is a shallow ReLU block
``z -> V_l relu(W_l z - b_l) + C_l z + c_l``, and the blocks meet at linear bottlenecks of width ``d_l``.

Example:
    >>> import torch
    >>> net = RBVNet(in_features=3, out_features=2, width=16, bottleneck=4, depth=3)
    >>> tuple(net(torch.randn(5, 3)).shape)
    (5, 2)
    >>> [tuple(b.fc1.weight.shape) for b in net.blocks]
    [(16, 3), (16, 4), (16, 4)]

"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from lightning_bv._checks import check_int
from lightning_bv._layers import null_space


class RBVBlock(nn.Module):
    """One shallow ReLU block ``z -> fc2(relu(fc1(z))) + skip(z)``.

    ``fc1`` (``d_in -> width``) produces the block's ``width`` neurons, ``fc2`` (``width -> d_out``, no activation)
    consumes them, and ``skip`` (``d_in -> d_out``) is the affine null-space term ``C z + c``, a Linear marked as a
    skip path: it reads the block input, not the neurons, so it belongs to no neuron group and is not charged by the
    path-norm penalty.

    Initialization: ``fc1`` Kaiming-uniform for ReLU (fan-in), default bias; ``fc2`` Kaiming-uniform with gain 1
    (variance-preserving), zero bias; ``skip`` zero (weight and bias), so at initialization the block is the plain
    shallow network and the skip learns from there, like :func:`lightning_bv.transforms.skip.add_skip`.

    Args:
        d_in: input features.
        width: number of ReLU neurons.
        d_out: output features.

    Example:
        >>> block = RBVBlock(4, 8, 2)
        >>> z = torch.randn(3, 4)
        >>> torch.allclose(block(z), block.fc2(torch.relu(block.fc1(z))) + block.skip(z))
        True

    """

    def __init__(self, d_in: int, width: int, d_out: int) -> None:
        super().__init__()
        for arg, value in (("d_in", d_in), ("width", width), ("d_out", d_out)):
            check_int(arg, value, 1)
        self.fc1 = nn.Linear(d_in, width)
        self.act = nn.ReLU()
        self.fc2 = nn.Linear(width, d_out)
        self.skip = null_space(nn.Linear(d_in, d_out))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Re-initialize as described in the class docstring."""
        with torch.no_grad():
            nn.init.kaiming_uniform_(self.fc1.weight, nonlinearity="relu")
            bound = 1.0 / math.sqrt(self.fc1.in_features)
            nn.init.uniform_(self.fc1.bias, -bound, bound)
            nn.init.kaiming_uniform_(self.fc2.weight, nonlinearity="linear")
            nn.init.zeros_(self.fc2.bias)
            nn.init.zeros_(self.skip.weight)
            nn.init.zeros_(self.skip.bias)

    def forward(self, z: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(z))) + self.skip(z)


class RBVNet(nn.Module):
    """``depth`` :class:`RBVBlock` s in a row: ``in_features -> bottleneck -> ... -> bottleneck -> out_features``.

    Block ``l`` has ``width`` ReLU neurons; its output has ``bottleneck`` features, except the last block's, which has
    ``out_features``. Neuron discovery finds exactly ``depth`` groups of ``width`` neurons (producer ``blocks.l.fc1``,
    consumer ``blocks.l.fc2``); the skips are in no group. Module names: ``blocks.<l>.fc1``, ``.act``, ``.fc2``,
    ``.skip``. ``bottleneck`` is unused when ``depth == 1``.

    Args:
        in_features: input features (``>= 1``).
        out_features: output features (``>= 1``).
        width: ReLU neurons per block (``>= 1``).
        bottleneck: features between blocks (``>= 1``).
        depth: number of blocks (``>= 1``).

    Raises:
        ValueError: a size that is not an int ``>= 1``.

    Example:
        >>> net = RBVNet(in_features=1, out_features=1, width=32, bottleneck=1, depth=2)
        >>> sum(p.numel() for p in net.parameters())  # 2 * (32 + 32 + 32 + 1 + 1 + 1)
        198

    """

    def __init__(self, in_features: int, out_features: int, width: int, bottleneck: int, depth: int) -> None:
        super().__init__()
        sizes = {
            "in_features": in_features,
            "out_features": out_features,
            "width": width,
            "bottleneck": bottleneck,
            "depth": depth,
        }
        for arg, value in sizes.items():
            check_int(arg, value, 1)
        self.in_features, self.out_features = int(in_features), int(out_features)
        self.width, self.bottleneck, self.depth = int(width), int(bottleneck), int(depth)
        dims = [self.in_features] + [self.bottleneck] * (self.depth - 1) + [self.out_features]
        self.blocks = nn.Sequential(*(RBVBlock(dims[i], self.width, dims[i + 1]) for i in range(self.depth)))

    def forward(self, x: Tensor) -> Tensor:
        return self.blocks(x)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, width={self.width}, "
            f"bottleneck={self.bottleneck}, depth={self.depth}"
        )
