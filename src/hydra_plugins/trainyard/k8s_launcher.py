"""``hydra/launcher=trainyard_k8s``: Hydra sweeps as Kubernetes Jobs, one per trial.

``cluster=k8s`` (and ``k8s_local``) select it. Two kinds of app:

- trainyard's own (a config with ``cluster.backend``): each trial is composed here, checked,
  frozen and sent through trainyard's Kubernetes backend, as ``trainyard submit`` does
  (:mod:`trainyard.sweep_launch`); the pods run ``trainyard-pod`` on the frozen config;
- any other Hydra app: each trial's config is composed here, once, and pickled with the
  task function into the trial's ConfigMap; its pod runs the task function on it
  (:mod:`hydra_plugins.trainyard.k8s_task`) and leaves the job's return in the sweep
  directory, which the pods must see at the same path (a shared volume, or
  ``local_pods``: the pods run here).

The Jobs are the ones rendered from ``k8s/`` for trainyard's trials; the settings come from
``cluster.*`` when the app has a ``cluster`` section, and from ``hydra.launcher.*``
otherwise (``hydra.launcher.local_pods=true`` runs the pods as processes on this machine,
which is how Hydra's own launcher test suites run it).
"""

# no `from __future__ import annotations`: Hydra imports plugin modules without putting
# them in sys.modules, and dataclasses then cannot resolve string annotations
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hydra.core.config_store import ConfigStore
from hydra.plugins.launcher import Launcher

log = logging.getLogger("trainyard")


@dataclass
class TrainyardK8sConf:
    _target_: str = "hydra_plugins.trainyard.k8s_launcher.TrainyardK8sLauncher"
    # wait for the trials and hand their returns to the sweeper; false: submit and return
    wait: bool = True
    poll_s: float = 2.0
    # a Job the API server no longer knows for this long (deleted, expired) has ended
    forget_after_s: float = 30.0
    # for apps without a `cluster` section (trainyard's own read cluster.*)
    namespace: str = "default"
    image: Any = None  # the app's image, with its tag
    local_pods: bool = False  # run the pods as processes on this machine
    kind: str = "Job"
    cpu: Any = None
    memory: Any = None
    gpus_per_node: int = 0  # GPUs each trial's pod asks for
    env: Any = field(default_factory=dict)
    secrets: Any = field(default_factory=list)


ConfigStore.instance().store(group="hydra/launcher", name="trainyard_k8s", node=TrainyardK8sConf)


