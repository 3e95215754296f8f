"""The proximal threshold of each neuron: ``lam`` times the step the optimizer really took on its output weights.

A proximal-gradient method shrinks by ``lam`` times its step size. The step an optimizer takes on a coordinate with a
persistent gradient ``g`` is ``g / D`` for a per-coordinate ``D`` (its inverse step):

* SGD: ``D = 1 / lr`` without momentum; heavy ball with momentum ``beta`` and dampening ``d`` reaches the step
  ``lr (1 - d) / (1 - beta)``, Nesterov ``lr (1 + beta (1 - d) / (1 - beta))``.
* Adam, AdamW: ``D = (sqrt(v_hat) + eps) / lr`` with the bias-corrected second moment ``v_hat = exp_avg_sq /
  (1 - beta2^t)`` (``max_exp_avg_sq`` with amsgrad).
* RMSprop: ``D = (sqrt(square_avg) + eps) (1 - momentum) / lr`` (centered: ``square_avg - grad_avg^2``).
* Adagrad: ``D = (sqrt(sum) + eps) / clr`` with ``clr = lr / (1 + (t - 1) lr_decay)``.

Following ProxGen (Yun, Lozano and Yang, NeurIPS 2021) with one scalar per neuron, neuron k's threshold is
``tau_k = lam / mean_i(D_i)`` over the coordinates ``i`` of its output weights ``v_k``. For SGD that is the familiar
``lam * lr`` (times the momentum factor); for Adam it makes ``lam`` mean the same as for SGD: without it, Adam's steps
of fixed size ``~lr`` leave a threshold ``lam * lr`` far too small to kill anything. Before an adaptive optimizer has
state for a tensor, its threshold is ``lam * lr``.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from lightning_bv._checks import check_groups, check_lam
from lightning_bv._sharding import all_reduce_
from lightning_bv.neurons import NeuronGroup, Slot

KNOWN = ("SGD", "Adam", "AdamW", "RMSprop", "Adagrad")


def optimizer_kind(optimizer: Any) -> str | None:
    """The name in :data:`KNOWN` of the torch optimizer class ``optimizer`` is or derives from, else None."""
    for cls in type(optimizer).__mro__:
        if cls.__name__ in KNOWN and cls.__module__.startswith("torch.optim"):
            return cls.__name__
    return None


def _sgd_factor(group: dict[str, Any]) -> float:
    """The step of heavy ball (or Nesterov) on a persistent gradient, in units of ``lr``."""
    beta = float(group.get("momentum", 0.0) or 0.0)
    if beta <= 0:
        return 1.0
    d = float(group.get("dampening", 0.0) or 0.0)
    if group.get("nesterov", False):
        return 1.0 + beta * (1.0 - d) / (1.0 - beta)
    return (1.0 - d) / (1.0 - beta)


def _step_of(state: dict[str, Any]) -> float:
    step = state.get("step", 0)
    return float(step.item() if isinstance(step, Tensor) else step)


def _denominator(kind: str, group: dict[str, Any], state: dict[str, Any]) -> Tensor | None:
    """``D * lr`` per coordinate of an adaptive optimizer (None before it has state for the tensor)."""
    eps = float(group.get("eps", 1e-8))
    if kind in ("Adam", "AdamW"):
        sq = state.get("max_exp_avg_sq") if group.get("amsgrad", False) else state.get("exp_avg_sq")
        t = _step_of(state)
        if sq is None or t <= 0:
            return None
        bc2 = 1.0 - float(group["betas"][1]) ** t
        return (sq.float() / bc2).sqrt_().add_(eps)
    if kind == "RMSprop":
        sq = state.get("square_avg")
        if sq is None:
            return None
        sq = sq.float()
        if group.get("centered", False) and state.get("grad_avg") is not None:
            sq = sq - state["grad_avg"].float().square()
        return sq.clamp_min(0).sqrt_().add_(eps).mul_(1.0 - float(group.get("momentum", 0.0) or 0.0))
    if kind == "Adagrad":
        total = state.get("sum")
        if total is None:
            return None
        t = _step_of(state)
        decay = 1.0 + max(t - 1.0, 0.0) * float(group.get("lr_decay", 0.0))
        return total.float().sqrt().add_(eps).mul_(decay)
    return None


def _check_lrs(lrs: object, n: int) -> list[float] | None:
    if lrs is None:
        return None
    if not isinstance(lrs, Sequence) or len(lrs) != n:
        raise ValueError(f"`lrs` must be None or one learning rate per parameter group ({n}), got {lrs!r}")
    out = []
    for lr in lrs:
        value = float(lr.item()) if isinstance(lr, Tensor) else lr
        if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value) or value < 0:
            raise ValueError(f"`lrs` must hold finite learning rates >= 0, got {lr!r}")
        out.append(float(value))
    return out


def prox_thresholds(
    groups: NeuronGroup | Sequence[NeuronGroup],
    optimizer: torch.optim.Optimizer,
    lam: float,
    *,
    lrs: Sequence[float] | None = None,
) -> dict[str, float | Tensor]:
    """The threshold of every neuron of ``groups``: ``lam`` times the step ``optimizer`` took on its output weights.

    Call it right after ``optimizer.step()``: adaptive optimizers' second moments then include the step just taken.
    Each group gets a float when all its output weights see one scalar step (SGD; one parameter group), else a
    tensor of shape ``[num_neurons]`` (Adam, AdamW, RMSprop, Adagrad; see the module docstring for the formulas). An
    output weight the optimizer does not hold (frozen) takes no step: threshold 0. Optimizers not in
    :data:`KNOWN` get ``lam * lr``; the callback warns about them once.

    Args:
        groups: the neuron groups.
        optimizer: a ``torch.optim.Optimizer`` (Lightning's wrapper works too).
        lam: the regularization strength, ``>= 0``.
        lrs: the learning rate of each parameter group for this step, when the optimizer's ``lr`` has moved on since
            (a scheduler stepped in between); default: each group's current ``lr``.

    Returns:
        ``{group name: threshold}``, ready for :func:`lightning_bv.proximal_step_` and :func:`lightning_bv.prox_`.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> from lightning_bv import find_neurons
        >>> net = nn.Sequential(nn.Linear(2, 4), nn.ReLU(), nn.Linear(4, 1))
        >>> groups = find_neurons(net, torch.randn(1, 2))
        >>> taus = prox_thresholds(groups, torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9), lam=0.01)
        >>> round(taus["0"], 6)  # lam * lr / (1 - momentum)
        0.01
    """
    lam = check_lam(lam)
    glist = check_groups(groups, NeuronGroup)
    opt = getattr(optimizer, "optimizer", optimizer)  # Lightning's LightningOptimizer wraps the torch one
    if not hasattr(opt, "param_groups"):
        raise TypeError(f"`optimizer` must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
    group_lrs = _check_lrs(lrs, len(opt.param_groups))
    kind = optimizer_kind(opt)
    where: dict[int, int] = {id(p): i for i, pg in enumerate(opt.param_groups) for p in pg["params"]}
    out: dict[str, float | Tensor] = {}
    for g in glist:
        slots = [s for s in g.v_slots if s.regularized]
        out[g.name] = _group_threshold(g, slots, opt, kind, where, group_lrs, lam)
    return out


def _group_threshold(
    g: NeuronGroup,
    slots: list[Slot],
    opt: Any,
    kind: str | None,
    where: dict[int, int],
    group_lrs: list[float] | None,
    lam: float,
) -> float | Tensor:
    scalars: set[float] = set()
    parts: list[tuple[Slot, Tensor | float]] = []  # (slot, inverse step per coordinate or one for all)
    for s in slots:
        leaf = s.written()
        i = where.get(id(leaf))
        if i is None:
            parts.append((s, math.inf))
            scalars.add(math.inf)
            continue
        pg = opt.param_groups[i]
        lr = group_lrs[i] if group_lrs is not None else float(pg["lr"])
        if lr <= 0:
            parts.append((s, math.inf))
            scalars.add(math.inf)
            continue
        denom = _denominator(kind, pg, opt.state.get(leaf, {})) if kind not in (None, "SGD") else None
        if denom is None:
            inv = 1.0 / (lr * (_sgd_factor(pg) if kind == "SGD" else 1.0))
            parts.append((s, inv))
            scalars.add(inv)
        else:
            parts.append((s, denom.div_(lr)))  # in place: the one new tensor
            scalars.add(math.nan)  # per coordinate
    if len(scalars) == 1 and not any(isinstance(d, Tensor) for _, d in parts):
        inv = next(iter(scalars))
        return 0.0 if math.isinf(inv) else lam / inv
    device = slots[0].written().device
    total = torch.zeros(g.num_neurons, device=device)
    count = torch.zeros(g.num_neurons, device=device)
    split: dict[Any, Tensor] = {}  # process group -> local sums of the slots split over it (FSDP2): one all-reduce
    for s, d in parts:
        view = s if not s._lowrank() else s.owning_factor()  # Adam's state is on the factor the slot writes
        shape = view.tensor().shape
        n = _entries(s, view, shape).to(device)
        count += n
        if not isinstance(d, Tensor):
            total += n * d  # one inverse step for every entry (inf: frozen)
            continue
        part, pg = view.reduce_part(d.reshape(shape), "abs")  # per-neuron sum of D (positive: abs changes nothing)
        if pg is None:
            total += part
        else:
            split[pg] = split[pg] + part if pg in split else part
    for pg, part in split.items():
        total += all_reduce_([part], pg)[0]
    total = torch.nan_to_num(total, nan=math.inf, posinf=math.inf)  # a NaN moment: no step known, no threshold
    return lam * count / total.clamp_min(1e-30)


def _entries(s: Slot, view: Slot, shape: torch.Size) -> Tensor:
    """``view.entries_per_neuron(shape)``, kept on ``s`` while its shape and index stay (they change at compaction)."""
    key = (tuple(shape), view.factor, id(view.index))
    cached = getattr(s, "_lbv_entries", None)
    if cached is None or cached[0] != key:
        cached = (key, view.entries_per_neuron(shape))
        s._lbv_entries = cached  # type: ignore[attr-defined]
    return cached[1]
