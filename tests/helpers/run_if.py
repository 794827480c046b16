"""One place for skip conditions, so every skip says why (LHT's RunIf)."""

from __future__ import annotations

import importlib.util
import shutil

import pytest


def _gpus() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def RunIf(min_gpus: int = 0, binaries: tuple[str, ...] = (), packages: tuple[str, ...] = ()):
    reasons = []
    if min_gpus and _gpus() < min_gpus:
        reasons.append(f"needs {min_gpus} GPU(s)")
    reasons += [f"needs the {b} binary" for b in binaries if shutil.which(b) is None]
    reasons += [f"needs the {p} package" for p in packages if importlib.util.find_spec(p) is None]
    marks = [pytest.mark.gpu] if min_gpus else []
    marks.append(pytest.mark.skipif(bool(reasons), reason="; ".join(reasons) or "runs"))
    return lambda fn: _apply(fn, marks)


def _apply(fn, marks):
    for mark in marks:
        fn = mark(fn)
    return fn
