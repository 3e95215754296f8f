import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from lightning_bv import cli

pytestmark = pytest.mark.filterwarnings("ignore:.*LightningCLI's args parameter is intended")

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "examples" / "configs"
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


def test_embedded_default_is_the_example_config():
    assert (CONFIGS / "default.yaml").read_text() == cli.DEFAULT_CONFIG
    config = yaml.safe_load(cli.DEFAULT_CONFIG)
    names = [c["class_path"].rpartition(".")[2] for c in config["trainer"]["callbacks"]]
    assert names == ["LowRank", "SkipConnections", "PathNormRegularization", "BVMonitor", "NeuronPruning"]
    assert config["model"]["init_args"]["model"]["class_path"] == "lightning_bv.RBVNet"
    assert config["data"]["class_path"] == "lightning_bv.modules.DigitsData"


def test_default_config_only_without_a_config():
    assert cli.with_default_config(["fit", "--trainer.max_epochs=1"]) == [
        "fit",
        "--config",
        cli.DEFAULT_CONFIG,
        "--trainer.max_epochs=1",
    ]
    assert cli.with_default_config(["fit", "-c", "a.yaml"]) == ["fit", "-c", "a.yaml"]
    assert cli.with_default_config(["fit", "--config=a.yaml"]) == ["fit", "--config=a.yaml"]
    assert cli.with_default_config(["--help"]) == ["--help"]


@pytest.mark.parametrize("name", sorted(p.name for p in CONFIGS.glob("*.yaml")))
def test_every_example_config_builds(name, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    built = cli.BVLightningCLI(args=["--config", str(CONFIGS / name)], run=False)
    config = yaml.safe_load((CONFIGS / name).read_text())
    wanted = [c["class_path"].rpartition(".")[2] for c in config["trainer"]["callbacks"]]
    present = [type(c).__name__ for c in built.trainer.callbacks]
    assert all(w in present for w in wanted)
    assert type(built.model).__name__ == "BVModule"


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


BAD = {
    "unknown callback argument": (
        ["--trainer.callbacks+=LowRank", "--trainer.callbacks.rnk=3"],
        r"Option 'rnk' is not accepted. LowRank accepts: rank, energy, targets, exclude.",
    ),
    "missing config file": (["--config", "no_such_config.yaml"], "File does not exist"),
    "target matching nothing": (
        ["--trainer.callbacks+=SkipConnections", "--trainer.callbacks.targets=[no_such_layer]"],
        "'no_such_layer' matched no module",
    ),
    "bad value": (["--model.init_args.lr=-1"], "`lr` must be a finite float >= 0, got -1.0"),
    "a second PathNormRegularization": (
        ["--trainer.callbacks+=PathNormRegularization", "--trainer.callbacks.lam=0.1"],
        "trainer.callbacks has two PathNormRegularization callbacks with the same state_key, which Lightning cannot "
        "checkpoint side by side. The default run already has one PathNormRegularization: change it with its flags "
        "(--lam, --mode)",
    ),
    "misspelled class": (["--trainer.callbacks+=LowRnak"], "'LowRnak' is not a class lightning-bv knows (nor an "),
    "misspelled class, suggestion": (["--trainer.callbacks+=LowRnak"], "Did you mean 'LowRank'?"),
    "missing lam and a bad mode": (
        ["--trainer.callbacks+=PathNormRegularization", "--trainer.callbacks.mode=proxx"],
        "the following arguments are required: lam. Also: `mode` must be one of ('prox', 'penalty', "
        "'weight_decay'), got 'proxx'.",
    ),
    "bad --mode": (["--mode=proxx"], "`mode` must be one of ('prox', 'penalty', 'weight_decay'), got 'proxx'"),
    "--rank without LowRank": (
        ["--config", str(CONFIGS / "spline.yaml"), "--rank=3"],
        "`--rank` sets `rank` of the run's LowRank in trainer.callbacks, but the run has 0 of them",
    ),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_input_is_one_paragraph_and_exit_code_2(case, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    args, expected = BAD[case]
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["fit", *args, "--trainer.logger=false", "--trainer.enable_progress_bar=false"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    message = [line for line in err.splitlines() if line.startswith("lightning-bv: error")]
    assert len(message) == 1, err
    assert expected in message[0]
    assert "Traceback" not in err


def test_knob_flags_set_the_default_callbacks(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    args = cli.with_default_config(["fit", "--lam=0.1", "--mode", "penalty", "--rank=8", "--trainer.logger=false"])
    built = cli.BVLightningCLI(args=args[1:], run=False)  # run=False parses without a subcommand
    (reg,) = [c for c in built.trainer.callbacks if type(c).__name__ == "PathNormRegularization"]
    (low,) = [c for c in built.trainer.callbacks if type(c).__name__ == "LowRank"]
    assert (reg.lam, reg.mode, low.rank) == (0.1, "penalty", 8)
    assert "--lam LAM             PathNormRegularization's `lam`" in run_cli(["fit", "--help"], cwd=tmp_path).stdout


def test_bad_input_in_a_subprocess_exits_2_without_traceback(tmp_path):
    proc = run_cli(["fit", "--trainer.callbacks+=LowRank", "--trainer.callbacks.rnk=3"], cwd=tmp_path)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    (line,) = [x for x in proc.stderr.splitlines() if x.strip()]
    assert line.startswith("lightning-bv: error (ArgumentError):")
    assert "LowRank accepts" in line


def test_debug_env_shows_the_traceback(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv(cli.DEBUG_ENV, "1")
    with pytest.raises(ValueError, match="`lr` must be"):
        cli.main(["fit", "--model.init_args.lr=-1", "--trainer.logger=false"])


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
