"""The maths on tensors and neuron groups, in plain PyTorch (no Lightning import)."""

from lightning_bv.functional.path_norm import path_norm
from lightning_bv.functional.rbv import (
    NonFiniteWeightsError,
    add_rbv_grad_,
    add_weight_decay_grad_,
    balance_,
    group_norms,
    neuron_scores,
    neuron_weight_decay,
    prox_,
    rbv_norm,
)

__all__ = [
    "NonFiniteWeightsError",
    "add_rbv_grad_",
    "add_weight_decay_grad_",
    "balance_",
    "group_norms",
    "neuron_scores",
    "neuron_weight_decay",
    "path_norm",
    "prox_",
    "rbv_norm",
]
