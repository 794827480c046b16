"""The ``trainyard-train`` entrypoint: compose once, freeze, start the ranks.

The Hydra task function only orchestrates: freeze the resolved config into the trial's run
directory, check it, and run the ranks from that file (in this process for one device,
through :mod:`trainyard.launch` for several, or as started by a scheduler). It returns the
monitored metric so Hydra sweepers can optimise it.
"""

from __future__ import annotations

import logging
import os
import sys
import traceback
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf

from trainyard import resolvers
from trainyard.errors import EXIT_FAILED, RunDirError, TrainyardError
from trainyard.freeze import freeze, load_frozen, provenance, save_frozen
from trainyard.rundir import IDENTITY_EXCLUDED_PREFIXES, RunDir, read_json, write_json

log = logging.getLogger("trainyard")

SOURCE_DIR = Path(__file__).resolve().parents[2]
CONF_DIR = Path(os.environ.get("TRAINYARD_CONF", SOURCE_DIR / "conf"))

resolvers.register()


def _identity(cfg: DictConfig) -> dict:
    """The parts of a config that define what a trial trains."""
    excluded = {*IDENTITY_EXCLUDED_PREFIXES, "callbacks", "test_after_fit"}
    plain = OmegaConf.to_container(cfg, resolve=False)
    return {k: v for k, v in plain.items() if k not in excluded}


def open_run_dir(run: RunDir, frozen: DictConfig, overrides: list[str]) -> DictConfig | None:
    """Freeze into a new run directory, or pick up an existing one.

    Returns the config to train from, or None when the trial already completed.
    """
    if not run.config.exists():
        save_frozen(frozen, run.config)
        write_json(run.provenance, provenance(frozen.seed, overrides, SOURCE_DIR))
        run.transition("created")
        return frozen
    if not frozen.resume:
        raise RunDirError(
            f"{run.root} already holds this trial and resume=false",
            fix="resume=true to continue it, name=<new name> for a fresh run, "
            "or remove the directory",
        )
    existing = load_frozen(run.config)
    before, now = _identity(existing), _identity(frozen)
    if before != now:
        changed = sorted(k for k in {*before, *now} if before.get(k) != now.get(k))
        raise RunDirError(
            f"{run.root} holds a trial with the same overrides but a different config "
            f"(changed: {', '.join(changed)}); it was left untouched",
            fix="name=<new name> to train the new config, or remove the old run directory",
        )
    if run.state == "completed" and run.result_file.exists():
        return None
    return existing  # compose once: a retry trains from the file written the first time


def drive(cfg: DictConfig, run_dir: Path, overrides: list[str]) -> float | None:
    """Freeze, check and run one trial. Raises TrainyardError on any failure."""
    from trainyard import preflight

    frozen = preflight.check(freeze(cfg))
    run = RunDir(run_dir)
    to_train = open_run_dir(run, frozen, overrides)
    if to_train is None:
        result = read_json(run.result_file)
        log.info("%s already completed (%s=%s); not training again", run.root, *_metric(result))
        return result.get("value")
    nproc = 1 if preflight.launched_externally() else int(to_train.trainer.devices)
    log.info("run directory: %s (%d rank%s)", run.root, nproc, "s" * (nproc > 1))
    try:
        if nproc > 1:
            from trainyard.launch import launch_local

            return launch_local(run.config, nproc, float(to_train.dist.timeout_s))
        from trainyard.worker import run_rank

        return run_rank(str(run.config))
    except TrainyardError as exc:
        run.transition("failed", error=exc.message, exit_code=exc.exit_code)
        raise
    except Exception as exc:
        run.transition("failed", error=f"{type(exc).__name__}: {exc}")
        raise


def _metric(result: dict) -> tuple[str, object]:
    return result.get("monitor"), result.get("value")


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="train")
def hydra_main(cfg: DictConfig) -> float | None:
    from hydra.core.hydra_config import HydraConfig

    hc = HydraConfig.get()
    try:
        return drive(cfg, Path(hc.runtime.output_dir), list(hc.overrides.task))
    except TrainyardError as exc:
        # A clean message and a meaningful exit code, not a traceback through Hydra.
        print(f"trainyard: {exc.render()}", file=sys.stderr)
        sys.exit(exc.exit_code)
    except Exception:
        # Unexpected: the traceback is the useful part. Exit code says "training failed".
        traceback.print_exc()
        sys.exit(EXIT_FAILED)


def main() -> None:
    hydra_main()


if __name__ == "__main__":
    main()
