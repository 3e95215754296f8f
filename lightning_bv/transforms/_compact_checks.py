"""The checks of :func:`~lightning_bv.transforms.compact.compact`, all made before anything changes.

The model (a plain ``nn.Module``, not wrapped in ``DistributedDataParallel``, not sharded), the groups (found on this
model, not stale), and each module to shrink: a layer type with a registered shrinker in the role the group needs,
no tensors its shrinker does not know, no parametrization other than low-rank, initialized, registered under one
name, no parameter tied to another module.
"""

from __future__ import annotations

from typing import Any, cast

from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.nn.utils import parametrize

from lightning_bv._layers import low_rank_factors
from lightning_bv._sharding import refuse_split
from lightning_bv.neurons import GroupedSlot, NeuronGroup
from lightning_bv.transforms._shrinker import CannotShrink, LayerShrinker
from lightning_bv.transforms.shrinkers import shrinker_for

_NOT_ONE = {
    "norm": "'{name}' is a {kind}, not a BatchNorm",
    "activation": "its per-neuron activation slopes are in '{name}' ({kind}), not a PReLU",
    "layer": "'{name}' is a {kind}, which compact cannot shrink (Linear/Conv only)",
}


def check_model(model: object) -> None:
    """Raise unless ``model`` is an ``nn.Module`` whose parameters can be replaced."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"`model` must be an nn.Module, got {type(model).__name__}")
    refuse_split(model, "compact")
    for name, m in model.named_modules():
        if isinstance(m, DistributedDataParallel):
            where = "`model`" if name == "" else f"module '{name}' of `model`"
            raise TypeError(
                f"{where} is wrapped in DistributedDataParallel, which registered its parameters when it wrapped the "
                "model; they cannot be replaced. Compact the plain module (`ddp.module`) before wrapping it, or "
                "after training, then wrap it again."
            )


def count(model: nn.Module) -> int:
    """Parameter entries of ``model``."""
    return sum(p.numel() for p in model.parameters())


class ModelIndex:
    """Names, aliases and parameter owners of a model, for the checks."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.names: dict[int, list[str]] = {}
        self.owners: dict[int, set[str]] = {}
        for name, m in model.named_modules(remove_duplicate=False):
            self.names.setdefault(id(m), []).append(name)
            for _, p in m.named_parameters(recurse=False):
                self.owners.setdefault(id(p), set()).add(name)

    def get(self, name: str) -> nn.Module:
        """The module ``name`` of the model (ValueError naming it when there is none)."""
        try:
            return self.model.get_submodule(name)
        except AttributeError as err:
            raise ValueError(
                f"The neuron groups name a module '{name}' that `model` does not have: pass groups found on this "
                "model (find_neurons(model, x))"
            ) from err

    def check_group(self, g: NeuronGroup) -> None:
        """Raise unless ``g`` was found on this model and still matches its sizes."""
        k = g.num_neurons
        for s in g.slots():
            if self.get(s.module_name) is not s.module:
                raise ValueError(
                    f"Group '{g.name}' refers to a module '{s.module_name}' that is not the one in `model`: pass "
                    "groups found on this model (find_neurons(model, x))"
                )
            shape = s.tensor().shape
            width = shape[1] * s.groups if isinstance(s, GroupedSlot) else shape[1] if s.dim == 1 else 0
            if s.dim == 0:
                ok = shape[0] == k
            elif s.index is None:
                ok = width == k
            else:
                ok = s.index.shape[0] == k and int(s.index.max()) < width
            if not ok:
                raise ValueError(
                    f"Group '{g.name}' has {k} neurons, which does not match {s!r} of shape {tuple(shape)}: the "
                    "groups are stale (found before the model changed). Find them again, or get new ones from "
                    "the report of that compaction: CompactionReport.remap(groups)."
                )

    def check_layout(self, name: str, m: nn.Module, role: str) -> LayerShrinker:
        """The shrinker of ``m``; CannotShrink (ValueError for an unknown parametrization) unless it can shrink it."""
        shrinker = shrinker_for(m)
        if shrinker is None or shrinker.role != role:
            raise CannotShrink(_NOT_ONE[role].format(name=name, kind=type(m).__name__))
        check_parametrizations(name, m)
        extra = sorted(set(m._parameters) - set(shrinker.parameters))
        extra += sorted(set(m._buffers) - set(shrinker.buffers))
        if extra:
            raise CannotShrink(
                f"'{name}' ({type(m).__name__}) has tensors {extra} that compact does not know how to shrink "
                f"(register a LayerShrinker for {type(m).__name__} with lightning_bv.register_layer_shrinker)"
            )
        if any(isinstance(p, nn.parameter.UninitializedParameter) for p in m.parameters()):
            raise CannotShrink(f"'{name}' is a lazy module that is not initialized yet")
        aliases = self.names.get(id(m), [name])
        if len(aliases) > 1:
            raise CannotShrink(
                f"'{name}' is registered under several names {aliases}; it may be called elsewhere in the model"
            )
        for p in m.parameters():
            shared = self.owners.get(id(p), set()) - {name, f"{name}.parametrizations.weight".lstrip(".")}
            if shared:
                raise CannotShrink(f"a parameter of '{name}' is shared with {sorted(shared)} (tied weights)")
        return shrinker


def check_parametrizations(name: str, m: nn.Module) -> bool:
    """True for a low-rank module; ValueError for any parametrization compact does not understand."""
    if not parametrize.is_parametrized(m):
        return False
    plists = cast(Any, m).parametrizations
    for tensor, plist in plists.items():
        if tensor != "weight" or low_rank_factors(m) is None:
            kinds = [type(p).__name__ for p in plist]
            raise ValueError(
                f"Cannot compact '{name}': its `{tensor}` is parametrized by {kinds}, which compact does not know "
                "how to shrink (only LowRankWeight from apply_low_rank). Remove it first "
                "(torch.nn.utils.parametrize.remove_parametrizations)."
            )
    return True
