"""``trainyard report <sweep dir>``: what a sweep found, whichever backend ran its trials.

Everything is read from the trials' run directories (status.json, result.json,
provenance.json, pruned.json), so a report works on any sweep, while it runs too:

- a table in the terminal (best first), and ``report/trials.csv`` and ``report/trials.md``;
- ``report/experiment/best.yaml``: the best trial as an experiment file, ready to run:
  ``trainyard-train hydra.searchpath=[file://<sweep>/report] experiment=best``;
- ``report/plots/``: the metric against each swept parameter, and the learning curves of
  the best trials (from their CSV logs);
- ``--watch``: a live view (trials done, running, failed; the best so far) until the
  sweep ends.

Reading is light (three small JSON files per trial, in parallel; no YAML): a report over
10,000 trials takes a few seconds (benchmarks/report_scale.py).
"""

from __future__ import annotations

import csv
import json
import math
import os
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from trainyard.errors import ConfigError
from trainyard.rundir import is_identity_key

_RUNNING = ("created", "running", "preempted")


@dataclass
class Trial:
    run: Path
    state: str
    value: float | None = None
    overrides: list[str] = field(default_factory=list)
    epochs: int | None = None
    duration_s: float | None = None
    pruned: bool = False
    error: str | None = None
    monitor: str | None = None
    created: float = 0.0  # when its run directory was made: ties go to the earlier trial

    def params(self) -> dict[str, str]:
        return dict(o.lstrip("+").split("=", 1) for o in self.overrides if "=" in o)


def _read(path: Path) -> Any:
    try:
        return json.loads(path.read_bytes())
    except (OSError, ValueError):
        return None


def _trial(run: Path) -> Trial | None:
    status = _read(run / "status.json")
    if not isinstance(status, dict):
        return None
    trial = Trial(run, status.get("state") or "unknown")
    history = status.get("history") or [{}]
    last, trial.created = history[-1], float(history[0].get("time") or 0.0)
    trial.error = last.get("error")
    result = _read(run / "result.json") if trial.state == "completed" else None
    if isinstance(result, dict):
        trial.value, trial.epochs = result.get("value"), result.get("epochs")
        trial.monitor = result.get("monitor")
        trial.duration_s = result.get("duration_s")
    provenance = _read(run / "provenance.json") or {}
    trial.overrides = [str(o) for o in provenance.get("overrides", [])]
    trial.pruned = (run / "pruned.json").exists()
    return trial


def collect(sweep_dir: Path) -> list[Trial]:
    """Every trial directly below ``sweep_dir`` (a directory holding status.json)."""
    if not sweep_dir.is_dir():
        raise ConfigError(
            f"{sweep_dir} is not a directory",
            fix="trainyard report <a sweep directory: outputs/<name>/sweeps/<key>>",
        )
    with os.scandir(sweep_dir) as entries:
        runs = [Path(e.path) for e in entries if e.is_dir() and not e.name.startswith(".")]
    with ThreadPoolExecutor(16) as pool:
        trials = [t for t in pool.map(_trial, runs) if t is not None]
    if not trials:
        raise ConfigError(
            f"{sweep_dir} holds no trial (no run directory with status.json)",
            fix="give the sweep directory, e.g. outputs/default/sweeps/<key>",
        )
    return trials


def swept(trials: list[Trial]) -> list[str]:
    """The keys whose values differ between trials, in the order they were given."""
    values: dict[str, set[str]] = {}
    for trial in trials:
        for key, value in trial.params().items():
            values.setdefault(key, set()).add(value)
    counts = Counter(k for t in trials for k in t.params())
    return [k for k, v in values.items() if len(v) > 1 or counts[k] < len(trials)]


def direction(sweep_dir: Path, trials: list[Trial]) -> str:
    """max or min: the sweep's monitor_mode (its multirun.yaml or a trial's config)."""
    import yaml

    for source in (sweep_dir / "multirun.yaml", trials[0].run / "config.yaml"):
        if source.exists():
            data = yaml.safe_load(source.read_text()) or {}
            sweeper = (data.get("hydra") or {}).get("sweeper") or {}
            if sweeper.get("direction") in ("maximize", "minimize"):  # the sweeper's word
                return sweeper["direction"][:3]
            if data.get("monitor_mode") in ("max", "min"):
                return data["monitor_mode"]
    return "max"


def ranked(trials: list[Trial], mode: str) -> list[Trial]:
    def key(t: Trial) -> tuple:
        ok = t.value is not None and math.isfinite(t.value)
        value = -t.value if ok and mode == "max" else (t.value if ok else 0)
        return (not ok, value, t.created)  # a tie: the first to be made, as Optuna picks

    return sorted(trials, key=key)


