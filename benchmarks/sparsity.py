"""Sparsity against accuracy: RBVRegularization next to AdamW weight decay and Lightning's ModelPruning.

Two problems, one hidden layer each (so every neuron's weights belong to one group only and the prox is exact):

* ``digits``: scikit-learn's bundled 8x8 digits (``DigitsData``: standardized, fixed 1257 / 270 / 270 split),
  MLP 64 -> 256 -> 10, cross-entropy, batches of 128, 100 epochs; the metric is accuracy in %.
* ``teacher``: a teacher ReLU network with 5 neurons on 10-D Gaussian inputs, noiseless targets; the student is 30x
  wider (10 -> 150 -> 1), MSE, 1000 / 1000 / 5000 points, batches of 100, 300 epochs; the metric is MSE.

Methods, same model, same epochs, same data, every one a real Lightning ``Trainer`` fit:

* ``plain``: no regularization (AdamW with ``weight_decay=0``, and SGD, the optimizers of the rows below);
* ``AdamW weight decay``: ``torch.optim.AdamW(weight_decay=lam)`` (every parameter, as users run it);
* ``... + ModelPruning``: the chosen AdamW run again, with Lightning's
  ``ModelPruning(pruning_fn="ln_structured", pruning_dim=0, pruning_norm=2, amount=n)`` on the hidden layer's weight
  (rows = neurons, ranked by the L2 norm of their input weights), pruning ``n`` neurons so that exactly as many remain
  as the chosen ``prox`` run of the same seed keeps. ``at end``: pruned after the last epoch (no training after);
  ``at 80% + fine-tune``: pruned after 80% of the epochs and trained on with the mask for the rest;
* ``RBVRegularization(mode=...)``: ``prox``, ``penalty`` and ``weight_decay``, with SGD (lr 0.05, momentum
  0.9), the optimizer proximal gradient is derived for (PathProx). ``prox (AdamW)``: the prox under AdamW
  (``weight_decay=0``); its lam is on another scale (Adam normalizes the gradient but not the shrink ``lam * lr``).
  ``prox + NeuronPruning at 80% + fine-tune``: the prox for 80% of the epochs (lam a callable of the step that
  drops to 0), ``NeuronPruning(every_n_epochs=...)`` cuts the dead neurons then, and the survivors train on without
  the penalty (debiasing, the counterpart of ModelPruning's fine-tune).

lam is chosen on the validation split, never on the test split: for AdamW weight decay, the best mean validation
metric; for every other sweep, the largest lam whose mean validation metric is within the tolerance of the best
AdamW weight decay validation metric (digits: 0.5 points of accuracy; teacher: an MSE no larger), else the best.
Active neurons: score ``||v_k|| ||w_k||`` > 0 (what ``compact`` removes at ``tol=0``); effective: score > 1% of the
largest. Parameters after ``compact``: a neuron whose input weights are all zero (what ModelPruning leaves) outputs
the constant ``relu(b_k)``; it is first folded into the next layer's bias (same function), then ``compact`` runs.
Goals (issue 7) are checked against the AdamW weight decay runs (the best test metric over its whole sweep, a
generous reference). Numbers are means over seeds; training time is the median wall time of ``trainer.fit``. Runs
use one thread (``torch.set_num_threads(1)``): for models this small, two threads on a shared two-core machine were
20x slower.

    python -m benchmarks.sparsity [--quick] [--problems digits teacher] [--seeds 3]
"""

from __future__ import annotations

import argparse
import copy
import functools
import statistics
import time
from dataclasses import dataclass, field
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import ModelPruning
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from benchmarks._common import Supervised, markdown_table, quiet_lightning, save
from lightning_bv.callbacks import RBVRegularization
from lightning_bv.callbacks.neuron_pruning import NeuronPruning
from lightning_bv.functional.rbv import neuron_scores
from lightning_bv.neurons import find_neurons
from lightning_bv.transforms.compact import compact

