"""The base class of the per-layer-type shrinkers, and the plan of edits they fill (pure torch).

A :class:`LayerShrinker` knows one layer type: which of its tensors hold neurons along which axis (``"out"`` rows,
``"in"`` columns, ``"rank"`` components of a low-rank layer), how wide it is, which removals leave a valid layer, the
new tensors and size attributes for the kept entries, and how to take the sizes of a saved ``state_dict``.
:func:`~lightning_bv.transforms.compact.compact` asks it for the edits and makes them all at once from a
:class:`ShrinkPlan`; :func:`~lightning_bv.transforms.resize.resize_to_state_dict_` asks it to resize; the kept
indices it records per replaced Parameter are what
:func:`~lightning_bv.transforms.resize.slice_optimizer_state_` slices the optimizer state with (:func:`take`).
The registry (:mod:`lightning_bv.transforms.shrinkers`) says which shrinker a module gets.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

Keep = tuple[Tensor | None, ...]
"""Kept indices per dim of a tensor; None keeps the whole dim, a 2-D index keeps per row its own columns."""
ParamMap = dict[Tensor, tuple[nn.Parameter, Keep]]
"""``{old Parameter: (new Parameter, kept indices per dim)}``."""

AXIS_LINEAR = {("weight", 0): "out", ("bias", 0): "out", ("weight", 1): "in"}
"""The axes of a layer whose weight is ``[out, in, *kernel]`` (Linear, Conv), by (slot param, slot dim)."""


class CannotShrink(Exception):
    """A module cannot be shrunk the way a group needs; compaction leaves the group whole, with this reason."""


def take(t: Tensor, keep: Keep) -> Tensor:
    """The entries of ``t`` kept by ``keep`` (one index per dim; a 2-D index gives each row its own columns).

    Example:
        >>> take(torch.arange(6).reshape(2, 3), (None, torch.tensor([0, 2])))
        tensor([[0, 2],
                [3, 5]])
    """
    for dim, idx in enumerate(keep):
        if idx is None:
            continue
        if idx.dim() == 2:  # per-row columns (each group of a grouped conv keeps its own input channels)
            t = t.gather(
                dim, idx.to(t.device).reshape(*idx.shape, *([1] * (t.dim() - 2))).expand(*idx.shape, *t.shape[2:])
            )
        else:
            t = t.index_select(dim, idx.to(t.device))
    return t.contiguous()


def same_format(new: Tensor, old: Tensor) -> Tensor:
    """``new`` in the memory format of ``old`` (a channels_last model stays channels_last)."""
    for fmt, dims in ((torch.channels_last, 4), (torch.channels_last_3d, 5)):
        if old.dim() == dims and not old.is_contiguous() and old.is_contiguous(memory_format=fmt):
            return new.contiguous(memory_format=fmt)
    return new


def fresh(old: Any, shape: tuple[int, ...]) -> Any:
    """An uninitialized tensor like ``old`` of shape ``shape`` (a Parameter keeps ``requires_grad``); for resizing."""
    new = old.new_empty(shape)
    return nn.Parameter(new, requires_grad=old.requires_grad) if isinstance(old, nn.Parameter) else new


class ShrinkPlan:
    """The edits of one compaction, collected before any is made; :meth:`apply` makes them all or none.

    Attributes:
        edits: ``(owner module, attribute, new value)`` in order.
        param_map: ``{old Parameter: (new Parameter, kept indices per dim)}`` of every Parameter :meth:`param` replaced.
    """

    def __init__(self) -> None:
        self.edits: list[tuple[nn.Module, str, Any]] = []
        self.param_map: ParamMap = {}

    def param(self, owner: nn.Module, attr: str, keep: Keep) -> None:
        """Replace Parameter ``owner.<attr>`` by a new one of its kept entries (dtype, device, grad flag kept).

        Nothing is planned when the attribute is None or ``keep`` keeps everything.
        """
        old = getattr(owner, attr)
        if old is None or all(i is None for i in keep):
            return
        new = nn.Parameter(same_format(take(old.detach(), keep), old), requires_grad=old.requires_grad)
        self.param_map[old] = (new, keep)
        self.edits.append((owner, attr, new))

    def buffer(self, owner: nn.Module, attr: str, keep: Keep) -> None:
        """Replace buffer ``owner.<attr>`` by its kept entries (nothing when it is None or all is kept)."""
        old = getattr(owner, attr)
        if old is not None and not all(i is None for i in keep):
            self.edits.append((owner, attr, take(old, keep)))

    def set(self, owner: nn.Module, attr: str, value: Any) -> None:
        """Set ``owner.<attr>`` (a size attribute: ``out_features``, ``groups``...) to ``value``."""
        self.edits.append((owner, attr, value))

    def apply(self) -> None:
        """Make every edit; if one fails, restore those made and raise."""
        done: list[tuple[nn.Module, str, Any]] = []
        try:
            for owner, attr, value in self.edits:
                done.append((owner, attr, getattr(owner, attr)))
                setattr(owner, attr, value)
        except BaseException:
            for owner, attr, value in reversed(done):
                setattr(owner, attr, value)
            raise


class LayerShrinker:
    """How compaction and resizing shrink one layer type: subclass it and register it for your own layer.

    The neurons of a group sit along an axis of each module: ``"out"`` (producer rows, a BatchNorm's or PReLU's
    per-channel entries), ``"in"`` (consumer columns) or ``"rank"`` (components of a low-rank weight). Compaction
    checks the module (:attr:`role`, :attr:`parameters`, :attr:`buffers`, :meth:`size`, :meth:`check_removal`) before
    anything changes, then asks :meth:`plan` for the new tensors. Override :meth:`resize` to let
    :func:`~lightning_bv.transforms.resize.resize_to_state_dict_` load a compacted checkpoint into the layer.

    Attributes:
        role: where the layer sits in a neuron group: ``"layer"`` (a producer or consumer weight), ``"norm"`` (a
            BatchNorm between producer and activation) or ``"activation"`` (per-neuron activation parameters).
        parameters: the names of the module's own Parameters this shrinker knows (any other makes compaction leave
            the group whole).
        buffers: the names of its buffers it knows.
    """

    role: str = "layer"
    parameters: tuple[str, ...] = ("weight", "bias")
    buffers: tuple[str, ...] = ()

    def variant(self, module: nn.Module) -> LayerShrinker:
        """The shrinker for this very module (a grouped or low-rank layer may need another); ``self`` by default."""
        return self

    def axis(self, param: str, dim: int) -> str | None:
        """The axis that slot ``(param, dim)`` of a neuron group indexes, or None if it is not one this layer has."""
        return AXIS_LINEAR.get((param, dim))

    def size(self, module: nn.Module, axis: str) -> int:
        """The width of ``module`` along ``axis`` (``"out"``, ``"in"`` or ``"rank"``)."""
        raise NotImplementedError(f"{type(self).__name__} does not say the {axis!r} width of a {type(module).__name__}")

    def check_removal(self, name: str, module: nn.Module, removed: Mapping[str, Tensor]) -> None:
        """Raise :class:`CannotShrink` unless removing these entries (bool masks per axis) leaves a valid layer."""

    def plan(self, module: nn.Module, keep: Mapping[str, Tensor], plan: ShrinkPlan) -> None:
        """Add to ``plan`` the new tensors and size attributes of ``module`` keeping ``keep[axis]`` (sorted indices).

        An axis missing from ``keep`` is kept whole. Use :meth:`ShrinkPlan.param` for Parameters (it records them
        for the optimizer), :meth:`ShrinkPlan.buffer` for buffers and :meth:`ShrinkPlan.set` for attributes.
        """
        raise NotImplementedError(f"{type(self).__name__} cannot shrink a {type(module).__name__}")

    def resize(self, module: nn.Module, saved: Mapping[str, Tensor], grow: bool = False) -> bool:
        """Give ``module`` the sizes of its ``saved`` entries (keys relative to it), uninitialized; whether it changed.

        Only smaller sizes unless ``grow``. The default leaves the module alone (``load_state_dict`` then reports
        the mismatching keys).
        """
        return False

    def removed(self, module: nn.Module, keep: Mapping[str, Tensor], axis: str) -> Tensor:
        """The bool mask of the entries removed along ``axis`` (all False when the axis is kept whole)."""
        mask = torch.zeros(self.size(module, axis), dtype=torch.bool)
        if axis in keep:
            mask[:] = True
            mask[keep[axis]] = False
        return mask
