import json

import pytest
import pytorch_lightning as pl
import torch

import lightning_bv as lbv
from lightning_bv import cli


def snapshots():
    torch.manual_seed(0)
    net = lbv.RBVNet(in_features=4, out_features=2, width=8, bottleneck=3, depth=2)
    x = torch.randn(5, 4)
    initial = cli.snapshot(net, x, {"acc": 0.25, "loss": 2.0})
    with torch.no_grad():
        net.blocks[0].fc2.weight[:, :2] = 0
    return net, {"initial": initial, "trained": cli.snapshot(net, x, {"acc": 0.75, "loss": 0.5}), "compacted": None}


def test_table_has_a_column_per_snapshot_and_the_accuracy_first():
    _, snaps = snapshots()
    lines = cli.table(snaps).splitlines()
    assert lines[0].split() == list(cli.COLUMNS)
    assert set(lines[1]) == {"-"}
    assert lines[2].split() == ["test", "acc", "0.25", "0.75", "-"]
    assert lines[3].split() == ["test", "loss", "2", "0.5", "-"]
    assert "14 live / 16" in lines[4]


def test_save_json_leaves_the_scores_out(tmp_path):
    _, snaps = snapshots()
    cli.save_json(snaps, tmp_path / "s.json", {"note": "x"})
    data = json.loads((tmp_path / "s.json").read_text())
    assert data["trained"]["groups"] == {"blocks.0.fc1": [8, 6], "blocks.1.fc1": [8, 8]}
    assert data["trained"]["scores"] is None
    assert data["compacted"] is None
    assert data["note"] == "x"


@pytest.mark.filterwarnings("ignore:.*GPU available but not used")
def test_write_report_writes_prints_and_returns_the_files(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    net, snaps = snapshots()
    trainer = pl.Trainer(logger=False, default_root_dir=tmp_path, enable_progress_bar=False)
    written = cli.write_report(trainer, net, None, tmp_path / "run", snaps, "compaction skipped: why")
    assert written == ["config.yaml", "summary.txt", "summary.json", "model_state_dict.pt", "neurons.png",
                       "singular_values.png"]  # fmt: skip
    for name in written[1:]:
        assert (tmp_path / "run" / name).stat().st_size > 0, name
    out = capsys.readouterr().out
    assert f"lightning-bv: results (run folder: {tmp_path / 'run'})" in out
    assert (tmp_path / "run" / "summary.txt").read_text().strip() in out
    assert "note: compaction skipped: why" in out
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["note"] == "compaction skipped: why"
    assert torch.load(tmp_path / "run" / "model_state_dict.pt").keys() == net.state_dict().keys()
