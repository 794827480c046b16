"""Preparing a large sweep: compose and freeze once per group of trials, patch per trial.

Composing, resolving and checking a config through OmegaConf costs milliseconds, which a
10,000-trial sweep pays 10,000 times. Trials that share their config-group choices and set
the same keys to plain values differ only in those values and in their run directory, so
one :class:`Template` freezes the group once and each trial is that frozen data with its
own values put in: plain dictionaries, no OmegaConf.

That holds only if what else in the config depends on those keys merely copies them (an
alias such as ``data.seed: ${seed}``, the run directory inside a path) and nothing derives
anything else from them (``${now:}`` of the run directory, arithmetic). A template proves
it before it is used: it freezes the group with two different values of every varying key
and two different run directories and requires that the results differ exactly where the
patch puts them; otherwise the group is prepared trial by trial, the slow and
always-correct way.
"""

from __future__ import annotations

import contextlib
import copy
import re
from collections.abc import Iterator
from typing import Any

from omegaconf import DictConfig, OmegaConf

_RUN_DIR = "paths.run_dir"
_PROBES = ("/@trainyard-probe-a@", "/@trainyard-probe-b@")


def _freeze_data(cfg: DictConfig) -> dict:
    from trainyard.freeze import freeze

    return OmegaConf.to_container(freeze(cfg), resolve=False)


def _with(cfg: DictConfig, values: dict[str, Any], run_dir: str) -> DictConfig:
    out = copy.deepcopy(cfg)
    for key, value in {**values, _RUN_DIR: run_dir}.items():
        OmegaConf.update(out, key, value, merge=False)
    return out


def _replace(node: Any, old: str, new: str) -> Any:
    if isinstance(node, dict):
        return {k: _replace(v, old, new) for k, v in node.items()}
    if isinstance(node, list):
        return [_replace(v, old, new) for v in node]
    return node.replace(old, new) if isinstance(node, str) else node


def _differences(a: Any, b: Any, prefix: tuple = ()) -> list[tuple] | None:
    """Where two frozen configs differ (None: they differ in shape)."""
    if isinstance(a, dict) and isinstance(b, dict):
        if a.keys() != b.keys():
            return None
        found: list[tuple] = []
        for key in a:
            inner = _differences(a[key], b[key], (*prefix, key))
            if inner is None:
                return None
            found += inner
        return found
    if isinstance(a, list) and isinstance(b, list):
        if len(a) != len(b):
            return None
        found = []
        for index, (x, y) in enumerate(zip(a, b, strict=True)):
            inner = _differences(x, y, (*prefix, index))
            if inner is None:
                return None
            found += inner
        return found
    return [] if a == b and type(a) is type(b) else [prefix]


def _at(data: Any, path: tuple) -> Any:
    for part in path:
        data = data[part]
    return data


def _set_at(data: Any, path: tuple, value: Any) -> None:
    *parents, last = path
    for part in parents:
        data = data[part]
    data[last] = value


def _paths_with(node: Any, text: str, prefix: tuple = ()) -> list[tuple]:
    """Where in ``node`` a string contains ``text`` (keys and list indices)."""
    if isinstance(node, dict):
        return [p for k, v in node.items() for p in _paths_with(v, text, (*prefix, k))]
    if isinstance(node, list):
        return [p for i, v in enumerate(node) for p in _paths_with(v, text, (*prefix, i))]
    return [prefix] if isinstance(node, str) and text in node else []


_SAFE_RUN_DIR = re.compile(r"^[A-Za-z0-9_./+-]+$")  # stays one plain YAML scalar


def _scalar(value: Any) -> str | None:
    """How the frozen config's dumper writes ``value`` after ``key: `` (one line)."""
    from trainyard.freeze import frozen_yaml

    text = frozen_yaml({"k": value})
    scalar = text[len("k: ") : -1]
    return None if "\n" in scalar or not text.startswith("k: ") else scalar


def _same(a: Any, b: Any) -> bool:
    """Equal and of the same type (1, 1.0 and True are three different values here)."""
    return type(a) is type(b) and a == b


def plain(value: Any) -> bool:
    """A value a template can put in as it is: a scalar that is not an interpolation."""
    if isinstance(value, str):
        return "${" not in value
    return value is None or isinstance(value, bool | int | float)


