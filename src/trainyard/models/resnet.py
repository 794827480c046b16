from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn


class WeightsError(ValueError):
    """A weights file is missing or does not fit the network."""


class ResNet18(nn.Module):
    """torchvision's ResNet-18 for transfer learning, with a new head sized to the data.

    ``weights`` is a local file (a torchvision ``state_dict``, for example
    ``resnet18-f37072fd.pth``) so that nothing is downloaded at run time. With
    ``freeze_backbone`` only the new head trains. One-channel inputs get a first conv
    whose kernels are the pretrained RGB kernels summed over colour.
    """

    # only initialise weights: a checkpoint's state_dict replaces them, so a checkpoint's
    # description of this network leaves them out (trainyard.tasks.specs.architecture)
    init_only_args = ("weights",)

    def __init__(
        self,
        input_shape: Sequence[int],
        num_classes: int,
        weights: str | None = None,
        freeze_backbone: bool = False,
        dropout: float = 0.0,
    ):
        super().__init__()
        from torchvision.models import resnet18

        net = resnet18(weights=None)
        if weights:
            load_backbone_weights(net, Path(weights))
        if input_shape[0] != 3:
            net.conv1 = _adapt_first_conv(net.conv1, input_shape[0])
        if freeze_backbone:
            for param in net.parameters():
                param.requires_grad_(False)
        in_features = net.fc.in_features
        net.fc = nn.Sequential(
            nn.Dropout(dropout) if dropout > 0 else nn.Identity(),
            nn.Linear(in_features, num_classes),
        )
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def load_backbone_weights(net: nn.Module, path: Path) -> None:
    """Load every tensor but the classifier head; refuse files that do not fit."""
    if not path.is_file():
        raise WeightsError(f"weights file {path} does not exist")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise WeightsError(f"weights file {path} cannot be read: {exc}") from exc
    if isinstance(state, dict) and "state_dict" in state:
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise WeightsError(f"weights file {path} holds no state_dict")
    state = {k: v for k, v in state.items() if not k.startswith("fc.")}
    own = {k: v for k, v in net.state_dict().items() if not k.startswith("fc.")}
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    mismatched = [k for k in own if k in state and own[k].shape != state[k].shape]
    if missing or unexpected or mismatched:
        detail = "; ".join(
            f"{label}: {', '.join(keys[:3])}{' ...' if len(keys) > 3 else ''}"
            for label, keys in (
                ("missing", missing),
                ("unexpected", unexpected),
                ("shape mismatch", mismatched),
            )
            if keys
        )
        raise WeightsError(f"weights file {path} does not fit resnet18 ({detail})")
    net.load_state_dict(state, strict=False)


def _adapt_first_conv(conv: nn.Conv2d, channels: int) -> nn.Conv2d:
    new = nn.Conv2d(
        channels,
        conv.out_channels,
        conv.kernel_size,
        stride=conv.stride,
        padding=conv.padding,
        bias=False,
    )
    with torch.no_grad():
        mean = conv.weight.sum(dim=1, keepdim=True) / channels
        new.weight.copy_(mean.repeat(1, channels, 1, 1))
    return new
