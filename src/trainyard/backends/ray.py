"""Ray: a submission is one Ray job, sent to the head's Jobs API (what ``ray job submit``
uses). Its driver (:mod:`trainyard.backends.ray_driver`) runs each prepared trial as a Ray
task on the cluster's workers, so a worker keeps its imports from one trial to the next and
the job outlives the machine that submitted it; ``status``, ``logs`` and ``cancel`` take the
job's submission id.

The run directories must be on storage the cluster sees under the same paths (a head on
this machine, or a shared filesystem mounted alike on every node): the driver is given
the trials' paths, not their configs.
"""

from __future__ import annotations

import hashlib
import json
import shlex
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from trainyard.backends.base import Backend, Job, NoCluster
from trainyard.errors import ConfigError, TrainyardError

# Ray's job states -> the scheduler states trainyard's launchers and CLI know
STATES = {
    "PENDING": "PENDING",
    "RUNNING": "RUNNING",
    "STOPPED": "CANCELLED",
    "SUCCEEDED": "COMPLETED",
    "FAILED": "FAILED",
}
_LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1")
_clients: dict[str, Any] = {}  # address -> JobSubmissionClient (each costs a round trip)


@dataclass
class RayRequest:
    """Exactly what ``JobSubmissionClient.submit_job`` receives, and the trials it runs."""

    address: str
    submission_id: str
    entrypoint: str
    trials: list[Path]
    trials_file: Path  # written at submission: the driver reads the trials from it
    cpus: float
    gpus: float
    runtime_env: dict[str, Any] = field(default_factory=dict)
    metadata: dict[str, str] = field(default_factory=dict)

    def payload(self) -> dict[str, Any]:
        return {
            "submission_id": self.submission_id,
            "entrypoint": self.entrypoint,
            "runtime_env": self.runtime_env,
            "metadata": self.metadata,
            "entrypoint_num_cpus": 0,  # the driver only waits: it must not hold a trial's CPU
        }

    def __str__(self) -> str:
        head = f"# Ray job at {self.address}: {len(self.trials)} trial(s), each "
        head += f"{self.cpus:g} CPU(s) and {self.gpus:g} GPU(s); trials in {self.trials_file}"
        return head + "\n" + json.dumps(self.payload(), indent=2)


def jobs_address(address: str) -> str:
    """The Jobs API's URL from ``cluster.address`` (``host:port`` or a URL; ``ray://`` and
    the cluster's own port are not it)."""
    text = str(address).strip()
    if text.startswith("ray://") or text == "auto":
        raise ConfigError(
            f"cluster.address={text}: trainyard submits through the head's Jobs API",
            fix="cluster.address=http://<head>:8265 (the dashboard port), or RAY_ADDRESS",
        )
    return text if "://" in text else f"http://{text}"


def is_local(address: str) -> bool:
    return urlparse(address).hostname in _LOCAL_HOSTS


def trial_resources(job: Job) -> tuple[float, float]:
    """CPUs and GPUs one trial's task holds: its ranks all run on one node."""
    r = job.resources
    if r.nodes > 1:
        raise ConfigError(
            f"trainer.num_nodes={r.nodes}: a Ray trial runs its ranks on one node",
            fix="trainer.num_nodes=1 (trainer.devices ranks on one node), or cluster=slurm / "
            "cluster=k8s for trials spanning nodes",
        )
    return float(r.tasks_per_node * r.cpus_per_task), float(r.gpus_per_node)


def _submission_id(job: Job) -> str:
    digest = hashlib.sha1("\n".join(map(str, job.trials)).encode()).hexdigest()[:8]
    name = "".join(c if c.isalnum() else "-" for c in job.name.lower()).strip("-")[:30]
    return f"trainyard-{name or 'run'}{job.tag}-{digest}-{int(time.time() * 1000):x}"


