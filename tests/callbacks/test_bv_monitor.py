import csv
import json
import struct
import time
import warnings
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
from helpers import MLPModule, trainer
from pytorch_lightning.loggers import CSVLogger
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_bv.callbacks._discovery import GroupDiscovery
from lightning_bv.callbacks.bv_monitor import BVMonitor
from lightning_bv.callbacks.rbv_regularization import RBVRegularization
from lightning_bv.functional.path_norm import path_norm
from lightning_bv.functional.rbv import neuron_scores
from lightning_bv.functional.spectral import spectrum
from lightning_bv.neurons import find_neurons
from lightning_bv.transforms.low_rank import apply_low_rank


class Shallow(pl.LightningModule):
    """1-D regression with a shallow ReLU network (``act`` after the hidden layer; a 2nd hidden layer with ``deep``)."""

    def __init__(self, width: int = 12, deep: nn.Module | None = None, call_self: bool = True) -> None:
        super().__init__()
        torch.manual_seed(0)
        tail = [nn.Linear(width, width), deep] if deep is not None else []
        self.net = nn.Sequential(nn.Linear(1, width), nn.ReLU(), *tail, nn.Linear(width, 1))
        self.call_self = call_self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.mse_loss(self(x) if self.call_self else self.net(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05)

    def train_dataloader(self):
        g = torch.Generator().manual_seed(0)
        x = torch.rand(64, 1, generator=g) * 4 - 2
        return DataLoader(TensorDataset(x, torch.sin(2 * x)), batch_size=16)


def csv_rows(logger: CSVLogger) -> list[dict[str, str]]:
    with open(Path(logger.log_dir) / "metrics.csv") as f:
        return list(csv.DictReader(f))


def logged(rows: list[dict[str, str]], key: str) -> list[float]:
    return [float(r[key]) for r in rows if r.get(key)]


def wandb_records(run_file: Path) -> list[object]:
    """The records of an offline run's ``run-*.wandb`` file.

    The file is a LevelDB-style log (what wandb's former ``DataStore`` read): a 7-byte header, then 32 KiB blocks of
    records, each ``crc32 (4) | length (2) | type (1) | data``, type 1 a whole record, 2/3/4 its first/middle/last
    piece. Each record is a ``wandb_internal_pb2.Record``.
    """
    from wandb.proto import wandb_internal_pb2 as pb

    data = run_file.read_bytes()
    assert data[:4] == b":W&B"
    block, head, pos, piece, records = 32768, 7, 7, b"", []
    while pos + head <= len(data):
        room = block - pos % block
        if room < head:
            pos += room
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + head])
        if length == 0 and kind == 0:  # zero padding to the end of the block
            pos += room
            continue
        chunk, pos = data[pos + head : pos + head + length], pos + head + length
        piece = chunk if kind in (1, 2) else piece + chunk
        if kind in (1, 4):
            record = pb.Record()
            record.ParseFromString(piece)
            records.append(record)
    return records


def wandb_history(save_dir: Path) -> tuple[Path, list[dict[str, object]]]:
    """The folder and history rows of the one offline run under ``save_dir`` (waits for its exit record)."""
    (run_file,) = save_dir.glob("wandb/offline-run-*/run-*.wandb")
    deadline = time.monotonic() + 30
    while True:  # the wandb-core service may still be writing the file when wandb.finish() returns
        records = wandb_records(run_file)
        if any(r.WhichOneof("record_type") == "exit" for r in records) or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    rows = [
        {"/".join(i.nested_key) or i.key: json.loads(i.value_json) for i in r.history.item}
        for r in records
        if r.WhichOneof("record_type") == "history"
    ]
    return run_file.parent, rows


@pytest.fixture
def wandb_run():
    wandb = pytest.importorskip("wandb")
    yield
    wandb.finish()


def test_a_new_monitor_has_no_state():  # its bad arguments are rows of tests/test_bad_input.py
    assert BVMonitor().state_dict() == {}


