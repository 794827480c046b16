"""Scale: sweeps of 100, 1,000 and 10,000 trials composed, checked, frozen into their run
directories and submitted to the loopback Slurm cluster (held, then cancelled), with the
time of each phase; and, side by side at 1,000 trials, the same sweep prepared trial by
trial (a full Hydra composition and OmegaConf freeze per trial) against templates
(:mod:`trainyard.bulk`: once per group, then plain data per trial).

Goal (issue: Slurm backend): 10,000 trials in under 30 s on 2 cores. Needs
``bash cluster/slurm/cluster.sh start``; says so and exits otherwise.
"""

from __future__ import annotations

import contextlib
import io
import shutil
import subprocess
import sys
import tempfile
import time

from _common import report

PHASES = ("compose", "freeze and check", "ask the cluster", "write run directories", "submit")


def _cluster_up() -> bool:
    if shutil.which("sinfo") is None:
        return False
    out = subprocess.run(["sinfo", "-h", "-o", "%t"], capture_output=True, text=True)
    return out.returncode == 0 and "idle" in out.stdout


def sweep(trials: int, templates: bool = True) -> dict[str, float]:
    """One held sweep of ``trials`` seeds; the seconds of each phase, and the total."""
    import os

    from trainyard import submit

    timings: dict[str, float] = {}
    overrides = [
        "cluster=slurm_loopback",
        "+cluster.additional_parameters.hold=''",  # queued, never started
        f"seed=range(0,{trials})",
    ]
    bulk_min = submit.BULK_MIN
    with tempfile.TemporaryDirectory() as root:
        os.environ["TRAINYARD_ROOT"] = root
        submit.BULK_MIN = bulk_min if templates else trials + 1
        try:
            start = time.perf_counter()
            planned = submit.plan(overrides)
            timings["compose"] = time.perf_counter() - start
            with contextlib.redirect_stdout(io.StringIO()):
                records = submit.submit_planned(planned, build=False, timings=timings)
            timings["total"] = time.perf_counter() - start
        finally:
            submit.BULK_MIN = bulk_min
            for record in locals().get("records", []):
                subprocess.run(["scancel", record["job_id"]], check=False)
    return timings


def main() -> None:
    if not _cluster_up():
        print(
            "slurm_scale: skipped, the loopback Slurm cluster is not running "
            "(bash cluster/slurm/cluster.sh install && bash cluster/slurm/cluster.sh start)"
        )
        return
    slow = sweep(1000, templates=False)
    runs = {n: sweep(n) for n in (100, 1000, 10000)}
    rows = []
    for n, timings in runs.items():
        rows += [(f"{n} trials: {phase} [s]", timings.get(phase, 0.0), "") for phase in PHASES]
        rows.append((f"{n} trials: total [s]", timings["total"], "goal < 30" if n == 10000 else ""))
        rows.append((f"{n} trials: per trial [ms]", 1000 * timings["total"] / n, ""))
    rows += [
        ("1000 trials trial by trial: total [s]", slow["total"], ""),
        ("ratio trial by trial / templates at 1000", slow["total"] / runs[1000]["total"], ""),
        ("growth 100 -> 10000 trials (total time ratio)", runs[10000]["total"] / runs[100]["total"],
         "(100x the trials)"),
    ]  # fmt: skip
    report("Sweeps frozen and submitted (held) to the loopback Slurm cluster", rows)


if __name__ == "__main__":
    sys.exit(main())