def summary(trials: list[Trial], mode: str, metric: str) -> str:
    states = Counter("pruned" if t.pruned else t.state for t in trials)
    parts = [f"{n} {s}" for s, n in sorted(states.items())]
    best = ranked(trials, mode)[0]
    best_text = (f"best {metric}={best.value:.6g} ({best.run.name})"
                 if best.value is not None else "no result yet")  # fmt: skip
    return f"{len(trials)} trial(s): {', '.join(parts)}; {best_text}"


def table(trials: list[Trial], keys: list[str], mode: str, metric: str) -> list[list[str]]:
    rows = [["rank", "state", *keys, metric, "epochs", "seconds", "run"]]
    for rank, t in enumerate(ranked(trials, mode), 1):
        params = t.params()
        state = "pruned" if t.pruned else t.state
        value = "" if t.value is None else f"{t.value:.6g}"
        epochs = "" if t.epochs is None else str(t.epochs)
        seconds = "" if t.duration_s is None else f"{t.duration_s:.1f}"
        row = [str(rank), state, *(params.get(k, "") for k in keys), value, epochs, seconds]
        rows.append([*row, t.run.name])
    return rows


def _text(rows: list[list[str]], limit: int) -> str:
    shown = rows[: limit + 1]
    widths = [max(len(r[i]) for r in shown) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip()
             for r in shown]  # fmt: skip
    if len(rows) > limit + 1:
        lines.append(f"... {len(rows) - limit - 1} more in report/trials.csv")
    return "\n".join(lines)


def _markdown(rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(rows[0]) + " |", "|" + "---|" * len(rows[0])]
    lines += ["| " + " | ".join(c.replace("|", "\\|") for c in r) + " |" for r in rows[1:]]
    return "\n".join(lines) + "\n"


def experiment(best: Trial, metric: str, conf_dir: Path) -> str:
    """The best trial as an experiment file: its group choices as defaults, every value
    that defines it (from its frozen config.yaml) below."""
    import yaml

    config = yaml.safe_load((best.run / "config.yaml").read_text())
    groups = []
    for override in best.overrides:
        key, _, value = override.lstrip("+").partition("=")
        if key == "experiment":  # its own group choices: the experiment file's defaults
            groups += _experiment_defaults(conf_dir / "experiment" / f"{value}.yaml")
        elif "." not in key and (conf_dir / key).is_dir() and is_identity_key(key):
            groups.append(f"override /{key}: {value}")
    values = _identity_only(config)
    sweep = best.run.parent.absolute()
    head = [
        "# @package _global_",
        f"# The best trial of {sweep}",
        f"# ({best.run.name}): {metric}={best.value}.",
        "# Run it again, or longer (trainer.max_epochs=...), with",
        f"#   trainyard-train hydra.searchpath=[file://{sweep / 'report'}] experiment=best",
        "# or copy this file into conf/experiment/ and run experiment=<its name>.",
    ]
    body = {"defaults": [{g.split(": ")[0]: g.split(": ")[1]} for g in groups]} if groups else {}
    body.update(values)
    return "\n".join(head) + "\n" + yaml.safe_dump(body, sort_keys=False)


def _identity_only(node: Any, prefix: str = "") -> Any:
    """The settings that define a trial, nested keys included: where files went
    (``callbacks.checkpoint.dirpath``, ``data.root``, ``paths``) stay the new run's own."""
    if not isinstance(node, dict):
        return node
    out = {}
    for key, value in node.items():
        dotted = f"{prefix}{key}"
        if is_identity_key(dotted):
            out[key] = _identity_only(value, dotted + ".")
    return out


def _experiment_defaults(path: Path) -> list[str]:
    import yaml

    if not path.exists():
        return []
    entries = (yaml.safe_load(path.read_text()) or {}).get("defaults", [])
    out = []
    for entry in entries:
        if isinstance(entry, dict):
            for key, value in entry.items():
                if str(key).startswith("override /"):
                    out.append(f"{key}: {value}")
    return out


