"""The R-BV^2 seminorm of neuron groups, and the function-preserving operations on it (docs/theory.md sections 2-4).

Every function takes one :class:`~lightning_bv.neurons.NeuronGroup` or an iterable of them (a ``NeuronGroups``).
Only the regularized entries are charged (neuron input weights ``w_k`` and output weights ``v_k``); biases and skip
connections are rescaled with their neuron where function preservation needs it, never charged.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from lightning_bv._checks import check_choice
from lightning_bv._checks import check_lam as _check_lam
from lightning_bv._checks import check_q as _check_q
from lightning_bv._sharding import all_reduce_, local
from lightning_bv.neurons import NeuronGroup, Slot

Groups = NeuronGroup | Iterable[NeuronGroup]
NONFINITE = ("ignore", "raise", "skip")


class NonFiniteWeightsError(FloatingPointError):
    """A neuron group's weights, or their norms, are NaN or infinite (raised with ``on_nonfinite="raise"``)."""


def _as_list(groups: Groups) -> list[NeuronGroup]:
    hint = "a NeuronGroup or an iterable of them (lightning_bv.find_neurons(model, example_input))"
    if isinstance(groups, NeuronGroup):
        return [groups]
    if isinstance(groups, (nn.Module, str, Tensor)) or not isinstance(groups, Iterable):
        raise TypeError(f"`groups` must be {hint}, got {type(groups).__name__}")
    glist = list(groups)
    for g in glist:
        if not isinstance(g, NeuronGroup):
            raise TypeError(f"`groups` must be {hint}, got an iterable holding a {type(g).__name__}")
    return glist


def _check_tau(tau: object, glist: list[NeuronGroup]) -> dict[str, float | Tensor]:
    """One threshold per group name: a number or 0-dim tensor for all, or a mapping name -> number or [K] tensor.

    Everything is checked before any group changes.
    """

    def check(t: object, where: str, k: int | None) -> float | Tensor:
        ok = isinstance(t, numbers.Real) and not isinstance(t, bool)
        if isinstance(t, Tensor):
            ok = (t.dim() == 0 or (k is not None and tuple(t.shape) == (k,))) and t.dtype.is_floating_point
        if not ok:
            shape = f" of shape {tuple(t.shape)} and dtype {t.dtype}" if isinstance(t, Tensor) else ""
            per = f" or a floating tensor of shape [{k}] (one per neuron)" if k is not None else ""
            raise TypeError(
                f"`tau` must be a number, a 0-dim tensor or a mapping from group name to a number{per}, got "
                f"{type(t).__name__}{shape}{where}"
            )
        if isinstance(t, Tensor) and t.dim() == 1:
            bad = ~torch.isfinite(t) | (t < 0)
            if bool(bad.any()):
                i = int(torch.nonzero(bad)[0])
                raise ValueError(
                    f"`tau` must be finite and >= 0 for every neuron, got {float(t[i])!r} at neuron {i}{where}"
                )
            return t
        if not math.isfinite(float(t)) or float(t) < 0:  # type: ignore[arg-type]
            raise ValueError(f"`tau` must be a finite value >= 0, got {t!r}{where}")
        return t  # type: ignore[return-value]

    names = [g.name for g in glist]
    if isinstance(tau, Mapping):
        missing = [n for n in names if n not in tau]
        if missing:
            raise ValueError(f"`tau` has no value for group(s) {missing}; it has {sorted(map(str, tau))}")
        return {g.name: check(tau[g.name], f" (group {g.name!r})", g.num_neurons) for g in glist}
    value = check(tau, "", None)
    return dict.fromkeys(names, value)


def _check_nonfinite(on_nonfinite: object) -> str:
    check_choice("on_nonfinite", on_nonfinite, NONFINITE, "what to do with a group whose weights are NaN or infinite")
    return str(on_nonfinite)


