"""Pre-flight checks: fail in a second, with the fix, not after the queue or the first epoch.

Two kinds, run in two places:

- :func:`check_config` needs only the config, so it runs where a trial is prepared (the
  submitting machine, possibly a login node without GPUs): types and ranges of the settings
  most often mistyped on a command line (configs are plain YAML, so Hydra cannot
  type-check them), consistency between settings, and every value a constructor would
  refuse, found by building what is cheap (optimizer and scheduler on a dummy parameter,
  the loss, the data module and the network).
- :func:`resolve_devices` needs the machine (GPUs visible, cores), so it runs where the
  ranks start, just before training.
"""

from __future__ import annotations

import contextlib
import math
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from trainyard import compute
from trainyard.errors import ConfigError, TrainyardError

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")
_PRECISIONS = {
    "32-true", "32", "64-true", "64", "bf16-mixed", "bf16-true", "16-mixed", "16-true",
    "transformer-engine",
}  # fmt: skip
# what trainyard.tasks.Classifier logs while fitting, so what `monitor` (the best checkpoint,
# early stopping) can watch; a test fits once and checks the task logs exactly these
CLASSIFIER_MONITORABLE = ("val/acc", "val/loss", "train/loss_epoch")
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
    bad_type = isinstance(value, bool) or not isinstance(value, int | float)
    if bad_type or not math.isfinite(value) or value <= 0:
        raise ConfigError(
            f"{key} must be a number > 0, got {value!r} ({type(value).__name__})",
            fix=f"{key}={example}",
        )


def _fraction(cfg: DictConfig, key: str, example: float, low: float = 0.0) -> None:
    value = OmegaConf.select(cfg, key)
    if value is None:
        return
    bad_type = isinstance(value, bool) or not isinstance(value, int | float)
    if bad_type or not low <= value < 1:
        raise ConfigError(
            f"{key} must be a fraction in [{low:g}, 1) (a share of the samples), got {value!r}",
            fix=f"{key}={example}",
        )


# trainyard's own true/false settings (those of a constructor: check_flags)
_FLAGS = (
    "resume", "test_after_fit", "fail_fast", "dist.find_unused_parameters",
    "cluster.allow_dirty", "cluster.container.allow_dirty", "cluster.local_pods",
)  # fmt: skip


def _flag(key: str, value: Any, optional: bool = False) -> None:
    if isinstance(value, bool) or (optional and value is None):
        return
    raise ConfigError(
        f"{key} must be true or false, got {value!r} ({type(value).__name__})",
        fix=f"{key}=true or {key}=false",
    )


def init_source(cfg: DictConfig) -> Path | None:
    """The checkpoint ``init_from`` names (a run directory's best), or None."""
    value = cfg.get("init_from")
    if value in (None, ""):
        return None
    from trainyard.checkpoints import find_checkpoint

    path = Path(str(value))
    if not path.is_absolute():
        path = Path(str(OmegaConf.select(cfg, "paths.root_dir", default="."))) / path
    try:
        return find_checkpoint(path)
    except TrainyardError as exc:
        raise ConfigError(
            f"init_from: {exc.message}",
            fix="init_from=<a run directory that trained, or a .ckpt file> (relative paths "
            "start at paths.root_dir), or init_from=null",
        ) from None


