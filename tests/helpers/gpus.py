"""The environment of a pretended GPU machine (see pretend_gpus/sitecustomize.py)."""

from __future__ import annotations

import os
from pathlib import Path

SHIM = Path(__file__).parent / "pretend_gpus"


def pretend_gpus(count: int) -> dict[str, str]:
    """Environment variables under which torch reports ``count`` GPUs, none hidden (the
    visible list is reset: a scheduler's own value here would hide some)."""
    path = [str(SHIM), os.environ.get("PYTHONPATH", "")]
    return {
        "PYTHONPATH": os.pathsep.join(filter(None, path)),
        "TRAINYARD_PRETEND_GPUS": str(count),
        "CUDA_VISIBLE_DEVICES": ",".join(str(i) for i in range(count)),
    }
