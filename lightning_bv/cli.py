"""The ``lightning-bv`` console script: Lightning's ``LightningCLI`` with a built-in default run and a final report.

``lightning-bv fit`` with no ``--config`` trains the embedded default (:data:`DEFAULT_CONFIG`, the same as
``examples/configs/default.yaml``): an :class:`~lightning_bv.RBVNet` on :class:`~lightning_bv.modules.DigitsData` with
``LowRank``, ``SkipConnections``, ``PathNormRegularization`` (prox), ``BVMonitor`` and ``NeuronPruning``. Flags
change it (``--trainer.max_epochs=5``); a ``--config`` file replaces it entirely. Every part is a
``class_path``/``init_args`` entry, so any callback, logger, model or datamodule can be set from YAML or flags::

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

``--lam`` and ``--mode`` set those arguments of the run's one ``PathNormRegularization``, ``--rank`` of its one
``LowRank`` (with any ``--config``). Bad input (an unknown argument, a misspelled class name, which gets the closest
known name, a missing config file, a bad value, a ``targets`` that matches nothing, a second callback Lightning cannot
checkpoint next to the first) prints one paragraph naming every problem found and exits with code 2;
``LIGHTNING_BV_DEBUG=1`` shows the traceback instead.
"""

from __future__ import annotations

import ast
import difflib
import importlib
import inspect
import netrc
import os
import re
import sys
import warnings
from pathlib import Path
from typing import Any, Optional, cast
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
        lam: 0.003
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

    @override
    def add_arguments_to_parser(self, parser: Any) -> None:
        """The main knobs of the run as flags of their own: ``--lam``, ``--mode``, ``--rank`` (see :data:`KNOBS`)."""
        for flag, (cls_name, kind, what) in KNOBS.items():
            parser.add_argument(f"--{flag}", type=Optional[kind], default=None, help=f"{cls_name}'s `{flag}`: {what}")

    @override
    def before_instantiate_classes(self) -> None:
        """Give each knob flag that was set to the one callback of its class in ``trainer.callbacks``."""
        config = self.config[self.subcommand] if self.subcommand else self.config
        set_knobs(config)

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


# flag -> (the class name of the callback it sets, the type, what it is); the default run has one of each
KNOBS: dict[str, tuple[str, type, str]] = {
    "lam": ("PathNormRegularization", float, "the regularization strength (the default run's: 0.003)"),
    "mode": ("PathNormRegularization", str, "'prox', 'penalty' or 'weight_decay' (the default run's: prox)"),
    "rank": ("LowRank", int, "the rank of the low-rank layers (the default run's: 16)"),
}


def set_knobs(config: Any) -> None:
    """Write ``config.lam`` etc. (:data:`KNOBS`) into the ``init_args`` of the one callback of each flag's class.

    Raises:
        ValueError: a flag was set, but ``trainer.callbacks`` has no callback of its class, or several.
    """
    callbacks = config.get("trainer.callbacks") if "trainer" in config else None
    entries = callbacks if isinstance(callbacks, list) else [callbacks] if callbacks is not None else []
    for flag, (cls_name, _, _) in KNOBS.items():
        value = config.get(flag)
        if value is None:
            continue
        owners = [cb for cb in entries if str(getattr(cb, "class_path", "")).rpartition(".")[2] == cls_name]
        if len(owners) != 1:
            raise ValueError(
                f"`--{flag}` sets `{flag}` of the run's {cls_name} in trainer.callbacks, but the run has "
                f"{len(owners)} of them: add one (--trainer.callbacks+={cls_name}) or, with several, set it on "
                f"each in a --config file"
            )
        owners[0].init_args[flag] = value


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
    twice = re.search(r"Found more than one stateful callback of type `(\w+)`", text)
    if twice is not None:
        name = twice.group(1)
        return (
            f"trainer.callbacks has two {name} callbacks with the same state_key, which Lightning cannot checkpoint "
            f"side by side. The default run already has one {name}: change it with its flags "
            f"({', '.join(f'--{k}' for k, v in KNOBS.items() if v[0] == name) or 'or a --config file'}) instead of "
            f"adding another, or give the two different `targets`"
        )
    problem = re.search(r"Problem with given class_path '([\w.]+)':\s*\n\s*(.+)", text)
    if problem is not None:
        class_path, what = problem.group(1), problem.group(2).strip()
        message = f"{head} {class_path}: {what}.".strip()
        accepted = _accepted_args(class_path) if "not accepted" in what else ""
        if accepted:
            message += f" {class_path.rpartition('.')[2]} accepts: {accepted}."
        required = re.match(r"the following arguments are required: (.+)", what)
        if required is not None:
            missing = [a.strip() for a in required.group(1).split(",")]
            message += "".join(f" Also: {p}." for p in _other_problems(text, class_path, missing))
        return message
    unknown = re.search(r"Expected a path but (\S+) either not accessible or invalid|Import path (\S+) does", text)
    if unknown is not None:
        name = (unknown.group(1) or unknown.group(2)).strip("'\"")
        close = difflib.get_close_matches(name.rpartition(".")[2], _known_classes(), n=1, cutoff=0.6)
        suggestion = f" Did you mean {close[0]!r}?" if close else ""
        return f"{head} {name!r} is not a class lightning-bv knows (nor an import path).{suggestion}".strip()
    items = [i.strip() for i in re.findall(r"^\s*- (.+)$", text, re.MULTILINE)]
    specific = [i for i in items if not i.startswith(_GENERIC)]
    if specific:  # a union of types (e.g. a list of callbacks) where one member's own error says what is wrong
        return f"{head} {specific[0]}".strip()
    return " ".join(text.split())


