"""Convergence of the objective loss + lam * R: mode="prox" against mode="weight_decay" (and "penalty"), with SGD.

The PathProx claim (docs/theory.md section 4): in the interpolation regime, where the training loss goes to near zero,
the proximal step reaches a given value of the objective in fewer steps than weight decay. Setting: the first 1000
training points of ``DigitsData`` (standardized), MLP 64 -> 256 -> 10 (one hidden layer: no weight matrix is shared
between neuron groups, so R is exact), cross-entropy, plain SGD (no momentum) with batches of 100 and the same
learning rate and initialization for every mode, ``RBVRegularization(lam, mode=..., every_n_steps=1)`` (the
update on every step: the claim is about the per-step algorithms, not the lazy default) in a real Trainer. A
callback placed after it records, every ``--every`` steps, the full-data objective ``mean CE + lam * R`` with
``R = rbv_norm(groups)`` (the function-space quantity every mode targets; weight decay minimizes the upper bound
``lam/2 sum(||v||^2 + ||w||^2)``, equal to ``lam * R`` at balance).

Two strengths: lam = 1e-3 (the interpolation regime: the training loss falls to about 1e-2) and lam = 1e-2. A
fourth curve, ``prox, PathProx projection (reference)``, is NOT the library: PathProx's own step, implemented here
(:class:`PathProxProjection`), to tell the proximal method from lightning_bv's function-preserving variant of it.

Reported: the plot (``results/convergence.png``), and for each mode the number of steps until the objective first
reaches ``(1 + eps) * F*``, ``F*`` being the lowest objective any mode reached in that seed; medians over seeds.

    python -m benchmarks.convergence [--quick] [--steps 6000] [--lams 1e-3 1e-2] [--lr 0.1] [--seeds 2]
"""

from __future__ import annotations

import argparse
import functools
import statistics
import time
from typing import Any

import pytorch_lightning as pl
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader

from benchmarks._common import RESULTS, Supervised, markdown_table, quiet_lightning, save
from benchmarks.sparsity import Batches
from lightning_bv.callbacks import RBVRegularization
from lightning_bv.functional.rbv import neuron_scores, rbv_norm
from lightning_bv.neurons import find_neurons

MODES = ("prox", "weight_decay", "penalty", "prox, PathProx projection (reference)")
REFERENCE = MODES[-1]
EPS = (1.0, 0.25, 0.1, 0.05, 0.02)


def classifier(lr: float, width: int = 256) -> Supervised[nn.Sequential]:
    """MLP 64 -> width -> 10, cross-entropy, plain SGD."""
    net = nn.Sequential(nn.Linear(64, width), nn.ReLU(), nn.Linear(width, 10))
    return Supervised(net, nn.functional.cross_entropy, functools.partial(torch.optim.SGD, lr=lr))


class PathProxProjection(pl.Callback):
    """Reference, NOT the library: PathProx's own step (Yang et al.): after each optimizer step, project every input
    weight row onto the unit sphere (``w_k, b_k /= ||w_k||``) *without* scaling ``v_k`` up, then the group shrink of
    ``v_k`` by ``lam * lr``. The projection discards the radial part of the update of ``w_k``, so this is projected
    proximal gradient on the equivalent problem ``min loss + lam sum_k ||v_k||  s.t.  ||w_k|| = 1``.
    """

    def __init__(self, lam: float) -> None:
        self.lam = lam

    @torch.no_grad()
    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: Any, outputs: Any, batch: Any, idx: int) -> None:
        first, last = pl_module.net[0], pl_module.net[2]
        n = first.weight.norm(dim=1)
        live = n > 0
        scale = torch.where(live, 1.0 / torch.where(live, n, torch.ones_like(n)), torch.ones_like(n))
        first.weight.mul_(scale[:, None])
        first.bias.mul_(scale)
        tau = self.lam * trainer.optimizers[0].param_groups[0]["lr"]
        v = last.weight.norm(dim=0)
        last.weight.mul_((1 - tau / v.clamp_min(1e-30)).clamp_min(0.0))


