"""Step time with PathNormRegularization over step time without, per mode (issue: goal <= 1.05).

MLP 256 -> 4 x 1024 -> 10, batch 256, SGD, a real Lightning Trainer. Each fit is an A/B test
(:class:`benchmarks._common.Alternating`): the callback runs in every other block of 50 steps and is absent in the
blocks between, and the ratio is the mean step time of the on blocks over that of the off blocks. So the ratio is
amortized (the work done every ``every_n_steps`` steps, and the ``bv/*`` logging, count in full) and free of the
several-percent drift from one fit to the next on a shared machine. The median over repeats is reported, with the
smallest and largest.

    python -m benchmarks.overhead [--repeats 3] [--blocks 3]
"""

from __future__ import annotations

import argparse
import functools
import os
import statistics
from typing import Any

import pytorch_lightning as pl
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from benchmarks._common import Alternating, Supervised, markdown_table, median, quiet_lightning, save
from lightning_bv.callbacks import PathNormRegularization


class MLP(Supervised[nn.Sequential]):
    """256 -> 4 x 1024 -> 10, cross-entropy, SGD (lr 0.01, momentum 0.9)."""

    def __init__(self) -> None:
        layers: list[nn.Module] = [nn.Linear(256, 1024), nn.ReLU()]
        for _ in range(3):
            layers += [nn.Linear(1024, 1024), nn.ReLU()]
        net = nn.Sequential(*layers, nn.Linear(1024, 10))
        super().__init__(net, nn.functional.cross_entropy, functools.partial(torch.optim.SGD, lr=0.01, momentum=0.9))


def loader(steps: int) -> DataLoader:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(256 * steps, 256, generator=g)
    y = torch.randint(0, 10, (256 * steps,), generator=g)
    return DataLoader(TensorDataset(x, y), batch_size=256)


def alternating_fit(
    callback: pl.Callback,
    data: DataLoader,
    pairs: int,
    block: int,
    module: pl.LightningModule | None = None,
    logger: Any = False,
) -> Alternating:
    """One fit of ``module`` (default: a fresh ``MLP``) with ``callback`` on in ``pairs`` blocks and off in as many."""
    torch.manual_seed(0)
    timed = Alternating(callback, block)
    trainer = pl.Trainer(
        accelerator="cpu",
        max_steps=block * (2 * pairs + 1),
        logger=logger,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[timed],
        log_every_n_steps=50,
    )
    trainer.fit(MLP() if module is None else module, data)
    return timed


def _config(mode: str, every: int) -> pl.Callback:
    return PathNormRegularization(lam=1e-4, mode=mode, every_n_steps=every)


EVERY = (1, 4, 8)
CONFIGS = {
    f"{mode} every {every}": functools.partial(_config, mode, every)
    for mode in ("prox", "penalty", "weight_decay")
    for every in EVERY
}
BLOCK = 50  # log_every_n_steps: one bv/* logging step per on block


def summarize(runs: list[Alternating]) -> list[Any]:
    """[mean step ms off, mean step ms on, median ratio, range, goal] over the repeats of one configuration."""
    ratios = [r.ratio() for r in runs]
    ratio = median(ratios)
    off = median([statistics.fmean(r.off) for r in runs]) * 1e3
    on = median([statistics.fmean(r.on) for r in runs]) * 1e3
    return [off, on, ratio, f"{min(ratios):.3f}-{max(ratios):.3f}", "met" if ratio <= 1.05 else "missed"]


def main(argv: list[str] | None = None) -> str:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--blocks", type=int, default=3, help=f"on blocks (and as many off blocks) of {BLOCK} steps per fit")
    p.add_argument("--configs", nargs="*", default=list(CONFIGS), choices=list(CONFIGS))
    args = p.parse_args(argv)
    quiet_lightning()
    os.environ.setdefault("PL_DISABLE_FORK", "1")
    data = loader(BLOCK * (2 * args.blocks + 1))
    runs: dict[str, list[Alternating]] = {c: [] for c in args.configs}
    for _ in range(args.repeats):
        for c in args.configs:
            runs[c].append(alternating_fit(CONFIGS[c](), data, args.blocks, BLOCK))
    rows = [[c, *summarize(runs[c])] for c in args.configs]
    header = ["configuration", "step ms off", "step ms on", "ratio on/off", "range over repeats", "goal <= 1.05"]
    table = markdown_table(header, rows)
    table += (
        f"\n\n{args.repeats} repeats; each fit {args.blocks} blocks of {BLOCK} steps with the callback and "
        f"{args.blocks} without, after one untimed warm-up block with it."
    )
    print(table)
    save("overhead", table, {"ratios": {c: [r.ratio() for r in rs] for c, rs in runs.items()}})
    return table


if __name__ == "__main__":
    main()
