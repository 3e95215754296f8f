"""Snapshots of a model for the ``lightning-bv`` report: neurons, ranks, parameters, path-norms, a test metric.

A :class:`Snapshot` records, for one state of a model: its ReLU neurons (per group, and how many have a nonzero score),
the rank of every Linear/Conv layer (components of low-rank layers, ``min(out, in)`` for dense ones), the number of
parameters, the l1/l2 path-norms and a test metric. The CLI takes the snapshots of the initial model (before any
other callback changed it) and of the trained model (before any compaction) in a callback of its own, then of the
compacted one. Layer and group names are *canonical*: the ``.module`` level that a skip wrapper adds is left out, so
that a layer has the same name before and after :class:`~lightning_bv.callbacks.SkipConnections`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import pytorch_lightning as pl
import torch
from torch import Tensor, nn

from lightning_bv._layers import WEIGHTED, low_rank_factors
from lightning_bv.functional.path_norm import path_norm
from lightning_bv.functional.rbv import neuron_scores
from lightning_bv.neurons import find_neurons
from lightning_bv.transforms.skip import is_skip


def canonical_names(root: nn.Module) -> dict[int, str]:
    """``{id(module): name}`` with the ``module`` level of every skip wrapper left out (the wrapper keeps the name).

    Example:
        >>> from lightning_bv.transforms.skip import add_skip
        >>> net = add_skip(nn.Sequential(nn.Linear(2, 2), nn.ReLU()), ["0"])
        >>> names = canonical_names(net)
        >>> names[id(net[0].module)], names[id(net[0].skip)]
        ('0', '0.skip')
    """
    names: dict[int, str] = {}

    def walk(module: nn.Module, name: str) -> None:
        names.setdefault(id(module), name)
        for child_name, child in module.named_children():
            if child_name == "parametrizations":
                continue
            if is_skip(module) and child is getattr(module, "module", None):
                walk(child, name)
            else:
                walk(child, f"{name}.{child_name}" if name else child_name)

    walk(root, "")
    return names


@dataclass
class Snapshot:
    """One state of a model (see the module docstring). ``ranks`` maps a layer to ``[rank, live components]``."""

    groups: dict[str, list[int]] = field(default_factory=dict)  # group -> [neurons, live neurons]
    ranks: dict[str, list[int]] = field(default_factory=dict)
    low_rank: list[str] = field(default_factory=list)
    params: int = 0
    path_norm_l1: float | None = None
    path_norm_l2: float | None = None
    metric: dict[str, float] = field(default_factory=dict)
    scores: dict[str, list[float]] = field(default_factory=dict, repr=False)

    @property
    def neurons(self) -> int:
        """ReLU neurons of all groups."""
        return sum(n for n, _ in self.groups.values())

    @property
    def live(self) -> int:
        """ReLU neurons with a nonzero score."""
        return sum(a for _, a in self.groups.values())


def small_batch(example: Any, n: int = 2) -> Any:
    """The first ``n`` samples of a batch (a tensor, or a tuple of positional inputs whose tensors are sliced).

    Two, not one: a BatchNorm layer in training mode refuses a batch of one.
    """
    if isinstance(example, tuple):
        return tuple(t[:n] if isinstance(t, Tensor) else t for t in example)
    return example[:n]


@torch.no_grad()
def snapshot(module: nn.Module, example: Any, metric: dict[str, float] | None = None) -> Snapshot:
    """Measure ``module`` (see :class:`Snapshot`); ``example`` is an input batch of it (None: no neurons, no norms)."""
    names = canonical_names(module)
    snap = Snapshot(params=sum(p.numel() for p in module.parameters()), metric=dict(metric or {}))
    for name, layer in module.named_modules():
        if not isinstance(layer, WEIGHTED) or "parametrizations" in name.split("."):
            continue
        factors = low_rank_factors(layer)
        key = names[id(layer)]
        if factors is not None:
            u, v = (f.detach() for f in factors)
            live = int(((u * u).sum(0).sqrt() * (v * v).sum(1).sqrt() > 0).sum())
            snap.ranks[key] = [int(u.shape[1]), live]
            snap.low_rank.append(key)
        else:  # a dense layer: its maximal rank (a numerical rank would cost a decomposition per layer)
            shape = layer.weight.shape
            full = min(shape[0], math.prod(shape[1:]))
            snap.ranks[key] = [full, full]
    if example is None:
        return snap
    example = small_batch(example)
    groups = find_neurons(module, example)
    scores = neuron_scores(groups)
    for g in groups:
        if g.activation == "identity":  # low-rank components: counted in `ranks`
            continue
        key = names.get(id(module.get_submodule(g.producer)), g.name)
        s = scores[g.name].detach().double().cpu()
        snap.groups[key] = [g.num_neurons, int((s > 0).sum())]
        snap.scores[key] = s.tolist()
    for p in (1, 2):
        try:
            value = float(path_norm(module, example, p=p))
        except (NotImplementedError, ValueError):
            value = None
        setattr(snap, f"path_norm_l{p}", value)
    return snap


def example_input(pl_module: pl.LightningModule, datamodule: Any = None) -> Any:
    """The module's ``example_input_array``, else the datamodule's, else None."""
    example = pl_module.example_input_array
    if example is None and datamodule is not None:
        example = getattr(datamodule, "example_input_array", None)
    return example if isinstance(example, (Tensor, tuple)) else None


def metric_on_test_split(pl_module: pl.LightningModule, datamodule: Any) -> dict[str, float]:
    """Test loss and accuracy (or R^2) of a :class:`~lightning_bv.modules.BVModule` without a Trainer, else ``{}``."""
    evaluate = getattr(pl_module, "evaluate", None)
    loader = getattr(datamodule, "test_dataloader", None)
    if not callable(evaluate) or not callable(loader):
        return {}
    try:
        return dict(evaluate(loader()))
    except (NotImplementedError, ValueError, TypeError):
        return {}
