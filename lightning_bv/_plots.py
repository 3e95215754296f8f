"""Figures drawn without pyplot, shared by the ``lightning-bv`` report and :class:`~lightning_bv.callbacks.BVMonitor`.

Every figure has its own Agg canvas (no pyplot: no global figure to close, no GUI backend). matplotlib is imported
when a figure is made: an ``ImportError`` then says it is not installed. Pure matplotlib and torch; no Lightning.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor


def has_matplotlib() -> bool:
    """Whether matplotlib (its ``Figure`` and Agg canvas) can be imported."""
    try:
        import matplotlib.backends.backend_agg  # noqa: F401
        import matplotlib.figure  # noqa: F401
    except ImportError:
        return False
    return True


def figure(width: float, height: float, dpi: int = 100) -> Any:
    """A matplotlib ``Figure`` of ``width`` x ``height`` inches with its own Agg canvas (``fig.canvas``).

    Raises:
        ImportError: matplotlib is not installed.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=dpi)
    FigureCanvasAgg(fig)  # attaches itself as fig.canvas: the Agg renderer without pyplot
    return fig


def rgb(fig: Any) -> Any:
    """The figure drawn, as a ``height x width x 3`` uint8 numpy array (for an image logger such as W&B's)."""
    import numpy as np

    fig.canvas.draw()
    return np.asarray(fig.canvas.buffer_rgba())[..., :3].copy()


def _numpy(t: Tensor) -> Any:
    return t.detach().reshape(-1).cpu().numpy()


def function_figure(
    grid: Tensor,
    values: Tensor,
    *,
    label: str = "f(x)",
    data: tuple[Tensor, Tensor] | None = None,
    knots: tuple[Tensor, Tensor] | None = None,
    title: str | None = None,
    size: tuple[float, float] = (7, 4),
    dpi: int = 100,
) -> Any:
    """A figure of a function of one variable: ``values`` at the points ``grid``, the data and the knots marked.

    Args:
        grid: the inputs, ``n`` of them (any shape with ``n`` elements).
        values: the function at ``grid``, ``n`` of them.
        label: the legend's name of the function.
        data: ``(x, y)`` training points, drawn as black dots over the line.
        knots: ``(x, f(x))`` at the knots of a ReLU network (where a neuron's ``w_k x + b_k = 0``), drawn as red dots;
            the legend gives their number.
        title: the axes' title.
        size: width and height in inches.
        dpi: dots per inch.

    Raises:
        ImportError: matplotlib is not installed.

    Example:
        >>> import torch
        >>> x = torch.linspace(-1, 1, 5)
        >>> fig = function_figure(x, x.relu(), knots=(torch.zeros(1), torch.zeros(1)), size=(3, 2), dpi=50)
        >>> rgb(fig).shape
        (100, 150, 3)
    """
    fig = figure(*size, dpi=dpi)
    ax = fig.add_subplot()
    if data is not None:
        ax.scatter(_numpy(data[0]), _numpy(data[1]), s=14, color="k", label="training data", zorder=3)
    ax.plot(_numpy(grid), _numpy(values), color="C0", lw=1.5, label=label)
    if knots is not None and knots[0].numel():
        ax.plot(_numpy(knots[0]), _numpy(knots[1]), "o", ms=4, color="C3", label=f"{knots[0].numel()} knots")
    ax.set_xlabel("x")
    ax.set_ylabel("f(x)")
    if title is not None:
        ax.set_title(title)
    ax.legend(loc="best")
    fig.tight_layout()
    return fig
