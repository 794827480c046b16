"""``trainyard submit``: compose, prepare and send trials to a cluster backend.

The submitting machine does all the composing: each trial's config is composed with Hydra's
compose API, resolved, checked and frozen into its run directory
(:func:`trainyard.trial.prepare`) before anything is queued. Nodes receive only the paths
of those files. Run directories are the ones ``trainyard-train`` would use for the same
overrides (``runs/<trial key>``, or ``sweeps/<sweep key>/<trial key>`` when an override
lists several values), so a trial submitted twice, or first run locally, is the same trial.

``--dry-run`` checks everything, prints the exact requests and writes nothing.
"""

from __future__ import annotations

import json
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from trainyard.errors import ConfigError
from trainyard.rundir import trial_key, write_json

SUBMISSION = "submission.json"  # what was sent where: read by status, logs and cancel
_BUILT = ("data", "model", "loss", "optimizer", "scheduler")  # what check_constructible reads


@dataclass
class Planned:
    overrides: list[str]
    config: DictConfig  # composed, with paths.run_dir set
    run_dir: Path


def expand(overrides: list[str]) -> list[list[str]]:
    """A sweep's overrides as one list per trial (Hydra's basic sweeper's expansion)."""
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.override_parser.overrides_parser import OverridesParser

    try:
        parsed = OverridesParser.create().parse_overrides(overrides)
    except Exception as exc:  # Hydra's grammar error names the bad override
        raise ConfigError(str(exc), fix="check the quoting of that override") from None
    [trials] = BasicSweeper.split_arguments(parsed, None)
    return [list(trial) for trial in trials]


def compose(overrides: list[str]) -> DictConfig:
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.errors import HydraException

    from trainyard import resolvers
    from trainyard.conf_path import CONF_DIR

    resolvers.register()
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            return hydra_compose("train", overrides=overrides)
    except HydraException as exc:  # unknown option, key or group: Hydra lists the choices
        raise ConfigError(str(exc), fix="see trainyard-train --help for groups and keys") from None
    finally:
        GlobalHydra.instance().clear()


def plan(overrides: list[str]) -> list[Planned]:
    """Compose every trial and give it the run directory trainyard-train would."""
    trials = expand(overrides)
    sweep = len(trials) > 1
    planned = []
    for trial in trials:
        cfg = compose(trial)
        root = Path(str(cfg.paths.output_dir)) / str(cfg.name)
        if sweep:
            run_dir = root / "sweeps" / trial_key(overrides) / trial_key(trial)
        else:
            run_dir = root / "runs" / trial_key(trial)
        cfg.paths.run_dir = str(run_dir)
        planned.append(Planned(trial, cfg, run_dir))
    return planned


def _jobs(planned: list[Planned], frozen: list[DictConfig]) -> list[Any]:
    """Trials with the same backend, resources and cluster settings go out together."""
    from trainyard.backends import Job, Resources

    groups: dict[str, list[int]] = defaultdict(list)
    for index, cfg in enumerate(frozen):
        key = json.dumps(
            [OmegaConf.to_container(cfg.cluster), Resources.from_config(cfg).__dict__],
            sort_keys=True,
        )
        groups[key].append(index)
    jobs = []
    for number, indices in enumerate(groups.values()):
        cfg = frozen[indices[0]]
        if not OmegaConf.select(cfg, "cluster.backend"):
            raise ConfigError(
                "the cluster config names no backend",
                fix="start your cluster/<site>.yaml with `defaults: [slurm, _self_]` "
                "(or set backend: slurm)",
            )
        if cfg.cluster.backend == "slurm":
            from trainyard.backends.slurm import check_signal

            check_signal(OmegaConf.to_container(cfg.cluster), list(cfg.signals.preempt))
        log_dir = planned[indices[0]].run_dir.parent if len(planned) > 1 else None
        trials = [planned[i].run_dir for i in indices]
        cluster = OmegaConf.to_container(cfg.cluster, resolve=True)
        resources = Resources.from_config(cfg)
        tag = f"-{number}" if number else ""
        jobs.append(Job(str(cfg.name), trials, resources, cluster, log_dir or trials[0], tag))
    return jobs


