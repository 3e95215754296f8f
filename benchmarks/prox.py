"""Evidence for the proximal method with the optimizers users train with (SGD with momentum, Adam, AdamW).

Four parts, every fit a real Lightning ``Trainer`` fit unless said otherwise; lam is chosen on the validation split:

* ``digits``: scikit-learn's digits (the fixed split of ``DigitsData``), MLPs 64 -> 256 -> 10 and 64 -> 256 -> 256
  -> 10 (a plain chain: the callback lifts its hidden matrix to A B), batches of 128. For each optimizer (SGD lr 0.05
  momentum 0.9, Adam lr 1e-3, AdamW lr 1e-3) the optimizer's own ``weight_decay`` (the reference: the lam with the
  best mean validation accuracy) and ``RBVRegularization(lam)`` with that optimizer (weight_decay 0; the chosen
  lam is the largest whose mean validation accuracy is within 0.5 points of the reference's, else the best). Live
  neurons: score ``||v_k|| ||w_k||`` > 0, per hidden layer. Goals: every hidden layer <= 25% live within 0.5 points
  of test accuracy (SGD), <= 35% (Adam, AdamW).
* ``teacher``: the 5-neuron teacher of ``benchmarks.sparsity`` (10 -> 150 -> 1 student), Adam lr 1e-3, against the
  best AdamW weight decay. Goal: <= 8 live neurons at a test MSE no larger than that of the best weight decay.
* ``descent`` (plain PyTorch, full batch, the 1257 training digits, 64 -> 256 -> 10, 1500 steps, lr 0.2, lam 0.01):
  ``loss + lam R`` after each step; the number of steps on which it rose (by more than 1e-6 relative), with momentum
  0 and 0.9; and, for lam in 1e-4 .. 10, whether SGD (momentum 0.9) or Adam (lr 1e-3) ever produced a NaN.
* ``same lam``: the live neurons of 64 -> 256 -> 10 at each lam with SGD and with Adam (from the digits sweep).

Runs use one thread. ``python3 -m benchmarks.prox [--quick] [--seeds 3] [--parts digits teacher descent]``
"""

from __future__ import annotations

import argparse
import functools
import math
import statistics
import time
from typing import Any

import pytorch_lightning as pl
import torch
from torch import nn
from torch.utils.data import DataLoader

from benchmarks._common import Supervised, markdown_table, quiet_lightning, save
from benchmarks.sparsity import Batches, Problem, digits, metric, teacher_student
from lightning_bv import find_neurons, lift_shared_weights, neuron_scores, prox_thresholds, proximal_step_, rbv_norm
from lightning_bv.callbacks import RBVRegularization

OPTIMIZERS: dict[str, Any] = {
    "SGD": functools.partial(torch.optim.SGD, lr=0.05, momentum=0.9),
    "Adam": functools.partial(torch.optim.Adam, lr=1e-3),
    "AdamW": functools.partial(torch.optim.AdamW, lr=1e-3),
}
GOAL = {"SGD": 25.0, "Adam": 35.0, "AdamW": 35.0}
GRIDS = {  # (weight decay, prox lam) per optimizer
    "SGD": ((1e-4, 1e-3, 1e-2), (0.003, 0.01, 0.03, 0.1)),
    "Adam": ((1e-4, 1e-3, 1e-2), (0.003, 0.01, 0.03, 0.1)),
    "AdamW": ((0.01, 0.1, 1.0), (0.003, 0.01, 0.03, 0.1)),
}
QUICK_GRIDS = {name: ((wd[1],), (lams[1],)) for name, (wd, lams) in GRIDS.items()}


def mlp(sizes: list[int]) -> nn.Sequential:
    layers: list[nn.Module] = []
    for a, b in zip(sizes[:-1], sizes[1:]):
        layers += [nn.Linear(a, b), nn.ReLU()]
    return nn.Sequential(*layers[:-1])


def live_per_layer(net: nn.Module, x: torch.Tensor) -> list[float]:
    """Percent of live neurons of each hidden layer, in order."""
    scores = neuron_scores(find_neurons(net, x[:2]))
    return [100.0 * float((s > 0).float().mean()) for s in scores.values()]


