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

import contextlib
import dataclasses
import functools
import json
import time
from collections import defaultdict
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from trainyard.compose import Composer, expand
from trainyard.errors import ConfigError
from trainyard.rundir import one_sync, trial_key, write_json

SUBMISSION = "submission.json"  # what was sent where: read by status, logs and cancel
# what check_constructible reads (its flags' check: every section with constructors)
_BUILT = ("data", "model", "loss", "optimizer", "scheduler", "trainer", "callbacks", "logger")


@dataclass
class Planned:
    overrides: list[str]
    config: DictConfig | None  # composed, with paths.run_dir set (None: from a template)
    run_dir: Path
    template: Any = None  # bulk.Template the trial is frozen from, with these values
    values: dict[str, Any] = field(default_factory=dict)


@dataclass
class Checked:
    """A trial that passed the checks, with what grouping and writing it needs."""

    planned: Planned
    frozen: DictConfig | None  # trial by trial: the frozen config (None: from a template)
    text: str | None  # from a template: its config.yaml, when the template could write it
    name: str
    cluster: dict[str, Any]
    resources: Any
    preempt: list[str]

    @property
    def job_key(self) -> str:
        return json.dumps([self.cluster, self.resources.__dict__], sort_keys=True)

    def data(self) -> dict:
        """The frozen config as plain data (made on demand: most trials of a template
        are written from its text and never need it)."""
        if self.frozen is not None:
            return OmegaConf.to_container(self.frozen, resolve=False)
        p = self.planned
        return p.template.data(p.values, str(p.run_dir))


BULK_MIN = 32  # sweeps at least this large are frozen through templates where they can


def plan(overrides: list[str]) -> list[Planned]:
    """Compose every trial and give it the run directory trainyard-train would."""
    launcher = [o for o in overrides if o.lstrip("+~").startswith("hydra.launcher.")]
    if launcher:  # they would be dropped silently: trainyard submit renders from cluster.*
        raise ConfigError(
            f"{launcher[0]}: trainyard submit reads the site settings from cluster.* "
            "(hydra.launcher.* is for sweeps through trainyard-train -m)",
            fix="cluster.partition=..., cluster.time_min=..., cluster.account=... "
            "(see conf/cluster/slurm.yaml)",
        )
    trials = expand(overrides)
    sweep_key = trial_key(overrides) if len(trials) > 1 else None
    planned = []
    with Composer() as composer:
        templates = composer.templates(trials) if len(trials) >= BULK_MIN else {}
        for index, trial in enumerate(trials):
            template = templates.get(index)
            if template is None:
                cfg = composer.compose(trial)
                run_dir = _run_dir(cfg.paths.output_dir, cfg.name, sweep_key, trial)
                cfg.paths.run_dir = str(run_dir)
                planned.append(Planned(trial, cfg, run_dir))
                continue
            values = composer.samples[index]
            where = {k: values.get(k, template.value(k)) for k in ("paths.output_dir", "name")}
            run_dir = _run_dir(where["paths.output_dir"], where["name"], sweep_key, trial)
            planned.append(Planned(trial, None, run_dir, template, values))
    _refuse_duplicates(planned)
    return planned


def _refuse_duplicates(planned: list[Planned]) -> None:
    """Trials that differ only in settings that do not define a trial (``cluster.*``,
    paths, logging) are one trial: a sweep over them would train it once."""
    seen: dict[Path, Planned] = {}
    for p in planned:
        if p.run_dir in seen:
            raise ConfigError(
                f"{' '.join(seen[p.run_dir].overrides)} and {' '.join(p.overrides)} are the "
                "same trial: they differ only in settings that do not define a trial "
                "(cluster.*, paths, logging; see NON_IDENTITY_KEYS in trainyard/rundir.py)",
                fix="sweep over those settings in separate submissions, with name=<each>",
            )
        seen[p.run_dir] = p


def _run_dir(output_dir: Any, name: Any, sweep_key: str | None, trial: list[str]) -> Path:
    root = Path(str(output_dir)) / str(name)
    if sweep_key:
        return root / "sweeps" / sweep_key / trial_key(trial)
    return root / "runs" / trial_key(trial)


def _check(p: Planned) -> Checked:
    """Freeze and check one trial (through its template when it has one)."""
    from trainyard import preflight
    from trainyard.freeze import freeze

    if p.template is None:
        frozen = preflight.check_config(freeze(p.config), build=False)
        return _checked(p, frozen, None, frozen)
    text = p.template.yaml(p.values, str(p.run_dir))
    with p.template.applied(p.values) as view:
        preflight.check_config(view, build=False)
        shared = p.template.shared_checked
        if shared is not None:  # nothing the cluster, resources or name read varies
            return dataclasses.replace(shared, planned=p, text=text)
        checked = _checked(p, None, text, view)
        if not p.template.places_under(_JOB_KEYS):
            p.template.shared_checked = checked
        return checked


# settings that decide which job a trial goes out with (see _checked)
_JOB_KEYS = ("cluster", "trainer", "signals", "name")


