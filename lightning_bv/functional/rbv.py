"""The R-BV^2 seminorm of neuron groups, and the function-preserving operations on it (THEORY.md sections 2-4).

Every function takes one :class:`~lightning_bv.neurons.NeuronGroup` or an iterable of them (a ``NeuronGroups``).
Only the regularized entries are charged (neuron input weights ``w_k`` and output weights ``v_k``); biases and skip
connections are rescaled with their neuron where function preservation needs it, never charged.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping

import torch
from torch import Tensor

from lightning_bv.neurons import NeuronGroup

Groups = NeuronGroup | Iterable[NeuronGroup]


def _as_list(groups: Groups) -> list[NeuronGroup]:
    return [groups] if isinstance(groups, NeuronGroup) else list(groups)


def _check_q(q: object) -> int:
    if q not in (1, 2) or isinstance(q, bool):
        raise ValueError(f"`q` must be 1 or 2 (the norm on each neuron's output weights), got {q!r}")
    return int(q)  # type: ignore[call-overload]


def _safe_sqrt(x: Tensor) -> Tensor:
    """Sqrt with gradient 0 (not inf) at 0, so that dead neurons do not turn gradients into NaN."""
    pos = x > 0
    return torch.where(pos, x, torch.ones_like(x)).sqrt() * pos


def group_norms(group: NeuronGroup, q: int = 2) -> tuple[Tensor, Tensor]:
    """``(||w_k||_2, ||v_k||_q)`` for every neuron of ``group`` (differentiable when grad is enabled)."""
    q = _check_q(q)
    w_sq = sum(s.reduce(s.tensor(), "sq") for s in group.w_slots if s.regularized)
    how = "sq" if q == 2 else "abs"
    v = sum(s.reduce(s.tensor(), how) for s in group.v_slots if s.regularized)
    if not isinstance(w_sq, Tensor) or not isinstance(v, Tensor):
        raise ValueError(f"group '{group.name}' has no regularized input or output weights")
    return _safe_sqrt(w_sq), (_safe_sqrt(v) if q == 2 else v)


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
    """``1/2 sum_k (||v_k||_q^2 + ||w_k||_2^2)``: weight decay on the grouped weights only (THEORY.md section 3)."""
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

    Neurons with a zero side are left alone. Groups are processed in order (discovery order is topological); when
    no weight matrix is shared between two groups, afterwards ``neuron_weight_decay(groups) == rbv_norm(groups)``.

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


def _shared_producers(groups: list[NeuronGroup]) -> set[str]:
    """Names of groups whose input weights are also another group's output weights (a plain Linear-ReLU chain)."""
    consumed = {(id(s.module), s.param) for g in groups for s in g.v_slots}
    return {g.name for g in groups if any((id(s.module), s.param) in consumed for s in g.w_slots)}


@torch.no_grad()
def prox_(groups: Groups, tau: float | Tensor | Mapping[str, float], q: int = 2) -> None:
    """Proximal step of ``tau * R`` (THEORY.md section 4), function-preserving normalize then shrink, in place.

    1. normalize: for each neuron with ``||w_k|| > 0``: ``v_k *= ||w_k||; b_k /= ||w_k||; w_k /= ||w_k||``.
    2. shrink: q=2: ``v_k <- max(0, 1 - tau / ||v_k||_2) v_k`` (group soft-threshold); q=1: elementwise
       soft-threshold of ``v_k``. Skip-connection weights are never shrunk.

    With ``tau=0`` the function is unchanged; a neuron whose score ``||v_k||_q ||w_k||_2`` is ``<= tau`` (its
    ``||v_k||`` after normalizing) becomes exactly 0.

    A group whose input weights are another group's output weights (the middle matrix of a plain
    Linear-ReLU-Linear-ReLU chain) is not normalized: dividing a row that the previous group's shrink made tiny
    blows its bias up and training diverges (measured on a 3-layer MLP). For such a group the shrink uses the
    equivalent threshold on the unnormalized weights, ``v_k <- max(0, 1 - tau ||w_k|| / ||v_k||) v_k`` (q=2) or
    ``tau ||w_k||`` elementwise (q=1): the same neurons die, and the objective's prox in v is exact.

    Args:
        groups: a group or groups.
        tau: the threshold (``lam * lr`` in proximal gradient), >= 0; a mapping gives one per group name.
        q: norm on each neuron's output weights, 1 or 2.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> from lightning_bv import find_neurons
        >>> net = nn.Sequential(nn.Linear(2, 4), nn.ReLU(), nn.Linear(4, 1))
        >>> groups = find_neurons(net, torch.randn(1, 2))
        >>> prox_(groups, tau=100.0)
        >>> int((net[2].weight != 0).sum())
        0
    """
    q = _check_q(q)
    glist = _as_list(groups)
    taus = tau if isinstance(tau, Mapping) else {g.name: tau for g in glist}
    for name, t in taus.items():
        if float(t) < 0 or not math.isfinite(float(t)):
            raise ValueError(f"`tau` must be a finite value >= 0, got {t!r} (group {name!r})")
    shared = _shared_producers(glist)
    for g in glist:
        t = taus[g.name]
        w, _ = group_norms(g, q)
        scale = torch.ones_like(w)
        if g.name not in shared:
            live = w > 0
            _rescale_(g, torch.where(live, 1.0 / torch.where(live, w, scale), scale))
            w = torch.where(live, scale, w)
        reg = [s for s in g.v_slots if s.regularized]
        thr = t * w
        if q == 2:
            v = _safe_sqrt(sum(s.reduce(s.tensor(), "sq") for s in reg))  # type: ignore[arg-type]
            factor = (1.0 - thr / torch.where(v > 0, v, scale)).clamp_min(0.0) * (v > 0)
            for s in reg:
                s.scale_(factor)
        else:
            for s in reg:
                s.soft_threshold_(thr)


@torch.no_grad()
def add_rbv_grad_(groups: Groups, lam: float, q: int = 2) -> None:
    """Add ``lam * grad R`` to the parameters' ``.grad`` in closed form (no autograd graph).

    d/dw_k = lam ||v_k||_q w_k / ||w_k||;  d/dv_k = lam ||w_k|| v_k / ||v_k|| (q=2) or lam ||w_k|| sign(v_k) (q=1).
    Neurons with a zero side get the subgradient 0 on that side.
    """
    q = _check_q(q)
    for g in _as_list(groups):
        w, v = group_norms(g, q)
        cw = lam * v / torch.where(w > 0, w, torch.ones_like(w)) * (w > 0)
        for s in g.w_slots:
            if s.regularized:
                s.add_scaled_grad_(cw)
        cv = lam * w / torch.where(v > 0, v, torch.ones_like(v)) * (v > 0) if q == 2 else lam * w
        for s in g.v_slots:
            if s.regularized:
                s.add_scaled_grad_(cv, sign=q == 1)


@torch.no_grad()
def add_weight_decay_grad_(groups: Groups, lam: float) -> None:
    """Add the gradient of ``lam/2 * sum_k (||v_k||_2^2 + ||w_k||_2^2)`` over grouped weights only (not biases)."""
    for g in _as_list(groups):
        c = torch.full((g.num_neurons,), float(lam))
        for s in g.w_slots + g.v_slots:
            if s.regularized:
                s.add_scaled_grad_(c.to(s.tensor().device))