def test_wandb_offline_run_has_scalars_histograms_image_and_table(tmp_path, wandb_run):
    from pytorch_lightning.loggers import WandbLogger

    monitor = BVMonitor(every_n_steps=2, spectra_every_n_steps=2)
    logger = WandbLogger(save_dir=str(tmp_path), offline=True)
    trainer(max_steps=6, logger=logger, callbacks=[monitor]).fit(Shallow())
    import wandb

    wandb.finish()
    run_dir, rows = wandb_history(tmp_path)
    keys = set().union(*rows)
    for key in (
        "bv/net.0/rbv_norm",
        "bv/net.0/active",
        "bv/path_norm_l1",
        "bv/path_norm_l2",
        "rank/net.0/stable",
        "rank/net.0/effective",
        "rank/net.2/stable",
        "rank/net.2/effective",
    ):
        assert key in keys, key
    assert {r["trainer/global_step"] for r in rows if "bv/net.0/rbv_norm" in r} >= {1, 3, 5}
    hist = next(r for r in rows if "bv/net.0/scores/_type" in r)
    assert hist["bv/net.0/scores/_type"] == "histogram"
    assert sum(hist["bv/net.0/scores/values"]) == 12  # one count per neuron
    assert any(r.get("rank/net.2/singular_values/_type") == "histogram" for r in rows)
    # the extras share the step of the scalars they were computed with
    assert {r["trainer/global_step"] for r in rows if "bv/function/_type" in r} == {1, 3, 5}
    images = sorted((run_dir / "files" / "media" / "images").rglob("function_*.png"))
    assert len(images) == 3
    assert images[0].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table_row = next(r for r in rows if "bv/groups/path" in r)
    table = json.loads((run_dir / "files" / table_row["bv/groups/path"]).read_text())
    assert table["columns"] == ["group", "neurons", "active", "rbv_norm", "producers", "consumers"]
    assert [row[:3] for row in table["data"]] == [["net.0", 12, 12]]


def test_csv_logger_has_the_scalars_and_the_values_are_right(tmp_path):
    logger = CSVLogger(tmp_path)
    model = Shallow()
    trainer(max_steps=6, logger=logger, callbacks=[BVMonitor(every_n_steps=2, spectra_every_n_steps=2)]).fit(model)
    rows = csv_rows(logger)
    for key in ("bv/net.0/rbv_norm", "bv/net.0/active", "bv/path_norm_l1", "bv/path_norm_l2", "rank/net.2/stable"):
        assert key in rows[0], key
    # the last event is at the last step: its values are those of the final weights
    x = torch.zeros(1, 1)
    with torch.no_grad():
        scores = neuron_scores(find_neurons(model, x))["net.0"]
    last = rows[-1]
    assert float(last["bv/net.0/rbv_norm"]) == pytest.approx(float(scores.sum()), rel=1e-6)
    assert float(last["bv/net.0/active"]) == float((scores > 0).sum())
    assert float(last["bv/path_norm_l2"]) == pytest.approx(float(path_norm(model, x, p=2)), rel=1e-6)
    sp = spectrum(model.net[0].weight)
    assert float(last["rank/net.0/effective"]) == pytest.approx(float(sp.effective_rank), rel=1e-6)


def test_low_rank_layers_log_live_components_and_rank_groups(tmp_path):
    model = MLPModule()
    # net.0 reads the data: its components are a group; net.2 sits between two groups, which own its factors
    apply_low_rank(model.net, rank=3, targets=["0", "2"])
    logger = CSVLogger(tmp_path)
    trainer(max_steps=2, logger=logger, callbacks=[BVMonitor(every_n_steps=1, spectra_every_n_steps=1)]).fit(model)
    rows = csv_rows(logger)
    assert logged(rows, "rank/net.0/live") == [3.0, 3.0]
    assert logged(rows, "bv/net.0:rank/active")[-1] == 3.0
    assert logged(rows, "rank/net.0/stable")[-1] <= 3.0
    assert logged(rows, "rank/net.2/live") == [3.0, 3.0]
    assert "bv/net.2:rank/active" not in rows[0]
    assert "rank/net.4/live" not in rows[0]