def _checked(p: Planned, frozen, text, cfg: DictConfig) -> Checked:
    from trainyard.backends import Resources

    if not OmegaConf.select(cfg, "cluster.backend"):
        raise ConfigError(
            "the cluster config names no backend",
            fix="start your cluster/<site>.yaml with `defaults: [slurm, _self_]` "
            "(or set backend: slurm)",
        )
    cluster = OmegaConf.to_container(cfg.cluster, resolve=True)
    preempt = [str(s) for s in OmegaConf.select(cfg, "signals.preempt", default=[])]
    resources = Resources.from_config(cfg)
    return Checked(p, frozen, text, str(cfg.name), cluster, resources, preempt)


def _jobs(checked: list[Checked]) -> list[Any]:
    """Trials with the same backend, resources and cluster settings go out together."""
    from trainyard.backends import Job

    groups: dict[str, list[Checked]] = defaultdict(list)
    by_dir = {c.planned.run_dir: c for c in checked}
    for trial in checked:
        groups[trial.job_key].append(trial)
    jobs = []
    for number, members in enumerate(groups.values()):
        first = members[0]
        if first.cluster["backend"] == "slurm":
            from trainyard.backends.slurm import check_signal

            check_signal(first.cluster, first.preempt)
        if first.cluster["backend"] == "k8s" and "SIGTERM" not in first.preempt:
            raise ConfigError(
                "signals.preempt does not include SIGTERM, which Kubernetes sends a pod it "
                "deletes, evicts or preempts: the trial would be killed without a checkpoint",
                fix="signals.preempt=[SIGTERM,SIGUSR1,SIGUSR2]",
            )
        trials = [c.planned.run_dir for c in members]
        log_dir = trials[0].parent if len(checked) > 1 else trials[0]
        tag = f"-{number}" if number else ""
        config = lambda trial: by_dir[trial].data()  # noqa: E731
        jobs.append(Job(first.name, trials, first.resources, first.cluster, log_dir, tag, config))
    return jobs


def _build_checks(checked: list[Checked]) -> None:
    """The constructors, once per distinct set of their settings (a sweep over the learning
    rate builds once)."""
    from trainyard import preflight

    seen = set()
    for trial in checked:
        cfg = trial.frozen if trial.frozen is not None else OmegaConf.create(trial.data())
        sections = [cfg[k] for k in _BUILT if k in cfg]  # scheduler: null is a section too
        key = json.dumps([OmegaConf.to_container(s) if OmegaConf.is_config(s) else s
                          for s in sections])  # fmt: skip
        if key not in seen:
            seen.add(key)
            preflight.check_constructible(cfg)


def submit(overrides: list[str], dry_run: bool = False, build: bool = False) -> list[dict]:
    """Prepare and send; returns what was submitted (also written to submission.json).
    ``build``: also run the constructors (imports torch); the ranks run them first anyway,
    and a failure there is recorded in the trial's run directory."""
    return submit_planned(plan(overrides), dry_run, build)


def submit_planned(
    planned: list[Planned],
    dry_run: bool = False,
    build: bool = True,
    timings: dict[str, float] | None = None,
) -> list[dict[str, Any]]:
    """Check every trial, then prepare and send them (what a Hydra launcher calls too).
    ``timings``: seconds spent per phase are added to it (benchmarks/slurm_scale.py)."""
    from trainyard import backends

    phase = functools.partial(_phase, {} if timings is None else timings)
    with phase("freeze and check"):
        checked = [_check(p) for p in planned]  # all of them, before anything is written
        if build:
            _build_checks(checked)
        jobs = _jobs(checked)
    rendered = {}  # id(job) -> (its trials, its requests): rendered once when they stay
    with phase("ask the cluster"):
        for job in jobs:  # the cluster's own verdict, before any run directory is written
            backend = backends.get(job.cluster.get("backend", "local"))
            requests = backend.render(job)
            rendered[id(job)] = (list(job.trials), requests)
            for request in requests:
                _ask(backend, request, dry_run)
    by_dir = {c.planned.run_dir: c for c in checked}
    records = []
    for job in jobs:
        backend = backends.get(job.cluster.get("backend", "local"))
        with phase("write run directories"):
            # the dry run leaves out what a submission would leave out, writing nothing
            job.trials = _still_to_train(job, by_dir) if dry_run else _write(job, by_dir)
        if not job.trials:
            continue
        trials, requests = rendered[id(job)]
        for request in requests if trials == job.trials else backend.render(job):
            if dry_run:
                print(request)
                continue
            sent_at = time.time()  # before: a trial may end before submit() returns
            with phase("submit"):
                job_id = _send(backend, request, job, records)
            # a sweep split into several arrays: each record lists its own array's trials
            trials = getattr(request, "trials", job.trials)
            records.append(_record(job, backend.name, job_id, trials, sent_at))
    return records


