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

from tests.conftest import cli, pretend_gpus, run_dirs

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


_cli = cli


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
    # a new pod 0 of a completed trial (a sweep sent again) trains nothing and still reports
    config = tmp_path / "configmap.yaml"
    config.write_text(config_map["data"]["config.yaml"])
    again = _pod(config, 0, tmp_path / "termination-log")
    assert again.wait(timeout=120) == 0
    assert json.loads((tmp_path / "termination-log").read_text())["value"] == result["value"]
    assert json.loads((run / "status.json").read_text())["attempt"] == 1


def _pod(config: Path, index: int, termination: Path | None = None) -> subprocess.Popen:
    """The pod template's command, as the image runs it, for pod ``index``."""
    env = {**os.environ, "JOB_COMPLETION_INDEX": str(index), "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": "29591", "TRAINYARD_TERMINATION_LOG": str(termination or "")}  # fmt: skip
    command = [sys.executable, "-m", "trainyard.backends.k8s_pod", str(config)]
    return subprocess.Popen(
        command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )


def test_a_pod_waiting_for_pod_0_stops_at_once_on_sigterm(tmp_path):
    """Pod 1 waits for pod 0 (still pending, say); deleting the Job must not leave it
    waiting out the grace period."""
    dry = _cli(tmp_path, "submit", "--dry-run", *TWO_NODES)
    assert dry.returncode == 0, dry.stderr
    config_map = next(d for d in yaml.safe_load_all(dry.stdout) if d and d["kind"] == "ConfigMap")
    config = tmp_path / "config.yaml"
    config.write_text(config_map["data"]["config.yaml"])
    pod = _pod(config, 1)
    time.sleep(3)
    assert pod.poll() is None  # waiting
    pod.send_signal(signal.SIGTERM)
    assert pod.wait(timeout=15) == 75, pod.stdout.read()


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


def test_a_lost_node_restarts_the_group_which_resumes(tmp_path):
    """Pod 1 is killed outright (its node is lost: no SIGTERM, no checkpoint). Pod 0's ranks
    fail in their collectives; both failures count once against the Job's backoff limit
    (cluster.backoff_limit per node), the Job replaces both pods, and the trial resumes
    from the last.ckpt of its last finished epoch."""
    args = [*TWO_NODES, "trainer.max_epochs=6", "callbacks.early_stopping=null",
            "cluster.backoff_limit=1"]  # fmt: skip
    assert _cli(tmp_path, "submit", *args).returncode == 0
    run = _wait(lambda: run_dirs(tmp_path) and run_dirs(tmp_path)[0])
    _wait(lambda: (run / "checkpoints" / "last.ckpt").exists())
    pod1 = next(p for name, p in _runner_state(run)["pods"].items() if name.endswith("-1"))
    os.kill(pod1["pid"], signal.SIGKILL)
    state = _wait(lambda: _runner_state(run).get("trials") != ["RUNNING"] and _runner_state(run),
                  timeout=300)  # fmt: skip
    assert state["trials"] == ["COMPLETED"], state
    codes = sorted(tuple(p["exit_codes"]) for p in state["pods"].values())
    assert codes == [(-9, 0), (3, 0)], codes
    history = _status(run)["history"]
    assert _status(run)["state"] == "completed" and _status(run)["attempt"] == 2
    assert next(h for h in history if h.get("resumed_from"))["resumed_from"].endswith("last.ckpt")


def test_cancelling_a_sweep_leaves_no_trial_pending_or_failed(tmp_path):
    args = ["cluster=k8s_local", "trainer.max_epochs=300", "callbacks.early_stopping=null",
            "optimizer.lr=0.01,0.02"]  # fmt: skip
    assert _cli(tmp_path, "submit", *args).returncode == 0
    _wait(lambda: any((r / "checkpoints" / "last.ckpt").exists() for r in run_dirs(tmp_path)))
    sweep = run_dirs(tmp_path)[0].parent
    out = _cli(tmp_path, "cancel", str(sweep), timeout=240)
    assert out.returncode == 0, out.stderr
    [state_file] = sweep.glob("k8s/*/state.json")
    assert json.loads(state_file.read_text())["trials"] == ["CANCELLED", "CANCELLED"]
    rows = json.loads(_cli(tmp_path, "status", "--json", str(sweep)).stdout)
    assert sorted(r["state"] for r in rows) == ["cancelled", "preempted (cancelled)"], rows


