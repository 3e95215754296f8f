"""Torch modules and LightningModules: the RBVNet architecture of the representer theorem, BVModule and data.

``RBVNet`` and ``RBVBlock`` are plain torch; ``BVModule`` and the datamodules import Lightning (and scikit-learn) on
first use only, so that ``import lightning_bv`` stays free of both.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from lightning_bv.modules.rbvnet import RBVBlock, RBVNet

if TYPE_CHECKING:
    from lightning_bv.modules.bv_module import BVModule
    from lightning_bv.modules.data import DiabetesData, DigitsData, SplineData

_LAZY = {
    "BVModule": "lightning_bv.modules.bv_module",
    "DiabetesData": "lightning_bv.modules.data",
    "DigitsData": "lightning_bv.modules.data",
    "SplineData": "lightning_bv.modules.data",
}

__all__ = ["BVModule", "DiabetesData", "DigitsData", "RBVBlock", "RBVNet", "SplineData"]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
