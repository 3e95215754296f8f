"""Forward time of `factorize`d low-rank Linear layers over the dense layer (issue: goal >= 0.8 of the ideal).

Linear 4096 -> 4096, batch 256, ranks 64, 256 and 1024, under torch.inference_mode with torch's default number of
threads. A rank-r layer made by `apply_low_rank` then `factorize` is Linear(4096, r, bias=False) -> Linear(r, 4096);
its ideal speed-up is the ratio of multiply-adds, in * out / (r * (in + out)). Calls are interleaved (dense, then
factorized, for every rank in turn, in each repeat) so that drift on a shared machine hits both alike; the table
shows medians. The goal (speed-up >= 0.8 x ideal) applies where the ideal is >= 2.

    python -m benchmarks.low_rank [--repeats 50] [--warmup 3]
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

import torch
from torch import nn

if __package__ in (None, ""):  # run as a file: python benchmarks/low_rank.py
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks._common import markdown_table, median, save  # noqa: E402
from lightning_bv import apply_low_rank, factorize  # noqa: E402

FEATURES = 4096
BATCH = 256
RANKS = (64, 256, 1024)


def timed(layer: nn.Module, x: torch.Tensor) -> float:
    t0 = time.perf_counter()
    layer(x)
    return time.perf_counter() - t0


def main(argv: list[str] | None = None) -> str:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=50)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--ranks", type=int, nargs="*", default=list(RANKS))
    args = p.parse_args(argv)

    torch.manual_seed(0)
    dense = nn.Linear(FEATURES, FEATURES)
    x = torch.randn(BATCH, FEATURES)
    factorized: dict[int, nn.Module] = {}
    t0 = time.perf_counter()
    for r in args.ranks:
        low = apply_low_rank(copy.deepcopy(dense), rank=r)  # a full SVD of the 4096 x 4096 weight
        with torch.inference_mode():
            reference = low(x)
        factorized[r] = factorize(low)
        with torch.inference_mode():
            err = (factorized[r](x) - reference).abs().max().item()
            print(f"rank {r}: {factorized[r][0]} -> {factorized[r][1]}, max |factorized - low-rank| = {err:.2e}")
    print(f"set-up (SVDs) {time.perf_counter() - t0:.1f} s; {torch.get_num_threads()} threads\n")

    times: dict[int, tuple[list[float], list[float]]] = {r: ([], []) for r in args.ranks}
    with torch.inference_mode():
        for _ in range(args.warmup):
            for r in args.ranks:
                dense(x)
                factorized[r](x)
        for _ in range(args.repeats):
            for r in args.ranks:
                times[r][0].append(timed(dense, x))
                times[r][1].append(timed(factorized[r], x))

    rows = []
    results = {}
    for r in args.ranks:
        d, f = median(times[r][0]), median(times[r][1])
        speedup = d / f
        ideal = FEATURES * FEATURES / (r * (FEATURES + FEATURES))
        goal = ("met" if speedup / ideal >= 0.8 else "missed") if ideal >= 2 else "-"
        rows.append([r, d * 1e3, f * 1e3, speedup, ideal, speedup / ideal, goal])
        results[str(r)] = {"dense_s": d, "factorized_s": f, "speedup": speedup, "ideal": ideal}
    header = ["rank", "dense ms", "factorized ms", "speed-up", "ideal", "speed-up / ideal", "goal >= 0.8 x ideal"]
    table = markdown_table(header, rows)
    print(table)
    save("low_rank", table, {"features": FEATURES, "batch": BATCH, "repeats": args.repeats, "results": results})
    return table


if __name__ == "__main__":
    main()
