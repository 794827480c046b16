"""Preparing a trial: the one step every launcher runs on the submitting machine.

:func:`prepare` takes a composed config (from Hydra, or built by any other means) and the
trial's run directory, and leaves behind everything a node needs: the resolved config frozen
into ``config.yaml``, ``provenance.json``, and a status. It needs neither Hydra's runtime
nor the machine that will train: only what the config itself can tell is checked here
(:func:`trainyard.preflight.check_config`); GPUs and cores are checked where the ranks
start. What travels to a node is the path of ``config.yaml``; there
:func:`trainyard.worker.run_rank` trains each rank from it.
"""

from __future__ import annotations

import logging
import os
import shutil
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from trainyard import preflight
from trainyard.errors import RunDirError
from trainyard.freeze import freeze, frozen_yaml, load_frozen, provenance, save_frozen
from trainyard.rundir import RunDir, is_identity_key, json_text, read_json, write_json

log = logging.getLogger("trainyard")

SOURCE_DIR = Path(__file__).resolve().parents[2]


@dataclass
class Trial:
    run: RunDir
    config: DictConfig  # the frozen config to train from
    completed: bool  # it already completed: its result is in run.result_file

    @property
    def config_path(self) -> Path:
        return self.run.config


def prepare(
    cfg: DictConfig, run_dir: str | Path, overrides: list[str], build_check: bool = True
) -> Trial:
    """Resolve, check and freeze ``cfg`` into ``run_dir``, or pick up the trial already there.

    Raises ConfigError (or a subclass) for anything wrong with the config, and RunDirError
    when ``run_dir`` holds a different trial or ``resume=false`` forbids touching it. Never
    overwrites what defines an existing trial.
    """
    frozen = preflight.check_config(freeze(cfg), build=build_check)
    return open_trial(frozen, run_dir, overrides)


def open_trial(frozen: DictConfig, run_dir: str | Path, overrides: list[str]) -> Trial:
    """Freeze an already checked config into a new run directory, or pick up the trial
    that is there. The second half of :func:`prepare`, for callers that check more
    (the machine, the cluster) between the two."""
    run = RunDir(run_dir)
    if not run.config.exists():
        save_frozen(frozen, run.config)
        source = SOURCE_DIR if (SOURCE_DIR / ".git").exists() else Path.cwd()
        write_json(run.provenance, provenance(frozen.seed, overrides, source))
        run.transition("created")
        twin = completed_twin(run, lambda: frozen)
        if twin is not None:
            reuse(run, twin, frozen)
            return Trial(run, frozen, completed=True)
        return Trial(run, frozen, completed=False)
    return _pick_up(run, frozen)


def _experiment_dirs(run: RunDir) -> list[Path]:
    """Where else the same trial may have run under this experiment (``name``): the single
    run directory and every sweep's trial directory of the same key."""
    root, key = run.root, run.root.name
    if root.parent.parent.name == "sweeps":
        experiment = root.parents[2]
    elif root.parent.name == "runs":
        experiment = root.parents[1]
    else:  # a run directory set by hand: no experiment to search
        return []
    candidates = [experiment / "runs" / key, *sorted((experiment / "sweeps").glob(f"*/{key}"))]
    return [c for c in candidates if c != root]


def completed_twin(run: RunDir, frozen: Callable[[], DictConfig]) -> RunDir | None:
    """A completed trial of this experiment with the same key and the same identity (an
    earlier sweep that this one extends, or a single run): found, it is reused, not
    trained again. Its settings that do not define a trial (paths, logger, ...) may differ.
    ``frozen`` gives this trial's config, built only when there is a candidate. A twin
    that was itself reused leads to the trial that trained."""
    for candidate in _experiment_dirs(run):
        twin = RunDir(candidate)
        try:
            if not finished(twin):
                continue
            origin = read_json(twin.result_file).get("reused_from")
            if origin and RunDir(origin).result_file.exists():
                twin = RunDir(origin)
            if not identity_changes(load_frozen(twin.config), frozen()):
                return twin
        except Exception:  # a broken sibling is not a twin, and not this trial's error
            continue
    return None


def reuse(run: RunDir, twin: RunDir, asked: DictConfig | None = None) -> None:
    """Make ``run`` a completed trial with ``twin``'s result and checkpoints: result.json is
    copied (saying where it came from, its best checkpoint re-rooted here) and each
    checkpoint file hard-linked (copied across filesystems), so deleting the earlier sweep
    later loses nothing and takes no disk twice."""
    result = read_json(twin.result_file)
    result["reused_from"] = str(twin.root)
    best = result.get("best_checkpoint")
    if twin.checkpoints.is_dir():
        run.checkpoints.mkdir(exist_ok=True)
        for file in twin.checkpoints.iterdir():
            if file.is_file() and not (run.checkpoints / file.name).exists():
                _link_or_copy(file, run.checkpoints / file.name)
        if best and Path(best).parent == twin.checkpoints:
            result["best_checkpoint"] = str(run.checkpoints / Path(best).name)
    write_json(run.result_file, result)
    run.transition("completed", reused_from=str(twin.root), metric=result.get("value"))
    log.info("%s already completed as %s: reused, not trained again", run.root, twin.root)
    if asked is not None:
        _say_logger_unchanged(twin, load_frozen(twin.config), asked)


def _link_or_copy(source: Path, target: Path) -> None:
    try:
        os.link(source, target)
    except OSError:  # another filesystem, or links not allowed
        shutil.copy2(source, target)


