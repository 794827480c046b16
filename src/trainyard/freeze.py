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

import functools
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

import yaml
from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf._utils import OmegaConfDumper

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


def env_secret_names(raw: Any, under_secret: bool = False) -> set[str]:
    """Names of environment variables that credential keys read through oc.env, in an
    unresolved container (``OmegaConf.to_container(cfg, resolve=False)``)."""
    if isinstance(raw, dict):
        names: set[str] = set()
        for key, value in raw.items():
            names |= env_secret_names(value, under_secret or bool(_SECRET_KEY.search(str(key))))
        return names
    if isinstance(raw, list):
        return set().union(*(env_secret_names(v, under_secret) for v in raw))
    return set(_ENV_INTERP.findall(raw)) if under_secret and isinstance(raw, str) else set()


def freeze(cfg: DictConfig) -> DictConfig:
    """Resolve everything once; environment-sourced values stay as interpolations."""
    names = env_secret_names(OmegaConf.to_container(cfg, resolve=False))
    try:  # the walk that keeps credentials unresolved only where there are any
        resolved = (
            _resolve_keeping_env(cfg)
            if names
            else OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)
        )
        frozen = OmegaConf.create(resolved)
    except Exception as exc:  # an interpolation that cannot resolve, a missing value, ...
        raise ConfigError(
            f"the config cannot be resolved: {exc}",
            fix="check the interpolation or pass the missing value as an override",
        ) from exc
    if names:
        _refuse_leaked_secrets(frozen, names)
    _absolute_init_from(frozen)
    return frozen


def _absolute_init_from(frozen: DictConfig) -> None:
    """``init_from`` as one absolute path, however it was spelt (relative to
    paths.root_dir, a trailing slash): it is part of the trial's identity."""
    value = frozen.get("init_from")
    if not isinstance(value, str) or not value:
        return
    from trainyard.rundir import one_path

    frozen.init_from = one_path(
        value, str(OmegaConf.select(frozen, "paths.root_dir", default=os.getcwd()))
    )


def _refuse_leaked_secrets(frozen: DictConfig, names: set[str]) -> None:
    text = OmegaConf.to_yaml(frozen, resolve=False)
    for name in sorted(names):
        value = os.environ.get(name)
        if value and len(value) >= 4 and value in text:
            raise ConfigError(
                f"the value of ${name} would be written into the frozen config",
                fix=f"refer to it only as '${{oc.env:{name}}}', never through another key",
            )


class _FrozenDumper(getattr(yaml, "CDumper", yaml.Dumper)):
    """OmegaConf's YAML (strings that read back as numbers or booleans are quoted), written
    by libyaml's emitter: a sweep of 10,000 trials writes 10,000 of these."""


_FrozenDumper.add_representer(str, OmegaConfDumper.str_representer)


def save_frozen(frozen: DictConfig, path: Path) -> None:
    save_frozen_data(OmegaConf.to_container(frozen, resolve=False, enum_to_str=True), path)


def save_frozen_data(container: dict, path: Path) -> None:
    from trainyard.rundir import atomic_write_text

    atomic_write_text(path, frozen_yaml(container))


def frozen_yaml(container: Any) -> str:
    return yaml.dump(
        container, Dumper=_FrozenDumper, default_flow_style=False, allow_unicode=True,
        sort_keys=False,
    )  # fmt: skip


def load_frozen_text(text: str) -> Any:
    """What :func:`load_frozen` would read from ``text``, as plain data."""
    return OmegaConf.to_container(OmegaConf.create(text), resolve=False)


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
    return {
        **_code_and_machine(source_dir),
        "seed": seed,
        "overrides": list(overrides),
        "created": time.time(),
    }


@functools.lru_cache(maxsize=8)
def _code_and_machine(source_dir: Path) -> dict[str, Any]:
    """The same for every trial one process prepares (a sweep asks git once, not per trial)."""
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
        # inside trainyard's image (docker/Dockerfile): the commit it was built from
        "image": {
            "revision": os.environ.get("TRAINYARD_IMAGE_REVISION"),
            "variant": os.environ.get("TRAINYARD_IMAGE_VARIANT"),
        }
        if os.environ.get("TRAINYARD_IMAGE_REVISION")
        else None,
    }
