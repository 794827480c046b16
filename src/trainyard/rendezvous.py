"""When a scheduler starts every rank with the driver (torchrun, srun), one rank prepares.

Each rank composed the same config from the same command line, but only global rank 0
prepares the trial (freezes, opens or refuses the run directory); the others wait for its
outcome and then train from the file it froze, so they neither race on the run directory
nor train from configs of their own.

The outcome travels through the launcher's key-value store where there is one (torchrun's
agent store, at MASTER_ADDR:MASTER_PORT), else through a file in the run directory named by
a token that is the same on every rank of one launch and new for each launch (Slurm's job,
step and restart count).
"""

from __future__ import annotations

import os
import time
from datetime import timedelta
from pathlib import Path

from trainyard.errors import ConfigError, TrainingFailed

OK = "ok"
COMPLETED = "completed"  # already completed: the other ranks return its stored result


def global_rank() -> int:
    for var in ("RANK", "SLURM_PROCID"):
        if var in os.environ:
            return int(os.environ[var])
    return 0


def _store(timeout_s: float):
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return None
    from torch.distributed import TCPStore

    return TCPStore(
        os.environ["MASTER_ADDR"],
        int(os.environ["MASTER_PORT"]),
        is_master=False,
        timeout=timedelta(seconds=timeout_s),
    )


def _key() -> str:
    return f"trainyard/prepared/{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}"


def _marker(run_dir: Path) -> Path:
    env = os.environ
    token = "-".join(
        env.get(v, "")
        for v in ("SLURM_JOB_ID", "SLURM_STEP_ID", "SLURM_RESTART_COUNT", "TORCHELASTIC_RUN_ID")
    )
    return run_dir / "ranks" / f".prepared-{token}"


def announce(run_dir: Path, outcome: str = OK, timeout_s: float = 300) -> None:
    """Rank 0: the trial is prepared (``ok``), already completed, or why it is not (an
    error message)."""
    store = _store(timeout_s)
    if store is not None:
        store.set(_key(), outcome)
        return
    marker = _marker(run_dir)
    marker.parent.mkdir(parents=True, exist_ok=True)
    for stale in marker.parent.glob(".prepared-*"):
        stale.unlink(missing_ok=True)
    tmp = marker.with_name(marker.name + ".tmp")
    tmp.write_text(outcome)
    tmp.replace(marker)


def wait(run_dir: Path, timeout_s: float) -> str:
    """Other ranks: block until rank 0 announced; raise its error if it failed, else
    return ``ok`` or ``completed``."""
    store = _store(timeout_s)
    if store is not None:
        outcome = store.get(_key()).decode()
    else:
        marker, deadline = _marker(run_dir), time.monotonic() + timeout_s
        while not marker.exists():
            if time.monotonic() > deadline:
                raise TrainingFailed(
                    f"rank 0 did not prepare {run_dir} within dist.timeout_s={timeout_s:.0f}s"
                )
            time.sleep(0.1)
        outcome = marker.read_text()
    if outcome not in (OK, COMPLETED):
        raise ConfigError(f"rank 0 could not prepare the trial: {outcome}")
    return outcome
