"""The callback that ``lightning-bv fit`` puts first in the Trainer to snapshot the model as built and as trained.

Private (a module name with ``_``, not exported): jsonargparse does not list it among the callbacks
``--trainer.callbacks`` accepts, since the CLI adds it itself.
"""

from __future__ import annotations

import pytorch_lightning as pl
from typing_extensions import override

from lightning_bv.callbacks._base import CallbackBase
from lightning_bv.cli.snapshots import Snapshot, example_input, metric_on_test_split, snapshot


class RunSummary(CallbackBase):
    """Snapshot the model at ``setup("fit")`` (put it first: the model is as built) and at ``on_train_end``.

    ``on_train_end`` runs before ``on_fit_end``, where :class:`~lightning_bv.callbacks.NeuronPruning` compacts.
    """

    def __init__(self) -> None:
        self.initial: Snapshot | None = None
        self.trained: Snapshot | None = None

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit" and self.initial is None:
            dm = getattr(trainer, "datamodule", None)
            self.initial = snapshot(pl_module, example_input(pl_module, dm), metric_on_test_split(pl_module, dm))

    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        dm = getattr(trainer, "datamodule", None)
        self.trained = snapshot(pl_module, example_input(pl_module, dm), metric_on_test_split(pl_module, dm))
