"""Inference time of a compacted MLP over the original, next to the parameter ratio (issue 4).

MLP 64 -> 4 x 1024 -> 10 on scikit-learn's bundled digits (8x8 images, 10 classes; nothing downloads), trained in a
plain PyTorch loop with SGD and the proximal step of the path-norm after every step (what
``RBVRegularization(mode="prox", every_n_steps=1)`` does: the chain's hidden matrices lifted to ``A B`` before
the optimizer is built, the thresholds from the optimizer) until most neurons are dead. Then
``lightning_bv.compact`` (tol=0: the same function; the products merged back into dense weights) and forward passes
of both models on one batch, in eval mode without grad (the original as the dense MLP it started as, with the
trained weights): the two are interleaved (original, compacted, original, ...) so drift on a shared machine hits both
alike; the time is the median over repeats.

    python -m benchmarks.compaction [--lam 0.03] [--steps 200] [--warmup 50] [--repeats 20] [--batch 256]
"""

from __future__ import annotations

import argparse
import copy
import time

import torch
from sklearn.datasets import load_digits
from torch import nn

from benchmarks._common import markdown_table, median, save
from lightning_bv import lift_shared_weights, prox_thresholds, proximal_step_, remove_low_rank
from lightning_bv.functional.rbv import neuron_scores
from lightning_bv.neurons import find_neurons
from lightning_bv.transforms.compact import compact


def mlp(d_in: int = 64, width: int = 1024, depth: int = 4, d_out: int = 10) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i in range(depth):
        layers += [nn.Linear(d_in if i == 0 else width, width), nn.ReLU()]
    return nn.Sequential(*layers, nn.Linear(width, d_out))


def data() -> tuple[torch.Tensor, torch.Tensor]:
    x, y = load_digits(return_X_y=True)
    x = torch.tensor(x, dtype=torch.float32)
    return (x - x.mean(0)) / (x.std(0) + 1e-6), torch.tensor(y)


def train(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, lam: float, steps: int, warmup: int, lr: float = 0.05
) -> None:
    """SGD with momentum; after ``warmup`` plain steps, the proximal step of ``lam * R`` after every step."""
    groups = find_neurons(model, x[:2])
    lift_shared_weights(model, groups, normalize=True)
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    g = torch.Generator().manual_seed(0)
    for step in range(steps):
        idx = torch.randint(0, len(x), (128,), generator=g)
        opt.zero_grad()
        nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
        opt.step()
        if step >= warmup:  # from a random start the prox kills every neuron before the data can hold any
            proximal_step_(groups, prox_thresholds(groups, opt, lam), first=step == warmup)


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    return float((model(x).argmax(1) == y).float().mean())


@torch.no_grad()
def time_interleaved(models: list[nn.Module], x: torch.Tensor, repeats: int, calls: int) -> list[float]:
    """Median wall time of one forward pass (ms) of each model, runs interleaved."""
    for m in models:  # warm-up
        for _ in range(3):
            m(x)
    times: list[list[float]] = [[] for _ in models]
    for _ in range(repeats):
        for i, m in enumerate(models):
            t0 = time.perf_counter()
            for _ in range(calls):
                m(x)
            times[i].append((time.perf_counter() - t0) / calls * 1e3)
    return [median(t) for t in times]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lam", type=float, default=0.03)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--warmup", type=int, default=50)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--calls", type=int, default=5)
    parser.add_argument("--batch", type=int, default=256)
    args = parser.parse_args()

    torch.manual_seed(0)
    x, y = data()
    model = mlp()
    t0 = time.perf_counter()
    train(model, x, y, args.lam, args.steps, args.warmup)
    train_s = time.perf_counter() - t0
    model.eval()
    original = remove_low_rank(copy.deepcopy(model))  # the trained function as the plain dense MLP it started as
    groups = find_neurons(model, x[:2])
    scores = neuron_scores(groups)
    live = sum(int((s > 0).sum()) for s in scores.values())
    report = compact(model, groups)
    print(report)
    with torch.no_grad():
        diff = float((model(x) - original(x)).abs().max())
    batch = x[: args.batch]
    t_orig, t_comp = time_interleaved([original, model], batch, args.repeats, args.calls)
    params_before = sum(p.numel() for p in original.parameters())
    ratio = report.params_after / params_before
    acc_o, acc_c = accuracy(original, x, y), accuracy(model, x, y)
    header = ["model", "neurons", "parameters", "param ratio", f"forward ms (batch {len(batch)})", "time ratio", "acc"]
    rows = [
        ["original", report.neurons_before, params_before, 1.0, t_orig, 1.0, acc_o],
        ["compacted", report.neurons_after, report.params_after, ratio, t_comp, t_comp / t_orig, acc_c],
    ]
    table = markdown_table(header, rows)
    print()
    print(table)
    print(
        f"\nlive neurons before compaction: {live}; max |f_compacted - f_original| over the data: {diff:.2e}; "
        f"training: {args.steps} steps ({args.warmup} without prox), lam={args.lam:g}, {train_s:.1f} s; "
        f"timing: median of {args.repeats} "
        f"interleaved repeats of {args.calls} calls; threads: {torch.get_num_threads()}"
    )
    save(
        "compaction",
        table,
        {
            "lam": args.lam,
            "steps": args.steps,
            "warmup": args.warmup,
            "params_before": params_before,
            "params_after": report.params_after,
            "neurons_before": report.neurons_before,
            "neurons_after": report.neurons_after,
            "forward_ms_original": t_orig,
            "forward_ms_compacted": t_comp,
            "max_abs_diff": diff,
            "accuracy_original": acc_o,
            "accuracy_compacted": acc_c,
        },
    )


if __name__ == "__main__":
    main()
