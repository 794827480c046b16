"""Errors that reach users, and the exit codes they map to.

Every error a user can fix carries the fix in its message. Exit codes let a launcher or a
script tell a bad config (do not retry) from a failed run (maybe retry).
"""

from __future__ import annotations

EXIT_OK = 0
EXIT_CONFIG = 2  # bad input: config, override, missing file. Retrying will not help.
EXIT_FAILED = 3  # training started and failed (a rank died, ...).
# Stopped by a preemption signal (SIGTERM, SIGUSR1/2) after saving last.ckpt at a step
# boundary: "requeue me". 75 is EX_TEMPFAIL from sysexits.h, "try again later".
EXIT_PREEMPTED = 75
EXIT_INTERRUPTED = 130  # Ctrl-C (SIGINT), as a shell reports it: 128 + 2


class TrainyardError(Exception):
    """Base class: an error with a message for users and an exit code."""

    exit_code = EXIT_FAILED

    def __init__(self, message: str, fix: str | None = None):
        self.message = message
        self.fix = fix
        super().__init__(self.render())

    def render(self) -> str:
        return self.message if not self.fix else f"{self.message}\n  fix: {self.fix}"


class ConfigError(TrainyardError):
    """The composed config or an override is wrong; nothing was started."""

    exit_code = EXIT_CONFIG


class DataError(ConfigError):
    """A dataset is missing, partial or unreadable."""


class CheckpointError(ConfigError):
    """A checkpoint or weights file cannot be used; it was left untouched."""


class RunDirError(ConfigError):
    """The run directory cannot be created or is in a state we must not touch."""


class TrialBusy(RunDirError):
    """Another process trains this trial right now; its run directory is not ours to touch."""


class TrainingFailed(TrainyardError):
    """Training started and did not finish (a rank died, a collective timed out, ...)."""

    exit_code = EXIT_FAILED


class Stopped(TrainyardError):
    """Training stopped on request at a step boundary; ``last.ckpt`` holds that step."""

    state = "preempted"
    step: int | None = None  # the optimizer step saved in last.ckpt, when known


class Preempted(Stopped):
    """A preemption signal: the backend requeues the trial, which resumes from last.ckpt."""

    exit_code = EXIT_PREEMPTED
    state = "preempted"


class Interrupted(Stopped):
    """Ctrl-C: the user stopped the run; running it again resumes it."""

    exit_code = EXIT_INTERRUPTED
    state = "interrupted"


class InterruptNow(BaseException):
    """A second Ctrl-C: stop immediately, without waiting for a step boundary.

    A BaseException (like KeyboardInterrupt, but not one: Lightning turns KeyboardInterrupt
    into ``sys.exit(1)``) so that no ``except Exception`` on the way swallows it.
    """