def check_types(cfg: DictConfig) -> None:
    if not isinstance(cfg.get("name"), str) or not _NAME.match(cfg.name):
        raise ConfigError(
            f"name must be letters, digits, '.', '_' or '-' (it names a directory), "
            f"got {cfg.get('name')!r}",
            fix="name=my_experiment",
        )
    _int(cfg, "seed", 0, 42)
    for key in _FLAGS:
        _flag(key, OmegaConf.select(cfg, key, default=None), optional=True)  # absent: fine
    init_source(cfg)
    check_trainer_keys(cfg)
    _int(cfg, "trainer.max_epochs", -1, 10, optional=True)
    _int(cfg, "trainer.max_steps", -1, 1000)
    _int(cfg, "trainer.num_nodes", 1, 1)
    _int(cfg, "trainer.accumulate_grad_batches", 1, 1)
    _int(cfg, "data.batch_size", 1, 64)
    _int(cfg, "data.num_workers", 0, 2, optional=True)
    compute.check(cfg.trainer)
    _fraction(cfg, "data.val_fraction", 0.1, low=1e-9)
    _fraction(cfg, "data.test_fraction", 0.2)
    _number(cfg, "optimizer.lr", 1e-3)
    _number(cfg, "dist.timeout_s", 300)
    _number(cfg, "trainer.gradient_clip_val", 1.0, optional=True)
    precision = str(cfg.trainer.get("precision", "32-true"))
    if precision not in _PRECISIONS:
        raise ConfigError(
            f"trainer.precision={precision!r} is not a precision Lightning knows",
            fix=f"one of {', '.join(sorted(_PRECISIONS))}",
        )
    target = OmegaConf.select(cfg, "task._target_", default="")
    if target in ("trainyard.tasks.Classifier", "trainyard.tasks.classifier.Classifier"):
        monitorable = CLASSIFIER_MONITORABLE
        if cfg.get("monitor") not in monitorable:
            raise ConfigError(
                f"monitor={cfg.get('monitor')!r} is not a metric the classifier logs while "
                "fitting: the checkpoint and early stopping would watch nothing",
                fix=f"monitor=<one of {', '.join(monitorable)}> (and monitor_mode=min for a loss)",
            )
    if cfg.get("monitor_mode") not in ("min", "max"):
        raise ConfigError(
            f"monitor_mode must be min or max, got {cfg.get('monitor_mode')!r}",
            fix="monitor_mode=max (for accuracy) or monitor_mode=min (for a loss)",
        )


def visible_gpus() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def resolve_devices(cfg: DictConfig) -> tuple[str, int]:
    """Concrete (accelerator, devices per node), checked against this machine."""
    accelerator = given = str(cfg.trainer.get("accelerator", "cpu"))
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
            fix="trainer=cpu here, or submit to a GPU cluster (trainyard submit cluster=slurm); "
            "in a container, pass the GPUs in (podman run --device nvidia.com/gpu=all)",
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
        auto = given == "auto" and accelerator == "gpu"
        chose = " (trainer.accelerator=auto chose the GPUs)" if auto else ""
        fits = devices <= (os.cpu_count() or 1)  # as many CPU processes as cores, at most
        on_cpu = ", or trainer.accelerator=cpu for CPU processes" if chose and fits else ""
        raise ConfigError(
            f"trainer.devices={devices} but this machine has {available} {unit}{chose}",
            fix=f"trainer.devices={available} or fewer{on_cpu}, or submit to a cluster",
        )
    if accelerator == "cpu" and str(cfg.trainer.get("precision")) not in _CPU_PRECISIONS:
        raise ConfigError(
            f"trainer.precision={cfg.trainer.precision} needs a GPU",
            fix="trainer.precision=32-true (or bf16-mixed) on CPU",
        )
    return accelerator, devices


def check_machine(cfg: DictConfig) -> tuple[str, int]:
    """Where the ranks start: (accelerator, devices per node) that this machine can give."""
    accelerator, devices = resolve_devices(cfg)
    if cfg.trainer.num_nodes > 1 and not launched_externally():
        raise ConfigError(
            f"trainer.num_nodes={cfg.trainer.num_nodes} needs a scheduler to start the ranks "
            "on every node",
            fix="trainer.num_nodes=1 here, or start trainyard-train on every node with srun or "
            "torchrun (one rank per device)",
        )
    return accelerator, devices


def launched_externally() -> bool:
    """Ranks were started by a scheduler (srun, torchrun, a Kubernetes agent)."""
    if "TORCHELASTIC_RUN_ID" in os.environ:
        return True
    return int(os.environ.get("SLURM_NTASKS", "1")) > 1 and "SLURM_PROCID" in os.environ