def open_trial_data(
    data: Callable[[], dict],
    run_dir: str | Path,
    overrides: list[str],
    text: str | None = None,
    seed: int | None = None,
) -> bool:
    """:func:`open_trial` for a frozen config held as plain data (a large sweep's trials,
    see :mod:`trainyard.bulk`): a new run directory is written without building a config
    object; an existing one is picked up the usual way. Returns whether it completed.

    A new directory is filled under a hidden name and renamed into place, so it appears
    complete or not at all, with a third of the filesystem operations that writing each
    file atomically takes (thousands of trials wait on them)."""
    run = RunDir(run_dir)
    if not run.root.exists():
        source = SOURCE_DIR if (SOURCE_DIR / ".git").exists() else Path.cwd()
        staging = run.root.with_name(f".{run.root.name}.{os.getpid()}.{threading.get_ident()}")
        staging.mkdir(parents=True)
        try:
            (staging / run.config.name).write_text(text or frozen_yaml(data()))
            info = provenance(seed, overrides, source)
            (staging / run.provenance.name).write_text(json_text(info))
            (staging / run.status_file.name).write_text(json_text(run.created_status()))
            os.rename(staging, run.root)
            twin = completed_twin(run, lambda: OmegaConf.create(data()))
            if twin is not None:
                reuse(run, twin, OmegaConf.create(data()))
            return twin is not None
        except OSError:
            if not run.root.exists():
                raise
            # another submission created it meanwhile: pick it up below
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return open_trial(OmegaConf.create(data()), run_dir, overrides).completed


def _pick_up(run: RunDir, frozen: DictConfig) -> Trial:
    if not frozen.resume:
        raise RunDirError(
            f"{run.root} already holds this trial and resume=false",
            fix="resume=true to continue it, name=<new name> for a fresh run, "
            "or remove the directory",
        )
    existing = load_frozen(run.config)
    changed = identity_changes(existing, frozen)
    if changed:
        raise RunDirError(
            f"{run.root} holds a trial with the same overrides but a different config "
            f"(changed: {', '.join(changed)}); it was left untouched",
            fix="name=<new name> to train the new config, or remove the old run directory",
        )
    if finished(run):
        origin = read_json(run.result_file).get("reused_from")
        if origin and (Path(origin) / "config.yaml").exists():  # its logs are there
            _say_logger_unchanged(RunDir(origin), load_frozen(Path(origin) / "config.yaml"), frozen)
        else:
            _say_logger_unchanged(run, existing, frozen)
        return Trial(run, existing, completed=True)
    unprune(run)
    operational = _flat_changes(existing, frozen)
    if operational:
        # where files go, how data is read: today's values apply to the next attempt
        log.info("settings changed since the last attempt: %s", ", ".join(operational))
        save_frozen(frozen, run.config)
        return Trial(run, frozen, completed=False)
    return Trial(run, existing, completed=False)


def finished(run: RunDir) -> bool:
    """Completed, and trained to its end: a trial its sweep pruned stopped early, and is
    trained on to its end when run again outside the sweep (see :func:`unprune`)."""
    done = run.state == "completed" and run.result_file.exists()
    return done and not (run.root / "pruned.json").exists()


def unprune(run: RunDir) -> None:
    """A pruned trial about to be trained again: it goes on from its last.ckpt to its end,
    no longer its sweep's to stop."""
    pruned = run.root / "pruned.json"
    if run.state != "completed" or not pruned.exists():
        return
    log.info("%s was pruned by its sweep after epoch %s: training it on to its end",
             run.root, read_json(pruned).get("epoch"))  # fmt: skip
    for name in ("pruned.json", "sweep.json"):
        (run.root / name).unlink(missing_ok=True)


def _say_logger_unchanged(run: RunDir, existing: DictConfig, asked: DictConfig) -> None:
    """A completed trial is not trained again, so another logger asked for now writes
    nothing: say where its metrics are and how to get them logged the other way."""
    before = OmegaConf.select(existing, "logger._target_", default=None)
    now = OmegaConf.select(asked, "logger._target_", default=None)
    if before == now or now is None:  # logger=none asks for nothing to be written
        return
    kept = sorted(run.root.glob("logs/version_*/metrics.csv")) or sorted(
        run.root.glob("logs/version_*")
    )
    where = f"{kept[-1].relative_to(run.root)}" if kept else "nothing: it ran with logger=none"
    log.warning(
        "%s completed with logger %s, so logger %s writes nothing for it (its metrics: %s; "
        "result.json has the final ones). To have them logged that way, train it again "
        "under another name: name=<new name> with the same overrides",
        run.root, (before or "none").rsplit(".", 1)[-1], (now or "none").rsplit(".", 1)[-1],
        where,
    )  # fmt: skip


def _flatten(node: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(node, dict):
        out: dict[str, Any] = {}
        for key, value in node.items():
            out.update(_flatten(value, f"{prefix}{key}."))
        return out or {prefix.rstrip("."): {}}
    return {prefix.rstrip("."): node}


def _flat_changes(before: DictConfig, now: DictConfig) -> list[str]:
    a = _flatten(OmegaConf.to_container(before, resolve=False))
    b = _flatten(OmegaConf.to_container(now, resolve=False))
    return sorted(k for k in {*a, *b} if a.get(k, _MISSING) != b.get(k, _MISSING))


_MISSING = object()


def identity_changes(before: DictConfig, now: DictConfig) -> list[str]:
    """The dotted keys that define a trial and differ between two frozen configs."""
    return [k for k in _flat_changes(before, now) if is_identity_key(k)]
