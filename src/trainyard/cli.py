"""The ``trainyard`` command: everything that does not train.

It must start in well under half a second, so nothing here imports torch, Lightning or
Hydra at module level.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import time
from pathlib import Path

from trainyard import __version__
from trainyard.errors import EXIT_CONFIG
from trainyard.rundir import RunDir


def _run_dirs(path: Path) -> list[Path]:
    """A run directory itself, or every run directory below a sweep or experiment dir."""
    if (path / "status.json").exists():
        return [path]
    return sorted(p.parent for p in path.rglob("status.json"))


def _submission_files(path: Path) -> list[tuple[Path, list[dict]]]:
    """The submission files for runs at or below ``path`` (or one level up), each with what
    ``trainyard submit`` recorded in it."""
    found = []
    for candidate in [path / "submission.json", path.parent / "submission.json",
                      *path.rglob("submission.json")]:  # fmt: skip
        if candidate.exists() and candidate not in [f for f, _ in found]:
            found.append((candidate, json.loads(candidate.read_text())))
    return found


def _submissions(path: Path) -> list[dict]:
    """What ``trainyard submit`` sent for runs at or below ``path`` (or one level up)."""
    return [record for _, records in _submission_files(path) for record in records]


def _note_cancelled(file: Path, job_id: str, cancelled: str) -> None:
    """Remember in the submission file what ``trainyard cancel`` cancelled: the scheduler
    may keep no trace of an array task cancelled while it was still pending."""
    from trainyard.rundir import write_json

    records = json.loads(file.read_text())
    for record in records:
        if record["job_id"] == job_id:
            record["cancelled"] = sorted({*record.get("cancelled", []), cancelled})
    write_json(file, records)


def _scheduler_states(path: Path) -> dict[str, str]:
    """Trial directory -> the scheduler's state of its task, for submitted trials."""
    from trainyard import backends
    from trainyard.backends.base import trial_states

    states: dict[str, str] = {}
    for record in _submissions(path):
        try:
            tasks = backends.get(record["backend"]).status(record["job_id"])
        except Exception as exc:  # the controller is down: say so rather than guess
            tasks = {record["job_id"]: f"UNKNOWN ({str(exc).splitlines()[0]})"}
        states.update(trial_states(record, tasks))
    return states


# scheduler states after which there is nothing left to cancel
_ENDED = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "ENDED",
          "BOOT_FAIL", "DEADLINE"}  # fmt: skip

# trial states the run directory knows best; otherwise the scheduler's state says more
_FINAL = ("completed", "failed", "preempted", "interrupted")


def _summary(error: str) -> str:
    """One line of an error: its first, and its last when the first only introduces it."""
    lines = [line.strip() for line in error.strip().splitlines() if line.strip()]
    if len(lines) > 1 and lines[0].endswith(":"):
        return f"{lines[0]} ... {lines[-1]}"
    return lines[0] if lines else ""


def _row(run: Path, scheduler: dict[str, str]) -> dict:
    status = json.loads((run / "status.json").read_text())
    result_file = run / "result.json"
    result = json.loads(result_file.read_text()) if result_file.exists() else {}
    last = status["history"][-1] if status.get("history") else {}
    monitor = str(result.get("monitor") or "")
    test_metric = "test/" + monitor.split("/", 1)[-1] if monitor.startswith("val/") else None
    state = status.get("state")
    queued = scheduler.get(str(run))
    if (queued and state not in _FINAL) or queued in ("CANCELLED", "TIMEOUT", "NODE_FAIL"):
        state = f"{state} ({queued.lower()})" if state != "created" else queued.lower()
    elif (
        state == "running"
        and not queued
        and last.get("host") == socket.gethostname()
        and (RunDir(run).claimed_here() is False)
    ):
        # killed without a word (SIGKILL, out of memory, a lost container): the same
        # command resumes it from last.ckpt
        state = "running (no process: killed? rerun to resume)"
    if state == "completed" and result.get("reused_from"):
        state = "completed (reused)"
    return {
        "run": str(run),
        "state": state,
        "attempt": status.get("attempt", 0),
        "since": time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(last.get("time", 0))),
        "monitor": result.get("monitor"),
        "value": result.get("value"),
        "best": result.get("best_value") is not None,
        "test_metric": test_metric,
        "test": (result.get("metrics") or {}).get(test_metric),
        "error": last.get("error"),
        "scheduler": queued,
    }


def cmd_status(args: argparse.Namespace) -> int:
    # outputs/ where trainyard-train puts it: under $TRAINYARD_ROOT, else here
    default = Path(os.environ.get("TRAINYARD_ROOT") or ".") / "outputs"
    path = Path(args.path or default).resolve()  # submission.json records absolute paths
    if not path.exists():
        print(f"trainyard: {path} does not exist\n  fix: trainyard status <a run, sweep or "
              "outputs directory>", file=sys.stderr)  # fmt: skip
        return EXIT_CONFIG
    scheduler = _scheduler_states(path)
    rows = [_row(run, scheduler) for run in _run_dirs(path)]
    if not rows:
        print(f"trainyard: no run directories under {path}", file=sys.stderr)
        return EXIT_CONFIG
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    for row in rows:
        which = "best " if row["best"] else ""  # no checkpoint watched it: the last epoch's
        value = "" if row["value"] is None else f"  {which}{row['monitor']}={row['value']:.4f}"
        if row["test"] is not None:  # the best checkpoint's score on the test split
            value += f"  {row['test_metric']}={row['test']:.4f}"
        error = f"  error: {_summary(row['error'])}" if row["error"] else ""
        head = f"{row['state']:<11} attempt {row['attempt']}  {row['since']}"
        print(f"{head}  {row['run']}{value}{error}")
    return 0