def fit(problem: Problem, hidden: list[int], optimizer: str, lam: float, wd: float, seed: int) -> dict[str, Any]:
    """One fit: the optimizer's weight decay ``wd``, or the prox at ``lam`` (when > 0)."""
    pl.seed_everything(seed, verbose=False)
    net = mlp([problem.d_in, *hidden, problem.d_out])
    loss = nn.functional.cross_entropy if problem.task == "classification" else nn.functional.mse_loss
    model = Supervised(net, loss, functools.partial(OPTIMIZERS[optimizer], weight_decay=wd))
    callbacks = [RBVRegularization(lam=lam)] if lam > 0 else []
    trainer = pl.Trainer(
        accelerator="cpu", max_epochs=problem.epochs, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0, callbacks=callbacks,
    )  # fmt: skip
    data = DataLoader(Batches(problem.x_train, problem.y_train, problem.batch_size, seed), batch_size=None)
    t0 = time.perf_counter()
    trainer.fit(model, data)
    net = model.net.eval()
    return {
        "val": metric(problem, net, problem.x_val, problem.y_val),
        "test": metric(problem, net, problem.x_test, problem.y_test),
        "live": live_per_layer(net, problem.x_train),
        "seconds": time.perf_counter() - t0,
    }


def mean_runs(runs: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "val": statistics.fmean(r["val"] for r in runs),
        "test": statistics.fmean(r["test"] for r in runs),
        "live": [statistics.fmean(r["live"][i] for r in runs) for i in range(len(runs[0]["live"]))],
        "seconds": statistics.median(r["seconds"] for r in runs),
    }


def sweep(problem: Problem, hidden: list[int], optimizer: str, grids: Any, seeds: list[int]) -> dict[str, Any]:
    wds, lams = grids[optimizer]
    decay = {wd: mean_runs([fit(problem, hidden, optimizer, 0.0, wd, s) for s in seeds]) for wd in wds}
    prox = {lam: mean_runs([fit(problem, hidden, optimizer, lam, 0.0, s) for s in seeds]) for lam in lams}
    better = (lambda a, b: a > b) if problem.task == "classification" else (lambda a, b: a < b)
    best_wd = functools.reduce(lambda a, b: b if better(decay[b]["val"], decay[a]["val"]) else a, wds)
    ref = decay[best_wd]["val"]
    if problem.task == "classification":
        ok = [lam for lam in lams if prox[lam]["val"] >= ref - 0.5]
    else:
        ok = [lam for lam in lams if prox[lam]["val"] <= ref]
    chosen = max(ok) if ok else functools.reduce(lambda a, b: b if better(prox[b]["val"], prox[a]["val"]) else a, lams)
    return {"weight_decay": decay, "prox": prox, "best_wd": best_wd, "lam": chosen}


# -- plain-PyTorch descent checks ----------------------------------------------------------------------------------
def descent(lam: float, momentum: float, steps: int, optimizer: str = "SGD", lr: float = 0.2) -> dict[str, Any]:
    """Full-batch training with the proximal step; the objective after every step."""
    from lightning_bv.modules.data import DigitsData

    d = DigitsData()
    torch.manual_seed(0)
    net = mlp([64, 256, 10])
    groups = find_neurons(net, d.x_train[:1])
    lift_shared_weights(net, groups, normalize=True)
    if optimizer == "SGD":
        opt: torch.optim.Optimizer = torch.optim.SGD(net.parameters(), lr=lr, momentum=momentum)
    else:
        opt = torch.optim.Adam(net.parameters(), lr=lr)
    values: list[float] = []
    for step in range(steps):
        opt.zero_grad()
        nn.functional.cross_entropy(net(d.x_train), d.y_train).backward()
        opt.step()
        proximal_step_(groups, prox_thresholds(groups, opt, lam), first=step == 0)
        with torch.no_grad():
            values.append(float(nn.functional.cross_entropy(net(d.x_train), d.y_train) + lam * rbv_norm(groups)))
    rises = sum(b > a * (1 + 1e-6) for a, b in zip(values, values[1:]))
    live = int(sum((s > 0).sum() for s in neuron_scores(groups).values()))
    return {"rises": rises, "nan": any(math.isnan(v) for v in values), "first": values[0], "last": values[-1],
            "live": live}  # fmt: skip


def run_descent(quick: bool) -> tuple[str, dict[str, Any]]:
    steps = 300 if quick else 1500
    rows, data = [], {}
    for momentum in (0.0, 0.9):
        r = descent(0.01, momentum, steps)
        data[f"momentum {momentum}"] = r
        rows.append([f"SGD lr 0.2, momentum {momentum}, lam 0.01", steps, r["rises"], r["first"], r["last"], r["live"]])
    table = markdown_table(["run", "steps", "rises of loss + lam R", "first", "last", "live of 256"], rows)
    nan_rows = []
    for lam in (1e-4, 1e-2, 10.0) if quick else (1e-4, 1e-3, 1e-2, 0.1, 1.0, 10.0):
        sgd = descent(lam, 0.9, steps)
        adam = descent(lam, 0.0, steps, optimizer="Adam", lr=1e-3)
        data[f"nan lam {lam}"] = {"SGD": sgd, "Adam": adam}
        nan_rows.append([f"{lam:g}", sgd["nan"], sgd["live"], adam["nan"], adam["live"]])
    table += "\n\n" + markdown_table(["lam", "SGD (0.9) NaN", "SGD live", "Adam NaN", "Adam live"], nan_rows)
    return table, data


