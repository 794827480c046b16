"""What the pod of a plain Hydra app's trial runs (``hydra/launcher=trainyard_k8s``):
``python -m hydra_plugins.trainyard.k8s_task <task.pkl>``.

The pickle, from the trial's ConfigMap, holds the config composed on the submitting side
(nothing is composed here), the task function, and Hydra's state; the job's return is
pickled where the launcher waits for it. The task function must be importable in the pod,
as for any remote launcher (submitit's, Ray's)."""

from __future__ import annotations

import pickle
import sys
from pathlib import Path


def main(task_file: str) -> int:
    import cloudpickle
    from hydra.core.singleton import Singleton
    from hydra.core.utils import JobStatus, run_job, setup_globals

    task = pickle.loads(Path(task_file).read_bytes())
    Singleton.set_state(task["singleton_state"])
    setup_globals()
    ret = run_job(
        hydra_context=task["hydra_context"],
        task_function=task["task_function"],
        config=task["config"],
        job_dir_key="hydra.sweep.dir",
        job_subdir_key="hydra.sweep.subdir",
    )
    target = Path(task["return_file"])
    tmp = target.with_name(target.name + ".tmp")
    # cloudpickle: the return holds Hydra's config, whose launcher schema class Hydra
    # imported apart from sys.modules (plain pickle cannot find it by name)
    tmp.write_bytes(cloudpickle.dumps(ret))
    tmp.replace(target)
    return 0 if ret.status == JobStatus.COMPLETED else 3


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
