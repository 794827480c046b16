"""Using a result: the trained network and the input preprocessing it was trained with.

Everything comes from one checkpoint: :class:`trainyard.tasks.Classifier` saves the
network's spec and the data module's :class:`~trainyard.data.preprocess.Preprocess` in its
hyperparameters. No dataset, no config composition and no Hydra state are needed, so this
works inside a running Hydra app as well as in a notebook. A run directory is searched
where it lies now: the paths it recorded are those of the machine that trained it (inside a
container, ``/work/outputs/...``).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import torch
from torch import nn

from trainyard.checkpoints import find_checkpoint
from trainyard.data.preprocess import Preprocess
from trainyard.errors import CheckpointError


@dataclasses.dataclass
class Predictor:
    """A trained network in eval mode on ``device``, and what its inputs go through."""

    net: nn.Module = dataclasses.field(repr=False)
    transform: Preprocess | None  # None: the data module recorded no preprocessing
    checkpoint: Path
    device: torch.device

    def __call__(self, x: Any) -> torch.Tensor:
        """Logits for raw inputs: one sample or a batch, in the dataset's natural form."""
        if self.transform is None:
            raise ValueError(
                f"{self.checkpoint} records no input preprocessing (its data module had "
                "none): call .net on inputs prepared as in training"
            )
        with torch.inference_mode():
            return self.net(self.transform(x).to(self.device))

    def predict(self, x: Any) -> torch.Tensor:
        """The class index of each sample (one sample is a batch of one), on the CPU."""
        return self(x).argmax(dim=1).cpu()


def load(path: str | Path, device: str | torch.device = "cpu") -> Predictor:
    """Load a run directory's best checkpoint (else its last), or a checkpoint file."""
    if str(device).startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device={device!r}, but no CUDA GPU is visible here: use device='cpu'")
    checkpoint = find_checkpoint(Path(path))
    task = load_task(checkpoint, device)
    return Predictor(task.net, task.preprocess, checkpoint, torch.device(device))


def load_task(checkpoint: Path, device: str | torch.device = "cpu"):
    """``Classifier.load_from_checkpoint``, in eval mode, with a clear error for a checkpoint
    that does not describe its network."""
    from trainyard.tasks import Classifier

    try:  # mmap: only the hyperparameters are read here, not the weights
        saved = torch.load(checkpoint, map_location="cpu", weights_only=True, mmap=True)
    except Exception as exc:
        raise CheckpointError(f"{checkpoint} cannot be read: {exc}") from exc
    hparams = saved.get("hyper_parameters") if isinstance(saved, dict) else None
    if not hparams or "net" not in hparams:
        raise CheckpointError(
            f"{checkpoint} does not describe the network (written before trainyard saved "
            "it, or the model is not an nn.Module class)",
            fix="Classifier.load_from_checkpoint(path, net=<the network>), or train it again",
        )
    task = Classifier.load_from_checkpoint(checkpoint, map_location=device, weights_only=True)
    return task.eval()
