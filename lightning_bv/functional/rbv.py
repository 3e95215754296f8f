"""The R-BV^2 seminorm of neuron groups, and the function-preserving operations on it (docs/theory.md sections 2-4).

Every function takes one :class:`~lightning_bv.neurons.NeuronGroup` or an iterable of them (a ``NeuronGroups``).
Only the regularized entries are charged (neuron input weights ``w_k`` and output weights ``v_k``); biases and skip
connections are rescaled with their neuron where function preservation needs it, never charged.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch
from torch import Tensor

from lightning_bv._checks import check_groups, check_tau
from lightning_bv._checks import check_lam as _check_lam
from lightning_bv._checks import check_q as _check_q
from lightning_bv.functional._kernels import (
    _add_rbv_grad_group_,
    _add_weight_decay_grad_,
    _balance_group_,
    _norms,
    _project_group_,
    _step_group_,
    _unit,
)
from lightning_bv.functional._kernels import _rescale_ as _rescale_  # re-exported (tests)
from lightning_bv.functional._kernels import _shrink_ as _shrink_  # re-exported (benchmarks/prox_parts.py)
from lightning_bv.functional._nonfinite import NONFINITE as NONFINITE  # re-exported
from lightning_bv.functional._nonfinite import NonFiniteWeightsError as NonFiniteWeightsError  # re-exported
from lightning_bv.functional._nonfinite import (
    _check_nonfinite,
    _nonfinite_groups,
    _nonfinite_weight_groups,
    _skip_nonfinite,
)
from lightning_bv.neurons import NeuronGroup

Groups = NeuronGroup | Iterable[NeuronGroup]


def _as_list(groups: Groups) -> list[NeuronGroup]:
    return check_groups(groups, NeuronGroup)


def group_norms(group: NeuronGroup, q: int = 2) -> tuple[Tensor, Tensor]:
    """``(||w_k||_2, ||v_k||_q)`` for every neuron of ``group`` (differentiable when grad is enabled)."""
    return _norms(group, _check_q(q))


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
        _balance_group_(g, w, v)


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


def _begin(groups: Groups, tau: object, q: int, on_nonfinite: str) -> tuple[int, str, list[NeuronGroup], dict]:
    q = _check_q(q)
    on_nonfinite = _check_nonfinite(on_nonfinite)
    glist = _as_list(groups)
    taus = check_tau(tau, [(g.name, g.num_neurons) for g in glist])
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
        _step_group_(g, w, v, taus[g.name], q, normalize)
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
        _project_group_(g, a)


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
        _add_rbv_grad_group_(g, w, v, lam, q)
    return skipped


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
    skipped = _nonfinite_weight_groups(glist, slots, on_nonfinite)
    _add_weight_decay_grad_(glist, slots, lam, skipped)
    return skipped
