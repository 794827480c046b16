"""What every trainyard DataModule shares: loaders, splits, and in-memory tensor data."""

from __future__ import annotations

import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, Dataset, TensorDataset, random_split

from trainyard.data.loader import ResumableLoader, ResumableSampler
from trainyard.data.preprocess import Preprocess


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
    ):
        super().__init__()
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.val_fraction = val_fraction
        self.seed = seed
        self.pin_memory = pin_memory
        self.input_shape: tuple[int, ...] | None = None
        self.num_classes: int | None = None
        self.train_set: Dataset | None = None
        self.val_set: Dataset | None = None
        self.test_set: Dataset | None = None
        self.preprocess: Preprocess | None = None

    def split_train_val(self, full: Dataset) -> tuple[Dataset, Dataset]:
        """Seeded split, identical on every rank (each rank computes it on its own)."""
        n_val = max(1, round(len(full) * self.val_fraction))
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

    def _loader(self, dataset: Dataset, train: bool) -> DataLoader:
        rank, world_size = self._ranks()
        sampler = ResumableSampler(
            len(dataset),
            shuffle=train,
            seed=self.seed,
            rank=rank,
            world_size=world_size,
            pad=train,  # evaluation counts every sample exactly once
            batch_size=self.batch_size if train else None,
        )
        return ResumableLoader(
            dataset,
            sampler=sampler,
            position=self._train_position if train else None,
            batch_size=self.batch_size,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            persistent_workers=self.num_workers > 0,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_set, train=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_set, train=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.test_set, train=False)

    def augment_batch(self, x: torch.Tensor) -> torch.Tensor:
        """Training-only augmentation of a whole batch on its device (none by default)."""
        return x

    def on_after_batch_transfer(self, batch, dataloader_idx: int):
        trainer = self.trainer
        if trainer is not None and trainer.training:
            x, y = batch
            return self.augment_batch(x), y
        return batch


def standardize(
    train_x: torch.Tensor, *others: torch.Tensor
) -> tuple[list[torch.Tensor], tuple[float, float]]:
    """Scale with the training split's mean and std (never peeking at val or test). Returns
    the scaled tensors and the statistics, which predicting needs (:class:`Preprocess`)."""
    mean, std = train_x.mean(), train_x.std().clamp_min(1e-6)
    return [(t - mean) / std for t in (train_x, *others)], (float(mean), float(std))


def tensor_dataset(x: torch.Tensor, y: torch.Tensor) -> TensorDataset:
    return TensorDataset(x.float().contiguous(), y.long().contiguous())
