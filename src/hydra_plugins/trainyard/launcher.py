"""``hydra/launcher=trainyard``: the launcher ``cluster=local`` selects.

Hydra's basic launcher, each trial in this process (trainyard starts its ranks), for
``cluster=local``; a config whose ``cluster`` names another backend without a launcher of
its own goes to that backend through :mod:`trainyard.sweep_launch`. Slurm has its own,
built on hydra-submitit-launcher (:mod:`hydra_plugins.trainyard.slurm_launcher`). Heavy
imports stay inside the methods so that plugin discovery remains fast.
"""

# no `from __future__ import annotations`: Hydra imports plugin modules without putting
# them in sys.modules, and dataclasses then cannot resolve string annotations
from collections.abc import Sequence
from dataclasses import dataclass

from hydra._internal.core_plugins.basic_launcher import BasicLauncher
from hydra.core.config_store import ConfigStore


@dataclass
class TrainyardLauncherConf:
    _target_: str = "hydra_plugins.trainyard.launcher.TrainyardLauncher"
    # wait for the trials and hand their metrics to the sweeper; false: submit and return
    wait: bool = True
    # how often to look at the run directories and the scheduler (one small request to a
    # Ray head or a local process each time; a sweep ends at most this long after its trials)
    poll_s: float = 0.5


ConfigStore.instance().store(group="hydra/launcher", name="trainyard", node=TrainyardLauncherConf)


class TrainyardLauncher(BasicLauncher):
    """With ``cluster=local`` Hydra's basic launcher; with any other backend, the trials
    go to that backend."""

    def __init__(self, wait: bool = True, poll_s: float = 0.5) -> None:
        super().__init__()
        self.wait, self.poll_s = wait, poll_s

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> list:
        from omegaconf import OmegaConf

        from trainyard import sweep_launch

        backend = OmegaConf.select(self.config, "cluster.backend", default="local")
        if backend == "local":
            return super().launch(job_overrides, initial_job_idx)
        return sweep_launch.launch(self, job_overrides, initial_job_idx, self.wait, self.poll_s)

    def start(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> object:
        """Send trials without waiting (cluster=local: a background process), for sweepers
        that keep several in flight; :meth:`collect` gives their returns once done."""
        from trainyard import sweep_launch

        return sweep_launch.start(self, job_overrides, initial_job_idx)

    def collect(self, started: object) -> list | None:
        from trainyard import sweep_launch

        return sweep_launch.collect(started)


__all__ = ["TrainyardLauncher", "TrainyardLauncherConf"]