def _kind(t: Tensor) -> str:
    nan, inf = bool(torch.isnan(t).any()), bool(torch.isinf(t).any())
    return " and ".join(k for k, on in (("nan", nan), ("inf", inf)) if on) or "finite"


def _describe_nonfinite(group: NeuronGroup, w: Tensor, v: Tensor) -> str:
    """Which neurons of ``group`` have a non-finite norm, on which side, and whether the entries themselves are."""
    parts = []
    for side, norms, slots in (("input", w, group.w_slots), ("output", v, group.v_slots)):
        bad = torch.nonzero(~torch.isfinite(norms)).flatten().tolist()
        if not bad:
            continue
        shown = ", ".join(str(i) for i in bad[:8]) + (", ..." if len(bad) > 8 else "")
        entries = [s.tensor().detach() for s in slots if s.regularized]
        finite = all(bool(torch.isfinite(t).all()) for t in entries)
        why = (
            f"the entries are finite but their squares overflow {entries[0].dtype}"
            if finite
            else _kind(torch.cat([t.flatten() for t in entries]))
        )
        parts.append(f"{_kind(norms)} norm of the {side} weights of neuron(s) [{shown}] of {norms.numel()} ({why})")
    return f"neuron group '{group.name}' has non-finite weights: " + "; ".join(parts)


def _skip_nonfinite(group: NeuronGroup, w: Tensor, v: Tensor, on_nonfinite: str) -> bool:
    """Whether to leave ``group`` alone because its norms ``w``, ``v`` are not finite (raises with "raise")."""
    if on_nonfinite == "ignore" or bool(torch.isfinite(torch.cat([w, v])).all()):
        return False
    if on_nonfinite == "raise":
        raise NonFiniteWeightsError(
            _describe_nonfinite(group, w, v) + '. Stopping instead of spreading them (on_nonfinite="raise"); lower the '
            'learning rate or clip gradients, or pass on_nonfinite="skip" to leave such a group alone.'
        )
    return True


def _nonfinite_groups(glist: list[NeuronGroup], norms: list[tuple[Tensor, Tensor]], on_nonfinite: str) -> list[str]:
    """Names of the groups whose norms are not finite, checked with one sync; raises for the first with "raise"."""
    if on_nonfinite == "ignore" or not glist:
        return []
    finite = torch.stack([torch.isfinite(w).all() & torch.isfinite(v).all() for w, v in norms]).tolist()
    bad = [i for i, ok in enumerate(finite) if not ok]
    if bad and on_nonfinite == "raise":
        _skip_nonfinite(glist[bad[0]], *norms[bad[0]], on_nonfinite)  # raises with the description
    return [glist[i].name for i in bad]


def _safe_sqrt(x: Tensor) -> Tensor:
    """Sqrt with gradient 0 (not inf) at 0, so that dead neurons do not turn gradients into NaN; NaN stays NaN."""
    if not (torch.is_grad_enabled() and x.requires_grad):
        return x.clamp_min(0).sqrt()  # the same values in two ops (clamp_min keeps NaN)
    pos = ~(x <= 0)  # True for NaN too: a NaN norm must not read as a dead neuron
    return torch.where(pos, x, torch.ones_like(x)).sqrt() * pos


def group_norms(group: NeuronGroup, q: int = 2) -> tuple[Tensor, Tensor]:
    """``(||w_k||_2, ||v_k||_q)`` for every neuron of ``group`` (differentiable when grad is enabled)."""
    q = _check_q(q)
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


def neuron_scores(groups: Groups, q: int = 2) -> dict[str, Tensor]:
    """Per-neuron score ``||v_k||_q * ||w_k||_2`` of every group, by group name.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> from lightning_bv import find_neurons
        >>> net = nn.Sequential(nn.Linear(2, 3), nn.ReLU(), nn.Linear(3, 1))
        >>> scores = neuron_scores(find_neurons(net, torch.randn(1, 2)))
        >>> scores["0"].shape
        torch.Size([3])

    """
    out = {}
    for g in _as_list(groups):
        w, v = group_norms(g, q)
        out[g.name] = w * v
    return out


