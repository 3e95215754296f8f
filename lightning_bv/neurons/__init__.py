"""Neuron groups: which weights belong to which ReLU neuron, found in any ``nn.Module``.

A :class:`NeuronGroup` is one set of neurons z -> s(W z - b) read by some consumers (docs/theory.md section 1). It
records *slots*: where each neuron's input weights ``w_k`` (rows of the producer, or the BatchNorm gamma), its bias
and its output weights ``v_k`` (columns of every consumer) live. Slots hold the modules themselves and read
``module.weight`` at call time, so a group stays valid after a low-rank parametrization and under DDP.

:func:`find_neurons` runs the model once and reads the real dataflow (see :mod:`lightning_bv._trace`).
"""

from lightning_bv._layers import is_null_space, low_rank_factors
from lightning_bv.neurons.discovery import _buffers_restored as _buffers_restored  # used by the callbacks
from lightning_bv.neurons.discovery import analyze, find_neurons, own_factors, shared_weights
from lightning_bv.neurons.group import NeuronGroup, NeuronGroups
from lightning_bv.neurons.slot import GroupedSlot, Slot, is_conv1d

__all__ = [
    "GroupedSlot",
    "NeuronGroup",
    "NeuronGroups",
    "Slot",
    "analyze",
    "find_neurons",
    "is_conv1d",
    "is_null_space",
    "low_rank_factors",
    "own_factors",
    "shared_weights",
]
