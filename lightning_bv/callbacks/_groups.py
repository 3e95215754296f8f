"""The base of the callbacks that work on a module's neuron groups, and the one holder of those groups (private).

:class:`GroupsCallback` is extended the way Lightning's ``WeightAveraging`` is: it owns the ``example_input`` check
and resolution, and the discovery of the groups on the first training step (:class:`GroupDiscovery` started in
``on_train_batch_start``, finished in ``on_before_backward`` or ``on_before_optimizer_step``, aborted in
``on_exception``); a subclass overrides :meth:`GroupsCallback.on_groups_found` to act once the groups are known.

The groups themselves are held by one :class:`ModuleGroups` per LightningModule and Trainer, shared by every
callback of that fit, so that a callback that changes the module (``NeuronPruning``) replaces them once, for all.
The holders live in a table keyed weakly on the module: nothing of them is stored on the module, the Trainer or the
callbacks' pickled state (``ddp_spawn`` pickles the callbacks; each worker finds its own groups).
"""

from __future__ import annotations

import weakref
from typing import Any

import pytorch_lightning as pl
from torch import Tensor, nn
from typing_extensions import override

from lightning_bv._select import Targets, _check_targets
from lightning_bv.callbacks._base import CallbackBase, _check_example_input, example_input_or_array
from lightning_bv.callbacks._discovery import GroupDiscovery
from lightning_bv.callbacks._first_step import run_first_training_step
from lightning_bv.neurons import NeuronGroups, find_neurons
from lightning_bv.transforms.compact import CompactionReport

Selection = tuple[str, str]  # (repr(targets), repr(exclude)): the groups of one choice of targets


class ModuleGroups:
    """The neuron groups of one module in one Trainer's fits, for each selection (``targets``, ``exclude``).

    Callbacks read and publish their groups here instead of keeping copies; after a compaction,
    :meth:`replace_after_compaction` puts the compacted model's groups in place of all of them.
    """

    def __init__(self, trainer: Any = None) -> None:
        self._trainer = weakref.ref(trainer) if trainer is not None else None
        self._groups: dict[Selection, NeuronGroups] = {}

    def belongs_to(self, trainer: Any) -> bool:
        """Whether this holder was made for ``trainer`` (a new Trainer finds the groups again)."""
        return self._trainer is not None and self._trainer() is trainer

    def get(self, selection: Selection) -> NeuronGroups | None:
        """The groups of ``selection``, or None when none are known."""
        return self._groups.get(selection)

    def set(self, selection: Selection, groups: NeuronGroups | None) -> None:
        """Hold ``groups`` for ``selection`` (None: forget them, they are found again)."""
        if groups is None:
            self._groups.pop(selection, None)
        else:
            self._groups[selection] = groups

    def replace_after_compaction(self, selection: Selection, report: CompactionReport) -> None:
        """After compacting the groups of ``selection``: hold ``report.neuron_groups``, and bring the others along.

        The groups of other selections (callbacks with other ``targets``) describe the old sizes: they are replaced by
        new ones, :meth:`CompactionReport.remap` of them; no group object is changed in place.
        """
        assert report.neuron_groups is not None
        for key, old in list(self._groups.items()):
            if key != selection:
                self._groups[key] = report.remap(old)
        self._groups[selection] = report.neuron_groups


_HOLDERS: weakref.WeakKeyDictionary[nn.Module, ModuleGroups] = weakref.WeakKeyDictionary()


def groups_of(trainer: Any, pl_module: nn.Module) -> ModuleGroups:
    """The holder of ``pl_module``'s groups in ``trainer``'s fits (made on first use; a new Trainer gets a new one)."""
    holder = _HOLDERS.get(pl_module)
    if holder is None or not holder.belongs_to(trainer):
        holder = _HOLDERS[pl_module] = ModuleGroups(trainer)
    return holder


def selection(targets: Targets, exclude: Targets) -> Selection:
    """The key of the groups that ``targets`` and ``exclude`` select."""
    return repr(targets), repr(exclude)


