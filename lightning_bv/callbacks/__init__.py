"""Lightning callbacks: thin wrappers that own hooks and state and call the pure-torch core."""

from lightning_bv.callbacks.path_norm_regularization import PathNormRegularization

__all__ = ["PathNormRegularization"]
