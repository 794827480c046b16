from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn


class CNN(nn.Module):
    """A small VGG-style convnet for images of any size from 8x8 up.

    Each stage is conv3x3 [-> BatchNorm] -> ReLU -> MaxPool(2); pooling stops once the
    feature map is 2x2, so 8x8 digits and 32x32 CIFAR images both work.
    """

    def __init__(
        self,
        input_shape: Sequence[int],
        num_classes: int,
        channels: Sequence[int] = (32, 64),
        hidden: int = 128,
        dropout: float = 0.25,
        batch_norm: bool = True,
    ):
        super().__init__()
        if len(input_shape) != 3:
            raise ValueError(f"CNN needs (channels, height, width) inputs, got {input_shape}")
        in_ch, height, width = input_shape
        layers: list[nn.Module] = []
        for out_ch in channels:
            layers.append(nn.Conv2d(in_ch, out_ch, 3, padding=1, bias=not batch_norm))
            if batch_norm:
                layers.append(nn.BatchNorm2d(out_ch))
            layers.append(nn.ReLU(inplace=True))
            if min(height, width) >= 4:
                layers.append(nn.MaxPool2d(2))
                height, width = height // 2, width // 2
            in_ch = out_ch
        self.features = nn.Sequential(*layers)
        self.head = nn.Sequential(
            nn.Flatten(),
            nn.Dropout(dropout) if dropout > 0 else nn.Identity(),
            nn.Linear(in_ch * height * width, hidden),
            nn.ReLU(inplace=True),
            nn.Dropout(dropout) if dropout > 0 else nn.Identity(),
            nn.Linear(hidden, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))