def test_path_norm_refusal_warns_once_and_the_rest_is_logged(tmp_path):
    logger = CSVLogger(tmp_path)
    monitor = BVMonitor(every_n_steps=1, spectra_every_n_steps=1)
    with pytest.warns(UserWarning, match=r"path_norm does not support .* module 'net.3' \(GELU\)") as record:
        trainer(max_steps=4, logger=logger, callbacks=[monitor]).fit(Shallow(deep=nn.GELU()))
    assert sum("path_norm" in str(w.message) for w in record) == 1
    rows = csv_rows(logger)
    assert len(logged(rows, "bv/net.0/rbv_norm")) == 4
    assert "rank/net.2/effective" in rows[0]
    assert "bv/path_norm_l1" not in rows[0]


class TwoParts(Shallow):
    """The step calls ``self.net`` and uses a parameter outside it: no single child is the model."""

    def __init__(self) -> None:
        super().__init__(call_self=False)
        self.scale = nn.Parameter(torch.ones(()))

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.mse_loss(self.net(x) * self.scale, y)


def test_example_input_sources(tmp_path):
    # the step never calls the module itself, nor one child holding every parameter: path norms are left out
    logger = CSVLogger(tmp_path / "none")
    with pytest.warns(UserWarning, match="has no example input") as record:
        trainer(max_steps=2, logger=logger, callbacks=[BVMonitor(every_n_steps=1)]).fit(TwoParts())
    assert sum("example input" in str(w.message) for w in record) == 1
    assert "bv/path_norm_l1" not in csv_rows(logger)[0]
    # the step calls self.net(x): the input of that call, and the path-norms of net
    logger = CSVLogger(tmp_path / "child")
    model = Shallow(call_self=False)
    trainer(max_steps=2, logger=logger, callbacks=[BVMonitor(every_n_steps=1)]).fit(model)
    want = path_norm(model.net, torch.zeros(1, 1), p=1).item()
    assert logged(csv_rows(logger), "bv/path_norm_l1")[-1] == pytest.approx(want, rel=1e-6)
    # ... unless one is given, to the callback or as the module's example_input_array
    logger = CSVLogger(tmp_path / "given")
    monitor = BVMonitor(every_n_steps=1, example_input=torch.zeros(3, 1))
    trainer(max_steps=2, logger=logger, callbacks=[monitor]).fit(Shallow(call_self=False))
    assert len(logged(csv_rows(logger), "bv/path_norm_l1")) == 2
    logger = CSVLogger(tmp_path / "array")
    model = Shallow(call_self=False)
    model.example_input_array = torch.zeros(2, 1)
    trainer(max_steps=2, logger=logger, callbacks=[BVMonitor(every_n_steps=1)]).fit(model)
    assert len(logged(csv_rows(logger), "bv/path_norm_l1")) == 2


class LongEpochs(Shallow):
    def train_dataloader(self):
        x = torch.rand(600, 1, generator=torch.Generator().manual_seed(0)) * 4 - 2
        return DataLoader(TensorDataset(x, torch.sin(2 * x)), batch_size=20)  # 30 steps an epoch


def test_each_event_is_logged_once_at_its_step(tmp_path):
    # step 50 is mid-epoch: pl_module.log would send its values again at the logging steps 60 and 70 of that epoch
    logger = CSVLogger(tmp_path)
    monitor = BVMonitor(every_n_steps=25, spectra_every_n_steps=50)
    trainer(max_steps=70, logger=logger, log_every_n_steps=10, callbacks=[monitor]).fit(LongEpochs())
    rows = csv_rows(logger)
    assert [int(r["step"]) for r in rows if r.get("bv/net.0/rbv_norm")] == [24, 49]
    assert [int(r["step"]) for r in rows if r.get("rank/net.0/stable")] == [49]
    assert [int(r["step"]) for r in rows if r.get("bv/path_norm_l1")] == [24, 49]


