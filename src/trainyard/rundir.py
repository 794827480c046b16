"""A run directory is an identity.

Its path is derived from the experiment name, the sweep and a stable key made from the
overrides (never from a timestamp), so a requeued or re-run trial finds its own directory
and two different trials never share one. Layout::

    <run_dir>/config.yaml        frozen, resolved config every rank loads
    <run_dir>/provenance.json    git commit, dirty flag, versions, host, seed
    <run_dir>/status.json        current state and the history of transitions
    <run_dir>/result.json        final metrics (written once, by rank 0)
    <run_dir>/checkpoints/       last.ckpt (atomic) and the best checkpoint
    <run_dir>/logs/              logger output, one version per attempt
    <run_dir>/ranks/             one small file per rank (pid, host) for debugging
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import socket
import tempfile
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

# Overrides of these keys do not change what a trial trains, so they do not change its
# identity: moving the output root, switching the logger or the progress display must find
# the same run directory (and resume it) rather than start a new one.
IDENTITY_EXCLUDED_PREFIXES = ("hydra", "paths", "logger", "resume", "name")

STATES = ("created", "running", "completed", "failed", "preempted")

_UMASK = os.umask(0o022)
os.umask(_UMASK)

# Keys use only characters that are safe in paths, shells and Hydra override values
# ('=' and ',' would make a run directory path unusable as an override value).
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")
_SLUG_MAX = 64


def _override_key(override: str) -> str:
    key = override.split("=", 1)[0]
    return key.lstrip("+~")


def identity_overrides(overrides: Iterable[str]) -> list[str]:
    """The overrides that define a trial, sorted so argument order does not matter."""
    kept = []
    for override in overrides:
        key = _override_key(str(override))
        if key.split(".", 1)[0].split("/", 1)[0] in IDENTITY_EXCLUDED_PREFIXES:
            continue
        kept.append(str(override))
    return sorted(kept)


def trial_key(overrides: Iterable[str]) -> str:
    """A readable, filesystem-safe and stable key for a set of overrides.

    The readable part is shortened and sanitised (so a hostile value cannot walk out of
    the output directory); the hash of the exact overrides keeps keys unique.
    """
    kept = identity_overrides(overrides)
    if not kept:
        return "default"
    joined = ",".join(kept)
    digest = hashlib.sha256(joined.encode()).hexdigest()[:8]
    parts = []
    for override in kept:
        key, _, value = override.partition("=")
        parts.append(f"{key.split('.')[-1].lstrip('+~')}-{value}")
    slug = _UNSAFE.sub("_", "__".join(parts)).strip("._-")
    slug = slug[:_SLUG_MAX].rstrip("._-") or "trial"
    return f"{slug}__{digest}"


def atomic_write_text(path: Path, text: str) -> None:
    """Write a file so readers see the old or the new content, never half of it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600; keep what the user's umask says
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json(path: Path, data: Any) -> None:
    atomic_write_text(path, json.dumps(data, indent=2, sort_keys=True, default=str) + "\n")


def read_json(path: Path) -> Any:
    return json.loads(path.read_text())


class RunDir:
    """Paths and bookkeeping inside one trial's run directory."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)

    config = property(lambda self: self.root / "config.yaml")
    provenance = property(lambda self: self.root / "provenance.json")
    status_file = property(lambda self: self.root / "status.json")
    result_file = property(lambda self: self.root / "result.json")
    checkpoints = property(lambda self: self.root / "checkpoints")
    last_ckpt = property(lambda self: self.root / "checkpoints" / "last.ckpt")
    ranks = property(lambda self: self.root / "ranks")

    def status(self) -> dict[str, Any]:
        if not self.status_file.exists():
            return {"state": None, "attempt": 0, "history": []}
        return read_json(self.status_file)

    @property
    def state(self) -> str | None:
        return self.status()["state"]

    def transition(self, state: str, **details: Any) -> dict[str, Any]:
        """Record a state change; `attempt` counts how often the trial was started."""
        if state not in STATES:
            raise ValueError(f"unknown run state {state!r}; expected one of {STATES}")
        status = self.status()
        if state == "running":
            status["attempt"] = status.get("attempt", 0) + 1
        entry = {"state": state, "time": time.time(), "host": socket.gethostname()}
        entry.update({k: v for k, v in details.items() if v is not None})
        status["state"] = state
        status["history"].append(entry)
        write_json(self.status_file, status)
        return status

    def write_rank_info(self, rank: int, **info: Any) -> None:
        """Merge ``info`` into this rank's own file (each rank writes only its own)."""
        path = self.ranks / f"rank{rank}.json"
        merged = read_json(path) if path.exists() else {}
        merged.update(info, pid=os.getpid(), host=socket.gethostname(), time=time.time())
        write_json(path, merged)
