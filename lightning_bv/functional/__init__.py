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
    project_,
    prox_,
    proximal_step_,
    rbv_norm,
)
from lightning_bv.functional.spectral import Spectrum, effective_rank, singular_values, spectrum, stable_rank
from lightning_bv.functional.thresholds import prox_thresholds

__all__ = [
    "Spectrum",
    "effective_rank",
    "singular_values",
    "spectrum",
    "stable_rank",
    "NonFiniteWeightsError",
    "add_rbv_grad_",
    "add_weight_decay_grad_",
    "balance_",
    "group_norms",
    "neuron_scores",
    "neuron_weight_decay",
    "path_norm",
    "project_",
    "prox_",
    "prox_thresholds",
    "proximal_step_",
    "rbv_norm",
]
