"""The LightningModule wiring: logging cadence, schedulers, weight-decay groups."""

import csv

import pytorch_lightning as pl
import torch

from trainyard.data import DigitsDataModule
from trainyard.models import MLP
from trainyard.tasks import Classifier


def _task(**kwargs):
    return Classifier(
        net=MLP((1, 8, 8), 10, hidden=[16], batch_norm=True),
        num_classes=10,
        optimizer=lambda params: torch.optim.SGD(params, lr=0.1, weight_decay=0.1),
        **kwargs,
    )


def test_train_loss_reaches_the_logger_once_per_window(tmp_path):
    logger = pl.loggers.CSVLogger(tmp_path, name="", version="")
    trainer = pl.Trainer(
        accelerator="cpu",
        max_steps=23,
        log_every_n_steps=5,
        logger=logger,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
    )
    trainer.fit(_task(), datamodule=DigitsDataModule(batch_size=32))
    with open(tmp_path / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    steps = [int(r["step"]) for r in rows if r.get("train/loss")]
    assert steps == [4, 9, 14, 19]
    assert all(0 < float(r["train/loss"]) < 5 for r in rows if r.get("train/loss"))


def test_weight_decay_spares_biases_and_norm_scales():
    groups = _task()._param_groups()
    assert all(p.ndim > 1 for p in groups[0]["params"])
    assert all(p.ndim <= 1 for p in groups[1]["params"]) and groups[1]["weight_decay"] == 0.0
    assert len(_task(decay_norm_and_bias=True)._param_groups()) == 1


def test_onecycle_gets_total_steps_from_the_trainer_and_steps_per_batch():
    from functools import partial

    task = _task(scheduler=partial(torch.optim.lr_scheduler.OneCycleLR, max_lr=0.1))
    trainer = pl.Trainer(
        accelerator="cpu",
        max_epochs=2,
        limit_train_batches=7,
        limit_val_batches=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
    )
    trainer.fit(task, datamodule=DigitsDataModule(batch_size=32))
    [config] = trainer.lr_scheduler_configs
    assert config.interval == "step"
    assert config.scheduler.total_steps == 14
    assert config.scheduler.last_epoch == 14  # stepped after every optimizer step
