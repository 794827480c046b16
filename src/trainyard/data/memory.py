"""Datasets held in memory as whole tensors, so a batch is one indexing operation.

A ``TensorDataset`` read through a ``DataLoader`` costs a Python call per sample and a
collate per batch; for small models that is 13 to 26% of a GPU step (measured, issue 10).
Holding inputs and labels as two tensors lets :class:`trainyard.data.batches.BatchLoader`
serve a batch as ``x[indices]``, on the host or on the device.

Images stay in their stored form (``uint8`` pixels, four times smaller than floats):
:class:`Scale` turns a batch into what the network sees after it reached its device,
with the very operations torchvision's ``ToTensor`` + ``Normalize`` apply per image, so
the values are the same bit for bit.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch.utils.data import TensorDataset


class Scale:
    """``(x / divide_by - mean) / std`` per channel on a raw (integer) batch, on its device.

    Float batches pass through untouched: datasets stored as floats are stored ready
    (digits and synthetic data are normalised once when they are made)."""

    def __init__(self, divide_by: float, mean: Sequence[float], std: Sequence[float]):
        self.divide_by = float(divide_by)
        self.mean, self.std = tuple(mean), tuple(std)
        self._on: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}

    def _stats(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        # made once per device: a small host-to-device copy every batch would sync the stream
        if device not in self._on:
            as_tensor = lambda v: torch.tensor(v, device=device).view(-1, 1, 1)  # noqa: E731
            self._on[device] = as_tensor(self.mean), as_tensor(self.std)
        return self._on[device]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if x.is_floating_point():
            return x
        mean, std = self._stats(x.device)
        # ToTensor: float, then / 255; Normalize: sub_(mean).div_(std) with (C, 1, 1) stats
        return x.float().div_(self.divide_by).sub_(mean).div_(std)


class InMemoryDataset(TensorDataset):
    """Inputs ``x`` (N, ...) and labels ``y`` (N,), indexed a batch at a time.

    It is still a map-style dataset (``dataset[i]`` is one sample as the network sees it),
    so a standard DataLoader, or code that reads samples, keeps working; ``tensors`` holds
    the stored form.
    """

    def __init__(self, x: torch.Tensor, y: torch.Tensor, scale: Scale | None = None):
        if len(x) != len(y):
            raise ValueError(f"{len(x)} inputs but {len(y)} labels")
        super().__init__(x.contiguous(), y.long().contiguous())
        self.scale = scale

    @property
    def x(self) -> torch.Tensor:
        return self.tensors[0]

    @property
    def y(self) -> torch.Tensor:
        return self.tensors[1]

    @property
    def device(self) -> torch.device:
        return self.x.device

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors)

    def __getitem__(self, index):
        x = self.x[index]
        if self.scale is not None and not x.is_floating_point():
            x = self.scale(x.unsqueeze(0))[0]
        return x, self.y[index]

    def subset(self, indices: torch.Tensor) -> InMemoryDataset:
        """The samples at ``indices``, copied: a split is then served without indirection."""
        return InMemoryDataset(self.x[indices], self.y[indices], self.scale)

    def to(self, device: torch.device) -> InMemoryDataset:
        return InMemoryDataset(self.x.to(device), self.y.to(device), self.scale)

    def batch(self, indices: torch.Tensor, pin: bool = False) -> tuple[torch.Tensor, ...]:
        """``(x[indices], y[indices])`` in stored form. ``pin``: gathered straight into
        page-locked memory, so the copy to the GPU can be asynchronous (Lightning copies
        with ``non_blocking=True``)."""
        if not pin:
            return self.x[indices], self.y[indices]
        return tuple(_pinned_gather(t, indices) for t in self.tensors)


def _pinned_gather(t: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    # pinned blocks come from torch's caching host allocator, which holds a block back until
    # the asynchronous copy that reads it has finished: a new buffer per batch is safe
    out = torch.empty((len(indices), *t.shape[1:]), dtype=t.dtype, pin_memory=True)
    return torch.index_select(t, 0, indices, out=out)


def split_indices(size: int, n_val: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Training and validation indices, exactly those ``random_split(range(size),
    [size - n_val, n_val], generator=Generator().manual_seed(seed))`` picks (the split
    trainyard made before datasets were held in memory, so trials keep their data)."""
    perm = torch.randperm(size, generator=torch.Generator().manual_seed(seed))
    return perm[: size - n_val], perm[size - n_val :]