class ObjectiveRecorder(pl.Callback):
    """Every ``every`` steps (after the other callbacks' updates): full-data loss, R and loss + lam * R."""

    def __init__(self, x: Tensor, y: Tensor, lam: float, every: int) -> None:
        self.x, self.y, self.lam, self.every = x, y, lam, every
        self.groups: Any = None
        self.rows: list[tuple[int, float, float, float, int]] = []  # step, loss, R, objective, active

    @torch.no_grad()
    def record(self, pl_module: Supervised[nn.Sequential]) -> None:
        if self.groups is None:
            self.groups = find_neurons(pl_module.net, self.x[:2])
        loss = float(nn.functional.cross_entropy(pl_module.net(self.x), self.y))
        r = float(rbv_norm(self.groups))
        active = int((neuron_scores(self.groups)["0"] > 0).sum())
        self.rows.append((pl_module.global_step, loss, r, loss + self.lam * r, active))

    def on_train_start(self, trainer: pl.Trainer, pl_module: Any) -> None:
        self.record(pl_module)

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: Any, outputs: Any, batch: Any, idx: int) -> None:
        if trainer.global_step % self.every == 0:
            self.record(pl_module)


def data(n: int = 1000) -> tuple[Tensor, Tensor]:
    from lightning_bv.modules.data import DigitsData

    d = DigitsData()
    return d.x_train[:n], d.y_train[:n]


def run(mode: str, x: Tensor, y: Tensor, lam: float, lr: float, steps: int, every: int, seed: int) -> dict[str, Any]:
    pl.seed_everything(seed, verbose=False)
    model = classifier(lr)
    recorder = ObjectiveRecorder(x, y, lam, every)
    regularizer = (
        PathProxProjection(lam) if mode == REFERENCE else RBVRegularization(lam=lam, mode=mode, every_n_steps=1)
    )
    trainer = pl.Trainer(
        accelerator="cpu",
        max_steps=steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[regularizer, recorder],  # the recorder runs after the regularizer's update
    )
    t0 = time.perf_counter()
    trainer.fit(model, DataLoader(Batches(x, y, 100, seed), batch_size=None))
    return {"rows": recorder.rows, "seconds": time.perf_counter() - t0}


def steps_to(rows: list[tuple[int, float, float, float, int]], target: float) -> int | None:
    return next((r[0] for r in rows if r[3] <= target), None)


def plot(results: dict[float, dict[str, list[dict[str, Any]]]], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(results), 3, figsize=(15, 4.2 * len(results)), squeeze=False)
    for row, (lam, by_mode) in zip(axes, results.items()):
        for i, (mode, runs) in enumerate(by_mode.items()):
            for j, res in enumerate(runs):
                steps = [r[0] for r in res["rows"]]
                kw = {"color": f"C{i}", "alpha": 1.0 if j == 0 else 0.35, "label": mode if j == 0 else None}
                kw["linestyle"] = "--" if mode == REFERENCE else "-"
                row[0].plot(steps, [r[3] for r in res["rows"]], **kw)
                row[1].plot(steps, [r[1] for r in res["rows"]], **kw)
                row[2].plot(steps, [r[4] for r in res["rows"]], **kw)
        row[0].set(yscale="log", xlabel="SGD step", ylabel="loss + lam * R", title=f"objective, lam = {lam:g}")
        row[1].set(yscale="log", xlabel="SGD step", ylabel="training cross-entropy", title="data term")
        row[2].set(xlabel="SGD step", ylabel="neurons with nonzero score", title="active neurons (of 256)")
        for ax in row:
            ax.legend(fontsize=8)
            ax.grid(alpha=0.3)
    fig.suptitle("Digits (1000 points), MLP 64-256-10, SGD + RBVRegularization")
    fig.tight_layout()
    fig.savefig(path, dpi=72)
    plt.close(fig)


