"""Every command in README.md is run: the set-up commands are the ones .ci/run runs, the code blocks execute."""

import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import lightning_bv as lbv

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def blocks(lang):
    return re.findall(rf"```{lang}\n(.*?)```", README, flags=re.S)


def test_setup_commands_are_what_ci_runs():
    bash = [b.strip() for b in blocks("bash")]
    main_job, tests = bash[0], bash[1]
    ci = (ROOT / ".ci" / "run").read_text()
    assert main_job.endswith("lightning-bv fit")
    assert tests.endswith("python3 -m pytest -q")
    for step in tests.split(" && "):
        if step.startswith("python3 -m pip install -e"):
            assert 'python3 -m pip install -q -e ".[dev,examples,wandb,cli]"' in ci
        else:
            assert step.replace("pip install ", "pip install -q ") in ci or step in ci, step


@pytest.mark.slow
def test_main_job_command_runs(tmp_path):
    """The main job, shortened to one epoch (the full run is timed in tests/cli/test_app.py)."""
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "lightning_bv.cli",
            "fit",
            "--trainer.max_epochs=1",
            f"--trainer.default_root_dir={tmp_path}",
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert "test" in out.stdout.lower()
    assert list(tmp_path.rglob("model_state_dict.pt"))


def test_existing_project_snippet_runs(tmp_path, monkeypatch):
    from helpers import MLPModule
    from pytorch_lightning.loggers import WandbLogger

    import lightning_bv.callbacks as cbs

    code = blocks("python")[0]
    code = code.replace('strategy="ddp", devices=4', 'accelerator="cpu", devices=1, max_steps=3')
    code = code.replace("WandbLogger()", f"WandbLogger(save_dir={str(tmp_path)!r}, offline=True)")
    monkeypatch.chdir(tmp_path)
    import pytorch_lightning as pl

    scope = {
        "pl": pl,
        "WandbLogger": WandbLogger,
        "your_unmodified_lightning_module": MLPModule(width=64),
        "your_datamodule": None,
    }
    exec(code, scope)  # noqa: S102
    assert isinstance(scope["callbacks"][1], cbs.RBVRegularization)
    assert scope["trainer"].global_step == 3


def test_plain_pytorch_snippet_runs_and_prints_without_warnings(capsys):
    import warnings

    from torch import nn

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 1))
    loader = [(torch.randn(8, 3), torch.randn(8, 1)) for _ in range(20)]
    scope = {"model": model, "example_input": torch.randn(4, 3), "lam": 0.3, "torch": torch, "loader": loader,
             "loss_fn": nn.functional.mse_loss}  # fmt: skip
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # printing the values must not warn (float() of a grad tensor does)
        exec(blocks("python")[1], scope)  # noqa: S102
    assert scope["penalty"].requires_grad  # still differentiable
    assert re.fullmatch(r"R = [\d.e+-]+, l1 path-norm = [\d.e+-]+\n", capsys.readouterr().out)
    assert model[0].out_features < 16  # neurons died and were cut out
    assert not lbv.is_low_rank(model[2])  # the lifted hidden matrix was merged back


def test_api_table_shows_the_real_defaults():
    """Every ``name=value`` in the README's API table is the default of that parameter in the code."""
    import ast
    import importlib
    import inspect

    import lightning_bv

    rows = re.findall(r"^\| `(.+?)` \|", README, flags=re.M)
    checked = 0
    for cell in rows:
        for call in re.findall(r"((?:callbacks\.)?\w+)\(([^`]*?)\)", cell):
            where, _, name = call[0].rpartition(".")
            obj = getattr(importlib.import_module(f"lightning_bv.{where}") if where else lightning_bv, name)
            params = inspect.signature(obj).parameters
            for arg in (a.strip() for a in call[1].split(",")):
                if "=" in arg:
                    name, value = arg.split("=", 1)
                    assert params[name].default == ast.literal_eval(value), f"{call[0]}({arg}) in README.md"
                    checked += 1
                else:
                    assert arg in params, f"{call[0]} has no parameter {arg!r} (README.md)"
    assert checked >= 20


def test_hugging_face_snippet_saves_and_loads_a_compacted_opt(tmp_path, monkeypatch):
    pytest.importorskip("transformers")
    monkeypatch.chdir(tmp_path)
    torch.manual_seed(0)
    scope: dict = {}
    exec(blocks("python")[2], scope)  # noqa: S102
    model, fresh, batch = scope["model"], scope["fresh"], scope["batch"]
    widths = [layer.fc1.out_features for layer in fresh.model.decoder.layers]
    assert all(w < 256 for w in widths)
    assert widths == [layer.fc1.out_features for layer in model.model.decoder.layers]
    assert fresh.lm_head.weight is fresh.model.decoder.embed_tokens.weight
    with torch.no_grad():
        assert torch.equal(fresh(**batch).logits, model(**batch).logits)