def submit(overrides: list[str], dry_run: bool = False, build: bool = False) -> list[dict]:
    """Prepare and send; returns what was submitted (also written to submission.json).
    ``build``: also run the constructors (imports torch); the ranks run them first anyway,
    and a failure there is recorded in the trial's run directory."""
    return submit_planned(plan(overrides), dry_run, build)


def submit_planned(
    planned: list[Planned], dry_run: bool = False, build: bool = True
) -> list[dict[str, Any]]:
    """Check every trial, then prepare and send them (what a Hydra launcher calls too)."""
    from trainyard import backends, preflight
    from trainyard.freeze import freeze

    frozen = [preflight.check_config(freeze(p.config), build=False) for p in planned]
    if build:  # once per distinct set of constructor settings: a sweep over lr builds once
        seen = set()
        for cfg in frozen:
            key = json.dumps([OmegaConf.to_container(cfg[k]) for k in _BUILT if k in cfg])
            if key not in seen:
                seen.add(key)
                preflight.check_constructible(cfg)
    jobs = _jobs(planned, frozen)
    for job in jobs:  # the cluster's own verdict, before any run directory is written
        backend = backends.get(job.cluster.get("backend", "local"))
        for request in backend.render(job):
            backend.check(request)
    records = []
    for job in jobs:
        backend = backends.get(job.cluster.get("backend", "local"))
        if not dry_run:
            by_dir = {p.run_dir: (p, f) for p, f in zip(planned, frozen, strict=True)}
            queued = _queued(job.log_dir)
            job.trials = [t for t in job.trials if t not in queued and _needs_training(*by_dir[t])]
            if not job.trials:
                continue
        for request in backend.render(job):
            print(request)
            if dry_run:
                continue
            job_id = backend.submit(request)
            records.append(_record(job, backend.name, job_id))
    return records


_ACTIVE = ("PENDING", "RUNNING", "REQUEUED", "CONFIGURING", "COMPLETING", "SUSPENDED",
           "REQUEUE_HOLD", "RESIZING")  # fmt: skip


def _queued(log_dir: Path) -> set[Path]:
    """Trials an earlier submission from here still has queued or running: not again."""
    from trainyard import backends
    from trainyard.rundir import RunDir

    path, busy = Path(log_dir) / SUBMISSION, set()
    for record in json.loads(path.read_text()) if path.exists() else []:
        tasks = backends.get(record["backend"]).status(record["job_id"])
        for index, trial in enumerate(record["trials"]):
            state = tasks.get(f"{record['job_id']}_{index}") or tasks.get(record["job_id"], "")
            # a completed trial's job may still be tearing down: nothing would run again
            if state.split(" ")[0] in _ACTIVE and RunDir(trial).state != "completed":
                print(f"trainyard: {trial} is already queued as job {record['job_id']} ({state})")
                busy.add(Path(trial))
    return busy


def _needs_training(planned: Planned, frozen: DictConfig) -> bool:
    """Freeze the trial into its run directory; False when it already completed."""
    from trainyard.trial import open_trial

    if open_trial(frozen, planned.run_dir, planned.overrides).completed:
        print(f"trainyard: {planned.run_dir} already completed; not submitted again")
        return False
    return True


def _record(job: Any, backend: str, job_id: str) -> dict[str, Any]:
    record = {
        "backend": backend,
        "job_id": job_id,
        "trials": [str(t) for t in job.trials],
        "log_dir": str(job.log_dir),
        "time": time.time(),
    }
    path = Path(job.log_dir) / SUBMISSION
    history = json.loads(path.read_text()) if path.exists() else []
    write_json(path, [*history, record])
    print(f"trainyard: submitted {len(job.trials)} trial(s) to {backend} as job {job_id}")
    return record
