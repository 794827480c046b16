"""Start the ranks of one trial on this machine, and stop them as one.

Lightning's own DDP launcher re-executes the Hydra script once per rank; under ``-m`` the
children re-run the whole sweep, and with a sampler they silently train other
hyperparameters than rank 0. trainyard instead starts one process per device on a
function that reads the frozen config, with the environment torchrun would give it:
Lightning sees a torchelastic launch and relaunches nothing.

This process stays the parent of the ranks and speaks for them:

- a preemption signal or Ctrl-C sent to it is forwarded to every rank, which stop together
  at a step boundary after saving ``last.ckpt`` (:mod:`trainyard.signals`); it then exits
  with their code (preempted: 75, interrupted: 130);
- when a rank fails, the others are killed at once (they would otherwise wait in a
  collective until ``dist.timeout_s``), and the failure is reported naming the rank;
- the ranks run in their own process group and die with this process (PR_SET_PDEATHSIG),
  so no rank outlives the run, whatever ends it.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import multiprocessing
import os
import signal
import socket
import uuid
from dataclasses import dataclass
from multiprocessing.connection import wait
from pathlib import Path

from trainyard import signals
from trainyard.errors import (
    EXIT_FAILED,
    EXIT_INTERRUPTED,
    EXIT_PREEMPTED,
    Interrupted,
    Preempted,
    TrainingFailed,
    TrainyardError,
)
from trainyard.rundir import RunDir, read_json

_STOP_CODES = {EXIT_PREEMPTED: Preempted, EXIT_INTERRUPTED: Interrupted}


def free_port() -> int:
    """A TCP port free on this machine's loopback now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _die_with_parent() -> None:
    # not Linux (no libc.so.6): the parent's kill on failure still applies
    with contextlib.suppress(OSError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def _rank_main(config_path: str, env: dict[str, str], preempt: list[str]) -> None:
    """Runs in each rank: train, and leave a typed error file behind on failure."""
    os.setpgid(0, 0)  # signals reach the ranks only through the parent
    _die_with_parent()
    # The parent started this process with the stop signals blocked: a signal sent while
    # it was starting waited here, and install() lets it through to trainyard's handler
    # once that is in place, not to the default one.
    signals.install(preempt)
    os.environ.update(env)
    from trainyard.worker import run_rank_and_exit

    run_rank_and_exit(config_path, report_stop=False)  # the launcher reports a stop


@dataclass(frozen=True)
class Placement:
    """Where this machine's ranks sit in the group: node ``node_rank`` of ``nnodes``, with
    rank 0 listening at ``master_addr:master_port`` (a Kubernetes pod of an Indexed Job).
    The default is a group of this machine alone, on a free loopback port."""

    node_rank: int = 0
    nnodes: int = 1
    master_addr: str = "127.0.0.1"
    master_port: int | None = None  # None: a free port on this machine
    run_id: str | None = None  # the same on every node of one launch


def _rank_env(local: int, nproc: int, where: Placement, port: int, run_id: str) -> dict[str, str]:
    rank, world = where.node_rank * nproc + local, where.nnodes * nproc
    return {
        "RANK": str(rank), "LOCAL_RANK": str(local), "GROUP_RANK": str(where.node_rank),
        "ROLE_RANK": str(rank), "WORLD_SIZE": str(world), "LOCAL_WORLD_SIZE": str(nproc),
        "ROLE_WORLD_SIZE": str(world), "GROUP_WORLD_SIZE": str(where.nnodes),
        "MASTER_ADDR": where.master_addr, "MASTER_PORT": str(port), "TORCHELASTIC_RUN_ID": run_id,
    }  # fmt: skip


def _stop_signals(preempt: list[str]) -> set[signal.Signals]:
    return {*signals.parse(preempt), signal.SIGINT}


def launch_local(
    config_path: Path, nproc: int, preempt: list[str], where: Placement | None = None
) -> float | None:
    """Run ``nproc`` ranks of the trial on this node; return rank 0's metric (None on a
    node other than the first, which has no rank 0)."""
    where = where or Placement()
    run = RunDir(config_path.parent)
    port = where.master_port or free_port()
    run_id = where.run_id or f"trainyard-{uuid.uuid4().hex[:12]}"
    context = multiprocessing.get_context("spawn")
    procs = [
        context.Process(
            target=_rank_main,
            args=(str(config_path), _rank_env(local, nproc, where, port, run_id), preempt),
            name=f"trainyard-rank{where.node_rank * nproc + local}",
        )
        for local in range(nproc)
    ]
    forwarded = _forward_signals(procs, preempt)
    try:
        _start(procs, preempt)
        failed = _supervise(procs)
    finally:
        for signum, handler in forwarded.items():
            signal.signal(signum, handler)
        for proc in procs:
            if proc.is_alive():
                proc.kill()
            proc.join()
    if where.node_rank and failed is None and all(p.exitcode == 0 for p in procs):
        return None  # rank 0, on the first node, records the result
    return _outcome(run, procs, failed, where.node_rank * nproc)


def _start(procs, preempt: list[str]) -> None:
    """Start the ranks with the stop signals blocked (the children inherit the mask and
    unblock once their handlers are in place), then pass on a stop requested meanwhile."""
    stop = _stop_signals(preempt)
    signal.pthread_sigmask(signal.SIG_BLOCK, stop)
    try:
        for proc in procs:
            proc.start()
    finally:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, stop)  # pending ones are handled here
    request = signals.requested()
    if request is not None:
        _send(procs, signal.SIGINT if request.reason == "interrupted" else signal.SIGTERM)


