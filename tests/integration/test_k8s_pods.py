"""The rendered pod templates, run for real: ``trainyard submit cluster=k8s_local`` renders
the same manifests as ``cluster=k8s`` and runs each Job's pods as processes with the
environment Kubernetes gives pods of an Indexed Job (trainyard/backends/k8s_local.py plays
the Job controller, podFailurePolicy included). Two pods form a DDP group across "nodes";
a SIGTERM to one pod (a drained node) leads to a checkpoint, and the replaced pods resume.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from tests.conftest import run_dirs

pytestmark = pytest.mark.slow

TWO_NODES = ["cluster=k8s_local", "trainer=ddp", "trainer.devices=1", "trainer.num_nodes=2"]


@pytest.fixture(autouse=True)
def _no_pods_left(tmp_path):
    """A failed test must not leave a runner and its pods training in the background."""
    yield
    for state_file in tmp_path.rglob("k8s/*/state.json"):
        state = json.loads(state_file.read_text())
        for pid in [state.get("pid"), *(p["pid"] for p in state.get("pods", {}).values())]:
            with contextlib.suppress(ProcessLookupError, TypeError):
                os.kill(pid, signal.SIGKILL)


def _cli(root: Path, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    env = {**os.environ, "TRAINYARD_ROOT": str(root)}
    return subprocess.run(
        [sys.executable, "-m", "trainyard.cli", *args],
        cwd=root, env=env, capture_output=True, text=True, timeout=timeout,
    )  # fmt: skip


def _runner_state(run: Path) -> dict:
    files = list((run / "k8s").glob("*/state.json"))
    return json.loads(files[0].read_text()) if files else {}


def _wait(what, timeout: float = 180):
    deadline = time.monotonic() + timeout
    while not (value := what()):
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.2)
    return value


def _status(run: Path) -> dict:
    path = run / "status.json"
    return json.loads(path.read_text()) if path.exists() else {}


def test_two_pods_form_a_ddp_group_and_finish(tmp_path):
    out = _cli(tmp_path, "submit", *TWO_NODES, "trainer.max_epochs=2")
    assert out.returncode == 0, out.stderr
    run = _wait(lambda: run_dirs(tmp_path) and run_dirs(tmp_path)[0])
    state = _wait(lambda: _runner_state(run).get("trials") != ["RUNNING"] and _runner_state(run))
    assert state["trials"] == ["COMPLETED"], _cli(tmp_path, "logs", str(run)).stdout
    pods = state["pods"]
    assert len(pods) == 2 and all(p["exit_codes"] == [0] for p in pods.values())
    result = json.loads((run / "result.json").read_text())
    assert result["world_size"] == 2 and result["epochs"] == 2
    # pod 0's termination message carries the metric (for launchers that cannot see the claim)
    message = next(json.loads(p["message"]) for n, p in pods.items() if n.endswith("-0"))
    assert message["value"] == result["value"] and message["state"] == "completed"
    # rank 1 ran in pod 1 as its first local rank: node 1 of the group
    rank1 = json.loads((run / "ranks" / "rank1.json").read_text())
    assert rank1["local_rank"] == 0
    # both ranks trained from the ConfigMap's config, installed once in the run directory
    digests = {json.loads((run / "ranks" / f"rank{r}.json").read_text())["config_sha256"]
               for r in (0, 1)}  # fmt: skip
    assert len(digests) == 1
    request = yaml.safe_load(next((run / "k8s").glob("*/request.yaml")).read_text())
    config_map = request["trials"][0]["objects"][0]
    assert yaml.safe_load(config_map["data"]["config.yaml"]) == yaml.safe_load(
        (run / "config.yaml").read_text()
    )
    status = _cli(tmp_path, "status", "--json")
    row = json.loads(status.stdout)[0]
    assert row["state"] == "completed" and row["scheduler"] == "COMPLETED"
    logs = _cli(tmp_path, "logs", str(run)).stdout
    assert "attempt 1" in logs and "GLOBAL_RANK: 1" in logs


def test_a_sigterm_to_one_pod_checkpoints_and_the_replaced_pods_resume(tmp_path):
    long = ["trainer.max_epochs=300", "callbacks.early_stopping=null"]
    assert _cli(tmp_path, "submit", *TWO_NODES, *long).returncode == 0
    run = _wait(lambda: run_dirs(tmp_path) and run_dirs(tmp_path)[0])
    _wait(lambda: (run / "checkpoints" / "last.ckpt").exists())
    pod1 = next(p for name, p in _runner_state(run)["pods"].items() if name.endswith("-1"))
    os.kill(pod1["pid"], signal.SIGTERM)  # the node drains: kubelet stops pod 1
    # every rank stops at the same step boundary; the Job replaces both pods (exit 75:
    # ignored by the podFailurePolicy) and the new group resumes from last.ckpt
    _wait(lambda: _status(run).get("attempt") == 2 and _status(run)["state"] == "running")
    history = _status(run)["history"]
    assert [h["state"] for h in history].count("preempted") == 1
    assert history[-1]["resumed_from"].endswith("last.ckpt")
    pods = _runner_state(run)["pods"]
    assert all(p["exit_codes"] == [75] and p["attempt"] == 2 for p in pods.values()), pods
    # deleting the Job: the pods checkpoint and stop, and nothing replaces them
    out = _cli(tmp_path, "cancel", str(run), timeout=240)
    assert out.returncode == 0 and "cancelled k8s job" in out.stdout, out.stderr
    assert _status(run)["state"] == "preempted"
    assert _runner_state(run)["trials"] == ["CANCELLED"]
    assert _cli(tmp_path, "status", "--json").returncode == 0


def test_bad_input_in_a_pod_fails_the_job_without_retries(tmp_path):
    """A trial that cannot even start (exit 2) fails the Job at once: FailJob."""
    out = _cli(tmp_path, "submit", "cluster=k8s_local", "data=mnist", "trainer.max_epochs=1")
    assert out.returncode == 0, out.stderr  # the dataset is missing on the "node", not here
    run = _wait(lambda: run_dirs(tmp_path) and run_dirs(tmp_path)[0])
    state = _wait(lambda: _runner_state(run).get("trials") != ["RUNNING"] and _runner_state(run))
    assert state["trials"] == ["FAILED"]
    assert [p["exit_codes"] for p in state["pods"].values()] == [[2]]
    assert _status(run)["state"] == "failed"


def test_a_sweep_through_the_hydra_launcher_runs_every_trial_as_a_job(tmp_path):
    """``trainyard-train -m cluster=k8s_local ...``: Hydra's sweep goes out through trainyard's
    launcher to the Kubernetes backend; it waits and hands each trial's metric back."""
    from tests.conftest import train_cli

    out = train_cli(["-m", "cluster=k8s_local", "optimizer.lr=0.01,0.002", "trainer.max_epochs=1"],
                    tmp_path, timeout=300)  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    runs = run_dirs(tmp_path)
    assert len(runs) == 2
    for run in runs:
        assert _status(run)["state"] == "completed"
    states = list((runs[0].parent / "k8s").glob("*/state.json"))
    assert len(states) == 1  # one submission: both trials, one after the other
    assert json.loads(states[0].read_text())["trials"] == ["COMPLETED", "COMPLETED"]
