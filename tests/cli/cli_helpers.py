"""What the tests of lightning_bv.cli share: config folders, a short fit's flags, the console script in a process."""

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = ROOT / "examples" / "configs"
DEFAULT_FILE = ROOT / "lightning_bv" / "cli" / "default.yaml"
SMOKE = [
    "--trainer.max_epochs=1",
    "--trainer.limit_train_batches=3",
    "--trainer.limit_val_batches=1",
    "--trainer.enable_progress_bar=false",
    "--trainer.enable_model_summary=false",
]


def run_cli(args, cwd, timeout=300):
    env = {**os.environ, "WANDB_MODE": "offline", "PYTHONWARNINGS": "ignore"}  # PYTHONPATH: tests/conftest.py
    return subprocess.run(
        [sys.executable, "-m", "lightning_bv.cli", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
