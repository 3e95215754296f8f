"""What the callbacks cost: step time with each RBVRegularization mode and with BVMonitor, over step time without,
on three models; and the time of ``path_norm`` over one forward pass.

Models (SGD with momentum, a real Lightning Trainer, random data, ``benchmarks.overhead.alternating_fit``):

* ``MLP``: 256 -> 4 x 1024 -> 10, batch 256 (``benchmarks.overhead.MLP``);
* ``CNN``: three 3x3 conv + BatchNorm + ReLU layers (16, 32, 64 channels; max-pool after the second), global
  average pool, Linear -> 10; batch 64 of 3 x 32 x 32;
* ``transformer``: ``nn.TransformerEncoder``, 4 layers, d_model 128, 4 heads, feed-forward 512 (ReLU: the neurons
  the callbacks see), dropout 0; batch 32 of 32 tokens, mean-pooled, Linear -> 10.

Each fit is an A/B test (:class:`benchmarks._common.Alternating`, as in ``benchmarks.overhead``): the callback runs
in every other block of steps and is absent in the blocks between; the ratio is the mean step time with it over the
mean without, in the same fit, so it is amortized (the lazy update every ``every_n_steps`` steps, the logging of
``bv/*`` every 50 steps, BVMonitor's event every 50 steps count in full) and free of fit-to-fit drift. Blocks are 50
steps (one ``bv/*`` logging step and one BVMonitor event per block; its spectra, every 1000 steps, never run: see
``benchmarks/monitor_overhead.py``). The median over repeats is reported. The callbacks run with ``lam=1e-4`` and
their defaults (the prox every step, the gradient modes every 8 steps), and each mode also with the other of 1 and 8.
``path_norm``: ``lightning_bv.path_norm(model, x, p)`` for p=1 and p=2 (float64, one forward pass each) over one
float32 forward pass of the same batch, no grad, medians over repeats in which the three run in turn (so a slower
stretch of the shared machine slows all three alike).

    python -m benchmarks.cost [--quick] [--repeats 3] [--blocks 2] [--models MLP CNN transformer]
    python -m benchmarks.cost --only path_norm   # the path_norm table alone, written to results/path_norm.md
"""

from __future__ import annotations

import argparse
import functools
import statistics
import time
from collections.abc import Callable
from typing import Any

import pytorch_lightning as pl
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from benchmarks._common import Alternating, Supervised, markdown_table, quiet_lightning, save
from benchmarks.overhead import BLOCK, MLP, alternating_fit, summarize
from lightning_bv.callbacks import RBVRegularization
from lightning_bv.callbacks.bv_monitor import BVMonitor
from lightning_bv.functional.path_norm import path_norm


def cnn() -> nn.Module:
    def block(c_in: int, c_out: int) -> list[nn.Module]:
        return [nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU()]

    return nn.Sequential(
        *block(3, 16), *block(16, 32), nn.MaxPool2d(2), *block(32, 64),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, 10),
    )  # fmt: skip


class Transformer(nn.Module):
    def __init__(self, d_model: int = 128, layers: int = 4) -> None:
        super().__init__()
        layer = nn.TransformerEncoderLayer(d_model, 4, dim_feedforward=4 * d_model, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.head = nn.Linear(d_model, 10)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.encoder(x).mean(1))


# model -> (network factory, input shape of one batch)
MODELS: dict[str, tuple[Callable[[], nn.Module], tuple[int, ...]]] = {
    "MLP": (lambda: MLP().net, (256, 256)),
    "CNN": (cnn, (64, 3, 32, 32)),
    "transformer": (Transformer, (32, 32, 128)),
}
CONFIGS: dict[str, Callable[[], pl.Callback]] = {}
for _mode in ("prox", "penalty", "weight_decay"):
    _default = RBVRegularization(lam=1e-4, mode=_mode).every_n_steps
    CONFIGS[f"{_mode} (default, every {_default})"] = functools.partial(
        lambda m: RBVRegularization(lam=1e-4, mode=m), _mode
    )
    _other = 8 if _default == 1 else 1
    CONFIGS[f"{_mode} every {_other}"] = functools.partial(
        lambda m, k: RBVRegularization(lam=1e-4, mode=m, every_n_steps=k), _mode, _other
    )
CONFIGS["BVMonitor"] = BVMonitor


class Batches(Dataset):
    """``steps`` ready-made batches (cycling over 4 distinct ones: no per-sample collation cost)."""

    def __init__(self, shape: tuple[int, ...], steps: int) -> None:
        g = torch.Generator().manual_seed(0)
        self.x = torch.randn(4, *shape, generator=g)
        self.y = torch.randint(0, 10, (4, shape[0]), generator=g)
        self.steps = steps

    def __len__(self) -> int:
        return self.steps

    def __getitem__(self, i: int) -> tuple[Tensor, Tensor]:
        return self.x[i % 4], self.y[i % 4]


