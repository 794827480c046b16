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


def _states(run) -> list[str]:
    return [h["state"] for h in json.loads((run / "status.json").read_text())["history"]]


def test_extending_a_sweep_reuses_the_trials_that_completed(tmp_path):
    args = ["-m", "name=ext", "trainer.max_epochs=1"]
    first = train_cli([*args, "optimizer.lr=1e-3,2e-3"], tmp_path)
    assert first.returncode == 0, first.stderr
    earlier = {r.name: r for r in run_dirs(tmp_path)}
    # the same values spelt differently, and one more: a new sweep directory
    more = train_cli([*args, "optimizer.lr=0.001,0.002,0.003"], tmp_path)
    assert more.returncode == 0, more.stderr
    later = [r for r in run_dirs(tmp_path) if r.parent != next(iter(earlier.values())).parent]
    assert len(later) == 3
    for run in later:
        if run.name in earlier:  # found where the first sweep put it: not trained again
            assert _states(run) == ["created", "completed"]
            result = json.loads((run / "result.json").read_text())
            assert result["reused_from"] == str(earlier[run.name])
            assert result["value"] == json.loads(
                (earlier[run.name] / "result.json").read_text())["value"]  # fmt: skip
            assert (run / "checkpoints" / "best.ckpt").exists()  # the twin's, linked
        else:
            assert "running" in _states(run) and "lr-0.003" in run.name
    assert more.stdout.count("reused, not trained again") == 2
    import subprocess
    import sys

    status = subprocess.run([sys.executable, "-m", "trainyard.cli", "status", "--json",
                             str(later[0].parent)], capture_output=True, text=True)  # fmt: skip
    states = sorted(row["state"] for row in json.loads(status.stdout))
    assert states == ["completed", "completed (reused)", "completed (reused)"], status.stderr
    # a third sweep leads back to the trials that trained, and deleting the first sweep
    # loses nothing: the reused checkpoints are files of their own (hard links)
    third = train_cli([*args, "optimizer.lr=1e-3,4e-3"], tmp_path)
    assert third.returncode == 0, third.stderr
    [again] = [r for r in run_dirs(tmp_path) if "lr-0.001" in r.name and r.parent not in
               {earlier[r.name].parent, *(x.parent for x in later)}]  # fmt: skip
    origin = json.loads((again / "result.json").read_text())["reused_from"]
    assert origin == str(earlier[again.name])
    import shutil

    import trainyard

    shutil.rmtree(earlier[again.name].parent)
    for run in (again, *[r for r in later if r.name in earlier]):
        result = json.loads((run / "result.json").read_text())
        assert result["best_checkpoint"].startswith(str(run))
        assert trainyard.load(run).checkpoint.parent == run / "checkpoints"
    # a single run of a trial a sweep completed is found too
    single = train_cli(["name=ext", "trainer.max_epochs=1", "optimizer.lr=3e-3"], tmp_path)
    assert single.returncode == 0, single.stderr
    [run] = [r for r in run_dirs(tmp_path) if r.parent.name == "runs"]
    assert _states(run) == ["created", "completed"]
