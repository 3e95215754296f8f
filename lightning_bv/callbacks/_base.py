"""A Callback base accepted by both ``pytorch_lightning.Trainer`` and ``lightning.pytorch.Trainer``."""

from __future__ import annotations

from typing import Any

import pytorch_lightning as pl
from pytorch_lightning.utilities import rank_zero_warn
from torch import Tensor

try:  # the unified package, when installed, has its own Callback class that its Trainer checks for
    import lightning.pytorch as _L

    _BASES: tuple[type, ...] = (pl.Callback, _L.Callback) if _L.Callback is not pl.Callback else (pl.Callback,)
except ImportError:  # pragma: no cover - depends on what is installed
    _BASES = (pl.Callback,)


class CallbackBase(*_BASES):  # type: ignore[misc]
    """Base of every lightning_bv callback."""


def _check_example_input(
    example_input: object, error: type[Exception] = TypeError, of: str = " of the LightningModule's forward"
) -> None:
    """``example_input`` of a callback that runs the module on it: None, a tensor or a tuple.

    ``error`` and ``of`` (what the positional arguments are of) word the error, which differs between callbacks.
    """
    if example_input is not None and not isinstance(example_input, (Tensor, tuple)):
        raise error(
            f"`example_input` must be None, a tensor or a tuple of positional arguments{of}, got "
            f"{type(example_input).__name__}"
        )


def example_input_or_array(example_input: Any, pl_module: Any) -> Any:
    """A callback's ``example_input``, else the module's ``example_input_array``; None when neither is set."""
    return example_input if example_input is not None else getattr(pl_module, "example_input_array", None)


def _check_interval(name: str, value: Any, allow_none: bool = False) -> Any:
    """A number of steps: an int >= 1 (or None with ``allow_none``); returns it."""
    if allow_none and value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"`{name}` must be {'None or ' if allow_none else ''}an int >= 1, got {value!r}")
    return value


_SHARDED = ("FSDPStrategy", "DeepSpeedStrategy", "ModelParallelStrategy", "XLAFSDPStrategy")
_FSDP2 = "ModelParallelStrategy"  # torch's fully_shard in configure_model: weights are DTensors split by rows


def _is_sharded(trainer: Any) -> bool:
    return any(cls.__name__ in _SHARDED for cls in type(trainer.strategy).__mro__)


def is_fsdp2(trainer: Any) -> bool:
    """Whether the strategy is Lightning's ``ModelParallelStrategy`` (FSDP2: ``fully_shard`` in ``configure_model``)."""
    return any(cls.__name__ == _FSDP2 for cls in type(trainer.strategy).__mro__)


def is_parallel(trainer: Any) -> bool:
    """Whether the Trainer's strategy runs several processes (DDP, FSDP...).

    By class name, not ``isinstance``: the strategies of ``pytorch_lightning`` and of ``lightning.pytorch`` are
    different classes, and the callbacks serve both Trainers.
    """
    return any(cls.__name__ == "ParallelStrategy" for cls in type(trainer.strategy).__mro__)


def refuse_sharded(trainer: Any, who: str, why: str, fsdp2: bool = True) -> None:
    """Raise for a sharded strategy the callbacks do not support; ``why`` completes "it ..." in the message.

    FSDP2 (``ModelParallelStrategy``) is supported unless ``fsdp2=False``, when data-parallel only: its tensor
    parallelism splits weights by columns. FSDP1 (``strategy="fsdp"``), DeepSpeed and XLA's FSDP flatten the
    parameters into shards, where no neuron's weights can be found.
    """
    if not _is_sharded(trainer):
        return
    strategy = type(trainer.strategy).__name__
    if is_fsdp2(trainer) and fsdp2:
        mesh = getattr(trainer.strategy, "device_mesh", None)
        names = tuple(getattr(mesh, "mesh_dim_names", None) or ())
        if mesh is not None and "tensor_parallel" in names and mesh["tensor_parallel"].size() > 1:
            raise ValueError(
                f"{who} supports ModelParallelStrategy with data parallelism only (FSDP2's fully_shard), got "
                f"tensor_parallel_size={mesh['tensor_parallel'].size()}: tensor parallelism splits weights by "
                "columns. Pass ModelParallelStrategy(data_parallel_size=<devices>, tensor_parallel_size=1)."
            )
        return
    fix = (
        "Use strategy='ddp'" if is_fsdp2(trainer) else
        "Use ModelParallelStrategy(data_parallel_size=<devices>, tensor_parallel_size=1) with torch's fully_shard "
        "in configure_model (FSDP2), or strategy='ddp'"
    )  # fmt: skip
    raise ValueError(f"{who} does not support the sharded strategy {strategy}: it {why}. {fix}.")


