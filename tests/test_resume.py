"""Resume after a real crash: a fit killed with SIGKILL, resumed from its last checkpoint, ends where an uninterrupted
fit ends (weights to 1e-6, neuron groups, ranks, skips and compaction state), for each callback alone and all together.

The killed fits run in real processes: one script, started once, forks a child per configuration (importing torch
and Lightning once; the parent computes nothing before forking), and each child kills itself with SIGKILL two steps
into the third epoch, after ModelCheckpoint wrote ``last.ckpt`` at the end of the second. The uninterrupted and the
resumed fits run in this process. The 2-process DDP case runs three scripts (``strategy="ddp"`` re-runs its script).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import pytorch_lightning as pl
import torch
from helpers import MLPModule, trainer

from lightning_bv.callbacks import LowRank, NeuronPruning, RBVRegularization, SkipConnections

TESTS = Path(__file__).parent
CONFIGS = ("path_norm", "low_rank", "skip", "pruning", "all")
EPOCHS = 3
STEPS_PER_EPOCH = 4  # 64 samples, 16 a step (8 a process under 2-process DDP)
CKPT_STEP = 2 * STEPS_PER_EPOCH  # last.ckpt: end of the second epoch
KILL_STEP = CKPT_STEP + 2  # killed two steps into the third


class DeadNeurons(MLPModule):
    """MLPModule whose first layer has 4 dead neurons (zero weights, bias -1): NeuronPruning alone has work to do."""

    def __init__(self, batch_size: int = 16) -> None:
        super().__init__(d=4, width=16, lr=0.05, n=64, batch_size=batch_size)
        with torch.no_grad():
            self.net[0].weight[:4] = 0.0
            self.net[0].bias[:4] = -1.0


def make_callbacks(config: str, ddp: bool = False) -> list[pl.Callback]:
    callbacks: list[pl.Callback] = []
    if config in ("low_rank", "all"):
        callbacks.append(LowRank(energy=0.9))
    if config in ("skip", "all"):
        callbacks.append(SkipConnections(targets=["net.2"]))
    if config in ("path_norm", "all"):
        callbacks.append(RBVRegularization(lam=0.05, mode="prox", every_n_steps=3))
    if config in ("pruning", "all"):  # mid-fit compaction is single-device only: DDP compacts at the end of fit
        callbacks.append(NeuronPruning(every_n_epochs=None if ddp else 1))
    return callbacks


class KillAt(pl.Callback):
    """SIGKILL this process at the start of a global step (Lightning gets no chance to clean up)."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, idx: int) -> None:
        if trainer.global_step == self.step:
            os.kill(os.getpid(), signal.SIGKILL)


def fit(
    config: str,
    folder: str | None = None,
    ckpt: str | None = None,
    kill_at: int | None = None,
    ddp: bool = False,
) -> tuple[pl.LightningModule, list[pl.Callback], pl.Trainer]:
    torch.manual_seed(0)
    module = DeadNeurons(batch_size=8 if ddp else 16)
    callbacks = make_callbacks(config, ddp)
    extra: list[pl.Callback] = []
    if folder is not None:
        extra.append(pl.callbacks.ModelCheckpoint(dirpath=folder, every_n_epochs=1, save_last=True))
    if kill_at is not None:
        extra.append(KillAt(kill_at))
    kw: dict[str, Any] = {"strategy": "ddp", "devices": 2} if ddp else {}
    t = trainer(
        callbacks=callbacks + extra,
        max_epochs=EPOCHS,
        max_steps=-1,
        enable_checkpointing=folder is not None,
        **kw,
    )
    t.fit(module, ckpt_path=ckpt)
    return module, callbacks, t


def summary(callbacks: list[pl.Callback]) -> dict[str, Any]:
    """Neuron groups, ranks, skips and compaction state of the callbacks (JSON-able)."""
    out: dict[str, Any] = {}
    for cb in callbacks:
        name = type(cb).__name__
        if isinstance(cb, RBVRegularization):
            assert cb.groups is not None
            out[name] = {"groups": [(g.name, g.num_neurons) for g in cb.groups], "steps": cb._steps}
        elif isinstance(cb, LowRank):
            out[name] = dict(cb.ranks)
        elif isinstance(cb, SkipConnections):
            out[name] = list(cb.wrapped)
        elif isinstance(cb, NeuronPruning):
            assert cb.groups is not None
            out[name] = {"groups": [(g.name, g.num_neurons) for g in cb.groups], "history": cb.history}
    return json.loads(json.dumps(out))  # tuples -> lists, as after a round trip through a file


