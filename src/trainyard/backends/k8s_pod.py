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
Job replaces the pod and it resumes), 2 bad input and 3 failed training (the Job fails).
A trial preempted ``cluster.max_requeues_without_progress`` times in a row without a new
step is failed instead of started again.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

from trainyard.errors import EXIT_CONFIG, EXIT_FAILED, ConfigError, Stopped, TrainyardError
from trainyard.rundir import RunDir

USAGE = "usage: trainyard-pod <the trial's frozen config.yaml, from its ConfigMap>"


def placement(cfg) -> tuple[int, object]:
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
    # the same on every pod of one attempt: the Job's rendezvous address
    return devices, Placement(index, nodes, master, port, run_id=f"k8s-{master}")


def run_pod(config_file: Path) -> int:
    from omegaconf import OmegaConf

    from trainyard import signals

    text = config_file.read_text()
    cfg = OmegaConf.create(text)
    signals.install(list(OmegaConf.select(cfg, "signals.preempt", default=signals.DEFAULT_PREEMPT)))
    devices, where = placement(cfg)
    os.environ.setdefault("TORCHELASTIC_RUN_ID", where.run_id)  # ranks are started for us
    run = RunDir(str(cfg.paths.run_dir))
    if where.node_rank == 0:
        return _first_pod(cfg, run, where)
    timeout = float(OmegaConf.select(cfg, "dist.timeout_s", default=300))
    _wait_for_config(run, text, timeout)
    if run.state == "completed" and run.result_file.exists():
        return 0
    from trainyard.launch import launch_local

    launch_local(run.config, devices, list(cfg.signals.preempt), where)
    return 0


def _first_pod(cfg, run: RunDir, where) -> int:
    from trainyard import trial
    from trainyard.backends.slurm_task import stuck_attempts
    from trainyard.train import run_prepared

    opened = trial.open_trial(cfg, run.root, [])
    if opened.completed:
        print(f"trainyard-pod: {run.root} already completed", file=sys.stderr)
        return 0
    stuck = stuck_attempts(run.status().get("history", []))
    limit = (cfg.get("cluster") or {}).get("max_requeues_without_progress")
    if stuck > int(3 if limit is None else limit):
        message = f"preempted {stuck} times in a row without training a step; not started again"
        run.transition("failed", error=message, exit_code=EXIT_FAILED)
        print(f"trainyard-pod: {message}", file=sys.stderr)
        return EXIT_FAILED
    run_prepared(run.root, where)
    return 0


def _wait_for_config(run: RunDir, text: str, timeout_s: float) -> None:
    """Until the first pod installed this config in the run directory."""
    deadline = time.monotonic() + timeout_s
    while not (run.config.exists() and run.config.read_text() == text):
        if time.monotonic() > deadline:
            raise TrainyardError(
                f"pod 0 did not install the trial in {run.root} within dist.timeout_s="
                f"{timeout_s:.0f}s",
                fix="check pod 0's log, and that every pod mounts the same claim "
                "(ReadWriteMany for several nodes)",
            )
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
