"""What trainyard's Hydra launchers share: turn the sweeper's trials into prepared trials,
send them to a backend, wait, and hand each trial's metric back to the sweeper.

Hydra composes each trial's config once, here, on the submitting machine (the sweeper
chose the overrides); the trial gets the run directory Hydra's ``sweep.dir`` /
``sweep.subdir`` name, and :func:`trainyard.submit.submit_planned` checks, freezes and
sends them all, as ``trainyard submit`` does. Nodes never compose or parse overrides.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, open_dict

log = logging.getLogger("trainyard")

# trial states that end a wait; a preempted trial is requeued by the scheduler
_DONE = ("completed", "failed", "interrupted")
# scheduler states after which nothing more will happen to a task
_GONE = ("CANCELLED", "FAILED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "COMPLETED", "ENDED")


@dataclass
class Started:
    """Trials sent by :func:`start`: what :func:`collect` needs to follow them."""

    job_overrides: list[list[str]]
    planned: list[Any]
    failed: dict[int, Any]  # index -> the error of a trial that could not be composed
    records: list[dict[str, Any]]
    unknown_since: dict[str, float] = field(default_factory=dict)


def launch(
    launcher: Any,
    job_overrides: Sequence[Sequence[str]],
    initial_job_idx: int,
    wait: bool = True,
    poll_s: float = 2.0,
    adjust: Callable[[DictConfig], None] | None = None,
    forget_after_s: float = 30.0,
) -> list[Any]:
    """``adjust(sweep_config)``: a launcher's last word on a trial's composed config (with
    its ``hydra`` node) before it is frozen."""
    from trainyard import signals
    from trainyard.errors import Stopped

    started = start(launcher, job_overrides, initial_job_idx, adjust)
    if started.records:
        where = started.records[0]["log_dir"]
        print(
            f"trainyard: follow with trainyard status {where}; trainyard report for a "
            "sweep's results",
            flush=True,
        )
    if wait:
        try:
            while _pending(started, forget_after_s):
                request = signals.requested()
                if request is not None:  # the driver was stopped: the trials stay queued
                    raise request.error("while waiting for the trials")
                time.sleep(poll_s)
        except (Stopped, signals.InterruptNow) as exc:
            _left_queued(started.records, exc)
    return returns(started)


def start(
    launcher: Any,
    job_overrides: Sequence[Sequence[str]],
    initial_job_idx: int,
    adjust: Callable[[DictConfig], None] | None = None,
) -> Started:
    """Compose, prepare and send the trials; return at once (the asynchronous half of
    :func:`launch`, for sweepers that keep a number of trials in flight)."""
    from trainyard import signals, train
    from trainyard.errors import TrainyardError
    from trainyard.submit import submit_planned

    train.handed_over = True  # past here, failures carry trainyard's own exit codes
    planned, failed = [], {}
    for index, overrides in enumerate(job_overrides):
        try:
            planned.append(_plan(launcher, list(overrides), initial_job_idx + index, adjust))
        except TrainyardError as exc:  # this trial cannot even be composed
            failed[index] = exc
    signals.install()
    try:
        records = submit_planned(planned) if planned else []
    except TrainyardError as exc:  # the cluster refused, a check failed: nothing was queued
        import sys

        print(f"trainyard: {exc.render()}", file=sys.stderr)
        sys.exit(exc.exit_code)
    records += _already_queued(planned, records)
    return Started([list(o) for o in job_overrides], planned, failed, records)


def _already_queued(planned: list[Any], records: list[dict]) -> list[dict]:
    """The earlier submissions of trials that were not sent again because a job still has
    them (a driver that died and was relaunched): followed, not taken for finished."""
    import functools

    from trainyard.rundir import RunDir, read_json
    from trainyard.submit import SUBMISSION

    sent = {t for r in records for t in r["trials"]}
    found: dict[str, dict] = {}

    @functools.cache  # a sweep's own file serves all of its trials: read once
    def history(path: Path) -> list[dict]:
        return read_json(path) if path.exists() else []

    for p in planned:
        trial = str(p.run_dir)
        if trial in sent or RunDir(trial).state == "completed":
            continue
        for log_dir in (Path(trial), Path(trial).parent):
            latest = [r for r in history(log_dir / SUBMISSION) if trial in r["trials"]][-1:]
            for record in latest:
                found.setdefault(record["job_id"], {**record, "trials": []})
                found[record["job_id"]]["trials"].append(trial)
            if latest:
                break
    return list(found.values())


def collect(started: Started, forget_after_s: float = 30.0) -> list[Any] | None:
    """The trials' returns once every one of them is done (or its job is gone); None while
    any is pending."""
    return None if _pending(started, forget_after_s) else returns(started)


def _left_queued(records: list[dict], exc: BaseException) -> None:
    """The driver was stopped while it waited: the trials stay with the cluster. Say so,
    and how to follow or cancel them, and exit with the stop's code."""
    import sys

    from trainyard.errors import EXIT_INTERRUPTED

    where = records[0]["log_dir"] if records else "outputs"
    trials = sum(len(r["trials"]) for r in records)
    reason = getattr(exc, "message", "interrupted")
    message = (
        f"trainyard: {reason}; the {trials} trial(s) sent stay with the cluster: trainyard "
        f"status {where} follows them, trainyard cancel {where} stops them"
    )
    print(message, file=sys.stderr)
    sys.exit(getattr(exc, "exit_code", EXIT_INTERRUPTED))


