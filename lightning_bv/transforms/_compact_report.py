"""What :func:`~lightning_bv.transforms.compact.compact` did: :class:`CompactionReport` and :class:`GroupCompaction`."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from torch import nn

from lightning_bv.neurons import NeuronGroup, NeuronGroups
from lightning_bv.transforms._compact_remap import Changes, copy_group, remap_, unfactor_
from lightning_bv.transforms._shrinker import ParamMap


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
class CompactionReport:
    """The result of :func:`compact`: per-group neuron counts, the parameter count, and what was replaced.

    Attributes:
        tol: the threshold used.
        groups: one :class:`GroupCompaction` per group, in order.
        params_before: number of parameter entries of the whole model before.
        params_after: the same after.
        param_map: ``{old Parameter: (new Parameter, kept indices per dim)}`` for every replaced Parameter; an index
            of None keeps the whole dim. Pass it to :func:`~lightning_bv.transforms.resize.slice_optimizer_state_`.
        neuron_groups: new groups describing the compacted model (usable right away), one per group compacted; the
            groups passed to :func:`compact` are left as they were (they describe the model before).
        merged: the lifted layers whose product ``A B`` was merged back into one dense weight.
    """

    tol: float
    groups: list[GroupCompaction]
    params_before: int
    params_after: int
    param_map: ParamMap = field(default_factory=dict, repr=False)
    neuron_groups: NeuronGroups | None = field(default=None, repr=False)
    merged: list[str] = field(default_factory=list)
    _changes: Changes = field(default_factory=dict, repr=False)
    _updated: set[int] = field(default_factory=set, repr=False)  # id() of groups that describe the compacted model
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

    def remap(self, groups: Iterable[NeuronGroup]) -> NeuronGroups:
        """New groups for the compacted model from other neuron groups of the same model found before it.

        Any groups found before the compaction (another callback's, a second ``find_neurons`` call) hold stale neuron
        counts and column indices; this returns new ones with the new counts and columns, the same as finding them
        again on the compacted model, and leaves ``groups`` as they are. Groups that already describe the compacted
        model (``report.neuron_groups``) are copied as they are.

        Returns:
            NeuronGroups: one new group per group, in order (with the ``skipped`` and ``lifted`` lists of
            ``groups`` when it is a ``NeuronGroups``).

        Raises:
            ValueError: a group that does not match the compacted model (found on another model, or already stale).

        Example:
            >>> import torch
            >>> from torch import nn
            >>> from lightning_bv import compact, find_neurons
            >>> net = nn.Sequential(nn.Linear(3, 8), nn.ReLU(), nn.Linear(8, 2))
            >>> x = torch.randn(4, 3)
            >>> mine, theirs = find_neurons(net, x), find_neurons(net, x)
            >>> with torch.no_grad():
            ...     _ = net[2].weight[:, :5].zero_()
            >>> report = compact(net, mine)
            >>> [g.num_neurons for g in report.remap(theirs)], [g.num_neurons for g in theirs]
            ([3], [8])
        """
        glist = list(groups)
        new = []
        for g in glist:
            if id(g) in self._updated:
                new.append(copy_group(g))
                continue
            h = copy_group(g)
            unfactor_(h, self._merged_modules)
            remap_(h, self._changes)
            new.append(h)
        out = NeuronGroups(new, getattr(groups, "skipped", ()))
        out.lifted = list(getattr(groups, "lifted", []))
        self._updated.update(id(g) for g in new)
        return out

    def update_groups_(self, groups: Iterable[NeuronGroup]) -> Iterable[NeuronGroup]:
        """Update other neuron groups of the same model to the new sizes, in place, and return them.

        :meth:`remap` is the way: it returns new groups and leaves these as they are. This updates groups found
        before the compaction (another callback's, a second ``find_neurons`` call) in place. Groups that already
        describe the compacted model (``report.neuron_groups``, groups updated before) are left alone.

        Raises:
            ValueError: a group that does not match the compacted model (found on another model, or already stale).
        """
        for g in groups:
            if id(g) not in self._updated:
                unfactor_(g, self._merged_modules)
                remap_(g, self._changes)
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
