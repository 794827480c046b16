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
import sys
import traceback
import uuid
from multiprocessing.connection import wait
from pathlib import Path

from trainyard import signals
from trainyard.errors import (
    EXIT_FAILED,
    EXIT_INTERRUPTED,
    EXIT_PREEMPTED,
    Interrupted,
    InterruptNow,
    Preempted,
    TrainingFailed,
    TrainyardError,
)
from trainyard.rundir import RunDir, read_json, write_json

_STOP_CODES = {EXIT_PREEMPTED: Preempted, EXIT_INTERRUPTED: Interrupted}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _die_with_parent() -> None:
    # not Linux (no libc.so.6): the parent's kill on failure still applies
    with contextlib.suppress(OSError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def _rank_main(config_path: str, env: dict[str, str]) -> None:
    """Runs in each rank: train, and leave a typed error file behind on failure."""
    os.setpgid(0, 0)  # signals reach the ranks only through the parent
    _die_with_parent()
    os.environ.update(env)
    from trainyard.worker import run_rank

    rank = int(env["RANK"])
    code = EXIT_FAILED
    try:
        run_rank(config_path)
        code = 0
    except TrainyardError as exc:
        if not isinstance(exc, Preempted | Interrupted):
            _error_file(config_path, rank, type(exc).__name__, exc.render(), exc.exit_code)
        code = exc.exit_code
    except InterruptNow:
        code = EXIT_INTERRUPTED
    except Exception as exc:
        traceback.print_exc()
        _error_file(config_path, rank, type(exc).__name__, f"{type(exc).__name__}: {exc}", 3)
    finally:
        _exit(code)


def _exit(code: int) -> None:
    """Leave without running interpreter teardown: gloo's threads can abort the process
    (``terminate called without an active exception``) when destructors run at exit, which
    would turn a finished rank into a failed one. Everything worth keeping is on disk."""
    with contextlib.suppress(Exception):
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _error_file(config_path: str, rank: int, kind: str, message: str, code: int) -> None:
    run = RunDir(Path(config_path).parent)
    info = {"type": kind, "message": message, "exit_code": code}
    write_json(run.ranks / f"rank{rank}.error.json", info)


def _rank_env(rank: int, nproc: int, port: int, run_id: str) -> dict[str, str]:
    return {
        "RANK": str(rank), "LOCAL_RANK": str(rank), "GROUP_RANK": "0", "ROLE_RANK": str(rank),
        "WORLD_SIZE": str(nproc), "LOCAL_WORLD_SIZE": str(nproc), "ROLE_WORLD_SIZE": str(nproc),
        "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "TORCHELASTIC_RUN_ID": run_id,
    }  # fmt: skip


def launch_local(config_path: Path, nproc: int, preempt: list[str]) -> float | None:
    """Run ``nproc`` ranks of the trial on this node; return rank 0's metric."""
    run = RunDir(config_path.parent)
    port, run_id = _free_port(), f"trainyard-{uuid.uuid4().hex[:12]}"
    context = multiprocessing.get_context("spawn")
    procs = [
        context.Process(
            target=_rank_main,
            args=(str(config_path), _rank_env(rank, nproc, port, run_id)),
            name=f"trainyard-rank{rank}",
        )
        for rank in range(nproc)
    ]
    forwarded = _forward_signals(procs, preempt)
    try:
        for proc in procs:
            proc.start()
        failed = _supervise(procs)
    finally:
        for signum, handler in forwarded.items():
            signal.signal(signum, handler)
        for proc in procs:
            if proc.is_alive():
                proc.kill()
            proc.join()
    return _outcome(run, procs, failed)


def _forward_signals(procs, preempt: list[str]) -> dict:
    """Pass stop signals on to the ranks (and remember them here, for the exit code)."""
    previous = {}

    def forward(signum, frame):
        (signals._on_interrupt if signum == signal.SIGINT else signals._on_preempt)(signum, frame)
        for proc in procs:
            if proc.pid is not None and proc.exitcode is None:
                os.kill(proc.pid, signum)

    for signum in [*signals.parse(preempt), signal.SIGINT]:
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


def _outcome(run: RunDir, procs, failed: int | None) -> float | None:
    codes = [proc.exitcode for proc in procs]
    if failed is not None:
        raise _describe_failure(run, procs, failed)
    for code, error in _STOP_CODES.items():
        if code in codes:
            request = signals.requested()
            raise error(f"{request.signal if request else 'a signal'} received: ranks stopped")
    return read_json(run.result_file).get("value") if run.result_file.exists() else None


def _describe_failure(run: RunDir, procs, first: int) -> TrainyardError:
    """One message naming the rank that failed first and its cause."""
    proc, error_file = procs[first], run.ranks / f"rank{first}.error.json"
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
