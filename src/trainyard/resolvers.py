"""OmegaConf resolvers that trainyard's configs use. ``register()`` is idempotent."""

from __future__ import annotations

import os

from omegaconf import OmegaConf

from trainyard.rundir import trial_key


def register() -> None:
    if OmegaConf.has_resolver("trainyard.trial_key"):
        return
    OmegaConf.register_new_resolver("trainyard.trial_key", lambda ov: trial_key(list(ov)))
    # Cached: Hydra copies a sweep's resolver cache into each job's config, so every job
    # of a sweep sees the key computed from the sweep's own overrides (not the job's).
    OmegaConf.register_new_resolver(
        "trainyard.sweep_key", lambda ov: trial_key(list(ov)), use_cache=True
    )
    OmegaConf.register_new_resolver("trainyard.cwd", os.getcwd)