def test_ctrl_c_on_a_sweep_says_where_its_trials_went(tmp_path):
    """The driver of ``trainyard-train -m cluster=k8s_local`` stopped while it waits: its
    trials stay with the cluster, and it says how to follow or cancel them."""
    env = {**os.environ, "TRAINYARD_ROOT": str(tmp_path)}
    args = ["-m", "cluster=k8s_local", "trainer.max_epochs=300", "callbacks.early_stopping=null",
            "optimizer.lr=0.01,0.02", "hydra.launcher.poll_s=0.2"]  # fmt: skip
    driver = subprocess.Popen(
        [sys.executable, "-m", "trainyard.train", *args], cwd=tmp_path, env=env,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    _wait(lambda: any((r / "checkpoints" / "last.ckpt").exists() for r in run_dirs(tmp_path)))
    driver.send_signal(signal.SIGINT)
    _, stderr = driver.communicate(timeout=60)
    assert driver.returncode == 130, stderr[-2000:]
    assert "Traceback" not in stderr and "trainyard cancel" in stderr
    sweep = run_dirs(tmp_path)[0].parent
    assert _cli(tmp_path, "cancel", str(sweep), timeout=240).returncode == 0


def test_gpu_pods_are_refused_where_they_would_run_on_this_machine(tmp_path):
    out = _cli(tmp_path, "submit", "cluster=k8s_local", "trainer=ddp", "trainer.accelerator=gpu",
               "trainer.devices=64")  # fmt: skip
    assert out.returncode == 2 and "GPU(s); 1 pod(s) at once ask for 64 each" in out.stderr
    assert "cluster=k8s to send the Jobs to a cluster" in out.stderr


@pytest.mark.parametrize(
    ("trainer", "visible"),
    [
        (["trainer.accelerator=gpu"], ["3", "5"]),  # the device plugin: a GPU each, its own
        ([], ["", ""]),  # CPU pods (NVIDIA_VISIBLE_DEVICES=void): none, on a GPU machine too
    ],
    ids=["gpu-pods", "cpu-pods"],
)
def test_each_local_pod_sees_the_gpus_it_asked_for_and_no_others(tmp_path, trainer, visible):
    """The runner's GPU share, seen by the pods of a rendered 2-node Job whose command is
    replaced with one that reports CUDA_VISIBLE_DEVICES (no GPU is needed to check it)."""
    dry = _cli(tmp_path, "submit", "--dry-run", "cluster=k8s", "cluster.image=trainyard:test",
               "trainer=ddp", "trainer.devices=1", "trainer.num_nodes=2", *trainer,
               env={"KUBECONFIG": str(tmp_path / "none")})  # fmt: skip
    assert dry.returncode == 0, dry.stderr
    objects = [d for d in yaml.safe_load_all(dry.stdout) if d]
    job = next(o for o in objects if o["kind"] == "Job")
    job["spec"]["template"]["spec"]["containers"][0]["args"] = [
        "python", "-c", "import os; print('visible=' + os.environ['CUDA_VISIBLE_DEVICES'])"
    ]  # fmt: skip
    spec = tmp_path / "runner" / "request.yaml"
    spec.parent.mkdir()
    spec.write_text(yaml.safe_dump({"submission": "s", "trials": [{"objects": objects}]}))
    runner = subprocess.run(
        [sys.executable, "-m", "trainyard.backends.k8s_local", str(spec)],
        env={**os.environ, "CUDA_VISIBLE_DEVICES": "3,5"}, capture_output=True, timeout=120,
    )  # fmt: skip
    assert runner.returncode == 0, runner.stderr
    name = job["metadata"]["name"]
    seen = [(spec.parent / f"{name}-{i}.log").read_text().split("visible=")[1].strip()
            for i in (0, 1)]  # fmt: skip
    assert seen == visible


def test_cpu_pods_on_a_gpu_machine_see_no_gpu_and_train_on_cpu(tmp_path):
    # trainer.accelerator stays auto: the pods ask for no GPU, so there is none to choose
    out = _cli(tmp_path, "submit", *TWO_NODES, "trainer.max_epochs=1", env=pretend_gpus(1))
    assert out.returncode == 0, out.stderr
    run = _wait(lambda: run_dirs(tmp_path) and run_dirs(tmp_path)[0])
    state = _wait(lambda: _runner_state(run).get("trials") != ["RUNNING"] and _runner_state(run))
    assert state["trials"] == ["COMPLETED"], _cli(tmp_path, "logs", str(run)).stdout
    ranks = [json.loads((run / "ranks" / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [(r["accelerator"], r["cuda_visible_devices"]) for r in ranks] == [("cpu", "")] * 2


def test_local_gpu_pods_that_would_share_this_machines_gpus_are_refused(tmp_path):
    out = _cli(tmp_path, "submit", *TWO_NODES, "trainer.accelerator=gpu",
               env={"CUDA_VISIBLE_DEVICES": "0"})  # fmt: skip
    assert out.returncode == 2, out.stderr
    assert "which has 1 GPU(s); 2 pod(s) at once ask for 1 each" in out.stderr
    assert not run_dirs(tmp_path)  # refused before anything was written