def plots(trials: list[Trial], keys: list[str], mode: str, metric: str, out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")  # files only, no screen
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    written = []
    done = [t for t in trials if t.value is not None and math.isfinite(t.value)]
    for key in keys:
        xs, ys = [], []
        for t in done:
            raw = t.params().get(key)
            xs.append(_number(raw) if _number(raw) is not None else str(raw))
            ys.append(t.value)
        fig, ax = plt.subplots(figsize=(6, 4))
        numeric = all(isinstance(x, float) for x in xs)
        if numeric:
            ax.scatter(xs, ys, s=12)
            positive = xs and min(xs) > 0
            if positive and max(xs) / min(xs) > 100:
                ax.set_xscale("log")
        else:
            labels = sorted({str(x) for x in xs})
            ax.scatter([labels.index(str(x)) for x in xs], ys, s=12)
            ax.set_xticks(range(len(labels)), labels, rotation=30)
        ax.set_xlabel(key)
        ax.set_ylabel(metric)
        ax.set_title(f"{metric} against {key} ({len(done)} trials)")
        fig.tight_layout()
        path = out / f"{metric.replace('/', '_')}_vs_{key.replace('/', '_')}.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        written.append(path)
    curves = _curves(ranked(done, mode)[:5], metric)
    if curves:
        fig, ax = plt.subplots(figsize=(6, 4))
        for name, (epochs, values) in curves.items():
            ax.plot([e + 1 for e in epochs], values, marker="o", label=name[:40])
        from matplotlib.ticker import MaxNLocator

        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("epochs trained")
        ax.set_ylabel(metric)
        ax.set_title(f"learning curves of the best {len(curves)} trial(s)")
        ax.legend(fontsize=7)
        fig.tight_layout()
        path = out / "learning_curves.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        written.append(path)
    return written


def _number(value: Any) -> float | None:
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def _curves(trials: list[Trial], metric: str) -> dict[str, tuple[list[int], list[float]]]:
    """Per trial, the metric at each epoch, from its CSV logger's metrics.csv."""
    out = {}
    for t in trials:
        files = sorted((t.run / "logs").glob("**/metrics.csv"))
        points: dict[int, float] = {}
        for file in files:
            with open(file, newline="") as f:
                for row in csv.DictReader(f):
                    if row.get(metric) and row.get("epoch"):
                        points[int(float(row["epoch"]))] = float(row[metric])
        if points:
            epochs = sorted(points)
            out[t.run.name] = (epochs, [points[e] for e in epochs])
    return out


def write(sweep_dir: Path, limit: int = 20, with_plots: bool = True) -> str:
    """Write the report's files under ``<sweep_dir>/report``; the terminal text."""
    from trainyard.conf_path import CONF_DIR
    from trainyard.rundir import atomic_write_text

    trials = collect(sweep_dir)
    mode = direction(sweep_dir, trials)
    metric = _metric(trials)
    keys = swept(trials)
    rows = table(trials, keys, mode, metric)
    out = sweep_dir / "report"
    out.mkdir(exist_ok=True)
    with open(out / "trials.csv", "w", newline="") as f:
        csv.writer(f).writerows(rows)
    atomic_write_text(out / "trials.md", _markdown(rows))
    lines = [summary(trials, mode, metric), "", _text(rows, limit), ""]
    best = ranked(trials, mode)[0]
    if best.value is not None:
        text = experiment(best, metric, Path(CONF_DIR))
        (out / "experiment").mkdir(exist_ok=True)
        atomic_write_text(out / "experiment" / "best.yaml", text)
        lines.append(f"best trial as an experiment: {out / 'experiment' / 'best.yaml'}")
    if with_plots and best.value is not None:
        written = plots(trials, keys, mode, metric, out / "plots")
        lines.append(f"plots: {', '.join(p.name for p in written)} in {out / 'plots'}")
    lines.append(f"table: {out / 'trials.csv'}, {out / 'trials.md'}")
    return "\n".join(lines)


def _metric(trials: list[Trial]) -> str:
    return next((t.monitor for t in trials if t.monitor), "metric")


def _driven(sweep_dir: Path) -> bool:
    """Whether a sweeper still drives the sweep (it holds the sweep's driver lock)."""
    from filelock import FileLock, Timeout

    path = sweep_dir / ".driver.lock"
    if not path.exists():
        return False
    lock = FileLock(str(path))
    try:
        lock.acquire(timeout=0)
    except Timeout:
        return True
    lock.release()
    return False


def watch(sweep_dir: Path, every_s: float = 2.0, out: Any = None) -> None:
    """Print the sweep's state every ``every_s`` seconds until no trial is left to run."""
    import sys

    out = out or sys.stdout
    while True:
        try:
            trials = collect(sweep_dir)
        except ConfigError:  # nothing there yet: the sweep is starting
            if not _driven(sweep_dir):
                raise
            print(f"[{time.strftime('%H:%M:%S')}] no trial yet", file=out, flush=True)
            time.sleep(every_s)
            continue
        mode = direction(sweep_dir, trials)
        metric = _metric(trials)
        stamp = time.strftime("%H:%M:%S")
        print(f"[{stamp}] {summary(trials, mode, metric)}", file=out, flush=True)
        if not any(t.state in _RUNNING for t in trials) and not _driven(sweep_dir):
            return
        time.sleep(every_s)
