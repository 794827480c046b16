"""Where trainyard's Hydra configs live: :data:`CONF_DIR`.

The configs are kept in the repository's top-level ``conf/`` directory. ``src/trainyard/conf``
is a relative symlink to it (``../../conf``), and pyproject.toml ships the YAML files under
it as package data (``trainyard/conf/**/*.yaml``, minus ``conf/local/``). So one location,
``conf`` next to this module, is right however trainyard runs:

* installed from a wheel or sdist (``pip install .``, container images): real files inside
  the installed package;
* editable install or checkout (``pip install -e .``, ``make install``): the symlink, i.e. the
  repository's ``conf/`` itself, so edits there take effect without reinstalling.

A file next to the package rather than a path computed from the source tree (the old
``<repo>/conf`` via ``parents[2]``) because only the former exists once installed. Where the
symlink did not survive (a checkout on a filesystem without symlinks), the repository's
``conf/`` is used directly.

``$TRAINYARD_CONF`` replaces the whole config tree. To *add* configs (an experiment of your
own, site-wide defaults) keep the shipped tree and extend Hydra's search path::

    trainyard-train --config-dir ~/my_conf experiment=mine
    trainyard-train 'hydra.searchpath=[file:///abs/my_conf]' experiment=mine

Standard library only: :mod:`trainyard.train` reads this at import time, and tests and tools
import it without paying for torch or Hydra.
"""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["CONF_DIR"]

_ENTRY = "train.yaml"


def _default_conf_dir() -> Path:
    package_dir = Path(__file__).resolve().parent
    shipped = package_dir / "conf"
    if (shipped / _ENTRY).is_file():
        return shipped.resolve()  # through the symlink in a checkout: <repo>/conf
    checkout = package_dir.parents[1] / "conf"  # src/trainyard -> <repo>/conf
    if (checkout / _ENTRY).is_file():
        return checkout
    return shipped  # missing: Hydra's "cannot find primary config" names this path


def _conf_dir() -> Path:
    override = os.environ.get("TRAINYARD_CONF")
    if override:
        # Absolute: Hydra takes a relative config_path relative to trainyard/train.py.
        return Path(override).expanduser().resolve()
    return _default_conf_dir()


CONF_DIR: Path = _conf_dir()
"""The primary config directory (holds ``train.yaml``): ``$TRAINYARD_CONF`` if set, else the
configs shipped with the package."""
