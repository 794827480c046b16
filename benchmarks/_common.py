"""Helpers shared by the benchmarks: medians, ratios and a uniform report."""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def median(values) -> float:
    return statistics.median(values)


def wall(cmd: list[str], **kwargs) -> float:
    start = time.perf_counter()
    subprocess.run(cmd, check=True, capture_output=True, **kwargs)
    return time.perf_counter() - start


def env(**extra: str) -> dict[str, str]:
    return {**os.environ, "PYTHONUNBUFFERED": "1", **extra}


def report(title: str, rows: list[tuple[str, float, str]]) -> None:
    """rows: (label, value, target) printed as an aligned table."""
    print(f"\n== {title}")
    for label, value, target in rows:
        print(f"  {label:<58} {value:8.3f}   {target}")