def module_for(model: str) -> Supervised:
    torch.manual_seed(0)
    sgd = functools.partial(torch.optim.SGD, lr=0.01, momentum=0.9)
    return Supervised(MODELS[model][0](), nn.functional.cross_entropy, sgd)


@torch.no_grad()
def path_norm_cost(model: str, repeats: int) -> dict[str, Any]:
    """Median ms of one forward pass and of path_norm p=1 and p=2; or why path_norm does not apply."""
    net = module_for(model).net.eval()
    x = Batches(MODELS[model][1], 1).x[0]

    def ms(f: Callable[[], Any]) -> float:
        t0 = time.perf_counter()
        f()
        return 1e3 * (time.perf_counter() - t0)

    calls: dict[str, Callable[[], Any]] = {"forward_ms": lambda: net(x)}
    out: dict[str, Any] = {}
    try:
        for p in (1, 2):
            out[f"path_norm_l{p}"] = float(path_norm(net, x[:1], p))  # also the warm-up
            calls[f"path_norm_l{p}_ms"] = functools.partial(path_norm, net, x[:1], p)
    except Exception as e:  # a model path_norm does not support: say why
        out["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:160]}"
    net(x)
    times: dict[str, list[float]] = {k: [] for k in calls}
    for _ in range(repeats):
        for k, f in calls.items():
            times[k].append(ms(f))
    return {**out, **{k: statistics.median(v) for k, v in times.items()}}


def path_norm_table(models: list[str], repeats: int) -> tuple[str, dict[str, dict[str, Any]]]:
    """The table of path_norm's time over one forward, per model, and the measurements."""
    norms = {m: path_norm_cost(m, repeats) for m in models}
    norm_rows = []
    for m, r in norms.items():
        if "error" in r:
            norm_rows.append([m, r["forward_ms"], "-", "-", "-", r["error"]])
        else:
            ratio = (r["path_norm_l1_ms"] + r["path_norm_l2_ms"]) / 2 / r["forward_ms"]
            norm_rows.append(
                [m, r["forward_ms"], r["path_norm_l1_ms"], r["path_norm_l2_ms"], ratio,
                 f"l1 {r['path_norm_l1']:.3g}, l2 {r['path_norm_l2']:.3g}"]
            )  # fmt: skip
    norm_header = ["model", "forward ms (batch)", "path_norm p=1 ms", "path_norm p=2 ms", "path_norm / forward",
                   "values at init"]  # fmt: skip
    return markdown_table(norm_header, norm_rows), norms


def main(argv: list[str] | None = None) -> str:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--blocks", type=int, default=2, help="blocks with the callback (and as many without) per fit")
    p.add_argument("--models", nargs="*", default=list(MODELS), choices=list(MODELS))
    p.add_argument("--configs", nargs="*", default=list(CONFIGS), choices=list(CONFIGS))
    p.add_argument("--quick", action="store_true", help="one repeat of one block each")
    p.add_argument("--only", choices=["path_norm"], help="only this part (written to results/<part>.md)")
    args = p.parse_args(argv)
    quiet_lightning()
    norm_repeats = 3 if args.quick else 10
    if args.only == "path_norm":
        table, norms = path_norm_table(args.models, norm_repeats)
        table += f"\n\n{norm_repeats} repeats; {torch.get_num_threads()} torch threads."
        print(table)
        save("path_norm", table, {"repeats": norm_repeats, "path_norm": norms})
        return table
    repeats, blocks = (1, 1) if args.quick else (args.repeats, args.blocks)
    runs: dict[str, dict[str, list[Alternating]]] = {m: {c: [] for c in args.configs} for m in args.models}
    for _ in range(repeats):
        for m in args.models:
            for c in args.configs:
                data = DataLoader(Batches(MODELS[m][1], BLOCK * (2 * blocks + 1)), batch_size=None)
                runs[m][c].append(alternating_fit(CONFIGS[c](), data, blocks, BLOCK, module_for(m)))
    rows = [[m, c, *summarize(runs[m][c])] for m in args.models for c in args.configs]
    header = [
        "model",
        "configuration",
        "step ms off",
        "step ms on",
        "ratio on/off",
        "range over repeats",
        "goal <= 1.05",
    ]
    table = markdown_table(header, rows)
    norm_table, norms = path_norm_table(args.models, norm_repeats)
    table += "\n\n" + norm_table
    table += (
        f"\n\n{repeats} repeat(s); each fit {blocks} block(s) with the callback and {blocks} without; "
        f"{torch.get_num_threads()} torch threads."
    )
    print(table)
    ratios = {m: {c: [r.ratio() for r in rs] for c, rs in by_c.items()} for m, by_c in runs.items()}
    save("cost", table, {"repeats": repeats, "blocks": blocks, "ratios": ratios, "path_norm": norms})
    return table


if __name__ == "__main__":
    main()
