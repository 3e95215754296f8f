"""NeuronPruning: cut the dead neurons out of the trained module, at the end of fit and optionally during it."""

from __future__ import annotations

import copy
import functools
import itertools
import os
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.utilities import rank_zero_warn
from torch import Tensor, nn
from typing_extensions import override

from lightning_bv._checks import check_tol
from lightning_bv._select import Targets
from lightning_bv.callbacks._base import (
    _check_interval,
    is_fsdp2,
    is_parallel,
    refuse_sharded,
    surgery_of_later_callbacks_first,
)
from lightning_bv.callbacks._groups import GroupsCallback
from lightning_bv.neurons import NeuronGroups
from lightning_bv.transforms.compact import CompactionReport, compact, resize_to_state_dict_, slice_optimizer_state_


class NeuronPruning(GroupsCallback):
    """Remove the neurons whose score ``||v_k||_2 ||w_k||_2`` is ``<= tol`` with :func:`lightning_bv.compact`.

    Pair it with :class:`~lightning_bv.callbacks.RBVRegularization` (``mode="prox"`` makes neurons exactly dead).
    With ``tol=0`` the function of the module is unchanged; the model just gets smaller.

    * At the end of fit (``on_fit_end``, after the last checkpoint): the trained module is compacted. Under DDP every
      rank compacts its replica of the same weights, so the ranks agree. Logging is not allowed in that hook: the
      counts go to :attr:`report` and, on rank zero, to every logger (``logger.log_metrics``).
    * Under FSDP2 (``ModelParallelStrategy``), at the end of fit: the weights are gathered onto rank 0's CPU and
      loaded into a copy of the module taken on the meta device at ``setup`` (before ``configure_model`` shards it),
      and that copy is compacted: :attr:`compacted_model` on rank 0 (None elsewhere), saved as ``compacted.ckpt``
      in the first ``ModelCheckpoint``'s folder (:attr:`checkpoint_path`). The sharded module itself keeps its sizes
      (its dead neurons are exactly zero: the same function); :attr:`report` is set on rank 0.
    * With ``every_n_epochs``, also at the end of every n-th training epoch, on a single device only: the module is
      compacted, the optimizers' state (momentum, Adam moments) is sliced to the kept neurons and the new Parameters
      take the old ones' places in the optimizers, so training goes on where it was. The counts are logged with
      ``pl_module.log`` (``bv/neurons_before``, ``bv/neurons_after``, ``bv/params_before``, ``bv/params_after``).

    Other callbacks: the neuron groups of a module are held in one place, shared by the lightning_bv callbacks of
    the fit (:class:`~lightning_bv.callbacks.RBVRegularization`, :class:`~lightning_bv.callbacks.BVMonitor`, this
    one): after each compaction the groups of the compacted model (``report.neuron_groups``) replace them there, and
    every callback's ``groups`` attribute reads them. A callback of your own gets the current groups by reading
    ``pruning.groups`` (this callback's :attr:`groups`) each time it needs them, rather than keeping a copy: groups
    kept from before a compaction describe the old sizes. Parameters kept elsewhere must be looked up again too (the
    compaction replaces the Parameters of the layers it shrinks).

    Checkpoints: a checkpoint saved after a compaction holds the smaller shapes. Whenever Lightning loads a
    checkpoint into the module (``trainer.fit/validate/test/predict(ckpt_path=...)``, with this callback in the
    Trainer's callbacks), the callback first resizes the module to the checkpoint's shapes
    (:func:`~lightning_bv.transforms.resize.resize_to_state_dict_`, from a load-state-dict hook registered in
    ``setup`` of every stage): to the smaller shapes of a checkpoint whose NeuronPruning state records a compaction
    (a fresh module resumes from it), and, once this callback has compacted the module, to the larger shapes of a
    checkpoint saved before that compaction (``trainer.test(ckpt_path="best")`` after fit). Any checkpoint of the
    run loads; a checkpoint of another architecture still fails to load with the mismatching keys named. At the
    end of fit, after the compaction, the compacted model is saved as the last checkpoint of the first
    ``ModelCheckpoint`` (see :meth:`save_compacted`; :attr:`checkpoint_path`), so ``ckpt_path="last"`` is the
    compacted model. The module is never pickled: pickling the callback (``ddp_spawn`` does) drops :attr:`groups`
    and :attr:`report`.

    Attributes:
        groups: the module's current neuron groups for ``targets`` and ``exclude`` (None until found), shared with the
            other callbacks of the fit; after a compaction, those of the compacted model.

    Args:
        tol: remove neurons with score ``<= tol`` (a finite float >= 0).
        every_n_epochs: also compact at the end of every n-th training epoch (single device only); None: only at the
            end of fit.
        on_fit_end: compact at the end of fit.
        example_input: find the neuron groups by running the module on this at ``setup``; by default the module's
            ``example_input_array``, else the first training step.
        targets: only the groups whose producer matches (a str is a regex on the full module name, a list matches
            exactly or by ``.suffix``).
        exclude: groups to leave whole (same rule; wins over ``targets``).

    Example:
        >>> from lightning_bv.callbacks import RBVRegularization
        >>> callbacks = [RBVRegularization(lam=1e-3), NeuronPruning(every_n_epochs=5)]
        >>> trainer = pl.Trainer(callbacks=callbacks, max_epochs=1, logger=False)
    """

    def __init__(
        self,
        tol: float = 0.0,
        every_n_epochs: int | None = None,
        on_fit_end: bool = True,
        example_input: Tensor | tuple[Any, ...] | None = None,
        targets: Targets = None,
        exclude: Targets = None,
    ) -> None:
        check_tol(tol)
        _check_interval("every_n_epochs", every_n_epochs, allow_none=True)
        if not isinstance(on_fit_end, bool):
            raise ValueError(f"`on_fit_end` must be a bool, got {on_fit_end!r}")
        if every_n_epochs is None and not on_fit_end:
            raise ValueError(
                "NeuronPruning(every_n_epochs=None, on_fit_end=False) would never compact: set `every_n_epochs` "
                "or leave `on_fit_end=True`"
            )
        super().__init__(example_input, targets, exclude)
        self.tol: float = float(tol)
        self.every_n_epochs: int | None = every_n_epochs
        self.at_fit_end: bool = on_fit_end  # not `self.on_fit_end`: that name is the hook
        self.report: CompactionReport | None = None
        self.history: list[dict[str, float]] = []
        self._hook: Any = None
        self._shrunk_id: int | None = None  # id() of the module this callback compacted (in this process)
        self.checkpoint_path: str | None = None
        self._skeleton: pl.LightningModule | None = None  # FSDP2: the module's structure, on the meta device
        self.compacted_model: pl.LightningModule | None = None

    @property
    @override
    def state_key(self) -> str:
        return self._generate_state_key(tol=self.tol, every_n_epochs=self.every_n_epochs, targets=self.targets)

    # -- set-up and discovery --------------------------------------------------------------------------------
    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            self._hook_loading(trainer, pl_module)
            return
        who = type(self).__name__
        refuse_sharded(trainer, who, "cuts whole weight rows and columns, which are flattened into shards there")
        strategy = type(trainer.strategy).__name__
        if self.every_n_epochs is not None and is_fsdp2(trainer):
            raise ValueError(
                f"{who}(every_n_epochs={self.every_n_epochs}) cannot compact during a fit under FSDP2 "
                f"({strategy}): fully_shard holds each parameter as a DTensor shard registered with its communication "
                "buffers and the optimizer, so the layers cannot be resized mid-fit. Use every_n_epochs=None: at the "
                "end of fit the gathered model is compacted (see NeuronPruning.compacted_model)."
            )
        if self.every_n_epochs is not None and is_parallel(trainer):
            raise ValueError(
                f"{who}(every_n_epochs={self.every_n_epochs}) compacts during training only on a single device: under "
                f"{strategy}, DistributedDataParallel registered the parameter objects when it wrapped the model, so "
                "they cannot be replaced mid-fit. Use every_n_epochs=None (compaction at the end of fit), or train on "
                "one device."
            )
        if self.at_fit_end and type(getattr(trainer.strategy, "launcher", None)).__name__ == "_MultiProcessingLauncher":
            raise ValueError(
                f"{who} cannot compact at the end of a fit under {strategy} with start method "
                f"{getattr(trainer.strategy, '_start_method', '?')!r}: the fit runs in worker processes, and Lightning "
                "then loads rank 0's weights into the uncompacted module of the main process, which fails on the "
                "smaller shapes. Use strategy='ddp', or call lightning_bv.compact(model, example_input=x) after fit."
            )
        self.bind(trainer, pl_module)
        example = self.setup_example_input(pl_module)
        if self.groups is None and example is not None:
            groups, _ = self.find_groups_now(trainer, pl_module, example)
            assert groups is not None  # found on the example: no training step to run
            self.publish_groups(trainer, pl_module, groups)
        if is_fsdp2(trainer) and self.at_fit_end:
            surgery_of_later_callbacks_first(trainer, self, pl_module, stage)  # the copy has the layers the fit trains
            self._skeleton = _meta_copy(pl_module)  # before configure_model shards it (a sharded module has no copy)
        self._hook_loading(trainer, pl_module)

    def _hook_loading(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Resize ``pl_module`` to the shapes of any checkpoint loaded into it (see the class docstring)."""
        self.teardown(trainer, pl_module, "")  # a second fit, or a test after fit: one hook only
        self._hook = pl_module.register_load_state_dict_pre_hook(
            functools.partial(_resize_on_load, trainer, self._shrunk_id == id(pl_module))
        )

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if self._hook is not None:
            self._hook.remove()
            self._hook = None

    @override
    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        super().on_exception(trainer, pl_module, exception)
        self.teardown(trainer, pl_module, "fit")

    @override
    def __getstate__(self) -> dict[str, Any]:
        state = super().__getstate__()  # without the groups
        # they hold the module, or name it in this process: never pickled (ddp_spawn)
        state.update(report=None, _hook=None, _shrunk_id=None, _skeleton=None, compacted_model=None)
        return state

    # -- compaction ------------------------------------------------------------------------------------------
    def compact(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, merge_lifted: bool = False
    ) -> CompactionReport | None:
        """Compact ``pl_module`` now: shrink it, carry the optimizers over, replace the groups of every callback.

        ``merge_lifted``: also merge products ``A B`` lifted by ``RBVRegularization`` back into one dense weight
        where that is smaller (at the end of fit; mid-fit they stay, so that training goes on unchanged).

        Returns:
            The report, also kept in :attr:`report` (without ``param_map``, so old Parameters are not kept alive);
            None when no neuron groups are known yet.
        """
        report = self._compact(trainer, pl_module, self.groups, merge_lifted)
        if report is not None and self._owner is not None:  # every callback of the fit reads the new groups
            self._owner.replace_after_compaction(self._selection, report)
        return report

    def _compact(
        self, trainer: Any, pl_module: pl.LightningModule, groups: NeuronGroups | None, merge_lifted: bool
    ) -> CompactionReport | None:
        """Compact ``pl_module`` along ``groups`` and carry ``trainer``'s optimizers over; record the report."""
        if groups is None:
            rank_zero_warn(
                f"{type(self).__name__}: no neuron groups were found (no training step ran and no example input was "
                "given), so nothing was compacted"
            )
            return None
        report = compact(pl_module, groups, tol=self.tol, merge_lifted=merge_lifted)
        if report.param_map or report.merged:
            for optimizer in trainer.optimizers:
                slice_optimizer_state_(optimizer, report.param_map)
        report.param_map = {}
        self.report = report
        if report.params_after < report.params_before:  # older checkpoints now need larger sizes to load
            self._shrunk_id = id(pl_module)
        self.history.append(
            {
                "epoch": float(trainer.current_epoch),
                "neurons_before": float(report.neurons_before),
                "neurons_after": float(report.neurons_after),
                "params_before": float(report.params_before),
                "params_after": float(report.params_after),
            }
        )
        return report

    @staticmethod
    def _metrics(report: CompactionReport) -> dict[str, float]:
        return {
            "bv/neurons_before": float(report.neurons_before),
            "bv/neurons_after": float(report.neurons_after),
            "bv/params_before": float(report.params_before),
            "bv/params_after": float(report.params_after),
        }

    @override
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.every_n_epochs is None or (trainer.current_epoch + 1) % self.every_n_epochs != 0:
            return
        report = self.compact(trainer, pl_module)
        if report is not None:
            for name, value in self._metrics(report).items():
                pl_module.log(name, value, on_step=False, on_epoch=True)

    @override
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self.at_fit_end:
            return
        if is_fsdp2(trainer):
            self._compact_gathered(trainer, pl_module)
            return
        report = self.compact(trainer, pl_module, merge_lifted=True)
        if report is not None and trainer.is_global_zero:  # pl_module.log is not allowed in on_fit_end
            for logger in trainer.loggers:
                logger.log_metrics(self._metrics(report), step=trainer.global_step)
        if report is not None:
            self.checkpoint_path = self.save_compacted(trainer)

    def _compact_gathered(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """FSDP2: gather the model onto rank 0's CPU, compact that copy, save it; the sharded module is left as is."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        state = get_model_state_dict(pl_module, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if not trainer.is_global_zero or self.groups is None or self._skeleton is None:
            if trainer.is_global_zero and self.groups is None:
                self._compact(trainer, pl_module, None, False)  # warns that no groups were found
            return
        model, self._skeleton = self._skeleton.to_empty(device="cpu"), None
        resize_to_state_dict_(model, state, grow=True)  # a weight lifted to A B after the copy was made
        model.load_state_dict(state)
        # the copy is compacted alone, along the same groups rebound to it; the shared groups keep describing the
        # sharded module, which keeps training if fit is called again
        report = self._compact(_NoOptimizers(trainer), model, _rebound(self.groups, model), merge_lifted=True)
        if report is None:
            return
        self.compacted_model = model
        for logger in trainer.loggers:
            logger.log_metrics(self._metrics(report), step=trainer.global_step)
        checkpoints: list[Any] = [cb for cb in trainer.checkpoint_callbacks if getattr(cb, "dirpath", None)]
        if checkpoints:
            self.checkpoint_path = os.path.join(str(checkpoints[0].dirpath), "compacted.ckpt")
            os.makedirs(str(checkpoints[0].dirpath), exist_ok=True)
            torch.save(
                {
                    "state_dict": model.state_dict(),
                    "hyper_parameters": dict(getattr(model, "hparams", {})),
                    "callbacks": {self.state_key: self.state_dict()},
                    "epoch": trainer.current_epoch,
                    "global_step": trainer.global_step,
                    "pytorch-lightning_version": pl.__version__,
                },
                self.checkpoint_path,
            )

    def save_compacted(self, trainer: pl.Trainer) -> str | None:
        """Save the compacted model as the run's last checkpoint; the path, or None without a ``ModelCheckpoint``.

        The path is the ``last`` checkpoint of the first ``ModelCheckpoint`` that keeps one (``save_last``; a link is
        replaced by a file, the checkpoint it pointed to is kept), so that ``trainer.test(ckpt_path="last")`` tests
        the compacted model; else ``compacted.ckpt`` in its ``dirpath``. Called on every rank (saving is collective).
        """
        checkpoints: list[Any] = [cb for cb in trainer.checkpoint_callbacks if getattr(cb, "dirpath", None)]
        if not checkpoints:
            return None
        with_last = [cb for cb in checkpoints if getattr(cb, "last_model_path", "")]
        cb = with_last[0] if with_last else checkpoints[0]
        path = str(cb.last_model_path) if with_last else os.path.join(str(cb.dirpath), "compacted.ckpt")
        if trainer.is_global_zero and os.path.islink(path):
            os.unlink(path)  # save_last="link": write the compacted model, not over the linked checkpoint
        trainer.save_checkpoint(path)
        return path

    # -- checkpointing ---------------------------------------------------------------------------------------
    @override
    def state_dict(self) -> dict[str, Any]:
        return {"history": list(self.history), "tol": self.tol}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.history = list(state_dict.get("history", []))


def _compacted(checkpoint: dict[str, Any]) -> bool:
    """Whether a Lightning checkpoint records a compaction by a NeuronPruning callback that removed parameters."""
    states = checkpoint.get("callbacks") or {}
    return any(
        str(key).startswith(NeuronPruning.__name__)
        and any(h.get("params_after", 0) < h.get("params_before", 0) for h in state.get("history", []))
        for key, state in states.items()
        if isinstance(state, dict)
    )


def _resize_on_load(
    trainer: Any, shrunk: bool, module: Any, state_dict: dict[str, Any], prefix: str, *args: Any
) -> None:
    """Load-state-dict pre-hook on the LightningModule: take the sizes of the checkpoint.

    The smaller sizes of a checkpoint that records a compaction (when Lightning restores a checkpoint with
    ``ckpt_path=``; any state_dict otherwise); and, when ``shrunk`` (this callback compacted the module), the larger
    sizes of a checkpoint saved before that compaction. The weights of a model of another architecture are not
    resized to fit, and ``load_state_dict`` names the mismatching keys.
    """
    checkpoint = getattr(getattr(trainer, "_checkpoint_connector", None), "_loaded_checkpoint", None)
    if shrunk or not (isinstance(checkpoint, dict) and checkpoint and not _compacted(checkpoint)):
        resize_to_state_dict_(module, state_dict, prefix, grow=shrunk)


def _meta_copy(module: nn.Module) -> Any:
    """A copy of ``module`` whose parameters and buffers are on the meta device (no memory); ``to_empty`` fills it."""
    memo: dict[int, Any] = {}
    for t in itertools.chain(module.parameters(), module.buffers()):
        meta = torch.empty_like(t, device="meta")
        memo[id(t)] = nn.Parameter(meta, requires_grad=t.requires_grad) if isinstance(t, nn.Parameter) else meta
    return copy.deepcopy(module, memo)


def _rebound(groups: Any, root: nn.Module) -> NeuronGroups:
    """The same groups on another instance of the module (the slots find their layers by name)."""
    out = []
    for g in groups:
        h = copy.copy(g)
        for side in ("w_slots", "b_slots", "v_slots"):
            slots = []
            for s in getattr(g, side):
                t = copy.copy(s)
                t.module = root.get_submodule(s.module_name)
                slots.append(t)
            setattr(h, side, tuple(slots))
        out.append(h)
    return NeuronGroups(out, getattr(groups, "skipped", ()))


class _NoOptimizers:
    """A Trainer seen without optimizers: the gathered copy is compacted alone."""

    def __init__(self, trainer: Any) -> None:
        self.current_epoch = trainer.current_epoch
        self.optimizers: list[Any] = []
