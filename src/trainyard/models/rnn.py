from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

_CELLS = {"rnn": nn.RNN, "lstm": nn.LSTM, "gru": nn.GRU}


class RNNClassifier(nn.Module):
    """Sequence classifier: a recurrent encoder, then a linear head on the last state.

    Inputs are (time, features). Images (channels, height, width) are read row by row as a
    sequence of ``height`` steps with ``channels * width`` features, so digits and MNIST
    work unchanged.
    """

    def __init__(
        self,
        input_shape: Sequence[int],
        num_classes: int,
        cell: str = "lstm",
        hidden: int = 64,
        num_layers: int = 1,
        bidirectional: bool = False,
        dropout: float = 0.0,
    ):
        super().__init__()
        if cell not in _CELLS:
            raise ValueError(f"unknown cell {cell!r}; choose one of {sorted(_CELLS)}")
        if len(input_shape) == 3:
            features = input_shape[0] * input_shape[2]
        elif len(input_shape) == 2:
            features = input_shape[1]
        else:
            raise ValueError(f"RNN needs (time, features) or image inputs, got {input_shape}")
        self.encoder = _CELLS[cell](
            features,
            hidden,
            num_layers=num_layers,
            batch_first=True,
            bidirectional=bidirectional,
            dropout=dropout if num_layers > 1 else 0.0,
        )
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.head = nn.Linear(hidden * (2 if bidirectional else 1), num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 4:  # (batch, channels, height, width) -> (batch, height, channels*width)
            x = x.permute(0, 2, 1, 3).flatten(2)
        out, _ = self.encoder(x)
        return self.head(self.dropout(out[:, -1]))
