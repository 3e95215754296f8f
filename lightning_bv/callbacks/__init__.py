"""Lightning callbacks: thin wrappers that own hooks and state and call the pure-torch core."""

from lightning_bv.callbacks.bv_monitor import BVMonitor
from lightning_bv.callbacks.low_rank import LowRank
from lightning_bv.callbacks.neuron_pruning import NeuronPruning
from lightning_bv.callbacks.path_norm_regularization import PathNormRegularization
from lightning_bv.callbacks.rbv_regularization import RBVRegularization
from lightning_bv.callbacks.skip_connections import SkipConnections

__all__ = ["BVMonitor", "LowRank", "NeuronPruning", "PathNormRegularization", "RBVRegularization", "SkipConnections"]
