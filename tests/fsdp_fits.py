"""Fits under FSDP2 on 2 CPU processes, run as a script (``ModelParallelStrategy`` relaunches it for rank 1).

``python tests/fsdp_fits.py OUT CASE [CASE ...]`` runs each case in the same two processes; tests/test_fsdp.py runs
the same cases on one process (``run(case, out, fsdp=False)``) and compares. Every rank saves
``OUT/<case>.rank<r>.pt`` with the gathered final state dict; loggers write under ``OUT/<case>-<side>``.
"""

from __future__ import annotations

import os
import sys
from typing import Any

import pytorch_lightning as pl
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from helpers import ShardedMLP, fsdp2_strategy, gathered_state, trainer  # noqa: E402
from pytorch_lightning.loggers import CSVLogger  # noqa: E402

from lightning_bv.callbacks import (  # noqa: E402
    BVMonitor,
    LowRank,
    NeuronPruning,
    RBVRegularization,
    SkipConnections,
)

STEPS = 12
LAM = {"sgd": 0.1, "adam": 0.02}  # kills some of the 16 + 16 neurons in 12 steps, not all


def module(optimizer: str) -> ShardedMLP:
    torch.manual_seed(0)
    return ShardedMLP(width=16, lr=0.05, n=96, batch_size=16, deterministic_sampler=True, optimizer=optimizer)


class CountingRegularization(RBVRegularization):
    """Records the all-reduces each proximal update makes (``per_update``)."""

    def __init__(self, **kw: Any) -> None:
        super().__init__(**kw)
        self.per_update: list[int] = []

    def _prox(self, *args: Any) -> None:
        calls = []
        original = torch.distributed.all_reduce

        def counted(*a: Any, **k: Any) -> Any:
            calls.append(1)
            return original(*a, **k)

        torch.distributed.all_reduce = counted
        try:
            super()._prox(*args)
        finally:
            torch.distributed.all_reduce = original
        self.per_update.append(len(calls))


def callbacks_of(case: str) -> list[Any]:
    """A case is ``"<what>-<optimizer>"``.

    what: prox, prox_nolift, penalty, weight_decay, surgery, monitor, prune, count.
    """
    what, optimizer = case.split("-")
    lam = LAM[optimizer]
    if what.startswith(("resume", "refused")):  # resumed from a checkpoint: compared with an uninterrupted "prox" fit
        what = "prox"
    if what == "prox_nolift":
        return [RBVRegularization(lam=lam, lift_shared=False)]
    if what == "surgery":  # applied at setup, before configure_model shards the model
        return [
            LowRank(energy=0.9, exclude=["net.4"]),
            SkipConnections(targets=["net.2"]),
            RBVRegularization(lam=lam),
        ]
    if what == "prune":
        from pytorch_lightning.callbacks import ModelCheckpoint

        return [RBVRegularization(lam=lam), NeuronPruning(), ModelCheckpoint(save_top_k=0)]
    if what == "count":
        return [CountingRegularization(lam=lam)]
    if what == "monitor":
        return [RBVRegularization(lam=lam), BVMonitor(every_n_steps=3, spectra_every_n_steps=3)]
    return [RBVRegularization(lam=lam if what == "prox" else lam / 4, mode=what)]


class StartStep(pl.Callback):
    """The global step a fit starts at (6 when it resumed from the checkpoint at the end of the first epoch)."""

    step = -1

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.step = trainer.global_step


def fit(case: str, out: str, fsdp: bool, steps: int = STEPS, **kw: Any) -> tuple[ShardedMLP, Any]:
    m = module(case.split("-")[1])
    side = "fsdp" if fsdp else "single"
    if fsdp:
        kw.update(strategy=kw.pop("strategy", None) or fsdp2_strategy(), devices=2)
    ckpt_path = kw.pop("ckpt_path", None)
    callbacks = [*callbacks_of(case), *kw.pop("callbacks", []), StartStep()]
    kw.setdefault("enable_checkpointing", any(type(c).__name__ == "ModelCheckpoint" for c in callbacks))
    t = trainer(
        callbacks=callbacks,
        max_steps=steps,
        use_distributed_sampler=False,  # the module's sampler: same global batches on 1 and 2 processes
        logger=CSVLogger(out, name=f"{case}-{side}", version=0),
        **kw,
    )
    t.fit(m, ckpt_path=ckpt_path)
    return m, t


def resume(case: str, out: str) -> tuple[ShardedMLP, Any]:
    """``resume_full-<opt>`` / ``resume_dist-<opt>``: 6 steps (an epoch), a checkpoint (one file or Lightning's
    distributed folder), then a new Trainer resumes from it to step 12."""
    from pytorch_lightning.callbacks import ModelCheckpoint
    from pytorch_lightning.strategies import ModelParallelStrategy

    dist = case.startswith("resume_dist")
    strategy = lambda: ModelParallelStrategy(  # noqa: E731
        data_parallel_size=2, tensor_parallel_size=1, save_distributed_checkpoint=dist
    )
    ckpt = ModelCheckpoint(dirpath=f"{out}/{case}-ckpt", save_last=False, save_top_k=-1, every_n_train_steps=6)
    fit(case, out, True, steps=6, strategy=strategy(), callbacks=[ckpt])
    return fit(case, out, True, strategy=strategy(), ckpt_path=ckpt.best_model_path or ckpt.last_model_path)


def refused(case: str, out: str) -> None:
    """``refused_tp-<opt>``: tensor parallelism (both processes on the tensor-parallel axis) is refused at setup."""
    from pytorch_lightning.strategies import ModelParallelStrategy

    strategy = ModelParallelStrategy(data_parallel_size=1, tensor_parallel_size=2)
    try:
        fit(case, out, True, strategy=strategy)
        error = ""
    except ValueError as err:
        error = str(err)
    rank = int(os.environ.get("LOCAL_RANK", "0"))
    torch.save({"error": error}, f"{out}/{case}.rank{rank}.pt")


def run(case: str, out: str, fsdp: bool = True) -> dict[str, Any]:
    """Fit one case; returns (and, under FSDP2, saves per rank) the gathered final state dict."""
    if case.startswith("refused"):
        refused(case, out)
        return {}
    m, t = resume(case, out) if case.startswith("resume") else fit(case, out, fsdp)
    result = {"state": gathered_state(m), "start_step": next(c for c in t.callbacks if isinstance(c, StartStep)).step}
    counting = next((c for c in t.callbacks if isinstance(c, CountingRegularization)), None)
    if counting is not None:
        result["all_reduces_per_update"] = counting.per_update
    pruning = next((c for c in t.callbacks if isinstance(c, NeuronPruning)), None)
    if pruning is not None:
        compacted = pruning.compacted_model if fsdp else m
        result["compacted"] = None if compacted is None else {k: v.clone() for k, v in compacted.state_dict().items()}
        result["checkpoint_path"] = pruning.checkpoint_path
    if fsdp:
        torch.save(result, f"{out}/{case}.rank{t.global_rank}.pt")
    return result


if __name__ == "__main__":
    out, cases = sys.argv[1], sys.argv[2:]
    for c in cases:
        run(c, out)
