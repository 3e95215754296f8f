"""Neuron groups after a compaction: new groups for the compacted model, or the old ones remapped in place.

The changes of a compaction say, per module, which entries each axis kept; a group's neurons are those its first
producer slot kept, and each consumer slot's columns move to their new positions. A slot on a factor of a lifted
product that compaction merged back reads the (new, dense) weight instead.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any, cast

import torch
from torch import Tensor, nn

from lightning_bv.neurons import GroupedSlot, NeuronGroup, Slot
from lightning_bv.transforms._shrinker import AXIS_LINEAR
from lightning_bv.transforms.shrinkers import shrinker_for


@dataclass(eq=False)
class Change:
    """Kept indices of one module along its axes ("out", "in", "rank"), with the sizes before."""

    module: nn.Module
    name: str
    keep: dict[str, Tensor] = field(default_factory=dict)
    size: dict[str, int] = field(default_factory=dict)
    removed: dict[str, Tensor] = field(default_factory=dict)  # bool masks of the removed entries


Changes = dict[int, Change]  # by id() of the module


def axis_of(s: Slot) -> str | None:
    """The module axis that holds the neurons of slot ``s`` (a Linear's axes for a module without a shrinker)."""
    shrinker = shrinker_for(s.module)
    if shrinker is None:
        return AXIS_LINEAR.get((s.param, s.dim))
    return shrinker.axis(s.param, s.dim)


def width(m: nn.Module, axis: str) -> int:
    """The width of ``m`` along ``axis`` (for a module without a shrinker: its weight's, a Linear's way)."""
    shrinker = shrinker_for(m)
    if shrinker is not None:
        return shrinker.size(m, axis)
    weight = cast(Tensor, m.weight)
    return int(weight.shape[0]) if axis == "out" else int(weight.shape[1]) * int(getattr(m, "groups", 1))


def _remapped_slots(g: NeuronGroup, changes: Changes) -> tuple[Tensor, list[Tensor | None]]:
    """The neurons of ``g`` kept, and the new column index of each of its consumer slots (None: trivial)."""
    first = g.w_slots[0] if g.w_slots else None
    c = changes.get(id(first.module)) if first is not None else None
    axis = axis_of(first) if first is not None else None
    kept = c.keep.get(axis) if c is not None and axis is not None else None
    if kept is None:  # this group's neurons are unchanged; its consumers' columns may have moved
        kept = torch.arange(g.num_neurons)
    elif c is not None and axis is not None and c.size[axis] != g.num_neurons:
        raise ValueError(f"Group '{g.name}' does not match the compacted model (stale groups)")
    new_index: list[Tensor | None] = []
    for s in g.v_slots:
        sc = changes.get(id(s.module))
        s_axis = axis_of(s)
        s_kept = sc.keep.get(s_axis) if sc is not None and s_axis is not None else None
        old = s.index if s.index is not None else torch.arange(g.num_neurons).unsqueeze(1)
        if sc is None or s_axis is None or s_kept is None:
            cols = old[kept]
        else:
            colmap = torch.full((sc.size[s_axis],), -1, dtype=torch.long)
            colmap[s_kept] = torch.arange(s_kept.numel())
            if int(old.max()) >= colmap.numel():
                raise ValueError(f"Group '{g.name}' does not match the compacted model (stale groups)")
            cols = colmap[old[kept]]
            if bool((cols < 0).any()):
                raise ValueError(f"Group '{g.name}' keeps a neuron whose columns of '{s.module_name}' were removed")
        n_in = width(s.module, "in") if s.param == "weight" else int(s.tensor().shape[1])
        trivial = cols.shape[1] == 1 and cols.shape[0] == n_in and bool((cols.flatten() == torch.arange(n_in)).all())
        new_index.append(None if trivial else cols)
    for s, idx in zip(g.v_slots, new_index):
        if idx is not None and s.dim == 0 and not isinstance(s, GroupedSlot):
            raise ValueError(f"Group '{g.name}' reads rows of '{s.module_name}' out of order after compaction")
    return kept, new_index


def remap_(g: NeuronGroup, changes: Changes) -> None:
    """Update ``g`` to the compacted model, in place (its consumer slots too)."""
    kept, new_index = _remapped_slots(g, changes)
    for s, idx in zip(g.v_slots, new_index):
        if isinstance(s, GroupedSlot):
            s.groups = int(cast(Any, s.module).groups)
        s.index = idx
    g.num_neurons = int(kept.numel())


def _copy_slot(s: Slot) -> Slot:
    new = copy.copy(s)
    for key in [k for k in vars(new) if k.startswith("_lbv_")]:  # caches of functional/ (keyed on the old index)
        delattr(new, key)
    return new


def copy_group(g: NeuronGroup) -> NeuronGroup:
    """A copy of ``g`` with copies of its slots (the modules are shared)."""
    new = copy.copy(g)
    new.w_slots = tuple(_copy_slot(s) for s in g.w_slots)
    new.b_slots = tuple(_copy_slot(s) for s in g.b_slots)
    new.v_slots = tuple(_copy_slot(s) for s in g.v_slots)
    return new


def remapped(g: NeuronGroup, changes: Changes) -> NeuronGroup:
    """A new group: ``g`` on the compacted model (``g`` is left as it is)."""
    new = copy_group(g)
    remap_(new, changes)
    return new


def unfactor_(g: NeuronGroup, merged: list[nn.Module]) -> None:
    """Slots of ``g`` on the factors of a merged layer read its (new, dense) weight instead, in place."""
    if not merged:
        return
    g.w_slots = tuple(s.owning_product() if s.factor and any(s.module is m for m in merged) else s for s in g.w_slots)
    g.v_slots = tuple(s.owning_product() if s.factor and any(s.module is m for m in merged) else s for s in g.v_slots)
