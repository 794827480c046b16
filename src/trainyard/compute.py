"""How the network's arithmetic runs: float32 matmul precision, cuDNN autotuning, compiling.

These are read from ``trainer.*`` (they are set where the rest of the training machinery
is), but only ``benchmark`` is a Lightning Trainer argument: the others are taken out of
the Trainer's arguments and applied here.

- ``float32_matmul_precision`` is always set from the config, so the precision of float32
  matrix products is a choice the config states (``highest``: exact float32; ``high``:
  TF32 on Ampere and later GPUs). Lightning's advice to set it is therefore not printed
  (:func:`trainyard.worker._quiet_lightning`): whatever it says, the config already chose.
- ``benchmark: null`` turns cuDNN autotuning on for GPU runs: trainyard's batches keep one
  shape for a whole run (a trailing partial batch is tuned once more), which is the case
  it is made for. Deterministic runs keep it off, as Lightning does.
- ``compile`` compiles the network in place (``nn.Module.compile``: parameter names, and
  so checkpoints, are unchanged). Off by default: on the small, launch-bound models
  measured on an H200 the default mode was slower, and compiling takes seconds to
  minutes before the first step (issue 10's notes).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from trainyard.errors import ConfigError

# trainer.* keys that are trainyard's, not Lightning Trainer arguments (checked by preflight)
TRAINER_KEYS = ("compile", "compile_mode", "float32_matmul_precision")
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
MATMUL_PRECISIONS = ("highest", "high", "medium")


def check(trainer: Mapping) -> None:
    """Refuse values torch would refuse only once the run started."""
    compile_ = trainer.get("compile", False)
    if not isinstance(compile_, bool):
        raise ConfigError(
            f"trainer.compile must be true or false, got {compile_!r}",
            fix=f"trainer.compile=true trainer.compile_mode=<{' | '.join(COMPILE_MODES)}>",
        )
    for key, allowed in (
        ("compile_mode", COMPILE_MODES),
        ("float32_matmul_precision", MATMUL_PRECISIONS),
    ):
        value = trainer.get(key)
        if value is not None and value not in allowed:
            raise ConfigError(
                f"trainer.{key}={value!r} is not one of {', '.join(allowed)}",
                fix=f"trainer.{key}={allowed[0]}",
            )


def take_settings(trainer_kwargs: dict[str, Any]) -> dict[str, Any]:
    """Remove trainyard's own keys from the Trainer's arguments; return them."""
    return {key: trainer_kwargs.pop(key) for key in TRAINER_KEYS if key in trainer_kwargs}


def set_matmul_precision(precision: str | None) -> None:
    import torch

    if precision is not None:
        torch.set_float32_matmul_precision(precision)


def cudnn_benchmark(trainer_kwargs: Mapping, accelerator: str) -> bool:
    """``benchmark`` as given, or (null) on for GPU runs that need not be deterministic."""
    given = trainer_kwargs.get("benchmark")
    if given is not None:
        return bool(given)
    return accelerator in ("gpu", "cuda") and not trainer_kwargs.get("deterministic")


def compile_network(net: Any, mode: str | None) -> None:
    """Compile ``net`` in place; compilation itself happens at its first call."""
    net.compile(mode=None if mode in (None, "default") else mode)
