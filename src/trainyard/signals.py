"""One preemption story for every backend: what a process does when it is told to stop.

Schedulers warn before they kill: Kubernetes and Ray send SIGTERM, Slurm sends SIGTERM at
the time limit and the signal chosen with ``--signal`` (SIGUSR1/SIGUSR2) before it. Which
signals mean "preempted" is configurable (``signals.preempt``); each of them only *asks*
for a stop. Training notices the request at the next step boundary (see
:class:`trainyard.callbacks.resume.ResumeCheckpoint`), every rank at the same step, writes
``last.ckpt`` atomically, marks the trial ``preempted`` and exits with
:data:`~trainyard.errors.EXIT_PREEMPTED` so the backend requeues it; the next attempt resumes
from that checkpoint.

Ctrl-C (SIGINT) is the same stop, recorded as ``interrupted`` and exiting with 130; a second
Ctrl-C stops at once (:class:`~trainyard.errors.InterruptNow`), keeping the last checkpoint.

Nothing here touches torch: the handlers only record the request, which is all a signal
handler can safely do while the main thread may be inside a collective.
"""

from __future__ import annotations

import atexit
import signal
from collections.abc import Iterable
from dataclasses import dataclass

from trainyard.errors import ConfigError, Interrupted, InterruptNow, Preempted, Stopped

DEFAULT_PREEMPT = ("SIGTERM", "SIGUSR1", "SIGUSR2")


@dataclass(frozen=True)
class StopRequest:
    reason: str  # "preempted" or "interrupted"
    signal: str

    def error(self, where: str) -> Stopped:
        cls = Interrupted if self.reason == "interrupted" else Preempted
        # a requeued job resumes by itself; by hand, the same command is all it takes
        again = "running the same command again resumes from there"
        return cls(f"{self.signal} received: stopped {where}; {again}")


_request: StopRequest | None = None
_received: set[str] = set()  # every stop signal this process got, not only the first
_routed: set[int] = set()  # stop signals routed to a handler here: ignored at exit (_settle)


def parse(names: Iterable[str]) -> list[signal.Signals]:
    """Signal names from the config (``SIGUSR1`` or ``USR1``), refused when unknown."""
    out = []
    for name in names:
        text = str(name).upper()
        text = text if text.startswith("SIG") else f"SIG{text}"
        if text in ("SIGINT", "SIGKILL", "SIGSTOP") or not hasattr(signal.Signals, text):
            raise ConfigError(
                f"signals.preempt: {name!r} is not a signal trainyard can handle",
                fix="signals.preempt=[SIGTERM,SIGUSR1,SIGUSR2] (SIGINT is always Ctrl-C)",
            )
        out.append(signal.Signals[text])
    return out


def install(preempt: Iterable[str] = DEFAULT_PREEMPT) -> None:
    """Route the preemption signals and SIGINT to the stop request. Idempotent."""
    route(parse(preempt), _on_preempt)
    route([signal.SIGINT], _on_interrupt)


def _settle() -> None:
    """At exit (atexit, before Python's shutdown proper): what the process did is recorded,
    so a stop signal from here on has nothing left to stop; it is ignored, and the exit
    code stays the one the work earned.

    Python restores the default action of the signals it handles right after the exit
    handlers, before it tears down its modules (about a second after a torch run): a
    scheduler's SIGTERM there ended a completed trial with 143, which Slurm and Kubernetes
    read as killed. SIGINT keeps its default, so a shutdown that hangs can be interrupted.
    (Ranks and pods leave with ``os._exit``, which has no such second.)
    """
    for signum in _routed:
        signal.signal(signum, signal.SIG_IGN)


def route(signums: Iterable[int], handler) -> None:
    """Send ``signums`` to ``handler``, and let them through. A signal mask survives fork
    and exec and Python keeps the one it starts with: a launcher that blocked SIGUSR1 would
    leave Slurm's warning pending until the kill at the time limit. The handler is in place
    first, so a signal that arrived while blocked reaches it now."""
    signums = set(signums)
    for signum in signums:
        signal.signal(signum, handler)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, signums)
    if not _routed:
        atexit.register(_settle)
    _routed.update(signums - {signal.SIGINT})


def _on_preempt(signum: int, frame) -> None:
    global _request
    _received.add(signal.Signals(signum).name)
    if _request is None:
        _request = StopRequest("preempted", signal.Signals(signum).name)


def _on_interrupt(signum: int, frame) -> None:
    global _request
    if _request is not None and _request.reason == "interrupted":
        raise InterruptNow()
    _request = StopRequest("interrupted", "SIGINT")


def requested() -> StopRequest | None:
    """The pending stop request of this process, if any."""
    return _request


def request(reason: str, signame: str) -> None:
    """Record a stop request as a handler would (used when a rank learns of another's)."""
    global _request
    if _request is None:
        _request = StopRequest(reason, signame)


def override(reason: str, signame: str) -> None:
    """Replace the request with the one all ranks agreed on."""
    global _request
    _request = StopRequest(reason, signame)


def received() -> set[str]:
    """The names of every stop signal this process received."""
    return set(_received)


def number(name: str) -> int:
    """A signal's number from its name (0 when the name is no signal's)."""
    try:
        return int(signal.Signals[name])
    except KeyError:
        return 0


def raise_if_requested(where: str, step: int | None = None) -> None:
    """Raise the pending stop; ``step``: the optimizer step ``last.ckpt`` holds, which a
    backend compares between attempts to tell a stuck trial from a progressing one."""
    if _request is not None:
        error = _request.error(where)
        error.step = step
        raise error


def reset() -> None:
    """Forget a request (tests, and long-lived workers between trials)."""
    global _request
    _request = None
    _received.clear()
