"""How a raw input becomes what the network saw in training, as plain data.

Each data module records its :class:`Preprocess` where it computes it (normalisation
statistics come from the training split, so they exist only after ``setup``); the task
stores it in every checkpoint's hyperparameters, so predicting needs neither the dataset nor
a re-run of the seeded split.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import numpy as np
import torch


@dataclasses.dataclass(frozen=True)
class Preprocess:
    """``(x / divide_by - mean) / std`` on a batch of ``input_shape``, from raw inputs.

    Raw means the dataset's natural form: digits as scikit-learn gives them (8x8, values
    0..16), MNIST and CIFAR-10 as uint8 pixels 0..255 (arrays, tensors or PIL images),
    channels last where the dataset stores them so (``channels_last``). ``mean`` and ``std``
    hold one value, or one per channel (the first dimension of ``input_shape``).
    """

    input_shape: tuple[int, ...]
    num_classes: int
    divide_by: float = 1.0  # the raw value range: 16 for digits, 255 for 8-bit images
    mean: tuple[float, ...] = (0.0,)
    std: tuple[float, ...] = (1.0,)
    channels_last: bool = False

    def __post_init__(self) -> None:
        # from a checkpoint or YAML these arrive as lists; the dataclass compares tuples
        for name in ("input_shape", "mean", "std"):
            object.__setattr__(self, name, tuple(getattr(self, name)))

    def to_dict(self) -> dict[str, Any]:
        """Plain data: what ``torch.load(weights_only=True)`` reads back."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Preprocess:
        return cls(**data)

    def __call__(self, x: Any) -> torch.Tensor:
        """One raw sample or a batch of them -> a float batch ``(N, *input_shape)``."""
        if not isinstance(x, torch.Tensor):
            x = torch.as_tensor(np.asarray(x))  # lists, arrays, PIL images
        x = self.batched(x.float())
        shape = (-1, *[1] * (len(self.input_shape) - 1))  # per channel, broadcast over the rest
        mean = torch.tensor(self.mean).view(shape)
        std = torch.tensor(self.std).view(shape)
        return (x / self.divide_by - mean) / std

    def batched(self, x: torch.Tensor) -> torch.Tensor:
        """Reshape to ``(N, *input_shape)``, accepting only shapes whose meaning is clear:
        ``input_shape`` itself, its flat form, without a channel of one, or channels last."""
        forms = self._sample_forms()
        for k in (0, 1):  # one sample, or a batch of them
            sample = tuple(x.shape[k:])
            if sample in forms:
                break
        else:
            raise ValueError(
                f"an input of shape {tuple(x.shape)} does not fit: one sample is "
                f"{' or '.join(map(str, forms))}, a batch has one more leading dimension"
            )
        if sample == self._channels_last_form() and sample != self.input_shape:
            x = x.movedim(-1, k)
        return x.reshape(-1, *self.input_shape)

    def _channels_last_form(self) -> tuple[int, ...] | None:
        shape = self.input_shape
        return (*shape[1:], shape[0]) if self.channels_last and len(shape) > 1 else None

    def _sample_forms(self) -> list[tuple[int, ...]]:
        shape = self.input_shape
        forms = [shape, (math.prod(shape),)]
        if len(shape) > 1 and shape[0] == 1:
            forms.append(shape[1:])
        if self._channels_last_form():
            forms.append(self._channels_last_form())
        return forms
