"""Finding a run's checkpoint where the run directory lies now (no torch: the CLI and the
submitting machine use it too). The paths a run recorded are those of the machine that
trained it (inside a container, ``/work/outputs/...``), so they are re-rooted, never
followed as they are."""

from __future__ import annotations

import json
from pathlib import Path

import yaml

from trainyard.errors import CheckpointError


def find_checkpoint(path: Path) -> Path:
    if path.is_file():
        return path
    if not path.is_dir():
        raise CheckpointError(f"{path} does not exist", fix="pass a run directory or a .ckpt")
    checkpoints = path / "checkpoints"
    for candidate in (_recorded_best(path), checkpoints / "best.ckpt", checkpoints / "last.ckpt"):
        if candidate is not None and candidate.is_file():
            return candidate
    raise CheckpointError(
        f"{path} holds no checkpoint (no checkpoints/best.ckpt or last.ckpt)",
        fix="pass the run directory of a trial that trained, or a .ckpt file",
    )


def _recorded_best(run: Path) -> Path | None:
    """result.json's best checkpoint (its name may be configured), moved from the run
    directory recorded in config.yaml, where it trained, to where the run lies now."""
    try:
        best = json.loads((run / "result.json").read_text())["best_checkpoint"]
        config = yaml.load((run / "config.yaml").read_text(), Loader=yaml.SafeLoader)
        return run / Path(best).relative_to(config["paths"]["run_dir"])
    except (OSError, KeyError, TypeError, ValueError, yaml.YAMLError):
        return None  # not recorded, or not below the run directory
