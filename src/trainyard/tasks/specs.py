"""Specs: the objects a task is built from, described as plain data for its checkpoints.

A spec is the resolved Hydra config of an object (``_target_`` and its arguments) in plain
dicts, lists and numbers, which ``torch.load(weights_only=True)`` reads back without running
any code. Building one is where a checkpoint could run code, as Lightning's own
``_instantiator`` guard knows: every ``_target_`` in a spec must name a class of the kind
expected (a network's spec names ``nn.Module`` classes only), checked before anything is
called. A spec that would not pass (a factory function, say) is not recorded at all.

Hydra's instantiate would also resolve interpolations (``${oc.create:{_target_: ...}}`` is a
new, unchecked target) and honour its other meta keys, and naming a module imports it: so a
spec holds no interpolation and no meta key but ``_target_``, ``_partial_`` and ``_args_``,
and a target's module must be one of :data:`TRUSTED_MODULES` before anything is imported.
A network of your own package loads with ``net=`` passed (Lightning's rule for modules), or
after adding the package here.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

# Packages whose classes a checkpoint's spec may name (checked before anything is imported).
TRUSTED_MODULES: list[str] = ["torch", "torchvision", "trainyard"]

_META = {"_target_", "_partial_", "_args_"}

# What each argument of the task is, and so what its spec may name.
KINDS: dict[str, tuple[type, ...]] = {
    "net": (nn.Module,),
    "loss": (nn.Module,),
    "optimizer": (torch.optim.Optimizer,),
    "scheduler": (torch.optim.lr_scheduler.LRScheduler, torch.optim.lr_scheduler.ReduceLROnPlateau),
}


def _targets(spec: Any, top: bool = True):
    """Every ``_target_`` in ``spec``, with whether it is the top-level one."""
    if isinstance(spec, Mapping):
        if "_target_" in spec:
            yield spec["_target_"], top
        for key, value in spec.items():
            if key != "_target_":
                yield from _targets(value, top=False)
    elif isinstance(spec, list | tuple):
        for value in spec:
            yield from _targets(value, top=False)


def _plain(spec: Any, where: str = "spec") -> None:
    """Plain data only: no interpolation to resolve, no meta key that changes building."""
    if isinstance(spec, str) and "${" in spec:
        raise ValueError(f"{where} holds an interpolation ({spec!r}): not plain data")
    if isinstance(spec, Mapping):
        for key, value in spec.items():
            if str(key).startswith("_") and str(key).endswith("_") and key not in _META:
                raise ValueError(f"{where}.{key}: only {sorted(_META)} may steer building")
            _plain(value, f"{where}.{key}")
    elif isinstance(spec, list | tuple):
        for i, value in enumerate(spec):
            _plain(value, f"{where}[{i}]")


def _trusted(target: str) -> bool:
    return any(target == m or target.startswith(f"{m}.") for m in TRUSTED_MODULES)


def check(spec: Mapping, kinds: tuple[type, ...]) -> None:
    """Refuse a spec whose target is not a class of ``kinds`` (nested ones: nn.Module) from
    a trusted package, or that is not plain data."""
    from hydra.utils import get_class

    _plain(spec)
    for target, top in _targets(spec):
        if not _trusted(str(target)):
            raise ValueError(
                f"spec target {target!r} is not in a trusted package {TRUSTED_MODULES} "
                "(pass the object itself, or add its package to "
                "trainyard.tasks.specs.TRUSTED_MODULES)"
            )
        allowed = kinds if top else (nn.Module,)
        try:
            cls = get_class(str(target))
        except Exception as exc:  # not importable, or not a class (a function)
            raise ValueError(f"spec target {target!r} is not a class: {exc}") from exc
        if not issubclass(cls, allowed):
            names = " or ".join(k.__name__ for k in allowed)
            raise ValueError(f"spec target {target!r} is not a {names}")


def recordable(spec: Mapping, kinds: tuple[type, ...]) -> bool:
    try:
        check(spec, kinds)
    except ValueError:
        return False
    return True


def build(spec: Mapping, kinds: tuple[type, ...]) -> Any:
    """The object (or, with ``_partial_``, the factory) a checked spec describes."""
    from hydra.utils import instantiate

    check(spec, kinds)
    return instantiate(dict(spec), _convert_="all")


def architecture(spec: Mapping) -> dict:
    """A network's spec without what only initialises its weights (a pretrained weights
    file): the checkpoint's state_dict replaces those, and the file named where it trained
    need not exist where it is loaded. A model class lists such arguments in
    ``init_only_args``."""
    from hydra.utils import get_class

    dropped = getattr(get_class(str(spec["_target_"])), "init_only_args", ())
    return {key: (None if key in dropped else value) for key, value in spec.items()}
