"""Sweeps of tiny trials on this machine, side by side in one run: the Ray path
(``cluster=ray``, a local head), Hydra's basic launcher (``cluster=local``: trial after
trial in one process) and submitit's local launcher (a process per trial).

Ray and basic run the same sweep of N and of 2N trials (different seeds, so that nothing
is reused); the difference of the two walls is what N more trials cost once everything is
started and imported (warm). submitit's local launcher starts a process per trial, all at
once, so it is never warm (and 2N processes at once would not fit in memory): its N-trial
wall is compared with the others' cold walls. Per path: the walls, the fraction of the
warm slots' time spent training (a trial's training: ``running`` to ``completed`` in its
status.json), and the scheduling overhead per trial: the warm wall each trial adds beyond
its share of the training (its training time divided by the slots training at once).

Goal (issue: Ray backend): Ray at least 1.6x faster than the basic launcher once warm, and
at most 0.2 s of scheduling overhead per trial. Needs ``bash cluster/ray/ray.sh start``
(it says so and exits otherwise); ``--trials`` sets N (default 32).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import REPO, env, report

TRIAL = ["trainer.max_epochs=1", "+trainer.limit_train_batches=4",
         "+trainer.limit_val_batches=2", "logger=none"]  # fmt: skip
PATHS = {
    "ray": (["cluster=ray", "cluster.address=http://127.0.0.1:8265"], 2),
    "basic": (["cluster=local"], 1),
    "submitit_local": (["cluster=local", "hydra/launcher=submitit_local"], 2),
}


def _ray_up() -> bool:
    script = REPO / "cluster" / "ray" / "ray.sh"
    return subprocess.run(["bash", str(script), "status"], capture_output=True).returncode == 0


def _train_seconds(root: Path) -> list[float]:
    out = []
    for status in root.rglob("status.json"):
        history = json.loads(status.read_text())["history"]
        running = [h["time"] for h in history if h["state"] == "running"]
        done = [h["time"] for h in history if h["state"] == "completed"]
        if running and done:
            out.append(done[-1] - running[-1])
    return out


def sweep(path: str, trials: int, first_seed: int) -> tuple[float, list[float]]:
    """Wall seconds of one sweep of ``trials`` seeds, and each trial's training seconds."""
    overrides, _ = PATHS[path]
    seeds = ",".join(str(s) for s in range(first_seed, first_seed + trials))
    with tempfile.TemporaryDirectory(prefix=f"bench-{path}-") as root:
        cmd = [sys.executable, "-m", "trainyard.train", "-m", *overrides, *TRIAL,
               f"seed={seeds}"]  # fmt: skip
        started = time.perf_counter()
        out = subprocess.run(cmd, cwd=root, env=env(TRAINYARD_ROOT=root), capture_output=True,
                             text=True, timeout=1800)  # fmt: skip
        wall = time.perf_counter() - started
        if out.returncode != 0:
            sys.exit(f"{path}: exit {out.returncode}\n{out.stderr[-3000:]}")
        seconds = _train_seconds(Path(root))
        if len(seconds) != trials:
            sys.exit(f"{path}: {len(seconds)} of {trials} trials completed")
        return wall, seconds


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--trials", type=int, default=32)
    parser.add_argument("--paths", default=",".join(PATHS))
    args = parser.parse_args()
    if not _ray_up():
        sys.exit("no Ray head on 127.0.0.1: bash cluster/ray/ray.sh start")
    n, rows, warm, cold = args.trials, [], {}, {}
    print(f"{os.cpu_count()} cores; trials: {' '.join(TRIAL)}", flush=True)
    for path in args.paths.split(","):
        _, slots = PATHS[path]
        small, _ = sweep(path, n, 0)
        if path == "submitit_local":  # a process per trial, all at once: never warm, and
            # 2N of them at once would not fit in memory (about 350 MB each)
            # (their training times overlap on contended cores: no fraction to give)
            rows.append((f"{path}: wall, {n} trials (a process each, all at once)", small, "s"))
            cold[path] = small
            print(f"{path}: {small:.1f} s for {n}", flush=True)
            continue
        large, seconds = sweep(path, 2 * n, 10_000)
        warm[path] = large - small
        trained = n * sum(seconds) / len(seconds)  # N trials' worth of training
        busy = trained / (warm[path] * slots)
        # the wall each trial adds beyond its share of training on the slots
        overhead = (warm[path] - trained / slots) / n
        rows += [
            (f"{path}: wall, {n} trials (cold: startup and imports included)", small, "s"),
            (f"{path}: wall, {2 * n} trials", large, "s"),
            (f"{path}: {n} more trials once warm", warm[path], "s"),
            (f"{path}: fraction of the warm slots' time spent training", busy, ""),
            (f"{path}: scheduling overhead per trial (warm, {slots} slot(s))", overhead,
             "s (goal for ray <= 0.2)"),
        ]  # fmt: skip
        print(f"{path}: {small:.1f} s for {n}, {large:.1f} s for {2 * n}", flush=True)
        cold[path] = small
    if "ray" in warm and "basic" in warm:
        rows.append(("ray vs basic, warm (basic / ray)", warm["basic"] / warm["ray"], ">= 1.6"))
    if "ray" in cold and "basic" in cold:
        rows.append(("ray vs basic, cold (basic / ray)", cold["basic"] / cold["ray"], ""))
    if "ray" in cold and "submitit_local" in cold:
        ratio = cold["submitit_local"] / cold["ray"]
        rows.append(("ray vs submitit_local, cold (submitit / ray)", ratio, ""))
    report(f"{n} tiny trials per sweep, on {os.cpu_count()} cores", rows)


if __name__ == "__main__":
    main()
