"""The checks of docs/theory.md, run by ``benchmarks/theory_checks.py`` (which prints them), on smaller fits.

Smaller than the script in one way each, stated where it matters: the 1-D fit has 64 neurons, lam 0.1 and 1500 steps
(the script: 256, 0.03, 3000); the RBVNets train 1000 steps; the teacher-student fit runs 100 epochs (the script:
300). The assertions are the script's, not looser ones.
"""

import importlib.util
from pathlib import Path

import pytest
import torch

import lightning_bv as lbv

ROOT = Path(__file__).resolve().parents[1]


def _load():
    spec = importlib.util.spec_from_file_location("theory_checks", ROOT / "benchmarks" / "theory_checks.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


checks = _load()


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models: one thread is faster, and far faster on a shared machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def rbvnet_q2():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    net, x, _ = checks.train_rbvnet(q=2, lam=0.01, steps=1000)
    torch.set_num_threads(threads)
    return net, x


def test_a_prox_fit_in_1d_is_a_spline_with_at_most_n_minus_2_knots():
    r = checks.check_spline(n=20, width=64, lam=0.003, steps=1500)
    assert r["knots_merged_between_data"] <= r["points"] - 2, r
    assert r["active_neurons"] >= r["knots"] >= r["knots_merged_between_data"] > 0
    assert r["tv_of_derivative"] == pytest.approx(r["rbv_norm"], rel=1e-4)
    assert r["train_mse"] < 0.02  # a fit, not the zero function (noise variance 0.01)


def test_b_after_balance_the_neuron_weight_decay_equals_r(rbvnet_q2):
    net, x = rbvnet_q2
    r = checks.check_balance(net, x)
    assert r["passed"], r
    assert r["R"] == pytest.approx(r["R_before"], rel=1e-5)  # balance keeps R and the function
    assert r["max_function_change"] <= 1e-5
    assert r["weight_decay_before"] > r["R"] * (1 + 1e-3)  # the check is not vacuous: unbalanced before


def test_b_holds_on_every_neuron_when_none_is_dead():
    torch.manual_seed(0)
    net = lbv.RBVNet(3, 2, width=16, bottleneck=2, depth=3)
    with torch.no_grad():
        for p in net.parameters():
            p.mul_(torch.rand_like(p) * 3)  # far from balance
    groups = lbv.find_neurons(net, torch.randn(2, 3))
    lbv.balance_(groups)
    with torch.no_grad():
        assert float(lbv.neuron_weight_decay(groups)) == pytest.approx(float(lbv.rbv_norm(groups)), rel=1e-5)


def test_c_rank_between_blocks_is_at_most_the_bottleneck(rbvnet_q2):
    net, _ = rbvnet_q2
    r = checks.check_bottleneck_rank(net)
    assert r["passed"], r
    assert len(r["ranks"]) == net.depth - 1


def test_d_q1_layers_keep_at_most_n_times_d_l_neurons():
    net, _, _ = checks.train_rbvnet(q=1, lam=0.1, steps=1000)
    r = checks.check_q1_width(net, n=8)
    assert r["passed"], r
    assert max(r["bounds"]) < net.width  # the bound is not vacuous


def test_e_teacher_student_prox_keeps_at_most_twice_the_teacher():
    r = checks.check_teacher(epochs=100)
    assert r["active"] <= 2 * r["teacher_neurons"], r
    assert r["test_mse"] < 0.01 * r["target_variance"]


@pytest.mark.slow
def test_script_full_settings_all_pass():
    results = checks.run_all(quick=False)
    failed = {name: r for name, r in results.items() if not r["passed"]}
    assert not failed, failed
