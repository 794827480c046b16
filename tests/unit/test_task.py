"""The LightningModule wiring: logging cadence, schedulers, weight-decay groups."""

import csv

import pytorch_lightning as pl
import torch

from tests.helpers.trainers import quiet_trainer
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
    trainer = quiet_trainer(max_steps=23, log_every_n_steps=5, logger=logger)
    trainer.fit(_task(), datamodule=DigitsDataModule(batch_size=32))
    with open(tmp_path / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    steps = [int(r["step"]) for r in rows if r.get("train/loss")]
    assert steps == [5, 10, 15, 20]  # global_step after each window's last step
    assert all(0 < float(r["train/loss"]) < 5 for r in rows if r.get("train/loss"))


def test_weight_decay_spares_biases_and_norm_scales():
    groups = _task()._param_groups()
    assert all(p.ndim > 1 for p in groups[0]["params"])
    assert all(p.ndim <= 1 for p in groups[1]["params"]) and groups[1]["weight_decay"] == 0.0
    assert len(_task(decay_norm_and_bias=True)._param_groups()) == 1


def test_onecycle_gets_total_steps_from_the_trainer_and_steps_per_batch():
    from functools import partial

    task = _task(scheduler=partial(torch.optim.lr_scheduler.OneCycleLR, max_lr=0.1))
    trainer = quiet_trainer(max_epochs=2, limit_train_batches=7)
    trainer.fit(task, datamodule=DigitsDataModule(batch_size=32))
    [config] = trainer.lr_scheduler_configs
    assert config.interval == "step"
    assert config.scheduler.total_steps == 14
    assert config.scheduler.last_epoch == 14  # stepped after every optimizer step


class _Automatic(pl.LightningModule):
    """The same training written for Lightning's automatic optimization."""

    def __init__(self, net):
        super().__init__()
        self.net = net

    def training_step(self, batch, batch_idx):
        x, y = batch
        return torch.nn.functional.cross_entropy(self.net(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.2, momentum=0.9)


def _fit(module, **trainer_kwargs):
    pl.seed_everything(0, verbose=False)
    trainer = quiet_trainer(max_epochs=2, **trainer_kwargs)
    trainer.fit(module, datamodule=DigitsDataModule(batch_size=50, seed=0))
    return trainer


def test_our_loop_matches_lightnings_automatic_optimization_with_accumulation_and_clipping():
    def net():
        torch.manual_seed(0)
        return MLP((1, 8, 8), 10, hidden=[32], batch_norm=True)

    ours = Classifier(
        net=net(),
        num_classes=10,
        optimizer=lambda params: torch.optim.SGD(params, lr=0.2, momentum=0.9),
        accumulate_grad_batches=3,
        gradient_clip_val=0.05,
    )
    theirs = _Automatic(net())
    ours_trainer = _fit(ours)
    theirs_trainer = _fit(theirs, accumulate_grad_batches=3, gradient_clip_val=0.05)
    assert ours_trainer.global_step == theirs_trainer.global_step == 2 * 9  # ceil(26/3) x 2
    for (name, a), (_, b) in zip(
        ours.net.state_dict().items(), theirs.net.state_dict().items(), strict=True
    ):
        assert torch.allclose(a.float(), b.float(), atol=1e-6), name