def configure_model_first(trainer: Any, pl_module: Any, who: str) -> None:
    """Call the module's own ``configure_model`` now, from a callback's ``setup``, so that its layers exist.

    Lightning calls ``configure_model`` right after the callbacks' ``setup`` (and again at every stage: the hook must
    be idempotent), so model surgery in ``setup`` would not see the layers it creates. Lightning's ``WeightAveraging``
    calls it first for the same reason; here it runs in the strategy's and precision plugin's init contexts, as
    Lightning's own call does, but not in the sharded context (surgery needs whole layers): under a sharded strategy
    the model is built unsharded, with a warning, as ``WeightAveraging`` does.
    """
    owner = next((c for c in type(pl_module).__mro__ if "configure_model" in vars(c)), None)
    if owner is None or owner.__module__.split(".")[0] in ("pytorch_lightning", "lightning"):
        return  # not overridden
    if is_fsdp2(trainer):
        # there configure_model shards the layers (fully_shard), which must come after the surgery: the layers the
        # surgery changes are those __init__ built
        if next(pl_module.parameters(), None) is None:
            raise ValueError(
                f"{who} changes the model at setup, before ModelParallelStrategy calls your `configure_model`, where "
                "FSDP2 shards it; this module has no parameters yet. Build the layers in `__init__` and only shard "
                "them in `configure_model`."
            )
        return
    if _is_sharded(trainer):
        rank_zero_warn(
            f"{who} calls your `configure_model` before Lightning does, outside the sharded context of "
            f"{type(trainer.strategy).__name__}, so that its layers exist for the model surgery: the model is built "
            "unsharded on each rank and may not fit in memory."
        )
    with trainer.strategy.tensor_init_context(), trainer.precision_plugin.module_init_context():
        pl_module.configure_model()


def surgery_of_later_callbacks_first(trainer: Any, me: Any, pl_module: Any, stage: str) -> None:
    """Run now the ``setup`` of the surgery callbacks listed after ``me`` (``changes_model_in_setup``).

    So that what ``me`` does at setup sees the final model; their own ``setup`` does nothing the second time.
    """
    callbacks: list[Any] = list(getattr(trainer, "callbacks", []))
    mine = next((i for i, c in enumerate(callbacks) if c is me), len(callbacks))
    for later in callbacks[mine + 1 :]:
        if getattr(later, "changes_model_in_setup", False):
            later.setup(trainer, pl_module, stage)


def refuse_unsupported(trainer: Any, pl_module: Any, who: str) -> None:
    """Raise at ``setup`` for set-ups the callbacks do not support: manual optimization and sharded strategies."""
    why = "reads and rescales whole weight rows and columns, which are flattened into shards there"
    refuse_sharded(trainer, who, why)
    if not getattr(pl_module, "automatic_optimization", True):
        raise ValueError(
            f"{who} does not support manual optimization (automatic_optimization=False): there is no optimizer step "
            f"hook to attach to. In your training_step, after each optimizer.step(), call "
            f"lightning_bv.proximal_step_(groups, lightning_bv.prox_thresholds(groups, optimizer, lam), first=<True at "
            f"the first update>) (or add_rbv_grad_(groups, lam) before it)."
        )


def warn_if_spawned(trainer: Any, who: str) -> None:
    """Warn that model surgery in spawned workers (``ddp_spawn``, ``ddp_fork``, ``ddp_notebook``) is lost after fit.

    With those strategies ``trainer.fit`` runs in worker processes on copies of the module; at the end Lightning
    loads rank 0's ``state_dict`` back into the module of the main process with ``strict=False``. The layers changed
    by the surgery have other state_dict keys there, so they are silently skipped and keep their initial weights.
    """
    if type(getattr(trainer.strategy, "launcher", None)).__name__ == "_MultiProcessingLauncher":
        rank_zero_warn(
            f"{who} changes the model inside the worker processes of {type(trainer.strategy).__name__} "
            f"(start method {getattr(trainer.strategy, '_start_method', '?')!r}). When fit ends, Lightning copies "
            "the weights back to the module in the main process with strict=False, which skips the layers changed "
            "here: they keep their initial weights there. Use strategy='ddp', or save a checkpoint (ModelCheckpoint) "
            "and load it into a model changed the same way."
        )


def wandb_loggers(trainer: Any) -> list[Any]:
    """The W&B loggers of the Trainer (``WandbLogger`` of ``pytorch_lightning`` or of ``lightning.pytorch``)."""
    classes: list[type] = []
    for package in ("pytorch_lightning", "lightning.pytorch"):
        try:
            module = __import__(f"{package}.loggers", fromlist=["WandbLogger"])
            classes.append(module.WandbLogger)
        except (ImportError, AttributeError):  # pragma: no cover - depends on what is installed
            pass
    return [lg for lg in trainer.loggers if isinstance(lg, tuple(classes))]