def cmd_submit(args: argparse.Namespace) -> int:
    from trainyard.errors import TrainyardError
    from trainyard.submit import submit

    try:
        submit(args.overrides, dry_run=args.dry_run, build=args.build_check)
    except TrainyardError as exc:
        print(f"trainyard: {exc.render()}", file=sys.stderr)
        return exc.exit_code
    return 0


def _each_submission(path: Path, action) -> int:
    """Run ``action(backend, record, job_id, file)`` for what was submitted at or below
    ``path`` (``file``: the submission file holding ``record``); a single trial of an array
    is addressed as its own task (``<job>_<index>``)."""
    from trainyard import backends

    path = path.resolve()
    found = [(file, record) for file, records in _submission_files(path) for record in records]
    if not found:
        print(f"trainyard: nothing was submitted from {path}", file=sys.stderr)
        return EXIT_CONFIG
    for file, record in found:
        job_id, trials = record["job_id"], record["trials"]
        if str(path) in trials and len(trials) > 1 and record["backend"] != "local":
            job_id = f"{job_id}_{trials.index(str(path))}"
        elif not any(t == str(path) or t.startswith(f"{path}/") for t in trials) and not str(
            path
        ).startswith(record["log_dir"]):
            continue
        action(backends.get(record["backend"]), record, job_id, file)
    return 0


def cmd_logs(args: argparse.Namespace) -> int:
    def show(backend, record, job_id, file):
        print(backend.logs(job_id, Path(record["log_dir"])), end="")

    path = Path(args.path).resolve()
    if not _submissions(path):  # trained here (trainyard-train): each run's own log
        logs = [run / "train.log" for run in _run_dirs(path) if (run / "train.log").exists()]
        for log in logs:
            print(f"==> {log} <==\n{log.read_text()}", end="")
        if logs:
            return 0
    return _each_submission(path, show)


def cmd_cancel(args: argparse.Namespace) -> int:
    def cancel(backend, record, job_id, file):
        states = backend.status(job_id)
        ended = {s.split()[0] for s in states.values()}
        if states and ended <= _ENDED:
            ended_as = ", ".join(sorted(ended))
            print(f"trainyard: nothing to cancel: job {job_id} already ended ({ended_as})")
            return
        backend.cancel(job_id)
        _note_cancelled(file, record["job_id"], job_id)
        print(f"trainyard: cancelled {record['backend']} job {job_id}")

    return _each_submission(Path(args.path), cancel)


def cmd_report(args: argparse.Namespace) -> int:
    from trainyard import report
    from trainyard.errors import TrainyardError

    try:
        if args.watch:
            report.watch(Path(args.path), args.every)
        print(report.write(Path(args.path), args.top, with_plots=not args.no_plots))
    except TrainyardError as exc:
        print(f"trainyard: {exc.render()}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        return 130
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="trainyard",
        description="Inspect trainyard runs. Training itself: trainyard-train [overrides].",
    )
    parser.add_argument("--version", action="version", version=f"trainyard {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    status = sub.add_parser("status", help="state of a run, or of every run below a directory")
    status.add_argument(
        "path", nargs="?", default=None,
        help="a run, sweep or output directory (default: $TRAINYARD_ROOT/outputs, or outputs)",
    )  # fmt: skip
    status.add_argument("--json", action="store_true", help="machine-readable output")
    status.set_defaults(func=cmd_status)
    submit = sub.add_parser(
        "submit",
        help="prepare trials and send them to a cluster (cluster=slurm, k8s, k8s_local, "
        "ray, local); a,b values sweep",
    )
    submit.add_argument("--dry-run", action="store_true", help="print the requests only")
    submit.add_argument(
        "--build-check",
        action="store_true",
        help="also build the data module, network, loss and optimizer of each distinct "
        "trial before queueing (imports torch: a few seconds more)",
    )
    submit.add_argument("overrides", nargs="*", help="Hydra overrides, as for trainyard-train")
    submit.set_defaults(func=cmd_submit)
    report = sub.add_parser(
        "report",
        help="a sweep's results: table (terminal, CSV, Markdown), the best trial as an "
        "experiment file, plots; --watch follows a running sweep",
    )
    report.add_argument("path", help="a sweep directory (outputs/<name>/sweeps/<key>)")
    report.add_argument("--top", type=int, default=20, help="rows shown in the terminal")
    report.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    report.add_argument(
        "--watch", action="store_true",
        help="print the sweep's state every --every seconds until it ends",
    )  # fmt: skip
    report.add_argument("--every", type=float, default=2.0, help="seconds between views")
    report.set_defaults(func=cmd_report)
    for name, func, text in (
        ("logs", cmd_logs, "the scheduler's output of what was submitted from a directory"),
        ("cancel", cmd_cancel, "cancel what was submitted from a run or sweep directory"),
    ):
        command = sub.add_parser(name, help=text)
        command.add_argument("path", help="a run or sweep directory")
        command.set_defaults(func=func)
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    try:
        code = args.func(args)
        sys.stdout.flush()
    except BrokenPipeError:  # `trainyard submit --dry-run ... | head`: the reader left
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        code = 0
    sys.exit(code)


if __name__ == "__main__":
    main()
