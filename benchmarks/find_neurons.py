"""Time of ``find_neurons`` on a resnet18-shaped model over Torch-Pruning's ``DependencyGraph().build_dependency``.

Both run the model once with autograd on (Torch-Pruning reads the autograd graph; ``find_neurons`` records the ops
with a ``TorchFunctionMode``) and then analyse what they saw, on the same model (``tests/zoo.py``'s
``resnet18_shaped``: torchvision's resnet18 layout, random init, eval mode) and the same input (batch 1,
3 x 224 x 224). For scale: the plain forward without and with grad, and the two halves of ``find_neurons`` (the
recorded forward, ``lightning_bv._trace.Trace``, and the analysis of the trace, ``lightning_bv.neurons.analyze``).
In every repeat each is called once in turn, so a slower stretch of the shared machine slows all alike, and the
order rotates from repeat to repeat (what runs after a large forward pays for some of its memory being freed or
reused); the table shows medians and minima, and the ratio of the medians. Goal: ``find_neurons`` <= Torch-Pruning.
At 224 x 224 the forward is most of both; ``--size 32`` makes it small, so that the table shows what each adds to it.

    python -m benchmarks.find_neurons [--repeats 15] [--threads N] [--size 224]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from benchmarks._common import markdown_table, median, save
from lightning_bv import find_neurons
from lightning_bv._trace import Trace
from lightning_bv.neurons import analyze

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from zoo import resnet18_shaped  # noqa: E402

try:
    import torch_pruning as tp
except ImportError:  # optional
    tp = None


def traced(model: nn.Module, x: torch.Tensor) -> Trace:
    """The recorded forward of ``find_neurons`` (without its buffer and RNG bookkeeping)."""
    trace = Trace(model)
    with torch.enable_grad():
        trace.start()
        try:
            trace.mark_outputs(model(x))
        finally:
            trace.stop()
    return trace


def discovery_time(repeats: int, size: int = 224) -> dict[str, dict[str, float]]:
    """Median and minimum ms of each call on the resnet18-shaped model, over ``repeats`` interleaved repeats."""
    torch.manual_seed(0)
    model = resnet18_shaped().eval()
    x = torch.randn(1, 3, size, size)
    trace = traced(model, x)

    def forward(grad: bool) -> Callable[[], Any]:
        def run() -> Any:
            with torch.set_grad_enabled(grad):
                return model(x)

        return run

    calls: dict[str, Callable[[], Any]] = {
        "find_neurons": lambda: find_neurons(model, x),
        "forward": forward(False),
        "forward with grad": forward(True),
        "find_neurons: trace": lambda: traced(model, x),
        "find_neurons: analyze": lambda: analyze(trace, model),
    }
    if tp is not None:
        calls["tp_build_dependency"] = lambda: tp.DependencyGraph().build_dependency(model, example_inputs=x)
    times: dict[str, list[float]] = {k: [] for k in calls}
    for f in calls.values():  # warm-up
        f()
    order = list(calls)
    for r in range(repeats):
        for k in order[r % len(order) :] + order[: r % len(order)]:  # each starts a repeat in turn
            t0 = time.perf_counter()
            calls[k]()
            times[k].append(1000 * (time.perf_counter() - t0))
    return {k: {"median": median(v), "min": min(v)} for k, v in times.items()}


def main(argv: list[str] | None = None) -> str:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=15)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--size", type=int, default=224, help="input height and width")
    args = p.parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    times = discovery_time(args.repeats, args.size)
    tp_ms = times.get("tp_build_dependency", {}).get("median")
    rows = []
    for k, v in times.items():
        ratio = f"{v['median'] / tp_ms:.2f}" if tp_ms else "-"
        rows.append([k, f"{v['median']:.1f}", f"{v['min']:.1f}", ratio])
    load = os.getloadavg()[0]  # the machine is shared: other jobs slow every row alike
    table = markdown_table(["what", "median ms", "min ms", "median / Torch-Pruning"], rows)
    goal = "-" if not tp_ms else "met" if times["find_neurons"]["median"] <= tp_ms else "missed"
    table += (
        f"\n\nresnet18-shaped model, batch 1, {args.size} x {args.size}; {args.repeats} interleaved repeats; "
        f"{torch.get_num_threads()} torch threads; 1-minute load average at the end: {load:.1f} on "
        f"{os.cpu_count()} cores. Goal find_neurons <= Torch-Pruning: {goal}."
    )
    if tp is None:
        table += "\n\nTorch-Pruning is not installed: no ratio."
    print(table)
    name = "find_neurons" if args.size == 224 else f"find_neurons_{args.size}"
    save(name, table, {"repeats": args.repeats, "size": args.size, "load_average": load, "discovery_ms": times})
    return table


if __name__ == "__main__":
    main()