def assert_same_state(state: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert list(state) == list(expected)
    for k, v in expected.items():
        assert state[k].shape == v.shape, k
        torch.testing.assert_close(state[k], v, atol=1e-6, rtol=0, msg=k)


FORK_SCRIPT = """
import os, sys
sys.path.insert(0, {tests!r})
import test_resume as t  # torch and Lightning, imported once; nothing computed before the forks

out = sys.argv[1]
for config in sys.argv[2:]:
    pid = os.fork()
    if pid == 0:  # the child: fit until KillAt sends SIGKILL
        code = 3
        try:
            t.fit(config, folder=os.path.join(out, config), kill_at=t.KILL_STEP)
        except BaseException:
            import traceback
            traceback.print_exc()
            code = 4
        finally:
            os._exit(code)  # only if the kill did not happen
    _, status = os.waitpid(pid, 0)
    sig = os.WTERMSIG(status) if os.WIFSIGNALED(status) else -os.WEXITSTATUS(status)
    print("RESULT", config, sig, flush=True)
"""


@pytest.fixture(scope="module")
def killed(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, int]]:
    folder = tmp_path_factory.mktemp("killed")
    script = folder / "kill.py"
    script.write_text(FORK_SCRIPT.format(tests=str(TESTS)))
    proc = subprocess.run(
        [sys.executable, str(script), str(folder), *CONFIGS], capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    signals = {line.split()[1]: int(line.split()[2]) for line in proc.stdout.splitlines() if line.startswith("RESULT")}
    assert set(signals) == set(CONFIGS), proc.stdout + proc.stderr[-3000:]
    return folder, signals


@pytest.mark.skipif(not hasattr(os, "fork"), reason="the killed fits are forked processes (POSIX)")
@pytest.mark.parametrize("config", CONFIGS)
def test_resume_after_sigkill_matches_uninterrupted_fit(config: str, killed: tuple[Path, dict[str, int]]) -> None:
    folder, signals = killed
    assert signals[config] == signal.SIGKILL  # a real kill, not an exception or a clean exit
    last = folder / config / "last.ckpt"
    checkpoint = torch.load(last, weights_only=True)  # nothing in it needs pickled code
    assert checkpoint["global_step"] == CKPT_STEP
    assert checkpoint["epoch"] == CKPT_STEP // STEPS_PER_EPOCH - 1

    full, full_callbacks, _ = fit(config)
    states = {cb.state_key for cb in full_callbacks if cb.state_dict()}  # what each callback saves, plain data
    assert states <= set(checkpoint["callbacks"])
    assert len(states) == {"path_norm": 1, "low_rank": 1, "skip": 1, "pruning": 1, "all": 4}[config]
    resumed, resumed_callbacks, t = fit(config, ckpt=str(last))
    assert t.global_step == EPOCHS * STEPS_PER_EPOCH
    assert summary(resumed_callbacks) == summary(full_callbacks)
    assert [type(m).__name__ for m in resumed.modules()] == [type(m).__name__ for m in full.modules()]
    assert_same_state(resumed.state_dict(), full.state_dict())
    if config in ("pruning", "all"):
        history = summary(full_callbacks)["NeuronPruning"]["history"]
        assert len(history) == EPOCHS + 1  # every epoch, and at the end of fit
        assert history[0]["neurons_after"] < history[0]["neurons_before"]  # the 4 dead neurons went at epoch 0
        assert resumed.net[0].out_features < 16


DDP_SCRIPT = """
import json, os, sys
sys.path.insert(0, {tests!r})
import torch
import test_resume as t

what, out = sys.argv[1], sys.argv[2]
if what == "killed":
    t.fit("all", folder=os.path.join(out, "ckpt"), kill_at=t.KILL_STEP, ddp=True)
    raise SystemExit(3)  # not reached: killed
module, callbacks, trainer = t.fit("all", ckpt=sys.argv[3] if what == "resumed" else None, ddp=True)
rank = trainer.global_rank
torch.save({{k: v.detach().clone() for k, v in module.state_dict().items()}}, os.path.join(out, f"rank{{rank}}.pt"))
with open(os.path.join(out, f"rank{{rank}}.json"), "w") as f:
    json.dump({{"summary": t.summary(callbacks), "step": trainer.global_step}}, f)
"""


@pytest.mark.slow
def test_ddp_resume_after_sigkill_matches_uninterrupted_fit(tmp_path: Path) -> None:
    script = tmp_path / "ddp.py"
    script.write_text(DDP_SCRIPT.format(tests=str(TESTS)))
    env = {k: v for k, v in os.environ.items() if k not in ("MASTER_PORT", "LOCAL_RANK", "NODE_RANK", "WORLD_SIZE")}

    def start(what: str, *args: str) -> subprocess.Popen[str]:
        (tmp_path / what).mkdir()
        cmd = [sys.executable, str(script), what, str(tmp_path / what), *args]
        return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

    def finish(proc: subprocess.Popen[str]) -> tuple[int, str]:
        try:
            out, _ = proc.communicate(timeout=480)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, _ = proc.communicate()
        return proc.returncode, out[-4000:]

    full, dead = start("full"), start("killed")  # the two runs that need no checkpoint, side by side
    code, out = finish(dead)
    assert code == -signal.SIGKILL, out
    last = tmp_path / "killed" / "ckpt" / "last.ckpt"
    assert torch.load(last, weights_only=True)["global_step"] == CKPT_STEP
    resumed = start("resumed", str(last))
    for proc in (full, resumed):
        code, out = finish(proc)
        assert code == 0, out
    for rank in (0, 1):
        info = json.loads((tmp_path / "resumed" / f"rank{rank}.json").read_text())
        expected = json.loads((tmp_path / "full" / f"rank{rank}.json").read_text())
        assert info == expected
        assert info["step"] == EPOCHS * STEPS_PER_EPOCH
        assert len(info["summary"]["NeuronPruning"]["history"]) == 1  # compacted at the end of fit only
        state = torch.load(tmp_path / "resumed" / f"rank{rank}.pt", weights_only=True)
        assert_same_state(state, torch.load(tmp_path / "full" / f"rank{rank}.pt", weights_only=True))
