"""A 64-trial sweep as one array on the loopback Slurm cluster, against the same trials run
by Hydra's basic launcher on this machine, side by side in one run.

Reports: the time ``trainyard submit`` takes (composing, checking and freezing 64 trials,
one ``sbatch --test-only`` and one ``sbatch``), the scheduler's submit-to-start per trial
(Slurm's own Submit and Start times, from sacct), and each sweep's wall time until every
trial completed. Needs ``bash cluster/slurm/cluster.sh start``; says so and exits otherwise.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

from _common import BIN, env, median, report

TRIALS = 64
TINY = ["trainer.max_epochs=1", "trainer.limit_train_batches=2", "test_after_fit=false",
        "callbacks.early_stopping=null", f"seed=range(0,{TRIALS})"]  # fmt: skip


def _cluster_up() -> bool:
    if shutil.which("sinfo") is None:
        return False
    out = subprocess.run(["sinfo", "-h", "-o", "%t"], capture_output=True, text=True)
    return out.returncode == 0 and "idle" in out.stdout


def _states(root: Path) -> list[str]:
    out = subprocess.run(
        [str(BIN / "trainyard"), "status", str(root / "outputs"), "--json"],
        capture_output=True, text=True,
    )  # fmt: skip
    return [row["state"] for row in json.loads(out.stdout)] if out.returncode == 0 else []


def slurm_sweep(root: Path) -> tuple[float, list[float], float]:
    start = time.perf_counter()
    out = subprocess.run(
        [str(BIN / "trainyard"), "submit", "cluster=slurm_loopback",
         "cluster.array_parallelism=8", *TINY],
        cwd=root, env=env(TRAINYARD_ROOT=str(root)), capture_output=True, text=True, check=True,
    )  # fmt: skip
    submitted = time.perf_counter() - start
    job_id = out.stdout.strip().split()[-1]
    while _states(root).count("completed") < TRIALS:
        time.sleep(1)
    wall = time.perf_counter() - start
    sacct = subprocess.run(
        ["sacct", "-j", job_id, "-X", "-n", "-P", "--format=JobID,Submit,Start"],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    delays = []
    for line in sacct.stdout.splitlines():
        _, submit, begin = line.split("|")
        delays.append((datetime.fromisoformat(begin) - datetime.fromisoformat(submit)).seconds)
    return submitted, delays, wall


def basic_sweep(root: Path) -> float:
    start = time.perf_counter()
    subprocess.run(
        [str(BIN / "trainyard-train"), "-m", *TINY],
        cwd=root, env=env(TRAINYARD_ROOT=str(root)), capture_output=True, check=True,
    )  # fmt: skip
    return time.perf_counter() - start


def main() -> None:
    if not _cluster_up():
        print(
            "slurm_submit: skipped, the loopback Slurm cluster is not running "
            "(bash cluster/slurm/cluster.sh install && bash cluster/slurm/cluster.sh start)"
        )
        return
    with tempfile.TemporaryDirectory() as a, tempfile.TemporaryDirectory() as b:
        submitted, delays, slurm_wall = slurm_sweep(Path(a))
        basic_wall = basic_sweep(Path(b))
    report(
        f"{TRIALS}-trial sweep: one Slurm array (loopback, 2 nodes) vs Hydra's basic launcher",
        [
            ("trainyard submit: compose, check, freeze, sbatch [s]", submitted, ""),
            ("submit-to-start per trial, median (sacct, 1 s resolution) [s]",
             median(delays), "goal <= 1"),
            ("submit-to-start, first 8 (free slots at submit), median [s]",
             median(sorted(delays)[:8]), "goal <= 1"),
            ("submit-to-start per trial, max (queued behind 8 slots) [s]", max(delays), ""),
            ("Slurm sweep wall time until all completed [s]", slurm_wall, ""),
            ("basic launcher wall time (same trials, this process) [s]", basic_wall, ""),
            ("ratio Slurm / basic", slurm_wall / basic_wall, "(each array task imports torch)"),
        ],
    )  # fmt: skip


if __name__ == "__main__":
    sys.exit(main())
