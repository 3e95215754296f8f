"""A Callback base accepted by both ``pytorch_lightning.Trainer`` and ``lightning.pytorch.Trainer``."""

from __future__ import annotations

from typing import Any

import pytorch_lightning as pl

try:  # the unified package, when installed, has its own Callback class that its Trainer checks for
    import lightning.pytorch as _L

    _BASES: tuple[type, ...] = (pl.Callback, _L.Callback) if _L.Callback is not pl.Callback else (pl.Callback,)
except ImportError:  # pragma: no cover - depends on what is installed
    _BASES = (pl.Callback,)


class CallbackBase(*_BASES):  # type: ignore[misc]
    """Base of every lightning_bv callback."""


_SHARDED = ("FSDPStrategy", "DeepSpeedStrategy", "ModelParallelStrategy", "XLAFSDPStrategy")


def refuse_unsupported(trainer: Any, pl_module: Any, who: str) -> None:
    """Raise at ``setup`` for set-ups the callbacks do not support: manual optimization and sharded strategies."""
    strategy = type(trainer.strategy).__name__
    if any(cls.__name__ in _SHARDED for cls in type(trainer.strategy).__mro__):
        raise ValueError(
            f"{who} does not support the sharded strategy {strategy}: it reads and rescales whole weight rows and "
            f"columns, which are split across ranks there. Use strategy='ddp' (or 'ddp_spawn')."
        )
    if not getattr(pl_module, "automatic_optimization", True):
        raise ValueError(
            f"{who} does not support manual optimization (automatic_optimization=False): there is no optimizer step "
            f"hook to attach to. In your training_step, after each optimizer.step(), call "
            f"lightning_bv.prox_(groups, lam * lr) (or add_rbv_grad_(groups, lam) before it)."
        )
