"""What every trainyard DataModule shares: loaders, splits, and in-memory tensor data."""

from __future__ import annotations

import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, Dataset, TensorDataset, random_split


class ClassificationDataModule(pl.LightningDataModule):
    """Base: subclasses fill ``self.train_set``, ``self.val_set``, ``self.test_set`` and
    ``input_shape``/``num_classes`` in ``setup``."""

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

    def split_train_val(self, full: Dataset) -> tuple[Dataset, Dataset]:
        """Seeded split, identical on every rank (each rank computes it on its own)."""
        n_val = max(1, round(len(full) * self.val_fraction))
        generator = torch.Generator().manual_seed(self.seed)
        train, val = random_split(full, [len(full) - n_val, n_val], generator=generator)
        return train, val

    def _loader(self, dataset: Dataset, shuffle: bool) -> DataLoader:
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            shuffle=shuffle,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            persistent_workers=self.num_workers > 0,
            drop_last=False,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_set, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_set, shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.test_set, shuffle=False)


class ShiftAugment(Dataset):
    """Random translation by up to ``pixels`` in each direction, for tensor images."""

    def __init__(self, base: Dataset, pixels: int = 1):
        self.base = base
        self.pixels = pixels

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, index: int):
        x, y = self.base[index]
        p = self.pixels
        dx, dy = torch.randint(-p, p + 1, (2,)).tolist()
        return torch.roll(x, shifts=(dy, dx), dims=(-2, -1)), y


def standardize(train_x: torch.Tensor, *others: torch.Tensor) -> list[torch.Tensor]:
    """Scale with the training split's mean and std (never peeking at val or test)."""
    mean, std = train_x.mean(), train_x.std().clamp_min(1e-6)
    return [(t - mean) / std for t in (train_x, *others)]


def tensor_dataset(x: torch.Tensor, y: torch.Tensor) -> TensorDataset:
    return TensorDataset(x.float().contiguous(), y.long().contiguous())