_STRATEGIES = ("auto", "ddp")


def check_consistency(cfg: DictConfig) -> None:
    """Settings that contradict each other, whatever machine runs them."""
    strategy = str(cfg.trainer.get("strategy", "auto"))
    if strategy not in _STRATEGIES:
        raise ConfigError(
            f"trainer.strategy={strategy!r} is not supported: trainyard starts the ranks "
            "itself (or the scheduler does), so Lightning must not launch or spawn any",
            fix="trainer=ddp (one process per device, started by trainyard or the scheduler)",
        )
    devices = cfg.trainer.get("devices", 1)
    many = (isinstance(devices, int) and devices > 1) or cfg.trainer.num_nodes > 1
    if many and strategy == "auto":
        raise ConfigError(
            f"trainer.devices={devices} trainer.num_nodes={cfg.trainer.num_nodes} needs a "
            "data-parallel strategy",
            fix="trainer=ddp (or trainer.strategy=ddp)",
        )
    checkpoint = OmegaConf.select(cfg, "callbacks.checkpoint")
    if checkpoint and checkpoint.get("save_last"):
        raise ConfigError(
            "callbacks.checkpoint.save_last=true: trainyard writes checkpoints/last.ckpt itself "
            "(every epoch and on every stop), and two writers would race",
            fix="callbacks.checkpoint.save_last=false",
        )
    from trainyard import signals

    signals.parse(OmegaConf.select(cfg, "signals.preempt", default=signals.DEFAULT_PREEMPT))
    _int(cfg, "signals.check_every_n_steps", 1, 10, optional=True)
    dist_environment(cfg)


# dist.<key> -> (environment variables, a pattern its value must match)
_DIST_ENV = {
    "nccl_debug": (("NCCL_DEBUG",), r"VERSION|WARN|INFO|TRACE"),
    "nccl_debug_subsys": (("NCCL_DEBUG_SUBSYS",), r"\^?[A-Z]+(,[A-Z]+)*"),
    "distributed_debug": (("TORCH_DISTRIBUTED_DEBUG",), r"OFF|INFO|DETAIL"),
    "nccl_socket_ifname": (("NCCL_SOCKET_IFNAME",), r"[\^=]?[A-Za-z0-9_.-]+(,[A-Za-z0-9_.-]+)*"),
    "gloo_socket_ifname": (("GLOO_SOCKET_IFNAME",), r"[A-Za-z0-9_.-]+(,[A-Za-z0-9_.-]+)*"),
}


def dist_environment(cfg: DictConfig) -> dict[str, str]:
    """The environment each rank sets from ``dist.*`` debug switches; a value the variable
    would not take (or that could smuggle anything else in) is a ConfigError."""
    env = {}
    for key, (names, pattern) in _DIST_ENV.items():
        value = OmegaConf.select(cfg, f"dist.{key}", default=None)
        if value is None:
            continue
        if not re.fullmatch(pattern, str(value)):
            raise ConfigError(
                f"dist.{key}={value!r} is not a value {names[0]} takes",
                fix=f"dist.{key}=<one of {pattern.replace(chr(92), '')}> or null",
            )
        env.update(dict.fromkeys(names, str(value)))
    return env


@contextlib.contextmanager
def _constructing(what: str, fix: str) -> Iterator[None]:
    """Turn a constructor's refusal into a ConfigError that names the settings."""
    try:
        yield
    except ConfigError:
        raise
    except Exception as exc:
        raise ConfigError(f"{what} refuses this config: {exc}", fix=fix) from exc


