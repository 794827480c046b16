"""Serving an in-memory dataset a whole batch at a time, by tensor indexing.

:class:`BatchLoader` takes the epoch's order from a
:class:`~trainyard.data.loader.ResumableSampler` (the shard each rank would get from
``DistributedSampler``, reshuffled per epoch from ``(seed, epoch)``) and yields
``(x[idx], y[idx])`` for consecutive slices of it: one gather per batch instead of a
``__getitem__`` per sample and a collate.

It is deliberately not a ``DataLoader``. Lightning rewrites only DataLoaders: under DDP it
would swap their sampler for a ``DistributedSampler`` (``use_distributed_sampler``), and it
advises more ``num_workers`` for every one of them. An iterable with ``__len__`` it leaves
alone, so the sharding here is the only sharding, and no worker advice is printed for data
that worker processes could not speed up. The batch's device transfer, and the data
module's ``on_after_batch_transfer`` (scaling and augmentation on the device), still apply.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch

from trainyard.data.loader import Position, Resumable, ResumableSampler
from trainyard.data.memory import InMemoryDataset


class BatchLoader(Resumable):
    """Batches of ``dataset`` in ``sampler``'s order, starting where training stands.

    ``pin``: gather each batch into page-locked memory (host data bound for a GPU).
    """

    # Lightning reads ``loader.sampler`` (shuffled or not, set_epoch) and
    # ``loader.batch_sampler`` like a DataLoader's: batches here are slices of the order
    batch_sampler = None

    def __init__(
        self,
        dataset: InMemoryDataset,
        *,
        sampler: ResumableSampler,
        batch_size: int,
        position: Position | None = None,
        pin: bool = False,
    ):
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        self.dataset, self.sampler, self.batch_size = dataset, sampler, batch_size
        self.pin = pin
        self._init_position(position)

    def __len__(self) -> int:
        return math.ceil(len(self.sampler) / self.batch_size)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, ...]]:
        self._start_pass()
        return self._batches()

    def _batches(self) -> Iterator[tuple[torch.Tensor, ...]]:
        # The order is read at the first batch, not at iter(), as a DataLoader reads its
        # sampler: Lightning calls set_epoch in between, which moves a position loaded
        # from a checkpoint taken at the end of an epoch on to the next epoch's start.
        # Drawn on the host (DistributedSampler's draw), moved to the data once per pass.
        order = self.sampler.indices()[self.sampler.skip :].to(self.dataset.device)
        for start in range(0, len(order), self.batch_size):
            yield self.dataset.batch(order[start : start + self.batch_size], pin=self.pin)
