"""The default run of ``lightning-bv``: its config (``default.yaml``, shipped in the package) and its knob flags.

``lightning-bv fit`` with no ``--config`` trains :data:`DEFAULT_CONFIG`; ``--lam``, ``--mode`` and ``--rank``
(:data:`KNOBS`) set those arguments of the run's one ``RBVRegularization`` or ``LowRank``, with any config.
"""

from __future__ import annotations

from importlib.resources import files
from typing import Any

SUBCOMMANDS = ("fit", "validate", "test", "predict")

DEFAULT_CONFIG: str = files("lightning_bv.cli").joinpath("default.yaml").read_text(encoding="utf-8")
"""The text of ``lightning_bv/cli/default.yaml``: the run ``lightning-bv fit`` trains without a ``--config``."""

# flag -> (the class name of the callback it sets, the type, what it is); the default run has one of each
KNOBS: dict[str, tuple[str, type, str]] = {
    "lam": ("RBVRegularization", float, "the regularization strength (the default run's: 0.003)"),
    "mode": ("RBVRegularization", str, "'prox', 'penalty' or 'weight_decay' (the default run's: prox)"),
    "rank": ("LowRank", int, "the rank of the low-rank layers (the default run's: 16)"),
}
_FORMER_NAMES = {"RBVRegularization": ("PathNormRegularization",)}  # a config that uses the deprecated name still works


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
        names = {cls_name, *_FORMER_NAMES.get(cls_name, ())}
        owners = [cb for cb in entries if str(getattr(cb, "class_path", "")).rpartition(".")[2] in names]
        if len(owners) != 1:
            raise ValueError(
                f"`--{flag}` sets `{flag}` of the run's {cls_name} in trainer.callbacks, but the run has "
                f"{len(owners)} of them: add one (--trainer.callbacks+={cls_name}) or, with several, set it on "
                f"each in a --config file"
            )
        owners[0].init_args[flag] = value
