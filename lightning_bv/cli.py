"""The ``lightning-bv`` console script: Lightning's ``LightningCLI`` with a built-in default run and a final report.

``lightning-bv fit`` with no ``--config`` trains the embedded default (:data:`DEFAULT_CONFIG`, the same as
``examples/configs/default.yaml``): an :class:`~lightning_bv.RBVNet` on :class:`~lightning_bv.modules.DigitsData` with
``LowRank``, ``SkipConnections``, ``PathNormRegularization`` (prox), ``BVMonitor`` and ``NeuronPruning``. Flags
change it (``--trainer.max_epochs=5``); a ``--config`` file replaces it entirely. Every part is a
``class_path``/``init_args`` entry, so any callback, logger, model or datamodule can be set from YAML or flags::

    lightning-bv fit
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

Bad input (an unknown argument, a missing config file, a bad value, a ``targets`` that matches nothing) prints one
paragraph and exits with code 2; ``LIGHTNING_BV_DEBUG=1`` shows the traceback instead.
"""

from __future__ import annotations

import importlib
import inspect
import netrc
import os
import re
import sys
import warnings
from pathlib import Path
from typing import Any, cast
from urllib.parse import urlparse

import pytorch_lightning as pl
import torch
from pytorch_lightning.cli import LightningCLI, SaveConfigCallback
from typing_extensions import override

import lightning_bv.callbacks  # noqa: F401  (registers the callbacks for short names: --trainer.callbacks+=LowRank)
import lightning_bv.modules.data  # noqa: F401  (registers the datamodules for short names: --data=SplineData)
from lightning_bv import _summary
from lightning_bv.modules.bv_module import BVModule  # noqa: F401  (short name: --model=BVModule)
from lightning_bv.transforms.compact import compact

SUBCOMMANDS = ("fit", "validate", "test", "predict")
DEBUG_ENV = "LIGHTNING_BV_DEBUG"

DEFAULT_CONFIG = """\
# lightning-bv fit: the embedded default (lightning_bv/cli.py DEFAULT_CONFIG == examples/configs/default.yaml).
# A ReLU network of the representer theorem on scikit-learn's digits, trained in the function space of R-BV^2.
seed_everything: 0
trainer:
  max_epochs: 30
  log_every_n_steps: 10
  callbacks:
    # model surgery first (in setup, before the optimizer exists): the first block's input weights become
    # rank-16 products U @ V ...
    - class_path: lightning_bv.callbacks.LowRank
      init_args:
        rank: 16
        targets: [blocks.0.fc1]
    # ... and one affine skip x -> C x + c from the input to the logits, around the whole network. RBVNet already
    # has an affine skip around every block, but their composition passes through the 32-wide bottleneck; this one
    # is a full-rank linear model in the null space of the seminorm (zero at the start, never regularized).
    - class_path: lightning_bv.callbacks.SkipConnections
      init_args:
        targets: model
    # then the training: loss + lam * sum_k ||v_k|| ||w_k|| with the proximal step (exact zeros) ...
    - class_path: lightning_bv.callbacks.PathNormRegularization
      init_args:
        lam: 0.03
        mode: prox
    # ... what the function-space view says while it trains ...
    - class_path: lightning_bv.callbacks.BVMonitor
      init_args:
        every_n_steps: 50
        spectra_every_n_steps: 200
    # ... and at the end the dead neurons and rank components are cut out: a smaller model, the same function.
    - class_path: lightning_bv.callbacks.NeuronPruning
model:
  class_path: lightning_bv.modules.BVModule
  init_args:
    model:
      class_path: lightning_bv.RBVNet
      init_args:
        in_features: 64
        out_features: 10
        width: 128
        bottleneck: 32
        depth: 2
    task: classification
    optimizer: sgd
    lr: 0.05
data:
  class_path: lightning_bv.modules.DigitsData
  init_args:
    batch_size: 64
"""


def _is_wandb(logger: Any) -> bool:
    return any(c.__name__ == "WandbLogger" for c in type(logger).__mro__)


