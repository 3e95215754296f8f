"""Torch modules and LightningModules: the RBVNet architecture of the representer theorem."""

from lightning_bv.modules.rbvnet import RBVBlock, RBVNet

__all__ = ["RBVBlock", "RBVNet"]