def _send(procs, signum: int) -> None:
    for proc in procs:
        if proc.pid is not None and proc.exitcode is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, signum)


def _forward_signals(procs, preempt: list[str]) -> dict:
    """Pass stop signals on to the ranks (and remember them here, for the exit code)."""
    previous = {}

    def forward(signum, frame):
        _send(procs, signum)  # first: a second Ctrl-C raises in the handler below
        (signals._on_interrupt if signum == signal.SIGINT else signals._on_preempt)(signum, frame)

    for signum in _stop_signals(preempt):
        previous[signum] = signal.signal(signum, forward)
    return previous


def _supervise(procs) -> int | None:
    """Wait for every rank; on the first real failure kill the rest. Returns its rank."""
    pending = {proc.sentinel: rank for rank, proc in enumerate(procs)}
    while pending:
        for sentinel in wait(list(pending), timeout=0.5):
            rank = pending.pop(sentinel)
            procs[rank].join()  # the sentinel can be ready before the exit code is reaped
            code = procs[rank].exitcode
            if code not in (0, *_STOP_CODES) and signals.requested() is None:
                for proc in procs:
                    if proc.exitcode is None:
                        proc.kill()
                return rank
    return None


def _outcome(run: RunDir, procs, failed: int | None, first_rank: int = 0) -> float | None:
    codes = [proc.exitcode for proc in procs]
    if failed is not None:
        raise _describe_failure(run, procs, failed, first_rank)
    for code, error in _STOP_CODES.items():
        if code in codes:
            last = (run.status().get("history") or [{}])[-1]
            request = signals.requested()
            said = f"{request.signal if request else 'a signal'} received: ranks stopped"
            raise error(last.get("reason") or said)
    if run.result_file.exists() and all(code == 0 for code in codes):
        return read_json(run.result_file).get("value")
    request = signals.requested()
    if request is not None:  # the ranks died of the signal before they could handle it
        raise request.error("while the ranks were starting")
    raise TrainingFailed(f"the ranks ended (exit codes {codes}) without a result")


def _describe_failure(run: RunDir, procs, local: int, first_rank: int) -> TrainyardError:
    """One message naming the rank that failed first and its cause."""
    proc, first = procs[local], first_rank + local
    error_file = run.ranks / f"rank{first}.error.json"
    code = EXIT_FAILED
    if error_file.exists():
        info = json.loads(error_file.read_text())
        line, code = f"rank {first}: {info['message']}", info.get("exit_code", code)
    elif proc.exitcode is not None and proc.exitcode < 0:
        name = signal.Signals(-proc.exitcode).name
        line = f"rank {first} (pid {proc.pid}) was killed by {name}"
    else:
        line = f"rank {first} (pid {proc.pid}) exited with code {proc.exitcode}"
    error = TrainingFailed(line)
    error.exit_code = code
    return error
