"""Weights sharded by rows across processes (torch's FSDP2, ``fully_shard``): their local part and the reductions.

FSDP2 stores each parameter as a ``DTensor`` split by rows (``Shard(0)``) over a one-dimensional mesh: each rank
holds a contiguous block of rows. The neuron groups' kernels work on that block:

* a per-neuron sum over a slot's entries is a local sum, completed by one all-reduce (rows a rank does not hold
  contribute 0 there): :func:`all_reduce_` sums the vectors of a whole group in one call;
* a per-neuron rescale multiplies the local block by its rows' part of the multiplier; no communication.

Nothing here imports Lightning. Plain tensors pass through unchanged (``group`` is None).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

try:
    from torch.distributed.tensor import DTensor, Replicate, Shard
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset
except ImportError:  # pragma: no cover - torch built without distributed
    DTensor = None  # type: ignore[assignment,misc]


@dataclass
class Local:
    """The part of a tensor this rank holds: rows ``[start, start + tensor.shape[0])`` of the whole."""

    tensor: Tensor
    start: int
    rows: int  # of the whole tensor
    group: Any  # the process group the rows are split over; None for a plain (or replicated) tensor

    @property
    def split(self) -> bool:
        return self.group is not None

    def rows_of(self, m: Tensor) -> Tensor:
        """The rows of this rank in a multiplier ``m`` broadcastable to the whole tensor (one per row, or broadcast)."""
        if not self.split or m.dim() == 0 or m.shape[0] != self.rows:
            return m
        return m.narrow(0, self.start, self.tensor.shape[0])


def is_sharded(t: object) -> bool:
    """Whether ``t`` is a DTensor (FSDP2's parameters, their gradients and their optimizer state)."""
    return DTensor is not None and isinstance(t, DTensor)


def local(t: Tensor) -> Local:
    """``t``'s local rows, where they start, and the process group they are split over.

    Supported: a plain tensor, a DTensor replicated or split by rows over a one-dimensional mesh (FSDP2's layout).
    Other layouts (tensor parallelism, 2-D meshes) raise, naming the layout.
    """
    if not is_sharded(t):
        return Local(t, 0, t.shape[0] if t.dim() else 1, None)
    mesh, placements = t.device_mesh, tuple(t.placements)  # type: ignore[attr-defined]
    loc = t.to_local()  # type: ignore[attr-defined]
    if mesh.ndim == 1 and placements == (Replicate(),):
        return Local(loc, 0, t.shape[0], None)
    if mesh.ndim != 1 or placements != (Shard(0),):
        raise NotImplementedError(
            f"a parameter of shape {tuple(t.shape)} is a DTensor with placements {placements} on a {mesh.ndim}-D "
            "mesh; lightning_bv supports weights split by rows over one mesh dimension (FSDP2's fully_shard on a "
            "data-parallel mesh), not tensor parallelism"
        )
    _, offset = compute_local_shape_and_global_offset(t.shape, mesh, placements)
    return Local(loc, int(offset[0]) if loc.shape[0] else 0, t.shape[0], mesh.get_group())


def all_reduce_(parts: list[Tensor], group: Any) -> list[Tensor]:
    """Sum each of ``parts`` over the ranks of ``group``, in one all-reduce; returns the sums (same shapes)."""
    if group is None or not parts:
        return parts
    flat = torch.cat([p.reshape(-1) for p in parts])
    torch.distributed.all_reduce(flat, group=group)
    out, i = [], 0
    for p in parts:
        out.append(flat[i : i + p.numel()].view_as(p))
        i += p.numel()
    return out


def full(t: Tensor) -> Tensor:
    """The whole tensor on every rank (an all-gather for a DTensor); ``t`` itself otherwise."""
    return t.full_tensor() if is_sharded(t) else t  # type: ignore[attr-defined]


def refuse_split(model: Any, who: str) -> None:
    """Raise before changing ``model`` if its parameters are split across ranks (FSDP2): surgery needs whole layers."""
    name = next((n for n, p in model.named_parameters() if is_sharded(p)), None)
    if name is not None:
        raise ValueError(
            f"`{who}` needs whole layers, but parameter '{name}' of `model` is a DTensor split across ranks (FSDP2's "
            "fully_shard). Change the model before sharding it (the lightning_bv callbacks do so in `setup`, before "
            "`configure_model`), or on a copy loaded from a full state dict (NeuronPruning compacts such a copy at "
            "the end of a sharded fit)."
        )