def summarize(lam: float, by_mode: dict[str, list[dict[str, Any]]], steps: int) -> tuple[str, dict[str, Any]]:
    n = len(next(iter(by_mode.values())))
    best = [min(min(r[3] for r in runs[i]["rows"]) for runs in by_mode.values()) for i in range(n)]
    rows, counts = [], {}
    for mode, runs in by_mode.items():
        counts[mode] = {str(eps): [steps_to(runs[i]["rows"], (1 + eps) * best[i]) for i in range(n)] for eps in EPS}
        last = [r["rows"][-1] for r in runs]
        lowest = [min(r[3] for r in res["rows"]) for res in runs]
        rows.append(
            [
                mode,
                *(_median_steps(counts[mode][str(eps)]) for eps in EPS),
                f"{statistics.median(lowest):.4g}",
                f"{statistics.median(r[3] for r in last):.4g}",
                f"{statistics.median(r[1] for r in last):.2e}",
                f"{statistics.median(r[2] for r in last):.4g}",
                f"{statistics.median(r[4] for r in last):g}",
            ]
        )
    header = ["mode", *(f"steps to (1+{eps:g}) F*" for eps in EPS), "lowest objective", "final objective",
              "final loss", "final R", "final active"]  # fmt: skip
    text = f"### lam = {lam:g}\n\n" + markdown_table(header, rows)
    text += "\n\nF* (lowest objective any mode reached, per seed): " + ", ".join(f"{b:.4g}" for b in best)
    return text, {"f_star": best, "steps_to": counts}


def main(argv: list[str] | None = None) -> str:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=6000)
    p.add_argument("--lams", type=float, nargs="*", default=[1e-3, 1e-2])
    p.add_argument("--lr", type=float, default=0.1)
    p.add_argument("--every", type=int, default=20, help="record the objective every this many steps")
    p.add_argument("--seeds", type=int, default=2)
    p.add_argument("--modes", nargs="*", default=list(MODES), choices=list(MODES))
    p.add_argument("--quick", action="store_true", help="one seed, lam 1e-3 only, 2000 steps")
    args = p.parse_args(argv)
    quiet_lightning()
    torch.set_num_threads(1)
    steps, seeds, lams = (2000, [0], [1e-3]) if args.quick else (args.steps, list(range(args.seeds)), args.lams)
    x, y = data()
    results: dict[float, dict[str, list[dict[str, Any]]]] = {lam: {m: [] for m in args.modes} for lam in lams}
    for seed in seeds:
        for lam in lams:
            for mode in args.modes:
                results[lam][mode].append(run(mode, x, y, lam, args.lr, steps, args.every, seed))
    sections, data_out = [], {}
    for lam, by_mode in results.items():
        text, summary = summarize(lam, by_mode, steps)
        sections.append(text)
        curves = {m: [_thin([(r[0], r[3]) for r in res["rows"]]) for res in runs] for m, runs in by_mode.items()}
        data_out[str(lam)] = {**summary, "objective_curves": curves}
    table = "\n\n".join(sections)
    table += (
        f"\n\nSGD lr = {args.lr:g} (no momentum), batch 100, {steps} steps, seeds {seeds}. Step counts are medians "
        "over seeds (a seed that never reached the value counts as infinite; 'never': the median is). Rows are "
        "lightning_bv's RBVRegularization modes, except the last: a benchmark-local reference (see "
        "PathProxProjection in benchmarks/convergence.py)."
    )
    print(table)
    RESULTS.mkdir(exist_ok=True)
    plot(results, str(RESULTS / "convergence.png"))
    print(f"saved {RESULTS / 'convergence.png'}")
    save(
        "convergence",
        table + "\n\n![objective against steps](convergence.png)",
        {"lr": args.lr, "steps": steps, "seeds": seeds, "every": args.every, "lams": data_out},
    )
    return table


def _thin(points: list[tuple[int, float]], n: int = 60) -> list[list[float]]:
    """At most about ``n`` (step, objective) points of a curve, evenly spaced, the last one kept."""
    every = max(1, len(points) // n)
    kept = points[::every] + ([points[-1]] if (len(points) - 1) % every else [])
    return [[step, round(value, 6)] for step, value in kept]


def _median_steps(hits: list[int | None]) -> str:
    m = statistics.median(float("inf") if h is None else float(h) for h in hits)
    return "never" if m == float("inf") else f"{m:g}"


if __name__ == "__main__":
    main()
