"""The ``lightning-bv`` console script: Lightning's ``LightningCLI`` with a built-in default run and a final report.

``lightning-bv fit`` with no ``--config`` trains the built-in default (:data:`DEFAULT_CONFIG`, the packaged file
``lightning_bv/cli/default.yaml``; ``lightning-bv fit --print_config`` prints it): an :class:`~lightning_bv.RBVNet`
on :class:`~lightning_bv.modules.DigitsData` with ``LowRank``, ``SkipConnections``, ``RBVRegularization``
(prox), ``BVMonitor`` and ``NeuronPruning``. Flags change it (``--trainer.max_epochs=5``); a ``--config`` file
replaces it entirely. Every part is a ``class_path``/``init_args`` entry, so any callback, logger, model or datamodule
can be set from YAML or flags::

    lightning-bv fit
    lightning-bv fit --lam=0.01 --mode=penalty --rank=8   # the default run's main knobs (KNOBS)
    lightning-bv fit --trainer.max_epochs=5 --trainer.logger=WandbLogger
    lightning-bv fit --config examples/configs/spline.yaml
    lightning-bv fit --trainer.callbacks+=LowRank --trainer.callbacks.rank=8 ...
    lightning-bv fit --print_config > my.yaml

After ``fit`` it compacts the model (:func:`lightning_bv.transforms.compact.compact`; nothing changes when
``NeuronPruning`` already did), runs ``test``, prints a table (test metric; neurons, ranks and parameters of the
initial, trained and compacted model; l1/l2 path-norms) and writes into the run folder (the logger's ``log_dir``, the
W&B run's files folder, or ``default_root_dir`` without a logger): ``config.yaml`` (``lightning_config.yaml`` in a
W&B run folder, where W&B writes its own ``config.yaml``), ``summary.txt``, ``summary.json``, ``model_state_dict.pt``
(the compacted LightningModule's state_dict) and plots (``neurons.png``, ``singular_values.png``, ``function.png`` for
1-D models). With a ``WandbLogger`` and no W&B account configured (no ``WANDB_API_KEY``, no ``wandb login``),
``WANDB_MODE=offline`` is set: the run is saved locally.

``--lam`` and ``--mode`` set those arguments of the run's one ``RBVRegularization``, ``--rank`` of its one
``LowRank`` (with any ``--config``). Bad input (an unknown argument, a misspelled class name, which gets the closest
known name, a missing config file, a bad value, a ``targets`` that matches nothing, a second callback Lightning cannot
checkpoint next to the first) prints one paragraph naming every problem found and exits with code 2;
``LIGHTNING_BV_DEBUG=1`` shows the traceback instead.
"""

from lightning_bv.cli.app import BVLightningCLI, main, wandb_offline_without_account
from lightning_bv.cli.config import DEFAULT_CONFIG, KNOBS, SUBCOMMANDS, set_knobs, with_default_config
from lightning_bv.cli.errors import DEBUG_ENV, error_message, is_user_error, one_paragraph
from lightning_bv.cli.figures import plot_function, plot_neurons, plot_spectra
from lightning_bv.cli.folder import SaveConfigToRunFolder, config_filename, is_wandb, run_folder
from lightning_bv.cli.report import COLUMNS, save_json, table, to_wandb, write_report
from lightning_bv.cli.snapshots import (
    Snapshot,
    canonical_names,
    example_input,
    metric_on_test_split,
    small_batch,
    snapshot,
)

__all__ = [
    "BVLightningCLI",
    "COLUMNS",
    "DEBUG_ENV",
    "DEFAULT_CONFIG",
    "KNOBS",
    "SUBCOMMANDS",
    "SaveConfigToRunFolder",
    "Snapshot",
    "canonical_names",
    "config_filename",
    "error_message",
    "example_input",
    "is_user_error",
    "is_wandb",
    "main",
    "metric_on_test_split",
    "one_paragraph",
    "plot_function",
    "plot_neurons",
    "plot_spectra",
    "run_folder",
    "save_json",
    "set_knobs",
    "small_batch",
    "snapshot",
    "table",
    "to_wandb",
    "wandb_offline_without_account",
    "with_default_config",
    "write_report",
]