def rbv_norm(groups: Groups, q: int = 2) -> Tensor:
    """The parametric R-BV^2 seminorm ``sum_groups sum_k ||v_k||_q ||w_k||_2`` (differentiable).

    Example:
        >>> import torch
        >>> from torch import nn
        >>> from lightning_bv import find_neurons
        >>> net = nn.Sequential(nn.Linear(1, 4), nn.ReLU(), nn.Linear(4, 1))
        >>> r = rbv_norm(find_neurons(net, torch.randn(2, 1)))
        >>> r.backward()  # a penalty you can add to any loss
        >>> net[0].weight.grad is not None
        True

    """
    total: Tensor | None = None
    for g in _as_list(groups):
        w, v = group_norms(g, q)
        s = (w * v).sum()
        total = s if total is None else total + s
    return total if total is not None else torch.zeros(())


def neuron_weight_decay(groups: Groups, q: int = 2) -> Tensor:
    """``1/2 sum_k (||v_k||_q^2 + ||w_k||_2^2)``: weight decay on the grouped weights only (docs/theory.md 3)."""
    total: Tensor | None = None
    for g in _as_list(groups):
        w, v = group_norms(g, q)
        s = 0.5 * (w * w + v * v).sum()
        total = s if total is None else total + s
    return total if total is not None else torch.zeros(())


def _rescale_(group: NeuronGroup, a: Tensor) -> None:
    """(w_k, b_k, v_k) -> (a_k w_k, a_k b_k, v_k / a_k): the same function for a_k > 0."""
    for s in group.w_slots + group.b_slots:
        s.scale_(a)
    inv = 1.0 / a
    for s in group.v_slots:
        s.scale_(inv)


@torch.no_grad()
def balance_(groups: Groups, q: int = 2) -> None:
    """Rescale every neuron so that ``||v_k||_q == ||w_k||_2``, in place, without changing the function.

    A neuron with one zero side gets the limit of that rescaling, the other side zeroed too, where that cannot change
    the function: input weights and bias of a neuron nobody reads (every output weight 0, skip connections
    included), output weights of a neuron whose output is 0 (input weights 0 and ``s(b_k) = 0``, e.g. a ReLU with
    ``b_k <= 0``). The prox leaves the first kind (``v_k = 0`` with ``||w_k|| = 1``). A neuron with zero input
    weights and a constant nonzero output ``s(b_k)`` is left alone (its output weights carry the constant; see
    :func:`lightning_bv.compact`). Groups are processed in order (discovery order is topological); when no weight
    matrix is shared between two groups, afterwards ``neuron_weight_decay(groups) == rbv_norm(groups)``.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> from lightning_bv import find_neurons
        >>> net = nn.Sequential(nn.Linear(2, 5), nn.ReLU(), nn.Linear(5, 1))
        >>> groups = find_neurons(net, torch.randn(1, 2))
        >>> balance_(groups)
        >>> bool(torch.isclose(neuron_weight_decay(groups), rbv_norm(groups)))
        True

    """
    for g in _as_list(groups):
        w, v = group_norms(g, q)
        live = (w > 0) & (v > 0)
        a = torch.where(live, (v / torch.where(live, w, torch.ones_like(w))).sqrt(), torch.ones_like(w))
        _rescale_(g, a)
        _zero_dead_sides_(g, w, v)


def _zero_dead_sides_(g: NeuronGroup, w: Tensor, v: Tensor) -> None:
    """Zero the nonzero side of neurons whose other side makes them provably dead (see :func:`balance_`)."""
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


