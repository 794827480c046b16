"""Search spaces and studies for trainyard's Optuna sweeper
(:mod:`hydra_plugins.trainyard.optuna_sweeper`).

A search space is written in Hydra's override grammar, on the command line or under
``hydra.sweeper.params``, so it reads as any other Hydra sweep:

- ``optimizer.lr=tag(log,interval(1e-5,1e-1))``: a float, sampled on a log scale;
- ``model.hidden=tag(int,interval(32,512))``: an integer (``tag(int,log,...)`` for both);
- ``optimizer=choice(adam,sgd)`` or ``optimizer=adam,sgd``: one of these;
- ``data.batch_size=range(32,257,32)``: one of 32, 64, ..., 256.

Every dimension is checked before the study is created: an empty range, ``low > high``, a
log scale reaching zero are refused naming the fix. The study is stored on disk
(``<sweep dir>/study.journal``, Optuna's journal storage, which several processes may
append to at once), with what defines it (space, metric, direction, the sweep's fixed
overrides) recorded in it: relaunching the same sweep continues it, and a storage holding
another study is refused, untouched.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from trainyard.errors import ConfigError

_SPACE_FIX = (
    "write it as tag(log,interval(LOW,HIGH)) with 0 < LOW < HIGH, interval(LOW,HIGH) with "
    "LOW < HIGH, choice(A,B,...) or range(START,STOP[,STEP]) with values in it"
)


class StudyMismatch(ConfigError):
    """The storage holds a study that is not this sweep's."""


def parse_space(overrides: list[str]) -> tuple[dict[str, Any], list[str]]:
    """Split ``key=value`` overrides into Optuna distributions (the sweep overrides) and the
    fixed overrides every trial gets. Raises ConfigError for a dimension that cannot be
    sampled."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    space, fixed = {}, []
    for override in OverridesParser.create().parse_overrides(overrides):
        if override.is_sweep_override():
            space[override.get_key_element()] = _distribution(override)
        else:
            fixed.append(override.input_line)
    return space, fixed


def _distribution(override: Any) -> Any:
    from optuna.distributions import (
        CategoricalDistribution,
        FloatDistribution,
        IntDistribution,
    )

    key = override.get_key_element()
    if override.is_interval_sweep():
        value = override.value()
        tags, low, high = set(value.tags), value.start, value.end
        if not (low < high):
            raise ConfigError(f"{key}=interval({low:g},{high:g}): low must be below high",
                              fix=_SPACE_FIX)  # fmt: skip
        if "log" in tags and low <= 0:
            raise ConfigError(
                f"{key}: a log scale from {low:g} reaches zero or below, where no log is",
                fix=f"tag(log,interval(<a small positive value>,{high:g})), or drop the log tag",
            )
        if "int" in tags:
            if low != int(low) or high != int(high):
                raise ConfigError(f"{key}: tag(int,...) needs whole bounds", fix=_SPACE_FIX)
            return IntDistribution(int(low), int(high), log="log" in tags)
        return FloatDistribution(float(low), float(high), log="log" in tags)
    choices = list(override.sweep_iterator())
    if not choices:
        raise ConfigError(f"{key}: {override.input_line.split('=', 1)[1]} has no values",
                          fix=_SPACE_FIX)  # fmt: skip
    for choice in choices:
        if isinstance(choice, float) and not math.isfinite(choice):
            raise ConfigError(f"{key}: {choice} cannot be a trial's value", fix=_SPACE_FIX)
    return CategoricalDistribution(choices)


def grid(space: dict[str, Any]) -> dict[str, list[Any]]:
    """The grid of a space of choices (the grid sampler needs every dimension discrete)."""
    out = {}
    for key, dist in space.items():
        if not hasattr(dist, "choices"):
            raise ConfigError(
                f"{key}: a grid needs a list of values, not an interval",
                fix=f"{key}=choice(...) or range(...), or sweep=random / sweep=bayes",
            )
        out[key] = list(dist.choices)
    return out


def override_value(value: Any) -> str:
    """A sampled value as Hydra's override grammar reads it back."""
    if isinstance(value, str):
        return value
    if isinstance(value, float):
        return repr(value)
    return json.dumps(value)


