"""Where trials run: one module per backend behind one interface (:class:`base.Backend`).

Backends are imported by name only when used, so the CLI stays fast and a backend's heavy
dependencies are needed only by those who use it (torchx's registry).
"""

from __future__ import annotations

import importlib

from trainyard.backends.base import Backend, Job, Resources
from trainyard.errors import ConfigError

_REGISTRY = {
    "local": "trainyard.backends.local:LocalBackend",
    "slurm": "trainyard.backends.slurm:SlurmBackend",
    "k8s": "trainyard.backends.kubernetes:KubernetesBackend",
    "ray": "trainyard.backends.ray:RayBackend",
}


def get(name: str) -> Backend:
    """The backend called ``name`` (``cluster.backend`` in the config)."""
    if name not in _REGISTRY:
        raise ConfigError(
            f"cluster backend {name!r} does not exist",
            fix=f"cluster=<one of {', '.join(sorted(_REGISTRY))}>",
        )
    module, cls = _REGISTRY[name].split(":")
    return getattr(importlib.import_module(module), cls)()


__all__ = ["Backend", "Job", "Resources", "get"]
