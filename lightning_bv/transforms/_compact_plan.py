"""The plan of :func:`~lightning_bv.transforms.compact.compact`: the removals of each group, merged per module.

They are made all at once from the modules' shrinkers (:mod:`lightning_bv.transforms.shrinkers`).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from lightning_bv._layers import FACTOR_U, FACTOR_V, low_rank_factors
from lightning_bv.neurons import NeuronGroup
from lightning_bv.transforms._compact_checks import ModelIndex
from lightning_bv.transforms._compact_remap import Change, Changes, axis_of, width
from lightning_bv.transforms._shrinker import CannotShrink, ParamMap, ShrinkPlan
from lightning_bv.transforms.shrinkers import shrinker_for

Edits = list[tuple[Change, str, Tensor]]


def plan_group(index: ModelIndex, g: NeuronGroup, remove: Tensor) -> Edits:
    """The removals ``g`` needs: (module change, axis, bool mask of removed entries along that axis)."""
    k = g.num_neurons
    edits: Edits = []

    def add(name: str, m: nn.Module, axis: str, mask: Tensor) -> None:
        edits.append((Change(m, name), axis, mask))

    rank_slots = [s for s in g.slots() if s.param in (FACTOR_U, FACTOR_V)]
    if rank_slots:  # the rank-1 components of a low-rank layer
        s = rank_slots[0]
        if any(r.module is not s.module for r in rank_slots) or len(rank_slots) != len(g.slots()):
            raise CannotShrink("it mixes low-rank components with other weights")
        index.check_layout(s.module_name, s.module, "layer")
        factors = low_rank_factors(s.module)
        if factors is None or factors[0].shape[1] != k:
            raise ValueError(f"Group '{g.name}' does not match the rank of '{s.module_name}': the groups are stale")
        add(s.module_name, s.module, "rank", remove)
        return edits

    for prod, norm in zip(g.producers, g.norms):
        if prod == norm:
            raise CannotShrink(
                f"its neurons are the channels of BatchNorm '{norm}', whose input is not the output of one Linear/Conv "
                "that only it reads (a concatenation, an input, a tensor other layers read too): a channel cannot be "
                "cut out of that input for this BatchNorm alone"
            )
        m = index.get(prod)
        index.check_layout(prod, m, "layer")
        _check_size(g, prod, width(m, "out"), "output features")
        add(prod, m, "out", remove)
        if norm is not None:
            bn = index.get(norm)
            index.check_layout(norm, bn, "norm")
            _check_size(g, norm, width(bn, "out"), "features")
            add(norm, bn, "out", remove)
    if g.activation_module is not None:  # a PReLU with one slope per neuron
        act = index.get(g.activation_module)
        index.check_layout(g.activation_module, act, "activation")
        _check_size(g, g.activation_module, width(act, "out"), "slopes")
        add(g.activation_module, act, "out", remove)
    for s in g.slots():
        axis = axis_of(s)
        if axis is None or (axis == "out" and s.module_name not in g.producers + g.norms):
            raise CannotShrink(f"its slot {s!r} is not a producer row or a consumer column compact knows")
    for s in g.v_slots:
        index.check_layout(s.module_name, s.module, "layer")
        n_in = width(s.module, "in")
        mask = torch.zeros(n_in, dtype=torch.bool)
        if s.index is None:
            _check_size(g, s.module_name, n_in, "input features")
            mask[remove] = True
        else:
            if s.index.shape[0] != k or int(s.index.max()) >= n_in:
                raise ValueError(f"Group '{g.name}' does not match the columns of '{s.module_name}': stale groups")
            mask[s.index[remove].flatten().cpu()] = True
        add(s.module_name, s.module, "in", mask)
    return edits


def _check_size(g: NeuronGroup, name: str, size: int, what: str) -> None:
    if size != g.num_neurons:
        raise ValueError(
            f"Group '{g.name}' has {g.num_neurons} neurons but '{name}' has {size} {what}: the groups are stale (found "
            "before the model changed). Find them again, or get new ones from the report of that compaction: "
            "CompactionReport.remap(groups)."
        )


def merge(changes: Changes, edits: Edits) -> None:
    """Add one group's removals to ``changes``, unless they collide with another group's (then add nothing)."""
    merged: dict[int, tuple[Change, dict[str, Tensor]]] = {}
    for c, axis, mask in edits:
        old = changes.get(id(c.module))
        prev = None if old is None else old.removed.get(axis)
        if prev is not None and (axis != "in" or prev.shape != mask.shape or bool((prev & mask).any())):
            raise CannotShrink(f"another group already removes entries of '{c.name}' ({axis} axis)")
        entry = merged.setdefault(id(c.module), (c, dict(old.removed) if old is not None else {}))
        entry[1][axis] = mask if axis not in entry[1] else entry[1][axis] | mask
    for c, removed in merged.values():
        shrinker = shrinker_for(c.module)
        if shrinker is not None:
            shrinker.check_removal(c.name, c.module, removed)
    for c, axis, mask in edits:
        old = changes.setdefault(id(c.module), c)
        prev = old.removed.get(axis)
        old.removed[axis] = mask if prev is None else prev | mask


def apply(changes: Changes) -> ParamMap:
    """Build every new tensor first, then swap them in (restoring everything if a swap fails); the param map."""
    plan = ShrinkPlan()
    for c in changes.values():
        for axis, mask in c.removed.items():
            c.size[axis] = int(mask.numel())
            c.keep[axis] = torch.nonzero(~mask).flatten()
        shrinker = shrinker_for(c.module)
        assert shrinker is not None  # checked by plan_group
        shrinker.plan(c.module, c.keep, plan)
    plan.apply()
    return plan.param_map