ADAMW_LR = 3e-3
SGD_LR, SGD_MOMENTUM = 0.05, 0.9


# -- problems ----------------------------------------------------------------------------------------------------
@dataclass
class Problem:
    name: str
    task: str  # "classification" (metric: accuracy %, higher is better) or "regression" (metric: MSE)
    x_train: Tensor
    y_train: Tensor
    x_val: Tensor
    y_val: Tensor
    x_test: Tensor
    y_test: Tensor
    width: int
    batch_size: int
    epochs: int
    tolerance: float  # how much worse than the best AdamW weight decay validation metric a chosen lam may be
    teacher_neurons: int | None = None
    grids: dict[str, tuple[float, ...]] = field(default_factory=dict)

    @property
    def d_in(self) -> int:
        return int(self.x_train.shape[1])

    @property
    def d_out(self) -> int:
        return 10 if self.task == "classification" else int(self.y_train.shape[1])

    def better(self, a: float, b: float) -> bool:
        """Metric ``a`` is strictly better than ``b``."""
        return a > b if self.task == "classification" else a < b

    def within(self, value: float, best: float) -> bool:
        """``value`` is within the tolerance of ``best``."""
        return value >= best - self.tolerance if self.task == "classification" else value <= best + self.tolerance


def digits(epochs: int = 100) -> Problem:
    from lightning_bv.modules.data import DigitsData

    d = DigitsData()
    return Problem(
        "digits", "classification", d.x_train, d.y_train, d.x_val, d.y_val, d.x_test, d.y_test,
        width=256, batch_size=128, epochs=epochs, tolerance=0.5,
    )  # fmt: skip


