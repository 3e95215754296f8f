"""The layer types the library knows, and its own layer objects, recognized by class.

Pure torch, imported by every layer above it. ``LowRankWeight`` is the parametrization that
:func:`~lightning_bv.transforms.low_rank.apply_low_rank` registers; :class:`NullSpace` marks a module that computes
the affine null space of the seminorm (a skip path), which neuron discovery never charges. Both are recognized with
``isinstance``, as :mod:`torch.nn.utils.parametrize` and :mod:`torch.nn.utils.prune` recognize their own objects.
"""

from __future__ import annotations

from typing import Any, TypeVar, cast

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.utils import parametrize

CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
"""The convolutions whose channels are neurons (grouped and depthwise ones included)."""
WEIGHTED = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
"""The layers with a weight matrix (a conv's as ``out x in*kernel``): low-rank targets, producers and consumers."""
WEIGHTED_NAMES = "nn.Linear, nn.Conv1d, nn.Conv2d or nn.Conv3d"
BATCH_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
"""The BatchNorms that discovery reads between a producer and its activation."""
ANY_BATCH_NORM = _BatchNorm
"""Every BatchNorm (SyncBatchNorm included): what compaction and resizing shrink."""

U_KEY, V_KEY = "original0", "original1"
"""The names of ``U`` and ``V`` in a low-rank weight's ``ParametrizationList`` (torch's names for a pair)."""
FACTOR_U = f"parametrizations.weight.{U_KEY}"
"""Where a low-rank layer holds ``U`` (``[out, r]``), relative to the layer."""
FACTOR_V = f"parametrizations.weight.{V_KEY}"
"""Where a low-rank layer holds ``V`` (``[r, in * prod(kernel_size)]``), relative to the layer."""


class LowRankWeight(nn.Module):
    """Parametrization ``(U, V) -> (U @ V).reshape(weight_shape)`` of a Linear/Conv weight.

    Register it with ``register_parametrization(module, "weight", LowRankWeight(rank, shape), unsafe=True)``;
    :meth:`right_inverse` turns a dense weight into its rank-``rank`` SVD factors. :func:`apply_low_rank` does this.

    Args:
        rank: number of rank-1 components ``r``.
        weight_shape: shape of the dense weight, ``[out, in, *kernel_size]``.

    Example:
        >>> p = LowRankWeight(2, (3, 4))
        >>> U, V = p.right_inverse(torch.randn(3, 4))
        >>> tuple(U.shape), tuple(V.shape), tuple(p(U, V).shape)
        ((3, 2), (2, 4), (3, 4))

    """

    lifted = False  # True when lift_shared_weights made it (a full-rank product that compact merges back)

    def __init__(self, rank: int, weight_shape: tuple[int, ...]) -> None:
        super().__init__()
        self.rank = int(rank)
        self.weight_shape = tuple(int(s) for s in weight_shape)

    def forward(self, U: Tensor, V: Tensor) -> Tensor:  # noqa: N803
        return (U @ V).reshape(self.weight_shape)

    def right_inverse(self, weight: Tensor) -> tuple[Tensor, Tensor]:
        """Return ``(U, V)``: the rank-``rank`` truncated SVD of ``weight`` with ``sqrt(S)`` on each side."""
        matrix = weight.detach().reshape(weight.shape[0], -1)
        u, s, vh = torch.linalg.svd(svd_dtype(matrix), full_matrices=False)
        root = s[: self.rank].sqrt()
        U = (u[:, : self.rank] * root).to(weight.dtype).contiguous()  # noqa: N806
        V = (root[:, None] * vh[: self.rank]).to(weight.dtype).contiguous()  # noqa: N806
        return U, V

    def extra_repr(self) -> str:
        return f"rank={self.rank}, weight_shape={self.weight_shape}" + (", lifted=True" if self.lifted else "")


def svd_dtype(matrix: Tensor) -> Tensor:
    """``matrix`` in a dtype that ``torch.linalg.svd`` accepts (float32 for half precision)."""
    return matrix if matrix.dtype in (torch.float32, torch.float64) else matrix.float()


def weight_parametrizations(module: nn.Module) -> Any:
    """The ``ParametrizationList`` of ``module.weight`` (``module.parametrizations["weight"]``)."""
    return cast(Any, module).parametrizations["weight"]


