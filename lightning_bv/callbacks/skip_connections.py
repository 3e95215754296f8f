"""SkipConnections: put an affine (or identity) skip connection around the targeted modules, before training."""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

import pytorch_lightning as pl
from typing_extensions import override

from lightning_bv._select import Targets, _check_targets, named_modules, select_names
from lightning_bv.callbacks._base import CallbackBase, configure_model_first, warn_if_spawned
from lightning_bv.neurons import is_null_space
from lightning_bv.transforms.skip import _check_skip_args, add_skip, is_skip


class SkipConnections(CallbackBase):
    r"""Wrap each targeted module ``f`` as ``x -> f(x) + C x + c`` with :func:`lightning_bv.add_skip` (THEORY.md 5).

    The affine term ``C x + c`` is the null space of the R-BV^2 seminorm: it starts at zero (the function is unchanged)
    and :class:`PathNormRegularization` never charges it. The surgery runs in ``setup`` of every stage (fit, validate,
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
            modules that are not Linear/Conv layers (see :func:`lightning_bv.add_skip`).

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

    changes_model_in_setup = True  # PathNormRegularization runs this setup first when listed after it

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
            exact = "|".join(re.escape(n) for n in todo)
            add_skip(pl_module, f"(?:{exact})", kind=self.kind, example_input=self.example_input)
        modules = named_modules(pl_module)
        self.wrapped = [n for n in names if n in modules and is_skip(modules[n])]

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"wrapped": list(self.wrapped), "kind": self.kind}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.wrapped = [str(n) for n in state_dict.get("wrapped", [])]
