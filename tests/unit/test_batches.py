"""In-memory data served a batch at a time: DistributedSampler's shards, exact resumes,
Lightning leaving the loader alone, no batch of one in training, and where data lives."""

import math
import os
import warnings

import pytest
import pytorch_lightning as pl
import torch
from pytorch_lightning.trainer.states import RunningStage
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

from tests.helpers.run_if import RunIf
from tests.helpers.trainers import quiet_trainer
from trainyard.data import DigitsDataModule, SyntheticDataModule, augment, placement
from trainyard.data.batches import BatchLoader
from trainyard.data.loader import ResumableLoader, ResumableSampler
from trainyard.data.memory import InMemoryDataset
from trainyard.errors import DataError
from trainyard.models import MLP
from trainyard.tasks import Classifier


def _labelled(size: int) -> InMemoryDataset:
    """Sample i has label i, so a batch's labels say which samples it holds."""
    return InMemoryDataset(torch.randn(size, 3), torch.arange(size))


def _served(loader) -> list[int]:
    return [i for _, y in loader for i in y.tolist()]


@pytest.mark.parametrize("drop_last", [False, True])
@pytest.mark.parametrize("world_size", [1, 2, 3])
@pytest.mark.parametrize("size", [20, 23])
def test_each_rank_gets_distributed_samplers_shard_every_epoch(size, world_size, drop_last):
    # batch 8: none of these shards leaves a trailing batch of one (tested on its own below)
    for epoch in range(4):
        for rank in range(world_size):
            sampler = ResumableSampler(
                size, shuffle=True, seed=11, rank=rank, world_size=world_size, drop_last=drop_last
            )
            loader = BatchLoader(_labelled(size), sampler=sampler, batch_size=8)
            sampler.set_epoch(epoch)
            theirs = DistributedSampler(
                range(size), world_size, rank, shuffle=True, seed=11, drop_last=drop_last
            )
            theirs.set_epoch(epoch)
            assert _served(loader) == list(theirs)
            assert len(loader) == math.ceil(len(theirs) / 8) == len(list(loader))


def test_evaluation_batches_count_every_sample_once_across_ranks():
    seen = []
    for rank in range(3):
        sampler = ResumableSampler(17, shuffle=False, rank=rank, world_size=3, pad=False)
        seen += _served(BatchLoader(_labelled(17), sampler=sampler, batch_size=4))
    assert sorted(seen) == list(range(17))


def _loader(position):
    sampler = ResumableSampler(40, shuffle=True, seed=3)
    return BatchLoader(_labelled(40), sampler=sampler, batch_size=8, position=position)


def test_a_pass_starts_where_training_stands_and_matches_the_dataloader_path():
    full = [y.tolist() for _, y in _loader(lambda: (2, 0))]
    assert [y.tolist() for _, y in _loader(lambda: (2, 3))] == full[3:]
    # the same order as the sample-by-sample loader (a run keeps its batches)
    data = _labelled(40)
    sampler = ResumableSampler(40, shuffle=True, seed=3)
    by_sample = ResumableLoader(data, sampler=sampler, position=lambda: (2, 0), batch_size=8)
    assert [y.tolist() for _, y in by_sample] == full


def test_state_round_trips_through_a_checkpoint():
    loader = _loader(lambda: (4, 2))
    assert loader.state_dict() == {"epoch": 4, "batches": 2}
    fresh = _loader(lambda: (0, 0))
    fresh.load_state_dict(loader.state_dict())
    assert [y.tolist() for _, y in fresh] == [y.tolist() for _, y in loader]
    assert len(list(fresh)) == 5  # the loaded position is used once


def test_a_checkpoint_from_an_epoch_end_resumes_at_the_next_epochs_start():
    # Lightning's order on resuming: load the state, iter(), then set_epoch, then batches
    finished = _loader(lambda: (2, 5)).state_dict()  # all 5 batches of epoch 2 trained
    resumed = _loader(lambda: (0, 0))
    resumed.load_state_dict(finished)
    batches = iter(resumed)
    resumed.sampler.set_epoch(3)
    assert [y.tolist() for _, y in batches] == [y.tolist() for _, y in _loader(lambda: (3, 0))]


def test_serving_draws_nothing_from_the_global_stream():
    loader = _loader(lambda: (1, 0))
    torch.manual_seed(0)
    before = torch.get_rng_state()
    list(loader)
    assert torch.equal(before, torch.get_rng_state())


def test_lightning_leaves_the_loader_alone_under_ddp():
    # a DDP trainer (not started): Lightning would give a DataLoader a DistributedSampler
    trainer = pl.Trainer(accelerator="cpu", strategy="ddp", devices=2, logger=False)
    prepare = trainer._data_connector._prepare_dataloader
    sampler = ResumableSampler(40, shuffle=True, rank=1, world_size=2)
    as_dataloader = DataLoader(_labelled(40), sampler=sampler, batch_size=8)
    assert prepare(as_dataloader, shuffle=True, mode=RunningStage.TRAINING) is not as_dataloader
    ours = BatchLoader(_labelled(40), sampler=sampler, batch_size=8)
    assert prepare(ours, shuffle=True, mode=RunningStage.TRAINING) is ours


