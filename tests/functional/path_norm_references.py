"""References for the path_norm tests: path sums by explicit enumeration, and dense matrices of layers."""

import itertools
import math

import torch
import torch.nn.functional as F
from torch import nn


def enumerate_paths(layers, p):
    """Sum over every path of prod |w|^p, by explicit enumeration.

    ``layers`` is a list of dense ``(M, b)`` (``M``: out x in, ``b``: out or None) of a feed-forward chain; a path
    starts at an input coordinate or at a bias of some layer and ends at an output coordinate.
    """
    dims = [layers[0][0].shape[1]] + [m.shape[0] for m, _ in layers]
    total = 0.0
    for start in range(len(layers) + 1):
        if start > 0 and layers[start - 1][1] is None:
            continue
        for idx in itertools.product(*(range(d) for d in dims[start:])):
            w = 1.0 if start == 0 else abs(float(layers[start - 1][1][idx[0]])) ** p
            for j, k in enumerate(range(start, len(layers))):
                w *= abs(float(layers[k][0][idx[j + 1], idx[j]])) ** p
            total += w
    return total ** (1 / p)


def chain_norm(layers, p):
    """The same sum, layer by layer on an all-ones vector (a reference for larger dense chains)."""
    v = torch.ones(layers[0][0].shape[1], dtype=torch.float64)
    for m, b in layers:
        v = m.abs().pow(p) @ v + (0 if b is None else b.abs().pow(p))
    return float(v.sum()) ** (1 / p)


def dense(fn, in_shape):
    """Matrix of a map on tensors of shape ``in_shape``: column j is ``fn(e_j)`` flattened."""
    n = math.prod(in_shape)
    cols = [fn(torch.eye(n, dtype=torch.float64)[j].reshape(1, *in_shape)).reshape(-1) for j in range(n)]
    return torch.stack(cols, dim=1)


def conv_layer(conv, in_shape):
    """Dense ``(M, b)`` of a conv layer on inputs of shape ``in_shape`` (bias repeated over positions)."""
    w = conv.weight.detach().double()
    kw = {"stride": conv.stride, "padding": conv.padding, "dilation": conv.dilation, "groups": conv.groups}
    fn = getattr(F, f"conv{w.dim() - 2}d")
    m = dense(lambda x: fn(x, w, None, **kw), in_shape)
    if conv.bias is None:
        return m, None
    out = fn(torch.zeros(1, *in_shape, dtype=torch.float64), w, conv.bias.detach().double(), **kw)
    return m, out.reshape(-1)


def linear_layer(lin):
    return lin.weight.detach().double(), None if lin.bias is None else lin.bias.detach().double()


def randomize_bn(bn):
    with torch.no_grad():
        bn.weight.uniform_(-2, 2)
        bn.bias.uniform_(-1, 1)
        bn.running_mean.uniform_(-1, 1)
        bn.running_var.uniform_(0.2, 3)


def fold(conv, bn):
    """Conv followed by eval-mode BatchNorm, as one conv (by hand)."""
    scale = bn.weight.detach().double() / torch.sqrt(bn.running_var.double() + bn.eps)
    shift = bn.bias.detach().double() - bn.running_mean.double() * scale
    out = nn.Conv2d(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding).double()
    with torch.no_grad():
        out.weight.copy_(conv.weight.double() * scale.reshape(-1, 1, 1, 1))
        out.bias.copy_(shift if conv.bias is None else conv.bias.double() * scale + shift)
    return out
