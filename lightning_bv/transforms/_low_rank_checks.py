"""The checks of :func:`~lightning_bv.transforms.low_rank.apply_low_rank`, all run before any layer changes.

Its arguments (``rank``/``energy``, the model), the layers ``targets`` may pick, and per layer whether it can be made
low-rank and at which rank (a fixed ``rank``, or the one ``energy`` picks from the singular values).
"""

from __future__ import annotations

import math
import numbers
from typing import Any, Optional, cast

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from lightning_bv._layers import CONVS as _CONVS
from lightning_bv._layers import WEIGHTED as _WEIGHTED
from lightning_bv._layers import WEIGHTED_NAMES as _SUPPORTED
from lightning_bv._layers import has_low_rank_weight, svd_dtype
from lightning_bv._select import Targets, show
from lightning_bv._sharding import refuse_split


def _check_model(model: object) -> None:
    if not isinstance(model, nn.Module):
        raise TypeError(f"`model` must be an nn.Module, got {type(model).__name__}")
    refuse_split(model, "apply_low_rank")


def _check_rank_energy(rank: Any, energy: Any) -> None:
    """Validate the ``rank``/``energy`` arguments of :func:`apply_low_rank` (shared with the ``LowRank`` callback)."""
    if (rank is None) == (energy is None):
        raise ValueError(
            f"Give exactly one of `rank` and `energy`, got rank={rank!r} and energy={energy!r}. "
            "`rank` fixes the rank of every layer; `energy` picks it per layer from the singular values."
        )
    if rank is not None and (isinstance(rank, bool) or not isinstance(rank, numbers.Integral) or rank < 1):
        raise ValueError(f"`rank` must be an int >= 1, got {rank!r}")
    if energy is not None and (
        isinstance(energy, bool) or not isinstance(energy, numbers.Real) or not 0.0 < float(energy) <= 1.0
    ):
        raise ValueError(
            f"`energy` must be a float in (0, 1] (the fraction of squared singular values kept), got {energy!r}"
        )


def _candidate_names(model: nn.Module, modules: dict[str, nn.Module], targets: Targets) -> list[str]:
    """The names ``targets`` is matched against: every module, or only the Linear/Conv layers when it is ``None``."""
    names = [n for n in modules if targets is not None or isinstance(modules[n], _WEIGHTED)]
    if not names:
        raise ValueError(f"`model` ({type(model).__name__}) contains no {_SUPPORTED} layer to make low-rank")
    return names


def _layer_rank(name: str, module: Any, rank: Optional[int], energy: Optional[float]) -> int:
    """Check that ``module`` can be made low-rank and return its rank (``rank``, or the one ``energy`` picks)."""
    _check_supported(name, module)
    if rank is None:
        assert energy is not None
        return _energy_rank(module.weight, float(energy))
    out_dim, in_dim = _matrix_shape(module)
    max_rank = min(out_dim, in_dim)
    if rank > max_rank:
        raise ValueError(
            f"`rank`={rank} is too large for layer {show(name)} ({_describe(module)}): its weight is a "
            f"{out_dim} x {in_dim} matrix, so the rank must be <= {max_rank}. Use `exclude` to skip it, "
            "or `energy=` for a per-layer rank."
        )
    return int(rank)


def _energy_rank(weight: Tensor, energy: float) -> int:
    with torch.no_grad():
        s = torch.linalg.svdvals(svd_dtype(weight.detach().reshape(weight.shape[0], -1))).double()
    cum = torch.cumsum(s * s, 0)
    return min(int((cum < energy * cum[-1]).sum()) + 1, s.numel())


def _matrix_shape(module: nn.Module) -> tuple[int, int]:
    weight = cast(Tensor, module.weight)
    return int(weight.shape[0]), int(math.prod(weight.shape[1:]))


def _check_supported(name: str, module: Any) -> None:
    if not isinstance(module, _WEIGHTED):
        raise TypeError(
            f"`targets` selected {show(name)} ({type(module).__name__}), which is not an {_SUPPORTED}. "
            "Only those layers can be made low-rank; narrow `targets` or add the name to `exclude`."
        )
    if has_low_rank_weight(module):
        raise ValueError(f"Layer {show(name)} ({_describe(module)}) is already low-rank; call `remove_low_rank` first")
    if parametrize.is_parametrized(module, "weight"):
        raise ValueError(
            f"Layer {show(name)} ({_describe(module)}) already has a parametrization on `weight`; "
            "remove it (torch.nn.utils.parametrize.remove_parametrizations) before `apply_low_rank`"
        )
    if isinstance(module.weight, nn.parameter.UninitializedParameter):
        raise ValueError(f"Layer {show(name)} is lazy and not initialized yet; run one forward pass first")
    if isinstance(module, _CONVS) and module.groups != 1:
        raise ValueError(
            f"Layer {show(name)} ({_describe(module)}) is a grouped conv (groups={module.groups}); "
            "only groups=1 is supported by `apply_low_rank`. Add it to `exclude`."
        )


def _describe(module: nn.Module) -> str:
    extra = module.extra_repr()
    return f"{parametrize.type_before_parametrizations(module).__name__}({extra})"