class Compositions:
    """Hydra's ``load_sweep_config``, done once per distinct set of group choices.

    A sweep's trials mostly differ in values. Hydra composes each from scratch (about
    0.1 s: the defaults list, every YAML file read and merged again); here the trials that
    share their group choices share one composition, and each applies its value overrides
    to a copy with Hydra's own function and gets Hydra's bookkeeping of its overrides
    (``hydra.overrides.task``, ``hydra.job.override_dirname``). A trial overriding
    ``hydra.*`` is composed in full. tests/unit/test_sweep_compose.py holds the result to
    Hydra's own, trial by trial.
    """

    def __init__(self, loader: Any, master: DictConfig) -> None:
        from hydra.core.override_parser.overrides_parser import OverridesParser

        self.loader, self.master = loader, master
        self._parser = OverridesParser.create()
        self._base: dict[tuple[str, ...], DictConfig] = {}
        self._groups: dict[str, bool] = {}

    def load(self, overrides: list[str]) -> DictConfig:
        import copy

        from hydra._internal.config_loader_impl import ConfigLoaderImpl, get_overrides_dirname

        parsed = self._parser.parse_overrides(overrides)
        if any(o.is_hydra_override() for o in parsed):
            return self.loader.load_sweep_config(self.master, overrides)
        groups = tuple(o.input_line for o in parsed if self._is_group(o))
        if groups not in self._base:
            self._base[groups] = self.loader.load_sweep_config(self.master, list(groups))
        cfg = copy.deepcopy(self._base[groups])
        values = [o for o in parsed if not self._is_group(o)]
        ConfigLoaderImpl._apply_overrides_to_config(values, cfg)
        job = cfg.hydra.job
        with open_dict(cfg.hydra):
            cfg.hydra.overrides.task = [o.input_line for o in parsed]
            job.override_dirname = get_overrides_dirname(
                overrides=parsed,
                kv_sep=job.config.override_dirname.kv_sep,
                item_sep=job.config.override_dirname.item_sep,
                exclude_keys=job.config.override_dirname.exclude_keys,
            )
        return cfg

    def _is_group(self, override: Any) -> bool:
        from trainyard.compose import is_group_choice

        return is_group_choice(override, self.loader.repository, self._groups)


def _compositions(launcher: Any) -> Compositions:
    """One per launcher and master config: a sweeper calls launch() batch after batch."""
    cached = getattr(launcher, "_trainyard_compositions", None)
    if cached is None or cached.master is not launcher.config:
        cached = Compositions(launcher.hydra_context.config_loader, launcher.config)
        launcher._trainyard_compositions = cached
    return cached


def _plan(launcher: Any, overrides: list[str], job_num: int, adjust) -> Any:
    from hydra.core.hydra_config import HydraConfig

    from trainyard.submit import Planned

    sweep = _compositions(launcher).load(overrides)
    with open_dict(sweep.hydra.job):
        sweep.hydra.job.num = job_num
    HydraConfig.instance().set_config(sweep)  # resolves ${hydra:...} for this trial
    if adjust is not None:
        adjust(sweep)
    run_dir = Path(str(sweep.hydra.sweep.dir)) / str(sweep.hydra.sweep.subdir)
    with open_dict(sweep):
        del sweep["hydra"]
    sweep.paths.run_dir = str(run_dir)
    return Planned(overrides, sweep, run_dir)


