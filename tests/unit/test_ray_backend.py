"""The Ray backend's request, without a cluster: what the Jobs API would receive, the job
ids that name their head, and the requests refused before anything is sent."""

from __future__ import annotations

import json
import shlex
from pathlib import Path

import pytest

from trainyard.backends import Job, Resources, get
from trainyard.backends.ray import job_id as make_job_id
from trainyard.backends.ray import jobs_address, split_job_id
from trainyard.backends.ray_driver import infeasible
from trainyard.errors import ConfigError


def _job(tmp_path: Path, resources: Resources, **cluster) -> Job:
    trials = [tmp_path / "sweep" / f"t{i}" for i in range(3)]
    settings = {"backend": "ray", "address": "http://127.0.0.1:8265", "max_retries": 2, **cluster}
    return Job("digits mlp", trials, resources, settings, tmp_path / "sweep")


def test_the_request_is_the_driver_command_with_each_trials_resources(tmp_path):
    job = _job(tmp_path, Resources(tasks_per_node=2, gpus_per_node=2, cpus_per_task=4),
               max_concurrent=5, python="python", env={"WANDB_MODE": "offline"})  # fmt: skip
    [request] = get("ray").render(job)
    payload = request.payload()
    argv = shlex.split(payload["entrypoint"])
    assert argv[:3] == ["python", "-m", "trainyard.backends.ray_driver"]
    assert argv[3] == str(request.trials_file) and request.trials_file.parent == job.log_dir
    options = dict(zip(argv[4::2], argv[5::2], strict=True))
    assert options == {"--cpus": "8", "--gpus": "2", "--max-retries": "2", "--max-requeues": "3",
                       "--max-concurrent": "5"}  # fmt: skip
    assert payload["runtime_env"]["env_vars"]["RAY_JOB_STOP_WAIT_TIME_S"] == "60"
    assert payload["entrypoint_num_cpus"] == 0
    assert payload["runtime_env"]["env_vars"]["WANDB_MODE"] == "offline"
    assert payload["submission_id"].startswith("trainyard-digits-mlp-")
    assert json.loads(str(request).split("\n", 1)[1]) == payload  # the dry run prints it
    assert not request.trials_file.exists()  # rendering writes nothing


def test_a_head_on_this_machine_runs_the_driver_with_this_interpreter(tmp_path):
    import sys

    [request] = get("ray").render(_job(tmp_path, Resources()))
    assert shlex.split(request.entrypoint)[0] == sys.executable
    remote = _job(tmp_path, Resources(), address="ray-head.ml.svc:8265")
    [request] = get("ray").render(remote)
    assert shlex.split(request.entrypoint)[0] == "python"  # the image's


def test_job_ids_name_their_head():
    for address in ("http://127.0.0.1:8265", "https://ray.example/api"):
        assert split_job_id(make_job_id("trainyard-x-1", address)) == ("trainyard-x-1", address)
    with pytest.raises(ConfigError):
        split_job_id("12345")


def test_addresses_that_are_not_the_jobs_api_are_refused():
    assert jobs_address("10.0.0.1:8265") == "http://10.0.0.1:8265"
    for wrong in ("ray://head:10001", "auto"):
        with pytest.raises(ConfigError, match="Jobs API"):
            jobs_address(wrong)


def test_a_trial_spanning_nodes_is_refused_with_where_it_can_run(tmp_path):
    with pytest.raises(ConfigError, match="num_nodes=2") as info:
        get("ray").render(_job(tmp_path, Resources(nodes=2)))
    assert "cluster=slurm" in info.value.fix


def test_infeasible_names_what_a_trial_needs_and_the_largest_node():
    nodes = [{"CPU": 8.0}, {"CPU": 16.0, "GPU": 2.0}]
    assert infeasible(nodes, 4, 1) is None
    problem = infeasible(nodes, 4, 4)
    assert "4 GPU(s)" in problem and "16 CPU(s) and 2 GPU(s)" in problem
    assert infeasible([], 1, 0) is not None


def test_a_ray_auth_token_at_hand_is_sent(tmp_path, monkeypatch):
    from trainyard.backends.ray import auth_headers

    monkeypatch.delenv("RAY_AUTH_TOKEN", raising=False)
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(tmp_path / "none"))
    assert auth_headers() == {}
    (tmp_path / "token").write_text("abc123\n")
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(tmp_path / "token"))
    assert auth_headers() == {"Authorization": "Bearer abc123"}
    monkeypatch.setenv("RAY_AUTH_TOKEN", "from-env")
    assert auth_headers() == {"Authorization": "Bearer from-env"}
