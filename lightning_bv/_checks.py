"""One validator per kind of argument, shared by the functions and the callbacks (pure Python and torch).

Each raises before anything changes, naming the argument, the value and what is allowed; each returns the value in
the type the caller computes with.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, TypeVar

import torch
from torch import Tensor, nn

T = TypeVar("T")


def check_q(q: object) -> int:
    """``q``, the norm on each neuron's output weights: 1 or 2."""
    if q not in (1, 2) or isinstance(q, bool):
        raise ValueError(f"`q` must be 1 or 2 (the norm on each neuron's output weights), got {q!r}")
    return int(q)  # type: ignore[call-overload]


def check_lam(lam: object) -> float:
    """``lam``, the regularization strength: a finite number (or 0-dim tensor) >= 0."""
    if isinstance(lam, bool) or not isinstance(lam, (numbers.Real, Tensor)) or isinstance(lam, Tensor) and lam.dim():
        raise TypeError(f"`lam` must be a number (the regularization strength), got {type(lam).__name__}")
    if not math.isfinite(float(lam)) or float(lam) < 0:
        raise ValueError(f"`lam` must be a finite value >= 0, got {lam!r}")
    return float(lam)


def check_lam_schedule(lam: object) -> float | Callable[[int], float]:
    """``lam`` of a callback: a finite float >= 0, or a callable of the global step (checked when called)."""
    if callable(lam):
        return lam  # type: ignore[no-any-return]
    if isinstance(lam, bool) or not isinstance(lam, (int, float)) or not math.isfinite(lam) or lam < 0:
        raise ValueError(f"`lam` must be a finite float >= 0 or a callable of the global step, got {lam!r}")
    return lam


def check_scheduled_lam(lam: float, step: int) -> float:
    """The value a ``lam`` schedule returned at ``step``: a finite float >= 0."""
    if not math.isfinite(lam) or lam < 0:
        raise ValueError(f"`lam` returned {lam!r} at global step {step}; it must be a finite float >= 0")
    return lam


def check_nonnegative(arg: str, value: object, meaning: str = "") -> float:
    """``value`` of argument ``arg`` must be a finite real number >= 0 (not a bool); ``meaning`` says what it is."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value) or value < 0:
        why = f" ({meaning})" if meaning else ""
        raise ValueError(f"`{arg}` must be a finite float >= 0{why}, got {value!r}")
    return float(value)


def check_int(arg: str, value: object, low: int, context: str = "") -> int:
    """``value`` of argument ``arg`` must be an integer >= ``low`` (not a bool); ``context`` ends the requirement."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < low:
        raise ValueError(f"`{arg}` must be an int >= {low}{context}, got {value!r}")
    return int(value)


def check_tol(tol: object) -> float:
    """``tol``, the score at or below which a neuron is dead: a finite float >= 0."""
    return check_nonnegative("tol", tol, "neurons with score <= tol are removed")


def check_groups(groups: object, kind: type[T]) -> list[T]:
    """``groups``: one ``kind`` (a ``NeuronGroup``) or an iterable of them; returned as a list.

    The class comes from the caller, so that this module stays below ``lightning_bv.neurons``.
    """
    hint = f"a {kind.__name__} or an iterable of them (lightning_bv.find_neurons(model, example_input))"
    if isinstance(groups, kind):
        return [groups]
    if isinstance(groups, (nn.Module, str, Tensor)) or not isinstance(groups, Iterable):
        raise TypeError(f"`groups` must be {hint}, got {type(groups).__name__}")
    glist = list(groups)
    for g in glist:
        if not isinstance(g, kind):
            raise TypeError(f"`groups` must be {hint}, got an iterable holding a {type(g).__name__}")
    return glist


def check_tau(tau: object, sizes: Sequence[tuple[str, int]]) -> dict[str, float | Tensor]:
    """One threshold per group name: a number or 0-dim tensor for all, or a mapping name -> number or [K] tensor.

    ``sizes`` lists each group's name and number of neurons. Everything is checked before any group changes.
    """

    def check(t: object, where: str, k: int | None) -> float | Tensor:
        ok = isinstance(t, numbers.Real) and not isinstance(t, bool)
        if isinstance(t, Tensor):
            ok = (t.dim() == 0 or (k is not None and tuple(t.shape) == (k,))) and t.dtype.is_floating_point
        if not ok:
            shape = f" of shape {tuple(t.shape)} and dtype {t.dtype}" if isinstance(t, Tensor) else ""
            per = f" or a floating tensor of shape [{k}] (one per neuron)" if k is not None else ""
            raise TypeError(
                f"`tau` must be a number, a 0-dim tensor or a mapping from group name to a number{per}, got "
                f"{type(t).__name__}{shape}{where}"
            )
        if isinstance(t, Tensor) and t.dim() == 1:
            bad = ~torch.isfinite(t) | (t < 0)
            if bool(bad.any()):
                i = int(torch.nonzero(bad)[0])
                raise ValueError(
                    f"`tau` must be finite and >= 0 for every neuron, got {float(t[i])!r} at neuron {i}{where}"
                )
            return t
        if not math.isfinite(float(t)) or float(t) < 0:  # type: ignore[arg-type]
            raise ValueError(f"`tau` must be a finite value >= 0, got {t!r}{where}")
        return t  # type: ignore[return-value]

    names = [name for name, _ in sizes]
    if isinstance(tau, Mapping):
        missing = [n for n in names if n not in tau]
        if missing:
            raise ValueError(f"`tau` has no value for group(s) {missing}; it has {sorted(map(str, tau))}")
        return {name: check(tau[name], f" (group {name!r})", k) for name, k in sizes}
    value = check(tau, "", None)
    return dict.fromkeys(names, value)


def check_choice(arg: str, value: Any, allowed: Sequence[Any], meaning: str = "") -> Any:
    """``value`` of argument ``arg`` must be one of ``allowed``; ``meaning`` says what the choice is about."""
    if value not in allowed:
        why = f" ({meaning})" if meaning else ""
        raise ValueError(f"`{arg}` must be one of {tuple(allowed)}{why}, got {value!r}")
    return value
