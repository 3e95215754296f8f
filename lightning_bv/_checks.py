"""One validator per kind of argument, shared by the functions and the callbacks (pure Python and torch).

Each raises before anything changes, naming the argument, the value and what is allowed; each returns the value in
the type the caller computes with.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Sequence
from typing import Any

from torch import Tensor


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


def check_tol(tol: object) -> float:
    """``tol``, the score at or below which a neuron is dead: a finite float >= 0."""
    if isinstance(tol, bool) or not isinstance(tol, numbers.Real) or not math.isfinite(tol) or tol < 0:
        raise ValueError(f"`tol` must be a finite float >= 0 (neurons with score <= tol are removed), got {tol!r}")
    return float(tol)


def check_choice(arg: str, value: Any, allowed: Sequence[Any], meaning: str = "") -> Any:
    """``value`` of argument ``arg`` must be one of ``allowed``; ``meaning`` says what the choice is about."""
    if value not in allowed:
        why = f" ({meaning})" if meaning else ""
        raise ValueError(f"`{arg}` must be one of {tuple(allowed)}{why}, got {value!r}")
    return value
