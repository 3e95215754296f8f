"""Regenerate the numbers of examples/README.md and examples/multi_gpu.md: run what they show, rewrite their blocks.

    python -m benchmarks.examples                     # all three runs (several minutes on two cores), rewrite the docs
    python -m benchmarks.examples --only default      # default | digits | multi_gpu
    python -m benchmarks.examples --no-write          # print the blocks, change no file
    python -m benchmarks.examples --smoke             # tiny runs, print only: checks that this script works

Each part runs the command the docs show, as a subprocess in a temporary folder, with this checkout's package:

* ``default``: ``lightning-bv fit`` (the built-in default run): its results table and its wall time;
* ``digits``: ``python examples/digits.py``: its table of weight decay against the prox;
* ``multi_gpu``: ``lightning-bv fit --config examples/configs/multi_gpu.yaml --trainer.accelerator=cpu
  --trainer.devices=2`` (two CPU processes): test accuracy and neurons left, against the default run.

The docs hold each generated block between ``<!-- benchmarks.examples:NAME -->`` and
``<!-- /benchmarks.examples:NAME -->``; nothing else in them is changed. The numbers also go to
``benchmarks/results/examples.json`` and ``examples.md``, with machine, versions and date (``multi_gpu`` alone compares
with the default run recorded there).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path
from typing import Any

from benchmarks._common import RESULTS, machine

ROOT = Path(__file__).resolve().parents[1]
DOCS = {"default": ROOT / "examples" / "README.md", "digits": ROOT / "examples" / "README.md"}
DOCS["multi_gpu"] = ROOT / "examples" / "multi_gpu.md"
PARTS = ("default", "digits", "multi_gpu")
CLI_SMOKE = ["--trainer.max_epochs=1", "--trainer.limit_train_batches=3", "--trainer.limit_val_batches=1"]
QUIET = ["--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false"]


def run(args: list[str], cwd: Path) -> tuple[str, float]:
    """Run ``python <args>`` in ``cwd`` with this checkout first on the path; (stdout, wall seconds)."""
    path = os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])
    env = {**os.environ, "PYTHONPATH": path, "PYTHONWARNINGS": "ignore", "WANDB_MODE": "offline"}
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, check=False)
    seconds = time.perf_counter() - start
    if proc.returncode:
        raise RuntimeError(f"`python {' '.join(args)}` failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return proc.stdout, seconds


def cli_run(extra: list[str], smoke: bool) -> dict[str, Any]:
    """``lightning-bv fit`` with ``extra``: the printed table, ``summary.json`` and the wall time."""
    with tempfile.TemporaryDirectory() as tmp:
        args = ["-m", "lightning_bv.cli", "fit", *extra, *QUIET, *(CLI_SMOKE if smoke else [])]
        out, seconds = run([*args, f"--trainer.default_root_dir={tmp}"], Path(tmp))
        folder = Path(tmp) / out.split("(run folder: ")[1].split(")")[0]
        summary = json.loads((folder / "summary.json").read_text())
        table = (folder / "summary.txt").read_text().rstrip()
    compacted, initial = summary["compacted"], summary["initial"]
    return {
        "seconds": round(seconds, 1),
        "table": table,
        "acc": compacted["metric"].get("acc"),
        "neurons": sum(n for n, _ in initial["groups"].values()),
        "neurons_left": sum(n for n, _ in compacted["groups"].values()),
        "params_initial": initial["params"],
        "params_compacted": compacted["params"],
    }


def default_block(r: dict[str, Any]) -> str:
    share = 100 * r["params_compacted"] / r["params_initial"]
    return f"```\n{r['table']}\n```\n\n" + prose(
        "*initial* is the network as built, *trained* the network after training (low-rank and with its skip, before "
        f"compaction), *compacted* the saved one: the same test accuracy with {r['neurons_left']} of {r['neurons']} "
        f"neurons and {share:.0f}% of the parameters. The run took {r['seconds']:.0f} s here."
    )


def digits_run(smoke: bool) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        args = [str(ROOT / "examples" / "digits.py"), "--out", str(Path(tmp) / "digits.png")]
        out, seconds = run(args + (["--smoke"] if smoke else []), Path(tmp))
    lines = out.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("method"))
    table = "\n".join(lines[start : start + 6])
    prox = next(line for line in lines[start:] if line.startswith("prox")).split()
    kept, total = int(prox[2]), int(prox[4])  # prox  0.9778  116 / 256  111  20,372 -> 11,652
    before, after = (int(v.replace(",", "")) for v in (prox[-3], prox[-1]))
    return {"seconds": round(seconds, 1), "table": table, "prox_kept": kept, "neurons": total,
            "prox_params_saved": round(100 * (1 - after / before))}  # fmt: skip


def digits_block(r: dict[str, Any]) -> str:
    return f"```\n{r['table']}\n```\n\n" + prose(
        "Weight decay (on every parameter, or on the neurons' weights only) shrinks the unneeded neurons but never to "
        f"zero, so nothing can be cut; the prox reaches its accuracy with {r['prox_kept']} of {r['neurons']} neurons "
        f"left and {r['prox_params_saved']}% fewer parameters. The four fits took {r['seconds']:.0f} s here."
    )


def multi_gpu_block(r: dict[str, Any], single: dict[str, Any] | None) -> str:
    versus = (
        f" (one process: {single['acc']:.4f}, with {single['neurons_left']} of {single['neurons']} neurons left)"
        if single
        else ""
    )
    return prose(
        f"Measured here (two CPU processes, {r['seconds']:.0f} s): test accuracy {r['acc']:.4f} with "
        f"{r['neurons_left']} of {r['neurons']} neurons left{versus}. With the same `max_epochs` each process takes "
        "half the optimizer steps, so the prox runs half as often: raise `max_epochs` (or `lr`, or `lam`) to get the "
        "single-device sparsity back."
    )


def rewrite(path: Path, name: str, block: str) -> None:
    """Replace the text between the markers of ``name`` in ``path``."""
    begin, end = f"<!-- benchmarks.examples:{name} -->", f"<!-- /benchmarks.examples:{name} -->"
    text = path.read_text()
    pattern = re.compile(re.escape(begin) + r".*?" + re.escape(end), re.S)
    if not pattern.search(text):
        raise ValueError(f"{path} has no block {begin} ... {end}")
    path.write_text(pattern.sub(lambda _: f"{begin}\n{block}\n{end}", text))


def prose(text: str) -> str:
    """One paragraph, wrapped at 120 columns like the rest of the docs."""
    return textwrap.fill(text, width=120, break_on_hyphens=False)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(prog="python -m benchmarks.examples", description=__doc__.splitlines()[0])
    p.add_argument("--only", nargs="*", choices=PARTS, help="run these parts only")
    p.add_argument("--no-write", action="store_true", help="print the blocks, change no file")
    p.add_argument("--smoke", action="store_true", help="tiny runs (implies --no-write)")
    args = p.parse_args(argv)
    write = not (args.no_write or args.smoke)
    parts = [n for n in PARTS if not args.only or n in args.only]
    saved = RESULTS / "examples.json"
    results: dict[str, Any] = json.loads(saved.read_text()) if saved.exists() else {}
    blocks: dict[str, str] = {}
    for name in parts:
        print(f"benchmarks.examples: {name} ...", flush=True)
        if name == "default":
            results["default"] = cli_run([], args.smoke)
            blocks[name] = default_block(results["default"])
        elif name == "digits":
            results["digits"] = digits_run(args.smoke)
            blocks[name] = digits_block(results["digits"])
        else:
            config = ["--config", str(ROOT / "examples" / "configs" / "multi_gpu.yaml")]
            results["multi_gpu"] = cli_run([*config, "--trainer.accelerator=cpu", "--trainer.devices=2"], args.smoke)
            blocks[name] = multi_gpu_block(results["multi_gpu"], results.get("default"))
        print(f"\n<!-- benchmarks.examples:{name} -->\n{blocks[name]}\n", flush=True)
    if write:
        for name, block in blocks.items():
            rewrite(DOCS[name], name, block)
        results["machine"] = machine()
        RESULTS.mkdir(exist_ok=True)
        saved.write_text(json.dumps(results, indent=2) + "\n")
        md = [f"# examples ({results['machine']['date']}, {results['machine']['machine']})", ""]
        md += [f"## {name}\n\n{block}\n" for name, block in blocks.items()]
        (RESULTS / "examples.md").write_text("\n".join(md))
        print(f"rewrote {', '.join(sorted({str(DOCS[n].relative_to(ROOT)) for n in blocks}))}")
    return results


if __name__ == "__main__":
    main()
