"""Composing trials on the submitting machine: a sweep's expansion, and Hydra's composition
done once per distinct set of config-group choices (:class:`Composer`).

Hydra composes a config from the defaults list (the group choices) and then applies the
value overrides to the result; trials that share the first part share one composition, and
each applies its value overrides to a copy with Hydra's own function. Large sweeps go further
(:mod:`trainyard.bulk`).
"""

from __future__ import annotations

import contextlib
import copy
from collections import defaultdict
from collections.abc import Iterator
from typing import Any

from omegaconf import DictConfig

from trainyard.errors import ConfigError


def expand(overrides: list[str]) -> list[list[str]]:
    """A sweep's overrides as one list per trial (Hydra's basic sweeper's expansion)."""
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.override_parser.overrides_parser import OverridesParser

    try:
        parsed = OverridesParser.create().parse_overrides(overrides)
    except Exception as exc:  # Hydra's grammar error names the bad override
        raise ConfigError(str(exc), fix="check the quoting of that override") from None
    [trials] = BasicSweeper.split_arguments(parsed, None)
    return [list(trial) for trial in trials]


class Composer:
    """Hydra's composition, done once per distinct set of config-group choices.

    Hydra composes a config from the defaults list (the group choices) and then applies the
    value overrides to the result; a sweep over values shares the first part, so it is done
    once and each trial applies its value overrides to a copy, with Hydra's own function
    (``ConfigLoaderImpl._apply_overrides_to_config``). Overrides of ``hydra.*`` (a search
    path) can change what a group is: such trials are composed in full.
    """

    def __enter__(self) -> Composer:
        from hydra import initialize_config_dir
        from hydra.core.global_hydra import GlobalHydra
        from hydra.core.override_parser.overrides_parser import OverridesParser

        from trainyard import resolvers
        from trainyard.conf_path import CONF_DIR

        resolvers.register()
        GlobalHydra.instance().clear()
        self._context = initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3")
        self._context.__enter__()
        self._parser = OverridesParser.create()
        self._repo = GlobalHydra.instance().config_loader().repository
        self._groups: dict[str, bool] = {}
        self._base: dict[tuple[str, ...], DictConfig] = {}
        self.samples: list[dict[str, Any] | None] = []
        return self

    def __exit__(self, *exc_info) -> None:
        from hydra.core.global_hydra import GlobalHydra

        self._context.__exit__(*exc_info)
        GlobalHydra.instance().clear()

    def compose(self, overrides: list[str]) -> DictConfig:
        from hydra._internal.config_loader_impl import ConfigLoaderImpl

        with _hydra_errors():
            parsed = self._parser.parse_overrides(overrides)
            if any(o.is_hydra_override() for o in parsed):
                return self._compose(tuple(overrides))
            groups, values = self._split(parsed)
            cfg = copy.deepcopy(self._base_of(groups))
            ConfigLoaderImpl._apply_overrides_to_config(values, cfg)
            return cfg

    def templates(self, trials: list[list[str]]) -> dict[int, Any]:
        """Trial index -> the :class:`~trainyard.bulk.Template` that freezes it, for the
        trials of groups a template can serve (the others are composed one by one)."""
        from hydra.core.override_parser.types import OverrideType

        from trainyard import bulk

        groups: dict[tuple, list[int]] = defaultdict(list)
        samples: list[dict[str, Any] | None] = []
        # overrides every trial has (`+cluster.x=1` beside `optimizer.lr=1e-3,1e-2`) are
        # composed into the template; only the ones that vary must be plain `key=value`
        common = set.intersection(*(set(t) for t in trials)) if trials else set()
        with _hydra_errors():
            for index, trial in enumerate(trials):
                parsed = self._parser.parse_overrides([o for o in trial if o not in common])
                group, values = self._split(parsed)
                keys = [o.key_or_group for o in values]
                simple = (
                    not any(o.is_hydra_override() for o in parsed)
                    and all(o.type == OverrideType.CHANGE and bulk.plain(o.value()) for o in values)
                    and len(set(keys)) == len(keys)
                    and not any(c.lstrip("+~").split("=")[0] in keys for c in common)
                )  # fmt: skip
                samples.append({o.key_or_group: o.value() for o in values} if simple else None)
                if simple:
                    groups[(group, tuple(sorted(keys)))].append(index)
        shared = tuple(o for o in trials[0] if o in common) if trials else ()
        out: dict[int, Any] = {}
        for (group, _), indices in groups.items():
            if len(indices) < 2:
                continue
            base = self._base_of(shared + group)
            template = bulk.Template(base, [samples[i] for i in indices])
            if template.usable:
                out.update({i: template for i in indices})
        self.samples = samples
        return out

    def _split(self, parsed) -> tuple[tuple[str, ...], list]:
        groups = tuple(o.input_line for o in parsed if self._is_group(o))
        return groups, [o for o in parsed if not self._is_group(o)]

    def _base_of(self, groups: tuple[str, ...]) -> DictConfig:
        if groups not in self._base:
            self._base[groups] = self._compose(groups)
        return self._base[groups]

    def _compose(self, overrides: tuple[str, ...]) -> DictConfig:
        from hydra import compose as hydra_compose

        return hydra_compose("train", overrides=list(overrides))

    def _is_group(self, override) -> bool:
        return is_group_choice(override, self._repo, self._groups)


def is_group_choice(override: Any, repository: Any, known: dict[str, bool]) -> bool:
    """As Hydra splits overrides (``defaults_list.Overrides``): a config group's choice
    unless its value is a dict. ``known`` caches the repository's answers by key."""
    key = override.key_or_group
    if key not in known:
        known[key] = repository.group_exists(key)
    return known[key] and not isinstance(override.value(), dict)


@contextlib.contextmanager
def _hydra_errors() -> Iterator[None]:
    from hydra.errors import HydraException

    try:
        yield
    except HydraException as exc:  # unknown option, key or group: Hydra lists the choices
        fix = "see trainyard-train --help for groups and keys"
        raise ConfigError(str(exc), fix=fix) from None
