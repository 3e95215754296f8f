"""Real architectures (tests/zoo.py): what discovery finds, what compaction cuts, next to Torch-Pruning (issue 13).

Per model (random init; the CNNs with BatchNorm statistics from two batches): the neuron groups found and the
activations skipped, the parameters after compacting the lower-score half of every group (the output weights of the
neurons with score below the group's median zeroed, then ``compact``: the same function), the layers (Linear/Conv)
compaction shrank, and the forward time on the example input. Where Torch-Pruning is installed, the same model goes
through its ``DependencyGraph``: its prunable groups, the layers they touch, and the parameters after pruning half
of the channels of every group (``MagnitudePruner``, ``pruning_ratio=0.5``, the last layer ignored; Torch-Pruning
changes the function, compaction does not). Then the time of ``find_neurons`` on a resnet18-shaped model
(batch 1, 224 x 224) against Torch-Pruning's ``DependencyGraph().build_dependency`` on the same model and input:
interleaved, median over repeats, with the plain forward for scale (``benchmarks.find_neurons``, which also runs alone).

    python -m benchmarks.zoo [--repeats 7]
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from benchmarks._common import markdown_table, median, save
from benchmarks.find_neurons import discovery_time
from lightning_bv import compact, find_neurons, neuron_scores

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from zoo import ZOO, Case, call  # noqa: E402

try:
    import torch_pruning as tp
except ImportError:  # optional
    tp = None


def build(case: Case) -> tuple[nn.Module, Any]:
    torch.manual_seed(0)
    model = case.make()
    example = case.example()
    if not case.hf:
        model.train()
        with torch.no_grad():
            for _ in range(2):
                call(model, 2 * torch.randn_like(example) + 0.5)
    return model.eval(), example


def params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def layers(model: nn.Module) -> dict[str, tuple[int, ...]]:
    """Weight shapes of the Linear, Conv and HF Conv1D layers."""
    kinds = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
    return {
        n: tuple(m.weight.shape)
        for n, m in model.named_modules()
        if isinstance(m, kinds) or (type(m).__name__ == "Conv1D" and getattr(m, "weight", None) is not None)
    }


def forward_ms(model: nn.Module, example: Any, repeats: int) -> float:
    times = []
    with torch.no_grad():
        for _ in range(repeats):
            t0 = time.perf_counter()
            call(model, example)
            times.append(time.perf_counter() - t0)
    return 1000 * median(times)


def ours(case: Case, repeats: int) -> dict[str, Any]:
    model, example = build(case)
    before, shapes = params(model), layers(model)
    groups = find_neurons(model, example)
    scores = neuron_scores(groups)
    for g in groups:
        s = scores[g.name].detach()
        factor = (s >= s.median()).to(s.dtype)  # the lower-score half: output weights zeroed
        for slot in g.v_slots:
            slot.scale_(factor)
    reference = copy.deepcopy(model)
    report = compact(model, groups)
    with torch.no_grad():
        y, ref = call(model, example), call(reference, example)
    err = float((y - ref).abs().max() / ref.abs().max().clamp_min(1e-30))
    after = layers(model)
    return {
        "groups": len(groups),
        "skipped": len(groups.skipped),
        "params": before,
        "params_after": report.params_after,
        "layers": len(shapes),
        "layers_shrunk": sum(after[n] != s for n, s in shapes.items()),
        "left_whole": sum(not r.shrunk for r in report.groups),
        "rel_error": err,
        "forward_ms": forward_ms(reference, example, repeats),
    }


FFN_IN = ("fc1", "c_fc", "wi", "intermediate.dense")  # the feed-forward producers of the HF models


def torch_pruning(case: Case) -> dict[str, Any]:
    if tp is None:
        return {"tp": "not installed"}
    model, example = build(case)
    shapes = layers(model)
    named = dict(model.named_modules())
    if case.hf:  # attention heads and the residual width need per-model settings: prune the feed-forward widths only
        ignored = [named[n] for n in shapes if not n.endswith(FFN_IN)]
        first: Any = lambda out: out[0]  # noqa: E731  (a ModelOutput: its main tensor)
    else:
        ignored, first = [named[list(shapes)[-1]]], None
    out: dict[str, Any] = {"tp": "ok"}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            dg = tp.DependencyGraph().build_dependency(model, example_inputs=example, output_transform=first)
            groups = list(dg.get_all_groups(ignored_layers=ignored, root_module_types=[nn.Conv2d, nn.Linear]))
            touched = {dep.target.name.split(" ")[0] for grp in groups for dep, _ in grp}
            out.update(tp_groups=len(groups), tp_layers=len([n for n in shapes if n in touched]))
            importance = tp.importance.MagnitudeImportance(p=2)
            pruner = tp.pruner.MagnitudePruner(
                model, example, importance=importance, pruning_ratio=0.5, ignored_layers=ignored, output_transform=first
            )
            pruner.step()
            with torch.no_grad():
                call(model, example)
            out["tp_params_after"] = params(model)
        except Exception as err:  # report and go on
            out["tp"] = f"failed: {type(err).__name__}: {str(err)[:60]}"
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=7)
    args = p.parse_args(argv)
    rows, data = [], {}
    for case in ZOO:
        r = ours(case, args.repeats)
        r.update(torch_pruning(case))
        data[case.name] = r
        tp_cols = [r.get("tp_groups", r["tp"]), r.get("tp_layers", "-")]
        tp_cols.append(f"{r['tp_params_after'] / r['params']:.3f}" if "tp_params_after" in r else r["tp"])
        rows.append([
            case.name, r["groups"], r["skipped"], r["params"], f"{r['params_after'] / r['params']:.3f}",
            f"{r['layers_shrunk']}/{r['layers']}", r["left_whole"], f"{r['rel_error']:.1e}", r["forward_ms"], *tp_cols,
        ])  # fmt: skip
        print(case.name, r, flush=True)
    header = ["model", "groups", "skipped", "params", "params after / before", "layers shrunk", "groups left whole",
              "rel. error", "forward ms", "TP groups", "TP layers", "TP params after / before (ratio 0.5)"]  # fmt: skip
    table = markdown_table(header, rows)
    times = discovery_time(args.repeats)
    data["discovery_ms"] = times
    data["load_average"] = os.getloadavg()  # the machine is shared: other jobs slow both sides alike
    lines = [f"| {k} | {v['median']:.1f} | {v['min']:.1f} |" for k, v in times.items()]
    table += (
        "\n\nDiscovery on a resnet18-shaped model (batch 1, 224 x 224), ms over "
        f"{args.repeats} interleaved repeats (1-minute load average at the end: {data['load_average'][0]:.1f} on "
        f"{os.cpu_count()} cores):\n\n| what | median | min |\n|---|---|---|\n" + "\n".join(lines)
    )
    if tp is None:
        table += "\n\nTorch-Pruning is not installed: its columns are empty."
    print(table)
    save("zoo", table, data)


if __name__ == "__main__":
    main()
