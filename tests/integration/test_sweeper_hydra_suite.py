"""trainyard's Optuna sweeper under Hydra's own sweeper test suite (hydra.test_utils): the
grid walked in batches of n_jobs, in the order written, as Hydra's basic sweeper does. The
suite's assertions are inherited (``test_sweep_2_jobs_2_batches``); the test below adds what
this sweeper keeps beyond Hydra's: its study on disk, one completed trial per point."""

from __future__ import annotations

import pytest
from hydra.test_utils.launcher_common_tests import BatchedSweeperTestSuite

pytestmark = pytest.mark.usefixtures("hydra_version_base_unset")


GRID_IN_PAIRS = ["hydra/sweeper=trainyard_optuna", "hydra.sweeper.sampler=grid",
                 "hydra.sweeper.n_jobs=2"]  # fmt: skip


@pytest.mark.parametrize(("launcher_name", "overrides"), [("basic", GRID_IN_PAIRS)])
class TestTrainyardOptunaSweeper(BatchedSweeperTestSuite):
    pass


@pytest.mark.usefixtures("hydra_restore_singletons")
def test_the_suites_sweep_leaves_its_study_with_every_point_completed(hydra_sweep_runner, tmpdir):
    import optuna
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    sweep = hydra_sweep_runner(
        calling_file=None, calling_module="hydra.test_utils.a_module", task_function=None,
        config_path="configs", config_name="compose.yaml", temp_dir=tmpdir,
        overrides=[*GRID_IN_PAIRS, "hydra/launcher=basic", "group1=file1,file2", "bar=100,200"],
    )  # fmt: skip
    with sweep:
        assert [len(batch) for batch in sweep.returns] == [2, 2]
        journal = JournalStorage(JournalFileBackend(f"{sweep.temp_dir}/study.journal"))
        [summary] = optuna.get_all_study_summaries(journal)
        study = optuna.load_study(study_name=summary.study_name, storage=journal)
        points = sorted((t.params["group1"], t.params["bar"]) for t in study.trials)
        assert points == [("file1", 100), ("file1", 200), ("file2", 100), ("file2", 200)]
        assert {t.state.name for t in study.trials} == {"COMPLETE"}
