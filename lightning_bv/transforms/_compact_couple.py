"""Which neurons :func:`~lightning_bv.transforms.compact.compact` removes: per group, then agreed across groups.

:func:`decide` picks, in one group, the neurons whose score is ``<= tol`` and whose removal provably keeps the
function. :func:`couple` makes the groups agree where a grouped convolution ties them: a depthwise conv's channel goes
with its input group's neuron and its output group's block together, and a grouped conv keeps as many channels in
each group; it returns the units of groups that must be shrunk together.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor

from lightning_bv._layers import CONVS
from lightning_bv.functional.rbv import group_norms
from lightning_bv.neurons import GroupedSlot, NeuronGroup, Slot
from lightning_bv.transforms._compact_checks import ModelIndex
from lightning_bv.transforms._compact_remap import width
from lightning_bv.transforms._compact_report import GroupCompaction


def decide(g: NeuronGroup, tol: float) -> tuple[Tensor, GroupCompaction, Tensor]:
    """Which neurons of ``g`` to remove, the report row if all goes well, and the neurons' scores."""
    k = g.num_neurons
    try:
        w, v = group_norms(g, 2)
    except ValueError as why:
        row = GroupCompaction(g.name, k, k, note=f"left whole: {why}", shrunk=False)
        return torch.zeros(k, dtype=torch.bool), row, torch.zeros(k, dtype=torch.float64)
    w, v = w.detach().double().cpu(), v.detach().double().cpu()
    score = w * v
    cand = score <= tol

    def per_neuron(slots: Iterable[Any]) -> Tensor:
        total = torch.zeros(k, dtype=torch.float64)
        for s in slots:
            total += s.reduce(s.tensor().detach(), "sq").double().cpu()
        return total

    skip_read = per_neuron(s for s in g.v_slots if not s.regularized) > 0
    w_any = per_neuron(g.w_slots) > 0
    zero_out = ~w_any & g.silent_without_input()  # the activation is exactly 0: nothing it feeds can notice it is gone
    remove = cand & (zero_out | (~skip_read & ((v == 0) | ((w > 0) & (v > 0)))))
    reasons = []
    n_skip = int((cand & ~remove & skip_read).sum())
    if n_skip:
        reasons.append(f"{n_skip} read by a skip connection")
    n_const = int((cand & ~remove).sum()) - n_skip
    if n_const:
        reasons.append(f"{n_const} with zero input weights but a nonzero output")
    if bool(remove.all()) and k > 0:
        remove[int(torch.argmax(score.nan_to_num(-1.0)))] = False
        reasons.append("1 so that the layer keeps a neuron")
    row = GroupCompaction(g.name, k, k - int(remove.sum()), removed_score=float(score[remove].sum()))
    row.kept = int((cand & ~remove).sum())
    if reasons:
        row.note = "kept " + ", ".join(reasons)
    return remove, row, score


def _conv_groups(m: Any) -> int:
    return int(m.groups) if isinstance(m, CONVS) else 1


def _grouped_links(glist: list[NeuronGroup]) -> list[tuple[int, GroupedSlot, int | None, Tensor]]:
    """``(A, slot, B, channel)`` for each depthwise-like consumer of group A.

    ``slot`` reads A (neuron k is its input channel ``channel[k]``), and group B (an index into ``glist``, or None)
    has that conv as its only producer.
    """
    by_producer = {g.producers: i for i, g in enumerate(glist)}
    links = []
    for a, g in enumerate(glist):
        for s in g.v_slots:
            m: Any = s.module
            if not isinstance(s, GroupedSlot) or int(m.weight.shape[1]) != 1:
                continue
            if s.index is not None and s.index.shape[1] != 1:
                continue
            channel = torch.arange(g.num_neurons) if s.index is None else s.index[:, 0].cpu()
            b = by_producer.get((s.module_name,))
            if b is not None and glist[b].num_neurons != int(m.out_channels):
                b = None
            links.append((a, s, b, channel))
    return links


