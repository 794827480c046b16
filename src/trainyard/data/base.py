"""What every trainyard DataModule shares: loaders, splits, and in-memory tensor data.

trainyard's own datasets are held in memory (:mod:`trainyard.data.memory`) and served a
batch at a time (:mod:`trainyard.data.batches`), on the GPU when they fit
(:mod:`trainyard.data.placement`); a subclass whose datasets are read sample by sample
gets a resumable DataLoader (with ``num_workers`` and ``pin_memory``) instead.
"""

from __future__ import annotations

import pytorch_lightning as pl
import torch
from torch.utils.data import Dataset, random_split

from trainyard.data import placement
from trainyard.data.batches import BatchLoader
from trainyard.data.loader import ResumableLoader, ResumableSampler
from trainyard.data.memory import InMemoryDataset, Scale, split_indices
from trainyard.data.preprocess import Preprocess
from trainyard.errors import DataError

_SPLITS = ("train", "val", "test")


class ClassificationDataModule(pl.LightningDataModule):
    """Base: subclasses fill ``self.train_set``, ``self.val_set``, ``self.test_set`` and
    ``input_shape``/``num_classes`` in ``setup``, and ``preprocess`` where they know it:
    how a raw input becomes what the network sees (the task saves it in checkpoints)."""

    def __init__(
        self,
        batch_size: int = 64,
        num_workers: int = 0,
        val_fraction: float = 0.1,
        seed: int = 0,
        pin_memory: bool = False,
        on_device: bool = True,
        on_device_fraction: float = 0.5,
        drop_last: bool = False,
    ):
        super().__init__()
        if not 0.0 <= on_device_fraction <= 1.0:
            raise ValueError(f"on_device_fraction must be in [0, 1], got {on_device_fraction}")
        self.batch_size = batch_size
        self.num_workers = num_workers  # loaders of datasets read sample by sample only
        self.val_fraction = val_fraction
        self.seed = seed
        self.pin_memory = pin_memory  # likewise: in-memory data is pinned when it needs to be
        self.on_device = on_device
        self.on_device_fraction = on_device_fraction
        self.drop_last = drop_last
        self.input_shape: tuple[int, ...] | None = None
        self.num_classes: int | None = None
        self.train_set: Dataset | None = None
        self.val_set: Dataset | None = None
        self.test_set: Dataset | None = None
        self.preprocess: Preprocess | None = None
        self.scale: Scale | None = None  # raw stored batches -> network input, on the device
        self._placements: dict[torch.device, placement.Placement] = {}
        self._moved: dict[str, InMemoryDataset] = {}  # splits copied to the device

    def split_train_val(self, full: Dataset) -> tuple[Dataset, Dataset]:
        """Seeded split, identical on every rank (each rank computes it on its own)."""
        n_val = max(1, round(len(full) * self.val_fraction))
        if isinstance(full, InMemoryDataset):
            train_idx, val_idx = split_indices(len(full), n_val, self.seed)
            return full.subset(train_idx), full.subset(val_idx)
        generator = torch.Generator().manual_seed(self.seed)
        train, val = random_split(full, [len(full) - n_val, n_val], generator=generator)
        return train, val

    def _ranks(self) -> tuple[int, int]:
        trainer = self.trainer
        return (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)

    def _train_position(self) -> tuple[int, int]:
        """Where training stands when a pass over the training data begins: the epoch, and
        the batches already trained in it (non-zero only when resuming mid-epoch)."""
        trainer = self.trainer
        if trainer is None:
            return 0, 0
        return trainer.current_epoch, trainer.fit_loop.epoch_loop.batch_progress.current.processed

    def _loader(self, split: str):
        dataset = getattr(self, f"{split}_set")
        train = split == "train"
        rank, world_size = self._ranks()
        sampler = ResumableSampler(
            len(dataset),
            shuffle=train,
            seed=self.seed,
            rank=rank,
            world_size=world_size,
            pad=train,  # evaluation counts every sample exactly once
            batch_size=self.batch_size if train else None,
            drop_last=train and self.drop_last,
        )
        position = self._train_position if train else None
        if train and len(sampler) == 1 and self.batch_size > 1:
            # the one batch that dropping a trailing single sample cannot fix
            raise DataError(
                "one training sample per rank: trainyard makes no training batch of one "
                "(BatchNorm cannot train on it), so there would be nothing to train on",
                fix="use more training data or fewer ranks",
            )
        if isinstance(dataset, InMemoryDataset):
            served, pin = self._served(split, dataset)
            return BatchLoader(
                served, sampler=sampler, batch_size=self.batch_size, position=position, pin=pin
            )
        return ResumableLoader(
            dataset,
            sampler=sampler,
            position=position,
            batch_size=self.batch_size,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            persistent_workers=self.num_workers > 0,
        )

    def _device(self) -> torch.device:
        trainer = self.trainer
        return trainer.strategy.root_device if trainer is not None else torch.device("cpu")

    def _served(self, split: str, dataset: InMemoryDataset) -> tuple[InMemoryDataset, bool]:
        """``dataset`` where training reads it (placement decided once per device, for all
        splits together), and whether its batches are gathered into pinned memory."""
        device = self._device()
        if device not in self._placements:
            held = [getattr(self, f"{s}_set") for s in _SPLITS]
            nbytes = sum(d.nbytes for d in held if isinstance(d, InMemoryDataset))
            self._placements[device] = placement.choose(
                device, nbytes, self.on_device, self.on_device_fraction
            )
        where = self._placements[device]
        if dataset.device == where.device:
            return dataset, where.pin
        moved = self._moved.get(split)
        if moved is None or moved.device != where.device:
            moved = self._moved[split] = dataset.to(where.device)
        return moved, where.pin

    def train_dataloader(self):
        return self._loader("train")

    def val_dataloader(self):
        return self._loader("val")

    def test_dataloader(self):
        return self._loader("test")

    def augment_batch(self, x: torch.Tensor) -> torch.Tensor:
        """Training-only augmentation of a whole batch on its device (none by default)."""
        return x

    def on_after_batch_transfer(self, batch, dataloader_idx: int):
        # on the batch's device, once it is there: stored pixels become network input (a
        # quarter of the bytes cross the bus), then training batches are augmented
        x, y = batch
        if self.scale is not None:
            x = self.scale(x)
        trainer = self.trainer
        if trainer is not None and trainer.training:
            x = self.augment_batch(x)
        return x, y


def standardize(
    train_x: torch.Tensor, *others: torch.Tensor
) -> tuple[list[torch.Tensor], tuple[float, float]]:
    """Scale with the training split's mean and std (never peeking at val or test). Returns
    the scaled tensors and the statistics, which predicting needs (:class:`Preprocess`)."""
    mean, std = train_x.mean(), train_x.std().clamp_min(1e-6)
    return [(t - mean) / std for t in (train_x, *others)], (float(mean), float(std))


def tensor_dataset(x: torch.Tensor, y: torch.Tensor) -> InMemoryDataset:
    """Float inputs, ready for the network, and their labels, held in memory."""
    return InMemoryDataset(x.float(), y)
