"""Run every benchmark, one after another: each prints its table and writes it under ``benchmarks/results/``.

    python -m benchmarks                 # all, full settings (long: about half an hour on two cores)
    python -m benchmarks --quick         # all, smaller settings (a smoke run of a few minutes; numbers are rough)
    python -m benchmarks --only sparsity convergence
    python -m benchmarks --list

Every benchmark also runs alone (``python -m benchmarks.<name> --help``). ``--quick`` passes each one the smaller
arguments listed in ``BENCHMARKS``; the full run passes none (each benchmark's defaults). The number of torch threads
is restored after each benchmark (the small-model ones set one thread). A benchmark that fails is reported and the
others still run; the exit status is then 1.
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import sys
import time
import traceback
from collections.abc import Callable
from typing import Any

import torch

# name -> (what it measures, arguments for --quick)
BENCHMARKS: dict[str, tuple[str, list[str]]] = {
    "overhead": ("step time with RBVRegularization / without, per mode", ["--repeats", "1", "--blocks", "1"]),
    "monitor_overhead": (
        "step time with BVMonitor / without, at its default interval",
        ["--repeats", "1", "--blocks", "1"],
    ),
    "cost": ("overhead per mode and BVMonitor on an MLP, a CNN and a transformer FFN; path_norm", ["--quick"]),
    "low_rank": ("forward time of factorized low-rank Linear layers / dense", ["--repeats", "10", "--ranks", "256"]),
    "compaction": ("forward time and parameters of a compacted MLP / the original", ["--repeats", "5"]),
    "sparsity": ("sparsity against accuracy: RBVRegularization, AdamW weight decay, ModelPruning", ["--quick"]),
    "convergence": ("objective loss + lam * R against steps: prox vs weight decay", ["--quick"]),
    "theory_checks": ("the checks of docs/theory.md", ["--quick"]),
    "zoo": (
        "groups, compaction and Torch-Pruning on real architectures; discovery time on resnet18",
        ["--repeats", "3"],
    ),
    "prox_parts": ("the proximal update's parts (thresholds, norms, projection, shrink) / a step", ["--repeats", "3"]),
    "find_neurons": ("find_neurons on a resnet18-shaped model / Torch-Pruning's build_dependency", ["--repeats", "3"]),
    "examples": ("the numbers of examples/*.md (default run, digits.py, 2-process DDP); rewrites them", ["--smoke"]),
}


def call_main(main: Callable[..., Any], argv: list[str]) -> Any:
    """``main(argv)``, or, for a ``main()`` that reads ``sys.argv`` itself, the same arguments through ``sys.argv``."""
    if inspect.signature(main).parameters:
        return main(argv)
    saved = sys.argv
    sys.argv = [saved[0], *argv]
    try:
        return main()
    finally:
        sys.argv = saved


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="smaller settings for every benchmark")
    p.add_argument("--only", nargs="*", choices=list(BENCHMARKS), help="run these only (in the standard order)")
    p.add_argument("--skip", nargs="*", default=[], choices=list(BENCHMARKS), help="leave these out")
    p.add_argument("--list", action="store_true", help="list the benchmarks and exit")
    args = p.parse_args(argv)
    if args.list:
        for name, (what, quick) in BENCHMARKS.items():
            print(f"{name:>17}: {what}  (--quick: {' '.join(quick)})")
        return 0
    names = [n for n in BENCHMARKS if (not args.only or n in args.only) and n not in args.skip]
    threads = torch.get_num_threads()
    seconds: dict[str, float] = {}
    failed: list[str] = []
    t_all = time.perf_counter()
    for name in names:
        what, quick = BENCHMARKS[name]
        bench_argv = quick if args.quick else []
        print(f"\n{'=' * 100}\n{name}: {what}\n$ python -m benchmarks.{name} {' '.join(bench_argv)}\n", flush=True)
        t0 = time.perf_counter()
        try:
            module = importlib.import_module(f"benchmarks.{name}")
            call_main(module.main, bench_argv)
        except Exception:  # report and go on with the others
            traceback.print_exc()
            failed.append(name)
        finally:
            torch.set_num_threads(threads)
            seconds[name] = time.perf_counter() - t0
        print(f"\n[{name}: {seconds[name]:.0f} s]", flush=True)
    print(f"\n{'=' * 100}\nall benchmarks{' (--quick)' if args.quick else ''}: {time.perf_counter() - t_all:.0f} s")
    for name in names:
        print(f"  {name:>17}: {seconds[name]:6.0f} s  {'FAILED' if name in failed else 'ok'}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
