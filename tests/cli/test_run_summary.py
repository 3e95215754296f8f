from types import SimpleNamespace

import torch
from helpers import MLPModule

from lightning_bv.cli._run_summary import RunSummary


def test_run_summary_snapshots_the_model_at_setup_and_at_the_end_of_training():
    module = MLPModule(width=8)
    module.example_input_array = torch.randn(4, 4)
    summary = RunSummary()
    trainer = SimpleNamespace(datamodule=None)
    summary.setup(trainer, module, "validate")
    assert summary.initial is None  # only fit
    summary.setup(trainer, module, "fit")
    with torch.no_grad():
        module.net[2].weight[:, :3] = 0  # three dead neurons in the first layer
    summary.setup(trainer, module, "fit")  # a second setup keeps the first snapshot
    summary.on_train_end(trainer, module)
    assert summary.initial is not None
    assert summary.trained is not None
    assert summary.initial.groups["net.0"] == [8, 8]
    assert summary.trained.groups["net.0"] == [8, 5]


def test_run_summary_is_not_offered_to_trainer_callbacks():
    from jsonargparse._typehints import get_all_subclass_paths
    from pytorch_lightning import Callback

    import lightning_bv.cli  # noqa: F401

    paths = get_all_subclass_paths(Callback)
    assert "lightning_bv.cli.SaveConfigToRunFolder" in paths
    assert not [p for p in paths if p.endswith("RunSummary")]