def _check_q1_low_rank(glist: list[NeuronGroup], q: int) -> None:
    """The q=1 shrink is elementwise on the output weights; a low-rank product has no entries to threshold."""
    if q != 1:
        return
    for g in glist:
        for s in g.v_slots:
            if s.regularized and s._lowrank() is not None:
                raise NotImplementedError(
                    f"q=1 prox of group '{g.name}' on the low-rank weight of '{s.module_name}' is not supported "
                    "(use q=2)"
                )


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


def _begin(groups: Groups, tau: object, q: int, on_nonfinite: str) -> tuple[int, str, list[NeuronGroup], dict]:
    q = _check_q(q)
    on_nonfinite = _check_nonfinite(on_nonfinite)
    glist = _as_list(groups)
    taus = _check_tau(tau, glist)
    _check_q1_low_rank(glist, q)
    return q, on_nonfinite, glist, taus


@torch.no_grad()
def prox_(
    groups: Groups, tau: float | Tensor | Mapping[str, float | Tensor], q: int = 2, *, on_nonfinite: str = "ignore"
) -> list[str]:
    """The proximal operator of ``tau * R`` at the current function: normalize, then shrink, in place.

    1. normalize (function-preserving): for each neuron with ``||w_k|| > 0``:
       ``v_k *= ||w_k||; b_k /= ||w_k||; w_k /= ||w_k||``.
    2. shrink: q=2: ``v_k <- max(0, 1 - tau_k / ||v_k||_2) v_k`` (group soft-threshold); q=1: elementwise
       soft-threshold of ``v_k`` by ``tau_k``. Skip-connection weights are never shrunk.

    With ``tau=0`` the function is unchanged; a neuron dies (``v_k = 0``) iff its score ``||v_k||_q ||w_k||_2`` is
    ``<= tau_k``, whatever the scale of its weights: rescaling a model with :func:`balance_` (or any positive
    per-neuron rescale) before ``prox_`` does not change which neurons die, in groups that share no weight tensor.
    (Groups that do, such as the two around the hidden matrix of a plain Linear-ReLU-Linear-ReLU chain, are processed
    in order, each at the scores left by the one before; write such a matrix as a product first:
    :func:`lightning_bv.lift_shared_weights`.)

    For training, :func:`proximal_step_` is the step to take after each optimizer step; it applies this operator at
    the first update.

    Args:
        groups: a group or groups.
        tau: the threshold, ``>= 0``: a number for every neuron, or a mapping from group name to a number or to a
            tensor of shape ``[num_neurons]`` (one per neuron; :func:`lightning_bv.prox_thresholds` computes the
            optimizer's own step).
        q: norm on each neuron's output weights, 1 or 2.
        on_nonfinite: what to do with a group whose norms ``||w_k||``, ``||v_k||`` (computed for the step anyway)
            are NaN or infinite: ``"ignore"`` (no check), ``"raise"`` (:class:`NonFiniteWeightsError` naming the
            group, before it is changed; the groups before it were updated, as each group's norms depend on them)
            or ``"skip"`` (leave it unchanged; the other groups are updated).

    Returns:
        The names of the groups left unchanged because of ``on_nonfinite="skip"``.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> from lightning_bv import find_neurons
        >>> net = nn.Sequential(nn.Linear(2, 4), nn.ReLU(), nn.Linear(4, 1))
        >>> groups = find_neurons(net, torch.randn(1, 2))
        >>> prox_(groups, tau=100.0)
        []
        >>> int((net[2].weight != 0).sum())
        0
    """
    return _step_(groups, tau, q, on_nonfinite, normalize=True)


def _step_(groups: Groups, tau: object, q: int, on_nonfinite: str, normalize: bool) -> list[str]:
    """Divide each neuron's ``w_k, b_k`` by ``||w_k||`` (``normalize``: and multiply ``v_k`` by it), then shrink."""
    q, on_nonfinite, glist, taus = _begin(groups, tau, q, on_nonfinite)
    skipped: list[str] = []
    for g in glist:
        w, v = group_norms(g, q)
        if _skip_nonfinite(g, w, v, on_nonfinite):
            skipped.append(g.name)
            continue
        a, unit = _unit(w)
        if normalize:
            _rescale_(g, a)
            v = torch.where(w > 0, v * w, v)  # ||v_k|| ||w_k||, as the score is: a score equal to tau dies exactly
        else:
            for s in g.w_slots + g.b_slots:
                s.scale_(a)
        if _feeds_itself(g):  # the rescale moved v too: read it again
            v = group_norms(g, q)[1]
        _shrink_(g, taus[g.name] * unit, v, q)
    return skipped


