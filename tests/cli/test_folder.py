from pathlib import Path

import pytorch_lightning as pl
from pytorch_lightning.loggers import CSVLogger

from lightning_bv import cli


def test_run_folder_and_config_name_without_a_logger_and_with_one(tmp_path):
    trainer = pl.Trainer(logger=False, default_root_dir=tmp_path, enable_progress_bar=False)
    assert cli.run_folder(trainer) == tmp_path
    assert cli.config_filename(trainer) == "config.yaml"
    trainer = pl.Trainer(logger=CSVLogger(tmp_path, name="csv"), default_root_dir=tmp_path, enable_progress_bar=False)
    assert cli.run_folder(trainer) == Path(trainer.logger.log_dir)
    assert not cli.is_wandb(trainer.logger)


def test_a_wandb_logger_is_told_by_its_class_name():
    class WandbLogger:  # a stand-in: the name is what counts (pytorch_lightning's or lightning.pytorch's)
        pass

    class Subclass(WandbLogger):
        pass

    assert cli.is_wandb(Subclass())
    trainer = type("T", (), {"loggers": [Subclass()]})()
    assert cli.config_filename(trainer) == "lightning_config.yaml"
