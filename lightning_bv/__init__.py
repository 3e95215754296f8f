"""lightning_bv: train ReLU networks in the function space of R-BV^2 (Parhi & Nowak, 2022) with PyTorch Lightning."""

from lightning_bv._select import TargetsMatchNothingError
from lightning_bv.functional import (
    NonFiniteWeightsError,
    add_rbv_grad_,
    add_weight_decay_grad_,
    balance_,
    effective_rank,
    group_norms,
    neuron_scores,
    neuron_weight_decay,
    prox_,
    rbv_norm,
    stable_rank,
)
from lightning_bv.functional.path_norm import path_norm
from lightning_bv.modules import RBVBlock, RBVNet
from lightning_bv.neurons import NeuronGroup, NeuronGroups, Slot, find_neurons
from lightning_bv.transforms import (
    AffineSkip,
    CompactionReport,
    GroupCompaction,
    LowRankWeight,
    add_skip,
    apply_low_rank,
    compact,
    factorize,
    is_low_rank,
    is_skip,
    low_rank_factors,
    low_rank_live_components,
    low_rank_rank,
    remove_low_rank,
    remove_skip,
    resize_to_state_dict_,
    slice_optimizer_state_,
)

__version__ = "0.1.0"

__all__ = [
    "effective_rank",
    "stable_rank",
    "AffineSkip",
    "CompactionReport",
    "GroupCompaction",
    "LowRankWeight",
    "NeuronGroup",
    "NeuronGroups",
    "NonFiniteWeightsError",
    "RBVBlock",
    "RBVNet",
    "Slot",
    "TargetsMatchNothingError",
    "add_rbv_grad_",
    "add_skip",
    "add_weight_decay_grad_",
    "apply_low_rank",
    "balance_",
    "compact",
    "factorize",
    "find_neurons",
    "group_norms",
    "is_low_rank",
    "is_skip",
    "low_rank_factors",
    "low_rank_live_components",
    "low_rank_rank",
    "neuron_scores",
    "neuron_weight_decay",
    "path_norm",
    "prox_",
    "rbv_norm",
    "remove_low_rank",
    "remove_skip",
    "resize_to_state_dict_",
    "slice_optimizer_state_",
]