class _Batches(pl.Callback):
    """The size of every batch each stage ran, as the module received it."""

    def __init__(self):
        self.sizes = {"train": [], "val": [], "test": []}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.sizes["train"].append(len(batch[1]))

    def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0):
        self.sizes["val"].append(len(batch[1]))

    def on_test_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0):
        self.sizes["test"].append(len(batch[1]))


def _bn_task(input_shape=(784,), classes=4):
    net = MLP(input_shape, classes, hidden=[16], batch_norm=True)
    optimizer = lambda params: torch.optim.SGD(params, lr=0.1)  # noqa: E731
    return Classifier(net=net, num_classes=classes, optimizer=optimizer)


def test_a_trailing_batch_of_one_never_reaches_batchnorm_in_training():
    # 90 samples, 9 for validation: 81 to train in batches of 8 leaves a remainder of 1
    data = SyntheticDataModule(
        shape=(784,), num_classes=4, num_samples=90, test_samples=17, batch_size=8
    )
    seen = _Batches()
    trainer = quiet_trainer(
        max_epochs=2, limit_val_batches=None, num_sanity_val_steps=0, callbacks=[seen]
    )
    task = _bn_task()
    trainer.fit(task, datamodule=data)
    assert len(data.train_set) % 8 == 1
    assert min(seen.sizes["train"]) >= 2 and sum(seen.sizes["train"]) == 2 * 80
    assert sum(seen.sizes["val"]) == 2 * 9  # evaluation keeps every sample
    trainer.test(task, datamodule=data, verbose=False)
    assert seen.sizes["test"] == [8, 8, 1]  # the last batch of 1 is fine outside training
    assert trainer.validate(task, datamodule=data, verbose=False)[0]["val/acc"] >= 0


def test_one_training_sample_per_rank_is_refused():
    data = SyntheticDataModule(shape=(4,), num_classes=2, num_samples=2, val_fraction=0.5)
    data.setup()
    with pytest.raises(DataError, match="batch of one"):
        data.train_dataloader()


def test_no_num_workers_advice_for_data_held_in_memory(monkeypatch):
    # a machine with 8 cores, where Lightning advises workers for every DataLoader
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(8)), raising=False)

    def warned(**fit) -> list[str]:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            quiet_trainer(max_steps=2).fit(_bn_task((1, 8, 8), 10), **fit)
        return [str(w.message) for w in caught if "num_workers" in str(w.message)]

    digits = DigitsDataModule(batch_size=32)
    assert warned(datamodule=digits) == []
    digits.setup()
    x, y = digits.train_set.tensors
    plain = DataLoader(TensorDataset(x, y), batch_size=32)
    assert warned(train_dataloaders=plain)  # the advice this machine would print otherwise


def test_on_the_cpu_data_stays_where_it_is():
    assert placement.choose(torch.device("cpu"), 10**12, True, 0.5) == placement.Placement(
        torch.device("cpu")
    )
    data = DigitsDataModule()
    trainer = quiet_trainer(max_steps=1)
    trainer.fit(_bn_task((1, 8, 8), 10), datamodule=data)
    loader = data.train_dataloader()
    assert loader.dataset is data.train_set and not loader.pin


@RunIf(min_gpus=1)
def test_on_a_gpu_data_lives_on_the_device_when_it_fits():
    data = DigitsDataModule(batch_size=32)
    trainer = quiet_trainer(accelerator="gpu", devices=1, max_steps=3)
    trainer.fit(_bn_task((1, 8, 8), 10), datamodule=data)
    loader = data.train_dataloader()
    assert loader.dataset.device.type == "cuda" and not loader.pin
    x, y = next(iter(loader))
    assert x.device.type == "cuda" and y.device.type == "cuda"


@RunIf(min_gpus=1)
def test_on_a_gpu_data_that_does_not_fit_is_pinned_on_the_host():
    data = DigitsDataModule(batch_size=32, on_device_fraction=0.0)
    trainer = quiet_trainer(accelerator="gpu", devices=1, max_steps=3)
    trainer.fit(_bn_task((1, 8, 8), 10), datamodule=data)
    loader = data.train_dataloader()
    assert loader.dataset.device.type == "cpu" and loader.pin
    x, _ = next(iter(loader))
    assert x.is_pinned()


@RunIf(min_gpus=1)
def test_augmentation_on_the_device_follows_the_seed():
    x = torch.randn(16, 3, 32, 32, device="cuda")
    fill = torch.tensor([0.5, -1.0, 2.0], device="cuda")

    def augmented():
        torch.manual_seed(5)
        shifted = augment.random_shift(x, 1)
        return augment.random_hflip(augment.random_crop(shifted, 4, fill=fill))

    first = augmented()
    assert first.device.type == "cuda" and torch.equal(first, augmented())
