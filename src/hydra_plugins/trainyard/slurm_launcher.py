"""``hydra/launcher=trainyard_slurm``: hydra-submitit-launcher's Slurm launcher, compose-once.

``cluster=slurm`` (and every site profile extending it) selects this launcher. It is
hydra-submitit-launcher's ``SlurmLauncher`` with its config schema, submitit's executor and
its job arrays; it overrides only what compose-once and rank launching require:

- trainyard configs (they have ``cluster.backend``): each trial is composed here, checked,
  frozen into its run directory and sent through trainyard's Slurm backend, which submits
  submitit job arrays whose tasks are the trial's ranks
  (:class:`trainyard.backends.slurm_task.SlurmTrial`), one per device on every node;
- any other Hydra app: submitit runs the task function as hydra-submitit-launcher does,
  but with the config composed here instead of re-composed from the overrides on the node.

The schema's site and resource fields default to the trial's own settings
(``cluster.partition``, ``cluster.time_min``, ``trainer.num_nodes``, ...), so users state
them once in ``cluster/<site>.yaml``; ``hydra.launcher.<field>=...`` still works for
those who know hydra-submitit-launcher, and wins.
"""

# no `from __future__ import annotations`: Hydra imports plugin modules without putting
# them in sys.modules, and dataclasses then cannot resolve string annotations
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from hydra.core.config_store import ConfigStore
from hydra_plugins.hydra_submitit_launcher.config import SlurmQueueConf
from hydra_plugins.hydra_submitit_launcher.submitit_launcher import SlurmLauncher

log = logging.getLogger("trainyard")


@dataclass
class TrainyardSlurmConf(SlurmQueueConf):
    _target_: str = "hydra_plugins.trainyard.slurm_launcher.TrainyardSlurmLauncher"
    # resources: from the trainer config (one task per device on every node)
    nodes: Any = "${oc.select:trainer.num_nodes,1}"
    tasks_per_node: Any = "${oc.select:trainer.devices,1}"
    # the site: cluster/<site>.yaml
    timeout_min: Any = "${oc.select:cluster.time_min,60}"
    cpus_per_task: Any = "${oc.select:cluster.cpus_per_task,null}"
    partition: Any = "${oc.select:cluster.partition,null}"
    qos: Any = "${oc.select:cluster.qos,null}"
    account: Any = "${oc.select:cluster.account,null}"
    constraint: Any = "${oc.select:cluster.constraint,null}"
    mem_per_gpu: Any = "${oc.select:cluster.mem_per_gpu,null}"
    signal_delay_s: Any = "${oc.select:cluster.signal_delay_s,90}"
    max_num_timeout: Any = "${oc.select:cluster.max_requeues_without_progress,3}"
    array_parallelism: Any = "${oc.select:cluster.array_parallelism,256}"
    # trainyard: wait for the trials and hand their metrics to the sweeper (false: submit
    # and return), looking at run directories and the scheduler every poll_s seconds
    wait: bool = True
    poll_s: float = 2.0


ConfigStore.instance().store(
    group="hydra/launcher", name="trainyard_slurm", node=TrainyardSlurmConf
)

# launcher field -> trainyard's cluster key, for the fields a user may set either way
_TO_CLUSTER = {
    "timeout_min": "time_min",
    "cpus_per_task": "cpus_per_task",
    "partition": "partition",
    "qos": "qos",
    "account": "account",
    "constraint": "constraint",
    "mem_per_gpu": "mem_per_gpu",
    "signal_delay_s": "signal_delay_s",
    "max_num_timeout": "max_requeues_without_progress",
    "array_parallelism": "array_parallelism",
}

# schema fields without a cluster key of their own: passed to sbatch as they are
_PASSED = ("comment", "exclude", "gres", "cpus_per_gpu", "gpus_per_task", "mem_per_cpu")