class RayBackend(Backend):
    name = "ray"

    def render(self, job: Job) -> list[RayRequest]:
        cluster = job.cluster
        address = jobs_address(cluster.get("address") or "http://127.0.0.1:8265")
        python = cluster.get("python") or (sys.executable if is_local(address) else "python")
        cpus, gpus = trial_resources(job)
        sid = _submission_id(job)
        log_dir = job.log_dir or job.trials[0].parent
        trials_file = Path(log_dir) / f"{sid}.trials.json"
        argv = [python, "-m", "trainyard.backends.ray_driver", str(trials_file)]
        argv += ["--cpus", f"{cpus:g}", "--gpus", f"{gpus:g}"]
        argv += ["--max-retries", str(int(cluster.get("max_retries", 3)))]
        argv += ["--max-requeues", str(int(cluster.get("max_requeues_without_progress", 3)))]
        if cluster.get("max_concurrent"):
            argv += ["--max-concurrent", str(int(cluster["max_concurrent"]))]
        env = {str(k): str(v) for k, v in (cluster.get("env") or {}).items()}
        env.setdefault("PYTHONUNBUFFERED", "1")
        env.setdefault("RAY_DEDUP_LOGS", "0")  # every trial's lines in the job's logs
        env.setdefault("RAY_COLOR_PREFIX", "0")  # plain text for `trainyard logs`
        # how long a stopped job's driver has before Ray kills it (its supervisor reads the
        # job's environment): time for every trial to checkpoint; Ray's default is 3 s
        env.setdefault("RAY_JOB_STOP_WAIT_TIME_S", str(int(cluster.get("grace_period_s", 60))))
        metadata = {"trainyard.name": str(job.name), "trainyard.trials": str(len(job.trials))}
        return [
            RayRequest(
                address, sid, shlex.join(argv), list(job.trials), trials_file, cpus, gpus,
                {"env_vars": env}, metadata,
            )
        ]  # fmt: skip

    def check(self, request: RayRequest) -> None:
        """The head answers, and one of its nodes can hold a trial: Ray would otherwise
        keep an infeasible task pending forever."""
        from trainyard.backends.ray_driver import infeasible

        nodes = _nodes(request.address)
        totals = [n.get("resources_total") or {} for n in nodes]
        problem = infeasible(totals, request.cpus, request.gpus)
        if problem:
            raise ConfigError(
                f"the Ray cluster at {request.address} cannot hold a trial: {problem}",
                fix="ask for fewer (trainer.devices, cluster.cpus_per_task), or add nodes "
                "with more to the cluster",
            )

    def submit(self, request: RayRequest) -> str:
        payload = {"address": request.address, "trials": [str(t) for t in request.trials]}
        request.trials_file.parent.mkdir(parents=True, exist_ok=True)
        request.trials_file.write_text(json.dumps(payload, indent=1))
        try:
            sent = _client(request.address).submit_job(**request.payload())
            return job_id(sent, request.address)
        except (ConnectionError, RuntimeError) as exc:
            raise TrainyardError(
                f"the Ray head at {request.address} refused the job: {exc}",
                fix=_REACH,
            ) from None

    def status(self, job_id: str) -> dict[str, str]:
        submission, address = split_job_id(job_id)
        try:
            state = str(_client(address).get_job_status(submission))
        except RuntimeError as exc:
            if "does not exist" in str(exc):
                return {}
            raise TrainyardError(f"Ray job {job_id}: {exc}", fix=_REACH) from None
        except ConnectionError as exc:
            raise TrainyardError(f"the Ray head at {address}: {exc}", fix=_REACH) from None
        return {job_id: STATES.get(state.split(".")[-1], state)}

    def logs(self, job_id: str, log_dir: Path | None = None) -> str:
        try:
            submission, address = split_job_id(job_id)
            return _client(address).get_job_logs(submission)
        except (ConnectionError, RuntimeError) as exc:
            raise TrainyardError(f"the logs of Ray job {job_id}: {exc}", fix=_REACH) from None

    def cancel(self, job_id: str, wait_s: float = 90.0) -> None:
        """Stop the job: its driver asks the trials to checkpoint and stop (they resume
        when submitted again). Returns once the job has ended."""
        submission, address = split_job_id(job_id)
        try:
            _client(address).stop_job(submission)
        except (ConnectionError, RuntimeError) as exc:
            raise TrainyardError(f"stopping Ray job {job_id}: {exc}", fix=_REACH) from None
        deadline = time.monotonic() + wait_s
        while time.monotonic() < deadline:
            state = self.status(job_id).get(job_id, "CANCELLED")
            if state not in ("PENDING", "RUNNING"):
                return
            time.sleep(0.5)


_REACH = (
    "start a local head with `bash cluster/ray/ray.sh start` (from a checkout; else `ray "
    "start --head --node-ip-address=127.0.0.1 --dashboard-host=127.0.0.1`), or point "
    "cluster.address "
    "(or RAY_API_SERVER_ADDRESS) at the head's Jobs API, http://<head>:8265 (inside a Ray "
    "job, RAY_ADDRESS names the cluster's own port instead)"
)


def job_id(submission_id: str, address: str) -> str:
    """``<submission id>@<head>``: the id names its head, so status, logs and cancel need
    nothing else (as ``user@host``)."""
    parsed = urlparse(address)
    where = parsed.netloc + parsed.path.rstrip("/")
    return f"{submission_id}@{where}" if parsed.scheme == "http" else f"{submission_id}@{address}"


def split_job_id(text: str) -> tuple[str, str]:
    """The submission id and the Jobs API address of a :func:`job_id`."""
    submission, _, where = text.partition("@")
    if not where:
        raise ConfigError(f"{text!r} is not a Ray job of trainyard's (<submission id>@<head>)")
    return submission, where if "://" in where else f"http://{where}"


def auth_headers() -> dict[str, str]:
    """The cluster's auth token, for a head that requires one (Ray 2.60's token auth, on by
    default where ~/.ray/auth_token exists): Ray's own clients send it only when
    RAY_AUTH_MODE=token was set before ray was imported. A head without auth ignores it."""
    import os

    token = os.environ.get("RAY_AUTH_TOKEN", "").strip()
    path = Path(os.environ.get("RAY_AUTH_TOKEN_PATH") or Path.home() / ".ray" / "auth_token")
    if not token and path.is_file():
        token = path.read_text().strip()
    return {"Authorization": f"Bearer {token}"} if token else {}


def _client(address: str) -> Any:
    if address not in _clients:
        from ray.job_submission import JobSubmissionClient

        try:
            _clients[address] = JobSubmissionClient(address, headers=auth_headers())
        except (ConnectionError, RuntimeError) as exc:
            raise NoCluster(f"no Ray head answers at {address} ({exc})", fix=_REACH) from None
    return _clients[address]


def _nodes(address: str) -> list[dict[str, Any]]:
    """The head's live nodes with their total resources (the state API, as ``ray list
    nodes`` reads it)."""
    import requests

    _client(address)  # NoCluster, with the fix, when nothing answers
    try:
        response = requests.get(f"{address}/api/v0/nodes", headers=auth_headers(), timeout=10)
        response.raise_for_status()
        nodes = response.json()["data"]["result"]["result"]
    except Exception as exc:  # requests' and the payload's errors are worth the same words
        raise NoCluster(f"the Ray head at {address} did not list its nodes: {exc}") from None
    return [n for n in nodes if n.get("state") == "ALIVE"]
