"""The former name of :class:`~lightning_bv.callbacks.RBVRegularization`, kept working with a ``FutureWarning``."""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

from torch import Tensor

from lightning_bv._select import Targets
from lightning_bv.callbacks.rbv_regularization import RBVRegularization


class PathNormRegularization(RBVRegularization):
    """Deprecated name of :class:`~lightning_bv.callbacks.RBVRegularization`: it regularizes ``rbv_norm``.

    Behaves exactly as :class:`~lightning_bv.callbacks.RBVRegularization` (same arguments, same checkpoint state
    under the same ``state_key``: checkpoints saved under either name resume under the other) and warns with a
    ``FutureWarning`` when constructed.

    Example:
        >>> import warnings
        >>> with warnings.catch_warnings(record=True) as caught:
        ...     warnings.simplefilter("always")
        ...     cb = PathNormRegularization(lam=1e-3)
        >>> isinstance(cb, RBVRegularization), caught[0].category.__name__
        (True, 'FutureWarning')
    """

    def __init__(
        self,
        lam: float | Callable[[int], float],
        q: int = 2,
        mode: str = "prox",
        targets: Targets = None,
        exclude: Targets = None,
        every_n_steps: int | None = None,
        example_input: Tensor | tuple[Any, ...] | None = None,
        log_every_n_steps: int | None = None,
        on_nonfinite: str = "raise",
        lift_shared: bool | None = None,
    ) -> None:
        warnings.warn(
            "`PathNormRegularization` is renamed `RBVRegularization` (it regularizes `rbv_norm`, not `path_norm`); "
            "the old name will be removed in a future release. Use `lightning_bv.callbacks.RBVRegularization`, "
            "which takes the same arguments and resumes from the same checkpoints.",
            FutureWarning,
            stacklevel=2,
        )
        super().__init__(
            lam,
            q=q,
            mode=mode,
            targets=targets,
            exclude=exclude,
            every_n_steps=every_n_steps,
            example_input=example_input,
            log_every_n_steps=log_every_n_steps,
            on_nonfinite=on_nonfinite,
            lift_shared=lift_shared,
        )
