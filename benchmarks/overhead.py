"""Step time with PathNormRegularization over step time without, per mode (issue: goal <= 1.05).

MLP 256 -> 4 x 1024 -> 10, batch 256, SGD, a real Lightning Trainer. Configurations are interleaved: each repeat
runs one short fit of every configuration in turn, so drift on a shared machine hits all of them alike. The
ratio is median(step time with) / median(step time without), over all timed steps after warm-up.

    python -m benchmarks.overhead [--repeats 5] [--steps 40]
"""

from __future__ import annotations

import argparse
import os
import warnings

import pytorch_lightning as pl
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from benchmarks._common import StepTimer, markdown_table, median, save
from lightning_bv.callbacks import PathNormRegularization


class MLP(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.Linear(256, 1024), nn.ReLU()]
        for _ in range(3):
            layers += [nn.Linear(1024, 1024), nn.ReLU()]
        self.net = nn.Sequential(*layers, nn.Linear(1024, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01, momentum=0.9)


def loader(steps: int) -> DataLoader:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(256 * steps, 256, generator=g)
    y = torch.randint(0, 10, (256 * steps,), generator=g)
    return DataLoader(TensorDataset(x, y), batch_size=256)


def fit_once(
    callbacks: list[pl.Callback], data: DataLoader, steps: int, module: pl.LightningModule | None = None
) -> list[float]:
    """Step times of one short fit of ``module`` (default: a fresh ``MLP``), after 5 warm-up steps."""
    torch.manual_seed(0)
    timer = StepTimer()
    trainer = pl.Trainer(
        accelerator="cpu",
        max_steps=steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[*callbacks, timer],
        log_every_n_steps=50,
    )
    trainer.fit(MLP() if module is None else module, data)
    return timer.times[5:]  # warm-up and the one-off neuron discovery on step 0 are not timed


CONFIGS = {
    "none": lambda: [],
    "prox": lambda: [PathNormRegularization(lam=1e-4, mode="prox")],
    "prox every 4": lambda: [PathNormRegularization(lam=1e-4, mode="prox", every_n_steps=4)],
    "penalty": lambda: [PathNormRegularization(lam=1e-4, mode="penalty")],
    "penalty every 4": lambda: [PathNormRegularization(lam=1e-4, mode="penalty", every_n_steps=4)],
    "weight_decay": lambda: [PathNormRegularization(lam=1e-4, mode="weight_decay")],
    "weight_decay every 4": lambda: [PathNormRegularization(lam=1e-4, mode="weight_decay", every_n_steps=4)],
}


def main(argv: list[str] | None = None) -> str:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--configs", nargs="*", default=list(CONFIGS))
    args = p.parse_args(argv)
    warnings.filterwarnings("ignore")
    os.environ.setdefault("PL_DISABLE_FORK", "1")
    data = loader(args.steps)
    times: dict[str, list[float]] = {c: [] for c in args.configs}
    for _ in range(args.repeats):
        for c in args.configs:
            times[c] += fit_once(CONFIGS[c](), data, args.steps)
    base = median(times["none"]) if "none" in times else float("nan")
    rows = []
    for c in args.configs:
        m = median(times[c])
        ratio = m / base
        rows.append([c, m * 1e3, ratio, "met" if ratio <= 1.05 else ("-" if c == "none" else "missed")])
    table = markdown_table(["configuration", "median step ms", "ratio to none", "goal <= 1.05"], rows)
    print(table)
    save("overhead", table, {"median_step_s": {c: median(t) for c, t in times.items()}})
    return table


if __name__ == "__main__":
    main()
