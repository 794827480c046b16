"""Hydra's own launcher test suites against the real loopback Slurm cluster, for
``hydra/launcher=trainyard_slurm`` (hydra-submitit-launcher's Slurm launcher, composing
each trial once on the submitting side). They run plain Hydra apps, the path any Hydra
user takes; trainyard's own configs go through the backend (tests/integration/test_slurm.py).

Left out: ``test_sweep_with_custom_resolver`` registers a resolver in the submitting
process only, which a job on another node cannot see (the same holds for
hydra-submitit-launcher's own Slurm launcher).
"""

import pytest
from hydra.test_utils.launcher_common_tests import IntegrationTestSuite, LauncherTestSuite

from tests.integration.test_slurm import needs_cluster

SITE = [
    "hydra.launcher.partition=debug",
    "hydra.launcher.account=trainyard",
    "hydra.launcher.timeout_min=5",
    "hydra.launcher.signal_delay_s=30",
]

pytestmark = [pytest.mark.slurm, pytest.mark.slow, needs_cluster]


@pytest.fixture(autouse=True)
def _hydra_version_base_unset():
    """The suites assume a fresh process's Hydra (no version_base chosen: the job changes
    into its output directory); other tests in this process composed with 1.3."""
    from hydra.version import _UNSPECIFIED_, VersionBase

    instance = VersionBase.instance()
    saved, instance.version_base = instance.version_base, _UNSPECIFIED_  # as in a new process
    yield
    instance.version_base = saved


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