class TrainyardSlurmLauncher(SlurmLauncher):
    def __init__(self, wait: bool = True, poll_s: float = 2.0, **params: Any) -> None:
        super().__init__(**params)
        self.wait, self.poll_s = wait, poll_s
        self._composed_dir: Any = None  # where _launch_composed pickles each trial's config

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Any:
        from omegaconf import OmegaConf

        from trainyard import sweep_launch

        if OmegaConf.select(self.config, "cluster.backend") is None:  # not a trainyard app
            return self._launch_composed(job_overrides, initial_job_idx)
        return sweep_launch.launch(
            self, job_overrides, initial_job_idx, self.wait, self.poll_s, adjust=apply_launcher
        )

    def start(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Any:
        """Send a trainyard config's trials without waiting (see TrainyardLauncher.start)."""
        from trainyard import sweep_launch

        return sweep_launch.start(self, job_overrides, initial_job_idx, adjust=apply_launcher)

    def collect(self, started: Any) -> Any:
        from trainyard import sweep_launch

        return sweep_launch.collect(started)

    def _launch_composed(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int):
        """hydra-submitit-launcher's launch, with every trial composed here, once, and
        pickled into the sweep directory (each job loads its own; submitit pickles this
        launcher once per job, so the configs must not travel inside it)."""
        import pickle
        from pathlib import Path

        loader = self.hydra_context.config_loader
        self._composed_dir = Path(str(self.config.hydra.sweep.dir)) / ".submitit" / "composed"
        self._composed_dir.mkdir(parents=True, exist_ok=True)
        for index, overrides in enumerate(job_overrides):
            config = loader.load_sweep_config(self.config, list(overrides))
            path = self._composed_dir / f"{initial_job_idx + index}.pkl"
            path.write_bytes(pickle.dumps(config))
        return super().launch(job_overrides, initial_job_idx)

    def __call__(self, sweep_overrides, job_dir_key, job_num, job_id, singleton_state):
        """On the node: run the task function on the config composed at submission."""
        import pickle

        import submitit
        from hydra.core.singleton import Singleton
        from hydra.core.utils import run_job, setup_globals
        from omegaconf import open_dict

        Singleton.set_state(singleton_state)
        setup_globals()
        sweep_config = pickle.loads((self._composed_dir / f"{job_num}.pkl").read_bytes())
        with open_dict(sweep_config.hydra.job) as job:
            job.id = submitit.JobEnvironment().job_id
            job.num = job_num
        return run_job(
            hydra_context=self.hydra_context,
            task_function=self.task_function,
            config=sweep_config,
            job_dir_key=job_dir_key,
            job_subdir_key="hydra.sweep.subdir",
        )


def apply_launcher(sweep_config: Any) -> None:
    """Fold ``hydra.launcher``'s settings (resolved for this trial) into the trial's
    ``cluster`` section, which the backend renders from; resources must match the trainer's,
    which the ranks are started from."""
    from omegaconf import OmegaConf, open_dict

    from trainyard.errors import ConfigError

    params = OmegaConf.to_container(sweep_config.hydra.launcher, resolve=True)
    trainer = sweep_config.trainer
    for field, key in (("nodes", "num_nodes"), ("tasks_per_node", "devices")):
        if params.get(field) != trainer.get(key):
            raise ConfigError(
                f"hydra.launcher.{field}={params.get(field)} but trainer.{key}="
                f"{trainer.get(key)}: trainyard starts one rank per device on every node",
                fix=f"set trainer.{key} (hydra.launcher.{field} follows it)",
            )
    cluster = sweep_config.cluster
    with open_dict(cluster):
        for field, key in _TO_CLUSTER.items():
            cluster[key] = params.get(field)
        if params.get("mem_gb"):
            cluster.mem = f"{int(params['mem_gb'])}G"
        if params.get("gpus_per_node") is not None:
            raise ConfigError(
                "hydra.launcher.gpus_per_node is derived: one GPU per device",
                fix="trainer.accelerator=gpu trainer.devices=<GPUs per node>",
            )
        for field in ("srun_args", "stderr_to_stdout"):  # trainyard renders srun itself
            if params.get(field):
                raise ConfigError(
                    f"hydra.launcher.{field} is not supported for trainyard's own trials",
                    fix="cluster.container.* for containers, cluster.additional_parameters "
                    "for other sbatch options",
                )
        passed = {k: params[k] for k in _PASSED if params.get(k) is not None}
        extra = {**(cluster.get("additional_parameters") or {}), **passed}
        extra.update(params.get("additional_parameters") or {})
        cluster.additional_parameters = extra
        cluster.setup = [*(cluster.get("setup") or []), *(params.get("setup") or [])]


__all__ = ["TrainyardSlurmConf", "TrainyardSlurmLauncher", "apply_launcher"]
