"""The ``lightning-bv`` report after ``fit``: the table of the snapshots, and the files written to the run folder.

:func:`write_report` writes ``summary.txt`` (:func:`table`), ``summary.json`` (:func:`save_json`),
``model_state_dict.pt`` and the plots of :mod:`lightning_bv.cli.figures` into the run folder, prints the table, and with
a ``WandbLogger`` logs the images and the table to the W&B run.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch

from lightning_bv.cli.figures import plot_function, plot_neurons, plot_spectra
from lightning_bv.cli.folder import config_filename, is_wandb
from lightning_bv.cli.snapshots import Snapshot

COLUMNS = ("initial", "trained", "compacted")


def _fmt(value: float | None) -> str:
    if value is None:
        return "-"
    if value != 0 and (abs(value) >= 1e5 or abs(value) < 1e-3):
        return f"{value:.3e}"
    return f"{value:.4g}"


def table(snaps: dict[str, Snapshot | None]) -> str:
    """The results as a plain-text table, one column per snapshot (missing ones shown as ``-``)."""
    cols = [c for c in COLUMNS if c in snaps]
    metrics = list(dict.fromkeys(k for s in snaps.values() if s is not None for k in s.metric))
    metrics.sort(key=lambda k: k == "loss")  # the accuracy (or R^2) first
    low_rank = list(dict.fromkeys(k for s in snaps.values() if s is not None for k in s.low_rank))

    def cell(snap: Snapshot | None, what: str, key: str = "") -> str:
        if snap is None:
            return "-"
        if what == "metric":
            return _fmt(snap.metric.get(key))
        if what == "neurons":
            return f"{snap.neurons:,}" if snap.live == snap.neurons else f"{snap.live:,} live / {snap.neurons:,}"
        if what == "group":
            n, a = snap.groups.get(key, (0, 0))
            return "-" if key not in snap.groups else (f"{n}" if a == n else f"{a} live / {n}")
        if what == "rank":
            if key not in snap.ranks:
                return "-"
            r, live = snap.ranks[key]
            kind = "" if key in snap.low_rank else " (dense)"
            return f"{r}{kind}" if live == r or kind else f"{live} live / {r}"
        if what == "params":
            return f"{snap.params:,}"
        return _fmt(getattr(snap, what))

    rows: list[tuple[str, ...]] = [("", *cols)]
    rows += [(f"test {m}", *(cell(snaps[c], "metric", m) for c in cols)) for m in metrics]
    rows.append(("neurons (ReLU)", *(cell(snaps[c], "neurons") for c in cols)))
    groups = list(dict.fromkeys(k for s in snaps.values() if s is not None for k in s.groups))
    if len(groups) > 1:
        rows += [(f"  {g}", *(cell(snaps[c], "group", g) for c in cols)) for g in groups]
    if low_rank:
        rows.append(("rank (low-rank layers)", *("" for _ in cols)))
        rows += [(f"  {name}", *(cell(snaps[c], "rank", name) for c in cols)) for name in low_rank]
    rows.append(("parameters", *(cell(snaps[c], "params") for c in cols)))
    rows.append(("l1 path-norm", *(cell(snaps[c], "path_norm_l1") for c in cols)))
    rows.append(("l2 path-norm", *(cell(snaps[c], "path_norm_l2") for c in cols)))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join([r[0].ljust(widths[0]), *(c.rjust(w) for c, w in zip(r[1:], widths[1:]))]) for r in rows]
    lines.insert(1, "-" * len(lines[0]))
    return "\n".join(line.rstrip() for line in lines)


def save_json(snaps: dict[str, Snapshot | None], path: Path, extra: dict[str, Any] | None = None) -> None:
    """Write the snapshots (scores left out) and ``extra`` as JSON."""
    data: dict[str, Any] = {k: None if s is None else {**asdict(s), "scores": None} for k, s in snaps.items()}
    data.update(extra or {})
    path.write_text(json.dumps(data, indent=2, default=str) + "\n")


def write_report(
    trainer: pl.Trainer,
    module: pl.LightningModule,
    datamodule: Any,
    folder: Path,
    snaps: dict[str, Snapshot | None],
    note: str,
) -> list[str]:
    """Write the run's files into ``folder``, print the table and what was written; the names of the files.

    Call it on rank 0 only. ``note`` (why compaction was skipped, or "") goes into ``summary.json`` and the printout.
    """
    folder.mkdir(parents=True, exist_ok=True)
    text = table(snaps)
    (folder / "summary.txt").write_text(text + "\n")
    save_json(snaps, folder / "summary.json", {"note": note} if note else None)
    torch.save(module.state_dict(), folder / "model_state_dict.pt")
    written = [config_filename(trainer), "summary.txt", "summary.json", "model_state_dict.pt"]
    try:
        plot_neurons(snaps, folder / "neurons.png")
        written.append("neurons.png")
        if plot_spectra(module, folder / "singular_values.png"):
            written.append("singular_values.png")
        if plot_function(module, datamodule, folder / "function.png"):
            written.append("function.png")
    except ImportError:
        note = (note + "; " if note else "") + "no plots: matplotlib is not installed"
    print(f"\nlightning-bv: results (run folder: {folder})\n{text}")
    if note:
        print(f"note: {note}")
    print(f"wrote: {', '.join(written)}")
    to_wandb(trainer, folder, written)
    return written


def to_wandb(trainer: pl.Trainer, folder: Path, written: list[str]) -> None:
    """Log the images among ``written`` and ``summary.txt`` to every ``WandbLogger`` of the Trainer."""
    loggers: list[Any] = [lg for lg in trainer.loggers if is_wandb(lg)]
    if not loggers:
        return
    import wandb

    images = {f"summary/{f[:-4]}": wandb.Image(str(folder / f)) for f in written if f.endswith(".png")}
    text = (folder / "summary.txt").read_text()
    for logger in loggers:
        logger.experiment.log({**images, "summary/table": wandb.Html(f"<pre>{text}</pre>")})
    if os.environ.get("WANDB_MODE") == "offline":
        print(f"W&B: offline run in {folder.parent} (upload it with `wandb sync {folder.parent}`)")
