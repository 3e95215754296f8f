"""A wide shallow ReLU net fit to ~20 noisy 1-D points with the path-norm prox: the result is a linear spline.

Parhi & Nowak's representer theorem says the minimizer of loss + lam * TV(f') over all functions is a linear
spline with at most N - 2 knots for N points, and that a wide ReLU network trained with the path-norm finds it.
This example trains a 256-neuron network with RBVRegularization(mode="prox"), then prints the number of
active neurons and knots, the seminorm R = sum_k |v_k| |w_k| and TV(f') measured on the function itself, and
saves a plot of the data, the fit and its knots.

    python examples/spline_1d.py [--steps 3000] [--out spline_1d.png] [--smoke]
"""

from __future__ import annotations

import argparse
import warnings

import pytorch_lightning as pl
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import lightning_bv as lbv
from lightning_bv.callbacks import RBVRegularization


def make_data(n: int = 20, noise: float = 0.1, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.linspace(-1, 1, n).unsqueeze(1)
    y = torch.sin(3 * x) + 0.5 * x + noise * torch.randn(n, 1, generator=g)
    return x, y


class Shallow(pl.LightningModule):
    """A plain LightningModule: nothing in it knows about lightning_bv."""

    def __init__(self, width: int = 256, lr: float = 1e-2) -> None:
        super().__init__()
        self.lr = lr
        self.net = nn.Sequential(nn.Linear(1, width), nn.ReLU(), nn.Linear(width, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = nn.functional.mse_loss(self(x), y)
        self.log("train_loss", loss, prog_bar=True)
        return loss

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=self.lr)


def knots(net: nn.Sequential, tol: float = 1e-6) -> torch.Tensor:
    """Distinct knots -b_k / w_k of the live neurons (|v_k| |w_k| > 0), equal ones merged."""
    w, b, v = net[0].weight.detach().squeeze(1), net[0].bias.detach(), net[2].weight.detach().squeeze(0)
    live = (w.abs() * v.abs() > 0) & (w != 0)
    t = torch.sort(-b[live] / w[live]).values
    if t.numel() == 0:
        return t
    keep = torch.cat([torch.tensor([True]), torch.diff(t) > tol])
    return t[keep]


def interval_knots(net: nn.Sequential, x: torch.Tensor) -> int:
    """Knots left after merging, between each two consecutive data points, the knots whose slope changes share a sign.

    Such knots can be replaced by one (where the two outer lines meet) without changing the values at the data or
    TV(f'): the representer theorem's N - 2 bounds the knots of that sparsest form. A gradient method may spread one
    knot over a cluster of nearby ones.
    """
    w, b, v = net[0].weight.detach().squeeze(1), net[0].bias.detach(), net[2].weight.detach().squeeze(0)
    live = (w.abs() * v.abs() > 0) & (w != 0)
    where = torch.searchsorted(torch.sort(x.flatten()).values, -b[live] / w[live])
    return len({(int(i), int(s)) for i, s in zip(where, torch.sign(v[live] * w[live].abs()))})


def tv_of_derivative(f: nn.Module, lo: float, hi: float, n: int = 100_001) -> float:
    """TV(f') measured on the function: the sum of slope jumps on a fine float64 grid."""
    x = torch.linspace(lo, hi, n, dtype=torch.float64).unsqueeze(1)
    with torch.no_grad():
        y = f.double()(x).squeeze(1)
    f.float()
    slopes = torch.diff(y) / torch.diff(x.squeeze(1))
    return torch.diff(slopes).abs().sum().item()


def main(argv: list[str] | None = None) -> dict[str, float]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=3000)
    p.add_argument("--lam", type=float, default=0.003)
    p.add_argument("--out", default="spline_1d.png")
    p.add_argument("--smoke", action="store_true", help="a few steps, to check that it runs")
    args = p.parse_args(argv)
    steps = 20 if args.smoke else args.steps
    warnings.filterwarnings("ignore", ".*does not have many workers.*")
    pl.seed_everything(0, verbose=False)
    x, y = make_data()
    model = Shallow()
    trainer = pl.Trainer(
        max_steps=steps,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[RBVRegularization(lam=args.lam, mode="prox")],
    )
    trainer.fit(model, DataLoader(TensorDataset(x, y), batch_size=len(x)))

    groups = lbv.find_neurons(model.net, x[:2])
    lbv.balance_(groups)
    scores = lbv.neuron_scores(groups)["0"]
    kn = knots(model.net)
    lo, hi = (
        min(-1.5, kn.min().item() - 0.1) if kn.numel() else -1.5,
        max(1.5, kn.max().item() + 0.1) if kn.numel() else 1.5,
    )
    result = {
        "points": float(len(x)),
        "active_neurons": float((scores > 0).sum()),
        "knots": float(kn.numel()),
        "knots_merged_between_data": float(interval_knots(model.net, x)),
        "knots_inside_data": float(((kn > x.min()) & (kn < x.max())).sum()),
        "rbv_norm": lbv.rbv_norm(groups).item(),
        "tv_of_derivative": tv_of_derivative(model.net, lo, hi),
        "train_mse": nn.functional.mse_loss(model(x), y).item(),
    }
    for k, v in result.items():
        print(f"{k:>18}: {v:.6g}")
    plot(model.net, x, y, kn, args.out)
    print(f"saved {args.out}")
    return result


def plot(net: nn.Module, x: torch.Tensor, y: torch.Tensor, kn: torch.Tensor, out: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    grid = torch.linspace(-1.2, 1.2, 500).unsqueeze(1)
    with torch.no_grad():
        fit = net(grid).squeeze(1)
        at_knots = net(kn.unsqueeze(1)).squeeze(1) if kn.numel() else kn
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.scatter(x.squeeze(1), y.squeeze(1), color="k", s=18, label="data", zorder=3)
    ax.plot(grid.squeeze(1), fit, color="C0", label="fit (linear spline)")
    inside = (kn > -1.2) & (kn < 1.2)
    ax.scatter(
        kn[inside], at_knots[inside], marker="x", color="C3", s=50, label=f"knots ({int(inside.sum())})", zorder=4
    )
    ax.set_xlabel("x")
    ax.set_ylabel("f(x)")
    ax.legend()
    ax.set_title("Wide ReLU net + path-norm prox = a sparse linear spline")
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)


if __name__ == "__main__":
    main()
