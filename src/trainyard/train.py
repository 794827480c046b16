"""The ``trainyard-train`` entrypoint: compose once, prepare the trial, start the ranks.

The Hydra task function only orchestrates: prepare the trial from the composed config
(:func:`trainyard.trial.prepare`: resolve, check, freeze into the run directory), check the
machine, and run the ranks from the frozen file (in this process for one device, through
:mod:`trainyard.launch` for several, or as started by a scheduler). It returns the monitored
metric so Hydra sweepers can optimise it.

In a sweep (``-m``) a trial that fails is recorded as failed in its run directory, its
sweeper value is NaN, and the sweep goes on; the sweep exits non-zero at the end with one
line per failed trial (``fail_fast=true`` stops at the first failure instead). A
preemption signal or Ctrl-C stops the whole sweep.
"""

from __future__ import annotations

import logging
import sys
import traceback
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf

from trainyard import preflight, rendezvous, resolvers, signals
from trainyard.conf_path import CONF_DIR
from trainyard.errors import (
    EXIT_CONFIG,
    EXIT_FAILED,
    EXIT_INTERRUPTED,
    Stopped,
    TrainyardError,
)
from trainyard.freeze import freeze
from trainyard.rundir import RunDir, read_json
from trainyard.trial import Trial, open_trial

log = logging.getLogger("trainyard")

resolvers.register()

_failed_trials: list[tuple[str, str, int]] = []  # (run dir, one-line error, exit code)


def drive(cfg: DictConfig, run_dir: Path, overrides: list[str]) -> float | None:
    """Prepare one trial and train it. Raises TrainyardError on any failure."""
    preempt = list(OmegaConf.select(cfg, "signals.preempt", default=signals.DEFAULT_PREEMPT))
    signals.install(preempt)
    external = preflight.launched_externally()
    if external and rendezvous.global_rank() != 0:
        rendezvous.wait(run_dir, float(OmegaConf.select(cfg, "dist.timeout_s", default=300)))
        from trainyard.worker import run_rank

        return run_rank(str(RunDir(run_dir).config))
    try:
        frozen = preflight.check_config(freeze(cfg))
        _, devices = preflight.check_machine(frozen)
        trial = open_trial(frozen, run_dir, overrides)
    except TrainyardError as exc:
        if external:
            rendezvous.announce(run_dir, exc.message)
        raise
    return _train(trial, 1 if external else devices, external, preempt)


def _train(trial: Trial, nproc: int, external: bool, preempt: list[str]) -> float | None:
    run = trial.run
    if trial.completed:
        result = read_json(run.result_file)
        metric = f"{result.get('monitor')}={result.get('value')}"
        log.info("%s already completed (%s); not training again", run.root, metric)
        if external:
            rendezvous.announce(run.root)  # the other ranks find it completed too
        return result.get("value")
    claim = run.claim()
    run.clear_rank_errors()
    if external:
        rendezvous.announce(run.root)
    log.info("run directory: %s (%d rank%s)", run.root, nproc, "s" * (nproc > 1))
    try:
        if nproc > 1:
            from trainyard.launch import launch_local

            return launch_local(run.config, nproc, preempt)
        from trainyard.worker import run_rank

        return run_rank(str(run.config))
    except Stopped as exc:
        if run.state not in ("preempted", "interrupted"):
            run.transition(exc.state, reason=exc.message)
        raise
    except TrainyardError as exc:
        run.transition("failed", error=exc.message, exit_code=exc.exit_code)
        raise
    except Exception as exc:
        run.transition("failed", error=f"{type(exc).__name__}: {exc}", exit_code=EXIT_FAILED)
        raise
    finally:
        claim.release()


def _trial_failed(run_dir: str, message: str, code: int, multirun: bool, fail_fast: bool):
    """In a sweep, record the failure and go on (NaN tells sweepers it failed); else exit."""
    if multirun and not fail_fast:
        _failed_trials.append((run_dir, message.splitlines()[0], code))
        return float("nan")
    sys.exit(code)


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="train")
def hydra_main(cfg: DictConfig) -> float | None:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    hc = HydraConfig.get()
    run_dir = hc.runtime.output_dir
    multirun = hc.mode == RunMode.MULTIRUN
    fail_fast = bool(OmegaConf.select(cfg, "fail_fast", default=False))
    try:
        return drive(cfg, Path(run_dir), list(hc.overrides.task))
    except Stopped as exc:
        print(f"trainyard: {exc.render()}", file=sys.stderr)
        sys.exit(exc.exit_code)  # a signal stops the whole sweep, not just this trial
    except TrainyardError as exc:
        # A clean message and a meaningful exit code, not a traceback through Hydra.
        print(f"trainyard: {exc.render()}", file=sys.stderr)
        return _trial_failed(run_dir, exc.message, exc.exit_code, multirun, fail_fast)
    except signals.InterruptNow:
        print("trainyard: interrupted", file=sys.stderr)
        sys.exit(EXIT_INTERRUPTED)
    except Exception as exc:
        # Unexpected: the traceback is the useful part. Exit code says "training failed".
        traceback.print_exc()
        message = f"{type(exc).__name__}: {exc}"
        return _trial_failed(run_dir, message, EXIT_FAILED, multirun, fail_fast)


def main() -> None:
    try:
        hydra_main()
    except KeyboardInterrupt:  # Ctrl-C before trainyard's own handler was installed
        print("trainyard: interrupted", file=sys.stderr)
        sys.exit(EXIT_INTERRUPTED)
    if _failed_trials:
        print(f"trainyard: {len(_failed_trials)} trial(s) of the sweep failed:", file=sys.stderr)
        for run_dir, message, code in _failed_trials:
            print(f"  [exit {code}] {run_dir}: {message}", file=sys.stderr)
        codes = {code for _, _, code in _failed_trials}
        sys.exit(EXIT_CONFIG if codes == {EXIT_CONFIG} else EXIT_FAILED)


if __name__ == "__main__":
    main()
