"""Helpers shared by the benchmarks: medians, ratios and a uniform report."""

from __future__ import annotations

import argparse
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


RATIOS = "a / b: a's time over b's, below 1 is faster"


def report(title: str, rows: list[tuple[str, float, str]]) -> None:
    """rows: (label, value, target) printed as an aligned table."""
    print(f"\n== {title}")
    for label, value, target in rows:
        print(f"  {label:<60} {value:8.3f}   {target}")


def goal(value: float, limit: float) -> str:
    """The target column: the limit and whether this run met it."""
    return f"target <= {limit:.2f}: {'met' if value <= limit else 'NOT met'}"


def pickers(repeats: int) -> list[tuple[str, object]]:
    """The median run (typical) and, with several, the best (least disturbed by other work
    on the machine)."""
    return [("median", statistics.median)] + ([("best", min)] if repeats > 1 else [])


def command_line(doc: str) -> argparse.ArgumentParser:
    """A command line whose --help shows the script's docstring (what each variant is)."""
    return argparse.ArgumentParser(
        description=doc, formatter_class=argparse.RawDescriptionHelpFormatter
    )


def names(known) -> object:
    """An argparse ``type``: comma-separated names, each one of ``known`` (an unknown one
    is a usage error that lists them, not a KeyError later)."""

    def parse(text: str) -> list[str]:
        chosen = [name for name in text.split(",") if name]
        unknown = [name for name in chosen if name not in known]
        if unknown or not chosen:
            raise argparse.ArgumentTypeError(
                f"{', '.join(unknown) or 'none given'}: choose from {', '.join(known)}"
            )
        return chosen

    return parse
