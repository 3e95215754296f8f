"""The per-group kernels of :mod:`lightning_bv.functional.rbv`: norms, rescales, shrinks and gradients, in place.

Each works on one :class:`~lightning_bv.neurons.NeuronGroup` whose arguments were checked by the caller, and reads
and writes the weights through its slots (so it works on low-rank factors and FSDP2 shards alike).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from lightning_bv._sharding import all_reduce_
from lightning_bv.neurons import NeuronGroup, Slot


def _safe_sqrt(x: Tensor) -> Tensor:
    """Sqrt with gradient 0 (not inf) at 0, so that dead neurons do not turn gradients into NaN; NaN stays NaN."""
    if not (torch.is_grad_enabled() and x.requires_grad):
        return x.clamp_min(0).sqrt()  # the same values in two ops (clamp_min keeps NaN)
    pos = ~(x <= 0)  # True for NaN too: a NaN norm must not read as a dead neuron
    return torch.where(pos, x, torch.ones_like(x)).sqrt() * pos


def _norms(group: NeuronGroup, q: int) -> tuple[Tensor, Tensor]:
    """``(||w_k||_2, ||v_k||_q)`` for every neuron of ``group``, ``q`` already checked (1 or 2)."""
    how = "sq" if q == 2 else "abs"
    w_sq, v = _sums(group, [(group.w_slots, "sq"), (group.v_slots, how)])
    return _safe_sqrt(w_sq), (_safe_sqrt(v) if q == 2 else v)


def _sums(group: NeuronGroup, sides: list[tuple[Sequence[Slot], str]]) -> list[Tensor]:
    """Per-neuron sums over the regularized entries of each side's slots (``how``: "sq" or "abs").

    For weights split by rows across ranks (FSDP2) each rank adds its local sums and one all-reduce completes every
    side at once.
    """
    out: list[Tensor] = []
    split: dict[Any, list[int]] = {}  # process group -> the sides with local sums over it
    partial: dict[tuple[Any, int], Tensor] = {}
    for i, (slots, how) in enumerate(sides):
        whole: Tensor | None = None
        for s in slots:
            if not s.regularized:
                continue
            r, pg = s.reduce_part(s.tensor(), how)
            if pg is None:
                whole = r if whole is None else whole + r
            else:
                key = (pg, i)
                partial[key] = partial[key] + r if key in partial else r
                if i not in split.setdefault(pg, []):
                    split[pg].append(i)
        if whole is None and not any(k[1] == i for k in partial):
            raise ValueError(f"group '{group.name}' has no regularized input or output weights")
        out.append(whole)  # type: ignore[arg-type]
    for pg, idx in split.items():
        for i, r in zip(idx, all_reduce_([partial[(pg, i)] for i in idx], pg)):
            out[i] = r if out[i] is None else out[i] + r
    return out


def _rescale_(group: NeuronGroup, a: Tensor) -> None:
    """(w_k, b_k, v_k) -> (a_k w_k, a_k b_k, v_k / a_k): the same function for a_k > 0."""
    for s in group.w_slots + group.b_slots:
        s.scale_(a)
    inv = 1.0 / a
    for s in group.v_slots:
        s.scale_(inv)


def _balance_group_(g: NeuronGroup, w: Tensor, v: Tensor) -> None:
    """``balance_`` of one group (``w``, ``v``: its norms)."""
    live = (w > 0) & (v > 0)
    a = torch.where(live, (v / torch.where(live, w, torch.ones_like(w))).sqrt(), torch.ones_like(w))
    _rescale_(g, a)
    _zero_dead_sides_(g, w, v)


def _zero_dead_sides_(g: NeuronGroup, w: Tensor, v: Tensor) -> None:
    """Zero the nonzero side of neurons whose other side makes them provably dead (see ``balance_``)."""
    if bool(((w > 0) & (v > 0)).all()):
        return
    read = sum(s.reduce(s.tensor(), "sq") for s in g.v_slots) > 0  # skips read the neuron too
    fed = sum(s.reduce(s.tensor(), "sq") for s in g.w_slots) > 0  # and skip producers feed it
    unread = (w > 0) & ~read
    mute = ~fed & (v > 0) & g.silent_without_input().to(w.device)
    if bool(unread.any()):
        keep = (~unread).to(w.dtype)
        for s in g.w_slots + g.b_slots:
            s.scale_(keep)
    if bool(mute.any()):
        keep = (~mute).to(w.dtype)
        for s in g.v_slots:
            s.scale_(keep)


def _feeds_itself(group: NeuronGroup) -> bool:
    """Whether one tensor holds both input-side and output-side entries of ``group`` (rescaling one moves both)."""
    ins = {id(s.written()) for s in group.w_slots + group.b_slots}
    return any(id(s.written()) in ins for s in group.v_slots)


def _shrink_(g: NeuronGroup, thr: Tensor | float, v: Tensor, q: int) -> None:
    """Soft-threshold neuron k's output weights by ``thr[k]``: group-wise (q=2) or entry-wise (q=1)."""
    reg = [s for s in g.v_slots if s.regularized]
    if q == 2:
        factor = torch.where(v > 0, (1.0 - thr / v).clamp_min_(0.0), 0.0)  # v = 0: thr / v is not used
        for s in reg:
            s.scale_(factor)
    else:
        for s in reg:
            s.soft_threshold_(thr)


