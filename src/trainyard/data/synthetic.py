"""Synthetic data with a learnable signal: each class has its own random prototype and
samples are prototype + noise. Images (C, H, W) or sequences (T, F); no files, no download."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from trainyard.data.base import ClassificationDataModule, tensor_dataset
from trainyard.data.preprocess import Preprocess


class SyntheticDataModule(ClassificationDataModule):
    def __init__(
        self,
        shape: Sequence[int] = (3, 32, 32),
        num_classes: int = 10,
        num_samples: int = 2048,
        test_samples: int = 512,
        noise: float = 1.0,
        **kwargs,
    ):
        super().__init__(**kwargs)
        if num_samples < 2 or num_classes < 2:
            raise ValueError("synthetic data needs num_samples >= 2 and num_classes >= 2")
        self.input_shape = tuple(int(s) for s in shape)
        self.num_classes = int(num_classes)
        self.num_samples = int(num_samples)
        self.test_samples = int(test_samples)
        self.noise = float(noise)
        self.preprocess = Preprocess(self.input_shape, self.num_classes)  # used as generated

    def _make(self, n: int, generator: torch.Generator, prototypes: torch.Tensor):
        y = torch.randint(0, self.num_classes, (n,), generator=generator)
        x = prototypes[y] + self.noise * torch.randn((n, *self.input_shape), generator=generator)
        return tensor_dataset(x, y)

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        generator = torch.Generator().manual_seed(self.seed)
        prototypes = torch.randn((self.num_classes, *self.input_shape), generator=generator)
        full = self._make(self.num_samples, generator, prototypes)
        self.train_set, self.val_set = self.split_train_val(full)
        self.test_set = self._make(self.test_samples, generator, prototypes)
