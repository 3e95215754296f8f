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
from dataclasses import dataclass, field
from typing import Any, cast

import torch
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel
from torch.nn.utils import parametrize

from lightning_bv._checks import check_tol as _check_tol
from lightning_bv._layers import ANY_BATCH_NORM as _BN
from lightning_bv._layers import CONVS as _CONVS
from lightning_bv._layers import FACTOR_U as _U
from lightning_bv._layers import FACTOR_V as _V
from lightning_bv._layers import U_KEY, V_KEY, WEIGHTED, low_rank_factors, low_rank_weight, weight_parametrizations
from lightning_bv._sharding import refuse_split
from lightning_bv.functional.rbv import group_norms
from lightning_bv.neurons import GroupedSlot, NeuronGroup, NeuronGroups, Slot, find_neurons, is_conv1d
from lightning_bv.transforms.lift import is_lifted
from lightning_bv.transforms.low_rank import remove_low_rank
from lightning_bv.transforms.resize import _take
from lightning_bv.transforms.resize import resize_to_state_dict_ as resize_to_state_dict_  # re-exported
from lightning_bv.transforms.resize import slice_optimizer_state_ as slice_optimizer_state_  # re-exported

# (slot param, slot dim) -> the module axis that holds the neurons
_AXIS = {("weight", 0): "out", ("bias", 0): "out", ("weight", 1): "in", (_V, 0): "rank", (_U, 1): "rank"}
_AXIS_CONV1D = {("weight", 1): "out", ("bias", 0): "out", ("weight", 0): "in"}  # HF Conv1D: weight [in, out]


def _axis(s: Slot) -> str | None:
    """The module axis that holds the neurons of slot ``s``."""
    if is_conv1d(s.module):
        return _AXIS_CONV1D.get((s.param, s.dim))
    return _AXIS.get((s.param, s.dim))


def _in_width(m: Any) -> int:
    """Input features / channels of a Linear, Conv (all groups) or HF Conv1D."""
    if is_conv1d(m):
        return int(m.weight.shape[0])
    return int(m.weight.shape[1]) * int(getattr(m, "groups", 1))


def _out_width(m: Any) -> int:
    return int(m.weight.shape[1] if is_conv1d(m) else m.weight.shape[0])


ParamMap = dict[Tensor, tuple[nn.Parameter, tuple[Tensor | None, ...]]]


class _CannotShrink(Exception):
    pass


@dataclass
class GroupCompaction:
    """What :func:`compact` did to one neuron group.

    Attributes:
        name: the group's name.
        before: neurons before.
        after: neurons after.
        removed_score: sum of the scores ``||v_k||_2 ||w_k||_2`` of the removed neurons (0 with ``tol=0``).
        kept: neurons with score ``<= tol`` that were kept (see ``note``).
        note: why some were kept, or why the group was left whole.
        shrunk: False when the group could not be shrunk and was left whole.
    """

    name: str
    before: int
    after: int
    removed_score: float = 0.0
    kept: int = 0
    note: str = ""
    shrunk: bool = True


@dataclass(eq=False)
class _Change:
    """Kept indices of one module along its axes ("out", "in", "rank"), with the sizes before."""

    module: nn.Module
    name: str
    keep: dict[str, Tensor] = field(default_factory=dict)
    size: dict[str, int] = field(default_factory=dict)
    removed: dict[str, Tensor] = field(default_factory=dict)  # bool masks of the removed entries