def _pending(started: Started, forget_after_s: float) -> list[str]:
    """The trials not yet done, after one look at the run directories and the scheduler:
    a trial whose job ended, or that the scheduler no longer knows for ``forget_after_s``
    (deleted, cancelled, expired), is over."""
    from trainyard import backends
    from trainyard.errors import TrainyardError

    unknown_since, pending = started.unknown_since, []
    for record in started.records:
        try:
            scheduler = backends.get(record["backend"]).status(record["job_id"])
        except TrainyardError as exc:  # a blip of the scheduler: ask again next time
            log.warning("trainyard: state of job %s: %s", record["job_id"], exc.message)
            scheduler = {record["job_id"]: "UNKNOWN"}
        if scheduler:
            unknown_since.pop(record["job_id"], None)
        first = unknown_since.setdefault(record["job_id"], time.monotonic())
        forgotten = not scheduler and time.monotonic() - first > forget_after_s
        gone = scheduler and all(s.split()[0] in _GONE for s in scheduler.values())
        if not (gone or forgotten):
            pending += [t for t in record["trials"] if not _ended_since(t, record)]
    return pending


def _ended_since(trial: str, record: dict) -> bool:
    """The trial ended after it was sent: a trial sent again still shows how its previous
    attempt ended (failed, interrupted) until it starts."""
    from trainyard.rundir import RunDir

    status = RunDir(trial).status()
    if status["state"] not in _DONE or not status["history"]:
        return False
    return status["history"][-1].get("time", 0) >= record.get("time", 0)


def _reported(records: list[dict]) -> dict[str, dict]:
    """Trial directory -> the result its backend reports, for trials whose run directory
    is on storage this machine does not see (Kubernetes pods with cluster.root_dir)."""
    from trainyard import backends
    from trainyard.errors import TrainyardError

    found = {}
    for record in records:
        fetch = getattr(backends.get(record["backend"]), "results", None)
        try:
            reported = fetch(record["job_id"]) if fetch else {}
        except TrainyardError as exc:  # the trials stay failed for the sweeper, with why
            log.warning("trainyard: the results of job %s: %s", record["job_id"], exc.message)
            reported = {}
        for index, summary in reported.items():
            if summary.get("state") == "completed" and index < len(record["trials"]):
                found[record["trials"][index]] = summary
    return found


def returns(started: Started) -> list[Any]:
    """Hydra's JobReturn of each trial, its metric as the return value (NaN: failed)."""
    from hydra.core.utils import JobReturn, JobStatus

    from trainyard import train
    from trainyard.rundir import RunDir, read_json

    job_overrides, planned, failed = started.job_overrides, started.planned, started.failed
    records = started.records

    by_overrides = {tuple(p.overrides): p for p in planned}
    unseen = [p for p in planned if not RunDir(p.run_dir).result_file.exists()]
    reported = _reported(list(records)) if unseen else {}
    out = []
    for index, overrides in enumerate(job_overrides):
        ret = JobReturn(overrides=list(overrides), status=JobStatus.COMPLETED)
        trial = by_overrides.get(tuple(overrides))
        run = RunDir(trial.run_dir) if trial else None
        if index not in failed and run is not None and run.result_file.exists():
            ret.return_value = read_json(run.result_file).get("value")
            ret.working_dir = str(run.root)
        elif index not in failed and run is not None and str(run.root) in reported:
            ret.return_value = reported[str(run.root)].get("value")
            ret.working_dir = str(run.root)
        else:
            history = run.status()["history"] if run else []
            last = history[-1] if history else {}
            reason = failed.get(index) or last.get("error") or last.get("reason")
            where = str(run.root) if run else " ".join(overrides)
            code = getattr(failed.get(index), "exit_code", 3)  # bad input: 2
            if index not in failed and last.get("state") in ("preempted", "interrupted"):
                code = 75  # stopped (cancelled, preempted): resumable, not a failure
                reason = f"stopped ({reason or last['state']}); launch again to resume it"
            train._failed_trials.append((where, str(reason or "did not complete"), code))
            ret.return_value = float("nan")
        out.append(ret)
    log.info("%d trial(s) done", len(out))
    return out
