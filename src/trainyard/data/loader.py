"""Loaders that resume exactly where a checkpoint left off.

A run stopped mid-epoch and resumed must see the same samples in the same order as one that
never stopped. Two things make that hold without saving any generator state:

- The order of an epoch is a pure function of ``(seed, epoch)``, computed the way
  :class:`torch.utils.data.DistributedSampler` does it (so each rank gets the same shard it
  would get from that sampler), and a resumed epoch skips the batches already trained.
- Loading draws nothing from the global random streams: the loader has its own generator
  (the worker base seed), and augmentation runs per batch in the training process
  (:mod:`trainyard.data.augment`), where the checkpointed global RNG state covers it.

:class:`ResumableLoader` is the DataLoader for datasets read sample by sample;
in-memory datasets are served a batch at a time by :class:`trainyard.data.batches.BatchLoader`,
which shares the order (:class:`ResumableSampler`) and the position (:class:`Resumable`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator

import torch
from torch.utils.data import DataLoader, Dataset, Sampler

Position = Callable[[], tuple[int, int]]  # -> (epoch, batches already trained this epoch)


class ResumableSampler(Sampler[int]):
    """This rank's share of an epoch, in a seeded order, optionally starting part-way in.

    ``pad=True`` (training) repeats a few samples so every rank gets the same number, as
    DistributedSampler does, and the ranks step together; ``drop_last=True`` evens the
    shards by leaving out the tail instead (DistributedSampler's ``drop_last``);
    ``pad=False`` (evaluation) gives each sample to exactly one rank. ``batch_size``
    (training only) drops a trailing batch of a single sample: BatchNorm cannot train on one.
    """

    def __init__(
        self,
        size: int,
        shuffle: bool,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        pad: bool = True,
        batch_size: int | None = None,
        drop_last: bool = False,
    ):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in [0, {world_size})")
        self.size, self.shuffle, self.seed = size, shuffle, seed
        self.rank, self.world_size, self.pad = rank, world_size, pad
        self.batch_size, self.drop_last = batch_size, drop_last
        self.epoch = 0
        self.skip = 0  # samples of this epoch already trained on (a resumed epoch)

    def set_epoch(self, epoch: int) -> None:
        if epoch != self.epoch:
            self.epoch, self.skip = epoch, 0

    def set_position(self, epoch: int, skip: int) -> None:
        self.epoch, self.skip = epoch, skip

    def indices(self) -> torch.Tensor:
        """Every index of this rank's share of the current epoch, from its start, as a
        tensor (what batch-indexing loaders use; :meth:`order` is the same as a list)."""
        if self.shuffle:
            generator = torch.Generator().manual_seed(self.seed + self.epoch)
            indices = torch.randperm(self.size, generator=generator)
        else:
            indices = torch.arange(self.size)
        if self.world_size > 1 and (self.pad or self.drop_last):
            total = self._per_rank_even() * self.world_size
            repeats = math.ceil(total / max(1, self.size))
            indices = indices.repeat(repeats)[:total]  # DistributedSampler's padding
        share = indices[self.rank :: self.world_size]
        if self._drops_a_single(len(share)):
            share = share[:-1]
        return share

    def order(self) -> list[int]:
        return self.indices().tolist()

    def _per_rank_even(self) -> int:
        """Samples per rank when the shards are evened: DistributedSampler's num_samples."""
        if self.drop_last:
            return self.size // self.world_size
        return math.ceil(self.size / self.world_size)

    def _drops_a_single(self, share: int) -> bool:
        return bool(self.batch_size) and share > 1 and share % self.batch_size == 1

    def __iter__(self) -> Iterator[int]:
        return iter(self.order()[self.skip :])

    def __len__(self) -> int:
        if self.world_size > 1 and (self.pad or self.drop_last):
            per_rank = self._per_rank_even()
        else:
            per_rank = len(range(self.rank, self.size, self.world_size))
        return per_rank - 1 if self._drops_a_single(per_rank) else per_rank


class Resumable:
    """Where a pass over the data starts, and Lightning's resumable-loader protocol.

    ``position`` tells where training stands when a pass begins (the trainer's epoch and the
    batches it already completed in that epoch). ``state_dict``/``load_state_dict`` make a
    loader resumable in Lightning's sense, so Lightning continues a mid-epoch checkpoint in
    place instead of warning and replaying.
    """

    sampler: ResumableSampler
    batch_size: int

    def _init_position(self, position: Position | None) -> None:
        self._position = position
        self._loaded: tuple[int, int] | None = None

    def _where(self) -> tuple[int, int]:
        if self._loaded is not None:
            return self._loaded
        if self._position is not None:
            return self._position()
        return self.sampler.epoch, 0

    def _start_pass(self) -> None:
        """Point the sampler at this pass's first sample (a loaded position is used once)."""
        epoch, batches = self._where()
        self._loaded = None
        self.sampler.set_position(epoch, batches * self.batch_size)

    def state_dict(self) -> dict[str, int]:
        epoch, batches = self._where()
        return {"epoch": epoch, "batches": batches}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self._loaded = (int(state["epoch"]), int(state["batches"]))


class ResumableLoader(Resumable, DataLoader):
    """A DataLoader over a :class:`ResumableSampler` that starts each pass where training is
    (for datasets read sample by sample; in-memory ones use the batch loader)."""

    def __init__(
        self, dataset: Dataset, *, sampler: ResumableSampler, position: Position | None, **kwargs
    ):
        # its own generator: drawing the workers' base seed must not move the global stream
        kwargs.setdefault("generator", torch.Generator().manual_seed(sampler.seed))
        DataLoader.__init__(self, dataset, sampler=sampler, **kwargs)
        self._init_position(position)

    def __iter__(self):
        self._start_pass()
        return super().__iter__()
