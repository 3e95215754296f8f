"""Bad input to ``lightning-bv`` as one paragraph: what was wrong, the closest known name, the accepted arguments.

An unknown argument, a misspelled class name, a missing config file, a bad value, a ``targets`` that matches nothing
or a second callback Lightning cannot checkpoint next to the first is a *user error* (:func:`is_user_error`):
:func:`error_message` turns it into one line naming every problem found, printed instead of the traceback
(``LIGHTNING_BV_DEBUG=1``, :data:`DEBUG_ENV`, shows the traceback instead).
"""

from __future__ import annotations

import ast
import difflib
import importlib
import inspect
import re
from typing import Any

from lightning_bv.cli.config import KNOBS, SUBCOMMANDS

DEBUG_ENV = "LIGHTNING_BV_DEBUG"

_GENERIC = ("Not a valid subclass", "Expected a <class 'NoneType'>", "a class path", "a dict ", "Problem with given")


def is_user_error(err: BaseException) -> bool:
    """Whether ``err`` comes from the command line or the config (then it is shown as one paragraph)."""
    names = {c.__name__ for c in type(err).__mro__}
    if "RuntimeError" in names and "more than one stateful callback" in str(err):
        return True  # two callbacks of one class with the same state_key (Trainer's check)
    return bool(names & {"ArgumentError", "ValueError", "TypeError", "MisconfigurationException", "FileNotFoundError"})


def error_message(err: BaseException, argv: list[str]) -> str:
    """The line ``lightning-bv`` prints for a user error ``err`` of the command line ``argv``.

    Example:
        >>> error_message(ValueError("`rank` must be an int >= 1, got 0"), ["fit"])  # doctest: +NORMALIZE_WHITESPACE
        'lightning-bv: error (ValueError): `rank` must be an int >= 1, got 0. See `lightning-bv fit --help` for the
        arguments; set LIGHTNING_BV_DEBUG=1 for the traceback.'
    """
    subcommand = argv[0] if argv and argv[0] in SUBCOMMANDS else "fit"
    message = one_paragraph(err)
    message += "" if message.endswith((".", "!", "?")) else "."
    return (
        f"lightning-bv: error ({type(err).__name__}): {message} See `lightning-bv {subcommand} --help` for the "
        f"arguments; set {DEBUG_ENV}=1 for the traceback."
    )


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


def _accepted_args(class_path: str) -> str:
    """The ``__init__`` arguments of the class at ``class_path``, comma-separated ("" when it cannot be imported)."""
    module, _, name = class_path.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module), name)
        params = inspect.signature(cls.__init__).parameters
    except (ImportError, AttributeError, TypeError, ValueError):
        return ""
    return ", ".join(p for p in params if p not in ("self", "args", "kwargs"))


def _known_classes() -> list[str]:
    """Short class names the CLI resolves: lightning_bv's callbacks and modules, Lightning's callbacks and loggers."""
    import pytorch_lightning.callbacks as pl_callbacks
    import pytorch_lightning.loggers as pl_loggers

    import lightning_bv.callbacks as bv_callbacks
    import lightning_bv.modules as bv_modules

    names = [*bv_callbacks.__all__, *bv_modules.__all__, *pl_callbacks.__all__, *pl_loggers.__all__]
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