class GroupsCallback(CallbackBase):
    """Base of the callbacks that need a module's neuron groups (found by :func:`lightning_bv.find_neurons`).

    It checks ``example_input``, ``targets`` and ``exclude``; finds the groups on the first training step when they
    are not known yet (the trace watches the step's forward, with the loss as its result, and changes nothing); and
    calls :meth:`on_groups_found` once they are. A subclass that can find them at ``setup`` (from
    :meth:`setup_example_input`) calls :meth:`publish_groups` there.

    :attr:`groups` reads the groups that every callback of this fit shares for the same ``targets`` and ``exclude``:
    they are the current groups of the module (after a :class:`~lightning_bv.callbacks.NeuronPruning` compaction,
    those of the compacted model). A subclass that overrides a hook calls ``super()`` first.
    """

    _example_input_error: type[Exception] = TypeError  # the type and the words of a bad `example_input`'s error
    _example_input_of: str = " of the LightningModule's forward"

    def __init__(
        self,
        example_input: Tensor | tuple[Any, ...] | None = None,
        targets: Targets = None,
        exclude: Targets = None,
    ) -> None:
        _check_example_input(example_input, self._example_input_error, self._example_input_of)
        _check_targets("targets", targets)
        _check_targets("exclude", exclude)
        self.example_input = example_input
        self.targets = targets
        self.exclude = exclude
        self._discovery = GroupDiscovery(targets, exclude)
        self._owner: ModuleGroups | None = None
        self._notified: NeuronGroups | None = None  # the groups on_groups_found was last called with

    # -- the groups --------------------------------------------------------------------------------------------
    @property
    def groups(self) -> NeuronGroups | None:
        """The module's current neuron groups for this callback's ``targets`` and ``exclude`` (None: not found yet).

        Shared by the callbacks of the fit and replaced, for all of them, when the module is compacted.
        """
        return self._owner.get(self._selection) if self._owner is not None else None

    @groups.setter
    def groups(self, groups: NeuronGroups | None) -> None:
        if self._owner is None:  # not bound to a module yet: a holder of its own
            self._owner = ModuleGroups()
        self._owner.set(self._selection, groups)

    @property
    def _selection(self) -> Selection:
        return selection(self.targets, self.exclude)

    def bind(self, trainer: Any, pl_module: nn.Module) -> None:
        """Read and publish the groups of ``pl_module`` in ``trainer``'s fits from now on."""
        self._owner = groups_of(trainer, pl_module)

    def publish_groups(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, groups: NeuronGroups, replace: bool = True
    ) -> None:
        """Make ``groups`` the module's groups (unless ``replace=False`` and some are known); notify this callback."""
        self.bind(trainer, pl_module)
        if replace or self.groups is None:
            self.groups = groups
        current = self.groups
        assert current is not None
        self._notify(trainer, pl_module, current)

    def _notify(self, trainer: pl.Trainer, pl_module: pl.LightningModule, groups: NeuronGroups) -> None:
        if groups is not self._notified:
            self._notified = groups
            self.on_groups_found(trainer, pl_module, groups)

    def on_groups_found(self, trainer: pl.Trainer, pl_module: pl.LightningModule, groups: NeuronGroups) -> None:
        """Called once for each set of groups this callback gets: found by it, or by another callback of the fit.

        Override it to act on them (warn when there are none, prepare what depends on them). The default does
        nothing.
        """

    def setup_example_input(self, pl_module: pl.LightningModule) -> Any:
        """The input to find the groups with at ``setup``: ``example_input``, else the module's ``example_input_array``.

        None when neither is set: the groups are then found on the first training step, whose input
        (:attr:`GroupDiscovery.example_input`) is the last resort of the callbacks that need an input.
        """
        return example_input_or_array(self.example_input, pl_module)

    def find_groups_now(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, example: Any
    ) -> tuple[NeuronGroups | None, str]:
        """Find the groups at ``setup``: on ``example``, else from one run of ``training_step`` on the first batch.

        Returns:
            ``(groups, "")``, or ``(None, why)`` when no batch could be had at setup (see
            :func:`~lightning_bv.callbacks._first_step.run_first_training_step`). Nothing is published.
        """
        if example is not None:
            return find_neurons(pl_module, example, targets=self.targets, exclude=self.exclude), ""
        self._discovery.start(pl_module)
        outputs: list[Any] = []
        try:
            why = run_first_training_step(trainer, pl_module, outputs)
        except BaseException:
            self._discovery.abort()
            raise
        if why:
            self._discovery.abort()
            return None, why
        return self._discovery.finish(pl_module, outputs or None), ""

    # -- discovery on the first training step ------------------------------------------------------------------
    def wants_discovery(self, trainer: pl.Trainer) -> bool:
        """Whether to record this training step to find the groups: while none are known."""
        return self.groups is None

    @override
    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, idx: int) -> None:
        self.bind(trainer, pl_module)
        if self.wants_discovery(trainer):
            self._discovery.start(pl_module)
        elif self.groups is not None:  # found by another callback of the fit
            self._notify(trainer, pl_module, self.groups)

    def finish_discovery(self, trainer: pl.Trainer, pl_module: pl.LightningModule, loss: Tensor | None = None) -> None:
        """Turn a recorded step into groups (no-op when nothing is recorded); the first found are kept for all."""
        found = self._discovery.finish(pl_module, loss)
        if found is not None:
            self.publish_groups(trainer, pl_module, found, replace=False)

    @override
    def on_before_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule, loss: Tensor) -> None:
        self.finish_discovery(trainer, pl_module, loss)

    @override
    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Any) -> None:
        self.finish_discovery(trainer, pl_module)  # in case on_before_backward was not reached (a custom backward)

    @override
    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self._discovery.abort()

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state.update(_owner=None, _notified=None)  # the groups hold the module: never pickled (ddp_spawn)
        return state