def teacher_student(
    epochs: int = 300, d: int = 10, neurons: int = 5, factor: int = 30, n_train: int = 1000, seed: int = 0
) -> Problem:
    """A teacher ``sum_k v_k relu(w_k . x + b_k)`` with unit ``w_k``, ``b_k ~ N(0, 1/4)``, ``|v_k|`` in [0.5, 1.5]."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(neurons, d, generator=g)
    w /= w.norm(dim=1, keepdim=True)
    b = 0.5 * torch.randn(neurons, generator=g)
    v = torch.randn(neurons, generator=g).sign() * (0.5 + torch.rand(neurons, generator=g))

    def sample(n: int) -> tuple[Tensor, Tensor]:
        x = torch.randn(n, d, generator=g)
        return x, (torch.relu(x @ w.T + b) @ v).unsqueeze(1)

    (xtr, ytr), (xva, yva), (xte, yte) = sample(n_train), sample(1000), sample(5000)
    return Problem(
        "teacher", "regression", xtr, ytr, xva, yva, xte, yte,
        width=factor * neurons, batch_size=100, epochs=epochs, tolerance=0.0, teacher_neurons=neurons,
    )  # fmt: skip


class Batches(Dataset):
    """Shuffled batches cut from tensors (no per-sample collation); a new permutation every epoch."""

    def __init__(self, x: Tensor, y: Tensor, batch_size: int, seed: int) -> None:
        self.x, self.y, self.batch_size = x, y, batch_size
        self.generator = torch.Generator().manual_seed(seed)
        self.perm = torch.randperm(len(x), generator=self.generator)

    def __len__(self) -> int:
        return -(-len(self.x) // self.batch_size)

    def __getitem__(self, i: int) -> tuple[Tensor, Tensor]:
        if i == 0:
            self.perm = torch.randperm(len(self.x), generator=self.generator)
        idx = self.perm[i * self.batch_size : (i + 1) * self.batch_size]
        return self.x[idx], self.y[idx]


# -- the model ---------------------------------------------------------------------------------------------------
def mlp_for(problem: Problem, optimizer: str, weight_decay: float = 0.0) -> Supervised[nn.Sequential]:
    """An MLP ``d_in -> width -> d_out`` in an ordinary LightningModule; SGD (with momentum) or AdamW."""
    net = nn.Sequential(nn.Linear(problem.d_in, problem.width), nn.ReLU(), nn.Linear(problem.width, problem.d_out))
    loss = nn.functional.cross_entropy if problem.task == "classification" else nn.functional.mse_loss
    if optimizer == "sgd":
        return Supervised(net, loss, functools.partial(torch.optim.SGD, lr=SGD_LR, momentum=SGD_MOMENTUM))
    return Supervised(net, loss, functools.partial(torch.optim.AdamW, lr=ADAMW_LR, weight_decay=weight_decay))


class LamUntil:
    """``lam`` before optimizer step ``step``, 0 from then on (picklable)."""

    def __init__(self, lam: float, step: int) -> None:
        self.lam, self.step = lam, step

    def __call__(self, step: int) -> float:
        return self.lam if step < self.step else 0.0


class PruneAtEpoch:
    """``amount`` for ModelPruning: ``n`` neurons at the end of epoch ``epoch``, nothing before or after (picklable)."""

    def __init__(self, epoch: int, n: int) -> None:
        self.epoch, self.n = epoch, n

    def __call__(self, epoch: int) -> int:
        return self.n if epoch == self.epoch else 0


@torch.no_grad()
def metric(problem: Problem, net: nn.Module, x: Tensor, y: Tensor) -> float:
    out = net(x)
    if problem.task == "classification":
        return 100.0 * float((out.argmax(1) == y).float().mean())
    return float(nn.functional.mse_loss(out, y))


@torch.no_grad()
def fold_constant_neurons_(net: nn.Sequential) -> int:
    """Fold every neuron with all-zero input weights (output ``relu(b_k)``) into the next bias; same function."""
    first, last = net[0], net[2]
    dead_in = (first.weight == 0).all(dim=1)
    last.bias += last.weight[:, dead_in] @ torch.relu(first.bias[dead_in])
    last.weight[:, dead_in] = 0.0
    first.bias[dead_in] = 0.0
    return int(dead_in.sum())


@torch.no_grad()
def sparsity(problem: Problem, net: nn.Sequential) -> dict[str, float]:
    scores = neuron_scores(find_neurons(net, problem.x_train[:2]))["0"]
    small = copy.deepcopy(net)
    fold_constant_neurons_(small)
    report = compact(small, find_neurons(small, problem.x_train[:2]))
    diff = float((small(problem.x_test) - net(problem.x_test)).abs().max())
    if diff > 1e-4:
        raise RuntimeError(f"compaction changed the function by {diff:.2e}")
    return {
        "active": float((scores > 0).sum()),
        "effective": float((scores > 0.01 * scores.max()).sum()),
        "params": float(report.params_after),
        "params_before": float(report.params_before),
    }


def fit(problem: Problem, method: str, lam: float, seed: int, prune: tuple[int, int] | None = None) -> dict[str, float]:
    """Train one model with one method (a key of ``METHODS``); ``prune``: (epoch, neurons) for ModelPruning."""
    pl.seed_everything(seed, verbose=False)
    optimizer, mode = METHODS[method]
    model = mlp_for(problem, optimizer, weight_decay=lam if method == "AdamW weight decay" else 0.0)
    callbacks: list[pl.Callback] = []
    if mode is not None and method == FT:
        # prox for 80% of the epochs, compact, then train the survivors with lam=0
        stop = max(1, int(0.8 * problem.epochs))
        steps = len(Batches(problem.x_train, problem.y_train, problem.batch_size, seed))
        callbacks.append(RBVRegularization(lam=LamUntil(lam, stop * steps), mode=mode))
        callbacks.append(NeuronPruning(every_n_epochs=stop))
    elif mode is not None:
        callbacks.append(RBVRegularization(lam=lam, mode=mode))
    if prune is not None:
        epoch, n = prune
        callbacks.append(
            ModelPruning(
                pruning_fn="ln_structured",
                parameters_to_prune=[(model.net[0], "weight")],
                amount=PruneAtEpoch(epoch, n),
                use_global_unstructured=False,
                pruning_dim=0,
                pruning_norm=2,
                verbose=0,
            )
        )
    trainer = pl.Trainer(
        accelerator="cpu",
        max_epochs=problem.epochs,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        callbacks=callbacks,
    )
    data = DataLoader(Batches(problem.x_train, problem.y_train, problem.batch_size, seed), batch_size=None)
    t0 = time.perf_counter()
    trainer.fit(model, data)
    seconds = time.perf_counter() - t0
    net = model.net.eval()
    return {
        "val": metric(problem, net, problem.x_val, problem.y_val),
        "test": metric(problem, net, problem.x_test, problem.y_test),
        "seconds": seconds,
        **sparsity(problem, net),
    }


FT = "prox + NeuronPruning at 80% + fine-tune"
# method -> (optimizer, RBVRegularization mode or None)
METHODS: dict[str, tuple[str, str | None]] = {
    "plain": ("adamw", None),
    "plain (SGD)": ("sgd", None),
    "AdamW weight decay": ("adamw", None),
    "prox": ("sgd", "prox"),
    "penalty": ("sgd", "penalty"),
    "weight_decay": ("sgd", "weight_decay"),
    "prox (AdamW)": ("adamw", "prox"),
    FT: ("sgd", "prox"),
}
PRUNED = ("AdamW weight decay + ModelPruning at end", "AdamW weight decay + ModelPruning at 80% + fine-tune")
GRIDS: dict[str, dict[str, tuple[float, ...]]] = {
    "digits": {
        "AdamW weight decay": (0.01, 0.1, 0.3, 1.0),
        "prox": (0.01, 0.02, 0.03, 0.04, 0.05, 0.1),
        "penalty": (0.001, 0.003, 0.01, 0.03),
        "weight_decay": (0.001, 0.003, 0.01, 0.03),
        "prox (AdamW)": (0.5, 1.0, 2.0),
        FT: (0.02, 0.03, 0.04, 0.05),
    },
    "teacher": {
        "AdamW weight decay": (0.01, 0.1, 0.3, 1.0),
        "prox": (0.003, 0.01, 0.03, 0.1),
        "penalty": (0.001, 0.003, 0.01, 0.03),
        "weight_decay": (0.001, 0.003, 0.01, 0.03),
        "prox (AdamW)": (0.3, 1.0, 3.0),
        FT: (0.01, 0.03),
    },
}
QUICK_GRIDS: dict[str, dict[str, tuple[float, ...]]] = {
    "digits": {
        "AdamW weight decay": (0.1, 0.3, 1.0),
        "prox": (0.02, 0.03, 0.04),
        "penalty": (0.003, 0.01),
        "weight_decay": (0.003, 0.01),
        "prox (AdamW)": (0.5,),
        FT: (0.04,),
    },
    "teacher": {
        "AdamW weight decay": (0.01, 0.1, 1.0),
        "prox": (0.01, 0.03),
        "penalty": (0.003, 0.01),
        "weight_decay": (0.003, 0.01),
        "prox (AdamW)": (1.0,),
        FT: (0.03,),
    },
}


def grid(problem: Problem, method: str) -> tuple[float, ...]:
    if method.startswith("plain"):
        return (0.0,)
    return problem.grids[method]


def mean_of(runs: list[dict[str, float]], key: str) -> float:
    return statistics.fmean(r[key] for r in runs)


def choose(problem: Problem, sweep: dict[float, list[dict[str, float]]], best_val: float | None) -> float:
    """The lam picked on validation (see the module docstring)."""
    lams = sorted(sweep)
    if best_val is not None:
        ok = [lam for lam in lams if problem.within(mean_of(sweep[lam], "val"), best_val)]
        if ok:
            return ok[-1]
    best = lams[0]
    for lam in lams[1:]:  # ties go to the larger lam
        if not problem.better(mean_of(sweep[best], "val"), mean_of(sweep[lam], "val")):
            best = lam
    return best


def run_problem(problem: Problem, seeds: list[int], log: Any = print) -> dict[str, Any]:
    runs: dict[str, dict[float, list[dict[str, float]]]] = {m: {lam: [] for lam in grid(problem, m)} for m in METHODS}
    for seed in seeds:  # interleaved: every configuration once per seed
        for m in METHODS:
            for lam in grid(problem, m):
                r = fit(problem, m, lam, seed)
                runs[m][lam].append(r)
                log(f"  {problem.name} seed {seed} {m:>18} lam={lam:<6g} val {r['val']:.4g} test {r['test']:.4g} "
                    f"active {r['active']:.0f} effective {r['effective']:.0f} ({r['seconds']:.1f} s)")  # fmt: skip
    wd_lam = choose(problem, runs["AdamW weight decay"], None)
    best_val = mean_of(runs["AdamW weight decay"][wd_lam], "val")
    chosen = {m: (0.0 if m.startswith("plain") else choose(problem, runs[m], best_val)) for m in METHODS}
    chosen["AdamW weight decay"] = wd_lam
    prox_runs = runs["prox"][chosen["prox"]]
    for name, at in zip(PRUNED, (problem.epochs - 1, max(0, int(0.8 * problem.epochs) - 1))):
        runs[name] = {wd_lam: []}
        chosen[name] = wd_lam
        for seed, prox_run in zip(seeds, prox_runs):
            n = problem.width - max(int(prox_run["active"]), 1)
            r = fit(problem, "AdamW weight decay", wd_lam, seed, prune=(at, n))
            runs[name][wd_lam].append(r)
            log(f"  {problem.name} seed {seed} {name} (prune {n}) val {r['val']:.4g} test {r['test']:.4g} "
                f"active {r['active']:.0f} ({r['seconds']:.1f} s)")  # fmt: skip
    return {"runs": runs, "chosen": chosen}


def summarize(problem: Problem, result: dict[str, Any]) -> tuple[str, str, dict[str, Any]]:
    runs, chosen = result["runs"], result["chosen"]
    unit = "acc %" if problem.task == "classification" else "MSE"
    rows = []
    for m in [*METHODS, *PRUNED]:
        rs = runs[m][chosen[m]]
        optimizer = "AdamW" if m in PRUNED else METHODS[m][0].replace("adamw", "AdamW").replace("sgd", "SGD")
        lam = "-" if m.startswith("plain") else f"{chosen[m]:g}"
        val, test = mean_of(rs, "val"), mean_of(rs, "test")
        fmt = "{:.2f}" if problem.task == "classification" else "{:.2e}"
        rows.append([
            m, optimizer, lam, fmt.format(val), fmt.format(test), f"{mean_of(rs, 'active'):.1f}",
            f"{mean_of(rs, 'effective'):.1f}", f"{mean_of(rs, 'params'):.0f}",
            statistics.median(r["seconds"] for r in rs),
        ])  # fmt: skip
    header = ["method", "optimizer", "lam (val)", f"val {unit}", f"test {unit}", "active", "effective",
              "params after compact", "train s"]  # fmt: skip
    table = markdown_table(header, rows)

    wd = runs["AdamW weight decay"]
    prox = runs["prox"][chosen["prox"]]
    prox_test, prox_active = mean_of(prox, "test"), mean_of(prox, "active")
    goals: dict[str, Any] = {}
    if problem.task == "classification":
        best_wd_test = max(mean_of(rs, "test") for rs in wd.values())
        frac = prox_active / problem.width
        met = frac <= 0.25 and prox_test >= best_wd_test - 0.5
        goals["digits"] = {"met": met, "prox_active_fraction": frac, "prox_test": prox_test,
                           "best_wd_test": best_wd_test}  # fmt: skip
        text = (
            f"goal (digits): prox keeps <= 25% of the neurons within 0.5 points of the best AdamW weight decay test "
            f"accuracy: {'MET' if met else 'MISSED'}: prox keeps {prox_active:.1f} of {problem.width} "
            f"({100 * frac:.1f}%) at {prox_test:.2f}% test; best weight decay test accuracy {best_wd_test:.2f}% "
            f"(gap {best_wd_test - prox_test:+.2f} points)"
        )
    else:
        assert problem.teacher_neurons is not None
        wd_chosen = wd[chosen["AdamW weight decay"]]
        best_wd_test = min(mean_of(rs, "test") for rs in wd.values())
        wd_effective = mean_of(wd_chosen, "effective")
        met_prox = prox_active <= 2 * problem.teacher_neurons and prox_test <= best_wd_test
        met_wd = wd_effective > 0.5 * problem.width
        goals["teacher"] = {
            "met": met_prox and met_wd, "prox_active": prox_active, "prox_test_mse": prox_test,
            "best_wd_test_mse": best_wd_test, "wd_effective": wd_effective, "teacher_neurons": problem.teacher_neurons,
        }  # fmt: skip
        text = (
            f"goal (teacher): prox ends with <= {2 * problem.teacher_neurons} neurons (2x the teacher's "
            f"{problem.teacher_neurons}) at a test MSE no worse than weight decay's, while weight decay keeps most "
            f"neurons alive: {'MET' if met_prox and met_wd else 'MISSED'}: prox {prox_active:.1f} active neurons, "
            f"test MSE {prox_test:.3g}; best AdamW weight decay test MSE {best_wd_test:.3g}; the chosen weight decay "
            f"run keeps {wd_effective:.1f} of {problem.width} neurons above 1% of the largest score "
            f"({mean_of(wd_chosen, 'active'):.1f} nonzero)"
        )
    sweep_rows = []
    for m in METHODS:
        if m.startswith("plain"):
            continue
        for lam, rs in runs[m].items():
            mark = " *" if lam == chosen[m] else ""
            sweep_rows.append([m, f"{lam:g}{mark}", f"{mean_of(rs, 'val'):.4g}", f"{mean_of(rs, 'active'):.1f}"])
    sweep = markdown_table(["method", "lam (* chosen)", f"val {unit}", "active"], sweep_rows)
    return table, text + "\n\n" + sweep, goals


def main(argv: list[str] | None = None) -> str:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--problems", nargs="*", default=["digits", "teacher"], choices=["digits", "teacher"])
    p.add_argument("--seeds", type=int, default=3, help="seeds per configuration (means are reported)")
    p.add_argument("--quick", action="store_true", help="one seed, three lams per sweep (a few minutes)")
    p.add_argument("--epochs", type=int, default=None, help="override the problems' epochs (smoke runs)")
    p.add_argument("--verbose", action="store_true", help="print every run")
    args = p.parse_args(argv)
    quiet_lightning()
    torch.set_num_threads(1)
    seeds = list(range(1 if args.quick else args.seeds))
    log = print if args.verbose else (lambda *a, **k: None)
    out, data = [], {"seeds": seeds, "quick": args.quick, "adamw_lr": ADAMW_LR, "sgd_lr": SGD_LR, "problems": {}}
    for name in args.problems:
        problem = digits() if name == "digits" else teacher_student()
        problem.grids = (QUICK_GRIDS if args.quick else GRIDS)[name]
        problem.epochs = args.epochs or problem.epochs
        t0 = time.perf_counter()
        result = run_problem(problem, seeds, log)
        table, text, goals = summarize(problem, result)
        section = f"## {name} ({problem.epochs} epochs, {len(seeds)} seed(s), {time.perf_counter() - t0:.0f} s)\n\n"
        section += table + "\n\n" + text
        print(section + "\n", flush=True)
        out.append(section)
        data["problems"][name] = {
            "goals": goals,
            "chosen": result["chosen"],
            "runs": {m: {str(lam): rs for lam, rs in by_lam.items()} for m, by_lam in result["runs"].items()},
        }
    table = "\n\n".join(out)
    save("sparsity", table, data)
    return table


if __name__ == "__main__":
    main()
