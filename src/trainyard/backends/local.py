"""This machine: the prepared trials train one after another in a background process.

``trainyard-train`` itself trains in the foreground and never goes through here; this
backend is what ``trainyard submit cluster=local`` uses, so the CLI and ``make submit``
treat every cluster alike. The job id is the background process's id; it leads a process
group of its own, which ``cancel`` signals (SIGTERM: the trial in training is preempted
at a step boundary and resumes when submitted again).
"""

from __future__ import annotations

import contextlib
import os
import shlex
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from trainyard.backends.base import Backend, Job


@dataclass
class LocalRequest:
    argv: list[str]
    log_file: Path

    def __str__(self) -> str:
        return f"{shlex.join(self.argv)} > {shlex.quote(str(self.log_file))} 2>&1 &"


class LocalBackend(Backend):
    name = "local"

    def render(self, job: Job) -> list[LocalRequest]:
        log_dir = job.log_dir or job.trials[0].parent
        argv = [sys.executable, "-m", "trainyard.backends.local", *map(str, job.trials)]
        return [LocalRequest(argv, log_dir / "local.out")]

    def check(self, request: LocalRequest) -> None:
        """Nothing to ask: the machine itself is checked where the trials start."""

    def submit(self, request: LocalRequest) -> str:
        request.log_file.parent.mkdir(parents=True, exist_ok=True)
        with open(request.log_file, "ab") as log:
            proc = subprocess.Popen(
                request.argv, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )
        return str(proc.pid)

    def status(self, job_id: str) -> dict[str, str]:
        try:
            os.kill(int(job_id), 0)
        except ProcessLookupError:
            return {job_id: "ENDED"}
        return {job_id: "RUNNING"}

    def logs(self, job_id: str, log_dir: Path | None = None) -> str:
        log = (log_dir or Path.cwd()) / "local.out"
        return log.read_text() if log.exists() else ""

    def cancel(self, job_id: str, wait_s: float = 60.0) -> None:
        """SIGTERM: the trials checkpoint and stop. Returns once the job has ended (there is
        no scheduler to ask later), so a resubmission right after resumes it."""
        with contextlib.suppress(ProcessLookupError):  # already ended
            os.killpg(int(job_id), signal.SIGTERM)
        deadline = time.monotonic() + wait_s
        while self.status(job_id)[job_id] == "RUNNING" and time.monotonic() < deadline:
            time.sleep(0.1)


def main(run_dirs: list[str]) -> int:
    """Train each prepared trial in turn; a stop signal ends the whole job."""
    from trainyard.errors import Stopped, TrainyardError
    from trainyard.train import run_prepared

    worst = 0
    for run_dir in run_dirs:
        try:
            run_prepared(run_dir)
        except Stopped as exc:
            print(f"trainyard: {run_dir}: {exc.render()}", file=sys.stderr)
            return exc.exit_code
        except TrainyardError as exc:
            print(f"trainyard: {run_dir}: {exc.render()}", file=sys.stderr)
            worst = max(worst, exc.exit_code)
    return worst


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
