"""``lightning-bv``'s ``LightningCLI`` subclass (:class:`BVLightningCLI`: the report after ``fit``) and :func:`main`.

:func:`main` is the console script: it adds the default config when no ``--config`` is given, sets
``WANDB_MODE=offline`` without a W&B account, and prints a user error as one line (exit code 2) instead of a traceback.
"""

from __future__ import annotations

import netrc
import os
import sys
import warnings
from typing import Any, Optional, cast
from urllib.parse import urlparse

import pytorch_lightning as pl
from pytorch_lightning.cli import LightningCLI
from typing_extensions import override

import lightning_bv.callbacks  # noqa: F401  (registers the callbacks for short names: --trainer.callbacks+=LowRank)
import lightning_bv.modules.data  # noqa: F401  (registers the datamodules for short names: --data=SplineData)
from lightning_bv.cli._run_summary import RunSummary
from lightning_bv.cli.config import KNOBS, set_knobs, with_default_config
from lightning_bv.cli.errors import DEBUG_ENV, error_message, is_user_error
from lightning_bv.cli.folder import SaveConfigToRunFolder, run_folder
from lightning_bv.cli.report import write_report
from lightning_bv.cli.snapshots import example_input, small_batch, snapshot
from lightning_bv.modules.bv_module import BVModule  # noqa: F401  (short name: --model=BVModule)
from lightning_bv.transforms.compact import compact


class BVLightningCLI(LightningCLI):
    """``LightningCLI`` for any LightningModule and LightningDataModule (``class_path``), with the end-of-fit report."""

    def __init__(self, args: list[str] | None = None, run: bool = True) -> None:
        self.summary: RunSummary | None = None
        self.results: dict[str, Any] = {}
        super().__init__(
            pl.LightningModule,
            pl.LightningDataModule,
            subclass_mode_model=True,
            subclass_mode_data=True,
            save_config_callback=SaveConfigToRunFolder,
            auto_configure_optimizers=False,
            parser_kwargs={"exit_on_error": False, "prog": "lightning-bv"},
            args=args,
            run=run,
        )

    @override
    def add_arguments_to_parser(self, parser: Any) -> None:
        """The main knobs of the run as flags of their own: ``--lam``, ``--mode``, ``--rank`` (see ``KNOBS``)."""
        for flag, (cls_name, kind, what) in KNOBS.items():
            parser.add_argument(f"--{flag}", type=Optional[kind], default=None, help=f"{cls_name}'s `{flag}`: {what}")

    @override
    def before_instantiate_classes(self) -> None:
        """Give each knob flag that was set to the one callback of its class in ``trainer.callbacks``."""
        config = self.config[self.subcommand] if self.subcommand else self.config
        set_knobs(config)

    def before_fit(self) -> None:
        """Put the :class:`~lightning_bv.cli._run_summary.RunSummary` callback first, to see the model as built."""
        self.summary = RunSummary()
        cast(Any, self.trainer).callbacks.insert(0, self.summary)

    def after_fit(self) -> None:
        """Compact, test, then (rank 0) print the table and write the files."""
        trainer, module, data = self.trainer, self.model, self.datamodule
        if trainer.interrupted or self.summary is None:
            return
        example = example_input(module, data)
        note = ""
        if example is not None:
            try:
                compact(module, example_input=small_batch(example))
            except (ValueError, TypeError, NotImplementedError) as err:
                note = f"compaction skipped: {err}"
        metric: dict[str, float] = {}
        if data is not None and _overrides(data, "test_dataloader") and _overrides(module, "test_step"):
            results = trainer.test(module, datamodule=data, verbose=False)
            metric = {k.removeprefix("test_"): float(v) for k, v in (results[0] if results else {}).items()}
        compacted = snapshot(module, example, metric)
        snaps = {"initial": self.summary.initial, "trained": self.summary.trained, "compacted": compacted}
        folder = run_folder(trainer)
        self.results = {"snapshots": snaps, "folder": folder}
        if trainer.is_global_zero:
            write_report(trainer, module, data, folder, snaps, note)


def _overrides(obj: Any, method: str) -> bool:
    owner = next((c for c in type(obj).__mro__ if method in vars(c)), None)
    return owner is not None and owner.__module__.split(".")[0] not in ("pytorch_lightning", "lightning")


def wandb_offline_without_account() -> bool:
    """Set ``WANDB_MODE=offline`` when no W&B account is configured; True when it did."""
    if os.environ.get("WANDB_MODE") or os.environ.get("WANDB_API_KEY"):
        return False
    host = urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).hostname or "api.wandb.ai"
    try:
        if netrc.netrc().authenticators(host):
            return False
    except (OSError, netrc.NetrcParseError):
        pass
    os.environ["WANDB_MODE"] = "offline"
    return True


def main(args: list[str] | None = None) -> None:
    """Run the ``lightning-bv`` console script (``args``: the command line without the program name)."""
    argv = with_default_config(list(sys.argv[1:] if args is None else args))
    wandb_offline_without_account()
    warnings.filterwarnings("ignore", message=r".*LightningCLI's args parameter is intended to run from within Python")
    try:
        BVLightningCLI(args=argv)
    except Exception as err:
        if os.environ.get(DEBUG_ENV) or not is_user_error(err):
            raise
        print(error_message(err, argv), file=sys.stderr)
        sys.exit(2)
