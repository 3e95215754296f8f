"""Fits under FSDP2 on 2 CPU processes, run as a script (``ModelParallelStrategy`` relaunches it for rank 1).

``python tests/fsdp_fits.py OUT CASE [CASE ...]`` runs each case in the same two processes; tests/test_fsdp.py runs
the same cases on one process (``run(case, out, fsdp=False)``) and compares. Every rank saves
``OUT/<case>.rank<r>.pt`` with the gathered final state dict; loggers write under ``OUT/<case>-<side>``.
"""

from __future__ import annotations

import os
import sys
from typing import Any

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from helpers import ShardedMLP, fsdp2_strategy, gathered_state, trainer  # noqa: E402
from pytorch_lightning.loggers import CSVLogger  # noqa: E402

from lightning_bv.callbacks import BVMonitor, LowRank, PathNormRegularization, SkipConnections  # noqa: E402

STEPS = 12
LAM = {"sgd": 0.1, "adam": 0.02}  # kills some of the 16 + 16 neurons in 12 steps, not all


def module(optimizer: str) -> ShardedMLP:
    torch.manual_seed(0)
    return ShardedMLP(width=16, lr=0.05, n=96, batch_size=16, deterministic_sampler=True, optimizer=optimizer)


def callbacks_of(case: str) -> list[Any]:
    """A case is ``"<what>-<optimizer>"``; what: prox, prox_nolift, penalty, weight_decay, surgery, monitor."""
    what, optimizer = case.split("-")
    lam = LAM[optimizer]
    if what == "prox_nolift":
        return [PathNormRegularization(lam=lam, lift_shared=False)]
    if what == "surgery":  # applied at setup, before configure_model shards the model
        return [
            LowRank(energy=0.9, exclude=["net.4"]),
            SkipConnections(targets=["net.2"]),
            PathNormRegularization(lam=lam),
        ]
    if what == "monitor":
        return [PathNormRegularization(lam=lam), BVMonitor(every_n_steps=3, spectra_every_n_steps=3)]
    return [PathNormRegularization(lam=lam if what == "prox" else lam / 4, mode=what)]


def run(case: str, out: str, fsdp: bool = True) -> dict[str, Any]:
    """Fit one case; returns (and, under FSDP2, saves per rank) the gathered final state dict."""
    m = module(case.split("-")[1])
    side = "fsdp" if fsdp else "single"
    kw: dict[str, Any] = {"strategy": fsdp2_strategy(), "devices": 2} if fsdp else {}
    t = trainer(
        callbacks=callbacks_of(case),
        max_steps=STEPS,
        use_distributed_sampler=False,  # the module's sampler: same global batches on 1 and 2 processes
        logger=CSVLogger(out, name=f"{case}-{side}", version=0),
        **kw,
    )
    t.fit(m)
    result = {"state": gathered_state(m)}
    if fsdp:
        torch.save(result, f"{out}/{case}.rank{t.global_rank}.pt")
    return result


if __name__ == "__main__":
    out, cases = sys.argv[1], sys.argv[2:]
    for c in cases:
        run(c, out)
