"""The driver of a Ray submission (the Ray job's entrypoint): each prepared trial becomes a
Ray task holding the CPUs and GPUs its ranks need, at most ``--max-concurrent`` at a time;
a free worker takes the next trial as soon as one ends, and keeps its imports from one
trial to the next.

- A worker that dies (killed, OOM, node lost) is Ray's to retry (``--max-retries``): the
  trial resumes from ``last.ckpt`` in another worker.
- A trial preempted by its worker's SIGTERM is queued again, unless it keeps stopping
  without a new step (:func:`trainyard.rundir.stuck_attempts`).
- SIGTERM to the driver (``trainyard cancel``, ``ray job stop``) asks every running trial to
  checkpoint and stop, and sends no more; they resume when submitted again.

Exit code: 0 when every trial completed, else the worst trial's (2 bad input, 3 failed,
75 stopped).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import signal
import sys
import time
import traceback
from collections import deque
from pathlib import Path
from typing import Any

from trainyard import signals

log = logging.getLogger("trainyard")

_HANDLED = (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2)


def infeasible(nodes: list[dict[str, float]], cpus: float, gpus: float) -> str | None:
    """Why no node of ``nodes`` (their total resources) can hold a trial, or None."""
    if any(n.get("CPU", 0) >= cpus and n.get("GPU", 0) >= gpus for n in nodes):
        return None
    if not nodes:
        return "the cluster has no live node (its head's processes died? ray status tells)"
    most = max(nodes, key=lambda n: (n.get("GPU", 0), n.get("CPU", 0)), default={})
    return (
        f"each trial needs {cpus:g} CPU(s) and {gpus:g} GPU(s) on one node; the largest of "
        f"the {len(nodes)} node(s) has {most.get('CPU', 0):g} CPU(s) and "
        f"{most.get('GPU', 0):g} GPU(s)"
    )


def run_trial(run_dir: str) -> dict[str, Any]:
    """Train one prepared trial in this worker (a Ray task). Outcomes are returned, not
    raised: an error of the trial is final, and only a dead worker is Ray's to retry.
    The worker's signal handlers and signal mask are Ray's again afterwards."""
    from trainyard.errors import EXIT_FAILED, EXIT_PREEMPTED, Stopped, TrainyardError, TrialBusy
    from trainyard.train import run_prepared

    saved = {s: signal.getsignal(s) for s in _HANDLED}
    mask = signal.pthread_sigmask(signal.SIG_BLOCK, ())  # unchanged: only read
    signals.reset()
    try:
        return {"state": "completed", "value": run_prepared(run_dir)}
    except Stopped as exc:
        return {"state": exc.state, "error": exc.message, "exit_code": exc.exit_code}
    except TrialBusy as exc:  # another process trains it: its state is that one's to write
        return {"state": "busy", "error": exc.message, "exit_code": EXIT_PREEMPTED}
    except TrainyardError as exc:
        _failed(run_dir, exc.message, exc.exit_code)
        return {"state": "failed", "error": exc.message, "exit_code": exc.exit_code}
    except Exception as exc:
        traceback.print_exc()
        message = f"{type(exc).__name__}: {exc}"
        _failed(run_dir, message, EXIT_FAILED)
        return {"state": "failed", "error": message, "exit_code": EXIT_FAILED}
    finally:
        for signum, handler in saved.items():
            signal.signal(signum, handler)
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)
        signals.reset()


def _failed(run_dir: str, message: str, code: int) -> None:
    """Record a failure that happened before training recorded one (a refused machine)."""
    from trainyard.rundir import RunDir

    run = RunDir(run_dir)
    if run.state not in ("failed", "completed"):
        run.transition("failed", error=message, exit_code=code)


class Driver:
    """Keeps up to ``cap`` trials training and collects their outcomes."""

    def __init__(self, task: Any, options: dict[str, Any], trials: list[str], cap: int,
                 max_requeues: int = 3):  # fmt: skip
        self.task, self.options = task, options  # a remote function and its resources
        self.cap, self.max_requeues = cap, max_requeues
        self.queue: deque[str] = deque(trials)
        self.running: dict[Any, str] = {}
        self.outcomes: dict[str, dict[str, Any]] = {}
        self.stopping = False

    def stop(self, signum: int, frame: Any) -> None:
        """SIGTERM/SIGINT: checkpoint and stop every running trial, start no more."""
        import ray

        if self.stopping:
            return
        self.stopping = True
        print(f"trainyard: {signal.Signals(signum).name}: stopping {len(self.running)} "
              f"running trial(s); {len(self.queue)} not started", flush=True)  # fmt: skip
        for ref in self.running:
            ray.cancel(ref)  # SIGINT in the worker: a step-boundary checkpoint, then stop

    def run(self) -> int:
        import ray

        while self.running or (self.queue and not self.stopping):
            while self.queue and not self.stopping and len(self.running) < self.cap:
                trial = self.queue.popleft()
                name = f"trainyard-trial:{Path(trial).name}"
                ref = self.task.options(name=name, **self.options).remote(trial)
                self.running[ref] = trial
            done, _ = ray.wait(list(self.running), num_returns=1, timeout=1.0)
            for ref in done:
                self._settle(ref, self.running.pop(ref))
        return self.exit_code()

    def _settle(self, ref: Any, trial: str) -> None:
        import ray
        from ray.exceptions import RayError, TaskCancelledError

        from trainyard.rundir import RunDir, stuck_attempts

        try:
            outcome = ray.get(ref)
        except TaskCancelledError:  # stopped before it started: nothing to record
            outcome = {"state": "interrupted", "error": "stopped before it started"}
        except RayError as exc:  # the worker died more often than max_retries allows
            first = str(exc).strip().splitlines()[0]
            message = f"its Ray worker died (retries exhausted): {first}"
            _failed(trial, message, 3)
            outcome = {"state": "failed", "error": message, "exit_code": 3}
        if outcome["state"] == "preempted" and not self.stopping:
            history = RunDir(trial).status().get("history", [])
            if stuck_attempts(history) < self.max_requeues:
                print(f"trainyard: {trial}: preempted; queued again", flush=True)
                self.queue.append(trial)
                return
        self.outcomes[trial] = outcome
        detail = outcome.get("value") if outcome["state"] == "completed" else outcome.get("error")
        print(f"trainyard: {trial}: {outcome['state']} ({detail})", flush=True)

    def exit_code(self) -> int:
        from trainyard.errors import EXIT_CONFIG, EXIT_FAILED, EXIT_PREEMPTED

        codes = {o.get("exit_code", EXIT_FAILED) for o in self.outcomes.values()
                 if o["state"] != "completed"}  # fmt: skip
        if self.stopping or self.queue:
            return EXIT_PREEMPTED
        if not codes:
            return 0
        return EXIT_CONFIG if codes == {EXIT_CONFIG} else max(codes)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m trainyard.backends.ray_driver")
    parser.add_argument("trials_file", type=Path)
    parser.add_argument("--cpus", type=float, default=1.0)
    parser.add_argument("--gpus", type=float, default=0.0)
    parser.add_argument("--max-retries", type=int, default=3)
    parser.add_argument("--max-concurrent", type=int, default=0)
    parser.add_argument("--max-requeues", type=int, default=3)
    args = parser.parse_args(argv)
    trials = json.loads(args.trials_file.read_text())["trials"]

    import ray

    started = time.monotonic()
    ray.init(address="auto", log_to_driver=True, logging_level=logging.WARNING)
    problem = infeasible([n["Resources"] for n in ray.nodes() if n["Alive"]], args.cpus, args.gpus)
    if problem:
        from trainyard.errors import EXIT_CONFIG

        for trial in trials:
            _failed(trial, f"the Ray cluster cannot hold it: {problem}", EXIT_CONFIG)
        print(f"trainyard: {problem}", file=sys.stderr)
        return EXIT_CONFIG
    options = {"num_cpus": args.cpus, "num_gpus": args.gpus, "max_retries": args.max_retries,
               "retry_exceptions": False}  # fmt: skip
    if not args.gpus:
        # a task given no GPUs must use none: Ray leaves CUDA_VISIBLE_DEVICES alone for
        # such tasks, and `accelerator: auto` would take GPUs Ray gave to other trials
        options["runtime_env"] = {"env_vars": {"CUDA_VISIBLE_DEVICES": ""}}
    # a GPU trial gets a fresh worker: a reused one would keep the last trial's CUDA
    # context and memory, on the GPU Ray gave that trial (Ray's own default for GPU tasks,
    # which it applies only to functions declared with num_gpus)
    task = ray.remote(max_calls=1 if args.gpus else 0)(run_trial)
    cap = args.max_concurrent or len(trials)
    driver = Driver(task, options, trials, cap, args.max_requeues)
    signals.route((signal.SIGTERM, signal.SIGINT), driver.stop)
    code = driver.run()
    done = sum(o["state"] == "completed" for o in driver.outcomes.values())
    print(f"trainyard: {done}/{len(trials)} trial(s) completed in "
          f"{time.monotonic() - started:.1f} s", flush=True)  # fmt: skip
    with contextlib.suppress(Exception):
        ray.shutdown()
    return code


if __name__ == "__main__":
    sys.exit(main())
