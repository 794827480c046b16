"""``trainyard submit`` on the local backend: the same preparation, states and stops as every
cluster, on this machine; and a dry run that checks everything and writes nothing."""

import json
import time
from pathlib import Path

import pytest

from tests.conftest import cli, run_dirs
from trainyard.errors import EXIT_CONFIG

pytestmark = pytest.mark.slow


_cli = cli


def _state(run: Path) -> str | None:
    status = run / "status.json"
    return json.loads(status.read_text())["state"] if status.exists() else None


def _wait_state(root: Path, states: tuple[str, ...], timeout: float = 120) -> Path:
    deadline = time.monotonic() + timeout
    while True:
        runs = run_dirs(root)
        if runs and _state(runs[0]) in states:
            return runs[0]
        assert time.monotonic() < deadline, [(r, _state(r)) for r in runs]
        time.sleep(0.2)


def test_dry_run_prints_the_request_and_writes_nothing(tmp_path):
    out = _cli(tmp_path, "submit", "--dry-run", "cluster=slurm", "optimizer.lr=0.01,0.02")
    assert out.returncode == 0, out.stderr
    assert out.stdout.count("#SBATCH --array=0-1") == 1
    assert "submitit.core._submit" in out.stdout and "lr-0.01" in out.stdout
    assert not (tmp_path / "outputs").exists()


def test_bad_input_is_refused_before_anything_is_prepared(tmp_path):
    for override in ("optimizer.lr=nan", "model=transformer", "optimizer.lrr=1"):
        out = _cli(tmp_path, "submit", "cluster=slurm", override)
        assert out.returncode == EXIT_CONFIG, (override, out.stderr)
        assert "Traceback" not in out.stderr and "fix:" in out.stderr
    assert not (tmp_path / "outputs").exists()


def test_local_submission_trains_and_a_second_one_skips_it(tmp_path):
    out = _cli(tmp_path, "submit", "cluster=local", "trainer.max_epochs=1")
    assert out.returncode == 0, out.stderr
    run = _wait_state(tmp_path, ("completed", "failed"))
    assert _state(run) == "completed"
    again = _cli(tmp_path, "submit", "cluster=local", "trainer.max_epochs=1")
    assert "already completed; not submitted again" in again.stdout
    status = _cli(tmp_path, "status", "--json")
    assert json.loads(status.stdout)[0]["state"] == "completed"


def test_cancel_preempts_the_trial_and_a_resubmission_resumes_it(tmp_path):
    args = ["submit", "cluster=local", "trainer.max_epochs=300", "callbacks.early_stopping=null"]
    assert _cli(tmp_path, *args).returncode == 0
    run = _wait_state(tmp_path, ("running",))
    deadline = time.monotonic() + 60
    while not (run / "checkpoints" / "last.ckpt").exists():
        assert time.monotonic() < deadline
        time.sleep(0.2)
    out = _cli(tmp_path, "cancel", str(run))
    assert out.returncode == 0 and "cancelled local job" in out.stdout
    _wait_state(tmp_path, ("preempted",), 60)
    logs = _cli(tmp_path, "logs", str(run))
    assert "SIGTERM received" in logs.stdout
    assert _cli(tmp_path, *args).returncode == 0  # resumes: attempt 2
    _wait_state(tmp_path, ("running",))
    assert json.loads((run / "status.json").read_text())["attempt"] == 2
    _cli(tmp_path, "cancel", str(run))
    _wait_state(tmp_path, ("preempted",), 60)


def test_build_check_builds_the_constructors_before_anything_is_prepared(tmp_path):
    # a value only the loss itself refuses, on a dummy batch
    args = ["submit", "--build-check", "cluster=slurm", "loss.label_smoothing=1.5"]
    out = _cli(tmp_path, *args, "optimizer.lr=0.1,0.2")
    assert out.returncode == EXIT_CONFIG, out.stderr
    assert "loss" in out.stderr and "fix:" in out.stderr and "Traceback" not in out.stderr
    assert not (tmp_path / "outputs").exists()
    ok = _cli(tmp_path, "submit", "--build-check", "--dry-run", "cluster=slurm", "scheduler=none")
    assert ok.returncode == 0, ok.stderr


def test_a_sweep_over_settings_that_do_not_define_a_trial_is_refused(tmp_path):
    out = _cli(tmp_path, "submit", "--dry-run", "cluster=slurm", "cluster.partition=a,b")
    assert out.returncode == EXIT_CONFIG and "are the same trial" in out.stderr, out.stderr


def test_hydra_launcher_settings_are_refused_by_submit_naming_cluster(tmp_path):
    out = _cli(tmp_path, "submit", "--dry-run", "cluster=slurm", "hydra.launcher.partition=x")
    assert out.returncode == EXIT_CONFIG and "cluster.partition" in out.stderr, out.stderr


def test_the_dry_run_leaves_out_a_completed_trial(tmp_path):
    assert _cli(tmp_path, "submit", "cluster=local", "trainer.max_epochs=1").returncode == 0
    _wait_state(tmp_path, ("completed",))
    out = _cli(tmp_path, "submit", "--dry-run", "cluster=slurm", "trainer.max_epochs=1")
    assert out.returncode == 0, out.stderr
    assert "would not be submitted again" in out.stdout and "#SBATCH" not in out.stdout
