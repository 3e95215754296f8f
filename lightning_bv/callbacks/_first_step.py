"""Run a LightningModule's ``training_step`` once on the fit's first batch, at ``setup`` (private, shared by callbacks).

Model surgery that depends on the dataflow (which weights two neuron groups share, the input size of a block) must
happen in ``setup``: later, the optimizer and the DDP wrapper already hold the old parameters. A module without
``example_input_array`` gives no input there, so :func:`run_first_training_step` takes the first batch of the fit's
own train dataloader (the one Lightning will use: ``trainer.fit(model, datamodule)`` or the module's
``train_dataloader``), applies the module's batch-transfer hooks, and calls ``training_step`` with ``self.log``
muted, gradients enabled and nothing of the model changed: buffers (BatchNorm statistics) and the random number
generators are restored. Callers watch the call with module hooks or a :class:`~lightning_bv._trace.Trace`.

The dataloader is requested once more than Lightning itself does. Data a module builds in its own ``setup`` is not
there yet (Lightning calls the module's ``setup`` after the callbacks'); such a module gets ``None`` back, with the
reason.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from lightning_bv.neurons import _buffers_restored


@contextlib.contextmanager
def preserved_state(module: nn.Module) -> Iterator[None]:
    """Restore ``module``'s buffers and the CPU/CUDA random number generators on exit; grad enabled inside.

    Buffers are copied back in place (not through ``load_state_dict``, which drops a state_dict's ``_metadata`` and
    breaks modules whose ``_load_from_state_dict`` reads it).
    """
    with _buffers_restored(module), torch.random.fork_rng(devices=_cuda_devices(module)), torch.enable_grad():
        yield


def _cuda_devices(module: nn.Module) -> list[int]:
    return sorted({p.device.index or 0 for p in module.parameters() if p.device.type == "cuda"})


@contextlib.contextmanager
def _muted_logging(pl_module: Any) -> Iterator[None]:
    """``self.log`` and ``self.log_dict`` do nothing inside (their result collection does not exist at setup)."""
    names = ("log", "log_dict")
    had = {n: n in vars(pl_module) for n in names}
    old = {n: vars(pl_module)[n] for n in names if had[n]}
    for n in names:
        object.__setattr__(pl_module, n, lambda *args, **kwargs: None)
    try:
        yield
    finally:
        for n in names:
            if had[n]:
                object.__setattr__(pl_module, n, old[n])
            else:
                object.__delattr__(pl_module, n)


def first_train_batch(trainer: Any, pl_module: Any) -> tuple[Any, str]:
    """``(batch, "")``: the fit's first train batch, on the module's device; ``(None, why)`` when there is none."""
    source = getattr(getattr(trainer, "fit_loop", None), "_data_source", None)
    if source is None or not source.is_defined():
        return None, "the fit has no train dataloader yet"
    try:
        loader = source.dataloader()
    except Exception as err:  # e.g. data built in the module's own setup, which runs after the callbacks'
        return None, f"its train dataloader cannot be built at setup ({type(err).__name__}: {err})"
    from pytorch_lightning.utilities import CombinedLoader

    try:
        combined = CombinedLoader(loader, "max_size_cycle")
        iter(combined)
        batch = next(iter(combined))
    except StopIteration:
        return None, "its train dataloader is empty"
    except Exception as err:
        return None, f"its train dataloader gave no batch at setup ({type(err).__name__}: {err})"
    if isinstance(batch, tuple) and len(batch) == 3 and isinstance(batch[1], int):  # (batch, batch_idx, loader_idx)
        batch = batch[0]
    batch = pl_module.on_before_batch_transfer(batch, 0)
    batch = pl_module.transfer_batch_to_device(batch, pl_module.device, 0)
    return pl_module.on_after_batch_transfer(batch, 0), ""


def run_first_training_step(trainer: Any, pl_module: Any, outputs: list[Any] | None = None) -> str:
    """Call ``pl_module.training_step`` on the first train batch (logging muted, state restored).

    ``outputs``: a list that receives what ``training_step`` returned (the loss: what a trace of the step should
    treat as its result).

    Returns:
        ``""`` when the step ran, else why it could not (no dataloader yet, an empty one...). An exception raised by
        the ``training_step`` itself propagates: it would fail the same way in the fit.
    """
    was_training = pl_module.training
    try:  # the RNG is restored after the dataloader too: making an iterator draws a seed
        with preserved_state(pl_module), _muted_logging(pl_module):
            batch, why = first_train_batch(trainer, pl_module)
            if why:
                return why
            pl_module.train()
            out = pl_module.training_step(batch, 0)
            if outputs is not None:
                outputs.append(out)
            del out
    finally:
        pl_module.train(was_training)
    return ""
