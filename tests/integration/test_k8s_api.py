"""``trainyard submit | status | logs | cancel`` with ``cluster=k8s`` against a recorded API
server on 127.0.0.1 (tests/helpers/k8s_api.py): the official client, its HTTP and a
kubeconfig, as users run them. Each request body is checked against the manifests the dry
run renders; refusals (403, an unreachable server, a missing claim, a refusal half way
through a sweep) end with a message naming the fix and a record of what went out."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import yaml

from tests.conftest import cli
from tests.helpers.k8s_api import RecordedApi
from trainyard.backends.k8s_manifests import LABEL_INDEX, LABEL_SUBMISSION

pytestmark = pytest.mark.slow

IMAGE = "registry.example/trainyard:0123abc"
SWEEP = ["cluster=k8s", f"cluster.image={IMAGE}", "optimizer.lr=0.01,0.02,0.03"]
CORE, BATCH = "api/v1", "apis/batch/v1"


@pytest.fixture
def api(tmp_path):
    with RecordedApi() as server:
        server.put(CORE, "default", "persistentvolumeclaims",
                   {"metadata": {"name": "trainyard-work"}, "spec": {}})  # fmt: skip
        server.kubeconfig(tmp_path / "kubeconfig")
        yield server


def _cli(root: Path, *args: str, kubeconfig: Path | None = None) -> subprocess.CompletedProcess:
    return cli(root, *args, env={"KUBECONFIG": str(kubeconfig or root / "kubeconfig")})


def _without_submission(doc: dict) -> dict:
    """A manifest less the label that differs between two submissions, and what the
    submission adds to it: the Job created suspended, its ConfigMap and Service owned by it."""
    doc = json.loads(json.dumps(doc))
    for meta in _metas(doc):
        meta.get("labels", {}).pop(LABEL_SUBMISSION, None)
    doc.pop("status", None)
    doc["metadata"].pop("ownerReferences", None)
    doc["spec"].pop("suspend", None) if "spec" in doc else None
    return doc


def _metas(doc: dict) -> list[dict]:
    metas = [doc["metadata"]]
    if doc["kind"] == "Job":
        metas.append(doc["spec"]["template"]["metadata"])
    return metas


def test_submit_sends_exactly_what_the_dry_run_renders(tmp_path, api):
    dry = _cli(tmp_path, "submit", "--dry-run", *SWEEP)
    assert dry.returncode == 0, dry.stderr
    rendered = [d for d in yaml.safe_load_all(dry.stdout) if d]
    # the dry run asked the server: the claim exists, it would admit the first trial
    assert [r["plural"] for r in api.requests if r["dry_run"]] == ["configmaps", "services",
                                                                   "jobs"]  # fmt: skip
    assert api.created() == [] and not (tmp_path / "outputs").exists()

    out = _cli(tmp_path, "submit", *SWEEP)
    assert out.returncode == 0, out.stderr
    sent = api.created()
    # each trial: its Job suspended, then the ConfigMap and Service it owns, then started
    assert [d["kind"] for d in sent] == ["Job", "ConfigMap", "Service"] * 3
    key = lambda d: (d["metadata"]["name"], d["kind"])  # noqa: E731
    assert sorted(map(_without_submission, sent), key=key) == sorted(
        map(_without_submission, rendered), key=key
    )
    jobs = api.stored(BATCH, "default", "jobs")
    for job, config_map, service in zip(sent[::3], sent[1::3], sent[2::3], strict=True):
        assert job["spec"]["suspend"] is True
        stored = jobs[job["metadata"]["name"]]
        assert stored["spec"]["suspend"] is False  # started once its ConfigMap existed
        for owned in (config_map, service):
            [owner] = owned["metadata"]["ownerReferences"]
            assert owner["uid"] == stored["metadata"]["uid"] and owner["kind"] == "Job"
            assert owner["blockOwnerDeletion"] is True
    patches = [r for r in api.requests if r["method"] == "PATCH"]
    assert len(patches) == 3 and all(r["body"] == {"spec": {"suspend": False}} for r in patches)
    assert {r["content_type"] for r in patches} == {"application/strategic-merge-patch+json"}
    assert {r["auth"] for r in api.requests} == {"Bearer test-token"}  # the kubeconfig's user
    submissions = {d["metadata"]["labels"][LABEL_SUBMISSION] for d in sent}
    assert len(submissions) == 1
    assert [d["metadata"]["labels"][LABEL_INDEX] for d in api.created("jobs")] == ["0", "1", "2"]
    record = json.loads(next((tmp_path / "outputs").rglob("submission.json")).read_text())
    assert record[0]["job_id"] == f"default/{submissions.pop()}"
    assert len(record[0]["trials"]) == 3


def _submit(tmp_path: Path) -> tuple[list[Path], dict]:
    out = _cli(tmp_path, "submit", *SWEEP)
    assert out.returncode == 0, out.stderr
    file = next((tmp_path / "outputs").rglob("submission.json"))
    record = json.loads(file.read_text())[0]
    return [Path(t) for t in record["trials"]], record


def test_status_logs_and_cancel_follow_the_jobs(tmp_path, api):
    trials, record = _submit(tmp_path)
    jobs = api.stored(BATCH, "default", "jobs")
    by_index = {j["metadata"]["labels"][LABEL_INDEX]: j for j in jobs.values()}
    # what the Job controller would report
    by_index["0"]["status"] = {"conditions": [{"type": "Complete", "status": "True"}]}
    by_index["1"]["status"] = {"active": 2, "ready": 2}
    by_index["2"]["status"] = {"conditions": [{"type": "Failed", "status": "True"}]}
    rows = json.loads(_cli(tmp_path, "status", "--json").stdout)
    states = {Path(r["run"]): r["scheduler"] for r in rows}
    assert [states[t] for t in trials] == ["COMPLETED", "RUNNING", "FAILED"]
    # logs: each pod of the trial, from the API
    name = by_index["1"]["metadata"]["name"]
    for node in (0, 1):
        labels = dict(by_index["1"]["spec"]["template"]["metadata"]["labels"])
        api.put(CORE, "default", "pods", {"metadata": {"name": f"{name}-{node}", "labels": labels},
                                          "spec": {"containers": []}})  # fmt: skip
        api.logs[f"{name}-{node}"] = f"hello from node {node}\n"
    api.put(
        CORE,
        "default",
        "pods",
        {
            "metadata": {"name": f"{name}-2", "labels": labels},
            "spec": {"containers": []},
            "status": {"phase": "Pending"},
        },
    )
    logs = _cli(tmp_path, "logs", str(trials[1]))
    assert logs.returncode == 0, logs.stderr
    assert "hello from node 0" in logs.stdout and "hello from node 1" in logs.stdout
    assert "(no log: the pod is Pending" in logs.stdout  # a pod still starting
    # cancel one trial: only its objects go
    out = _cli(tmp_path, "cancel", str(trials[1]))
    assert out.returncode == 0, out.stderr
    jobs = api.stored(BATCH, "default", "jobs").values()
    left = {j["metadata"]["labels"][LABEL_INDEX] for j in jobs}
    assert left == {"0", "2"}
    deleted = [r for r in api.requests if r["method"] == "DELETE"]
    assert {r["plural"] for r in deleted} >= {"jobs", "services", "configmaps"}
    selector = f"{LABEL_SUBMISSION}={record['job_id'].split('/')[1]},{LABEL_INDEX}=1"
    assert all(r["query"]["labelSelector"] == selector for r in deleted)
    jobs_delete = next(r for r in deleted if r["plural"] == "jobs")
    assert jobs_delete["query"]["propagationPolicy"] == "Foreground"  # pods get SIGTERM


def test_a_forbidden_request_sends_nothing_and_names_the_rbac_fix(tmp_path, api):
    api.refuse = lambda method, plural, body, dry: (403, "Forbidden") if plural == "jobs" else None
    out = _cli(tmp_path, "submit", *SWEEP)
    assert out.returncode == 2
    assert "403 Forbidden" in out.stderr and "kubectl auth can-i create jobs" in out.stderr
    assert "Traceback" not in out.stderr
    assert api.created() == [] and not list(tmp_path.rglob("submission.json"))


def test_a_refusal_half_way_says_which_trials_went_out(tmp_path, api):
    created = []

    def quota(method, plural, body, dry_run):
        if plural == "jobs" and method == "POST" and not dry_run:
            created.append(body)
            if len(created) == 3:  # the namespace's quota is used up
                return 403, "Forbidden"
        return None

    api.refuse = quota
    out = _cli(tmp_path, "submit", *SWEEP)
    assert out.returncode == 2
    assert "2 trial(s) went out" in out.stderr and "only the trials that did not go out" in (
        out.stderr
    )
    record = json.loads(next((tmp_path / "outputs").rglob("submission.json")).read_text())
    assert len(record) == 1 and len(record[0]["trials"]) == 2
    # the two that went out are running; submitting again sends only the third
    for job in api.stored(BATCH, "default", "jobs").values():
        job["status"] = {"active": 1, "ready": 1}
    api.refuse = None
    again = _cli(tmp_path, "submit", *SWEEP)
    assert again.returncode == 0, again.stderr
    assert again.stdout.count("is already queued") == 2
    assert len(api.stored(BATCH, "default", "jobs")) == 3


def test_an_unreachable_server_is_named(tmp_path):
    with RecordedApi() as server:
        kubeconfig = server.kubeconfig(tmp_path / "kubeconfig")
    out = _cli(tmp_path, "submit", *SWEEP, kubeconfig=kubeconfig)  # nothing listens there now
    assert out.returncode == 2
    assert "cannot reach the Kubernetes API server at http://127.0.0.1:" in out.stderr
    assert "kubectl cluster-info" in out.stderr and "Traceback" not in out.stderr
    # the dry run still shows the manifests, saying they were not checked
    dry = _cli(tmp_path, "submit", "--dry-run", *SWEEP, kubeconfig=kubeconfig)
    assert dry.returncode == 0, dry.stderr
    assert "not checked with the cluster: " in dry.stdout and dry.stdout.count("\nkind: Job\n") == 3


def test_the_namespace_is_the_kubeconfig_contexts_unless_set(tmp_path, api):
    api.kubeconfig(tmp_path / "kubeconfig", namespace="ml")
    for namespace in ("ml", "team-a"):
        api.put(CORE, namespace, "persistentvolumeclaims",
                {"metadata": {"name": "trainyard-work"}, "spec": {}})  # fmt: skip
    dry = _cli(tmp_path, "submit", "--dry-run", *SWEEP[:2])
    assert dry.returncode == 0, dry.stderr
    assert {d["metadata"]["namespace"] for d in yaml.safe_load_all(dry.stdout) if d} == {"ml"}
    dry = _cli(tmp_path, "submit", "--dry-run", *SWEEP[:2], "cluster.namespace=team-a")
    assert {d["metadata"]["namespace"] for d in yaml.safe_load_all(dry.stdout) if d} == {"team-a"}


def test_a_missing_claim_is_named_before_anything_is_sent(tmp_path, api):
    api.objects.clear()
    out = _cli(tmp_path, "submit", *SWEEP)
    assert out.returncode == 2
    assert "claim trainyard-work does not exist" in out.stderr
    assert "kubectl apply -n default -k k8s/volume" in out.stderr
    assert api.created() == []


def test_no_credentials_stop_a_submission_but_not_a_dry_run(tmp_path):
    missing = tmp_path / "no-kubeconfig"
    out = _cli(tmp_path, "submit", *SWEEP, kubeconfig=missing)
    assert out.returncode == 2 and "no Kubernetes credentials" in out.stderr
    dry = _cli(tmp_path, "submit", "--dry-run", *SWEEP, kubeconfig=missing)
    assert dry.returncode == 0 and dry.stdout.count("\nkind: Job\n") == 3


def test_a_sweep_returns_the_metrics_the_pods_report(tmp_path, api):
    """``trainyard-train -m cluster=k8s``: the run directories are on the cluster's claim,
    which this machine does not see; the launcher waits for the Jobs and hands the sweeper
    the metric pod 0 of each Job left in its termination message."""
    from tests.conftest import train_cli

    def controller(plural, job):
        """What the Job controller and the kubelet would report once the pods finished."""
        if plural != "jobs":
            return
        index = int(job["metadata"]["labels"][LABEL_INDEX])
        job["status"] = {"conditions": [{"type": "Complete", "status": "True"}]}
        labels = {**job["spec"]["template"]["metadata"]["labels"],
                  "batch.kubernetes.io/job-completion-index": "0"}  # fmt: skip
        message = json.dumps({"state": "completed", "value": 0.5 + index, "monitor": "val/acc"})
        terminated = {"exitCode": 0, "message": message}
        api.put(CORE, "default", "pods", {
            "metadata": {"name": f"{job['metadata']['name']}-0", "labels": labels},
            "spec": {"containers": [{"name": "trainer"}]},
            "status": {"containerStatuses": [{
                "name": "trainer", "ready": False, "restartCount": 0, "image": IMAGE,
                "imageID": "", "state": {"terminated": terminated}}]},
        })  # fmt: skip

    api.on_create = controller
    env = {"KUBECONFIG": str(tmp_path / "kubeconfig")}
    out = train_cli(["-m", "cluster=k8s", f"cluster.image={IMAGE}", "optimizer.lr=0.01,0.02",
                     "hydra.launcher.poll_s=0.2"], tmp_path, env=env, timeout=120)  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]  # a trial without a metric would fail it
    assert "2 trial(s) done" in out.stdout + out.stderr
    assert len(api.created("jobs")) == 2


def test_a_resubmission_touches_nothing_of_a_trial_still_running(tmp_path, api):
    """Another checkout (another root) submits a trial whose Job still runs: refused, and
    its ConfigMap, Service and Job stay as they were."""
    first = tmp_path / "a"
    first.mkdir()
    api.kubeconfig(first / "kubeconfig")
    assert _cli(first, "submit", *SWEEP[:2]).returncode == 0
    for job in api.stored(BATCH, "default", "jobs").values():
        job["status"] = {"active": 1, "ready": 1}
    snapshot = lambda: json.dumps(sorted((list(k), v) for k, v in api.objects.items()))  # noqa: E731
    before = snapshot()
    requests = len(api.requests)
    second = tmp_path / "b"
    second.mkdir()
    api.kubeconfig(second / "kubeconfig")
    out = _cli(second, "submit", *SWEEP[:2], "cluster.max_requeues_without_progress=9")
    assert out.returncode == 2 and "already exists and is running" in out.stderr
    assert "nothing was changed" in out.stderr
    assert snapshot() == before
    changes = [r for r in api.requests[requests:] if r["method"] != "GET" and not r["dry_run"]]
    assert changes == []


def test_a_finished_trial_sent_again_replaces_its_job(tmp_path, api):
    assert _cli(tmp_path, "submit", *SWEEP[:2]).returncode == 0
    [job] = api.stored(BATCH, "default", "jobs").values()
    job["status"] = {"conditions": [{"type": "Failed", "status": "True"}]}
    old_uid = job["metadata"]["uid"]
    (next((tmp_path / "outputs").rglob("submission.json"))).unlink()  # another machine
    out = _cli(tmp_path, "submit", *SWEEP[:2])
    assert out.returncode == 0, out.stderr
    [job] = api.stored(BATCH, "default", "jobs").values()
    assert job["metadata"]["uid"] != old_uid and job["spec"]["suspend"] is False
    deletes = [r for r in api.requests if r["method"] == "DELETE"]
    assert deletes[0]["plural"] == "jobs" and deletes[0]["body"]["propagationPolicy"] == (
        "Foreground"
    )


def test_the_sweep_driver_survives_a_blip_and_ends_when_its_jobs_are_gone(tmp_path, api):
    """One 503 while the driver polls is retried; Jobs deleted under it (trainyard cancel,
    kubectl delete, ttl) end the wait instead of hanging it: their trials are failed."""
    from tests.conftest import train_cli

    polls = []

    def blip_then_delete(method, plural, body, dry_run):
        if method == "GET" and plural == "jobs" and api.requests[-1]["name"] is None:  # a list
            polls.append(1)
            if len(polls) == 1:
                return 503, "ServiceUnavailable"
            if len(polls) == 3:  # someone deletes the Jobs while the driver waits
                api.stored(BATCH, "default", "jobs").clear()
        return None

    api.refuse = blip_then_delete
    env = {"KUBECONFIG": str(tmp_path / "kubeconfig")}
    out = train_cli(["-m", "cluster=k8s", f"cluster.image={IMAGE}", "optimizer.lr=0.01,0.02",
                     "hydra.launcher.poll_s=0.2", "hydra.launcher.forget_after_s=2"],
                    tmp_path, env=env, timeout=120)  # fmt: skip
    assert "503" in out.stdout + out.stderr and "Traceback" not in out.stderr  # logged, retried
    assert out.returncode == 3, out.stderr[-2000:]
    assert "2 trial(s) of the sweep failed" in out.stderr