def run_folder(trainer: pl.Trainer) -> Path:
    """Where a run's files go: a W&B run's files folder, else the Trainer's ``log_dir``, else ``default_root_dir``.

    Call it on every process: ``trainer.log_dir`` is a collective under DDP (rank 0's value is broadcast). Only rank 0
    starts the W&B run, if there is one; the others get the ``log_dir``.
    """
    folder = Path(trainer.log_dir or trainer.default_root_dir)
    if trainer.is_global_zero:
        for logger in trainer.loggers:
            if _is_wandb(logger):
                wandb_dir = getattr(cast(Any, logger).experiment, "dir", None)
                if isinstance(wandb_dir, str):
                    return Path(wandb_dir)
    return folder


def config_filename(trainer: pl.Trainer, default: str = "config.yaml") -> str:
    """``default``, or ``lightning_config.yaml`` in a W&B run folder (W&B writes its own ``config.yaml`` there)."""
    return "lightning_config.yaml" if any(_is_wandb(lg) for lg in trainer.loggers) else default


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


class BVLightningCLI(LightningCLI):
    """``LightningCLI`` for any LightningModule and LightningDataModule (``class_path``), with the end-of-fit report."""

    def __init__(self, args: list[str] | None = None, run: bool = True) -> None:
        self.summary: _summary.RunSummary | None = None
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

    def before_fit(self) -> None:
        """Put the :class:`~lightning_bv._summary.RunSummary` callback first, to see the model as built."""
        self.summary = _summary.RunSummary()
        cast(Any, self.trainer).callbacks.insert(0, self.summary)

    def after_fit(self) -> None:
        """Compact, test, then (rank 0) print the table and write the files."""
        trainer, module, data = self.trainer, self.model, self.datamodule
        if trainer.interrupted or self.summary is None:
            return
        example = _summary.example_input(module, data)
        note = ""
        if example is not None:
            try:
                compact(module, example_input=_summary.small_batch(example))
            except (ValueError, TypeError, NotImplementedError) as err:
                note = f"compaction skipped: {err}"
        metric: dict[str, float] = {}
        if data is not None and _overrides(data, "test_dataloader") and _overrides(module, "test_step"):
            results = trainer.test(module, datamodule=data, verbose=False)
            metric = {k.removeprefix("test_"): float(v) for k, v in (results[0] if results else {}).items()}
        compacted = _summary.snapshot(module, example, metric)
        snaps = {"initial": self.summary.initial, "trained": self.summary.trained, "compacted": compacted}
        folder = run_folder(trainer)
        self.results = {"snapshots": snaps, "folder": folder}
        if trainer.is_global_zero:
            self._report(folder, snaps, note)

    def _report(self, folder: Path, snaps: dict[str, _summary.Snapshot | None], note: str) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        text = _summary.table(snaps)
        (folder / "summary.txt").write_text(text + "\n")
        _summary.save_json(snaps, folder / "summary.json", {"note": note} if note else None)
        torch.save(self.model.state_dict(), folder / "model_state_dict.pt")
        written = [config_filename(self.trainer), "summary.txt", "summary.json", "model_state_dict.pt"]
        try:
            _summary.plot_neurons(snaps, folder / "neurons.png")
            written.append("neurons.png")
            if _summary.plot_spectra(self.model, folder / "singular_values.png"):
                written.append("singular_values.png")
            if _summary.plot_function(self.model, self.datamodule, folder / "function.png"):
                written.append("function.png")
        except ImportError:
            note = (note + "; " if note else "") + "no plots: matplotlib is not installed"
        print(f"\nlightning-bv: results (run folder: {folder})\n{text}")
        if note:
            print(f"note: {note}")
        print(f"wrote: {', '.join(written)}")
        self._to_wandb(folder, written)

    def _to_wandb(self, folder: Path, written: list[str]) -> None:
        loggers: list[Any] = [lg for lg in self.trainer.loggers if _is_wandb(lg)]
        if not loggers:
            return
        import wandb

        images = {f"summary/{f[:-4]}": wandb.Image(str(folder / f)) for f in written if f.endswith(".png")}
        text = (folder / "summary.txt").read_text()
        for logger in loggers:
            logger.experiment.log({**images, "summary/table": wandb.Html(f"<pre>{text}</pre>")})
        if os.environ.get("WANDB_MODE") == "offline":
            print(f"W&B: offline run in {folder.parent} (upload it with `wandb sync {folder.parent}`)")


