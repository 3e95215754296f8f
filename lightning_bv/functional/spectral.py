"""Spectral measures of a weight matrix: stable rank and effective rank (pure torch).

A Linear weight ``[out, in]`` is a matrix as is; a Conv weight ``[out, in, *kernel]`` is read as the matrix
``out x (in * prod(kernel))``, each filter a row (the same convention as :func:`lightning_bv.apply_low_rank`).
A low-rank weight can be given as its factors ``(U, V)`` with ``W = U @ V``: the spectrum then costs
``O((out + in) r^2)`` instead of a decomposition of the full matrix.

* stable rank ``||W||_F^2 / ||W||_2^2`` (Rudelson & Vershynin, 2007): at most the rank, and insensitive to tiny
  singular values;
* effective rank ``exp(H(p))`` with ``p_i = sigma_i / sum_j sigma_j`` and ``H`` the Shannon entropy (Roy & Vetterli,
  "The effective rank: a measure of effective dimensionality", EUSIPCO 2007): between 1 and the rank, equal to the
  rank when all nonzero singular values are equal.

Both are 0 for the zero matrix. Computations run in float64 on the weight's device.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor

__all__ = ["Spectrum", "effective_rank", "singular_values", "spectrum", "stable_rank"]

Weight = Tensor | tuple[Tensor, Tensor]


class Spectrum(NamedTuple):
    """What :func:`spectrum` returns: the singular values (descending) and the two ranks, as float64 tensors."""

    singular_values: Tensor
    stable_rank: Tensor
    effective_rank: Tensor


def _as_matrix(weight: Tensor) -> Tensor:
    if not isinstance(weight, Tensor):
        raise TypeError(f"`weight` must be a tensor or a (U, V) pair of tensors, got {type(weight).__name__}")
    if weight.dim() < 2:
        raise ValueError(
            f"`weight` must have at least 2 dimensions ([out, in] or a conv's [out, in, *kernel]), got shape "
            f"{tuple(weight.shape)}"
        )
    return weight.detach().reshape(weight.shape[0], math.prod(weight.shape[1:])).to(torch.float64)


def singular_values(weight: Weight) -> Tensor:
    """Singular values of a weight matrix in descending order (float64, detached).

    Computed as the square roots of the eigenvalues of the Gram matrix of the smaller side, which is several times
    faster than an SVD for the square matrices of wide layers. Values below ``sqrt(n eps) * sigma_max`` (about
    ``5e-7 sigma_max`` for ``n = 1024``, ``eps`` the float64 machine epsilon) are rounding noise of that method and
    are returned as 0.

    Args:
        weight: a ``[out, in]`` or ``[out, in, *kernel]`` tensor, or a pair ``(U, V)`` of factors of
            ``W = U @ V`` (``U`` of shape ``[out, r]``, ``V`` of shape ``[r, in * prod(kernel)]``); then the ``r``
            singular values of the product are returned.

    Example:
        >>> singular_values(torch.diag(torch.tensor([3.0, 1.0, 2.0])))
        tensor([3., 2., 1.], dtype=torch.float64)
        >>> singular_values(torch.ones(2, 3, 2))  # a conv weight: 2 filters of 3 x 2 entries, equal
        tensor([3.4641, 0.0000], dtype=torch.float64)

    """
    if isinstance(weight, tuple):
        if len(weight) != 2:
            raise ValueError(f"a factored `weight` must be a pair (U, V), got {len(weight)} tensors")
        u, v = (_as_matrix(f) for f in weight)
        if u.shape[1] != v.shape[0]:
            raise ValueError(f"factors U {tuple(u.shape)} and V {tuple(v.shape)} do not multiply")
        # U = Q_u R_u, V^T = Q_v R_v  =>  U V = Q_u (R_u R_v^T) Q_v^T: the same singular values as the r x r core
        core = torch.linalg.qr(u, mode="r").R @ torch.linalg.qr(v.T, mode="r").R.T
        return singular_values(core)
    w = _as_matrix(weight)
    if w.numel() == 0:
        return w.new_zeros(0)
    gram = w @ w.T if w.shape[0] <= w.shape[1] else w.T @ w
    eig = torch.linalg.eigvalsh(gram).flip(0)  # descending
    cutoff = eig[0] * max(gram.shape[0], 1) * torch.finfo(torch.float64).eps
    return torch.where(eig > cutoff, eig, torch.zeros_like(eig)).sqrt()


def _stable(s: Tensor) -> Tensor:
    top = s[0] if s.numel() else s.new_zeros(())
    return torch.where(top > 0, (s * s).sum() / torch.where(top > 0, top * top, torch.ones_like(top)), top * 0)


def _effective(s: Tensor) -> Tensor:
    total = s.sum()
    if not total > 0:
        return total * 0
    p = s[s > 0] / total
    return torch.exp(-(p * p.log()).sum())


def spectrum(weight: Weight) -> Spectrum:
    """Singular values, stable rank and effective rank of a weight, from one decomposition.

    Example:
        >>> s = spectrum(torch.eye(4))
        >>> round(s.stable_rank.item(), 6), round(s.effective_rank.item(), 6)
        (4.0, 4.0)

    """
    s = singular_values(weight)
    return Spectrum(s, _stable(s), _effective(s))


def stable_rank(weight: Weight) -> Tensor:
    """``||W||_F^2 / ||W||_2^2`` of a weight matrix (conv weights read as ``out x (in * kernel)``); 0 for W = 0.

    Example:
        >>> stable_rank(torch.eye(3)).item()
        3.0
        >>> stable_rank(torch.outer(torch.arange(1.0, 4.0), torch.ones(5))).item()  # rank 1
        1.0
        >>> stable_rank(torch.diag(torch.tensor([2.0, 1.0]))).item()  # (4 + 1) / 4
        1.25

    """
    return _stable(singular_values(weight))


def effective_rank(weight: Weight) -> Tensor:
    """Roy & Vetterli's effective rank ``exp(-sum_i p_i log p_i)``, ``p_i = sigma_i / sum_j sigma_j``; 0 for W = 0.

    Example:
        >>> round(effective_rank(torch.eye(3)).item(), 6)
        3.0
        >>> round(effective_rank(torch.diag(torch.tensor([1.0, 1.0, 0.0]))).item(), 6)
        2.0
        >>> round(effective_rank(torch.diag(torch.tensor([3.0, 1.0]))).item(), 4)  # p = (3/4, 1/4)
        1.7548

    """
    return _effective(singular_values(weight))
