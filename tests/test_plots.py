import sys

import pytest
import torch

from lightning_bv import _plots

pytest.importorskip("matplotlib")


def test_figure_has_its_own_agg_canvas_without_pyplot():
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    had_pyplot = "matplotlib.pyplot" in sys.modules
    fig = _plots.figure(2, 1, dpi=50)
    assert isinstance(fig.canvas, FigureCanvasAgg)
    assert _plots.rgb(fig).shape == (50, 100, 3)
    assert ("matplotlib.pyplot" in sys.modules) == had_pyplot
    assert _plots.has_matplotlib()


def test_function_figure_draws_the_line_the_data_and_the_knots():
    x = torch.linspace(-1, 1, 11, dtype=torch.float64)
    knots = (torch.tensor([0.0]), torch.tensor([0.0]))
    fig = _plots.function_figure(x, x.relu(), label="g", data=(x[:3], x[:3]), knots=knots, title="t", size=(3, 2))
    (ax,) = fig.axes
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["training data", "g", "1 knots"]
    assert ax.get_title() == "t"
    line, marks = ax.get_lines()
    assert line.get_xydata().tolist() == torch.stack([x, x.relu()], 1).tolist()
    assert marks.get_xydata().tolist() == [[0.0, 0.0]]
    fig = _plots.function_figure(x, x, knots=(torch.zeros(0), torch.zeros(0)))  # no knot in range: no marks
    assert [t.get_text() for t in fig.axes[0].get_legend().get_texts()] == ["f(x)"]
    assert fig.get_size_inches().tolist() == [7, 4]
