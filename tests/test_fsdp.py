"""The callbacks under FSDP2 (Lightning's ModelParallelStrategy, torch's fully_shard) on 2 CPU processes.

One launch of tests/fsdp_fits.py runs every case in two processes; each test runs its case on one process with the
same global batches and compares. Weights are gathered with ``full_tensor()``.
"""

from __future__ import annotations

import csv
import subprocess
import sys
from pathlib import Path

import fsdp_fits
import pytest
import torch

pytestmark = pytest.mark.slow

FITS = ["prox-sgd", "prox-adam", "prox_nolift-adam", "penalty-sgd", "weight_decay-adam", "surgery-sgd", "surgery-adam"]
OTHERS = ["count-sgd", "count-adam", "monitor-sgd", "prune-sgd", "resume_full-adam", "resume_dist-adam"]
REFUSED = ["refused_tp-sgd"]  # last: the processes go on after the error


@pytest.fixture(scope="module")
def fsdp_runs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("fsdp")
    script = Path(fsdp_fits.__file__)
    # ModelParallelStrategy relaunches the script itself for rank 1, so it runs as a script, not inside pytest
    done = subprocess.run(
        [sys.executable, str(script), str(out), *FITS, *OTHERS, *REFUSED],
        cwd=out,
        timeout=900,
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    return out


def load(out: Path, case: str, rank: int) -> dict:
    return torch.load(out / f"{case}.rank{rank}.pt", weights_only=False)


def assert_close_to(single: dict[str, torch.Tensor], sharded: dict[str, torch.Tensor], tol: float) -> None:
    assert list(sharded) == list(single)
    for k, a in single.items():
        scale = max(1.0, float(a.abs().max())) if a.numel() else 1.0
        torch.testing.assert_close(sharded[k], a, rtol=0, atol=tol * scale, msg=k)


def dead_columns(state: dict[str, torch.Tensor]) -> int:
    """Neurons whose output weights are all zero (columns of the weights that read them)."""
    return sum(int((v == 0).all(0).sum()) for k, v in state.items() if v.dim() == 2 and "skip" not in k)


@pytest.mark.parametrize("case", FITS)
def test_fsdp2_fit_equals_one_process(fsdp_runs: Path, case: str) -> None:
    r0, r1 = load(fsdp_runs, case, 0), load(fsdp_runs, case, 1)
    for k, v in r0["state"].items():
        assert torch.equal(v, r1["state"][k]), k  # the ranks agree
    single = fsdp_fits.run(case, str(fsdp_runs), fsdp=False)
    assert_close_to(single["state"], r0["state"], 1e-5)
    if case.startswith(("prox", "surgery")):
        assert dead_columns(r0["state"]) > 0  # neurons were killed, on one process and on two alike


def test_bv_monitor_logs_the_values_of_one_process(fsdp_runs: Path) -> None:
    fsdp_fits.run("monitor-sgd", str(fsdp_runs), fsdp=False)

    def rows(side: str) -> list[dict[str, str]]:
        with open(fsdp_runs / f"monitor-sgd-{side}" / "version_0" / "metrics.csv") as f:
            return [r for r in csv.DictReader(f) if r.get("bv/net.0/rbv_norm")]

    single, sharded = rows("single"), rows("fsdp")
    keys = [k for k in single[0] if k.startswith(("bv/", "rank/")) and single[0][k]]
    assert {"bv/path_norm_l1", "rank/net.2/live", "rank/net.0/stable", "bv/net.2/active"} <= set(keys)
    assert len(single) == len(sharded) == 4  # steps 3, 6, 9, 12
    for a, b in zip(single, sharded):
        assert a["step"] == b["step"]
        for k in keys:
            assert float(b[k]) == pytest.approx(float(a[k]), rel=1e-5, abs=1e-7), k


def test_neuron_pruning_compacts_the_gathered_model_on_rank_zero(fsdp_runs: Path) -> None:
    r0, r1 = load(fsdp_runs, "prune-sgd", 0), load(fsdp_runs, "prune-sgd", 1)
    single = fsdp_fits.run("prune-sgd", str(fsdp_runs), fsdp=False)
    assert single["state"]["net.0.weight"].shape[0] < 16  # one process compacts the module itself
    assert_close_to(single["state"], r0["compacted"], 1e-5)  # FSDP2: the same compacted model, on rank 0
    assert r1["compacted"] is None
    assert r0["state"]["net.0.weight"].shape == (16, 4)  # the sharded module keeps its sizes (dead neurons are 0)
    saved = torch.load(r0["checkpoint_path"], weights_only=False)
    assert Path(r0["checkpoint_path"]).name == "compacted.ckpt"
    for k, v in r0["compacted"].items():
        assert torch.equal(saved["state_dict"][k], v), k
    fresh = fsdp_fits.module("sgd")  # it loads into a fresh module of the original sizes
    from lightning_bv import resize_to_state_dict_

    resize_to_state_dict_(fresh, saved["state_dict"])
    fresh.load_state_dict(saved["state_dict"])


@pytest.mark.parametrize("case", ["resume_full-adam", "resume_dist-adam"])
def test_resume_from_an_fsdp2_checkpoint_equals_an_uninterrupted_fit(fsdp_runs: Path, case: str) -> None:
    resumed, straight = load(fsdp_runs, case, 0), load(fsdp_runs, "prox-adam", 0)
    assert resumed["start_step"] == 6
    assert straight["start_step"] == 0
    assert_close_to(straight["state"], resumed["state"], 1e-6)


@pytest.mark.parametrize(("case", "per_group"), [("count-sgd", 1), ("count-adam", 2)])
def test_one_all_reduce_per_group_and_update_plus_one_for_adams_thresholds(fsdp_runs: Path, case: str, per_group):
    counts = load(fsdp_runs, case, 0)["all_reduces_per_update"]
    assert len(counts) == fsdp_fits.STEPS
    assert set(counts) == {2 * per_group}  # 2 groups: the norms of w and v in one call; Adam: its mean D in one more


def test_tensor_parallelism_is_refused_at_setup_on_every_rank(fsdp_runs: Path) -> None:
    for rank in (0, 1):
        error = load(fsdp_runs, "refused_tp-sgd", rank)["error"]
        assert "supports ModelParallelStrategy with data parallelism only" in error
        assert "tensor_parallel_size=2" in error