# The arguments of Lightning's Trainer (2.6.6; a unit test compares them with the installed
# Lightning), listed so that `trainyard submit` checks trainer.* keys without importing it.
TRAINER_ARGS = frozenset({
    "accelerator", "accumulate_grad_batches", "barebones", "benchmark", "callbacks",
    "check_val_every_n_epoch", "default_root_dir", "detect_anomaly", "deterministic",
    "devices", "enable_autolog_hparams", "enable_checkpointing", "enable_model_summary",
    "enable_progress_bar", "fast_dev_run", "gradient_clip_algorithm", "gradient_clip_val",
    "inference_mode", "limit_predict_batches", "limit_test_batches", "limit_train_batches",
    "limit_val_batches", "log_every_n_steps", "logger", "max_epochs", "max_steps", "max_time",
    "min_epochs", "min_steps", "model_registry", "num_nodes", "num_sanity_val_steps",
    "overfit_batches", "plugins", "precision", "profiler", "reload_dataloaders_every_n_epochs",
    "strategy", "sync_batchnorm", "use_distributed_sampler", "val_check_interval",
})  # fmt: skip


def check_trainer_keys(cfg: DictConfig) -> None:
    """Every trainer.* key is an argument of Lightning's Trainer: a misspelt one added with
    ``+`` (``+trainer.max_epoch=1``) is refused before anything is prepared."""
    import difflib

    known = TRAINER_ARGS | set(compute.TRAINER_KEYS)  # trainyard's own are applied by it
    for key in cfg.trainer:
        if key == "_target_" or key in known:
            continue
        close = difflib.get_close_matches(str(key), sorted(known), n=1)
        hint = f"trainer.{close[0]}" if close else "a Lightning Trainer argument"
        raise ConfigError(
            f"trainer.{key} is not an argument of Lightning's Trainer",
            fix=f"{hint} (the trainer.* keys of trainyard-train --help)",
        )


# annotations that admit only true or false (or None), spaces and "typing." left out
_BOOL_TYPES = {"bool": False} | dict.fromkeys(
    ("Optional[bool]", "bool|None", "None|bool", "Union[bool,None]", "Union[None,bool]"), True
)


def _bool_parameters(target: str) -> dict[str, bool]:
    """The parameters of ``target`` that take true or false: {name: whether None is also
    accepted}. Read from the signature (through ``**kwargs`` to the base classes' own);
    an annotation that admits anything else (``Literal["all"] | bool``) is left out."""
    import inspect

    from hydra.utils import get_object

    try:
        obj = get_object(target)
    except Exception:  # instantiating it fails with the reason, in check_constructible
        return {}
    found: dict[str, bool | None] = {}  # None: declared, not a flag (hides a base's)
    for fn in _signatures(obj):
        try:
            parameters = inspect.signature(fn).parameters.values()
        except (TypeError, ValueError):
            break
        for p in parameters:
            if p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL):
                found.setdefault(p.name, _flag_kind(p))
        if not any(p.kind is p.VAR_KEYWORD for p in parameters):
            break
    return {name: kind for name, kind in found.items() if kind is not None}


def _flag_kind(p) -> bool | None:
    """None: not a flag; else whether None is accepted too (``flag: bool = None`` says so
    by its default, whatever its annotation)."""
    annotation = p.annotation
    if annotation is p.empty:
        return False if isinstance(p.default, bool) else None
    text = "bool" if annotation is bool else str(annotation)
    kind = _BOOL_TYPES.get(text.replace("typing.", "").replace(" ", ""))
    return kind if kind is None else kind or p.default is None


def _signatures(obj: Any) -> list:
    """``obj`` itself, or for a class each ``__init__`` along its bases, nearest first."""
    import inspect

    if not inspect.isclass(obj):
        return [obj]
    return [c.__init__ for c in inspect.getmro(obj) if "__init__" in vars(c) and c is not object]


def _targets(node: Any, key: str = "") -> Iterator[tuple[str, dict]]:
    if isinstance(node, dict):
        if isinstance(node.get("_target_"), str):
            yield key, node
        for name, value in node.items():
            yield from _targets(value, f"{key}.{name}" if key else str(name))
    elif isinstance(node, list):
        for i, value in enumerate(node):
            yield from _targets(value, f"{key}[{i}]")


