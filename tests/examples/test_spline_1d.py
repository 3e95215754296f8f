import pytest
from test_examples import load


def test_spline_1d_smoke(tmp_path):
    out = tmp_path / "fit.png"
    result = load("spline_1d").main(["--smoke", "--out", str(out)])
    assert out.stat().st_size > 1000
    assert 0 < result["knots"] <= result["active_neurons"] <= 256
    assert result["tv_of_derivative"] <= result["rbv_norm"] * (1 + 1e-6)  # TV(f') <= R always


@pytest.mark.slow
def test_spline_1d_full_run_is_a_sparse_spline(tmp_path):
    result = load("spline_1d").main(["--out", str(tmp_path / "fit.png")])
    # the representer theorem: at most N - 2 knots for N points; and TV(f') == R for distinct knots
    assert result["knots"] <= result["points"] - 2
    assert result["active_neurons"] <= result["points"]
    assert result["rbv_norm"] == pytest.approx(result["tv_of_derivative"], rel=1e-3)
    assert result["train_mse"] < 0.01
