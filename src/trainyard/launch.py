"""Start the ranks of one trial on this machine.

Lightning's own DDP launcher re-executes the Hydra script once per rank; under ``-m`` the
children re-run the whole sweep, and with a sampler they silently train other
hyperparameters than rank 0. trainyard instead starts the ranks itself with torch's
elastic launcher on a function that reads the frozen config: Lightning sees a
torchelastic environment and does not relaunch anything.
"""

from __future__ import annotations

import json
import signal
import uuid
from pathlib import Path

from trainyard.errors import EXIT_FAILED, TrainingFailed, TrainyardError
from trainyard.rundir import RunDir, write_json


def rank_entry(config_path: str) -> float | None:
    """Runs in each spawned rank: train, and leave a typed error file behind on failure."""
    from trainyard.worker import global_rank, run_rank

    try:
        return run_rank(config_path)
    except TrainyardError as exc:
        run = RunDir(Path(config_path).parent)
        write_json(
            run.ranks / f"rank{global_rank()}.error.json",
            {"type": type(exc).__name__, "message": exc.render(), "exit_code": exc.exit_code},
        )
        raise


def launch_local(config_path: Path, nproc: int, timeout_s: float) -> float | None:
    """Run ``nproc`` ranks of the trial on this node; return rank 0's metric."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    config = LaunchConfig(
        min_nodes=1,
        max_nodes=1,
        nproc_per_node=nproc,
        run_id=f"trainyard-{uuid.uuid4().hex[:12]}",
        rdzv_backend="c10d",
        rdzv_endpoint="127.0.0.1:0",
        rdzv_configs={"timeout": int(timeout_s)},
        max_restarts=0,  # a retry is the backend's decision, made from the status file
        monitor_interval=0.1,  # how quickly a dead rank takes the others down
        start_method="spawn",
        local_addr="127.0.0.1",
    )
    try:
        results = elastic_launch(config, rank_entry)(str(config_path))
    except ChildFailedError as exc:
        raise _describe_failure(RunDir(config_path.parent), exc) from None
    return results.get(0)


def _describe_failure(run: RunDir, exc) -> TrainyardError:
    """Turn torch's failure report into one message naming the rank(s) and the cause."""
    lines, code = [], EXIT_FAILED
    for rank, failure in sorted(exc.failures.items()):
        error_file = run.ranks / f"rank{rank}.error.json"
        if error_file.exists():
            info = json.loads(error_file.read_text())
            lines.append(f"rank {rank}: {info['message']}")
            code = info.get("exit_code", code)
        elif failure.exitcode < 0:
            name = signal.Signals(-failure.exitcode).name
            lines.append(f"rank {rank} (pid {failure.pid}) was killed by {name}")
        else:
            lines.append(f"rank {rank} (pid {failure.pid}) exited with code {failure.exitcode}")
    error = TrainingFailed("; ".join(lines) or str(exc))
    error.exit_code = code
    return error