@torch.no_grad()
def project_(groups: Groups) -> None:
    """PathProx's projection: ``w_k /= ||w_k||`` and ``b_k /= ||w_k||`` for every neuron with ``||w_k|| > 0``.

    ``v_k`` is left alone, so the function changes (as any training step does): the radial part of the last gradient
    step on ``w_k`` is discarded instead of being moved into ``v_k``. On the constraint set ``||w_k|| = 1`` the
    problem ``min loss + lam R`` is ``min loss + lam sum_k ||v_k||``, whose proximal step is the shrink of
    :func:`proximal_step_`.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> from lightning_bv import find_neurons
        >>> net = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 1))
        >>> project_(find_neurons(net, torch.randn(1, 3)))
        >>> torch.allclose(net[0].weight.norm(dim=1), torch.ones(4))
        True
    """
    for g in _as_list(groups):
        a, _ = _unit(group_norms(g, 2)[0])
        for s in g.w_slots + g.b_slots:
            s.scale_(a)


@torch.no_grad()
def proximal_step_(
    groups: Groups,
    tau: float | Tensor | Mapping[str, float | Tensor],
    q: int = 2,
    *,
    first: bool = False,
    on_nonfinite: str = "ignore",
) -> list[str]:
    """One proximal-gradient step of ``loss + lam R`` after an optimizer step (PathProx), in place.

    ``first=True`` (the first update of a run): :func:`prox_`, so the weights then sit on ``||w_k|| = 1`` with the
    function unchanged, and a model and any function-preserving rescale of it train identically. Afterwards: the
    projection of :func:`project_` (``w_k, b_k`` divided by ``||w_k||``, ``v_k`` left alone), then the same shrink
    as :func:`prox_`: ``v_k <- max(0, 1 - tau_k / ||v_k||) v_k`` (q=2; entry-wise for q=1). When ``||w_k|| = 1``
    already, the two coincide; unlike ``prox_``, this step never moves growth of ``w_k`` into ``v_k``, where the
    shrink would charge it less, so ``loss + lam R`` does not rise from it.

    ``tau`` is ``lam`` times the step the optimizer took on ``v_k``: :func:`lightning_bv.prox_thresholds` reads it
    from the optimizer (``lr``, momentum, Adam's second moments).

    Args:
        groups: a group or groups.
        tau: the threshold: a number, or a mapping from group name to a number or a ``[num_neurons]`` tensor.
        q: norm on each neuron's output weights, 1 or 2.
        first: apply :func:`prox_` (the first update of a run).
        on_nonfinite: as in :func:`prox_`.

    Returns:
        The names of the groups left unchanged because of ``on_nonfinite="skip"``.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> from lightning_bv import find_neurons, prox_thresholds
        >>> net = nn.Sequential(nn.Linear(2, 8), nn.ReLU(), nn.Linear(8, 1))
        >>> groups = find_neurons(net, torch.randn(1, 2))
        >>> opt = torch.optim.Adam(net.parameters(), lr=1e-2)
        >>> for step in range(3):
        ...     opt.zero_grad()
        ...     net(torch.randn(16, 2)).pow(2).mean().backward()
        ...     opt.step()
        ...     _ = proximal_step_(groups, prox_thresholds(groups, opt, lam=0.1), first=step == 0)
        >>> bool(torch.allclose(net[0].weight.norm(dim=1), torch.ones(8)))
        True
    """
    if not isinstance(first, bool):
        raise TypeError(f"`first` must be a bool (True at the first update of a run), got {first!r}")
    return _step_(groups, tau, q, on_nonfinite, normalize=first)


