"""Where the proximal update's time goes, part by part, against one training step of the same model.

The MLP of ``benchmarks.overhead`` (256 -> 4 x 1024 -> 10, batch 256), lifted as ``RBVRegularization`` lifts it
(its three hidden matrices written as ``A B``), trained with SGD (momentum 0.9) or Adam, in plain PyTorch (no
Lightning, so that only the parts are timed):

* ``step``: zero_grad, forward, cross-entropy, backward, ``optimizer.step()``;
* ``thresholds``: :func:`lightning_bv.prox_thresholds` (Adam: one read of each output tensor's second moments);
* ``norms``: ``||w_k||`` and ``||v_k||`` of every group;
* ``projection``: ``w_k, b_k`` divided by ``||w_k||``;
* ``shrink``: the group soft-threshold of ``v_k``;
* ``update``: the whole :func:`lightning_bv.proximal_step_` with those thresholds (norms, projection, shrink),
  plus ``thresholds``: what the callback runs after every optimizer step.

The parts are timed one after the other inside each repeat (interleaved), medians over repeats, in ms; ratios are
over ``step``. Also the lifted model's step over the plain (unlifted) model's, and the step and update of the CNN
and transformer of ``benchmarks.cost``, which are not lifted.

    python -m benchmarks.prox_parts [--repeats 30] [--optimizer sgd adam]
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from benchmarks._common import markdown_table, median, save
from benchmarks.overhead import MLP, OPTIMIZERS
from lightning_bv import find_neurons, lift_shared_weights, prox_thresholds, proximal_step_
from lightning_bv.functional.rbv import _shrink_, _unit, group_norms

PARTS = ("step", "thresholds", "norms", "projection", "shrink", "update")


def _model(lifted: bool, optimizer: str) -> tuple[nn.Module, Any, Any, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    net = MLP().net
    x, y = torch.randn(256, 256), torch.randint(0, 10, (256,))
    groups = find_neurons(net, x[:2])
    if lifted:
        lift_shared_weights(net, groups, normalize=True)
        groups = find_neurons(net, x[:2])
    opt = OPTIMIZERS[optimizer](net.parameters())
    return net, groups, opt, x, y


def _step(net: nn.Module, opt: Any, x: torch.Tensor, y: torch.Tensor) -> None:
    opt.zero_grad(set_to_none=True)
    nn.functional.cross_entropy(net(x), y).backward()
    opt.step()


def _ms(fn: Callable[[], Any]) -> float:
    t = time.perf_counter()
    fn()
    return (time.perf_counter() - t) * 1e3


def parts(optimizer: str, repeats: int, lam: float = 1e-4) -> dict[str, float]:
    net, groups, opt, x, y = _model(True, optimizer)
    plain, _, plain_opt, _, _ = _model(False, optimizer)
    for _ in range(3):  # warm up; the optimizer gets its state
        _step(net, opt, x, y)
        _step(plain, plain_opt, x, y)
    proximal_step_(groups, prox_thresholds(groups, opt, lam), first=True)

    def norms() -> None:
        for g in groups:
            group_norms(g)

    @torch.no_grad()
    def projection() -> None:
        for g in groups:
            a, _ = _unit(group_norms(g)[0])
            for s in g.w_slots + g.b_slots:
                s.scale_(a)

    @torch.no_grad()
    def shrink() -> None:
        for g in groups:
            _shrink_(g, taus[g.name], group_norms(g)[1], 2)

    taus = prox_thresholds(groups, opt, lam)
    times: dict[str, list[float]] = {p: [] for p in (*PARTS, "plain step")}
    for _ in range(repeats):
        times["step"].append(_ms(lambda: _step(net, opt, x, y)))
        times["plain step"].append(_ms(lambda: _step(plain, plain_opt, x, y)))
        times["thresholds"].append(_ms(lambda: prox_thresholds(groups, opt, lam)))
        times["norms"].append(_ms(norms))
        times["projection"].append(_ms(projection))
        times["shrink"].append(_ms(shrink))
        times["update"].append(_ms(lambda: proximal_step_(groups, prox_thresholds(groups, opt, lam))))
    return {p: median(v) for p, v in times.items()}


def unlifted(model: str, repeats: int, lam: float = 1e-4) -> dict[str, float]:
    """Step and update (SGD) of a model of ``benchmarks.cost`` that has no shared matrix (nothing is lifted)."""
    from benchmarks.cost import MODELS

    make, shape = MODELS[model]
    torch.manual_seed(0)
    net, x = make(), torch.randn(*shape)
    y = torch.randint(0, 10, (shape[0],))
    groups = find_neurons(net, x[:2])
    opt = OPTIMIZERS["sgd"](net.parameters())
    for _ in range(3):
        _step(net, opt, x, y)
    proximal_step_(groups, prox_thresholds(groups, opt, lam), first=True)
    steps, updates = [], []
    for _ in range(repeats):
        steps.append(_ms(lambda: _step(net, opt, x, y)))
        updates.append(_ms(lambda: proximal_step_(groups, prox_thresholds(groups, opt, lam))))
    return {"groups": float(len(groups)), "step": median(steps), "update": median(updates)}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=30)
    p.add_argument("--optimizer", nargs="+", default=["sgd", "adam"], choices=list(OPTIMIZERS))
    p.add_argument("--name", default="prox_parts", help="results file name under benchmarks/results")
    args = p.parse_args(argv)
    torch.set_num_threads(2)
    results = {o: parts(o, args.repeats) for o in args.optimizer}
    rows = []
    for o, r in results.items():
        for part in PARTS:
            rows.append([o, part, r[part], r[part] / r["step"]])
        rows.append([o, "lifted step / plain step", r["step"], r["step"] / r["plain step"]])
    header = ["optimizer", "part", "median ms", "over the lifted step"]
    table = markdown_table(header, rows)
    others = {m: unlifted(m, args.repeats) for m in ("CNN", "transformer")}
    table += "\n\nModels with no shared matrix (not lifted; `benchmarks.cost`'s CNN and transformer, SGD):\n\n"
    table += markdown_table(
        ["model", "groups", "step ms", "update ms", "update / step"],
        [[m, int(r["groups"]), r["step"], r["update"], r["update"] / r["step"]] for m, r in others.items()],
    )
    table += (
        f"\n\n{args.repeats} repeats, 2 torch threads; `norms` are computed inside `projection` and `shrink` too (as "
        "the update does once per group), so the parts overlap; `update` is what the callback adds per step."
    )
    print(table)
    save(args.name, table, {"repeats": args.repeats, "results": results, "unlifted": others})


if __name__ == "__main__":
    main()
