"""Compaction: :func:`compact` cuts dead neurons out of a model.

A neuron whose score ``||v_k||_2 ||w_k||_2`` is 0 contributes nothing through its regularized weights (docs/theory.md
section 4: the proximal step makes such neurons). :func:`compact` removes every neuron with score ``<= tol``: the rows
of its producer (Linear ``out_features`` / Conv ``out_channels`` / Hugging Face ``Conv1D`` ``nf``, the bias, the
BatchNorm's ``weight``, ``bias``, ``running_mean`` and ``running_var``), the columns of every consumer (the block of
columns a channel owns after a flatten, its positions in a concat, its slice of a grouped conv), and, for a low-rank
layer (:func:`~lightning_bv.apply_low_rank`), the rank-1
components (columns of ``U``, rows of ``V``). Parameters are replaced by new, smaller ``nn.Parameter`` objects (dtype,
device and ``requires_grad`` kept); :attr:`CompactionReport.param_map` says which old Parameter became which new one
and which entries it kept, and :func:`~lightning_bv.transforms.resize.slice_optimizer_state_` carries an optimizer
over so training goes on. :func:`~lightning_bv.transforms.resize.resize_to_state_dict_` gives a freshly built model
the sizes of a compacted model's ``state_dict`` so that it loads (resuming from a checkpoint saved after compaction).

Each layer is shrunk by the :class:`~lightning_bv.transforms.shrinkers.LayerShrinker` registered for its type;
:func:`~lightning_bv.transforms.shrinkers.register_layer_shrinker` adds a layer type of your own.

With ``tol=0`` the function is unchanged. A neuron is only removed when its contribution is provably zero or charged
by the score: a neuron whose skip-connection (unregularized) consumer weights are nonzero, or whose input weights are
zero but whose output is a nonzero constant, still contributes; it is kept and counted in the report.

Example:
    >>> import torch
    >>> from torch import nn
    >>> from lightning_bv import find_neurons
    >>> net = nn.Sequential(nn.Linear(3, 8), nn.ReLU(), nn.Linear(8, 2))
    >>> with torch.no_grad():
    ...     _ = net[2].weight[:, :5].zero_()  # neurons 0..4 are dead
    >>> x = torch.randn(4, 3)
    >>> y = net(x)
    >>> report = compact(net, example_input=x)
    >>> net
    Sequential(
      (0): Linear(in_features=3, out_features=3, bias=True)
      (1): ReLU()
      (2): Linear(in_features=3, out_features=2, bias=True)
    )
    >>> torch.allclose(net(x), y), report.neurons_before, report.neurons_after
    (True, 8, 3)

"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any, cast

import torch
from torch import Tensor, nn

from lightning_bv._checks import check_groups
from lightning_bv._checks import check_tol as _check_tol
from lightning_bv._layers import low_rank_factors
from lightning_bv.neurons import NeuronGroup, NeuronGroups, find_neurons
from lightning_bv.transforms._compact_checks import ModelIndex, check_model, count
from lightning_bv.transforms._compact_couple import couple, decide
from lightning_bv.transforms._compact_plan import apply, merge, plan_group
from lightning_bv.transforms._compact_remap import Changes, remapped, unfactor_
from lightning_bv.transforms._compact_report import CompactionReport, GroupCompaction
from lightning_bv.transforms._shrinker import CannotShrink, ParamMap
from lightning_bv.transforms.lift import is_lifted
from lightning_bv.transforms.low_rank import remove_low_rank
from lightning_bv.transforms.resize import resize_to_state_dict_, slice_optimizer_state_

__all__ = [
    "CompactionReport",
    "GroupCompaction",
    "ParamMap",
    "compact",
    "resize_to_state_dict_",
    "slice_optimizer_state_",
]


@torch.no_grad()
def compact(
    model: nn.Module,
    groups: NeuronGroup | Iterable[NeuronGroup] | None = None,
    tol: float = 0.0,
    example_input: Tensor | tuple[Any, ...] | Mapping[str, Any] | None = None,
    merge_lifted: bool = True,
) -> CompactionReport:
    """Remove every neuron whose score ``||v_k||_2 ||w_k||_2`` is ``<= tol``, in place.

    Everything is checked before anything changes. A group whose producer or consumer cannot be shrunk (a layer of
    unknown type or with extra parameters, a weight tied to another module, a module registered under several names,
    a BatchNorm over a concatenation) is left whole and reported with the reason; the others are shrunk. Grouped
    convolutions keep as many channels in every group; a depthwise conv's channel goes with the neuron of its input
    group and those of its output group together (its ``groups`` shrink), only when removing it keeps the function;
    neurons kept for that are counted in the report. Several
    groups touching one module (a Linear that consumes one group and produces the next, a concat read by one head,
    a low-rank layer) are shrunk consistently. A group keeps at least one neuron so that no layer has width 0.

    The ``groups`` passed in are left as they are: they describe the model before. ``report.neuron_groups`` are new
    groups for the compacted model, and :meth:`CompactionReport.remap` gives new groups for any other groups of this
    model found earlier (or find them again). Build the optimizer after this call, or carry it over with
    :func:`~lightning_bv.transforms.resize.slice_optimizer_state_` and ``report.param_map``.

    Args:
        model: the model (not wrapped in ``DistributedDataParallel``: compact ``ddp.module`` before wrapping).
        groups: its neuron groups (:func:`~lightning_bv.find_neurons`), or some of them; found with
            ``example_input`` when None.
        tol: remove neurons with score ``<= tol`` (>= 0). ``tol=0`` keeps the function exactly.
        example_input: an input for :func:`~lightning_bv.find_neurons` (a tensor, a tuple of positional arguments or
            a dict of keyword arguments), when ``groups`` is not given.
        merge_lifted: afterwards, merge each product ``A B`` made by :func:`~lightning_bv.lift_shared_weights` back
            into one dense weight when that has fewer parameters (listed in ``report.merged``). The merged weight is
            a new Parameter that ``report.param_map`` does not map: pass False to keep training with a carried-over
            optimizer (the groups then stay unshared).

    Returns:
        CompactionReport: neurons per group before and after, the removed score, parameters before and after, the
        groups of the compacted model (``report.neuron_groups``); ``str(report)`` is a table.

    Raises:
        ValueError: ``tol`` negative or not finite; neither ``groups`` nor ``example_input``; groups that do not
            belong to ``model`` or are stale; a module to shrink with a parametrization other than low-rank.
        TypeError: ``model`` is not an ``nn.Module`` or is wrapped in ``DistributedDataParallel``.
    """
    tol = _check_tol(tol)
    check_model(model)
    if not isinstance(merge_lifted, bool):
        raise TypeError(f"`merge_lifted` must be a bool, got {merge_lifted!r}")
    if groups is None:
        if example_input is None:
            raise ValueError(
                "`compact` needs the model's neuron groups: pass `groups=lightning_bv.find_neurons(model, x)` or "
                "`example_input=x`"
            )
        groups = find_neurons(model, example_input)
    glist = check_groups(groups, NeuronGroup)
    index = ModelIndex(model)
    for g in glist:
        index.check_group(g)
    params_before = count(model)

    decided = [decide(g, tol) for g in glist]
    removes = [d[0] for d in decided]
    rows = [d[1] for d in decided]
    units = couple(index, glist, removes, [d[2] for d in decided], rows)
    changes: Changes = {}
    for unit in units:
        if not any(bool(removes[i].any()) for i in unit):
            continue
        try:
            edits = [e for i in unit if bool(removes[i].any()) for e in plan_group(index, glist[i], removes[i])]
            merge(changes, edits)
        except CannotShrink as why:
            for i in unit:
                g, row = glist[i], rows[i]
                rows[i] = GroupCompaction(g.name, g.num_neurons, g.num_neurons, kept=row.kept + int(removes[i].sum()))
                rows[i].note, rows[i].shrunk = f"left whole: {why}", False

    param_map = apply(changes)
    report = CompactionReport(tol, rows, params_before, count(model), param_map, None, _changes=changes)
    new = [remapped(g, changes) for g in glist]
    if merge_lifted:
        report.merged, report._merged_modules = _merge_lifted(model)
        for g in new:
            unfactor_(g, report._merged_modules)
        report.params_after = count(model)
    report.neuron_groups = NeuronGroups(new, getattr(groups, "skipped", ()))
    report.neuron_groups.lifted = list(getattr(groups, "lifted", []))
    report._updated.update(id(g) for g in new)
    return report


def _merge_lifted(model: nn.Module) -> tuple[list[str], list[nn.Module]]:
    """Merge every lifted ``A B`` whose dense product is no larger back into one weight; names and modules merged."""
    names, modules = [], []
    for name, m in list(model.named_modules()):
        factors = low_rank_factors(m) if is_lifted(m) else None
        if factors is None or factors[0].numel() + factors[1].numel() < cast(Tensor, m.weight).numel():
            continue
        remove_low_rank(m)
        names.append(name)
        modules.append(m)
    return names, modules
