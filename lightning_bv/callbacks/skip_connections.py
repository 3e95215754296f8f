"""SkipConnections: put an affine (or identity) skip connection around the targeted modules, before training."""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

import pytorch_lightning as pl
from torch import nn
from typing_extensions import override

from lightning_bv._select import Targets, _check_targets, named_modules, select_names, show
from lightning_bv.callbacks._base import CallbackBase, configure_model_first, example_input_or_array, warn_if_spawned
from lightning_bv.callbacks._first_step import run_first_training_step
from lightning_bv.neurons import is_null_space
from lightning_bv.transforms.skip import _add_skip, _check_skip_args, is_skip, needs_trial, shape_hooks


class SkipConnections(CallbackBase):
    r"""Wrap each targeted module ``f`` as ``x -> f(x) + C x + c`` with :func:`lightning_bv.add_skip` (THEORY.md 5).

    The affine term ``C x + c`` is the null space of the R-BV^2 seminorm: it starts at zero (the function is unchanged)
    and :class:`RBVRegularization` never charges it. The surgery runs in ``setup`` of every stage (fit, validate,
    test, predict), which Lightning calls before ``configure_model``, before restoring a checkpoint and before
    building the optimizer, so the optimizer trains ``C`` and ``c`` and the state_dict keys (``f.weight`` becomes
    ``f.module.weight``, next to ``f.skip.weight``) match those of a checkpoint of this run: resuming needs nothing
    more. If the module defines ``configure_model``, it is called first (as Lightning's ``WeightAveraging`` does; the
    hook must be idempotent). Modules that already are skip wrappers, or are inside one (a second ``setup``, e.g.
    ``trainer.test`` after ``trainer.fit``), are left alone.

    Order with :class:`LowRank`: callbacks run in the order given. ``[LowRank(...), SkipConnections(...)]`` makes the
    layers low-rank and then wraps them; in the other order name the wrapped layers as ``<name>.module``. With
    ``strategy="ddp_spawn"`` the module of the main process is not changed (a warning says so); see :class:`LowRank`.

    Args:
        targets: the modules to wrap (a str is a regex on the full module name, a list matches exactly or by
            ``.suffix``); required. A target that matches nothing raises at ``setup``.
        kind: ``"affine"`` (a zero-initialized ``Linear``, or a kernel-1 conv with the layer's stride) or
            ``"identity"`` (``f`` must keep the shape of its input).
        exclude: module names to leave alone (same rule; wins over ``targets``).
        example_input: input of the LightningModule for one trial forward pass at ``setup``, needed only to wrap
            modules whose sizes cannot be read from their layers (see :func:`lightning_bv.add_skip`): not a
            Linear/Conv layer, nor an ``nn.Sequential`` with Linear/Conv layers first and last. Without it, the
            module's ``example_input_array``; without that, in ``setup`` of the fit (before the optimizer exists),
            the fit's first training batch is run through ``training_step`` once (logging muted, weights, buffers
            and random state restored) with forward hooks on those modules reading their input and output shapes;
            when no batch can be had there (data built in the module's own ``setup``), ``setup`` raises and says so.

    Attributes:
        wrapped: names of the targeted modules that are skip wrappers, set at ``setup``.

    Example:
        >>> import pytorch_lightning as pl
        >>> trainer = pl.Trainer(callbacks=[SkipConnections(targets=["net.2"])], max_epochs=1, logger=False)
        >>> SkipConnections(targets=["net.2"], kind="residual")
        Traceback (most recent call last):
        ...
        ValueError: `kind` must be one of ('affine', 'identity'), got 'residual'
    """

    changes_model_in_setup = True  # RBVRegularization runs this setup first when listed after it

    def __init__(
        self,
        targets: str | Sequence[str],
        kind: str = "affine",
        exclude: Targets = None,
        example_input: Any = None,
    ) -> None:
        _check_skip_args(targets, kind)
        _check_targets("targets", targets)
        _check_targets("exclude", exclude)
        self.targets = targets
        self.kind = kind
        self.exclude = exclude
        self.example_input = example_input
        self.wrapped: list[str] = []

    @property
    @override
    def state_key(self) -> str:
        return self._generate_state_key(targets=self.targets, kind=self.kind, exclude=self.exclude)

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        who = type(self).__name__
        configure_model_first(trainer, pl_module, who)
        modules = named_modules(pl_module)
        inside = {id(m) for w in modules.values() if is_skip(w) for m in (w.module, w.skip)}
        names = select_names([n for n in modules if n], self.targets, self.exclude)  # not the LightningModule itself
        todo = [n for n in names if not (is_skip(modules[n]) or id(modules[n]) in inside or is_null_space(modules[n]))]
        if todo:
            if stage == "fit":
                warn_if_spawned(trainer, who)
            example = example_input_or_array(self.example_input, pl_module)
            shapes = None
            need = {n: modules[n] for n in todo if needs_trial(modules[n], self.kind, n)}
            if example is None and need:
                shapes = self._first_step_shapes(trainer, pl_module, need, stage)
            exact = "|".join(re.escape(n) for n in todo)
            _add_skip(pl_module, f"(?:{exact})", kind=self.kind, example_input=example, shapes=shapes)
        modules = named_modules(pl_module)
        self.wrapped = [n for n in names if n in modules and is_skip(modules[n])]

    def _first_step_shapes(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, need: dict[str, nn.Module], stage: str
    ) -> dict[str, tuple[Any, Any]]:
        """The input and output shapes of ``need``, read by forward hooks during the fit's first training step."""
        seen: dict[str, tuple[Any, Any]] = {}
        names = ", ".join(show(n) for n in need)
        handles = shape_hooks(need, seen)
        try:
            why = run_first_training_step(trainer, pl_module) if stage == "fit" else f"no training step runs in {stage}"
        finally:
            for handle in handles:
                handle.remove()
        if why:
            raise ValueError(
                f"{type(self).__name__} cannot read the input and output sizes of {names}: they are not "
                "Linear/Conv layers or nn.Sequential blocks sized by their first and last Linear/Conv layers, no "
                "`example_input` was given, the module has no `example_input_array`, and the first training step "
                f"could not run at setup ({why}). Pass `example_input=` (an input of the LightningModule) or set "
                "`example_input_array`."
            )
        missing = [show(n) for n in need if n not in seen]
        if missing:
            raise ValueError(
                f"{type(self).__name__}: {', '.join(missing)} was not called with one tensor returning one tensor "
                "during the first training step; a skip connection cannot be put around it"
            )
        return seen

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"wrapped": list(self.wrapped), "kind": self.kind}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.wrapped = [str(n) for n in state_dict.get("wrapped", [])]
