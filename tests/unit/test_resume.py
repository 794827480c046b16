"""Re-running a trial: same directory, same frozen config, nothing overwritten."""

import pytest

from trainyard.errors import RunDirError
from trainyard.rundir import read_json
from trainyard.train import drive

FAST = ["++trainer.fast_dev_run=2"]


def test_changed_defaults_under_the_same_overrides_are_refused(cfg_factory, tmp_path):
    run_dir = tmp_path / "run"
    drive(cfg_factory(*FAST), run_dir, FAST)
    frozen = (run_dir / "config.yaml").read_text()
    # the same command line, but conf/ changed since (here: another learning rate)
    with pytest.raises(RunDirError, match=r"different config \(changed: optimizer\.lr\)") as info:
        drive(cfg_factory(*FAST, "optimizer.lr=0.5"), run_dir, FAST)
    assert "name=<new name>" in info.value.fix
    assert (run_dir / "config.yaml").read_text() == frozen


def test_a_completed_trial_returns_its_stored_metric(cfg_factory, tmp_path):
    run_dir = tmp_path / "run"
    first = drive(cfg_factory(*FAST), run_dir, FAST)
    history = read_json(run_dir / "status.json")["history"]
    assert drive(cfg_factory(*FAST), run_dir, FAST) == first
    assert read_json(run_dir / "status.json")["history"] == history
