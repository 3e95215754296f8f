"""Where a ``lightning-bv`` run's files go, and the ``config.yaml`` written there.

The run folder is the W&B run's files folder with a ``WandbLogger``, else the Trainer's ``log_dir`` (a new version
folder per run with TensorBoard or CSV), else ``default_root_dir`` without a logger.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, cast

import pytorch_lightning as pl
from pytorch_lightning.cli import SaveConfigCallback
from typing_extensions import override


def is_wandb(logger: Any) -> bool:
    """Whether ``logger`` is a ``WandbLogger`` (of ``pytorch_lightning`` or ``lightning.pytorch``), by class name."""
    return any(c.__name__ == "WandbLogger" for c in type(logger).__mro__)


def run_folder(trainer: pl.Trainer) -> Path:
    """Where a run's files go: a W&B run's files folder, else the Trainer's ``log_dir``, else ``default_root_dir``.

    Call it on every process: ``trainer.log_dir`` is a collective under DDP (rank 0's value is broadcast). Only rank 0
    starts the W&B run, if there is one; the others get the ``log_dir``.
    """
    folder = Path(trainer.log_dir or trainer.default_root_dir)
    if trainer.is_global_zero:
        for logger in trainer.loggers:
            if is_wandb(logger):
                wandb_dir = getattr(cast(Any, logger).experiment, "dir", None)
                if isinstance(wandb_dir, str):
                    return Path(wandb_dir)
    return folder


def config_filename(trainer: pl.Trainer, default: str = "config.yaml") -> str:
    """``default``, or ``lightning_config.yaml`` in a W&B run folder (W&B writes its own ``config.yaml`` there)."""
    return "lightning_config.yaml" if any(is_wandb(lg) for lg in trainer.loggers) else default


class SaveConfigToRunFolder(SaveConfigCallback):
    """Lightning's ``SaveConfigCallback``, writing ``config.yaml`` into :func:`run_folder` (rank 0 only).

    Every run gets its own folder with a logger (TensorBoard/CSV versions, W&B runs); without a logger the folder is
    ``default_root_dir`` and an earlier ``config.yaml`` there is replaced. In a W&B run folder the file is
    ``lightning_config.yaml``.
    """

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if self.already_saved:
            return
        folder = run_folder(trainer)
        if trainer.is_global_zero:
            folder.mkdir(parents=True, exist_ok=True)
            path = folder / config_filename(trainer, self.config_filename)
            self.parser.save(self.config, str(path), overwrite=True, multifile=self.multifile)
        self.already_saved = True
