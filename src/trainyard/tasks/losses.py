from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class FocalLoss(nn.Module):
    """Focal loss (Lin et al., 2017): cross-entropy down-weighted on easy examples.

    ``gamma=0`` is plain cross-entropy; ``label_smoothing`` as in ``nn.CrossEntropyLoss``.
    """

    def __init__(self, gamma: float = 2.0, label_smoothing: float = 0.0):
        super().__init__()
        self.gamma = gamma
        self.label_smoothing = label_smoothing

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        ce = F.cross_entropy(logits, target, reduction="none", label_smoothing=self.label_smoothing)
        p_true = torch.exp(-F.cross_entropy(logits, target, reduction="none"))
        return ((1 - p_true) ** self.gamma * ce).mean()
