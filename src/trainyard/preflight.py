"""Pre-flight checks on the frozen config: fail in a second, with the fix, not after the
imports, the queue or the first epoch.

Configs are plain YAML, so Hydra cannot type-check them; the settings most often mistyped
on a command line are checked here by name.
"""

from __future__ import annotations

import os
import re
from typing import Any

from omegaconf import DictConfig, OmegaConf

from trainyard.errors import ConfigError

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")
_PRECISIONS = {
    "32-true", "32", "64-true", "64", "bf16-mixed", "bf16-true", "16-mixed", "16-true",
    "transformer-engine",
}  # fmt: skip
_CPU_PRECISIONS = {"32-true", "32", "64-true", "64", "bf16-mixed", "bf16-true"}


def _int(cfg: DictConfig, key: str, minimum: int, example: int, optional: bool = False) -> None:
    value = OmegaConf.select(cfg, key)
    if value is None and optional:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(
            f"{key} must be an integer >= {minimum}, got {value!r} ({type(value).__name__})",
            fix=f"{key}={example}",
        )


def _number(cfg: DictConfig, key: str, example: float, optional: bool = False) -> None:
    value = OmegaConf.select(cfg, key)
    if value is None and optional:
        return
    if isinstance(value, bool) or not isinstance(value, int | float) or value <= 0:
        raise ConfigError(
            f"{key} must be a number > 0, got {value!r} ({type(value).__name__})",
            fix=f"{key}={example}",
        )


def check_types(cfg: DictConfig) -> None:
    if not isinstance(cfg.get("name"), str) or not _NAME.match(cfg.name):
        raise ConfigError(
            f"name must be letters, digits, '.', '_' or '-' (it names a directory), "
            f"got {cfg.get('name')!r}",
            fix="name=my_experiment",
        )
    _int(cfg, "seed", 0, 42)
    _int(cfg, "trainer.max_epochs", -1, 10, optional=True)
    _int(cfg, "trainer.max_steps", -1, 1000)
    _int(cfg, "trainer.num_nodes", 1, 1)
    _int(cfg, "trainer.accumulate_grad_batches", 1, 1)
    _int(cfg, "data.batch_size", 1, 64)
    _int(cfg, "data.num_workers", 0, 2, optional=True)
    _number(cfg, "optimizer.lr", 1e-3)
    _number(cfg, "dist.timeout_s", 300)
    _number(cfg, "trainer.gradient_clip_val", 1.0, optional=True)
    precision = str(cfg.trainer.get("precision", "32-true"))
    if precision not in _PRECISIONS:
        raise ConfigError(
            f"trainer.precision={precision!r} is not a precision Lightning knows",
            fix=f"one of {', '.join(sorted(_PRECISIONS))}",
        )
    if cfg.get("monitor_mode") not in ("min", "max"):
        raise ConfigError(f"monitor_mode must be min or max, got {cfg.get('monitor_mode')!r}")


def visible_gpus() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def resolve_devices(cfg: DictConfig) -> tuple[str, int]:
    """Concrete (accelerator, devices per node), checked against this machine."""
    accelerator = str(cfg.trainer.get("accelerator", "cpu"))
    devices: Any = cfg.trainer.get("devices", 1)
    if accelerator == "auto":
        accelerator = "gpu" if visible_gpus() else "cpu"
    if accelerator == "cuda":
        accelerator = "gpu"
    if accelerator not in ("cpu", "gpu"):
        raise ConfigError(f"trainer.accelerator={accelerator!r} is not supported", fix="cpu or gpu")
    available = visible_gpus() if accelerator == "gpu" else (os.cpu_count() or 1)
    if accelerator == "gpu" and available == 0:
        raise ConfigError(
            "trainer.accelerator=gpu but no CUDA GPU is visible on this machine",
            fix="trainer=cpu here, or submit to a GPU cluster (cluster=slurm / k8s)",
        )
    if devices in ("auto", -1, "-1"):
        devices = available if accelerator == "gpu" else 1
    if isinstance(devices, list | tuple) or OmegaConf.is_list(devices):
        devices = len(devices)
    if isinstance(devices, str) and devices.isdigit():
        devices = int(devices)
    if isinstance(devices, bool) or not isinstance(devices, int) or devices <= 0:
        raise ConfigError(
            f"trainer.devices must be a positive integer, got {devices!r}",
            fix="trainer.devices=1 (or the number of GPUs / CPU processes per node)",
        )
    if devices > available and not launched_externally():
        unit = "GPUs" if accelerator == "gpu" else "CPU cores"
        raise ConfigError(
            f"trainer.devices={devices} but this machine has {available} {unit}",
            fix=f"trainer.devices={available} or fewer, or submit to a cluster",
        )
    if accelerator == "cpu" and str(cfg.trainer.get("precision")) not in _CPU_PRECISIONS:
        raise ConfigError(
            f"trainer.precision={cfg.trainer.precision} needs a GPU",
            fix="trainer.precision=32-true (or bf16-mixed) on CPU",
        )
    return accelerator, devices


def launched_externally() -> bool:
    """Ranks were started by a scheduler (srun, torchrun, a Kubernetes agent)."""
    if "TORCHELASTIC_RUN_ID" in os.environ:
        return True
    return int(os.environ.get("SLURM_NTASKS", "1")) > 1 and "SLURM_PROCID" in os.environ


def check(cfg: DictConfig) -> DictConfig:
    """Validate the frozen config; return it with accelerator and devices made concrete."""
    check_types(cfg)
    accelerator, devices = resolve_devices(cfg)
    strategy = str(cfg.trainer.get("strategy", "auto"))
    if devices > 1 and strategy == "auto":
        raise ConfigError(
            f"trainer.devices={devices} needs a data-parallel strategy",
            fix="trainer=ddp (or trainer.strategy=ddp)",
        )
    if cfg.trainer.num_nodes > 1 and not launched_externally():
        raise ConfigError(
            f"trainer.num_nodes={cfg.trainer.num_nodes} needs a scheduler to start the ranks "
            "on every node",
            fix="submit with cluster=slurm (or k8s), or set trainer.num_nodes=1",
        )
    cfg.trainer.accelerator = accelerator
    cfg.trainer.devices = devices
    return cfg