def low_rank_weight(module: nn.Module) -> LowRankWeight | None:
    """The :class:`LowRankWeight` that parametrizes ``module.weight`` alone, or None."""
    if not parametrize.is_parametrized(module, "weight"):
        return None
    plist = weight_parametrizations(module)
    if len(plist) != 1 or not isinstance(plist[0], LowRankWeight):
        return None
    return plist[0]


def has_low_rank_weight(module: nn.Module) -> bool:
    """Whether any parametrization of ``module.weight`` is a :class:`LowRankWeight` (alone or with others)."""
    if not parametrize.is_parametrized(module, "weight"):
        return False
    return any(isinstance(p, LowRankWeight) for p in weight_parametrizations(module))


def low_rank_factors(module: nn.Module) -> tuple[Tensor, Tensor] | None:
    """``(U, V)`` of a weight parametrized by ``apply_low_rank`` (W = U @ V, conv weights as out x in*kernel)."""
    if low_rank_weight(module) is None:
        return None
    return plist_factors(weight_parametrizations(module))


def plist_factors(plist: Any) -> tuple[Tensor, Tensor]:
    """``(U, V)`` held by a low-rank weight's ``ParametrizationList``."""
    return getattr(plist, U_KEY), getattr(plist, V_KEY)


def set_plist_factors(plist: Any, u: nn.Parameter, v: nn.Parameter) -> None:
    """Replace ``U`` and ``V`` in a low-rank weight's ``ParametrizationList`` by new Parameters."""
    setattr(plist, U_KEY, u)
    setattr(plist, V_KEY, v)


def set_low_rank_factors(module: nn.Module, u: nn.Parameter, v: nn.Parameter) -> None:
    """Replace ``U`` and ``V`` of a low-rank layer by new Parameters (for example of another rank)."""
    set_plist_factors(weight_parametrizations(module), u, v)


class NullSpace:
    """Mixin that marks a module as an affine null-space term ``C z + c`` (a skip path): never charged.

    :func:`null_space` gives a Linear or Conv layer this mark in place, keeping its parameters, state_dict keys and
    repr; :func:`is_null_space` recognizes it.
    """

    def _get_name(self) -> str:
        return next(c.__name__ for c in type(self).__mro__ if c.__module__ != __name__ and c is not NullSpace)


class NullSpaceLinear(NullSpace, nn.Linear):
    """An ``nn.Linear`` that is a skip path (see :class:`NullSpace`)."""


class NullSpaceConv1d(NullSpace, nn.Conv1d):
    """An ``nn.Conv1d`` that is a skip path (see :class:`NullSpace`)."""


class NullSpaceConv2d(NullSpace, nn.Conv2d):
    """An ``nn.Conv2d`` that is a skip path (see :class:`NullSpace`)."""


class NullSpaceConv3d(NullSpace, nn.Conv3d):
    """An ``nn.Conv3d`` that is a skip path (see :class:`NullSpace`)."""


_NULL_SPACE: dict[type, type] = {
    nn.Linear: NullSpaceLinear,
    nn.Conv1d: NullSpaceConv1d,
    nn.Conv2d: NullSpaceConv2d,
    nn.Conv3d: NullSpaceConv3d,
}


_M = TypeVar("_M", bound=nn.Module)


def null_space(module: _M) -> _M:
    """Mark ``module`` (an ``nn.Linear`` or ``nn.Conv1d/2d/3d``) as a skip path, in place.

    A subclass of one of them gets a class made for it, which pickles only if torch can find it by name.

    Example:
        >>> skip = null_space(nn.Linear(3, 2))
        >>> is_null_space(skip), skip
        (True, Linear(in_features=3, out_features=2, bias=True))

    """
    if isinstance(module, NullSpace):
        return module
    if not isinstance(module, WEIGHTED):
        kind = type(module).__name__
        raise TypeError(f"`module` must be an {WEIGHTED_NAMES} to be marked as a skip path, got {kind}")
    cls = _NULL_SPACE.get(type(module))
    if cls is None:
        cls = _NULL_SPACE[type(module)] = type(type(module).__name__, (NullSpace, type(module)), {})
    module.__class__ = cls
    return module


def is_null_space(module: nn.Module) -> bool:
    """True for modules that compute the affine null space of the seminorm (skip connections): never charged."""
    return isinstance(module, NullSpace)
