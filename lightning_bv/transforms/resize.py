"""Resizing to compacted shapes: :func:`slice_optimizer_state_` and :func:`resize_to_state_dict_`.

After :func:`~lightning_bv.transforms.compact.compact`, :func:`slice_optimizer_state_` carries an optimizer over to the
new, smaller Parameters (its state sliced to the kept entries), and :func:`resize_to_state_dict_` gives a freshly built
model the sizes of a compacted model's ``state_dict`` so that it loads. :class:`~lightning_bv.callbacks.NeuronPruning`
uses them to slice optimizer state after each compaction and to resize the model before loading a compacted checkpoint.

"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from lightning_bv._layers import FACTOR_U as _U
from lightning_bv._layers import FACTOR_V as _V
from lightning_bv._layers import WEIGHTED, low_rank_factors
from lightning_bv.transforms._shrinker import take as _take
from lightning_bv.transforms.shrinkers import shrinker_for


@torch.no_grad()
def slice_optimizer_state_(optimizer: torch.optim.Optimizer, param_map: Mapping[Tensor, Any]) -> int:
    """Carry an optimizer over a compaction: swap the replaced Parameters and slice their state, in place.

    For each old Parameter in ``optimizer.param_groups`` found in ``param_map`` (``CompactionReport.param_map``), the
    new Parameter takes its place, and every state tensor shaped like the old Parameter (SGD ``momentum_buffer``,
    Adam ``exp_avg``, ``exp_avg_sq``, ``max_exp_avg_sq``...) is sliced to the kept entries; other state (``step``)
    is kept. Training then goes on as if the removed neurons had never existed. No layer type is needed: the kept
    indices per dim that each layer's shrinker recorded (built in or registered) say how to slice.

    Returns:
        The number of Parameters swapped.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> from lightning_bv.transforms.compact import compact
        >>> net = nn.Sequential(nn.Linear(2, 4), nn.ReLU(), nn.Linear(4, 1))
        >>> opt = torch.optim.Adam(net.parameters())
        >>> net(torch.randn(3, 2)).sum().backward()
        >>> opt.step()
        >>> with torch.no_grad():
        ...     _ = net[2].weight[:, 0].zero_()
        >>> report = compact(net, example_input=torch.randn(1, 2))
        >>> slice_optimizer_state_(opt, report.param_map)  # 0.weight, 0.bias, 2.weight
        3
        >>> opt.state[net[0].weight]["exp_avg"].shape
        torch.Size([3, 2])

    """
    swapped = 0
    for group in optimizer.param_groups:
        params = group["params"]
        for i, p in enumerate(params):
            entry = param_map.get(p)
            if entry is None:
                continue
            new, keep = entry
            params[i] = new  # in place: LBFGS keeps this very list as its `_params`
            state = optimizer.state.pop(p, None)
            if state is not None:
                optimizer.state[new] = {k: _slice_like(v, p, keep) for k, v in state.items()}
            swapped += 1
    return swapped


@torch.no_grad()
def resize_to_state_dict_(
    model: nn.Module, state_dict: Mapping[str, Any], prefix: str = "", grow: bool = False
) -> list[str]:
    """Give the layers of ``model`` the sizes their entries have in ``state_dict`` (a compacted model's), in place.

    So that the ``state_dict`` of a compacted model loads into a freshly built model of the original sizes: every
    Linear, Conv (grouped and depthwise too), Hugging Face Conv1D, BatchNorm, PReLU and low-rank layer (and every
    layer type registered with :func:`~lightning_bv.transforms.shrinkers.register_layer_shrinker` whose shrinker
    resizes) whose saved tensors are smaller gets new, uninitialized
    Parameters and buffers of the saved sizes and updated size attributes; ``model.load_state_dict(state_dict)`` then
    fills them. Layers whose entries are missing or already match are left alone, and so are layers whose saved
    features or channels are *larger* (compaction only shrinks; the saved rank of a low-rank layer may be either):
    that is a checkpoint of another architecture, and ``load_state_dict`` reports the mismatching keys; with
    ``grow=True`` they get the larger sizes too (to load a checkpoint saved before a compaction into the compacted
    model; a layer saved as the factors of a product that compaction merged into one weight becomes that product
    again, and the other way round). Build the optimizer afterwards.

    Args:
        model: the freshly built model.
        state_dict: the saved state.
        prefix: the prefix of ``model``'s keys in ``state_dict``.
        grow: also give layers the larger sizes of their saved entries.

    Returns:
        The names of the resized layers.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> small = nn.Sequential(nn.Linear(3, 2), nn.ReLU(), nn.Linear(2, 1))
        >>> fresh = nn.Sequential(nn.Linear(3, 8), nn.ReLU(), nn.Linear(8, 1))
        >>> resize_to_state_dict_(fresh, small.state_dict())
        ['0', '2']
        >>> fresh.load_state_dict(small.state_dict())
        <All keys matched successfully>

    """
    resized = []
    for name, m in list(model.named_modules()):
        base = prefix + (f"{name}." if name else "")
        saved = {k[len(base) :]: v for k, v in state_dict.items() if k.startswith(base) and isinstance(v, Tensor)}
        changed = grow and _restructure(m, saved)
        if _resize_module(m, saved, grow) or changed:
            resized.append(name)
    return resized


def _restructure(m: Any, saved: dict[str, Tensor]) -> bool:
    """A dense layer saved as factors ``U, V`` becomes ``U @ V`` (low-rank); a low-rank one saved dense, dense.

    For ``grow=True``: a checkpoint saved before compaction holds the factors of a product that compaction merged
    into one dense weight (or the other way round); the values come from the state_dict right after.
    """
    if not isinstance(m, WEIGHTED) or getattr(m, "groups", 1) != 1:
        return False
    factors = low_rank_factors(m)
    if factors is None and _U in saved and _V in saved and "weight" not in saved:
        from lightning_bv.transforms.low_rank import _apply_ranks

        _apply_ranks({"": m}, {"": int(saved[_U].shape[1])})
        return True
    if factors is not None and "weight" in saved and _U not in saved:
        parametrize.remove_parametrizations(m, "weight", leave_parametrized=True)
        return True
    return False


def _resize_module(m: nn.Module, saved: dict[str, Tensor], grow: bool = False) -> bool:
    """Resize ``m`` with its layer type's shrinker (a module without one is left alone)."""
    shrinker = shrinker_for(m)
    return shrinker is not None and shrinker.resize(m, saved, grow)


# ------------------------------------------------------------------------------------------------------------
# slicing
# ------------------------------------------------------------------------------------------------------------
def _slice_like(value: Any, old: Tensor, keep: tuple[Tensor | None, ...]) -> Any:
    if isinstance(value, Tensor) and value.dim() > 0 and value.shape == old.shape:
        return _take(value, keep)
    return value
