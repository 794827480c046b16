"""trainyard's Optuna sweeper under Hydra's own sweeper test suite (hydra.test_utils): the
grid walked in batches of n_jobs, in the order written, as Hydra's basic sweeper does."""

from __future__ import annotations

import pytest
from hydra.test_utils.launcher_common_tests import BatchedSweeperTestSuite

pytestmark = pytest.mark.usefixtures("hydra_version_base_unset")


GRID_IN_PAIRS = ["hydra/sweeper=trainyard_optuna", "hydra.sweeper.sampler=grid",
                 "hydra.sweeper.n_jobs=2"]  # fmt: skip


@pytest.mark.parametrize(("launcher_name", "overrides"), [("basic", GRID_IN_PAIRS)])
class TestTrainyardOptunaSweeper(BatchedSweeperTestSuite):
    pass
