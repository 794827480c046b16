"""Errors that reach users, and the exit codes they map to.

Every error a user can fix carries the fix in its message. Exit codes let a launcher or a
script tell a bad config (do not retry) from a failed run (maybe retry).
"""

from __future__ import annotations

EXIT_OK = 0
EXIT_CONFIG = 2  # bad input: config, override, missing file. Retrying will not help.
EXIT_FAILED = 3  # training started and failed (a rank died, ...).


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


class TrainingFailed(TrainyardError):
    """Training started and did not finish (a rank died, a collective timed out, ...)."""

    exit_code = EXIT_FAILED
