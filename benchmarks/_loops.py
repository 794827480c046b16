"""The two hand-written training loops the benchmarks compare against.

- :func:`dataloader_loop`: the loop as a user writes it, a standard ``DataLoader`` over a
  ``TensorDataset`` (shuffled; on a GPU pinned and copied with ``non_blocking=True``).
  The first column of every benchmark and the reference of every ratio.
- :func:`indexed_loop`: the same loop with the data held in memory (on the GPU when there
  is one) and each batch taken by indexing a shuffled order: the same idea trainyard's
  data path uses, written by hand. It shows how much of a step the standard loader costs,
  and so what is left of trainyard's overhead beyond it.

Both tick ``timer`` at every batch start; ``autocast`` is a dtype for mixed precision.
"""

from __future__ import annotations

import contextlib
import statistics
import time

import torch
from torch.utils.data import DataLoader, TensorDataset

WARMUP = 20  # steps left out of the statistics (allocator, autotuning, lazy init)


class Timer:
    """Batch-start timestamps -> per-step intervals after warm-up."""

    def __init__(self, warmup: int = WARMUP):
        self.stamps: list[float] = []
        self.warmup = warmup

    def tick(self) -> None:
        self.stamps.append(time.perf_counter())

    def median_step(self) -> float:
        gaps = [b - a for a, b in zip(self.stamps, self.stamps[1:], strict=False)]
        return statistics.median(gaps[self.warmup :])


def _autocast(device: torch.device, dtype: torch.dtype | None):
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def _step(net, loss_fn, optimizer, x, y, device, dtype) -> None:
    optimizer.zero_grad(set_to_none=True)
    with _autocast(device, dtype):
        loss = loss_fn(net(x), y)
    loss.backward()
    optimizer.step()


def dataloader_loop(net, loss_fn, optimizer, x, y, batch, timer, device, dtype=None) -> None:
    """One epoch through a standard DataLoader, as a user writes it."""
    gpu = device.type == "cuda"
    loader = DataLoader(TensorDataset(x, y), batch_size=batch, shuffle=True, pin_memory=gpu)
    net.train()
    for xb, yb in loader:
        timer.tick()
        if gpu:
            xb, yb = xb.to(device, non_blocking=True), yb.to(device, non_blocking=True)
        _step(net, loss_fn, optimizer, xb, yb, device, dtype)
    _sync(device)


def indexed_loop(net, loss_fn, optimizer, x, y, batch, timer, device, dtype=None) -> None:
    """One epoch with the data on ``device`` and batches taken by index."""
    x, y = x.to(device), y.to(device)
    order = torch.randperm(len(x), device=device)
    net.train()
    for start in range(0, len(x), batch):
        timer.tick()
        idx = order[start : start + batch]
        _step(net, loss_fn, optimizer, x[idx], y[idx], device, dtype)
    _sync(device)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# a bare Lightning Trainer, every extra off: what Lightning costs as shipped
BARE_TRAINER = {
    "logger": False,
    "enable_checkpointing": False,
    "enable_progress_bar": False,
    "enable_model_summary": False,
    "num_sanity_val_steps": 0,
    "limit_val_batches": 0,
}
