"""trainyard.lean trims Lightning's per-step overhead without changing what runs."""

import gc
import logging
import os
import weakref

import pytest
import pytorch_lightning.loops.training_epoch_loop as epoch_loop
import pytorch_lightning.trainer.call as call
import torch
from lightning_utilities.core.enums import StrEnum
from pytorch_lightning.callbacks import Callback, EarlyStopping
from pytorch_lightning.trainer.states import RunningStage, TrainerFn, TrainerStatus
from pytorch_lightning.utilities.enums import GradClipAlgorithmType

from tests.helpers.trainers import quiet_trainer
from trainyard import lean
from trainyard.data import DigitsDataModule
from trainyard.models import MLP
from trainyard.tasks import Classifier

TRAINER_ENUMS = (TrainerFn, RunningStage, TrainerStatus)


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
    lean.apply()
    first = call._call_callback_hooks
    lean.apply()
    assert call._call_callback_hooks is first


# -- the version guard ------------------------------------------------------------------
def test_installed_lightning_is_the_verified_one():
    import pytorch_lightning

    assert pytorch_lightning.__version__ == lean.VERIFIED_LIGHTNING, (
        f"Lightning is now {pytorch_lightning.__version__}; trainyard.lean's patches were "
        f"checked against {lean.VERIFIED_LIGHTNING} and are off until re-verified: re-verify "
        "each patch in trainyard/lean.py against the new Lightning, then bump VERIFIED_LIGHTNING"
    )


def _stock(fn):
    """Lightning's own function behind one of trainyard's patches (or fn itself)."""
    return getattr(fn, "__wrapped__", fn)


@pytest.fixture
def stock_lightning(monkeypatch):
    """Lightning's own functions in place for one test; whatever was there before after it."""
    monkeypatch.setattr(call, "_call_callback_hooks", _stock(call._call_callback_hooks))
    monkeypatch.setattr(
        epoch_loop, "is_param_in_hook_signature", _stock(epoch_loop.is_param_in_hook_signature)
    )
    for enum in (StrEnum, *TRAINER_ENUMS):
        if getattr(vars(enum).get("__eq__"), "trainyard_fast", False):
            if enum is StrEnum:
                monkeypatch.setattr(enum, "__eq__", _stock(enum.__eq__))
            else:
                monkeypatch.delattr(enum, "__eq__")


def _lightning_functions() -> tuple:
    return (
        call._call_callback_hooks,
        epoch_loop.is_param_in_hook_signature,
        *(vars(enum).get("__eq__") for enum in (StrEnum, *TRAINER_ENUMS)),
    )


def test_another_lightning_version_gets_no_patch_and_one_notice(
    stock_lightning, monkeypatch, caplog
):
    import pytorch_lightning

    monkeypatch.setattr(pytorch_lightning, "__version__", "2.7.0")
    monkeypatch.setattr(lean, "_notice_given", False)  # as in a fresh process
    before = _lightning_functions()
    with caplog.at_level(logging.WARNING, logger="trainyard"):
        lean.apply()
        lean.apply()
    assert not lean.verified()
    assert _lightning_functions() == before
    notices = [r for r in caplog.records if r.name == "trainyard"]
    assert len(notices) == 1 and notices[0].levelno == logging.WARNING
    message = notices[0].getMessage()
    assert "\n" not in message
    assert lean.VERIFIED_LIGHTNING in message and "2.7.0" in message and "stock" in message


def test_the_verified_version_gets_the_patches(stock_lightning):
    before = _lightning_functions()
    lean.apply()
    assert lean.verified()
    assert call._call_callback_hooks is not before[0]
    assert epoch_loop.is_param_in_hook_signature is not before[1]


# -- callback dispatch cache ------------------------------------------------------------
class Quiet(Callback):
    """Implements no hook."""


class Hears(Callback):
    def __init__(self, trainer=None):
        self.heard = 0
        self.trainer = trainer  # as callbacks that keep their trainer do

    def on_train_batch_end(self, trainer, pl_module, *args):
        self.heard += 1


class FakeTrainer:
    """What call._call_callback_hooks reads from a Trainer, nothing more."""

    lightning_module = None
    profiler = lean.FastPassThroughProfiler()

    def __init__(self, callbacks):
        self.callbacks = callbacks


def test_a_new_callback_at_a_freed_callbacks_address_is_dispatched_to():
    lean.apply()
    quiet = Quiet()
    freed = id(quiet)
    call._call_callback_hooks(FakeTrainer([quiet]), "on_train_batch_end", None, None, 0)
    del quiet
    kept = []  # held, so that each try gets another address
    for _ in range(10_000):
        hears = Hears()
        if id(hears) == freed:
            break
        kept.append(hears)
    else:
        pytest.fail("no new callback landed at the freed address: the case is not exercised")
    call._call_callback_hooks(FakeTrainer([hears]), "on_train_batch_end", None, None, 0)
    assert hears.heard == 1


def test_dispatch_follows_changes_to_the_trainers_callbacks():
    lean.apply()
    first, second = Hears(), Hears()
    trainer = FakeTrainer([Quiet()])
    call._call_callback_hooks(trainer, "on_train_batch_end", None, None, 0)
    trainer.callbacks.append(first)
    call._call_callback_hooks(trainer, "on_train_batch_end", None, None, 0)
    trainer.callbacks[1] = second
    call._call_callback_hooks(trainer, "on_train_batch_end", None, None, 0)
    trainer.callbacks = [first]
    call._call_callback_hooks(trainer, "on_train_batch_end", None, None, 0)
    assert (first.heard, second.heard) == (2, 1)


def test_dispatch_keeps_no_trainer_or_callback_alive():
    lean.apply()
    trainer = FakeTrainer([])
    trainer.callbacks.append(Hears(trainer))  # a cycle, as when a callback keeps its trainer
    call._call_callback_hooks(trainer, "on_train_batch_end", None, None, 0)
    gone = weakref.ref(trainer), weakref.ref(trainer.callbacks[0])
    del trainer
    gc.collect()
    assert gone[0]() is None and gone[1]() is None


# -- enum comparisons -------------------------------------------------------------------
def test_only_lightnings_trainer_enums_are_patched():
    lean.apply()
    assert not getattr(StrEnum.__eq__, "trainyard_fast", False)
    assert StrEnum.__eq__.__qualname__ == "StrEnum.__eq__"
    assert GradClipAlgorithmType.__eq__ is StrEnum.__eq__  # another subclass, untouched
    for enum in TRAINER_ENUMS:
        assert getattr(vars(enum)["__eq__"], "trainyard_fast", False), enum
        assert enum.__hash__ is StrEnum.__hash__, enum


def test_patched_enums_keep_their_meaning():
    lean.apply()
    for enum in TRAINER_ENUMS:
        for member in enum:
            assert member == member and member == member.value.upper()
            assert member == member.value and member.value.upper() == member
            assert hash(member) == hash(member.value)
            assert member in {member.value} and member.value in {member}
            assert {m for m in enum if m == member} == {member}
    assert TrainerFn.FITTING == "FIT" and TrainerFn.FITTING != "validate"
    assert RunningStage.VALIDATING == TrainerFn.VALIDATING  # same value, another enum
    assert RunningStage.TRAINING != RunningStage.VALIDATING
    assert TrainerStatus.FINISHED.stopped and not TrainerStatus.RUNNING.stopped
    assert RunningStage.SANITY_CHECKING.evaluating and not RunningStage.TRAINING.evaluating
    assert len({TrainerFn.FITTING, "fit", "FIT".lower()}) == 1
