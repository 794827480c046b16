"""Augmentation of a whole batch at once, on whatever device the batch is on.

Per-sample transforms in loader workers draw from per-worker random streams, which a
checkpoint cannot capture and a resumed epoch (whose batches land on other workers) cannot
replay. Here every draw comes from the training process's global generator for the
batch's device, which :class:`trainyard.callbacks.resume.ResumeCheckpoint` saves and
restores, so a resumed run augments exactly as an uninterrupted one. It is also one kernel
per batch instead of a Python call per sample.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _gather(x: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """``out[n, :, i, j] = x[n, :, rows[n, i], cols[n, j]]`` for an (N, C, H, W) batch.

    Two gathers rather than one advanced index: the result keeps the standard layout
    (a permuted copy confuses DDP's gradient buckets when C is 1)."""
    n, c = x.shape[:2]
    h, w = rows.shape[1], cols.shape[1]
    x = x.gather(2, rows[:, None, :, None].expand(n, c, h, x.shape[3]))
    return x.gather(3, cols[:, None, None, :].expand(n, c, h, w))


def random_shift(x: torch.Tensor, pixels: int) -> torch.Tensor:
    """Roll each image by up to ``pixels`` in each direction (wrapping around)."""
    n, _, h, w = x.shape
    dy, dx = torch.randint(-pixels, pixels + 1, (2, n, 1), device=x.device)
    rows = (torch.arange(h, device=x.device) - dy) % h
    cols = (torch.arange(w, device=x.device) - dx) % w
    return _gather(x, rows, cols)


def random_crop(x: torch.Tensor, padding: int, fill: torch.Tensor | float = 0.0) -> torch.Tensor:
    """Pad each image by ``padding`` with ``fill`` (per channel) and crop it back at random."""
    n, _, h, w = x.shape
    padded = F.pad(x, (padding,) * 4, value=0.0)
    if not isinstance(fill, float) or fill != 0.0:
        border = torch.ones_like(padded[:1, :1])
        border[..., padding : padding + h, padding : padding + w] = 0
        fill_t = torch.as_tensor(fill, dtype=x.dtype, device=x.device).reshape(1, -1, 1, 1)
        padded = padded + border * fill_t
    oy, ox = torch.randint(0, 2 * padding + 1, (2, n, 1), device=x.device)
    rows = oy + torch.arange(h, device=x.device)
    cols = ox + torch.arange(w, device=x.device)
    return _gather(padded, rows, cols)


def random_hflip(x: torch.Tensor) -> torch.Tensor:
    """Mirror each image left-right with probability 1/2."""
    flip = torch.rand(x.shape[0], device=x.device) < 0.5
    return torch.where(flip[:, None, None, None], x.flip(-1), x)