class Template:
    """One group of trials: ``base`` (composed, value overrides not applied) and the keys
    whose values vary. ``usable`` is False when the group must go trial by trial."""

    def __init__(self, base: DictConfig, samples: list[dict[str, Any]]):
        self.keys = sorted({k for s in samples for k in s})
        first = samples[0]
        self.usable = all(plain(v) for s in samples for v in s.values()) and all(
            set(s) == set(first) for s in samples
        )
        if not self.usable:
            return
        self.base = base
        try:
            self._data = _freeze_data(_with(base, first, _PROBES[0]))
            self.usable = self._proven(first, samples)
        except Exception:  # a bad key or value: trial by trial, Hydra's error names it
            self.usable = False
        self._text: str | None = None
        self._proved: bool | None = None
        self.shared_checked: Any = None  # what every trial's checks give alike (submit)
        if self.usable:
            self._run_dir_at = _paths_with(self._data, _PROBES[0])
            self.check_view = OmegaConf.create(self._data)

    def _proven(self, first: dict[str, Any], samples: list[dict[str, Any]]) -> bool:
        """Find where each key's value lands (its own place and its aliases) and prove
        that nothing else changes with it."""
        moved = _freeze_data(_with(self.base, first, _PROBES[1]))
        if moved != _replace(self._data, _PROBES[0], _PROBES[1]):
            return False  # something derives from the run directory other than by text
        self._places: dict[str, list[tuple]] = {}
        for key in self.keys:
            other = next((s[key] for s in samples if not _same(s[key], first[key])), None)
            if other is None:
                self._places[key] = [tuple(key.split("."))]
                continue  # the same in every trial: nothing to prove
            probe = _freeze_data(_with(self.base, {**first, key: other}, _PROBES[0]))
            places = _differences(self._data, probe)
            if not places or tuple(key.split(".")) not in places:
                return False
            for path in places:  # each one must be a copy of the value, nothing derived
                for data, value in ((probe, other), (self._data, first[key])):
                    found = _at(data, path)
                    if found != value or type(found) is not type(value):
                        return False
            self._places[key] = places
        return True

    def value(self, key: str) -> Any:
        """A setting every trial of the template shares (unless it is one of the keys)."""
        return _at(self._data, tuple(key.split(".")))

    def data(self, values: dict[str, Any], run_dir: str) -> dict:
        """The frozen config of the trial with these values, as plain data."""
        data = copy.deepcopy(self._data)
        for key, value in values.items():
            for path in self._places[key]:
                _set_at(data, path, value)
        for path in self._run_dir_at:
            _set_at(data, path, _at(data, path).replace(_PROBES[0], run_dir))
        return data

    def yaml(self, values: dict[str, Any], run_dir: str) -> str | None:
        """The trial's config.yaml text, made from the template's text by replacing the
        placeholders (YAML from PyYAML's representer costs ~1 ms a trial); None when a
        value or the run directory is not safe to put into the text that way."""
        if self._proved is None:
            self._proved = self._prove(values, run_dir)
        return self._fill(values, run_dir) if self._proved else None

    def _fill(self, values: dict[str, Any], run_dir: str) -> str | None:
        if self._text is None or not _SAFE_RUN_DIR.match(run_dir):
            return None
        text = self._text.replace(_PROBES[0], run_dir)
        for key, value in values.items():
            scalar = _scalar(value)
            if scalar is None:
                return None
            text = text.replace(self._placeholders[key], scalar)
        return text

    def _make_text(self) -> str | None:
        """The template's YAML with one placeholder scalar per varying key, proven on the
        first sample against the dumper and OmegaConf's loader."""
        from trainyard.freeze import frozen_yaml

        data = copy.deepcopy(self._data)
        self._placeholders = {}
        for number, key in enumerate(self.keys):
            placeholder = f"trainyard-placeholder-{number}"
            self._placeholders[key] = _scalar(placeholder)
            for path in self._places[key]:
                _set_at(data, path, placeholder)
        self._text = frozen_yaml(data)
        return self._text

    def _prove(self, values: dict[str, Any], run_dir: str) -> bool:
        """Whether the text path reads back exactly as the trial's data (checked once)."""
        from trainyard.freeze import load_frozen_text

        self._make_text()
        text = self._fill(values, run_dir)
        if text is None:
            return False
        return _differences(load_frozen_text(text), self.data(values, run_dir)) == []

    def places_under(self, prefixes: tuple[str, ...]) -> bool:
        """Whether a varying value lands anywhere under these top-level keys."""
        return any(path[0] in prefixes for places in self._places.values() for path in places)

    @contextlib.contextmanager
    def applied(self, values: dict[str, Any]) -> Iterator[DictConfig]:
        """The template's checkable config with these values set at every place they land
        (aliases included), restored afterwards: what the checks see of one trial, without
        building a config per trial."""
        view = self.check_view
        paths = [(path, value) for key, value in values.items() for path in self._places[key]]
        saved = [(path, _at(view, path)) for path, _ in paths]
        for path, value in paths:
            _set_at(view, path, value)
        try:
            yield view
        finally:
            for path, value in saved:
                _set_at(view, path, value)


__all__ = ["Template", "plain"]