def _known_classes() -> list[str]:
    """Short class names the CLI resolves: lightning_bv's callbacks and modules, Lightning's callbacks and loggers."""
    import pytorch_lightning.callbacks as pl_callbacks
    import pytorch_lightning.loggers as pl_loggers

    import lightning_bv.modules as bv_modules

    names = [*lightning_bv.callbacks.__all__, *bv_modules.__all__, *pl_callbacks.__all__, *pl_loggers.__all__]
    return sorted(set(names))


def _literal(node: ast.AST) -> Any:
    """The value of a ``repr`` made of ``Namespace(...)``, lists, tuples, dicts and constants (nothing is run)."""
    if isinstance(node, ast.Constant):
        return node.value
    if isinstance(node, (ast.List, ast.Tuple)):
        return [_literal(e) for e in node.elts]
    if isinstance(node, ast.Dict):
        return {_literal(k): _literal(v) for k, v in zip(node.keys, node.values) if k is not None}
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "Namespace":
        return {kw.arg: _literal(kw.value) for kw in node.keywords if kw.arg}
    raise ValueError("not a literal")


def _other_problems(text: str, class_path: str, missing: list[str]) -> list[str]:
    """The errors of the other arguments given to a lightning_bv class that also lacks required ones.

    jsonargparse stops at the missing argument; the class's own checks of the others would come only after it is
    given. They are run here, with a stand-in for each missing argument (0.0 for a float, 1 for an int).
    """
    if not class_path.startswith("lightning_bv."):
        return []
    given = re.search(r"Given value: (.+)$", text, re.MULTILINE)
    try:
        value = _literal(ast.parse(given.group(1).strip(), mode="eval").body) if given else None
        module, _, name = class_path.rpartition(".")
        cls = getattr(importlib.import_module(module), name)
        params = inspect.signature(cls.__init__).parameters
    except (SyntaxError, ValueError, ImportError, AttributeError, TypeError):
        return []
    entries = value if isinstance(value, list) else [value]
    problems = []
    for entry in entries:
        init_args = entry.get("init_args") if isinstance(entry, dict) else None
        if entry is None or entry.get("class_path") != class_path or not isinstance(init_args, dict):
            continue
        if any(init_args.get(m) is not None for m in missing):
            continue
        kwargs = dict(init_args)
        for m in missing:
            annotation = str(params[m].annotation) if m in params else ""
            kwargs[m] = 0.0 if "float" in annotation else 1 if "int" in annotation else None
        try:
            cls(**kwargs)
        except (ValueError, TypeError) as err:
            problems.append(" ".join(str(err).split()).rstrip("."))
    return problems


_GENERIC = ("Not a valid subclass", "Expected a <class 'NoneType'>", "a class path", "a dict ", "Problem with given")


def _is_user_error(err: BaseException) -> bool:
    names = {c.__name__ for c in type(err).__mro__}
    if "RuntimeError" in names and "more than one stateful callback" in str(err):
        return True  # two callbacks of one class with the same state_key (Trainer's check)
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