def _send(backend: Any, request: Any, job: Any, records: list[dict]) -> str:
    """Submit one request. When the cluster refuses part way, what went out is recorded
    (status, logs and cancel find it; a new submission does not send it again) and the
    error says which trials went out and which did not."""
    from trainyard.errors import TrainyardError

    try:
        return backend.submit(request)
    except TrainyardError as exc:
        sent = list(getattr(exc, "sent", []))
        if sent:
            records.append(_record(job, backend.name, exc.job_id, sent))
        done = sum(len(r["trials"]) for r in records)
        if not done:
            raise
        error = TrainyardError(
            f"{done} trial(s) went out (recorded in submission.json: trainyard status, logs "
            f"and cancel see them); the others did not: {exc.message}",
            fix=(exc.fix + "; then " if exc.fix else "")
            + "submit again: only the trials that did not go out are sent",
        )
        error.exit_code = exc.exit_code
        raise error from None


def _ask(backend: Any, request: Any, dry_run: bool) -> None:
    """The cluster's verdict on a request; a dry run without a cluster to ask renders all
    the same (manifests for GitOps, a script to read), and one the cluster refuses shows
    what it refused before saying why."""
    from trainyard.backends.base import NoCluster
    from trainyard.errors import TrainyardError

    try:
        backend.check(request)
    except NoCluster as exc:
        if not dry_run:
            raise
        print(f"# trainyard: not checked with the cluster: {exc.message}")
    except TrainyardError:
        if dry_run:
            print(request)
        raise


@contextlib.contextmanager
def _phase(timings: dict[str, float], name: str) -> Iterator[None]:
    start = time.perf_counter()
    try:
        yield
    finally:
        timings[name] = timings.get(name, 0.0) + time.perf_counter() - start


def _still_to_train(job: Any, by_dir: dict[Path, Checked]) -> list[Path]:
    """The job's trials a submission would send now (read-only: for the dry run)."""
    from omegaconf import OmegaConf

    from trainyard.rundir import RunDir
    from trainyard.trial import completed_twin

    queued = _queued(job.log_dir)
    out = []
    for trial in job.trials:
        run, checked = RunDir(trial), by_dir[trial]
        frozen = lambda c=checked: OmegaConf.create(c.data())  # noqa: E731
        twin = completed_twin(run, frozen) if not run.root.exists() else None
        if run.state == "completed" and run.result_file.exists():
            print(f"trainyard: {trial} already completed; would not be submitted again")
        elif twin is not None:
            print(f"trainyard: {trial} already completed as {twin.root}; would be reused")
        elif trial not in queued:
            out.append(trial)
    return out


def _write(job: Any, by_dir: dict[Path, Checked]) -> list[Path]:
    """Freeze the job's trials into their run directories; the ones still to train.
    Every trial's files are on disk before anything is queued; writing thousands of small
    files waits on the filesystem, so several are written at once."""
    queued = _queued(job.log_dir)
    with one_sync(), ThreadPoolExecutor(8) as pool:
        todo = [t for t in job.trials if t not in queued]
        needed = list(pool.map(lambda t: _needs_training(by_dir[t]), todo))
    return [t for t, need in zip(todo, needed, strict=True) if need]


_ACTIVE = ("PENDING", "RUNNING", "REQUEUED", "CONFIGURING", "COMPLETING", "SUSPENDED",
           "REQUEUE_HOLD", "RESIZING")  # fmt: skip


def _queued(log_dir: Path) -> set[Path]:
    """Trials an earlier submission from here still has queued or running: not again."""
    from trainyard import backends
    from trainyard.backends.base import trial_states
    from trainyard.rundir import RunDir

    path, busy = Path(log_dir) / SUBMISSION, set()
    for record in json.loads(path.read_text()) if path.exists() else []:
        tasks = backends.get(record["backend"]).status(record["job_id"])
        for trial, state in trial_states(record, tasks).items():
            # a completed trial's job may still be tearing down: nothing would run again
            if state.split(" ")[0] in _ACTIVE and RunDir(trial).state != "completed":
                print(f"trainyard: {trial} is already queued as job {record['job_id']} ({state})")
                busy.add(Path(trial))
    return busy


def _needs_training(trial: Checked) -> bool:
    """Freeze the trial into its run directory; False when it already completed."""
    from trainyard.trial import open_trial, open_trial_data

    p = trial.planned
    if trial.frozen is not None:
        completed = open_trial(trial.frozen, p.run_dir, p.overrides).completed
    else:
        seed = p.values.get("seed", p.template.value("seed"))
        completed = open_trial_data(trial.data, p.run_dir, p.overrides, trial.text, seed)
    if completed:
        print(f"trainyard: {p.run_dir} already completed; not submitted again")
        return False
    return True


def _record(job: Any, backend: str, job_id: str, trials: list[Path],
            sent_at: float | None = None) -> dict[str, Any]:  # fmt: skip
    record = {
        "backend": backend,
        "job_id": job_id,
        "trials": [str(t) for t in trials],
        "log_dir": str(job.log_dir),
        "time": time.time() if sent_at is None else sent_at,  # when it was sent
    }
    path = Path(job.log_dir) / SUBMISSION
    history = json.loads(path.read_text()) if path.exists() else []
    write_json(path, [*history, record])
    print(f"trainyard: submitted {len(trials)} trial(s) to {backend} as job {job_id}")
    return record
