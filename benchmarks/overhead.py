"""Step time with RBVRegularization over step time without, per mode (issue: goal <= 1.05).

MLP 256 -> 4 x 1024 -> 10, batch 256, SGD, a real Lightning Trainer. Each fit is an A/B test
(:class:`benchmarks._common.Alternating`): the callback runs in every other block of 50 steps and is absent in the
blocks between, and the ratio is the mean step time of the on blocks over that of the off blocks. So the ratio is
amortized (the work done every ``every_n_steps`` steps, and the ``bv/*`` logging, count in full) and free of the
several-percent drift from one fit to the next on a shared machine. The median over repeats is reported, with the
smallest and largest.

The prox lifts the MLP's three hidden 1024 x 1024 matrices to full-rank products ``A B`` in ``setup`` (see
``RBVRegularization``): both the on and the off blocks train the lifted model, so the ratio is the cost of the
update alone. ``--lift`` also times whole fits of the lifted model without the callback against the plain model
(fits in turn, median of the repeats): the cost of training in the lifted architecture.

    python -m benchmarks.overhead [--repeats 3] [--blocks 3] [--optimizer sgd adam] [--lift] [--name overhead]
"""

from __future__ import annotations

import argparse
import functools
import os
import statistics
import time
from typing import Any

import pytorch_lightning as pl
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from benchmarks._common import Alternating, Supervised, markdown_table, median, quiet_lightning, save
from lightning_bv.callbacks import RBVRegularization

OPTIMIZERS = {
    "sgd": functools.partial(torch.optim.SGD, lr=0.01, momentum=0.9),
    "adam": functools.partial(torch.optim.Adam, lr=1e-3),
}


class MLP(Supervised[nn.Sequential]):
    """256 -> 4 x 1024 -> 10, cross-entropy, SGD (lr 0.01, momentum 0.9) or Adam (lr 1e-3)."""

    def __init__(self, optimizer: str = "sgd") -> None:
        layers: list[nn.Module] = [nn.Linear(256, 1024), nn.ReLU()]
        for _ in range(3):
            layers += [nn.Linear(1024, 1024), nn.ReLU()]
        net = nn.Sequential(*layers, nn.Linear(1024, 10))
        super().__init__(net, nn.functional.cross_entropy, OPTIMIZERS[optimizer])


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
    return RBVRegularization(lam=1e-4, mode=mode, every_n_steps=every)


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


class StepTimer(pl.Callback):
    """Times every training step after the first ``skip``."""

    def __init__(self, skip: int) -> None:
        self.skip, self.times, self._t0 = skip, [], 0.0

    def on_train_batch_start(self, trainer: pl.Trainer, *args: Any) -> None:
        self._t0 = time.perf_counter()

    def on_train_batch_end(self, trainer: pl.Trainer, *args: Any) -> None:
        if trainer.global_step > self.skip:
            self.times.append(time.perf_counter() - self._t0)


def lift_ratio(optimizer: str, data: DataLoader, steps: int, repeats: int) -> list[float]:
    """Mean step time of the lifted MLP (no callback) over the plain MLP's, fits in turn; one ratio per repeat."""
    from lightning_bv import find_neurons, lift_shared_weights

    ratios = []
    for _ in range(repeats):
        means = {}
        for lifted in (False, True):
            torch.manual_seed(0)
            module = MLP(optimizer)
            if lifted:
                lift_shared_weights(module.net, find_neurons(module.net, torch.randn(1, 256)), normalize=True)
            timer = StepTimer(skip=10)
            trainer = pl.Trainer(accelerator="cpu", max_steps=steps, logger=False, enable_checkpointing=False,
                                 enable_progress_bar=False, enable_model_summary=False, callbacks=[timer])  # fmt: skip
            trainer.fit(module, data)
            means[lifted] = statistics.fmean(timer.times)
        ratios.append(means[True] / means[False])
    return ratios


def main(argv: list[str] | None = None) -> str:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--blocks", type=int, default=3, help=f"on blocks (and as many off blocks) of {BLOCK} steps per fit")
    p.add_argument("--configs", nargs="*", default=list(CONFIGS), choices=list(CONFIGS))
    p.add_argument("--optimizer", nargs="+", default=["sgd"], choices=list(OPTIMIZERS))
    p.add_argument("--lift", action="store_true", help="also time the lifted model against the plain one")
    p.add_argument("--name", default="overhead", help="results file name under benchmarks/results")
    args = p.parse_args(argv)
    quiet_lightning()
    os.environ.setdefault("PL_DISABLE_FORK", "1")
    data = loader(BLOCK * (2 * args.blocks + 1))
    keys = [f"{c} ({o})" if len(args.optimizer) > 1 else c for o in args.optimizer for c in args.configs]
    runs: dict[str, list[Alternating]] = {k: [] for k in keys}
    for _ in range(args.repeats):
        for o in args.optimizer:
            for c in args.configs:
                key = f"{c} ({o})" if len(args.optimizer) > 1 else c
                runs[key].append(alternating_fit(CONFIGS[c](), data, args.blocks, BLOCK, module=MLP(o)))
    rows = [[k, *summarize(runs[k])] for k in keys]
    header = ["configuration", "step ms off", "step ms on", "ratio on/off", "range over repeats", "goal <= 1.05"]
    table = markdown_table(header, rows)
    table += (
        f"\n\n{args.repeats} repeats; each fit {args.blocks} blocks of {BLOCK} steps with the callback and "
        f"{args.blocks} without, after one untimed warm-up block with it."
    )
    data_out: dict[str, Any] = {"ratios": {k: [r.ratio() for r in rs] for k, rs in runs.items()}}
    if args.lift:
        lift = {o: lift_ratio(o, data, 2 * BLOCK, args.repeats) for o in args.optimizer}
        data_out["lift"] = lift
        table += "\n\n" + markdown_table(
            ["optimizer", "lifted step / plain step (no callback)", "range over repeats"],
            [[o, median(r), f"{min(r):.3f}-{max(r):.3f}"] for o, r in lift.items()],
        )
    print(table)
    save(args.name, table, data_out)
    return table


if __name__ == "__main__":
    main()
