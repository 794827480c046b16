"""Compose once: resolve the config a single time and freeze it into the run directory.

Every rank, every retry and every backend loads the frozen file; nothing re-parses
overrides or argv, and nothing time-based is resolved twice.

Secrets stay out of it: a credential that comes from the environment (a key named like
``api_key``, ``token``, ``password`` set to ``${oc.env:VAR}``) is written as that
interpolation, not as its value, and re-read from the environment by the rank that needs
it. A final scan refuses to write a frozen config that still contains the value of such a
variable (for example because another key interpolated it).
"""

from __future__ import annotations

import importlib.metadata
import os
import platform
import re
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf

from trainyard.errors import ConfigError

_ENV_INTERP = re.compile(r"\$\{oc\.env:([A-Za-z_][A-Za-z0-9_]*)")
# Keys whose environment-sourced values are credentials: these stay unresolved.
_SECRET_KEY = re.compile(r"key|token|secret|passw|credential|auth", re.IGNORECASE)
_PROVENANCE_PACKAGES = (
    "trainyard", "torch", "torchvision", "pytorch-lightning", "hydra-core", "omegaconf",
)  # fmt: skip


def _resolve_keeping_env(node: Any) -> Any:
    """Like ``OmegaConf.to_container(resolve=True)`` but leaves oc.env interpolations raw."""
    if isinstance(node, DictConfig):
        out = {}
        for key in node:
            raw = node._get_node(key)._value()  # the unresolved value, e.g. "${oc.env:X}"
            if isinstance(raw, str) and _ENV_INTERP.search(raw) and _SECRET_KEY.search(str(key)):
                out[key] = raw
            else:
                out[key] = _resolve_keeping_env(node[key])
        return out
    if isinstance(node, ListConfig):
        return [_resolve_keeping_env(item) for item in node]
    return node


def env_secret_names(cfg: DictConfig) -> set[str]:
    """Names of environment variables that credential keys read through oc.env."""
    names: set[str] = set()
    for line in OmegaConf.to_yaml(cfg, resolve=False).splitlines():
        key = line.split(":", 1)[0]
        if _SECRET_KEY.search(key):
            names.update(_ENV_INTERP.findall(line))
    return names


def freeze(cfg: DictConfig) -> DictConfig:
    """Resolve everything once; environment-sourced values stay as interpolations."""
    try:
        frozen = OmegaConf.create(_resolve_keeping_env(cfg))
    except Exception as exc:  # an interpolation that cannot resolve, a missing value, ...
        raise ConfigError(
            f"the config cannot be resolved: {exc}",
            fix="check the interpolation or pass the missing value as an override",
        ) from exc
    _refuse_leaked_secrets(frozen, env_secret_names(cfg))
    return frozen


def _refuse_leaked_secrets(frozen: DictConfig, names: set[str]) -> None:
    text = OmegaConf.to_yaml(frozen, resolve=False)
    for name in sorted(names):
        value = os.environ.get(name)
        if value and len(value) >= 4 and value in text:
            raise ConfigError(
                f"the value of ${name} would be written into the frozen config",
                fix=f"refer to it only as '${{oc.env:{name}}}', never through another key",
            )


def save_frozen(frozen: DictConfig, path: Path) -> None:
    from trainyard.rundir import atomic_write_text

    atomic_write_text(path, OmegaConf.to_yaml(frozen, resolve=False))


def load_frozen(path: str | Path) -> DictConfig:
    cfg = OmegaConf.load(path)
    assert isinstance(cfg, DictConfig)
    return cfg


def _git(*args: str, cwd: Path) -> str | None:
    try:
        out = subprocess.run(
            ["git", *args], cwd=cwd, capture_output=True, text=True, timeout=5, check=True
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip()


def provenance(seed: int | None, overrides: list[str], source_dir: Path) -> dict[str, Any]:
    """What produced this run: code version, packages, host; enough to reproduce it."""
    commit = _git("rev-parse", "HEAD", cwd=source_dir)
    status = _git("status", "--porcelain", "--untracked-files=no", cwd=source_dir)
    versions = {}
    for pkg in _PROVENANCE_PACKAGES:
        try:
            versions[pkg] = importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            versions[pkg] = None
    return {
        "git_commit": commit,
        "git_dirty": None if status is None else bool(status),
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "packages": versions,
        "host": socket.gethostname(),
        "seed": seed,
        "overrides": list(overrides),
        "created": time.time(),
    }
