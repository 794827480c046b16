"""Hydra's own launcher test suites for ``hydra/launcher=trainyard_k8s``, with the rendered
pods run as processes on this machine (``hydra.launcher.local_pods=true``): every trial of
these plain Hydra apps is a Kubernetes Job rendered from k8s/, whose pod runs the task
function on the config composed at submission. trainyard's own configs go through the
backend (tests/integration/test_k8s_pods.py).

The suites' assertions live in ``hydra.test_utils.launcher_common_tests``. Left out:
``test_sweep_with_custom_resolver`` registers a resolver in the submitting process only,
which a pod cannot see (the same holds for submitit's and Ray's launchers).
"""

import os
from pathlib import Path

import pytest
from hydra.test_utils.launcher_common_tests import IntegrationTestSuite, LauncherTestSuite

LOCAL_PODS = ["hydra.launcher.local_pods=true", "hydra.launcher.poll_s=0.2"]

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("hydra_version_base_unset")]


@pytest.mark.parametrize(("launcher_name", "overrides"), [("trainyard_k8s", LOCAL_PODS)])
class TestTrainyardK8sLauncher(LauncherTestSuite):
    def test_sweep_with_custom_resolver(self, launcher_name, overrides) -> None:
        pytest.skip("a resolver registered at submission does not exist in the pods")


@pytest.mark.parametrize(
    ("task_launcher_cfg", "extra_flags"),
    [({}, ["-m", "hydra/launcher=trainyard_k8s", *LOCAL_PODS])],
)
class TestTrainyardK8sLauncherIntegration(IntegrationTestSuite):
    pass


@pytest.mark.usefixtures("hydra_restore_singletons")
def test_each_trial_runs_in_a_pod_of_its_own_job(hydra_sweep_runner, tmpdir):
    """Beyond Hydra's suites: each trial ran in another process, as pod 0 of its own Job
    (JOB_COMPLETION_INDEX and a hostname of its Job's), with its own override."""

    def task(cfg):
        import os

        return (
            os.getpid(),
            os.environ.get("HOSTNAME"),
            os.environ.get("JOB_COMPLETION_INDEX"),
            cfg.foo,
        )

    sweep = hydra_sweep_runner(
        calling_file=None,
        calling_module="hydra.test_utils.a_module",
        task_function=task,
        config_path="configs",
        config_name="compose.yaml",
        overrides=["hydra/launcher=trainyard_k8s", *LOCAL_PODS, "foo=1,2,3"],
        temp_dir=tmpdir,
    )
    with sweep:
        results = [ret.return_value for ret in sweep.returns[0]]
        returns = list((Path(str(tmpdir)) / ".trainyard_k8s").glob("*.return.pkl"))
    assert len({pid for pid, *_ in results} | {os.getpid()}) == 4
    assert all(host.startswith("hydra-") and host.endswith("-0") for _, host, _, _ in results)
    assert len({host for _, host, _, _ in results}) == 3
    assert [index for _, _, index, _ in results] == ["0", "0", "0"]
    assert [foo for *_, foo in results] == [1, 2, 3]
    assert len(returns) == 3
