"""Weight decay vs the path-norm prox on the same network and data: test accuracy and neurons kept.

Weight decay on (W, V) equals the path-norm R = sum_k ||v_k|| ||w_k|| at balance (THEORY.md section 3), so both
train towards the same function space; only the proximal step makes unneeded neurons *exactly* zero, so that
compaction can cut them out. This example trains one RBVNet on scikit-learn's digits four times with the same
optimizer (SGD, momentum 0.9) and the same strength lam:

  none           no regularization
  weight decay   the optimizer's weight_decay=lam (every parameter, biases and skips included: the usual practice)
  neuron wd      RBVRegularization(lam, mode="weight_decay"): weight decay on the neurons' weights only
  prox           RBVRegularization(lam, mode="prox")

then compacts each model with tol=0 (the function is unchanged) and prints test accuracy, neurons kept (exact zeros
removed), neurons with a score above 1e-3 of the largest (nearly dead ones count as dead here), and parameters. It
saves a bar plot of accuracy and neurons kept.

    python examples/digits.py [--epochs 30] [--lam 0.003] [--out digits.png] [--smoke]
"""

from __future__ import annotations

import argparse
import warnings

import pytorch_lightning as pl
import torch

import lightning_bv as lbv
from lightning_bv.callbacks import RBVRegularization
from lightning_bv.modules import BVModule, DigitsData

METHODS = ("none", "weight decay", "neuron wd", "prox")


def train(method: str, lam: float, epochs: int, limit_batches: int | None = None) -> dict[str, float]:
    pl.seed_everything(0, verbose=False)  # the same initial network and batches for every method
    data = DigitsData(batch_size=64)
    net = lbv.RBVNet(in_features=64, out_features=10, width=128, bottleneck=32, depth=2)
    module = BVModule(net, optimizer="sgd", lr=0.05, weight_decay=lam if method == "weight decay" else 0.0)
    callbacks = []
    if method in ("neuron wd", "prox"):
        callbacks.append(RBVRegularization(lam=lam, mode="prox" if method == "prox" else "weight_decay"))
    trainer = pl.Trainer(
        max_epochs=epochs,
        limit_train_batches=limit_batches,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=callbacks,
    )
    trainer.fit(module, data)
    example = data.example_input_array
    before = sum(p.numel() for p in module.parameters())
    groups = lbv.find_neurons(net, example)
    scores = torch.cat([s.detach() for s in lbv.neuron_scores(groups).values()])
    report = lbv.compact(net, groups, tol=0.0)  # removes exactly-dead neurons only: same function
    acc = trainer.test(module, data, verbose=False)[0]["test_acc"]
    return {
        "test_acc": float(acc),
        "neurons": float(report.neurons_before),
        "neurons_kept": float(report.neurons_after),
        "neurons_above_1e-3": float((scores > 1e-3 * scores.max()).sum()),
        "params_before": float(before),
        "params_after": float(sum(p.numel() for p in module.parameters())),
    }


def table(results: dict[str, dict[str, float]]) -> str:
    rows = [("method", "test acc", "neurons kept", "score > 1e-3 max", "parameters")]
    for method, r in results.items():
        rows.append(
            (
                method,
                f"{r['test_acc']:.4f}",
                f"{r['neurons_kept']:.0f} / {r['neurons']:.0f}",
                f"{r['neurons_above_1e-3']:.0f}",
                f"{r['params_before']:,.0f} -> {r['params_after']:,.0f}",
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = [
        "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths))) for row in rows
    ]
    lines.insert(1, "-" * len(lines[0]))
    return "\n".join(lines)


def plot(results: dict[str, dict[str, float]], out: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(results)
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    ax1.bar(names, [results[n]["test_acc"] for n in names], color="C0")
    ax1.set_ylim(min(0.8, *(results[n]["test_acc"] for n in names)), 1.0)
    ax1.set_ylabel("test accuracy")
    ax2.bar(names, [results[n]["neurons_kept"] for n in names], color="C1", label="kept by compaction (tol=0)")
    ax2.bar(names, [results[n]["neurons_above_1e-3"] for n in names], color="C2", width=0.4, label="score > 1e-3 max")
    ax2.set_ylabel("ReLU neurons")
    ax2.legend(fontsize=8)
    fig.suptitle("Same RBVNet on digits: only the prox makes neurons exactly zero")
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict[str, dict[str, float]]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--lam", type=float, default=0.003)
    p.add_argument("--out", default="digits.png")
    p.add_argument("--smoke", action="store_true", help="one epoch of 3 batches per method, to check that it runs")
    args = p.parse_args(argv)
    warnings.filterwarnings("ignore", ".*does not have many workers.*")
    warnings.filterwarnings("ignore", ".*number of training batches.*")
    epochs, limit = (1, 3) if args.smoke else (args.epochs, None)
    results = {m: train(m, args.lam, epochs, limit) for m in METHODS}
    print(table(results))
    plot(results, args.out)
    print(f"saved {args.out}")
    return results


if __name__ == "__main__":
    main()