@dataclass(eq=False)
class CompactionReport:
    """The result of :func:`compact`: per-group neuron counts, the parameter count, and what was replaced.

    Attributes:
        tol: the threshold used.
        groups: one :class:`GroupCompaction` per group, in order.
        params_before: number of parameter entries of the whole model before.
        params_after: the same after.
        param_map: ``{old Parameter: (new Parameter, kept indices per dim)}`` for every replaced Parameter; an index
            of None keeps the whole dim. Pass it to :func:`~lightning_bv.transforms.resize.slice_optimizer_state_`.
        neuron_groups: the groups compaction used, updated to the new sizes (usable right away).
        merged: the lifted layers whose product ``A B`` was merged back into one dense weight.
    """

    tol: float
    groups: list[GroupCompaction]
    params_before: int
    params_after: int
    param_map: ParamMap = field(default_factory=dict, repr=False)
    neuron_groups: NeuronGroups | None = field(default=None, repr=False)
    merged: list[str] = field(default_factory=list)
    _changes: dict[int, _Change] = field(default_factory=dict, repr=False)
    _updated: set[int] = field(default_factory=set, repr=False)
    _merged_modules: list[nn.Module] = field(default_factory=list, repr=False)

    @property
    def neurons_before(self) -> int:
        """Neurons of all groups before."""
        return sum(g.before for g in self.groups)

    @property
    def neurons_after(self) -> int:
        """Neurons of all groups after."""
        return sum(g.after for g in self.groups)

    @property
    def removed_score(self) -> float:
        """Sum of the scores of every removed neuron."""
        return sum(g.removed_score for g in self.groups)

    def update_groups_(self, groups: Iterable[NeuronGroup]) -> Iterable[NeuronGroup]:
        """Update other neuron groups of the same model to the new sizes, in place, and return them.

        Any ``NeuronGroups`` found before the compaction (another callback's, a second ``find_neurons`` call) hold
        stale neuron counts and column indices; this remaps them. Groups already updated are left alone.

        Raises:
            ValueError: a group that does not match the compacted model (found on another model, or already stale).
        """
        for g in groups:
            if id(g) not in self._updated:
                _unfactor(g, self._merged_modules)
                _remap_group(g, self._changes)
                self._updated.add(id(g))
        return groups

    def __str__(self) -> str:
        shrunk = sum(g.before != g.after for g in self.groups)
        ratio = self.params_after / max(self.params_before, 1)
        lines = [
            f"compaction (tol={self.tol:g}): {shrunk} of {len(self.groups)} group(s) shrunk, "
            f"neurons {self.neurons_before} -> {self.neurons_after}, "
            f"parameters {self.params_before:,} -> {self.params_after:,} ({100 * ratio:.1f}%)"
        ]
        rows = [("group", "neurons", "removed", "removed score", "note")]
        for g in self.groups:
            score = f"{g.removed_score:.4g}" if g.shrunk else "-"
            rows.append((g.name, f"{g.before} -> {g.after}", str(g.before - g.after), score, g.note))
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        lines += ["  " + "  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
        if self.merged:
            lines.append("lifted products A B merged back into one weight: " + ", ".join(self.merged))
        return "\n".join(lines)


# ------------------------------------------------------------------------------------------------------------
# public functions
# ------------------------------------------------------------------------------------------------------------
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

    The ``groups`` passed in are updated to the new sizes; other groups of this model found earlier are stale:
    update them with :meth:`CompactionReport.update_groups_` (or find them again). Build the optimizer after this
    call, or carry it over with :func:`~lightning_bv.transforms.resize.slice_optimizer_state_` and ``report.param_map``.

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
        CompactionReport: neurons per group before and after, the removed score, parameters before and after;
        ``str(report)`` is a table.

    Raises:
        ValueError: ``tol`` negative or not finite; neither ``groups`` nor ``example_input``; groups that do not
            belong to ``model`` or are stale; a module to shrink with a parametrization other than low-rank.
        TypeError: ``model`` is not an ``nn.Module`` or is wrapped in ``DistributedDataParallel``.
    """
    tol = _check_tol(tol)
    _check_model(model)
    if not isinstance(merge_lifted, bool):
        raise TypeError(f"`merge_lifted` must be a bool, got {merge_lifted!r}")
    if groups is None:
        if example_input is None:
            raise ValueError(
                "`compact` needs the model's neuron groups: pass `groups=lightning_bv.find_neurons(model, x)` or "
                "`example_input=x`"
            )
        groups = find_neurons(model, example_input)
    glist = _as_groups(groups)
    index = _ModelIndex(model)
    for g in glist:
        index.check_group(g)
    params_before = _count(model)

    decided = [_decide(g, tol) for g in glist]
    removes = [d[0] for d in decided]
    rows = [d[1] for d in decided]
    units = _couple(index, glist, removes, [d[2] for d in decided], rows)
    changes: dict[int, _Change] = {}
    for unit in units:
        if not any(bool(removes[i].any()) for i in unit):
            continue
        try:
            edits = [e for i in unit if bool(removes[i].any()) for e in _plan_group(index, glist[i], removes[i])]
            _merge(changes, edits)
        except _CannotShrink as why:
            for i in unit:
                g, row = glist[i], rows[i]
                rows[i] = GroupCompaction(g.name, g.num_neurons, g.num_neurons, kept=row.kept + int(removes[i].sum()))
                rows[i].note, rows[i].shrunk = f"left whole: {why}", False

    param_map = _apply(changes)
    report = CompactionReport(tol, rows, params_before, _count(model), param_map, None, _changes=changes)
    report.update_groups_(glist)
    if merge_lifted:
        report.merged, report._merged_modules = _merge_lifted(model)
        for g in glist:
            _unfactor(g, report._merged_modules)
        report.params_after = _count(model)
    report.neuron_groups = groups if isinstance(groups, NeuronGroups) else NeuronGroups(glist)
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


def _unfactor(g: NeuronGroup, merged: list[nn.Module]) -> None:
    """Slots of ``g`` on the factors of a merged layer read its (new, dense) weight instead."""
    if not merged:
        return
    g.w_slots = tuple(s.owning_product() if s.factor and any(s.module is m for m in merged) else s for s in g.w_slots)
    g.v_slots = tuple(s.owning_product() if s.factor and any(s.module is m for m in merged) else s for s in g.v_slots)


# ------------------------------------------------------------------------------------------------------------
# checks
# ------------------------------------------------------------------------------------------------------------
def _check_model(model: object) -> None:
    if not isinstance(model, nn.Module):
        raise TypeError(f"`model` must be an nn.Module, got {type(model).__name__}")
    refuse_split(model, "compact")
    for name, m in model.named_modules():
        if isinstance(m, DistributedDataParallel):
            where = "`model`" if name == "" else f"module '{name}' of `model`"
            raise TypeError(
                f"{where} is wrapped in DistributedDataParallel, which registered its parameters when it wrapped the "
                "model; they cannot be replaced. Compact the plain module (`ddp.module`) before wrapping it, or "
                "after training, then wrap it again."
            )


def _as_groups(groups: object) -> list[NeuronGroup]:
    if isinstance(groups, NeuronGroup):
        return [groups]
    items = list(groups) if isinstance(groups, Iterable) and not isinstance(groups, (str, nn.Module)) else [groups]
    bad = next((g for g in items if not isinstance(g, NeuronGroup)), None)
    if bad is not None:
        raise TypeError(
            "`groups` must be a NeuronGroup or an iterable of them (lightning_bv.find_neurons(model, x)), got "
            f"{type(groups).__name__}" + (f" holding a {type(bad).__name__}" if bad is not groups else "")
        )
    return items  # type: ignore[return-value]


def _count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


class _ModelIndex:
    """Names, aliases and parameter owners of a model, for the checks."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.names: dict[int, list[str]] = {}
        self.owners: dict[int, set[str]] = {}
        for name, m in model.named_modules(remove_duplicate=False):
            self.names.setdefault(id(m), []).append(name)
            for _, p in m.named_parameters(recurse=False):
                self.owners.setdefault(id(p), set()).add(name)

    def get(self, name: str) -> nn.Module:
        try:
            return self.model.get_submodule(name)
        except AttributeError as err:
            raise ValueError(
                f"The neuron groups name a module '{name}' that `model` does not have: pass groups found on this "
                "model (find_neurons(model, x))"
            ) from err

    def check_group(self, g: NeuronGroup) -> None:
        """Raise unless ``g`` was found on this model and still matches its sizes."""
        k = g.num_neurons
        for s in g.slots():
            if self.get(s.module_name) is not s.module:
                raise ValueError(
                    f"Group '{g.name}' refers to a module '{s.module_name}' that is not the one in `model`: pass "
                    "groups found on this model (find_neurons(model, x))"
                )
            shape = s.tensor().shape
            width = shape[1] * s.groups if isinstance(s, GroupedSlot) else shape[1] if s.dim == 1 else 0
            if s.dim == 0:
                ok = shape[0] == k
            elif s.index is None:
                ok = width == k
            else:
                ok = s.index.shape[0] == k and int(s.index.max()) < width
            if not ok:
                raise ValueError(
                    f"Group '{g.name}' has {k} neurons, which does not match {s!r} of shape {tuple(shape)}: the "
                    "groups are stale (found before the model changed). Find them again, or update them with "
                    "CompactionReport.update_groups_."
                )

    def check_layout(self, name: str, m: nn.Module, kind: str) -> None:
        """Raise _CannotShrink (or ValueError for an unknown parametrization) unless compact can shrink ``m``."""
        if kind == "norm" and not isinstance(m, _BN):
            raise _CannotShrink(f"'{name}' is a {type(m).__name__}, not a BatchNorm")
        if kind == "prelu" and not isinstance(m, nn.PReLU):
            raise _CannotShrink(f"its per-neuron activation slopes are in '{name}' ({type(m).__name__}), not a PReLU")
        if kind == "layer" and not (isinstance(m, WEIGHTED) or is_conv1d(m)):
            raise _CannotShrink(f"'{name}' is a {type(m).__name__}, which compact cannot shrink (Linear/Conv only)")
        low_rank = _check_parametrizations(name, m)
        allowed = {"bias"} if low_rank else {"weight"} if kind == "prelu" else {"weight", "bias"}
        extra = sorted(set(m._parameters) - allowed)
        buffers = {"running_mean", "running_var", "num_batches_tracked"} if kind == "norm" else set()
        extra += sorted(set(m._buffers) - buffers)
        if extra:
            raise _CannotShrink(
                f"'{name}' ({type(m).__name__}) has tensors {extra} that compact does not know how to shrink"
            )
        if any(isinstance(p, nn.parameter.UninitializedParameter) for p in m.parameters()):
            raise _CannotShrink(f"'{name}' is a lazy module that is not initialized yet")
        aliases = self.names.get(id(m), [name])
        if len(aliases) > 1:
            raise _CannotShrink(
                f"'{name}' is registered under several names {aliases}; it may be called elsewhere in the model"
            )
        for p in m.parameters():
            shared = self.owners.get(id(p), set()) - {name, f"{name}.parametrizations.weight".lstrip(".")}
            if shared:
                raise _CannotShrink(f"a parameter of '{name}' is shared with {sorted(shared)} (tied weights)")


def _check_parametrizations(name: str, m: nn.Module) -> bool:
    """True for a low-rank module; ValueError for any parametrization compact does not understand."""
    if not parametrize.is_parametrized(m):
        return False
    plists = cast(Any, m).parametrizations
    for tensor, plist in plists.items():
        if tensor != "weight" or low_rank_factors(m) is None:
            kinds = [type(p).__name__ for p in plist]
            raise ValueError(
                f"Cannot compact '{name}': its `{tensor}` is parametrized by {kinds}, which compact does not know "
                "how to shrink (only LowRankWeight from apply_low_rank). Remove it first "
                "(torch.nn.utils.parametrize.remove_parametrizations)."
            )
    return True


# ------------------------------------------------------------------------------------------------------------
# planning
# ------------------------------------------------------------------------------------------------------------
def _decide(g: NeuronGroup, tol: float) -> tuple[Tensor, GroupCompaction, Tensor]:
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


def _plan_group(index: _ModelIndex, g: NeuronGroup, remove: Tensor) -> list[tuple[_Change, str, Tensor]]:
    """The removals ``g`` needs: (module change, axis, bool mask of removed entries along that axis)."""
    k = g.num_neurons
    edits: list[tuple[_Change, str, Tensor]] = []

    def add(name: str, m: nn.Module, axis: str, mask: Tensor) -> None:
        edits.append((_Change(m, name), axis, mask))

    rank_slots = [s for s in g.slots() if s.param in (_U, _V)]
    if rank_slots:  # the rank-1 components of a low-rank layer
        s = rank_slots[0]
        if any(r.module is not s.module for r in rank_slots) or len(rank_slots) != len(g.slots()):
            raise _CannotShrink("it mixes low-rank components with other weights")
        index.check_layout(s.module_name, s.module, "layer")
        factors = low_rank_factors(s.module)
        if factors is None or factors[0].shape[1] != k:
            raise ValueError(f"Group '{g.name}' does not match the rank of '{s.module_name}': the groups are stale")
        add(s.module_name, s.module, "rank", remove)
        return edits

    for prod, norm in zip(g.producers, g.norms):
        if prod == norm:
            raise _CannotShrink(
                f"its neurons are the channels of BatchNorm '{norm}', whose input is not the output of one Linear/Conv "
                "that only it reads (a concatenation, an input, a tensor other layers read too): a channel cannot be "
                "cut out of that input for this BatchNorm alone"
            )
        m = index.get(prod)
        index.check_layout(prod, m, "layer")
        _check_size(g, prod, _out_width(m), "output features")
        add(prod, m, "out", remove)
        if norm is not None:
            bn = index.get(norm)
            index.check_layout(norm, bn, "norm")
            _check_size(g, norm, int(cast(Any, bn).num_features), "features")
            add(norm, bn, "out", remove)
    if g.activation_module is not None:  # a PReLU with one slope per neuron
        act = index.get(g.activation_module)
        index.check_layout(g.activation_module, act, "prelu")
        _check_size(g, g.activation_module, int(cast(Any, act).num_parameters), "slopes")
        add(g.activation_module, act, "out", remove)
    for s in g.slots():
        axis = _axis(s)
        if axis is None or (axis == "out" and s.module_name not in g.producers + g.norms):
            raise _CannotShrink(f"its slot {s!r} is not a producer row or a consumer column compact knows")
    for s in g.v_slots:
        index.check_layout(s.module_name, s.module, "layer")
        n_in = _in_width(s.module)
        mask = torch.zeros(n_in, dtype=torch.bool)
        if s.index is None:
            _check_size(g, s.module_name, n_in, "input features")
            mask[remove] = True
        else:
            if s.index.shape[0] != k or int(s.index.max()) >= n_in:
                raise ValueError(f"Group '{g.name}' does not match the columns of '{s.module_name}': stale groups")
            mask[s.index[remove].flatten().cpu()] = True
        add(s.module_name, s.module, "in", mask)
    return edits


def _conv_groups(m: Any) -> int:
    return int(m.groups) if isinstance(m, _CONVS) else 1


def _check_grouped(name: str, m: Any, removed: dict[str, Tensor]) -> None:
    """Raise _CannotShrink unless removing these channels leaves a valid grouped convolution.

    Every group must keep the same number of input and of output channels. A depthwise-like conv (one input
    channel per group) can only lose whole groups: an input channel together with all the outputs that read it.
    """
    groups = _conv_groups(m)
    if groups == 1:
        return
    n_in, n_out = int(m.in_channels), int(m.out_channels)
    ipg, opg = n_in // groups, n_out // groups
    r_in = removed.get("in", torch.zeros(n_in, dtype=torch.bool)).reshape(groups, ipg).sum(1)
    r_out = removed.get("out", torch.zeros(n_out, dtype=torch.bool)).reshape(groups, opg).sum(1)
    whole = (r_in == ipg) & (r_out == opg)
    if ipg == 1:
        if bool((~whole & ((r_in > 0) | (r_out > 0))).any()):
            raise _CannotShrink(
                f"'{name}' is a depthwise convolution (groups={groups}): an input channel can only be removed together "
                f"with the {opg} output channel(s) that read it, and those only with it"
            )
        if bool(whole.all()):
            raise _CannotShrink(f"removing every channel of the depthwise convolution '{name}'")
        return
    if bool((r_in == ipg).any() | (r_out == opg).any()) or len(set(r_in.tolist())) > 1 or len(set(r_out.tolist())) > 1:
        raise _CannotShrink(
            f"'{name}' is a grouped convolution (groups={groups}): every group must keep the same number of input "
            "and of output channels, at least one each"
        )


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


def _couple(
    index: _ModelIndex,
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


def _even_out(index: _ModelIndex, g: NeuronGroup, remove: Tensor, score: Tensor) -> str | None:
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
                owner = torch.full((_in_width(m),), -1, dtype=torch.long)
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


def _check_size(g: NeuronGroup, name: str, size: int, what: str) -> None:
    if size != g.num_neurons:
        raise ValueError(
            f"Group '{g.name}' has {g.num_neurons} neurons but '{name}' has {size} {what}: the groups are stale (found "
            "before the model changed). Find them again, or update them with CompactionReport.update_groups_."
        )


def _merge(changes: dict[int, _Change], edits: list[tuple[_Change, str, Tensor]]) -> None:
    """Add one group's removals to ``changes``, unless they collide with another group's (then add nothing)."""
    merged: dict[int, tuple[_Change, dict[str, Tensor]]] = {}
    for c, axis, mask in edits:
        old = changes.get(id(c.module))
        prev = None if old is None else old.removed.get(axis)
        if prev is not None and (axis != "in" or prev.shape != mask.shape or bool((prev & mask).any())):
            raise _CannotShrink(f"another group already removes entries of '{c.name}' ({axis} axis)")
        entry = merged.setdefault(id(c.module), (c, dict(old.removed) if old is not None else {}))
        entry[1][axis] = mask if axis not in entry[1] else entry[1][axis] | mask
    for c, removed in merged.values():
        _check_grouped(c.name, c.module, removed)
    for c, axis, mask in edits:
        old = changes.setdefault(id(c.module), c)
        prev = old.removed.get(axis)
        old.removed[axis] = mask if prev is None else prev | mask


# ------------------------------------------------------------------------------------------------------------
# applying
# ------------------------------------------------------------------------------------------------------------
def _apply(changes: dict[int, _Change]) -> ParamMap:
    """Build every new tensor first, then swap them in (restoring everything if a swap fails)."""
    plan: list[tuple[nn.Module, str, Any]] = []  # (owner, attribute, new value)
    param_map: ParamMap = {}
    for c in changes.values():
        for axis, mask in c.removed.items():
            c.size[axis] = int(mask.numel())
            c.keep[axis] = torch.nonzero(~mask).flatten()
        plan += _module_plan(c, param_map)
    done: list[tuple[nn.Module, str, Any]] = []
    try:
        for owner, attr, value in plan:
            done.append((owner, attr, getattr(owner, attr)))
            setattr(owner, attr, value)
    except BaseException:
        for owner, attr, value in reversed(done):
            setattr(owner, attr, value)
        raise
    return param_map


def _module_plan(c: _Change, param_map: ParamMap) -> list[tuple[nn.Module, str, Any]]:
    m: Any = c.module
    out, inp, rank = c.keep.get("out"), c.keep.get("in"), c.keep.get("rank")
    plan: list[tuple[nn.Module, str, Any]] = []

    def param(owner: nn.Module, attr: str, keep: tuple[Tensor | None, ...]) -> None:
        old = getattr(owner, attr)
        if old is None or all(i is None for i in keep):
            return
        new = nn.Parameter(_same_format(_take(old.detach(), keep), old), requires_grad=old.requires_grad)
        param_map[old] = (new, keep)
        plan.append((owner, attr, new))

    if is_conv1d(m):  # weight [in, out]
        param(m, "weight", (inp, out))
        param(m, "bias", (out,))
        if out is not None:
            plan.append((m, "nf", int(out.numel())))
        if inp is not None and hasattr(m, "nx"):
            plan.append((m, "nx", int(inp.numel())))
        return plan

    if isinstance(m, nn.PReLU):
        param(m, "weight", (out,))
        plan.append((m, "num_parameters", int(cast(Tensor, out).numel())))
        return plan
    if isinstance(m, _BN):
        param(m, "weight", (out,))
        param(m, "bias", (out,))
        for buf in ("running_mean", "running_var"):
            if getattr(m, buf) is not None:
                plan.append((m, buf, _take(getattr(m, buf), (out,))))
        if out is not None:
            plan.append((m, "num_features", int(out.numel())))
        return plan
    factors = low_rank_factors(m)
    groups = _conv_groups(m)
    if factors is None and groups > 1:
        param(m, "weight", _grouped_keep(m, c))
        shape = None
        new_groups = groups - int(_whole_groups(m, c).sum())
        if new_groups != groups:
            plan.append((m, "groups", new_groups))
    elif factors is None:
        param(m, "weight", (out, inp))
        shape = None
    else:
        u, v = factors
        kernel = v.shape[1] // m.weight.shape[1]
        cols = None if inp is None else (inp[:, None] * kernel + torch.arange(kernel)).flatten()
        plist = weight_parametrizations(m)
        param(plist, U_KEY, (out, rank))
        param(plist, V_KEY, (rank, cols))
        shape = list(m.weight.shape)
    param(m, "bias", (out,))
    is_linear = isinstance(m, nn.Linear)
    if out is not None:
        plan.append((m, "out_features" if is_linear else "out_channels", int(out.numel())))
    if inp is not None:
        plan.append((m, "in_features" if is_linear else "in_channels", int(inp.numel())))
    if shape is not None:
        shape[0] = shape[0] if out is None else int(out.numel())
        shape[1] = shape[1] if inp is None else int(inp.numel())
        lrw = cast(nn.Module, low_rank_weight(m))
        plan.append((lrw, "weight_shape", tuple(shape)))
        if rank is not None:
            plan.append((lrw, "rank", int(rank.numel())))
    return plan


def _whole_groups(m: Any, c: _Change) -> Tensor:
    """Which groups of grouped conv ``m`` lose all their input and output channels."""
    groups, n_in, n_out = int(m.groups), int(m.in_channels), int(m.out_channels)
    r_in = c.removed.get("in", torch.zeros(n_in, dtype=torch.bool)).reshape(groups, -1).all(1)
    r_out = c.removed.get("out", torch.zeros(n_out, dtype=torch.bool)).reshape(groups, -1).all(1)
    return r_in & r_out


def _grouped_keep(m: Any, c: _Change) -> tuple[Tensor | None, ...]:
    """Kept entries of a grouped conv weight ``[out, in/groups, *kernel]``: rows, then per kept row its columns.

    Each group may keep different input channels (as many in each): the columns are a 2-D index, one row per kept
    output channel.
    """
    groups, n_in, n_out = int(m.groups), int(m.in_channels), int(m.out_channels)
    ipg, opg = n_in // groups, n_out // groups
    out = c.keep.get("out")
    rows = torch.arange(n_out) if out is None else out
    removed_in = c.removed.get("in")
    if removed_in is None or ipg == 1:  # depthwise: whole groups go, the one column stays
        return (out, None)
    kept = ~removed_in.reshape(groups, ipg)
    cols = torch.stack([torch.nonzero(kept[g]).flatten() for g in range(groups)])  # same count in every group
    return (out, cols[rows // opg])


def _same_format(new: Tensor, old: Tensor) -> Tensor:
    """``new`` in the memory format of ``old`` (a channels_last model stays channels_last)."""
    for fmt, dims in ((torch.channels_last, 4), (torch.channels_last_3d, 5)):
        if old.dim() == dims and not old.is_contiguous() and old.is_contiguous(memory_format=fmt):
            return new.contiguous(memory_format=fmt)
    return new


# ------------------------------------------------------------------------------------------------------------
# updating neuron groups
# ------------------------------------------------------------------------------------------------------------
def _remap_group(g: NeuronGroup, changes: dict[int, _Change]) -> None:
    first = g.w_slots[0] if g.w_slots else None
    c = changes.get(id(first.module)) if first is not None else None
    axis = _axis(first) if first is not None else None
    kept = c.keep.get(axis) if c is not None and axis is not None else None
    if kept is None:  # this group's neurons are unchanged; its consumers' columns may have moved
        kept = torch.arange(g.num_neurons)
    elif c is not None and axis is not None and c.size[axis] != g.num_neurons:
        raise ValueError(f"Group '{g.name}' does not match the compacted model (stale groups)")
    new_index: list[Tensor | None] = []
    for s in g.v_slots:
        sc = changes.get(id(s.module))
        s_axis = _axis(s)
        s_kept = sc.keep.get(s_axis) if sc is not None and s_axis is not None else None
        old = s.index if s.index is not None else torch.arange(g.num_neurons).unsqueeze(1)
        if s_kept is None:
            cols = old[kept]
        else:
            assert sc is not None
            assert s_axis is not None
            colmap = torch.full((sc.size[s_axis],), -1, dtype=torch.long)
            colmap[s_kept] = torch.arange(s_kept.numel())
            if int(old.max()) >= colmap.numel():
                raise ValueError(f"Group '{g.name}' does not match the compacted model (stale groups)")
            cols = colmap[old[kept]]
            if bool((cols < 0).any()):
                raise ValueError(f"Group '{g.name}' keeps a neuron whose columns of '{s.module_name}' were removed")
        width = _in_width(s.module) if s.param == "weight" else int(s.tensor().shape[1])
        trivial = cols.shape[1] == 1 and cols.shape[0] == width and bool((cols.flatten() == torch.arange(width)).all())
        new_index.append(None if trivial else cols)
    for s, idx in zip(g.v_slots, new_index):
        if isinstance(s, GroupedSlot):
            s.groups = int(cast(Any, s.module).groups)
        elif idx is not None and s.dim == 0:
            raise ValueError(f"Group '{g.name}' reads rows of '{s.module_name}' out of order after compaction")
        s.index = idx
    g.num_neurons = int(kept.numel())
