"""Hydra's own launcher test suites against the real loopback Slurm cluster, for
``hydra/launcher=trainyard_slurm`` (hydra-submitit-launcher's Slurm launcher, composing
each trial once on the submitting side). They run plain Hydra apps, the path any Hydra
user takes; trainyard's own configs go through the backend (tests/integration/test_slurm.py).

The suites' assertions live in ``hydra.test_utils.launcher_common_tests``; the last test
here asserts what is trainyard's own. Left out: ``test_sweep_with_custom_resolver``
registers a resolver in the submitting process only, which a job on another node cannot see
(the same holds for hydra-submitit-launcher's own Slurm launcher).
"""

from pathlib import Path

import pytest
from hydra.test_utils.launcher_common_tests import IntegrationTestSuite, LauncherTestSuite

from tests.integration.test_slurm import needs_cluster

SITE = [
    "hydra.launcher.partition=debug",
    "hydra.launcher.account=trainyard",
    "hydra.launcher.timeout_min=5",
    "hydra.launcher.signal_delay_s=30",
]

pytestmark = [
    pytest.mark.slurm,
    pytest.mark.slow,
    needs_cluster,
    pytest.mark.usefixtures("hydra_version_base_unset"),
]


@pytest.mark.parametrize(("launcher_name", "overrides"), [("trainyard_slurm", SITE)])
class TestTrainyardSlurmLauncher(LauncherTestSuite):
    def test_sweep_with_custom_resolver(self, launcher_name, overrides) -> None:
        pytest.skip("a resolver registered at submission does not exist on the nodes")


@pytest.mark.parametrize(
    ("task_launcher_cfg", "extra_flags"),
    [({}, ["-m", "hydra/launcher=trainyard_slurm", *SITE])],
)
class TestTrainyardSlurmLauncherIntegration(IntegrationTestSuite):
    pass


@pytest.mark.usefixtures("hydra_restore_singletons")
def test_each_trial_runs_as_a_slurm_job_on_the_config_composed_at_submission(
    hydra_sweep_runner, tmpdir
):
    """Beyond Hydra's suites (whose assertions live in hydra.test_utils): every trial ran on
    a loopback node under its own Slurm array task, with its own override, and each job's
    pickle holds one composed config, not the whole sweep's."""

    def task(cfg):
        import os
        import socket

        return socket.gethostname(), os.environ.get("SLURM_ARRAY_TASK_ID"), cfg.foo

    sweep = hydra_sweep_runner(
        calling_file=None,
        calling_module="hydra.test_utils.a_module",
        task_function=task,
        config_path="configs",
        config_name="compose.yaml",
        overrides=["hydra/launcher=trainyard_slurm", *SITE, "foo=1,2,3"],
        temp_dir=tmpdir,
    )
    with sweep:
        results = [ret.return_value for ret in sweep.returns[0]]
        composed = sorted((Path(str(tmpdir)) / ".submitit" / "composed").glob("*.pkl"))
        assert len(composed) == 3
    assert {host for host, _, _ in results} <= {"n1", "n2"}
    assert sorted(task for _, task, _ in results) == ["0", "1", "2"]
    assert [foo for _, _, foo in results] == [1, 2, 3]
