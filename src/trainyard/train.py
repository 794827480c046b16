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
import os
import shutil
import sys
import traceback
from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig, OmegaConf

from trainyard import preflight, rendezvous, resolvers, signals
from trainyard.conf_path import CONF_DIR
from trainyard.errors import (
    EXIT_CONFIG,
    EXIT_FAILED,
    EXIT_INTERRUPTED,
    EXIT_PREEMPTED,
    ConfigError,
    Stopped,
    TrainyardError,
    TrialBusy,
)
from trainyard.freeze import freeze, load_frozen
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
        return _follow_rank0(cfg, RunDir(run_dir))
    run, claim = RunDir(run_dir), None
    try:
        _refuse_remote_cluster(cfg, external)
        frozen = preflight.check_config(freeze(cfg))
        _, devices = preflight.check_machine(frozen)
        claim = run.claim()  # before touching the directory: one process trains a trial
        trial = open_trial(frozen, run_dir, overrides)
    except TrainyardError as exc:
        if claim is not None:
            claim.release()
        if external:
            rendezvous.announce(run.root, exc.message)
        raise
    try:
        if external:
            outcome = rendezvous.COMPLETED if trial.completed else rendezvous.OK
            rendezvous.announce(run.root, outcome)
        return _train(trial, 1 if external else devices, preempt)
    finally:
        claim.release()


def _refuse_remote_cluster(cfg: DictConfig, external: bool) -> None:
    backend = OmegaConf.select(cfg, "cluster.backend", default="local")
    if backend != "local" and not external:
        raise ConfigError(
            f"cluster={backend}: trainyard-train trains on this machine",
            fix=f"trainyard submit cluster={backend} <overrides> (or make submit "
            f"CLUSTER={backend} ARGS=...) sends the trials to the cluster",
        )


def run_prepared(run_dir: str | Path, where: Any = None) -> float | None:
    """Train a trial that :func:`trainyard.trial.prepare` froze into ``run_dir`` (what a
    backend runs on the machine that trains it). Same locking, states and exit codes as
    ``trainyard-train``."""
    run = RunDir(run_dir)
    frozen = load_frozen(run.config)
    preempt = list(OmegaConf.select(frozen, "signals.preempt", default=signals.DEFAULT_PREEMPT))
    signals.install(preempt)
    _, devices = preflight.check_machine(frozen)
    claim = run.claim()
    try:
        from trainyard.trial import finished, unprune

        completed = finished(run)
        if not completed:
            unprune(run)
        return _train(Trial(run, frozen, completed=completed), devices, preempt, where)
    finally:
        claim.release()


def _follow_rank0(cfg: DictConfig, run: RunDir) -> float | None:
    """A rank other than 0 of a scheduler-started launch: train what rank 0 prepared."""
    timeout = float(OmegaConf.select(cfg, "dist.timeout_s", default=300))
    if rendezvous.wait(run.root, timeout) == rendezvous.COMPLETED:
        return read_json(run.result_file).get("value")
    from trainyard.worker import run_rank

    return run_rank(str(run.config))


def _train(trial: Trial, nproc: int, preempt: list[str], where: Any = None) -> float | None:
    """Train the trial's ranks on this machine (``where``: a
    :class:`~trainyard.launch.Placement` when it is one node of several)."""
    run = trial.run
    if trial.completed:
        result = read_json(run.result_file)
        metric = f"{result.get('monitor')}={result.get('value')}"
        log.info("%s already completed (%s); not training again", run.root, metric)
        return result.get("value")
    run.clear_rank_errors()
    os.environ["TRAINYARD_CLAIMED"] = "1"  # ranks started from here need not claim again
    log.info("run directory: %s (%d rank%s)", run.root, nproc, "s" * (nproc > 1))
    try:
        if nproc > 1 or where is not None:
            from trainyard.launch import launch_local

            return launch_local(run.config, nproc, preempt, where)
        from trainyard.worker import run_rank

        return run_rank(str(run.config))
    except (Stopped, signals.InterruptNow) as exc:
        if run.state not in ("preempted", "interrupted"):
            state = exc.state if isinstance(exc, Stopped) else "interrupted"
            run.transition(state, reason=getattr(exc, "message", "a second Ctrl-C"))
        raise
    except TrainyardError as exc:
        if run.state != "failed":  # a rank may have recorded it already, with more detail
            run.transition("failed", error=exc.message, exit_code=exc.exit_code)
        raise
    except Exception as exc:
        run.transition("failed", error=f"{type(exc).__name__}: {exc}", exit_code=EXIT_FAILED)
        raise


def _trial_failed(run_dir: str, message: str, code: int, multirun: bool, fail_fast: bool):
    """In a sweep, record the failure and go on (NaN tells sweepers it failed); else exit."""
    run = RunDir(run_dir)
    if multirun and run.root.is_dir() and not run.status_file.exists():
        # refused before a run directory was prepared: Hydra's job directory still says so
        run.transition("failed", error=message, exit_code=code)
    if multirun and not fail_fast:
        _failed_trials.append((run_dir, message.splitlines()[0], code))
        return float("nan")
    if not multirun and _only_hydras(run):
        # refused before anything was prepared: Hydra made the directory for its own files
        # (.hydra/, train.log) just before; bad input leaves no run directory behind
        shutil.rmtree(run.root, ignore_errors=True)
    sys.exit(code)


def _note_refusal(run: RunDir, exc: TrainyardError) -> None:
    """An attempt refused in a run directory that stays (a corrupt last.ckpt, a dataset
    gone missing) says why in its train.log too, after its start, not only on the console.
    Not a refusal because another process trains the trial: its log is that process's."""
    if isinstance(exc, TrialBusy):
        return
    if run.root.is_dir() and not _only_hydras(run):
        from trainyard.worker import note_in_train_log

        note_in_train_log(run, f"trainyard: {exc.render()}")


def _only_hydras(run: RunDir) -> bool:
    """The directory holds nothing but what Hydra wrote when this run started."""
    if not run.root.is_dir() or run.config.exists() or run.status_file.exists():
        return False
    return {p.name for p in run.root.iterdir()} <= {".hydra", "train.log"}


handed_over = False  # Hydra composed a trial and handed it to trainyard (or a launcher)


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="train")
def hydra_main(cfg: DictConfig) -> float | None:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    global handed_over
    handed_over = True
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
        _note_refusal(RunDir(run_dir), exc)
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
    except SystemExit as exc:
        # Hydra reports what it refuses (an unknown key, option or group; a bad override)
        # itself, with the valid choices, and exits 1. Past composition trainyard exits with
        # its own codes, so a 1 before any trial started is bad input: 2, as promised.
        if exc.code == 1 and not handed_over:
            sys.exit(EXIT_CONFIG)
        raise
    if _failed_trials:
        print(f"trainyard: {len(_failed_trials)} trial(s) of the sweep failed:", file=sys.stderr)
        for run_dir, message, code in _failed_trials:
            print(f"  [exit {code}] {run_dir}: {message}", file=sys.stderr)
        codes = {code for _, _, code in _failed_trials}
        if codes == {EXIT_PREEMPTED}:  # only stopped trials (cancelled): resumable
            sys.exit(EXIT_PREEMPTED)
        sys.exit(EXIT_CONFIG if codes == {EXIT_CONFIG} else EXIT_FAILED)


if __name__ == "__main__":
    # `python -m trainyard.train`: run the module the launchers import (they record failed
    # trials and hand-overs in trainyard.train, not in this __main__ copy of it)
    from trainyard import train

    train.main()
