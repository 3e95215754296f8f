"""Shared pieces of the benchmarks: the machine/version header, step timing, result files."""

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
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch

RESULTS = Path(__file__).parent / "results"


def machine() -> dict[str, Any]:
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": f"{platform.machine()} {platform.processor() or ''} {os.cpu_count()} cpus".strip(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "pytorch_lightning": pl.__version__,
        "threads": torch.get_num_threads(),
    }


class StepTimer(pl.Callback):
    """Wall time of each training step, from on_train_batch_start to on_train_batch_end (callbacks included)."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self._t0 = 0.0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self._t0 = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.times.append(time.perf_counter() - self._t0)


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
