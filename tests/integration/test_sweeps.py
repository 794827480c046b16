"""Sweeps survive a failed trial: it is recorded, the others run, the sweep reports it."""

import json

import pytest

from tests.conftest import run_dirs, train_cli
from trainyard.errors import EXIT_CONFIG

pytestmark = pytest.mark.slow

ARGS = ["-m", "name=sw", "data=synthetic_sequence", "trainer.max_epochs=1"]


def test_a_failing_trial_does_not_stop_the_others(tmp_path):
    out = train_cli([*ARGS, "model=cnn,rnn"], tmp_path)
    assert out.returncode == EXIT_CONFIG, out.stderr
    assert "Traceback" not in out.stderr
    # one line per failed trial at the end, naming it and why
    summary = out.stderr.split("trial(s) of the sweep failed:")[1]
    [line] = [line for line in summary.splitlines() if line.strip()]
    assert "model-cnn" in line and "does not fit the data" in line and "[exit 2]" in line
    failed, done = run_dirs(tmp_path)  # the failure is on record, the rnn trial ran to the end
    assert "model-cnn" in failed.name and "model-rnn" in done.name
    assert json.loads((failed / "status.json").read_text())["state"] == "failed"
    assert json.loads((done / "status.json").read_text())["state"] == "completed"


def test_fail_fast_stops_at_the_first_failure(tmp_path):
    out = train_cli([*ARGS, "model=cnn,rnn", "fail_fast=true"], tmp_path)
    assert out.returncode == EXIT_CONFIG
    assert "does not fit the data" in out.stderr
    [failed] = run_dirs(tmp_path)  # the failure is on record; the rnn trial never started
    assert "model-cnn" in failed.name