def _unit(w: Tensor) -> tuple[Tensor, Tensor]:
    """``(1 / ||w_k||`` where positive else 1, the norms after dividing: 1 where positive else 0)."""
    live = w > 0
    return torch.where(live, w.reciprocal(), 1.0), live.to(w.dtype)  # w = 0: 1 / w is not used


def _project_group_(g: NeuronGroup, a: Tensor) -> None:
    """``w_k, b_k *= a_k`` (``a``: from :func:`_unit`, one over the norms)."""
    for s in g.w_slots + g.b_slots:
        s.scale_(a)


def _step_group_(g: NeuronGroup, w: Tensor, v: Tensor, tau: float | Tensor, q: int, normalize: bool) -> None:
    """Divide each neuron's ``w_k, b_k`` by ``||w_k||`` (``normalize``: and multiply ``v_k`` by it), then shrink.

    ``w``, ``v``: the group's norms now.
    """
    a, unit = _unit(w)
    if normalize:
        _rescale_(g, a)
        v = torch.where(w > 0, v * w, v)  # ||v_k|| ||w_k||, as the score is: a score equal to tau dies exactly
    else:
        _project_group_(g, a)
    if _feeds_itself(g):  # the rescale moved v too: read it again
        v = _norms(g, q)[1]
    _shrink_(g, tau * unit, v, q)


def _add_rbv_grad_group_(g: NeuronGroup, w: Tensor, v: Tensor, lam: float, q: int) -> None:
    """Add ``lam * grad R`` of one group to its slots' gradients (``w``, ``v``: its norms)."""
    cw = lam * v / torch.where(w > 0, w, torch.ones_like(w)) * (w > 0)
    for s in g.w_slots:
        if s.regularized:
            s.add_scaled_grad_(cw)
    cv = lam * w / torch.where(v > 0, v, torch.ones_like(v)) * (v > 0) if q == 2 else lam * w
    for s in g.v_slots:
        if s.regularized:
            s.add_scaled_grad_(cv, sign=q == 1)


def _add_weight_decay_grad_(glist: list[NeuronGroup], slots: list[list[Slot]], lam: float, skipped: list[str]) -> None:
    """Add ``lam`` times the grouped weights to their gradients, leaving the groups in ``skipped`` alone.

    ``slots``: each group's regularized slots. One pass per tensor that a group's slot covers whole.
    """
    whole: dict[int, tuple[Tensor, float]] = {}  # tensor -> (tensor, summed coefficient) for slots covering it all
    for g, ss in zip(glist, slots):
        if g.name in skipped:
            continue
        c = torch.full((g.num_neurons,), float(lam))
        for s in ss:
            if s.covers_all(g.num_neurons):
                t = s.tensor()
                whole[id(t)] = (t, whole.get(id(t), (t, 0.0))[1] + lam)
            else:
                s.add_scaled_grad_(c.to(s.tensor().device))
    for t, coef in whole.values():  # one pass per tensor (the middle matrix of a chain is two groups' slots)
        if t.grad is None:
            t.grad = torch.zeros_like(t)
        t.grad.add_(t, alpha=coef)