# -- the script ----------------------------------------------------------------------------------------------------
def run_digits(seeds: list[int], quick: bool, log: Any) -> tuple[str, dict[str, Any]]:
    problem = digits(epochs=10 if quick else 60)
    grids = QUICK_GRIDS if quick else GRIDS
    rows, lam_rows, data = [], {}, {}
    for hidden in ([256], [256, 256]):
        arch = "64-" + "-".join(map(str, hidden)) + "-10"
        for opt in OPTIMIZERS:
            s = sweep(problem, hidden, opt, grids, seeds)
            data[f"{arch} {opt}"] = s
            wd, pr = s["weight_decay"][s["best_wd"]], s["prox"][s["lam"]]
            gap = wd["test"] - pr["test"]
            met = gap <= 0.5 and all(v <= GOAL[opt] for v in pr["live"])
            rows.append([arch, opt, f"{s['best_wd']:g}", wd["test"], f"{s['lam']:g}", pr["test"],
                         " / ".join(f"{v:.1f}%" for v in pr["live"]), gap, f"<= {GOAL[opt]:.0f}%",
                         "met" if met else "MISSED"])  # fmt: skip
            log(rows[-1])
            if len(hidden) == 1:
                for lam, r in s["prox"].items():
                    lam_rows.setdefault(lam, {})[opt] = r["live"][0]
    table = markdown_table(
        ["model", "optimizer", "best weight decay", "its test %", "prox lam", "prox test %", "live per hidden layer",
         "gap (points)", "goal", ""], rows)  # fmt: skip
    header = ["lam", *OPTIMIZERS]
    same = [
        [f"{lam:g}", *(f"{lam_rows[lam].get(o, float('nan')):.1f}%" for o in OPTIMIZERS)] for lam in sorted(lam_rows)
    ]
    table += "\n\nLive neurons of 64-256-10 at the same lam (mean over seeds):\n\n" + markdown_table(header, same)
    return table, data


def run_teacher(seeds: list[int], quick: bool, log: Any) -> tuple[str, dict[str, Any]]:
    problem = teacher_student(epochs=20 if quick else 100)
    grids = {"Adam": ((), (0.001, 0.003, 0.01) if not quick else (0.003,))}
    wds = (0.01, 0.1) if quick else (0.01, 0.1, 1.0)
    decay = {wd: mean_runs([fit(problem, [problem.width], "AdamW", 0.0, wd, s) for s in seeds]) for wd in wds}
    best = min(wds, key=lambda wd: decay[wd]["val"])
    prox = {
        lam: mean_runs([fit(problem, [problem.width], "Adam", lam, 0.0, s) for s in seeds]) for lam in grids["Adam"][1]
    }
    ok = [lam for lam in prox if prox[lam]["val"] <= decay[best]["val"]]
    lam = max(ok) if ok else min(prox, key=lambda k: prox[k]["val"])
    live = prox[lam]["live"][0] * problem.width / 100
    met = live <= 8 and prox[lam]["test"] <= decay[best]["test"]
    rows = [["AdamW weight decay", f"{best:g}", decay[best]["test"], decay[best]["live"][0] * problem.width / 100, ""],
            ["prox (Adam)", f"{lam:g}", prox[lam]["test"], live, "met" if met else "MISSED"]]  # fmt: skip
    log(rows)
    table = markdown_table(["method", "lam / weight decay", "test MSE", "live of 150", "goal (<= 8, MSE <= WD)"], rows)
    return table, {"weight_decay": decay, "prox": prox, "lam": lam, "best_wd": best}


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small settings, to check that it runs")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--parts", nargs="+", default=["digits", "teacher", "descent"])
    args = parser.parse_args(argv)
    quiet_lightning()
    torch.set_num_threads(1)
    seeds = list(range(1 if args.quick else args.seeds))
    tables, data = [], {}
    for part in args.parts:
        t0 = time.perf_counter()
        if part == "digits":
            table, d = run_digits(seeds, args.quick, print)
        elif part == "teacher":
            table, d = run_teacher(seeds, args.quick, print)
        else:
            table, d = run_descent(args.quick)
        tables.append(f"## {part} ({time.perf_counter() - t0:.0f} s)\n\n{table}")
        data[part] = d
        print(tables[-1], flush=True)
    text = "\n\n".join(tables)
    if not args.quick:
        save("prox", text, data)
    return text


if __name__ == "__main__":
    main()
