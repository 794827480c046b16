"""What runs in every srun task of a trainyard Slurm job: one rank of one trial.

submitit's job script starts ``python -u -m submitit.core._submit <folder>`` as one srun
task per device on every node; each unpickles :class:`SlurmTrial` and calls it with the
trial's run directory. Nothing is composed or parsed here: the rank loads the frozen
``config.yaml`` (compose once), and Lightning reads the Slurm environment and launches
nothing.

Requeueing has one owner per cause:

- the time limit: Slurm sends submitit's warning signal (USR2, ``cluster.signal_delay_s``
  before the limit) to every task; the ranks checkpoint at a step boundary and rank 0
  requeues this array task (``scontrol requeue``), unless the last attempts made no
  progress (``cluster.max_requeues_without_progress``);
- preemption and ``scontrol requeue``: Slurm sends SIGTERM, the ranks checkpoint the same
  way within KillWait and Slurm requeues the job itself; trainyard requeues nothing (the
  same SIGTERM comes from ``scancel``, which must stay cancelled).

submitit's own handler of the warning signal is active only until training installs
trainyard's (while Python imports): there a warning requeues through submitit's
``checkpoint`` protocol, which resubmits this same callable.
"""

from __future__ import annotations

import logging
import subprocess
from pathlib import Path
from typing import Any

log = logging.getLogger("trainyard")


class SlurmTrial:
    """The callable submitit runs in every task; ``run_dir`` holds the frozen config."""

    def __call__(self, run_dir: str) -> dict[str, Any] | None:
        from trainyard import worker
        from trainyard.errors import EXIT_FAILED, EXIT_PREEMPTED
        from trainyard.rundir import RunDir, read_json

        run = RunDir(Path(run_dir))
        code = worker.run_rank_code(str(run.config))
        rank = worker.global_rank()
        if code == 0:
            worker.leave_process_group()
            return read_json(run.result_file) if rank == 0 else None
        if code == EXIT_PREEMPTED and rank == 0 and self._requeue_after_warning(run) is False:
            code = EXIT_FAILED  # stuck: recorded as failed, not requeued
        # the other ranks did their part of last.ckpt (saving is collective); leaving with
        # 0 keeps srun's --kill-on-bad-exit from killing rank 0 before it records the stop
        worker.exit_now(0 if code == EXIT_PREEMPTED and rank != 0 else code)
        return None

    def checkpoint(self, run_dir: str) -> Any:
        """submitit's requeue protocol: the same trial again (it resumes from last.ckpt)."""
        import submitit

        return submitit.helpers.DelayedSubmission(self, run_dir)

    @staticmethod
    def _requeue_after_warning(run) -> bool | None:
        """Requeue after the time-limit warning (True); None when Slurm decides (SIGTERM:
        preemption, requeue or cancel); False when the trial is stuck (marked failed)."""
        import submitit

        from trainyard import signals
        from trainyard.rundir import stuck_attempts

        request = signals.requested()  # the signal all ranks agreed on
        warning = "SIG" + submitit.JobEnvironment.USR_SIG
        if request is None or request.signal != warning or "SIGTERM" in signals.received():
            return None
        job = submitit.JobEnvironment().job_id  # 12_3 for an array task
        if _job_state(job) not in ("RUNNING", None):  # cancelled meanwhile: it stays so
            return None
        stuck = stuck_attempts(run.status().get("history", []))
        limit = _cluster_setting(run, "max_requeues_without_progress", 3)
        if stuck > int(limit):
            message = f"preempted {stuck} times in a row without training a step; not requeued"
            run.transition("failed", error=message, exit_code=3)
            return False
        done = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True)
        if done.returncode:
            log.error("trainyard: scontrol requeue %s failed: %s", job, done.stderr.strip())
        return True


def _job_state(job: str) -> str | None:
    """The controller's JobState of ``job`` (None when it cannot say)."""
    out = subprocess.run(["scontrol", "show", "job", "-o", job], capture_output=True, text=True)
    for token in out.stdout.split():
        if token.startswith("JobState="):
            return token.split("=", 1)[1]
    return None


def _cluster_setting(run, key: str, default: Any) -> Any:
    import yaml

    cfg = yaml.safe_load(Path(run.config).read_text()) or {}
    value = (cfg.get("cluster") or {}).get(key)
    return default if value is None else value


__all__ = ["SlurmTrial"]
