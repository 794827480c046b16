"""trainyard.lean trims Lightning's per-step overhead without changing what runs."""

import os

import torch
from pytorch_lightning.callbacks import Callback, EarlyStopping
from pytorch_lightning.trainer.states import RunningStage, TrainerFn

from tests.helpers.trainers import quiet_trainer
from trainyard import lean
from trainyard.data import DigitsDataModule
from trainyard.models import MLP
from trainyard.tasks import Classifier


class Counting(Callback):
    def __init__(self):
        self.calls = []
        self.epoch_ends = 0

    def on_train_batch_end(self, trainer, pl_module, *args):
        self.calls.append(pl_module._current_fx_name)

    def on_train_epoch_end(self, trainer, pl_module):
        self.epoch_ends += 1


class CountingStopper(EarlyStopping):
    """A monitoring callback: Lightning dispatches epoch-end hooks to these separately."""

    def __init__(self):
        super().__init__(monitor="train/loss_epoch", patience=100)
        self.epoch_ends = 0

    def on_train_epoch_end(self, trainer, pl_module):
        self.epoch_ends += 1


class Silent(Callback):
    """Implements no per-step hook: must not be dispatched to."""

    def __getattribute__(self, name):
        if name.startswith("on_before_") or name.startswith("on_after_backward"):
            raise AssertionError(f"{name} dispatched to a callback that does not implement it")
        return super().__getattribute__(name)


def test_hooks_reach_exactly_the_callbacks_that_implement_them():
    lean.apply()
    counting, stopper, silent = Counting(), CountingStopper(), Silent()
    trainer = quiet_trainer(
        max_epochs=2,
        limit_train_batches=7,
        callbacks=[counting, stopper, silent],
        profiler=lean.FastPassThroughProfiler(),
    )
    task = Classifier(
        net=MLP((1, 8, 8), 10),
        num_classes=10,
        optimizer=lambda params: torch.optim.SGD(params, lr=0.1),
    )
    trainer.fit(task, datamodule=DigitsDataModule(batch_size=32))
    assert counting.calls == ["on_train_batch_end"] * 14
    assert counting.epoch_ends == stopper.epoch_ends == 2  # once per epoch, not twice
    assert task._current_fx_name is None  # restored after each dispatch


def test_enum_comparisons_keep_their_meaning():
    lean.apply()
    assert TrainerFn.FITTING == "fit" and TrainerFn.FITTING == "FIT"
    assert TrainerFn.FITTING != "validate" and TrainerFn.FITTING == TrainerFn.FITTING
    assert RunningStage.TRAINING != RunningStage.VALIDATING
    assert len({TrainerFn.FITTING, TrainerFn.FITTING}) == 1


def test_cuda_probe_is_restored_only_without_gpus():
    os.environ["PYTORCH_NVML_BASED_CUDA_CHECK"] = "1"
    lean.restore_cuda_probe_without_gpus()
    expected = "1" if torch.cuda.device_count() else "0"
    assert os.environ["PYTORCH_NVML_BASED_CUDA_CHECK"] == expected


def test_apply_is_idempotent():
    import pytorch_lightning.trainer.call as call

    lean.apply()
    first = call._call_callback_hooks
    lean.apply()
    assert call._call_callback_hooks is first