def couple(
    index: ModelIndex,
    glist: list[NeuronGroup],
    removes: list[Tensor],
    scores: list[Tensor],
    rows: list[GroupCompaction],
) -> list[list[int]]:
    """Make the removals agree across grouped convolutions, in place; the units of groups to shrink together.

    A depthwise conv couples channel k of its input group A to its output channels ``k*m..(k+1)*m`` (group B, which
    it produces): channel k is removed from A, the conv and B together, only when B removes the whole block and A's
    neuron k reaches nothing else (its other output weights are 0, or its output is 0). A grouped conv (several input
    channels per group) keeps the same number of channels in each group: extra dead ones are kept.
    """
    before = [r.clone() for r in removes]
    links = _grouped_links(glist)
    linked_b = {b for _, _, b, _ in links if b is not None}
    parent = list(range(len(glist)))

    def root(i: int) -> int:
        while parent[i] != i:
            i = parent[i]
        return i

    def per_neuron(g: NeuronGroup, slots: Iterable[Slot]) -> Tensor:
        total = torch.zeros(g.num_neurons, dtype=torch.float64)
        for s in slots:
            total += s.reduce(s.tensor().detach(), "sq").double().cpu()
        return total

    reason: dict[int, str] = {}
    ok: dict[int, Tensor] = {}
    for a, s, b, _ in links:
        g = glist[a]
        w_any = per_neuron(g, g.w_slots) > 0
        others = per_neuron(g, (o for o in g.v_slots if o is not s)) > 0
        ok[id(s)] = removes[a] | ~others | (~w_any & g.silent_without_input())
        if b is not None:
            parent[root(b)] = root(a)
    for i, g in enumerate(glist):  # depthwise producers with no input group: their rows cannot go alone
        for prod in g.producers:
            m: Any = index.get(prod)
            if _conv_groups(m) > 1 and int(m.weight.shape[1]) == 1 and i not in linked_b:
                removes[i] &= False
                reason[i] = f"its producer '{prod}' is a depthwise convolution whose input is not a neuron group"
    for _ in range(4):
        snapshot = [r.clone() for r in removes]
        fresh: dict[int, Tensor] = {}
        for a, s, b, channel in reversed(links):  # discovery order is topological: downstream blocks first
            m = s.module
            if b is None:
                fresh[a] = torch.zeros_like(removes[a])
                reason[a] = (
                    f"their channels go on through the depthwise convolution '{s.module_name}', whose output is not "
                    "a neuron group"
                )
                continue
            mult = int(m.out_channels) // int(m.groups)
            dead = removes[b].reshape(-1, mult).all(1)
            new = fresh.get(a, ok[id(s)]) & ok[id(s)] & dead[channel]
            if bool((removes[a] & ~new).any()):
                reason[a] = (
                    f"their channels go on through the depthwise convolution '{s.module_name}' to neurons of "
                    f"'{glist[b].name}' that are still used"
                )
            fresh[a] = new
        for a, new in fresh.items():
            removes[a].copy_(new)
        for a, s, _, _ in links:
            ok[id(s)] = ok[id(s)] & removes[a]  # only fewer from now on
        for i, g in enumerate(glist):
            conv = _even_out(index, g, removes[i], scores[i])
            if conv is not None:
                reason[i] = f"so that every group of the grouped convolution '{conv}' keeps as many channels"
            if bool(removes[i].all()) and g.num_neurons > 0:
                removes[i][int(torch.argmax(scores[i].nan_to_num(-1.0)))] = False
        for a, s, b, channel in links:  # a block goes only with its input channel
            if b is None:
                continue
            dw: Any = s.module
            mult = int(dw.out_channels) // int(dw.groups)
            allowed = torch.zeros(int(dw.in_channels), dtype=torch.bool)
            allowed[channel[removes[a]]] = True
            removes[b] &= allowed.repeat_interleave(mult)
        if all(torch.equal(x, y) for x, y in zip(snapshot, removes)):
            break
    for i, g in enumerate(glist):
        if torch.equal(before[i], removes[i]) or not rows[i].shrunk:
            continue
        row, k = rows[i], g.num_neurons
        extra = int((before[i] & ~removes[i]).sum())
        row.after = k - int(removes[i].sum())
        row.removed_score = float(scores[i][removes[i]].sum())
        row.kept += extra
        why = reason.get(i, "their channel through a depthwise convolution is still used")
        if extra:
            row.note = (row.note + "; " if row.note else "") + f"kept {extra}: {why}"
    units: dict[int, list[int]] = {}
    for i in range(len(glist)):
        units.setdefault(root(i), []).append(i)
    return list(units.values())


def _even_out(index: ModelIndex, g: NeuronGroup, remove: Tensor, score: Tensor) -> str | None:
    """Keep extra neurons of ``g`` (in place) until every group of each grouped conv it touches loses as many.

    Returns the name of a grouped conv that made it keep some, or None.
    """
    forced = None
    for _ in range(8):
        changed = False
        views: list[tuple[str, int, int, Tensor]] = []  # (conv, groups, channels per group, neuron of each channel)
        for s in g.v_slots:
            m: Any = s.module
            if isinstance(s, GroupedSlot) and int(m.weight.shape[1]) > 1:
                owner = torch.full((width(m, "in"),), -1, dtype=torch.long)
                idx = torch.arange(g.num_neurons).unsqueeze(1) if s.index is None else s.index.cpu()
                owner[idx] = torch.arange(g.num_neurons).unsqueeze(1).expand_as(idx)
                views.append((s.module_name, int(m.groups), int(m.weight.shape[1]), owner))
        for prod in g.producers:
            m = index.get(prod)
            if _conv_groups(m) > 1 and int(m.weight.shape[1]) > 1:
                views.append((prod, int(m.groups), int(m.out_channels) // int(m.groups), torch.arange(g.num_neurons)))
        for conv, groups, per, owner in views:
            gone = torch.zeros(owner.shape[0], dtype=torch.bool)
            mine = owner >= 0
            gone[mine] = remove[owner[mine]]
            counts = gone.reshape(groups, per).sum(1)
            target = min(int(counts.min()), per - 1)
            for grp in torch.nonzero(counts > target).flatten().tolist():
                chans = torch.nonzero(gone.reshape(groups, per)[grp]).flatten() + grp * per
                neurons = owner[chans]
                order = torch.argsort(score[neurons], descending=True)  # keep the strongest of the dead
                remove[neurons[order[: int(counts[grp]) - target]]] = False
                changed, forced = True, conv
        if not changed:
            break
    return forced
