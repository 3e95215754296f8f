"""lightning_bv: train ReLU networks in the function space of R-BV^2 (Parhi & Nowak, 2022) with PyTorch Lightning."""

from lightning_bv._select import TargetsMatchNothingError
from lightning_bv.functional import (
    add_rbv_grad_,
    add_weight_decay_grad_,
    balance_,
    group_norms,
    neuron_scores,
    neuron_weight_decay,
    prox_,
    rbv_norm,
)
from lightning_bv.neurons import NeuronGroup, NeuronGroups, Slot, find_neurons

__version__ = "0.1.0"

__all__ = [
    "NeuronGroup",
    "NeuronGroups",
    "Slot",
    "TargetsMatchNothingError",
    "add_rbv_grad_",
    "add_weight_decay_grad_",
    "balance_",
    "find_neurons",
    "group_norms",
    "neuron_scores",
    "neuron_weight_decay",
    "prox_",
    "rbv_norm",
]
