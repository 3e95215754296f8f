import ast
import csv
import importlib.util
import re
from pathlib import Path

import pytest
import torch

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def load(name):
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_digits_smoke(tmp_path):
    out = tmp_path / "digits.png"
    results = load("digits").main(["--smoke", "--out", str(out)])
    assert out.stat().st_size > 1000
    assert list(results) == ["none", "weight decay", "neuron wd", "prox"]
    for r in results.values():
        assert 0.0 <= r["test_acc"] <= 1.0
        assert r["neurons"] == 256
        assert r["neurons_kept"] <= r["neurons"]
        assert r["params_after"] <= r["params_before"]
    assert results["none"]["neurons_kept"] == 256  # nothing is exactly zero without the prox


@pytest.mark.slow
def test_digits_full_run_prox_keeps_fewer_neurons(tmp_path):
    results = load("digits").main(["--out", str(tmp_path / "digits.png")])
    assert results["weight decay"]["neurons_kept"] == 256  # weight decay never makes a neuron exactly zero
    assert results["prox"]["neurons_kept"] < 200
    assert results["prox"]["test_acc"] > 0.95


def test_existing_project_smoke(tmp_path):
    result = load("existing_project").main(["--smoke", "--out", str(tmp_path)])
    assert 0.0 <= result["test_acc"] <= 1.0
    (metrics,) = tmp_path.glob("lightning_logs/version_*/metrics.csv")
    with metrics.open() as f:
        columns = set(next(csv.reader(f)))
    # RBVRegularization and BVMonitor (per group, path-norms) at work; LowRank's features.3 sits between the
    # two groups, which own its factors (it has no rank group of its own)
    expected = {"bv/rbv_norm", "bv/active_neurons", "bv/features.1/active", "bv/features.3/active"}
    assert expected | {"bv/path_norm_l1", "bv/path_norm_l2", "train_loss", "val_acc"} <= columns


def test_existing_project_adds_lightning_bv_in_three_lines():
    source = (EXAMPLES / "existing_project.py").read_text()
    lines = source.splitlines()
    marked = [i + 1 for i, line in enumerate(lines) if re.search(r"# lbv [123]/3$", line)]
    assert [lines[i - 1].rsplit("# lbv ", 1)[1] for i in marked] == ["1/3", "2/3", "3/3"]
    ours = {"BVMonitor", "LowRank", "RBVRegularization", "bv"}
    used = {
        node.lineno
        for node in ast.walk(ast.parse(source))
        if (isinstance(node, ast.Name) and node.id in ours)
        or (isinstance(node, ast.ImportFrom) and (node.module or "").startswith("lightning_bv"))
    }
    assert used == set(marked)  # nothing else in the project refers to lightning_bv


def test_examples_readme_mentions_every_example():
    readme = (EXAMPLES / "README.md").read_text()
    for name in ("spline_1d.py", "digits.py", "existing_project.py", "multi_gpu.md", "fsdp2.py"):
        assert name in readme
    for config in (EXAMPLES / "configs").glob("*.yaml"):
        assert config.name in readme


@pytest.mark.slow
def test_existing_project_full_run(tmp_path):
    result = load("existing_project").main(["--out", str(tmp_path)])
    assert result["test_acc"] > 0.9


def test_spline_1d_smoke(tmp_path):
    out = tmp_path / "fit.png"
    result = load("spline_1d").main(["--smoke", "--out", str(out)])
    assert out.stat().st_size > 1000
    assert 0 < result["knots"] <= result["active_neurons"] <= 256
    assert result["tv_of_derivative"] <= result["rbv_norm"] * (1 + 1e-6)  # TV(f') <= R always


@pytest.mark.slow
def test_spline_1d_full_run_is_a_sparse_spline(tmp_path):
    result = load("spline_1d").main(["--out", str(tmp_path / "fit.png")])
    # the representer theorem: at most N - 2 knots for N points (once knots of one sign between two data points, which
    # a gradient method spreads into clusters, are merged); and TV(f') == R for distinct knots
    assert result["knots_merged_between_data"] <= result["points"] - 2
    assert result["knots"] >= result["knots_merged_between_data"]
    assert result["rbv_norm"] == pytest.approx(result["tv_of_derivative"], rel=1e-3)
    assert result["train_mse"] < 0.01


def test_every_measured_number_of_the_example_pages_is_in_a_regenerated_block(tmp_path):
    """The tables, neuron counts and wall times of examples/*.md are in the blocks benchmarks.examples rewrites."""
    from benchmarks import examples as regen

    readme, multi_gpu = (EXAMPLES / "README.md").read_text(), (EXAMPLES / "multi_gpu.md").read_text()
    blocks = {}
    for name, path in regen.DOCS.items():
        found = re.search(
            rf"<!-- benchmarks.examples:{name} -->\n(.*?)\n<!-- /benchmarks.examples:{name} -->", path.read_text(), re.S
        )
        assert found is not None, name
        blocks[name] = found.group(1)
    assert "test acc" in blocks["default"]
    assert "neurons (ReLU)" in blocks["default"]
    assert blocks["digits"].count("/ 256") == 4
    assert "neurons left" in blocks["multi_gpu"]
    outside = re.sub(
        r"<!-- benchmarks.examples:(\w+) -->.*?<!-- /benchmarks.examples:\1 -->", "", readme + multi_gpu, flags=re.S
    )
    for measured in (r"\d+ s\b", r"0\.9\d{3}", r"\d+ of 256", r"\d+ / 256", r"\d+% "):
        assert not re.search(measured, outside), measured
    # rewrite replaces the block and nothing else
    page = tmp_path / "page.md"
    page.write_text("a 1\n<!-- benchmarks.examples:x -->\nold 2\n<!-- /benchmarks.examples:x -->\nb 3\n")
    regen.rewrite(page, "x", "new 4")
    assert page.read_text() == "a 1\n<!-- benchmarks.examples:x -->\nnew 4\n<!-- /benchmarks.examples:x -->\nb 3\n"
    with pytest.raises(ValueError, match=r"has no block <!-- benchmarks.examples:y -->"):
        regen.rewrite(page, "y", "z")


@pytest.mark.slow
def test_fsdp2_example_runs_on_two_cpu_processes(tmp_path):
    import subprocess
    import sys

    # ModelParallelStrategy relaunches the script for rank 1: run it as a script
    done = subprocess.run(
        [sys.executable, str(EXAMPLES / "fsdp2.py"), "--smoke", "--out", str(tmp_path)],
        cwd=tmp_path, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert "compacted on rank 0: 512 -> " in done.stdout
    (ckpt,) = tmp_path.glob("lightning_logs/version_*/checkpoints/compacted.ckpt")
    state = torch.load(ckpt, weights_only=False)["state_dict"]
    assert state["net.4.weight"].shape[0] == 10