@torch.no_grad()
def add_rbv_grad_(groups: Groups, lam: float, q: int = 2, *, on_nonfinite: str = "ignore") -> list[str]:
    """Add ``lam * grad R`` to the parameters' ``.grad`` in closed form (no autograd graph).

    d/dw_k = lam ||v_k||_q w_k / ||w_k||;  d/dv_k = lam ||w_k|| v_k / ||v_k|| (q=2) or lam ||w_k|| sign(v_k) (q=1).
    Neurons with a zero side get the subgradient 0 on that side. ``on_nonfinite`` checks the norms the gradient
    needs, as in :func:`prox_` but for all groups before any gradient changes; returns the names of the groups
    skipped.
    """
    q = _check_q(q)
    lam = _check_lam(lam)
    on_nonfinite = _check_nonfinite(on_nonfinite)
    glist = _as_list(groups)
    norms = [group_norms(g, q) for g in glist]  # gradients do not move the weights: computed once, all up front
    skipped = _nonfinite_groups(glist, norms, on_nonfinite)
    for g, (w, v) in zip(glist, norms):
        if g.name in skipped:
            continue
        cw = lam * v / torch.where(w > 0, w, torch.ones_like(w)) * (w > 0)
        for s in g.w_slots:
            if s.regularized:
                s.add_scaled_grad_(cw)
        cv = lam * w / torch.where(v > 0, v, torch.ones_like(v)) * (v > 0) if q == 2 else lam * w
        for s in g.v_slots:
            if s.regularized:
                s.add_scaled_grad_(cv, sign=q == 1)
    return skipped


def _all_finite(tensors: list[Tensor]) -> list[bool]:
    """Whether each tensor is all finite, from its smallest and largest entry, with one sync for all.

    For tensors split across ranks, one all-reduce of the answers, so that every rank decides alike.
    """
    locs = [local(t) for t in tensors]
    none = torch.zeros((), dtype=torch.bool)
    bad = torch.stack(
        [(~torch.stack(torch.aminmax(lt.tensor)).isfinite()).any() if lt.tensor.numel() else none for lt in locs]
    ).float()
    group = next((lt.group for lt in locs if lt.split), None)
    return [not b for b in all_reduce_([bad], group)[0].bool().tolist()]


@torch.no_grad()
def add_weight_decay_grad_(groups: Groups, lam: float, *, on_nonfinite: str = "ignore") -> list[str]:
    """Add the gradient of ``lam/2 * sum_k (||v_k||_2^2 + ||w_k||_2^2)`` over grouped weights only (not biases).

    This update needs no norms, so ``on_nonfinite`` other than ``"ignore"`` reads the weights once more, for all
    groups before any gradient changes: the smallest and largest entry of each tensor (one pass; NaN when one is
    NaN), and the groups' norms only when one is not finite. Returns the names of the groups skipped.
    """
    lam = _check_lam(lam)
    on_nonfinite = _check_nonfinite(on_nonfinite)
    glist = _as_list(groups)
    slots = [[s for s in g.w_slots + g.v_slots if s.regularized] for g in glist]
    skipped: list[str] = []
    if on_nonfinite != "ignore" and glist:
        tensors = {id(t): t for ss in slots for t in (s.tensor() for s in ss)}  # a shared matrix is read once
        finite_of = dict(zip(tensors, _all_finite(list(tensors.values()))))
        suspects = [g for g, ss in zip(glist, slots) if not all(finite_of[id(s.tensor())] for s in ss)]
        if suspects:  # a consumer's bad entries may be in another group's columns: decide on the groups' own norms
            skipped = _nonfinite_groups(suspects, [group_norms(g, 2) for g in suspects], on_nonfinite)
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
    return skipped
