"""One rule for picking modules by name (STYLE.md point 5).

A ``str`` target is a regular expression matched against the *full* module name (``re.fullmatch``); a list or
tuple of strings matches a name exactly or as a dotted suffix (``"fc1"`` matches ``"net.fc1"``). ``exclude``
follows the same rule and always wins. A target that matches nothing raises :class:`TargetsMatchNothingError`, which
lists what was available.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from typing import Union

from torch import nn

Targets = Union[str, Sequence[str], None]


class TargetsMatchNothingError(ValueError):
    """Raised when ``targets`` (or one entry of a list of targets) matches no module."""


def _check_targets(arg: str, value: Targets) -> None:
    if value is None or isinstance(value, str):
        if isinstance(value, str):
            try:
                re.compile(value)
            except re.error as err:
                raise ValueError(f"`{arg}`={value!r} is not a valid regular expression: {err}") from err
        return
    if isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
        return
    raise TypeError(f"`{arg}` must be None, a regex string or a list of module names, got {value!r}")


def _matches(name: str, rule: str | Sequence[str]) -> bool:
    if isinstance(rule, str):
        return re.fullmatch(rule, name) is not None
    return any(name == r or name.endswith("." + r) for r in rule)


def select_names(
    names: Iterable[str], targets: Targets = None, exclude: Targets = None, *, arg: str = "targets"
) -> list[str]:
    r"""Return the names picked by ``targets`` minus ``exclude``, in the order given.

    ``targets=None`` picks every name. Raises :class:`TargetsMatchNothingError` when ``targets`` (or any entry of a
    list) matches nothing among ``names``.

    Example:
        >>> select_names(["net.0", "net.2", "head"], ["head", "2"])
        ['net.2', 'head']
        >>> select_names(["net.0", "net.2", "head"], r"net\.\d", exclude=["net.0"])
        ['net.2']

    """
    _check_targets(arg, targets)
    _check_targets("exclude", exclude)
    names = list(names)
    if targets is None:
        picked = list(names)
    else:
        picked = [n for n in names if _matches(n, targets)]
        missing: list[str] = []
        if isinstance(targets, str):
            if not picked:
                missing = [targets]
        else:
            missing = [t for t in targets if not any(_matches(n, [t]) for n in names)]
        if missing:
            shown = ", ".join(repr(n) for n in names[:40]) + (", ..." if len(names) > 40 else "")
            raise TargetsMatchNothingError(
                f"`{arg}`={targets!r}: {', '.join(repr(m) for m in missing)} matched no module. "
                f"A str is a regex on the full module name, a list matches exactly or by '.suffix'. "
                f"Available: [{shown}]"
            )
    if exclude is not None:
        picked = [n for n in picked if not _matches(n, exclude)]
    return picked


def named_modules(model: nn.Module) -> dict[str, nn.Module]:
    """``model.named_modules()`` without the internals of torch parametrizations (``*.parametrizations.*``)."""
    return {n: m for n, m in model.named_modules() if "parametrizations" not in n.split(".")}


def show(name: str) -> str:
    """A module name for messages (``<root>`` for the model itself)."""
    return repr(name) if name else "<root>"