def _overrides(obj: Any, method: str) -> bool:
    owner = next((c for c in type(obj).__mro__ if method in vars(c)), None)
    return owner is not None and owner.__module__.split(".")[0] not in ("pytorch_lightning", "lightning")


def with_default_config(argv: list[str]) -> list[str]:
    """``argv`` with the embedded default config inserted after the subcommand, unless a ``--config`` is given.

    Example:
        >>> with_default_config(["fit", "--trainer.max_epochs=1"])[:2] == ["fit", "--config"]
        True
        >>> with_default_config(["fit", "--config", "my.yaml"])
        ['fit', '--config', 'my.yaml']
    """
    if not argv or argv[0] not in SUBCOMMANDS:
        return list(argv)
    if any(a in ("-c", "--config") or a.startswith("--config=") for a in argv):
        return list(argv)
    return [argv[0], "--config", DEFAULT_CONFIG, *argv[1:]]


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


def _accepted_args(class_path: str) -> str:
    """The ``__init__`` arguments of the class at ``class_path``, comma-separated ("" when it cannot be imported)."""
    module, _, name = class_path.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module), name)
        params = inspect.signature(cls.__init__).parameters
    except (ImportError, AttributeError, TypeError, ValueError):
        return ""
    return ", ".join(p for p in params if p not in ("self", "args", "kwargs"))


def one_paragraph(err: BaseException) -> str:
    r"""The error as one paragraph: for a rejected ``class_path``, the class, the problem and its accepted arguments.

    Example:
        >>> one_paragraph(ValueError("`rank` must be an int >= 1,\n  got 0"))
        '`rank` must be an int >= 1, got 0'
    """
    text = str(err)
    first = text.splitlines()[0].strip() if text.strip() else type(err).__name__
    head = first if first.startswith("Parser key") else ""
    problem = re.search(r"Problem with given class_path '([\w.]+)':\s*\n\s*(.+)", text)
    if problem is not None:
        class_path, what = problem.group(1), problem.group(2).strip()
        message = f"{head} {class_path}: {what}.".strip()
        accepted = _accepted_args(class_path) if "not accepted" in what else ""
        if accepted:
            message += f" {class_path.rpartition('.')[2]} accepts: {accepted}."
        return message
    items = [i.strip() for i in re.findall(r"^\s*- (.+)$", text, re.MULTILINE)]
    specific = [i for i in items if not i.startswith(_GENERIC)]
    if specific:  # a union of types (e.g. a list of callbacks) where one member's own error says what is wrong
        return f"{head} {specific[0]}".strip()
    return " ".join(text.split())


_GENERIC = ("Not a valid subclass", "Expected a <class 'NoneType'>", "a class path", "a dict ", "Problem with given")


def _is_user_error(err: BaseException) -> bool:
    names = {c.__name__ for c in type(err).__mro__}
    return bool(names & {"ArgumentError", "ValueError", "TypeError", "MisconfigurationException", "FileNotFoundError"})


def main(args: list[str] | None = None) -> None:
    """Run the ``lightning-bv`` console script (``args``: the command line without the program name)."""
    argv = with_default_config(list(sys.argv[1:] if args is None else args))
    wandb_offline_without_account()
    warnings.filterwarnings("ignore", message=r".*LightningCLI's args parameter is intended to run from within Python")
    try:
        BVLightningCLI(args=argv)
    except Exception as err:
        if os.environ.get(DEBUG_ENV) or not _is_user_error(err):
            raise
        kind = type(err).__name__
        subcommand = argv[0] if argv and argv[0] in SUBCOMMANDS else "fit"
        message = one_paragraph(err)
        message += "" if message.endswith((".", "!", "?")) else "."
        print(
            f"lightning-bv: error ({kind}): {message} See `lightning-bv {subcommand} --help` for the "
            f"arguments; set {DEBUG_ENV}=1 for the traceback.",
            file=sys.stderr,
        )
        sys.exit(2)


if __name__ == "__main__":
    main()
