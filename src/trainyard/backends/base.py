"""The one interface every backend implements (torchx's ``Scheduler``, submitit's
``Executor``), and the job description they all take.

``render(job)`` returns the exact request (an sbatch script, manifests) without touching
the cluster: it is the dry run, and what golden tests compare. ``submit`` sends a rendered
request and returns a job id; ``status``, ``logs`` and ``cancel`` take that id. A job is a
list of prepared trials (run directories holding ``config.yaml``; see
:func:`trainyard.trial.prepare`) and the resources each trial needs, derived from its
config so that users state devices once.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from omegaconf import DictConfig, OmegaConf

from trainyard.errors import ConfigError, TrainyardError


class NoCluster(TrainyardError):
    """No cluster to ask (no credentials, no scheduler here): a dry run goes on without
    the cluster's verdict; a submission stops."""

    exit_code = 2


@dataclass(frozen=True)
class Resources:
    """What one trial asks of the cluster: one task (rank) per device on every node."""

    nodes: int = 1
    tasks_per_node: int = 1
    gpus_per_node: int = 0
    cpus_per_task: int = 1

    @classmethod
    def from_config(cls, cfg: DictConfig) -> Resources:
        trainer = cfg.trainer
        devices = trainer.get("devices", 1)
        if not isinstance(devices, int) or isinstance(devices, bool) or devices < 1:
            raise ConfigError(
                f"trainer.devices={devices!r}: a cluster job needs a number of devices per "
                "node to request one task each",
                fix="trainer.devices=<GPUs or CPU processes per node>, e.g. trainer.devices=2",
            )
        accelerator = str(trainer.get("accelerator", "cpu"))
        site_gpus = OmegaConf.select(cfg, "cluster.gpus_per_node", default=None)
        # `auto` is decided by what the site's nodes have, not by the submitting machine
        gpu = accelerator in ("gpu", "cuda") or (accelerator == "auto" and bool(site_gpus))
        if gpu and site_gpus is not None and devices > int(site_gpus):
            raise ConfigError(
                f"trainer.devices={devices} GPUs per node, but cluster.gpus_per_node={site_gpus}",
                fix=f"trainer.devices={site_gpus} (and trainer.num_nodes to scale out)",
            )
        cpus = OmegaConf.select(cfg, "cluster.cpus_per_task", default=1) or 1
        return cls(
            nodes=int(trainer.num_nodes),
            tasks_per_node=devices,
            gpus_per_node=devices if gpu else 0,
            cpus_per_task=int(cpus),
        )


@dataclass
class Job:
    """Trials that go out together (one array on Slurm), all with the same resources."""

    name: str
    trials: list[Path]  # run directories, each with its frozen config.yaml
    resources: Resources
    cluster: dict[str, Any] = field(default_factory=dict)  # the `cluster` config section
    log_dir: Path | None = None  # where the scheduler's own output files go
    tag: str = ""  # tells apart the jobs of one sweep that need different resources
    # trial -> its frozen config as plain data, for backends that send the config itself
    # (Kubernetes: a ConfigMap) and render before the run directories are written
    config_data: Callable[[Path], dict[str, Any]] | None = None

    def __post_init__(self) -> None:
        if not self.trials:
            raise ValueError("a job needs at least one trial")

    def config(self, trial: Path) -> dict[str, Any]:
        """The trial's frozen config as plain data."""
        if self.config_data is not None:
            return self.config_data(trial)
        from trainyard.freeze import load_frozen_text

        return load_frozen_text((trial / "config.yaml").read_text())


class Backend(ABC):
    name: ClassVar[str]

    @abstractmethod
    def render(self, job: Job) -> Any:
        """The exact request, as the cluster would receive it; no side effects."""

    @abstractmethod
    def check(self, request: Any) -> None:
        """Ask the cluster whether it would accept ``request`` (partition, account, limits,
        resources), without queueing anything; raise with the cluster's reason if not."""

    @abstractmethod
    def submit(self, request: Any) -> str:
        """Send a rendered request; return the job id."""

    @abstractmethod
    def status(self, job_id: str) -> dict[str, str]:
        """The scheduler's state of each task of the job (task id -> state)."""

    @abstractmethod
    def logs(self, job_id: str, log_dir: Path | None = None) -> str:
        """The scheduler's output of the job (``log_dir``: where ``render`` sent it)."""

    @abstractmethod
    def cancel(self, job_id: str) -> None:
        """Stop the job (queued or running)."""


def trial_states(record: dict[str, Any], tasks: dict[str, str]) -> dict[str, str]:
    """Each trial of a submission record -> its task's state in ``tasks`` (a backend's
    ``status``: ``<job>_<index>`` per array task, or the whole job's). A task that
    ``trainyard cancel`` cancelled and the scheduler kept no trace of (Slurm may forget an
    array task cancelled while pending) is CANCELLED; any other unknown one, UNKNOWN."""
    job, cancelled = record["job_id"], record.get("cancelled", [])
    states = {}
    for index, trial in enumerate(record["trials"]):
        task = f"{job}_{index}"
        known = tasks.get(task) or tasks.get(job)
        if not known and (task in cancelled or job in cancelled):
            known = "CANCELLED"
        states[trial] = known or "UNKNOWN"
    return states