def check_flags(cfg: DictConfig) -> None:
    """A setting that a constructor takes as true or false is given true or false.

    A value on a command line that YAML does not read as a boolean (``data.normalize=no``,
    ``off``, ``1``) arrives as a string or a number, and Python takes any non-empty string
    as true: the run would silently do the opposite of what was asked."""
    plain = OmegaConf.to_container(cfg, resolve=True)
    for key, node in _targets(plain):
        for name, optional in _bool_parameters(node["_target_"]).items():
            if name in node:
                _flag(f"{key}.{name}", node[name], optional)


def check_constructible(cfg: DictConfig) -> None:
    """Build what is cheap, so a value a constructor refuses fails here, not after the
    imports on a node: the data module (without loading data), the network, the loss on a
    dummy batch, the optimizer and the scheduler on a dummy parameter."""
    import torch
    from hydra.utils import instantiate

    from trainyard.worker import build_net, init_weights

    check_flags(cfg)
    with _constructing("data", "check the data.* settings"):
        datamodule = instantiate(cfg.data)
    classes = datamodule.num_classes
    # CheckpointError (a weights file) passes through: it is not a config value's fault
    with _constructing("model", "check the model.* settings (trainyard-train --help lists them)"):
        net = build_net(cfg, datamodule)
    init_weights(cfg, net, quiet=True)  # the weights init_from names fit this network
    _check_batch_of_one(cfg, net, datamodule.input_shape)
    with _constructing("loss", "check the loss.* settings (loss.label_smoothing in [0, 1])"):
        instantiate(cfg.loss)(torch.zeros(2, classes), torch.zeros(2, dtype=torch.long))
    param = torch.nn.Parameter(torch.zeros(2))
    with _constructing("optimizer", "check the optimizer.* settings (optimizer.lr=1e-3)"):
        optimizer = instantiate(cfg.optimizer)(params=[param])
    if cfg.get("scheduler"):
        with _constructing("scheduler", "check the scheduler.* settings"):
            factory = instantiate(cfg.scheduler)
            extra = {}
            keywords = getattr(factory, "keywords", {})
            if getattr(factory, "func", None) is torch.optim.lr_scheduler.OneCycleLR and not {
                "total_steps",
                "epochs",
            } & set(keywords):
                extra["total_steps"] = 10
            factory(optimizer=optimizer, **extra)


def _check_batch_of_one(cfg: DictConfig, net: Any, input_shape) -> None:
    """``data.batch_size=1`` trains only a network that can normalise one sample: BatchNorm
    with a single value per channel (BatchNorm1d, or a 1x1 feature map) raises in training.
    Found on a dummy sample here instead of at the first step, with a traceback."""
    if cfg.data.get("batch_size") != 1 or _synchronised_batchnorm(cfg):
        return
    import torch

    net.train()
    try:
        with torch.no_grad():
            net(torch.zeros(1, *input_shape))
    except ValueError as exc:
        if "more than 1 value per channel" not in str(exc):
            return  # not this check's business: training reports it as it happens
        switch = " or model.batch_norm=false" if "batch_norm" in cfg.model else ""
        raise ConfigError(
            f"data.batch_size=1 cannot train this network: its BatchNorm would normalise a "
            f"single value per channel ({exc})",
            fix=f"data.batch_size=2 (or more){switch}",
        ) from None
    except Exception:
        return  # a dummy input of zeros may not suit every network; training will tell


def _synchronised_batchnorm(cfg: DictConfig) -> bool:
    """SyncBatchNorm over several ranks normalises over the global batch: one sample per
    rank trains (the usual setting for large images). ``devices: auto`` may be several."""
    trainer = cfg.trainer
    several = trainer.get("num_nodes", 1) != 1 or trainer.get("devices", 1) not in (1, "1")
    return bool(trainer.get("sync_batchnorm")) and several


def check_config(cfg: DictConfig, build: bool = True) -> DictConfig:
    """Everything the config alone can tell; ``build=False`` skips the constructors (and
    the torch import they need)."""
    check_types(cfg)
    check_consistency(cfg)
    if build:
        check_constructible(cfg)
    return cfg
