"""LowRank: write the weights of Linear/Conv layers as ``U @ V`` of low rank, before the optimizer is built."""

from __future__ import annotations

import math
from typing import Any, cast

import pytorch_lightning as pl
import torch
from pytorch_lightning.utilities import rank_zero_info, rank_zero_warn
from torch import Tensor
from typing_extensions import override

from lightning_bv._layers import WEIGHTED
from lightning_bv._select import Targets, _check_targets, _matches, named_modules, select_names, show
from lightning_bv.callbacks._base import CallbackBase, configure_model_first, refuse_sharded, warn_if_spawned
from lightning_bv.neurons import is_null_space
from lightning_bv.transforms.low_rank import (
    _apply_ranks,
    _candidate_names,
    _check_rank_energy,
    _layer_rank,
    is_low_rank,
    low_rank_rank,
)


class LowRank(CallbackBase):
    r"""Make the targeted Linear/Conv layers low-rank with :func:`lightning_bv.apply_low_rank` (THEORY.md section 5).

    The surgery runs in ``setup`` of every stage (fit, validate, test, predict), which Lightning calls before
    ``configure_model``, before restoring a checkpoint, before wrapping the model in DDP and before building the
    optimizer: the optimizer trains the factors ``U`` and ``V``, and the state_dict keys
    (``<layer>.parametrizations.weight.original0/1``) are the ones a checkpoint of this run holds. If the module
    defines ``configure_model``, it is called first so that its layers exist (as Lightning's ``WeightAveraging``
    does; the hook must be idempotent, which Lightning asks of it anyway). Layers that are already low-rank (a second
    ``setup``, e.g. ``trainer.test`` after ``trainer.fit``, or a layer changed by hand) are left as they are. A
    low-rank component that a proximal step zeroes (:class:`RBVRegularization` with ``mode="prox"``) is dead:
    :func:`lightning_bv.low_rank_live_components` counts the others.

    Resuming: Lightning loads the checkpoint after ``setup``, and calls this callback's ``load_state_dict`` after
    loading the model. So on ``trainer.fit(model, ckpt_path=...)`` the layers are first made low-rank from the fresh
    weights (with ``energy=``, possibly to other ranks than the checkpoint's); loading the model's state_dict then
    resizes the factors of each layer to the checkpoint's rank (a load hook of :func:`lightning_bv.apply_low_rank`)
    before the optimizer is built, so the run goes on exactly where it stopped; :attr:`ranks` then holds the
    checkpoint's ranks. The same holds for ``trainer.validate/test/predict(model, ckpt_path=...)``.

    Under DDP with ``energy=``, rank 0 picks the ranks and sends them to the other processes, so every process builds
    factors of the same shapes. With ``strategy="ddp_spawn"`` (and the other spawning strategies) the fit runs on
    copies of the module: the module of the main process is not changed and does not get the trained factors back
    (a warning says so); use ``strategy="ddp"`` or load a checkpoint. Sharded strategies (FSDP, DeepSpeed) are
    refused. Layers created in ``LightningModule.setup`` are not seen (it runs after the callbacks' ``setup``): create
    them in ``__init__`` or ``configure_model``.

    Args:
        rank: the rank of every targeted layer; a layer whose weight (``out x in * prod(kernel_size)``) cannot have a
            larger rank than this already is left dense (see :attr:`left_dense`).
        energy: in ``(0, 1]``: per layer, the smallest rank keeping this fraction of the sum of squared singular
            values of the weight at ``setup``. Give exactly one of ``rank`` and ``energy``.
        targets: layer names (a str is a regex on the full module name, a list matches exactly or by ``.suffix``);
            ``None``: every Linear/Conv layer except the affine skips added by :class:`SkipConnections` (a zero
            weight has zero factors, which get no gradient). A target that matches nothing raises at ``setup``.
        exclude: layer names to leave dense (same rule; wins over ``targets``).

    Attributes:
        ranks: ``{layer name: rank}`` of the targeted low-rank layers, set at ``setup`` (and from a checkpoint).
        left_dense: ``{layer name: maximal rank}`` of the layers ``rank`` would not make smaller (the weight of an
            ``out x in`` layer has rank ``<= min(out, in)``, already ``<= rank``): they stay dense, and setup logs
            them. A layer named by an entry of a list ``targets`` raises instead when ``rank`` exceeds its maximal
            rank (a regex ``targets`` or ``None`` picks layers by pattern, and those are left dense).

    Example:
        >>> import pytorch_lightning as pl
        >>> trainer = pl.Trainer(callbacks=[LowRank(energy=0.9, exclude=["head"])], max_epochs=1, logger=False)
        >>> LowRank(rank=0)
        Traceback (most recent call last):
        ...
        ValueError: `rank` must be an int >= 1, got 0
    """

    changes_model_in_setup = True  # RBVRegularization runs this setup first when listed after it

    def __init__(
        self,
        rank: int | None = None,
        energy: float | None = None,
        targets: Targets = None,
        exclude: Targets = None,
    ) -> None:
        _check_rank_energy(rank, energy)
        _check_targets("targets", targets)
        _check_targets("exclude", exclude)
        self.rank = None if rank is None else int(rank)
        self.energy = None if energy is None else float(energy)
        self.targets = targets
        self.exclude = exclude
        self.ranks: dict[str, int] = {}
        self.left_dense: dict[str, int] = {}

    @property
    @override
    def state_key(self) -> str:
        return self._generate_state_key(rank=self.rank, energy=self.energy, targets=self.targets, exclude=self.exclude)

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        who = type(self).__name__
        refuse_sharded(trainer, who, "parametrizes whole weights as U @ V, which are flattened into shards there")
        configure_model_first(trainer, pl_module, who)
        modules = named_modules(pl_module)
        names = select_names(_candidate_names(pl_module, modules, self.targets), self.targets, self.exclude)
        if self.targets is None:  # the zero-initialized affine skips are not neuron weights
            names = [n for n in names if not is_null_space(modules[n])]
        todo = [n for n in names if not is_low_rank(modules[n])]
        self.left_dense = self._already_low(modules, todo) if self.rank is not None else {}
        if self.left_dense:
            todo = [n for n in todo if n not in self.left_dense]
            shown = ", ".join(f"{show(n)} (rank <= {r})" for n, r in self.left_dense.items())
            rank_zero_info(f"{who}(rank={self.rank}) leaves {len(self.left_dense)} layer(s) dense: {shown}")
        ranks = {n: _layer_rank(n, modules[n], self.rank, self.energy) for n in todo}
        if self.energy is not None and trainer.world_size > 1:  # per-process SVDs could disagree on a rank
            ranks = trainer.strategy.broadcast(ranks, src=0)
        for name in ranks:
            if not torch.count_nonzero(cast(Tensor, modules[name].weight).detach()):
                rank_zero_warn(
                    f"{who}: the weight of {show(name)} is zero, so its factors U and V are zero and get zero "
                    "gradient: the layer will stay zero. Leave it out with `exclude`."
                )
        if ranks and stage == "fit":
            warn_if_spawned(trainer, who)
        _apply_ranks(modules, ranks)
        self.ranks = {n: low_rank_rank(modules[n]) for n in names if is_low_rank(modules[n])}

    def _already_low(self, modules: dict[str, Any], names: list[str]) -> dict[str, int]:
        """``{name: maximal rank}`` of the layers that ``rank`` would not make smaller.

        Only those that no list entry of ``targets`` names (exactly or by ``.suffix``): a named layer goes to
        :func:`~lightning_bv.transforms.low_rank._layer_rank`, which raises when ``rank`` is too large for it.
        """
        assert self.rank is not None
        named = self.targets if isinstance(self.targets, (list, tuple)) else ()
        low = {}
        for name in names:
            module = modules[name]
            if not isinstance(module, WEIGHTED) or (named and _matches(name, named)):
                continue
            weight = cast(Tensor, module.weight)
            max_rank = min(int(weight.shape[0]), math.prod(weight.shape[1:]))
            if max_rank <= self.rank:
                low[name] = max_rank
        return low

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"ranks": dict(self.ranks)}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        # the model's state_dict was loaded just before, and its load hook already took these ranks
        self.ranks = {str(k): int(v) for k, v in state_dict.get("ranks", {}).items()}
