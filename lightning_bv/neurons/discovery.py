"""Discovery: :func:`find_neurons` runs the model once under a trace and :func:`analyze` turns the trace into groups.

Also the passes over found groups: :func:`own_factors` (a low-rank layer between two groups is read through its
factors) and :func:`shared_weights` (plain weights that two groups share).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn

from lightning_bv._layers import FACTOR_U, FACTOR_V, low_rank_factors
from lightning_bv._select import Targets, select_names
from lightning_bv._trace import Trace
from lightning_bv.neurons.analysis import _Analysis, _parametrized, _Skip
from lightning_bv.neurons.group import NeuronGroup, NeuronGroups
from lightning_bv.neurons.slot import Slot


def own_factors(groups: Sequence[NeuronGroup]) -> list[str]:
    """Let groups own the factors of every low-rank layer that sits between two of them, in place.

    A low-rank layer ``W = U V`` that is a consumer of one group (its columns) and the producer of another (its rows,
    no BatchNorm between) would be shared by both if read as the product. Instead, the consuming side's ``v_k`` become
    the columns of ``V`` and the producing side's ``w_j`` the rows of ``U`` (``Slot.factor``): no tensor is shared, and
    the layer's rank components need no group of their own (the neurons' penalty drives the rank down). Returns the
    names of the layers read that way.
    """
    roles: dict[str, set[int]] = {}
    for g in groups:
        for s in g.w_slots + g.v_slots:
            if s.param == "weight" and s.regularized and s._lowrank() is not None:
                roles.setdefault(s.module_name, set()).add(s.dim)
    between = {name for name, dims in roles.items() if dims == {0, 1}}
    for g in groups:
        g.w_slots = tuple(s.owning_factor() if s.module_name in between and s.param == "weight" else s
                          for s in g.w_slots)  # fmt: skip
        g.v_slots = tuple(s.owning_factor() if s.module_name in between and s.param == "weight" else s
                          for s in g.v_slots)  # fmt: skip
    return sorted(between)


def shared_weights(groups: Sequence[NeuronGroup]) -> list[str]:
    """Names of the plain Linear/Conv layers whose weight is one group's input weights and another's output weights.

    That is the hidden matrix of a plain Linear-ReLU-Linear-ReLU chain: its columns belong to the neurons before it,
    its rows to the neurons after it, so no per-neuron rescaling or proximal step is exact for either group.
    :func:`lightning_bv.lift_shared_weights` writes such a weight as a full-rank product ``A B`` instead.
    """
    rows: set[str] = set()
    cols: set[str] = set()
    for g in groups:
        for s in g.w_slots:
            if s.param == "weight" and s.dim == 0 and s.regularized and s._lowrank() is None and not s.factor:
                rows.add(s.module_name)
        for s in g.v_slots:
            if s.param == "weight" and s.regularized and s._lowrank() is None and not s.factor:
                cols.add(s.module_name)
    return sorted(rows & cols)


def _low_rank_groups(modules: Mapping[str, nn.Module]) -> list[NeuronGroup]:
    groups = []
    for name, mod in modules.items():
        f = low_rank_factors(mod) if _parametrized(mod) else None
        if f is None:
            continue
        r = f[0].shape[1]
        w = Slot(mod, name, FACTOR_V, 0)
        v = Slot(mod, name, FACTOR_U, 1)
        groups.append(NeuronGroup(f"{name}:rank", [name], [None], "identity", [name], r, [w], [], [v]))
    return groups


def analyze(trace: Trace, root: nn.Module, targets: Targets = None, exclude: Targets = None) -> NeuronGroups:
    """Turn a recorded trace of ``root`` into neuron groups (used by :func:`find_neurons` and the callbacks)."""
    a = _Analysis(trace, root)
    groups: list[NeuronGroup] = []
    skipped: list[tuple[str, str]] = []
    for op in trace.ops:
        if op.kind not in ("act", "nonhom"):
            continue
        where = op.module or "<root>"
        label = f"{op.name} (op {op.index} in '{where}')"
        if op.kind == "nonhom":
            skipped.append((label, a.non_homogeneous(op)))
            continue
        try:
            groups.append(a.group(op))
        except _Skip as why:
            skipped.append((label, str(why)))
    rank_groups = _low_rank_groups(a.modules)
    if targets is not None or exclude is not None:
        candidates = list(dict.fromkeys(p for g in groups + rank_groups for p in (*g.producers, g.name)))
        picked = set(select_names(candidates, targets, exclude))
        kept = []
        for g in groups + rank_groups:
            if g.name in picked or any(p in picked for p in g.producers):
                kept.append(g)
            else:
                skipped.append((g.name, "not selected by targets/exclude"))
        groups = [g for g in kept if g.activation != "identity"]
        rank_groups = [g for g in kept if g.activation == "identity"]
    owned = set(own_factors(groups))  # a low-rank layer between two selected groups: its factors are theirs
    groups += [g for g in rank_groups if g.producer not in owned]
    return NeuronGroups(groups, skipped)


def find_neurons(
    model: nn.Module,
    example_input: Tensor | tuple[Any, ...] | Mapping[str, Any],
    *,
    targets: Targets = None,
    exclude: Targets = None,
) -> NeuronGroups:
    """Find every group of positively homogeneous neurons (ReLU, LeakyReLU, PReLU) in ``model``.

    Runs ``model(example_input)`` (``model(*example_input)`` for a tuple, ``model(**example_input)`` for a dict, as
    Hugging Face models take ``input_ids=...``) once and reads the real dataflow, so models with data-dependent Python
    control flow work. Only reads whose results reach the output (or another layer's input) count: a statistic
    logged in ``forward`` or a comparison that picks a branch does not make a group unsafe. The model is left as it
    was: buffers (BatchNorm running statistics) are copied back in place and the random number generator state is
    restored.

    Args:
        model: any ``nn.Module``.
        example_input: a tensor (floating point, or integer token ids), a tuple of positional arguments, or a dict of
            keyword arguments.
        targets: keep only groups whose producer (or name) matches: a str is a regex on the full module name, a
            list matches exactly or by ``.suffix``.
        exclude: drop groups matching this rule (same form); wins over ``targets``.

    Returns:
        NeuronGroups: the groups, with ``.skipped`` listing every activation left out and why (non-homogeneous
        activations such as ReLU6 or GELU included: :meth:`NeuronGroups.found_instead` summarizes them).

    Example:
        >>> net = nn.Sequential(nn.Linear(3, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 1))
        >>> groups = find_neurons(net, torch.randn(4, 3))
        >>> [(g.producer, g.consumers, g.num_neurons) for g in groups]
        [('0', ('2',), 8), ('2', ('4',), 8)]

    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"`model` must be an nn.Module, got {type(model).__name__}")
    if not isinstance(example_input, (Tensor, tuple, Mapping)):
        raise TypeError(
            "`example_input` must be a tensor, a tuple of positional arguments or a dict of keyword arguments, got "
            f"{type(example_input).__name__}"
        )
    if isinstance(example_input, Mapping):
        args: tuple[Any, ...] = ()
        kwargs = dict(example_input)
    else:
        args, kwargs = example_input if isinstance(example_input, tuple) else (example_input,), {}
    trace = Trace(model)
    with _buffers_restored(model), torch.random.fork_rng(devices=[]), torch.enable_grad():
        trace.start()
        try:
            trace.mark_outputs(model(*args, **kwargs))
        finally:
            trace.stop()
    return analyze(trace, model, targets, exclude)


@contextmanager
def _buffers_restored(model: nn.Module) -> Iterator[None]:
    """Copy every buffer back in place on exit.

    Not through ``load_state_dict``: a plain dict has no ``_metadata``, and modules whose ``_load_from_state_dict``
    reads its version (torchvision's MNASNet) refuse it.
    """
    saved = [(b, b.detach().clone()) for b in model.buffers()]
    try:
        yield
    finally:
        with torch.no_grad():
            for b, copy in saved:
                b.copy_(copy)
