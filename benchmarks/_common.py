"""Shared pieces of the benchmarks: the machine/version header, a plain LightningModule, step timing, result files."""

from __future__ import annotations

import contextlib
import datetime
import json
import logging
import os
import platform
import statistics
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Generic, TypeVar

import pytorch_lightning as pl
import torch
from torch import Tensor, nn

RESULTS = Path(__file__).parent / "results"
NetT = TypeVar("NetT", bound=nn.Module)


def machine() -> dict[str, Any]:
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": f"{platform.machine()} {platform.processor() or ''} {os.cpu_count()} cpus".strip(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "pytorch_lightning": pl.__version__,
        "threads": torch.get_num_threads(),
    }


class Supervised(pl.LightningModule, Generic[NetT]):
    """An ordinary LightningModule around ``net`` that knows nothing about lightning_bv: ``loss(net(x), y)`` on
    ``(x, y)`` batches, optimized by ``optimizer(parameters)`` (e.g. ``functools.partial(torch.optim.SGD, lr=0.1)``).
    """

    def __init__(
        self,
        net: NetT,
        loss: Callable[[Tensor, Tensor], Tensor],
        optimizer: Callable[[Iterator[nn.Parameter]], torch.optim.Optimizer],
    ) -> None:
        super().__init__()
        self.net: NetT = net
        self.loss_fn, self.make_optimizer = loss, optimizer

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        x, y = batch
        return self.loss_fn(self(x), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return self.make_optimizer(self.parameters())


class Alternating(pl.Callback):
    """Runs ``inner`` in every other block of ``block`` steps only, and times every step: an A/B test in one fit.

    Block 0 is warm-up, on and not timed: discovery and the one-off costs of a first event (Lightning's first
    ``log`` of a key takes about 200 ms) fall there, as they fall on the first steps of a long fit. Then blocks 1,
    3, 5, ... are "on" (the inner callback sees every hook of those steps) and blocks 2, 4, ... are "off" (it sees
    none). Comparing on and off steps of one fit removes what varies from fit to fit on a shared machine (memory
    placement, other jobs), which moves a whole fit's step time by several percent. The inner callback's counters
    advance on its steps only, so the work it does every ``n`` steps falls in the on blocks in full; with
    ``block=50`` and ``log_every_n_steps=50``, every on block holds one logging step.
    ``setup``, ``teardown``, ``on_exception`` and the fit-level hooks are always passed on.
    """

    def __init__(self, inner: pl.Callback, block: int) -> None:
        self.inner, self.block = inner, block
        self.on: list[float] = []
        self.off: list[float] = []
        self._active = True
        self._t0 = 0.0

    def setup(self, trainer, pl_module, stage):
        self.inner.setup(trainer, pl_module, stage)

    def teardown(self, trainer, pl_module, stage):
        self.inner.teardown(trainer, pl_module, stage)

    def on_fit_start(self, trainer, pl_module):
        self.inner.on_fit_start(trainer, pl_module)

    def on_train_start(self, trainer, pl_module):
        self.inner.on_train_start(trainer, pl_module)

    def on_fit_end(self, trainer, pl_module):
        self.inner.on_fit_end(trainer, pl_module)

    def on_exception(self, trainer, pl_module, exception):
        self.inner.on_exception(trainer, pl_module, exception)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        step = trainer.global_step
        self._active = step < self.block or (step // self.block) % 2 == 1
        self._t0 = time.perf_counter()
        if self._active:
            self.inner.on_train_batch_start(trainer, pl_module, batch, batch_idx)

    def on_before_backward(self, trainer, pl_module, loss):
        if self._active:
            self.inner.on_before_backward(trainer, pl_module, loss)

    def on_after_backward(self, trainer, pl_module):
        if self._active:
            self.inner.on_after_backward(trainer, pl_module)

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        if self._active:
            self.inner.on_before_optimizer_step(trainer, pl_module, optimizer)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if self._active:
            self.inner.on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        seconds = time.perf_counter() - self._t0
        step = trainer.global_step - 1  # the step that just ran
        if step >= self.block:
            (self.on if self._active else self.off).append(seconds)

    def ratio(self) -> float:
        """Mean step time on over mean step time off (the amortized cost of the inner callback)."""
        return statistics.fmean(self.on) / statistics.fmean(self.off)


def quiet_lightning() -> None:
    """Silence Lightning's info messages (GPU available, tips, fit stopped) and warnings, for readable tables.

    With both ``lightning`` and ``pytorch_lightning`` installed the Trainer's messages go to ``lightning.pytorch``,
    whose level is set on import: every such logger is set, not only the parents.
    """
    warnings.filterwarnings("ignore")
    with contextlib.suppress(ImportError):  # its import sets its loggers' levels: import it first, so ours win
        import lightning.pytorch  # noqa: F401
    for name in ("pytorch_lightning", "lightning_fabric", "lightning", "lightning.pytorch", "lightning.fabric"):
        logging.getLogger(name).setLevel(logging.ERROR)
    for name in list(logging.root.manager.loggerDict):
        if name.startswith(("pytorch_lightning", "lightning_fabric", "lightning")):
            logging.getLogger(name).setLevel(logging.ERROR)


def median(xs: list[float]) -> float:
    return statistics.median(xs)


def markdown_table(header: list[str], rows: list[list[Any]]) -> str:
    def fmt(v: Any) -> str:
        return f"{v:.3f}" if isinstance(v, float) else str(v)

    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(fmt(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def save(name: str, table: str, data: dict[str, Any]) -> None:
    RESULTS.mkdir(exist_ok=True)
    meta = machine()
    header = (
        f"# {name}\n\n{meta['date']} · {meta['machine']} · torch {meta['torch']} · PL {meta['pytorch_lightning']}\n\n"
    )
    (RESULTS / f"{name}.md").write_text(header + table + "\n")
    (RESULTS / f"{name}.json").write_text(json.dumps({**meta, **data}, indent=2) + "\n")
