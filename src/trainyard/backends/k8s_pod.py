"""``trainyard-pod <config.yaml>``: what every pod of a trainyard Job runs.

Pod ``JOB_COMPLETION_INDEX`` is node ``index`` of the trial's DDP group; it starts one rank
per device (``trainer.devices``) with the environment torchrun would give them, so rank
``index * devices + local``, and rank 0 listens at ``MASTER_ADDR`` (``<job>-0.<service>``,
pod 0). Nothing is composed: the config is the frozen one from the trial's ConfigMap.

The first pod installs the trial on the claim the way every launcher does
(:func:`trainyard.trial.open_trial`: a new run directory, or the same trial picked up and
resumed from ``last.ckpt``, or refused when the claim holds another trial there), claims
it and records its states; the other pods wait until the run directory holds this config.

Exit codes are the Job's podFailurePolicy's vocabulary: 0 done, 75 stopped at a step
boundary with ``last.ckpt`` saved (SIGTERM from a deleted, evicted or preempted pod: the
Job replaces the pod and it resumes), 2 bad input (the Job fails: another pod would fail
alike), 3 failed training (counted against ``backoffLimit``: a peer's node may have died).
A trial preempted ``cluster.max_requeues_without_progress`` times in a row without a new
step is failed instead of started again.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import time
import uuid
from pathlib import Path

from trainyard.errors import (
    EXIT_CONFIG,
    EXIT_FAILED,
    ConfigError,
    Preempted,
    Stopped,
    TrainyardError,
    TrialBusy,
)
from trainyard.rundir import RunDir, write_json

USAGE = "usage: trainyard-pod <the trial's frozen config.yaml, from its ConfigMap>"


def placement(cfg, generation: str | None = None) -> tuple[int, object]:
    """(devices on this node, this pod's :class:`~trainyard.launch.Placement`)."""
    from trainyard.launch import Placement

    index = int(os.environ.get("JOB_COMPLETION_INDEX", "0"))
    nodes = int(cfg.trainer.num_nodes)
    if not 0 <= index < nodes:
        raise ConfigError(
            f"JOB_COMPLETION_INDEX={index} but trainer.num_nodes={nodes}",
            fix="completions and parallelism of the Job must equal trainer.num_nodes",
        )
    master = os.environ.get("MASTER_ADDR", "127.0.0.1")
    port = int(os.environ.get("MASTER_PORT", "29500"))
    devices = cfg.trainer.devices if isinstance(cfg.trainer.devices, int) else 1
    return devices, Placement(index, nodes, master, port, run_id=generation)


def run_pod(config_file: Path) -> int:
    from omegaconf import OmegaConf

    from trainyard import signals

    text = config_file.read_text()
    cfg = OmegaConf.create(text)
    signals.install(list(OmegaConf.select(cfg, "signals.preempt", default=signals.DEFAULT_PREEMPT)))
    # one pod per node starts the ranks: preflight's multi-node check must see a launch
    os.environ.setdefault("TORCHELASTIC_RUN_ID", "trainyard-pod")
    run = RunDir(str(cfg.paths.run_dir))
    devices, where = placement(cfg)
    if where.node_rank == 0:
        return _first_pod(cfg, run)
    timeout = float(OmegaConf.select(cfg, "dist.timeout_s", default=300))
    generation = _join(run, where.node_rank, text, timeout)
    if generation is None:
        return 0  # the trial completed
    from trainyard.launch import launch_local

    devices, where = placement(cfg, generation)
    launch_local(run.config, devices, list(cfg.signals.preempt), where)
    return 0


def _first_pod(cfg, run: RunDir) -> int:
    from trainyard import trial
    from trainyard.rundir import stuck_attempts
    from trainyard.train import run_prepared

    opened = trial.open_trial(cfg, run.root, [])
    if opened.completed:
        print(f"trainyard-pod: {run.root} already completed", file=sys.stderr)
        _report(run)  # a sweep asking again gets the result all the same
        return 0
    stuck = stuck_attempts(run.status().get("history", []))
    limit = (cfg.get("cluster") or {}).get("max_requeues_without_progress")
    if stuck > int(3 if limit is None else limit):
        message = f"preempted {stuck} times in a row without training a step; not started again"
        run.transition("failed", error=message, exit_code=EXIT_FAILED)
        print(f"trainyard-pod: {message}", file=sys.stderr)
        return EXIT_FAILED
    generation = uuid.uuid4().hex[:12]
    write_json(_rendezvous(run), {"generation": generation, "pod": os.environ.get("HOSTNAME")})
    try:
        run_prepared(run.root, placement(cfg, generation)[1])
    except TrialBusy as exc:
        # the pod this one replaces still holds the trial (a node cut off, its lock not yet
        # released): not bad input. 75: the Job tries again with a new pod
        raise Preempted(f"{exc.message}; another pod will try again") from None
    _report(run)
    return 0


def _report(run: RunDir) -> None:
    """Leave the trial's metric in the pod's termination message (its status, at most 4 KiB),
    where a sweep's launcher reads it when the claim is not mounted where it runs."""
    from trainyard.rundir import read_json

    path = os.environ.get("TRAINYARD_TERMINATION_LOG")
    if not path or not run.result_file.exists():
        return
    result = read_json(run.result_file)
    summary = {"state": "completed", "monitor": result.get("monitor"),
               "value": result.get("value"), "run_dir": str(run.root)}  # fmt: skip
    with contextlib.suppress(OSError):  # no termination log: the claim holds the result
        Path(path).write_text(json.dumps(summary))


def _rendezvous(run: RunDir, node: int = 0) -> Path:
    return run.ranks / ("rendezvous.json" if node == 0 else f"rendezvous-node{node}.json")


def _join(run: RunDir, node: int, text: str, timeout_s: float) -> str | None:
    """Wait for pod 0 to start a new generation of the group (its ranks listen at
    MASTER_ADDR) and return it; None when the trial completed meanwhile.

    A pod replaced after a preemption may start while the old pod 0 is still saving and
    leaving: joining its group would fail. Each start of pod 0 writes a new generation on
    the claim; the other pods join only one they have not joined before."""
    from trainyard import signals
    from trainyard.rundir import read_json

    mine, said = _rendezvous(run, node), time.monotonic()
    joined = read_json(mine).get("generation") if mine.exists() else None
    while True:
        if run.state == "completed" and run.result_file.exists():
            return None
        current = read_json(_rendezvous(run)) if _rendezvous(run).exists() else {}
        generation = current.get("generation")
        if generation and generation != joined and run.config.read_text() == text:
            write_json(mine, {"generation": generation, "pod": os.environ.get("HOSTNAME")})
            return generation
        # no deadline: pod 0 may wait for a node (autoscaling, an image pull); the Job's
        # own limits bound it, and a stop request ends the wait at once
        signals.raise_if_requested("while waiting for pod 0")
        if time.monotonic() - said > timeout_s:
            print(f"trainyard-pod: still waiting for pod 0 to start the trial in {run.root} "
                  "(is it pending? do all pods mount the same ReadWriteMany claim?)",
                  file=sys.stderr, flush=True)  # fmt: skip
            said = time.monotonic()
        time.sleep(0.2)


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1 or args[0].startswith("-"):
        print(USAGE, file=sys.stderr)
        sys.exit(EXIT_CONFIG)
    try:
        code = run_pod(Path(args[0]))
    except Stopped as exc:
        print(f"trainyard-pod: {exc.render()}", file=sys.stderr)
        code = exc.exit_code
    except TrainyardError as exc:
        print(f"trainyard-pod: {exc.render()}", file=sys.stderr)
        code = exc.exit_code
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)  # gloo's threads may abort a normal interpreter exit


if __name__ == "__main__":
    main()
