from importlib.resources import files

import pytest
import yaml
from cli_helpers import CONFIGS, DEFAULT_FILE
from jsonargparse import Namespace

from lightning_bv import cli

pytestmark = pytest.mark.filterwarnings("ignore:.*LightningCLI's args parameter is intended")


def test_default_config_is_the_packaged_file():
    assert DEFAULT_FILE.read_text() == cli.DEFAULT_CONFIG
    assert files("lightning_bv.cli").joinpath("default.yaml").read_text() == cli.DEFAULT_CONFIG
    assert not (CONFIGS / "default.yaml").exists()  # one file: no copy to drift from it
    config = yaml.safe_load(cli.DEFAULT_CONFIG)
    names = [c["class_path"].rpartition(".")[2] for c in config["trainer"]["callbacks"]]
    assert names == ["LowRank", "SkipConnections", "RBVRegularization", "BVMonitor", "NeuronPruning"]
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


CONFIG_FILES = {"default.yaml": DEFAULT_FILE, **{p.name: p for p in CONFIGS.glob("*.yaml")}}


@pytest.mark.parametrize("name", sorted(CONFIG_FILES))
def test_every_example_config_builds(name, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    built = cli.BVLightningCLI(args=["--config", str(CONFIG_FILES[name])], run=False)
    config = yaml.safe_load(CONFIG_FILES[name].read_text())
    wanted = [c["class_path"].rpartition(".")[2] for c in config["trainer"]["callbacks"]]
    present = [type(c).__name__ for c in built.trainer.callbacks]
    assert all(w in present for w in wanted)
    assert type(built.model).__name__ == "BVModule"


def test_set_knobs_writes_the_one_callback_and_refuses_none_or_several():
    entry = Namespace(class_path="lightning_bv.callbacks.LowRank", init_args=Namespace(rank=16))
    config = Namespace(trainer=Namespace(callbacks=[entry]), lam=None, mode=None, rank=8)
    cli.set_knobs(config)
    assert entry.init_args.rank == 8
    config.trainer.callbacks = [entry, entry]
    with pytest.raises(ValueError, match=r"`--rank` sets `rank` of the run's LowRank .* the run has 2 of them"):
        cli.set_knobs(config)
    config.trainer.callbacks = []
    with pytest.raises(ValueError, match="the run has 0 of them: add one"):
        cli.set_knobs(config)


@pytest.mark.parametrize("name", ["RBVRegularization", "PathNormRegularization"])
def test_lam_knob_sets_the_regularizer_under_its_new_and_its_former_name(name):
    entry = Namespace(class_path=f"lightning_bv.callbacks.{name}", init_args=Namespace(lam=0.003, mode="prox"))
    config = Namespace(trainer=Namespace(callbacks=[entry]), lam=0.01, mode="penalty", rank=None)
    cli.set_knobs(config)
    assert (entry.init_args.lam, entry.init_args.mode) == (0.01, "penalty")
