"""Shared fixtures: the REAL config composed with Hydra's compose API and shrunk for tests
(LHT's pattern), and a helper that runs the real entrypoint as a subprocess."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra

from trainyard import resolvers
from trainyard.conf_path import CONF_DIR  # what trainyard-train reads

REPO = Path(__file__).resolve().parents[1]

resolvers.register()


def pytest_configure(config):
    path = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    if os.environ.get("TRAINYARD_PRETEND_GPUS") and not all(os.path.isabs(p) for p in path):
        # the tests start processes in temporary directories, where a relative entry is
        # lost: most of the run would pretend nothing and pass as on a CPU machine
        raise pytest.UsageError("TRAINYARD_PRETEND_GPUS: give PYTHONPATH as absolute paths "
                                "(PYTHONPATH=$PWD/tests/helpers/pretend_gpus)")  # fmt: skip


def compose_cfg(tmp_path: Path, overrides: list[str] = ()):
    """Compose conf/train.yaml as trainyard-train would, with paths inside tmp_path."""
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(
            "train",
            overrides=[
                f"paths.root_dir={tmp_path}",
                f"paths.run_dir={tmp_path / 'run'}",
                *overrides,
            ],
        )
    GlobalHydra.instance().clear()
    return cfg


@pytest.fixture
def cfg_factory(tmp_path):
    return lambda *overrides: compose_cfg(tmp_path, list(overrides))


def train_cli(
    args: list[str], root: Path, timeout: float = 300, env: dict | None = None, **kwargs
) -> subprocess.CompletedProcess:
    """Run ``trainyard-train`` in a subprocess with outputs under ``root``."""
    return subprocess.run(
        [sys.executable, "-m", "trainyard.train", *args],
        cwd=root,
        env=_env(root, env),
        capture_output=True,
        text=True,
        timeout=timeout,
        **kwargs,
    )


def cli(root: Path, *args: str, timeout: float = 120, env: dict | None = None):
    """Run the ``trainyard`` CLI in a subprocess with outputs under ``root``."""
    return subprocess.run(
        [sys.executable, "-m", "trainyard.cli", *args], cwd=root, env=_env(root, env),
        capture_output=True, text=True, timeout=timeout,
    )  # fmt: skip


@pytest.fixture
def hydra_version_base_unset():
    """Hydra's own test suites assume a fresh process's Hydra (no version_base chosen: the
    job changes into its output directory); other tests in this process composed with 1.3."""
    from hydra.version import _UNSPECIFIED_, VersionBase

    instance = VersionBase.instance()
    saved, instance.version_base = instance.version_base, _UNSPECIFIED_
    yield
    instance.version_base = saved


def pretend_gpus(count: int) -> dict[str, str]:
    """Environment variables under which torch reports ``count`` GPUs, none hidden
    (tests/helpers/pretend_gpus; a scheduler's own visible list here would hide some)."""
    path = [str(REPO / "tests" / "helpers" / "pretend_gpus"), os.environ.get("PYTHONPATH", "")]
    return {
        "PYTHONPATH": os.pathsep.join(filter(None, path)),
        "TRAINYARD_PRETEND_GPUS": str(count),
        "CUDA_VISIBLE_DEVICES": ",".join(str(i) for i in range(count)),
    }


def _env(root: Path, extra: dict | None) -> dict:
    return {**os.environ, "TRAINYARD_ROOT": str(root), "PYTHONUNBUFFERED": "1", **(extra or {})}


def popen_train(args: list[str], root: Path, env: dict | None = None) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "trainyard.train", *args],
        cwd=root,
        env=_env(root, env),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def run_dirs(root: Path) -> list[Path]:
    return sorted(p.parent for p in (root / "outputs").rglob("status.json"))
