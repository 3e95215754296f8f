"""Model surgery in plain PyTorch: low-rank weights, affine skip connections (and compaction)."""

from lightning_bv.transforms.compact import CompactionReport, GroupCompaction, compact
from lightning_bv.transforms.lift import LiftReport, is_lifted, lift_shared_weights
from lightning_bv.transforms.low_rank import (
    LowRankWeight,
    apply_low_rank,
    factorize,
    is_low_rank,
    low_rank_factors,
    low_rank_live_components,
    low_rank_rank,
    remove_low_rank,
)
from lightning_bv.transforms.resize import resize_to_state_dict_, slice_optimizer_state_
from lightning_bv.transforms.shrinkers import LayerShrinker, register_layer_shrinker
from lightning_bv.transforms.skip import AffineSkip, add_skip, affine_skip_for, is_skip, remove_skip

__all__ = [
    "AffineSkip",
    "CompactionReport",
    "GroupCompaction",
    "LayerShrinker",
    "LiftReport",
    "LowRankWeight",
    "add_skip",
    "affine_skip_for",
    "apply_low_rank",
    "compact",
    "factorize",
    "is_lifted",
    "is_low_rank",
    "is_skip",
    "lift_shared_weights",
    "low_rank_factors",
    "low_rank_live_components",
    "low_rank_rank",
    "register_layer_shrinker",
    "remove_low_rank",
    "remove_skip",
    "resize_to_state_dict_",
    "slice_optimizer_state_",
]
