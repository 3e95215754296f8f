"""Fits under FSDP2 on 2 CPU processes, run as a script (``ModelParallelStrategy`` relaunches it for rank 1).

``python tests/fsdp_fits.py OUT CASE [CASE ...]``: each case is the name of a function in ``CASES`` (tests/test_fsdp.py
holds the single-process side). Every rank saves ``OUT/<case>.rank<r>.pt``: the gathered final state dict, and what
the case records (logged values, reports).
"""

from __future__ import annotations

import os
import sys
from typing import Any

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from helpers import ShardedMLP, fsdp2_strategy, gathered_state, trainer  # noqa: E402

from lightning_bv.callbacks import PathNormRegularization  # noqa: E402

STEPS = 12


def fit_kwargs(**kw: Any) -> dict[str, Any]:
    """The Trainer arguments shared with the single-process run: same global batches on 1 and 2 processes."""
    return {"max_steps": STEPS, "use_distributed_sampler": False, **kw}


def module(optimizer: str = "sgd", width: int = 16) -> ShardedMLP:
    torch.manual_seed(0)
    return ShardedMLP(width=width, lr=0.05, n=96, batch_size=16, deterministic_sampler=True, optimizer=optimizer)


def callbacks_of(case: str) -> list[Any]:
    """The callbacks of a case ``"<mode>-<optimizer>"`` (modes: prox, prox-nolift, penalty, weight_decay)."""
    mode, _, _ = case.rpartition("-")
    if mode == "prox-nolift":
        return [PathNormRegularization(lam=0.1, lift_shared=False)]
    return [PathNormRegularization(lam=0.1 if mode == "prox" else 0.05, mode=mode)]


def run(case: str, out: str) -> None:
    optimizer = case.rpartition("-")[2]
    m = module(optimizer)
    cbs = callbacks_of(case)
    t = trainer(callbacks=cbs, strategy=fsdp2_strategy(), devices=2, **fit_kwargs())
    t.fit(m)
    torch.save({"state": gathered_state(m)}, f"{out}/{case}.rank{t.global_rank}.pt")


if __name__ == "__main__":
    out, cases = sys.argv[1], sys.argv[2:]
    for c in cases:
        run(c, out)
