import pytest
import torch
from torch import nn

from lightning_bv import cli

pytest.importorskip("matplotlib")


class Data:
    x_train = torch.linspace(-1, 1, 7).unsqueeze(1)
    y_train = x_train.abs()


def test_plot_function_only_for_one_input_and_one_output(tmp_path):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(1, 4), nn.ReLU(), nn.Linear(4, 1)).train()
    assert cli.plot_function(net, Data(), tmp_path / "f.png")
    assert (tmp_path / "f.png").stat().st_size > 0
    assert net.training  # evaluated in eval mode, then restored
    assert net[0].training
    assert not cli.plot_function(nn.Linear(1, 2), Data(), tmp_path / "g.png")  # two outputs
    assert not cli.plot_function(net, object(), tmp_path / "h.png")  # no training data
    assert not (tmp_path / "g.png").exists()


def test_plot_spectra_and_neurons(tmp_path):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 1))
    assert cli.plot_spectra(net, tmp_path / "s.png")
    with torch.no_grad():
        for p in net.parameters():
            p.zero_()
    assert not cli.plot_spectra(net, tmp_path / "t.png")  # every singular value is zero
    snap = cli.snapshot(net, torch.randn(2, 3))
    cli.plot_neurons({"initial": snap, "trained": snap, "compacted": None}, tmp_path / "n.png")
    assert (tmp_path / "n.png").stat().st_size > 0