def definition(space: dict[str, Any], fixed: list[str], metric: str, direction: str) -> dict:
    """What makes two launches the same study, as stored in it."""
    from optuna.distributions import distribution_to_json

    return {
        "space": {k: json.loads(distribution_to_json(v)) for k, v in sorted(space.items())},
        "fixed": sorted(fixed),
        "metric": metric,
        "direction": direction,
    }


def open_study(path: Path, name: str, defined: dict, sampler: Any, pruner: Any) -> Any:
    """Create the study at ``path``, or load the one there when it is this sweep's."""
    import optuna
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    path.parent.mkdir(parents=True, exist_ok=True)
    existed = path.exists() and path.stat().st_size > 0
    if existed:
        _check_journal(path)
    try:
        storage = JournalStorage(JournalFileBackend(str(path)))
        names = [s.study_name for s in optuna.get_all_study_summaries(storage)]
        if existed and name not in names:
            raise StudyMismatch(
                f"{path} holds the study {', '.join(names) or '(none)'}, not this sweep's ({name})",
                fix="hydra.sweeper.storage=<a new file> for this sweep, or relaunch the "
                "sweep that wrote it",
            )
        study = optuna.create_study(storage=storage, study_name=name, sampler=sampler,
                                    pruner=pruner, direction=defined["direction"],
                                    load_if_exists=True)  # fmt: skip
        stored = study.user_attrs.get("trainyard")
        study.trials  # noqa: B018  (every record read now, not half way through the sweep)
    except ConfigError:
        raise
    except Exception as exc:  # the journal's own errors: unreadable, not a journal, cut
        raise ConfigError(
            f"the study file {path} cannot be read ({type(exc).__name__}: {exc}); it was "
            "left as it is",
            fix="move it away to start the study afresh, or hydra.sweeper.storage=<another file>",
        ) from None
    if stored is None:
        study.set_user_attr("trainyard", defined)
    elif stored != defined:
        changed = [k for k in defined if stored.get(k) != defined[k]]
        raise StudyMismatch(
            f"{path} holds a study of this name with another {', '.join(changed)}; it was "
            "left as it is",
            fix="relaunch with the sweep's original settings to continue it, or "
            "hydra.sweeper.storage=<a new file> (or another name=) for a new study",
        )
    return study


def _check_journal(path: Path) -> None:
    """Every record of an existing journal reads, before anything is appended to it (Optuna
    would append a new study after a record it cannot read, burying the old one)."""
    data = path.read_bytes()
    lines = data.splitlines()
    if lines and not data.endswith(b"\n"):
        lines.pop()  # cut short by a writer that died mid-record: Optuna skips it too
    for number, line in enumerate(lines, 1):
        try:
            record = json.loads(line)
        except ValueError as exc:
            record, error = None, exc
        if not isinstance(record, dict) or "op_code" not in record:
            raise ConfigError(
                f"the study file {path} cannot be read: line {number} is not one of Optuna's "
                f"journal records ({error if record is None else 'no op_code'}); it was left "
                "as it is",
                fix="move it away to start the study afresh, or hydra.sweeper.storage=<another "
                "file>",
            )


def sampler(kind: str, space: dict[str, Any], seed: int | None) -> Any:
    import optuna

    if kind == "grid":
        return optuna.samplers.GridSampler(grid(space), seed=seed)
    if kind == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    if kind == "tpe":
        return optuna.samplers.TPESampler(seed=seed, constant_liar=True)
    raise ConfigError(f"hydra.sweeper.sampler={kind}", fix="sampler=grid, random or tpe")


def pruner(kind: str | None, min_resource: int = 1, reduction_factor: int = 3) -> Any:
    import optuna

    if kind in (None, "none"):
        return optuna.pruners.NopPruner()
    if kind == "median":
        return optuna.pruners.MedianPruner(n_warmup_steps=min_resource)
    if kind in ("asha", "successive_halving"):
        return optuna.pruners.SuccessiveHalvingPruner(
            min_resource=min_resource, reduction_factor=reduction_factor
        )
    raise ConfigError(f"hydra.sweeper.pruner={kind}", fix="pruner=none, median or asha")
