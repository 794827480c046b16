"""Start-up costs, measured side by side in one run.

- ``trainyard --help`` and ``trainyard status``: target < 0.5 s (no torch import).
- ``trainyard-train`` start to the end of the first optimizer step, minus the time a fresh
  interpreter takes from start to having imported torch and pytorch_lightning (both
  measured from the moment the process is launched to a timestamp the child takes, so
  neither includes interpreter shutdown): target <= 1.5 s.

Usage: python benchmarks/startup.py [--repeats 5]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import BIN, env, median, report, wall


def first_step_seconds(root: Path, index: int) -> float:
    args = [
        str(BIN / "trainyard-train"),
        f"name=startup{index}",
        "trainer.max_steps=3",
        "trainer.max_epochs=1",
        "test_after_fit=false",
        "+callbacks.timer._target_=trainyard.callbacks.timing.StepTimer",
    ]
    start = time.time()
    subprocess.run(args, check=True, capture_output=True, env=env(TRAINYARD_ROOT=str(root)))
    timing = next(root.glob(f"outputs/startup{index}/runs/*/ranks/timing_rank0.json"))
    return json.loads(timing.read_text())["first_step_end"] - start


def import_seconds() -> float:
    code = "import torch, pytorch_lightning, time; print(time.time())"
    start = time.time()
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True)
    return float(out.stdout.strip().splitlines()[-1]) - start


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=5)
    repeats = parser.parse_args().repeats
    help_s, status_s, imports_s, first_s = [], [], [], []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        (root / "outputs").mkdir()
        for i in range(repeats):  # interleaved, so load on the machine hits all alike
            first_s.append(first_step_seconds(root, i))
            help_s.append(wall([str(BIN / "trainyard"), "--help"]))
            status_s.append(wall([str(BIN / "trainyard"), "status", str(root), "--json"]))
            imports_s.append(import_seconds())
    overhead = median(first_s) - median(imports_s)
    report(
        f"start-up (median of {repeats})",
        [
            ("trainyard --help [s]", median(help_s), "target < 0.5"),
            ("trainyard status <dir> [s]", median(status_s), "target < 0.5"),
            ("launch -> torch + pytorch_lightning imported [s]", median(imports_s), "baseline"),
            ("trainyard-train start -> first optimizer step done [s]", median(first_s), ""),
            ("  beyond the bare torch + Lightning import [s]", overhead, "target <= 1.5"),
        ],
    )


if __name__ == "__main__":
    main()
