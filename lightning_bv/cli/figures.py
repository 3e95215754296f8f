"""The plots of the ``lightning-bv`` report: neurons per group and their scores, singular values, a 1-D function.

Drawn with :mod:`lightning_bv._plots` (no pyplot); each raises ``ImportError`` when matplotlib is not installed.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from lightning_bv import _plots
from lightning_bv._layers import WEIGHTED, low_rank_factors
from lightning_bv.cli.snapshots import Snapshot, canonical_names
from lightning_bv.functional.spectral import singular_values


def plot_neurons(snaps: dict[str, Snapshot | None], path: Path) -> None:
    """Neurons per group in each snapshot (bars), and the sorted neuron scores at the end of training (log scale)."""
    import numpy as np

    trained = snaps.get("trained")
    groups = list(dict.fromkeys(k for s in snaps.values() if s is not None for k in s.groups))
    fig = _plots.figure(11, 4)
    ax1, ax2 = fig.subplots(1, 2)
    xs = np.arange(len(groups))
    width = 0.8 / max(len(snaps), 1)
    for i, (name, snap) in enumerate(snaps.items()):
        if snap is None:
            continue
        counts = [snap.groups.get(g, [0, 0])[1] for g in groups]
        label = "live after training" if name == "trained" else name
        ax1.bar(xs + (i - (len(snaps) - 1) / 2) * width, counts, width, label=label)
    ax1.set_xticks(xs, groups, rotation=20, ha="right", fontsize=8)
    ax1.set_ylabel("neurons with a nonzero score")
    ax1.set_title("neurons per group")
    ax1.legend(fontsize=8)
    if trained is not None:
        for g, s in trained.scores.items():
            values = np.sort(np.asarray(s))[::-1]
            positive = values[values > 0]
            floor = positive.min() / 10 if positive.size else 1e-12
            ax2.semilogy(np.maximum(values, floor), label=f"{g} ({positive.size} > 0)")
        ax2.set_xlabel("neuron (sorted)")
        ax2.set_ylabel("score ||v_k|| ||w_k|| (zeros drawn at the floor)")
        ax2.set_title("neuron scores after training")
        ax2.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)


def plot_spectra(module: nn.Module, path: Path) -> bool:
    """Singular values of every Linear/Conv weight of ``module`` (log scale). False when it has none."""
    names = canonical_names(module)
    spectra = []
    for name, layer in module.named_modules():
        if isinstance(layer, WEIGHTED) and "parametrizations" not in name.split("."):
            factors = low_rank_factors(layer)
            s = singular_values(factors if factors is not None else layer.weight)
            if bool((s > 0).any()):
                spectra.append((names[id(layer)], s))
    if not spectra:
        return False
    fig = _plots.figure(7, 4)
    ax = fig.subplots()
    for name, s in spectra:
        s = s[s > 0]
        ax.semilogy(range(1, len(s) + 1), s.numpy(), marker=".", label=name)
    ax.set_xlabel("index")
    ax.set_ylabel("singular value")
    ax.set_title("singular values of the weights (compacted model)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    return True


@torch.no_grad()
def plot_function(pl_module: nn.Module, datamodule: Any, path: Path) -> bool:
    """For a model with one input and one output: the training data and the learned function. False otherwise."""
    x, y = getattr(datamodule, "x_train", None), getattr(datamodule, "y_train", None)
    if not isinstance(x, Tensor) or not isinstance(y, Tensor) or x.dim() != 2 or x.shape[1] != 1:
        return False
    lo, hi = float(x.min()), float(x.max())
    pad = 0.1 * (hi - lo) if hi > lo else 1.0
    grid = torch.linspace(lo - pad, hi + pad, 500).unsqueeze(1)
    modes = {m: m.training for m in pl_module.modules()}
    pl_module.eval()
    try:
        param = next(pl_module.parameters(), None)
        out = pl_module(grid.to(param.device if param is not None else "cpu"))
    finally:
        for m, mode in modes.items():
            m.training = mode
    if not isinstance(out, Tensor) or out.numel() != grid.numel():
        return False
    fig = _plots.function_figure(grid, out, label="learned function", data=(x, y), size=(7, 4), dpi=100)
    fig.savefig(path)
    return True
