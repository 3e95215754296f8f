import json
import os
from pathlib import Path

import pytest
import torch
import yaml
from cli_helpers import CONFIGS, SMOKE, run_cli

from lightning_bv import cli

pytestmark = pytest.mark.filterwarnings("ignore:.*LightningCLI's args parameter is intended")


def test_cli_default_smoke_in_a_subprocess(tmp_path):
    proc = run_cli(["fit", *SMOKE, f"--trainer.default_root_dir={tmp_path}"], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    for row in ("test acc", "neurons (ReLU)", "rank (low-rank layers)", "parameters", "l1 path-norm", "l2 path-norm"):
        assert row in out
    folder = Path(out.split("(run folder: ")[1].split(")")[0])
    assert folder.is_relative_to(tmp_path)
    assert (folder / "summary.txt").read_text().strip() in out
    for name in ("config.yaml", "summary.json", "model_state_dict.pt", "neurons.png", "singular_values.png"):
        assert (folder / name).stat().st_size > 0, name
    summary = json.loads((folder / "summary.json").read_text())
    state = torch.load(folder / "model_state_dict.pt")
    assert sum(t.numel() for t in state.values()) == summary["compacted"]["params"]
    assert summary["initial"]["params"] == 20372  # RBVNet(64, 10, 128, 32, 2), dense
    assert summary["compacted"]["ranks"]["model.blocks.0.fc1"][0] <= 16  # LowRank(rank=16)
    saved = yaml.safe_load((folder / "config.yaml").read_text())
    assert saved["trainer"]["max_epochs"] == 1


def test_cli_with_a_yaml_config(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    args = ["fit", "--config", str(CONFIGS / "spline.yaml"), "--trainer.max_epochs=30", "--trainer.logger=false"]
    cli.main([*args, "--trainer.enable_progress_bar=false", "--trainer.check_val_every_n_epoch=10"])
    out = capsys.readouterr().out
    assert "test r2" in out
    assert "neurons (ReLU)" in out
    for name in ("config.yaml", "summary.json", "function.png", "neurons.png"):
        assert (tmp_path / name).stat().st_size > 0, name
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["initial"]["groups"]["model.blocks.0.fc1"][0] == 256
    assert summary["compacted"]["groups"]["model.blocks.0.fc1"][0] <= 256


def test_wandb_logger_writes_the_run_folder(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("WANDB_MODE", "offline")
    cli.main(["fit", *SMOKE, "--trainer.logger=WandbLogger", f"--trainer.logger.save_dir={tmp_path}"])
    out = capsys.readouterr().out
    (files,) = tmp_path.glob("wandb/offline-run-*/files")
    assert f"(run folder: {files})" in out
    for name in ("lightning_config.yaml", "summary.txt", "neurons.png", "model_state_dict.pt"):
        assert (files / name).stat().st_size > 0, name
    assert list(files.glob("media/images/summary/neurons_*.png"))


def test_knob_flags_set_the_default_callbacks(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    args = cli.with_default_config(["fit", "--lam=0.1", "--mode", "penalty", "--rank=8", "--trainer.logger=false"])
    built = cli.BVLightningCLI(args=args[1:], run=False)  # run=False parses without a subcommand
    (reg,) = [c for c in built.trainer.callbacks if type(c).__name__ == "RBVRegularization"]
    (low,) = [c for c in built.trainer.callbacks if type(c).__name__ == "LowRank"]
    assert (reg.lam, reg.mode, low.rank) == (0.1, "penalty", 8)
    assert "--lam LAM             RBVRegularization's `lam`" in run_cli(["fit", "--help"], cwd=tmp_path).stdout


def test_wandb_offline_without_an_account(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc
    monkeypatch.delenv("NETRC", raising=False)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    assert cli.wandb_offline_without_account()
    assert os.environ["WANDB_MODE"] == "offline"
    monkeypatch.delenv("WANDB_MODE")
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    assert not cli.wandb_offline_without_account()
    assert "WANDB_MODE" not in os.environ
    monkeypatch.delenv("WANDB_API_KEY")
    (tmp_path / ".netrc").write_text("machine api.wandb.ai\n  login user\n  password " + "y" * 40 + "\n")
    (tmp_path / ".netrc").chmod(0o600)
    assert not cli.wandb_offline_without_account()


@pytest.mark.slow
def test_full_default_run(tmp_path):
    # no time limit here: how long it takes is measured by `python3 -m benchmarks.examples` (a loaded machine is slow)
    proc = run_cli(["fit", "--trainer.enable_progress_bar=false"], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    folder = Path(proc.stdout.split("(run folder: ")[1].split(")")[0])
    summary = json.loads((tmp_path / folder / "summary.json").read_text())
    assert summary["compacted"]["metric"]["acc"] > 0.95
    assert summary["compacted"]["params"] < summary["initial"]["params"]
    live = sum(a for _, a in summary["trained"]["groups"].values())
    assert sum(n for n, _ in summary["compacted"]["groups"].values()) == live < 256


@pytest.mark.slow
def test_multi_gpu_config_on_two_cpu_processes(tmp_path):
    args = ["fit", "--config", str(CONFIGS / "multi_gpu.yaml"), "--trainer.accelerator=cpu", "--trainer.devices=2"]
    proc = run_cli([*args, *SMOKE, f"--trainer.default_root_dir={tmp_path}"], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("lightning-bv: results") == 1  # rank 0 only
    folder = Path(proc.stdout.split("(run folder: ")[1].split(")")[0])
    assert (folder / "model_state_dict.pt").exists()
