"""``hydra/launcher=trainyard``: a sweep (``-m``) sent to the backend that ``cluster=`` names.

A thin adapter: Hydra composes each trial's config (its sweeper chose the overrides), the
trial gets the run directory Hydra's ``sweep.dir``/``sweep.subdir`` name, and
:func:`trainyard.submit.submit_planned` checks, freezes and sends them all, as
``trainyard submit`` does (on Slurm: one array). The launcher then waits for the trials and
returns each one's metric to the sweeper (NaN for a failed trial, which the sweep's summary
lists at the end). ``cluster=slurm`` selects this launcher; heavy imports stay inside the
methods so that plugin discovery remains fast.
"""

# no `from __future__ import annotations`: Hydra imports plugin modules without putting
# them in sys.modules, and dataclasses then cannot resolve string annotations
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from hydra._internal.core_plugins.basic_launcher import BasicLauncher
from hydra.core.config_store import ConfigStore
from hydra.core.utils import JobReturn, JobStatus
from omegaconf import open_dict

log = logging.getLogger("trainyard")

# trial states that end a wait; a preempted trial is requeued by the scheduler
_DONE = ("completed", "failed", "interrupted")
# scheduler states after which nothing more will happen to a task
_GONE = ("CANCELLED", "FAILED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "COMPLETED", "ENDED")


@dataclass
class TrainyardLauncherConf:
    _target_: str = "hydra_plugins.trainyard.launcher.TrainyardLauncher"
    # wait for the trials and hand their metrics to the sweeper; false: submit and return
    wait: bool = True
    poll_s: float = 2.0  # how often to look at the run directories and the scheduler


ConfigStore.instance().store(group="hydra/launcher", name="trainyard", node=TrainyardLauncherConf)


class TrainyardLauncher(BasicLauncher):
    """With ``cluster=local`` Hydra's basic launcher (each trial in this process, its ranks
    started by trainyard); with any other backend, the trials go to that backend."""

    def __init__(self, wait: bool = True, poll_s: float = 2.0) -> None:
        super().__init__()
        self.wait, self.poll_s = wait, poll_s

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> list:
        from omegaconf import OmegaConf

        backend = OmegaConf.select(self.config, "cluster.backend", default="local")
        if backend == "local":
            return super().launch(job_overrides, initial_job_idx)
        return self._launch_to(job_overrides, initial_job_idx)

    def _launch_to(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> list:
        from trainyard import signals
        from trainyard.errors import TrainyardError
        from trainyard.submit import submit_planned

        planned, failed = [], {}
        for index, overrides in enumerate(job_overrides):
            try:
                planned.append(self._plan(list(overrides), initial_job_idx + index))
            except TrainyardError as exc:  # this trial cannot even be composed
                failed[index] = exc
        signals.install()
        records = submit_planned(planned) if planned else []
        if self.wait:
            self._wait(records)
        return self._returns(job_overrides, planned, failed)

    def _plan(self, overrides: list[str], job_num: int):
        from hydra.core.hydra_config import HydraConfig

        from trainyard.submit import Planned

        sweep = self.hydra_context.config_loader.load_sweep_config(self.config, overrides)
        with open_dict(sweep.hydra.job):
            sweep.hydra.job.num = job_num
        HydraConfig.instance().set_config(sweep)  # resolves ${hydra:...} for this trial
        run_dir = Path(str(sweep.hydra.sweep.dir)) / str(sweep.hydra.sweep.subdir)
        with open_dict(sweep):
            del sweep["hydra"]
        sweep.paths.run_dir = str(run_dir)
        return Planned(overrides, sweep, run_dir)

    def _wait(self, records: list[dict]) -> None:
        from trainyard import backends, signals
        from trainyard.rundir import RunDir

        while True:
            pending = []
            for record in records:
                scheduler = backends.get(record["backend"]).status(record["job_id"])
                gone = scheduler and all(s.split()[0] in _GONE for s in scheduler.values())
                if not gone:
                    pending += [t for t in record["trials"] if RunDir(t).state not in _DONE]
            if not pending:
                return
            request = signals.requested()
            if request is not None:  # the driver was stopped: the trials stay queued
                raise request.error(f"while waiting for {len(pending)} trial(s)")
            time.sleep(self.poll_s)

    def _returns(self, job_overrides, planned, failed) -> list[JobReturn]:
        from trainyard import train
        from trainyard.rundir import RunDir, read_json

        by_overrides = {tuple(p.overrides): p for p in planned}
        returns = []
        for index, overrides in enumerate(job_overrides):
            ret = JobReturn(overrides=list(overrides), status=JobStatus.COMPLETED)
            trial = by_overrides.get(tuple(overrides))
            run = RunDir(trial.run_dir) if trial else None
            if index in failed or run is None or not run.result_file.exists():
                reason = failed.get(index) or (run and run.status()["history"][-1].get("error"))
                where = str(run.root) if run else " ".join(overrides)
                train._failed_trials.append((where, str(reason or "did not complete"), 3))
                ret.return_value = float("nan")
            else:
                ret.return_value = read_json(run.result_file).get("value")
                ret.working_dir = str(run.root)
            returns.append(ret)
        log.info("%d trial(s) done", len(returns))
        return returns


__all__ = ["TrainyardLauncher", "TrainyardLauncherConf"]