def test_wandb_function_image_when_the_step_calls_a_child(tmp_path, wandb_run):
    from pytorch_lightning.loggers import WandbLogger

    logger = WandbLogger(save_dir=str(tmp_path), offline=True)
    trainer(max_steps=4, logger=logger, callbacks=[BVMonitor(every_n_steps=2)]).fit(Shallow(call_self=False))
    import wandb

    wandb.finish()
    _, rows = wandb_history(tmp_path)
    assert {r["trainer/global_step"] for r in rows if "bv/function/_type" in r} == {1, 3}
    assert {r["trainer/global_step"] for r in rows if "bv/path_norm_l1" in r} == {1, 3}


def test_works_next_to_path_norm_regularization(tmp_path):
    logger = CSVLogger(tmp_path)
    callbacks = [RBVRegularization(lam=1e-3), BVMonitor(every_n_steps=2)]
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # no refusal, no missing input
        warnings.filterwarnings("ignore", message=".*(does not have many workers|LeafSpec|litlogger).*")
        trainer(max_steps=4, logger=logger, callbacks=callbacks).fit(MLPModule())
    assert callbacks[0].groups.names == callbacks[1].groups.names == ["net.0", "net.2"]
    rows = csv_rows(logger)
    for key in ("bv/net.2/rbv_norm", "bv/path_norm_l1"):  # events at global steps 2 and 4 (logged at steps 1, 3)
        assert {int(r["step"]) for r in rows if r.get(key)} >= {1, 3}


def test_knots_are_where_first_layer_neurons_switch():
    model = Shallow(width=4)
    with torch.no_grad():
        model.net[0].weight.copy_(torch.tensor([[1.0], [-2.0], [0.5], [3.0]]))
        model.net[0].bias.copy_(torch.tensor([0.5, 1.0, -1.0, 0.0]))
        model.net[2].weight.copy_(torch.tensor([[1.0, 1.0, 0.0, 1.0]]))  # neuron 2 is dead
    monitor = BVMonitor()
    monitor.groups = find_neurons(model, torch.zeros(1, 1))
    knots = monitor._knots(model, neuron_scores(monitor.groups))
    assert knots.tolist() == pytest.approx([-0.5, 0.5, 0.0])


def test_discovery_keeps_a_one_sample_input_and_pickles():
    import pickle

    model = Shallow()
    d = GroupDiscovery()
    d.start(model)
    model(torch.randn(5, 1))
    groups = d.finish(model)
    assert groups.names == ["net.0"]
    assert d.example_input[0].shape == (1, 1)
    assert d.finish(model) is None
    pickle.loads(pickle.dumps(d))


@pytest.mark.slow
def test_ddp_logs_the_values_of_a_single_process_run(tmp_path):
    def fit(devices: int, folder: str) -> list[dict[str, str]]:
        pl.seed_everything(0)
        logger = CSVLogger(tmp_path / folder, version=0)  # fixed: the main process does not see the workers pick it
        kwargs = {"strategy": "ddp_spawn"} if devices > 1 else {}
        trainer(
            max_steps=6,
            devices=devices,
            logger=logger,
            use_distributed_sampler=False,
            callbacks=[BVMonitor(every_n_steps=2, spectra_every_n_steps=2)],
            **kwargs,
        ).fit(MLPModule(deterministic_sampler=True))
        return [r for r in csv_rows(logger) if r.get("bv/net.0/rbv_norm")]

    single, ddp = fit(1, "single"), fit(2, "ddp")
    keys = [k for k in single[0] if k.startswith(("bv/", "rank/"))]
    assert len(keys) == 2 * 2 + 2 + 3 * 2  # 2 groups, 2 path norms, 3 layers
    assert len(single) == len(ddp) >= 3  # events at global steps 2, 4, 6
    for a, b in zip(single, ddp):
        assert a["step"] == b["step"]
        for k in keys:
            assert float(b[k]) == pytest.approx(float(a[k]), rel=1e-5, abs=1e-7), k
