"""What ``lightning-bv fit`` reports at the end: snapshots of a model, the table, the plots and the saved files.

A :class:`Snapshot` records, for one state of a model: its ReLU neurons (per group, and how many have a nonzero score),
the rank of every Linear/Conv layer (components of low-rank layers, ``min(out, in)`` for dense ones), the number of
parameters, the l1/l2 path-norms and a test metric. :class:`RunSummary` takes the snapshots of the initial model
(before any other callback changed it) and of the trained model (before any compaction); the CLI adds the compacted
one. Layer and group names are *canonical*: the ``.module`` level that a skip wrapper adds is left out, so that a layer
has the same name before and after :class:`~lightning_bv.callbacks.SkipConnections`.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from torch import Tensor, nn
from typing_extensions import override

from lightning_bv._layers import WEIGHTED
from lightning_bv.callbacks._base import CallbackBase
from lightning_bv.functional.path_norm import path_norm
from lightning_bv.functional.rbv import neuron_scores
from lightning_bv.functional.spectral import singular_values
from lightning_bv.neurons import find_neurons, low_rank_factors
from lightning_bv.transforms.skip import is_skip

COLUMNS = ("initial", "trained", "compacted")


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


class RunSummary(CallbackBase):
    """Snapshot the model at ``setup("fit")`` (put it first: the model is as built) and at ``on_train_end``.

    ``on_train_end`` runs before ``on_fit_end``, where :class:`~lightning_bv.callbacks.NeuronPruning` compacts.
    """

    def __init__(self) -> None:
        self.initial: Snapshot | None = None
        self.trained: Snapshot | None = None

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit" and self.initial is None:
            dm = getattr(trainer, "datamodule", None)
            self.initial = snapshot(pl_module, example_input(pl_module, dm), metric_on_test_split(pl_module, dm))

    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        dm = getattr(trainer, "datamodule", None)
        self.trained = snapshot(pl_module, example_input(pl_module, dm), metric_on_test_split(pl_module, dm))


# ------------------------------------------------------------------------------------------------------------
# the table
# ------------------------------------------------------------------------------------------------------------
def _fmt(value: float | None) -> str:
    if value is None:
        return "-"
    if value != 0 and (abs(value) >= 1e5 or abs(value) < 1e-3):
        return f"{value:.3e}"
    return f"{value:.4g}"


def table(snaps: dict[str, Snapshot | None]) -> str:
    """The results as a plain-text table, one column per snapshot (missing ones shown as ``-``)."""
    cols = [c for c in COLUMNS if c in snaps]
    metrics = list(dict.fromkeys(k for s in snaps.values() if s is not None for k in s.metric))
    metrics.sort(key=lambda k: k == "loss")  # the accuracy (or R^2) first
    low_rank = list(dict.fromkeys(k for s in snaps.values() if s is not None for k in s.low_rank))

    def cell(snap: Snapshot | None, what: str, key: str = "") -> str:
        if snap is None:
            return "-"
        if what == "metric":
            return _fmt(snap.metric.get(key))
        if what == "neurons":
            return f"{snap.neurons:,}" if snap.live == snap.neurons else f"{snap.live:,} live / {snap.neurons:,}"
        if what == "group":
            n, a = snap.groups.get(key, (0, 0))
            return "-" if key not in snap.groups else (f"{n}" if a == n else f"{a} live / {n}")
        if what == "rank":
            if key not in snap.ranks:
                return "-"
            r, live = snap.ranks[key]
            kind = "" if key in snap.low_rank else " (dense)"
            return f"{r}{kind}" if live == r or kind else f"{live} live / {r}"
        if what == "params":
            return f"{snap.params:,}"
        return _fmt(getattr(snap, what))

    rows: list[tuple[str, ...]] = [("", *cols)]
    rows += [(f"test {m}", *(cell(snaps[c], "metric", m) for c in cols)) for m in metrics]
    rows.append(("neurons (ReLU)", *(cell(snaps[c], "neurons") for c in cols)))
    groups = list(dict.fromkeys(k for s in snaps.values() if s is not None for k in s.groups))
    if len(groups) > 1:
        rows += [(f"  {g}", *(cell(snaps[c], "group", g) for c in cols)) for g in groups]
    if low_rank:
        rows.append(("rank (low-rank layers)", *("" for _ in cols)))
        rows += [(f"  {name}", *(cell(snaps[c], "rank", name) for c in cols)) for name in low_rank]
    rows.append(("parameters", *(cell(snaps[c], "params") for c in cols)))
    rows.append(("l1 path-norm", *(cell(snaps[c], "path_norm_l1") for c in cols)))
    rows.append(("l2 path-norm", *(cell(snaps[c], "path_norm_l2") for c in cols)))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join([r[0].ljust(widths[0]), *(c.rjust(w) for c, w in zip(r[1:], widths[1:]))]) for r in rows]
    lines.insert(1, "-" * len(lines[0]))
    return "\n".join(line.rstrip() for line in lines)


# ------------------------------------------------------------------------------------------------------------
# files: summary.json, the state_dict, plots
# ------------------------------------------------------------------------------------------------------------
def save_json(snaps: dict[str, Snapshot | None], path: Path, extra: dict[str, Any] | None = None) -> None:
    """Write the snapshots (scores left out) and ``extra`` as JSON."""
    data: dict[str, Any] = {k: None if s is None else {**asdict(s), "scores": None} for k, s in snaps.items()}
    data.update(extra or {})
    path.write_text(json.dumps(data, indent=2, default=str) + "\n")


def _figure(width: float, height: float) -> tuple[Any, Any]:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100)
    return fig, FigureCanvasAgg(fig)  # the Agg renderer without pyplot: no global state


def plot_neurons(snaps: dict[str, Snapshot | None], path: Path) -> None:
    """Neurons per group in each snapshot (bars), and the sorted neuron scores at the end of training (log scale)."""
    import numpy as np

    trained = snaps.get("trained")
    groups = list(dict.fromkeys(k for s in snaps.values() if s is not None for k in s.groups))
    fig, _ = _figure(11, 4)
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
    fig, _ = _figure(7, 4)
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
    fig, _ = _figure(7, 4)
    ax = fig.subplots()
    ax.scatter(x.squeeze(1).numpy(), y.reshape(-1).numpy(), s=14, color="k", label="training data", zorder=3)
    ax.plot(grid.squeeze(1).numpy(), out.reshape(-1).cpu().numpy(), color="C0", label="learned function")
    ax.set_xlabel("x")
    ax.set_ylabel("f(x)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    return True