class TrainyardK8sLauncher(Launcher):
    def __init__(
        self, wait: bool = True, poll_s: float = 2.0, forget_after_s: float = 30.0, **settings: Any
    ) -> None:
        self.wait, self.poll_s, self.settings = wait, poll_s, settings
        self.forget_after_s = forget_after_s
        self.config: Any = None
        self.hydra_context: Any = None
        self.task_function: Any = None

    def setup(self, *, hydra_context, task_function, config) -> None:
        self.config, self.hydra_context, self.task_function = config, hydra_context, task_function

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Any:
        from omegaconf import OmegaConf

        from trainyard import sweep_launch

        if OmegaConf.select(self.config, "cluster.backend") is not None:  # trainyard's trials
            return sweep_launch.launch(
                self, job_overrides, initial_job_idx, self.wait, self.poll_s,
                forget_after_s=self.forget_after_s,
            )  # fmt: skip
        return self._launch_tasks(list(job_overrides), initial_job_idx)

    def start(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Any:
        """Send a trainyard config's trials without waiting (see TrainyardLauncher.start)."""
        from trainyard import sweep_launch

        return sweep_launch.start(self, job_overrides, initial_job_idx)

    def collect(self, started: Any) -> Any:
        from trainyard import sweep_launch

        return sweep_launch.collect(started, self.forget_after_s)

    def _launch_tasks(self, job_overrides: list, initial_job_idx: int) -> list:
        """Any Hydra app: a Job per trial whose pod runs the task function."""
        from hydra.core.utils import configure_log, setup_globals

        from trainyard.backends.base import Resources

        setup_globals()
        configure_log(self.config.hydra.hydra_logging, self.config.hydra.verbose)
        sweep_dir = Path(str(self.config.hydra.sweep.dir))
        sweep_dir.mkdir(parents=True, exist_ok=True)
        folder = sweep_dir / ".trainyard_k8s"
        folder.mkdir(exist_ok=True)
        cluster = {**self.settings, "root_dir": None, "backoff_limit": 0}
        gpus = int(cluster.get("gpus_per_node") or 0)
        resources = Resources(1, max(1, gpus), gpus, 1)
        trials, objects = [], []
        for index, overrides in enumerate(job_overrides):
            number = initial_job_idx + index
            trials.append(folder / str(number))
            objects.append(self._task_objects(cluster, resources, list(overrides), number, folder))
        returns = [folder / f"{initial_job_idx + i}.return.pkl" for i in range(len(trials))]
        for stale in returns:  # an earlier sweep in the same directory: not this one's
            stale.unlink(missing_ok=True)
        job_id, backend = self._submit(cluster, trials, objects, folder)
        if not self.wait:
            return []
        _wait(backend, job_id, returns, self.poll_s, self.forget_after_s)
        return [_read_return(path, overrides) for path, overrides in zip(returns, job_overrides,
                                                                         strict=True)]  # fmt: skip

    def _task_objects(self, cluster, resources, overrides, number, folder) -> list:
        import base64

        import cloudpickle  # task functions may be local ones (as submitit pickles them)
        from hydra.core.singleton import Singleton
        from omegaconf import open_dict

        from trainyard.backends import k8s_manifests as manifests
        from trainyard.errors import ConfigError

        sweep_config = self.hydra_context.config_loader.load_sweep_config(self.config, overrides)
        with open_dict(sweep_config.hydra.job):
            sweep_config.hydra.job.id = f"k8s_{number}"
            sweep_config.hydra.job.num = number
        task = {
            "hydra_context": self.hydra_context,
            "task_function": self.task_function,
            "config": sweep_config,
            "singleton_state": Singleton.get_state(),
            "return_file": str(folder / f"{number}.return.pkl"),
        }
        name = manifests.job_name(folder / str(number), "hydra", "")
        image = cluster.get("image")
        if not image and not cluster.get("local_pods"):
            raise ConfigError(
                "hydra.launcher.image is not set: the pods need an image holding the app",
                fix="hydra.launcher.image=<registry>/<app>:<tag> (or "
                "hydra.launcher.local_pods=true to run the pods here)",
            )
        if str(image).endswith(":latest"):
            raise ConfigError(f"hydra.launcher.image={image}: name the image by its tag",
                              fix="hydra.launcher.image=<registry>/<app>:<tag>")  # fmt: skip
        docs = manifests.render_trial(cluster, resources, str(image or "local"), name, "", {})
        config_map = docs[0]
        config_map["data"] = {}
        payload = cloudpickle.dumps(task)
        if len(payload) * 4 // 3 > manifests.CONFIGMAP_MAX:
            raise ConfigError(
                f"trial {number} pickles to {len(payload)} bytes: a ConfigMap holds 1 MiB",
                fix="keep large objects out of the config and the task function's closure",
            )
        config_map["binaryData"] = {"task.pkl": base64.b64encode(payload).decode()}
        container = docs[-1]["spec"]["template"]["spec"]["containers"][0]
        container["args"] = ["python", "-m", "hydra_plugins.trainyard.k8s_task",
                             f"{manifests.CONFIG_MOUNT}/task.pkl"]  # fmt: skip
        return docs

    def _submit(self, cluster, trials, objects, folder) -> tuple:
        import uuid

        from trainyard.backends.k8s_schema import validate
        from trainyard.backends.kubernetes import KubernetesBackend, KubernetesRequest

        for docs in objects:
            for doc in docs:
                validate(doc, "1.30")
        submission = f"hydra-{uuid.uuid4().hex[:8]}"
        for docs in objects:
            for doc in docs:
                doc["metadata"]["labels"]["trainyard.dev/submission"] = submission
        request = KubernetesRequest(
            submission, str(cluster.get("namespace") or "default"), trials, objects, folder,
            local=bool(cluster.get("local_pods")),
        )  # fmt: skip
        backend = KubernetesBackend()
        backend.check(request)
        job_id = backend.submit(request)
        log.info("trainyard: %d Hydra job(s) sent to Kubernetes as %s", len(trials), job_id)
        return job_id, backend


_ENDED = ("COMPLETED", "FAILED", "CANCELLED")


def _wait(backend, job_id: str, returns: list, poll_s: float, forget_after_s: float) -> None:
    """Until every trial left its return, or its Job ended or is gone (deleted, expired)."""
    import time

    from trainyard.errors import TrainyardError

    unknown_since = time.monotonic()
    while not all(path.exists() for path in returns):
        try:
            states = backend.status(job_id)
        except TrainyardError as exc:  # a blip of the API server: ask again next time
            log.warning("trainyard: state of %s: %s", job_id, exc.message)
            states = {job_id: "UNKNOWN"}
        if states:
            unknown_since = time.monotonic()
        elif time.monotonic() - unknown_since > forget_after_s:
            return
        if states and all(s in _ENDED for s in states.values()):
            return
        time.sleep(poll_s)


def _read_return(path: Path, overrides) -> Any:
    import pickle

    from hydra.core.utils import JobReturn, JobStatus

    if path.exists():
        return pickle.loads(path.read_bytes())
    ret = JobReturn(overrides=list(overrides), status=JobStatus.FAILED)
    ret.return_value = RuntimeError(f"the pod ended without a result ({path} is missing)")
    return ret


__all__ = ["TrainyardK8sConf", "TrainyardK8sLauncher"]
