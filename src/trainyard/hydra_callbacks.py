"""Hydra callbacks: checks that must run before Hydra creates the output directory."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from trainyard.errors import EXIT_CONFIG


def check_writable(directory: Path) -> str | None:
    """Create ``directory`` (and parents) if needed; return why that failed, or None."""
    try:
        directory.mkdir(parents=True, exist_ok=True)
        # one probe per process: ranks started by torchrun or srun check the same directory
        probe = directory / f".trainyard-write-probe.{os.getpid()}"
        probe.write_text("")
        probe.unlink(missing_ok=True)
    except OSError as exc:
        return exc.strerror or str(exc)
    return None


class OutputDirCheck(Callback):
    """Refuse to start when the run or sweep directory cannot be written."""

    def _check(self, config: DictConfig, key: str) -> None:
        target = Path(str(config.hydra[key].dir))
        reason = check_writable(target)
        if reason:
            print(
                f"trainyard: cannot write the output directory {target}: {reason}\n"
                "  fix: point paths.output_dir at a writable directory "
                "(paths.output_dir=/scratch/$USER/outputs)",
                file=sys.stderr,
            )
            sys.exit(EXIT_CONFIG)

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        self._check(config, "run")

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        self._check(config, "sweep")
