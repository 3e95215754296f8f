import pytest
from cli_helpers import CONFIGS, run_cli

from lightning_bv import cli

pytestmark = pytest.mark.filterwarnings("ignore:.*LightningCLI's args parameter is intended")


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
    "a second RBVRegularization": (
        ["--trainer.callbacks+=RBVRegularization", "--trainer.callbacks.lam=0.1"],
        "trainer.callbacks has two RBVRegularization callbacks with the same state_key, which Lightning cannot "
        "checkpoint side by side. The default run already has one RBVRegularization: change it with its flags "
        "(--lam, --mode)",
    ),
    "misspelled class": (["--trainer.callbacks+=LowRnak"], "'LowRnak' is not a class lightning-bv knows (nor an "),
    "misspelled class, suggestion": (["--trainer.callbacks+=LowRnak"], "Did you mean 'LowRank'?"),
    "missing lam and a bad mode": (
        ["--trainer.callbacks+=RBVRegularization", "--trainer.callbacks.mode=proxx"],
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


def test_error_message_is_one_line_with_the_subcommand_and_the_debug_hint():
    message = cli.error_message(ValueError("`rank` must be an int >= 1,\n  got 0"), ["validate", "--rank=0"])
    assert message == (
        "lightning-bv: error (ValueError): `rank` must be an int >= 1, got 0. See `lightning-bv validate --help` "
        "for the arguments; set LIGHTNING_BV_DEBUG=1 for the traceback."
    )
    assert "`lightning-bv fit --help`" in cli.error_message(FileNotFoundError("x!"), ["--config=a.yaml"])


def test_user_errors_and_others():
    assert cli.is_user_error(ValueError("bad"))
    assert cli.is_user_error(FileNotFoundError("a.yaml"))
    assert cli.is_user_error(RuntimeError("Found more than one stateful callback of type `LowRank`"))
    assert not cli.is_user_error(RuntimeError("CUDA out of memory"))
    assert not cli.is_user_error(KeyError("x"))
