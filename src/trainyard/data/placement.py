"""Where in-memory data lives while a run trains: on the GPU when it fits, else pinned host.

On a GPU, a step of a small model takes a few milliseconds, and a host-to-device copy of
every batch is a visible part of it. Data sets that fit (digits, MNIST, CIFAR-10: a few
hundred MB at most as uint8) are copied to the device once; batches are then gathered
there and never cross the bus. ``fraction`` bounds what they may take of the device's
*free* memory, leaving the rest to the network and its activations; data that does not
fit stays on the host and is gathered into page-locked memory, so each batch's copy is
asynchronous and overlaps the previous step. On the CPU there is nothing to decide.
"""

from __future__ import annotations

import dataclasses
import logging

import torch

_log = logging.getLogger("trainyard")


@dataclasses.dataclass(frozen=True)
class Placement:
    """``device``: where the tensors are held; ``pin``: gather batches into pinned memory."""

    device: torch.device
    pin: bool = False


def choose(device: torch.device, nbytes: int, on_device: bool, fraction: float) -> Placement:
    """Where data of ``nbytes`` should live for training on ``device``."""
    host = torch.device("cpu")
    if device.type != "cuda":
        return Placement(host)
    if on_device:
        free, _ = torch.cuda.mem_get_info(device)
        if nbytes <= fraction * free:
            return Placement(device)
        _log.info(
            "data (%.0f MB) is more than data.on_device_fraction=%s of the GPU's free memory "
            "(%.0f MB): kept in pinned host memory",
            nbytes / 2**20,
            fraction,
            free / 2**20,
        )
    return Placement(host, pin=True)
