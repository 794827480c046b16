"""The ``trainyard`` command: everything that does not train.

It must start in well under half a second, so nothing here imports torch, Lightning or
Hydra at module level.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from trainyard import __version__
from trainyard.errors import EXIT_CONFIG


def _run_dirs(path: Path) -> list[Path]:
    """A run directory itself, or every run directory below a sweep or experiment dir."""
    if (path / "status.json").exists():
        return [path]
    return sorted(p.parent for p in path.rglob("status.json"))


def _row(run: Path) -> dict:
    status = json.loads((run / "status.json").read_text())
    result_file = run / "result.json"
    result = json.loads(result_file.read_text()) if result_file.exists() else {}
    last = status["history"][-1] if status.get("history") else {}
    return {
        "run": str(run),
        "state": status.get("state"),
        "attempt": status.get("attempt", 0),
        "since": time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(last.get("time", 0))),
        "monitor": result.get("monitor"),
        "value": result.get("value"),
        "error": last.get("error"),
    }


def cmd_status(args: argparse.Namespace) -> int:
    path = Path(args.path)
    if not path.exists():
        print(f"trainyard: {path} does not exist", file=sys.stderr)
        return EXIT_CONFIG
    rows = [_row(run) for run in _run_dirs(path)]
    if not rows:
        print(f"trainyard: no run directories under {path}", file=sys.stderr)
        return EXIT_CONFIG
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    for row in rows:
        value = "" if row["value"] is None else f"  {row['monitor']}={row['value']:.4f}"
        error = f"  error: {row['error']}" if row["error"] else ""
        head = f"{row['state']:<10} attempt {row['attempt']}  {row['since']}"
        print(f"{head}  {row['run']}{value}{error}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="trainyard",
        description="Inspect trainyard runs. Training itself: trainyard-train [overrides].",
    )
    parser.add_argument("--version", action="version", version=f"trainyard {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    status = sub.add_parser("status", help="state of a run, or of every run below a directory")
    status.add_argument("path", help="a run directory, a sweep directory or an output directory")
    status.add_argument("--json", action="store_true", help="machine-readable output")
    status.set_defaults(func=cmd_status)
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    sys.exit(args.func(args))


if __name__ == "__main__":
    main()
