"""Kubernetes: an Indexed Job (or a JobSet) per trial, sent with the official client.

``render`` builds each trial's ConfigMap, headless Service and Job from ``k8s/``
(:mod:`trainyard.backends.k8s_manifests`) and validates them against the schemas of
``cluster.kubernetes_version``: the dry run prints exactly what would be created. Every
object carries the labels ``trainyard.dev/submission`` (one ``trainyard submit``) and
``trainyard.dev/index`` (the trial's place in it), so one list call answers ``status``
for a whole sweep, and ``<submission>_<index>`` names one trial, as a Slurm array task does.

Job ids are ``<namespace>/<submission>``. With ``cluster.local_pods=true`` no API server is
involved: :mod:`trainyard.backends.k8s_local` runs the rendered pods as processes on this
machine (development, CI, the Hydra launcher's own tests), and the id is ``local:<file>``.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from trainyard.backends import k8s_manifests as manifests
from trainyard.backends.base import Backend, Job
from trainyard.errors import ConfigError, TrainyardError

LOCAL = "local:"


class KubernetesError(TrainyardError):
    """The API server refused the request, or could not be reached."""

    exit_code = 2


class PartialSubmission(KubernetesError):
    """Some trials of a request went out before the API server refused one."""

    def __init__(self, job_id: str, sent: list[Path], cause: TrainyardError):
        self.job_id, self.sent, self.cause = job_id, sent, cause
        super().__init__(cause.message, cause.fix)


@dataclass
class KubernetesRequest:
    """The manifests of every trial of one job, as the API server will receive them."""

    submission: str
    namespace: str
    trials: list[Path]
    objects: list[list[dict[str, Any]]]  # per trial: ConfigMap, Service, Job (or JobSet)
    log_dir: Path
    local: bool = False
    checks: dict[str, Any] = field(default_factory=dict)

    def __str__(self) -> str:
        docs = [obj for trial in self.objects for obj in trial]
        where = "run here as processes" if self.local else f"namespace {self.namespace}"
        head = f"# {len(self.trials)} trial(s), submission {self.submission}, {where}\n"
        return head + yaml.dump_all(docs, Dumper=_Dumper, sort_keys=False, width=100)


def _literal(dumper: Any, text: str) -> Any:
    style = "|" if "\n" in text else None  # the frozen config reads as the file it is
    return dumper.represent_scalar("tag:yaml.org,2002:str", text, style=style)


class _Dumper(getattr(yaml, "CSafeDumper", yaml.SafeDumper)):  # libyaml's emitter: 10x faster
    pass


_Dumper.add_representer(str, _literal)


class KubernetesBackend(Backend):
    name = "k8s"

    def __init__(self, api_client: Any = None) -> None:
        self._client = api_client  # tests and in-process users may pass their own
        self._checked: set[tuple[str, str]] = set()

    def render(self, job: Job) -> list[KubernetesRequest]:
        from trainyard.backends.k8s_schema import validate
        from trainyard.freeze import frozen_yaml

        cluster, r = job.cluster, job.resources
        local = bool(cluster.get("local_pods"))
        if local:
            _check_here(cluster, r)
        image = _image(cluster)
        version = _version(cluster.get("kubernetes_version"))
        namespace = cluster.get("namespace") or _default_namespace(local)
        cluster = {**cluster, "namespace": namespace}
        submission = f"{manifests.slug(job.name)}-{uuid.uuid4().hex[:8]}"
        objects, validated = [], set()
        for index, trial in enumerate(job.trials):
            data = job.config(trial)
            output_dir = str(data["paths"]["output_dir"])
            name = manifests.job_name(trial, job.name, output_dir)
            text = frozen_yaml(manifests.pod_config(data, cluster.get("root_dir")))
            labels = {manifests.LABEL_SUBMISSION: submission, manifests.LABEL_INDEX: str(index)}
            where = _relative(trial, output_dir)
            docs = manifests.render_trial(cluster, r, image, name, text, labels, where)
            for doc in docs:
                shape = _shape(doc, (name, where), text, index)
                if shape not in validated:  # trials of a sweep differ in names and configs
                    validate(doc, version)
                    validated.add(shape)
            objects.append(docs)
        log_dir = Path(job.log_dir or job.trials[0].parent)
        return [KubernetesRequest(submission, str(namespace), job.trials, objects, log_dir, local)]

    def check(self, request: KubernetesRequest) -> None:
        """Once per namespace and claim: the claim exists, and the API server accepts the
        first trial's objects in a server-side dry run (admission, quotas, RBAC)."""
        if request.local:
            return
        job = request.objects[0][-1]
        claim = _claim(job)
        if (request.namespace, claim) in self._checked:
            return
        from trainyard.backends import k8s_api

        api = k8s_api.Api(self._api_client())
        api.require_claim(request.namespace, claim)
        for obj in request.objects[0]:
            try:
                api.create(obj, dry_run=True)
            except KubernetesError as exc:
                if getattr(exc, "status", None) != 409:  # 409: sent before (see create_trial)
                    raise
        self._checked.add((request.namespace, claim))

    def submit(self, request: KubernetesRequest) -> str:
        if request.local:
            return _submit_local(request)
        from trainyard.backends import k8s_api

        api = k8s_api.Api(self._api_client())
        job_id = f"{request.namespace}/{request.submission}"
        sent: list[Path] = []
        for trial, objects in zip(request.trials, request.objects, strict=True):
            try:
                api.create_trial(objects)
            except TrainyardError as exc:
                if not sent:
                    raise
                raise PartialSubmission(job_id, sent, exc) from None
            sent.append(trial)
        return job_id

    def status(self, job_id: str) -> dict[str, str]:
        if job_id.startswith(LOCAL):
            return _local_states(job_id)
        from trainyard.backends import k8s_api

        namespace, submission, index = _parse(job_id)
        states = k8s_api.Api(self._api_client()).states(namespace, submission)
        return {k: v for k, v in states.items() if index is None or k == job_id}

    def results(self, job_id: str) -> dict[int, dict[str, Any]]:
        """Trial index -> what pod 0 of its Job left in its termination message (the
        metric), for launchers that cannot read the claim the run directories are on."""
        if job_id.startswith(LOCAL):
            pods = _local_state(job_id).get("pods", {})
            return {p["trial"]: json.loads(p["message"]) for name, p in pods.items()
                    if name.endswith("-0") and p.get("message")}  # fmt: skip
        from trainyard.backends import k8s_api

        namespace, submission, _ = _parse(job_id)
        return k8s_api.Api(self._api_client()).results(namespace, submission)

    def logs(self, job_id: str, log_dir: Path | None = None) -> str:
        if job_id.startswith(LOCAL):
            return _local_logs(job_id)
        from trainyard.backends import k8s_api

        namespace, submission, index = _parse(job_id)
        return k8s_api.Api(self._api_client()).logs(namespace, submission, index)

    def cancel(self, job_id: str) -> None:
        if job_id.startswith(LOCAL):
            return _cancel_local(job_id)
        from trainyard.backends import k8s_api

        namespace, submission, index = _parse(job_id)
        k8s_api.Api(self._api_client()).delete(namespace, submission, index)

    def _api_client(self) -> Any:
        if self._client is None:
            from trainyard.backends import k8s_api

            self._client = k8s_api.client_from_config()
        return self._client


def _check_here(cluster: dict[str, Any], resources: Any) -> None:
    """The pods of cluster.local_pods run on this machine: its paths, its GPUs."""
    if cluster.get("root_dir"):
        raise ConfigError(
            f"cluster.local_pods=true runs the pods on this machine, where the claim is "
            f"this machine's paths.root_dir, not cluster.root_dir={cluster['root_dir']}",
            fix="cluster.root_dir=null (cluster=k8s_local sets both)",
        )
    from trainyard.backends.k8s_local import host_gpus

    wanted = resources.nodes * resources.gpus_per_node  # a Job's pods run all at once
    if wanted and len(here := host_gpus()) < wanted:
        raise ConfigError(
            f"cluster=k8s_local runs the pods on this machine, which has {len(here)} "
            f"GPU(s); {resources.nodes} pod(s) at once ask for {resources.gpus_per_node} each",
            fix="trainer.accelerator=cpu here, or cluster=k8s to send the Jobs to a cluster",
        )


def _relative(trial: Path, output_dir: str) -> str:
    try:
        return str(trial.relative_to(output_dir))
    except ValueError:
        return str(trial)


def _version(value: Any) -> str:
    """``cluster.kubernetes_version`` as a release trainyard's manifests target."""
    from trainyard.backends.k8s_schema import VERSIONS

    text = str(value or "1.30")
    if text not in VERSIONS:
        quoted = " (an unquoted 1.30 reads as the number 1.3)" if isinstance(value, float) else ""
        raise ConfigError(
            f"cluster.kubernetes_version={value!r}{quoted}: trainyard's Jobs need Kubernetes "
            f"{VERSIONS[0]} or newer (podFailurePolicy and podReplacementPolicy), and are "
            f"checked against {', '.join(VERSIONS)}",
            fix=f"cluster.kubernetes_version='\"{VERSIONS[-1]}\"' (quoted), the release of "
            "your cluster's API server",
        )
    return text


def _default_namespace(local: bool) -> str:
    """The kubeconfig context's namespace (kubectl's default), the pod's own in a cluster,
    else ``default``."""
    if local:
        return "default"
    in_cluster = Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace")
    try:
        from kubernetes import config

        _, active = config.list_kube_config_contexts()
        return str((active or {}).get("context", {}).get("namespace") or "default")
    except Exception:  # no kubeconfig (or a broken one): submit says so when it connects
        return in_cluster.read_text().strip() if in_cluster.exists() else "default"


def _shape(doc: dict[str, Any], names: tuple[str, str], text: str, index: int) -> str:
    """``doc`` less what differs from trial to trial as plain strings (its name and run
    directory, its index label, its frozen config), so that each distinct structure is
    validated once: strict validation costs about a millisecond per object, and a sweep's
    30,000 objects share a handful of structures. Any other difference (a setting, a
    count) is validated anew."""
    index_label = f'"{manifests.LABEL_INDEX}": "{index}"'
    shape = json.dumps(doc, sort_keys=True).replace(index_label, "<index>")
    shape = shape.replace(json.dumps(text)[1:-1], "<config>")
    for number, name in enumerate(names):
        shape = shape.replace(json.dumps(name)[1:-1], f"<name {number}>")
    return shape


def _parse(job_id: str) -> tuple[str, str, int | None]:
    """``<namespace>/<submission>[_<index>]`` -> its parts."""
    namespace, _, rest = job_id.partition("/")
    submission, _, index = rest.partition("_")
    return namespace, submission, int(index) if index else None


def _claim(job: dict[str, Any]) -> str:
    spec = job["spec"]
    if job["kind"] == "JobSet":
        spec = spec["replicatedJobs"][0]["template"]["spec"]
    volumes = spec["template"]["spec"]["volumes"]
    return next(v for v in volumes if v["name"] == "work")["persistentVolumeClaim"]["claimName"]


def _image(cluster: dict[str, Any]) -> str:
    """The image the pods run: a bare repository gets the submitting commit's tag."""
    from trainyard.image import ImageError, reference

    image = cluster.get("image")
    if not image:
        raise ConfigError(
            "cluster.image is not set: the pods need the project's image",
            fix="make image && make push REGISTRY=<registry>; then "
            "cluster.image=<registry>/trainyard (the commit's tag is added)",
        )
    if str(image).endswith(":latest"):
        raise ConfigError(
            f"cluster.image={image}: `latest` names whatever was pushed last, so a restarted "
            "pod may run other code than the trial started with",
            fix=f"cluster.image={str(image).rsplit(':', 1)[0]} (the commit's tag is added)",
        )
    try:
        return reference(str(image), str(cluster.get("variant") or "cuda"),
                         bool(cluster.get("allow_dirty")))  # fmt: skip
    except ImageError as exc:
        raise ConfigError(f"cluster.image: {exc}") from None


# --- pods run here (cluster.local_pods) -------------------------------------------------


def _submit_local(request: KubernetesRequest) -> str:
    """Write the request where the local runner reads it, and start the runner."""
    folder = request.log_dir / "k8s" / request.submission
    folder.mkdir(parents=True, exist_ok=True)
    spec = folder / "request.yaml"
    pairs = zip(request.trials, request.objects, strict=True)
    trials = [{"trial": str(t), "objects": o} for t, o in pairs]
    spec.write_text(yaml.safe_dump({"submission": request.submission, "trials": trials}))
    with open(folder / "runner.log", "ab") as log:
        subprocess.Popen(
            [sys.executable, "-m", "trainyard.backends.k8s_local", str(spec)],
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
    return f"{LOCAL}{spec}"


def _local_folder(job_id: str) -> Path:
    """``local:<folder>/request.yaml[_<index>]`` -> the folder."""
    return Path(job_id.removeprefix(LOCAL)).parent


def _local_state(job_id: str) -> dict[str, Any]:
    path = _local_folder(job_id) / "state.json"
    for _ in range(50):  # the runner writes it first thing after starting
        if path.exists():
            return json.loads(path.read_text())
        time.sleep(0.1)
    return {}


def _local_states(job_id: str) -> dict[str, str]:
    state = _local_state(job_id)
    runner_alive = _alive(state.get("pid"))
    states = {}
    for index, trial_state in enumerate(state.get("trials", [])):
        if trial_state in ("PENDING", "RUNNING") and not runner_alive:
            trial_state = "FAILED"  # the runner died with it
        states[f"{job_id}_{index}"] = trial_state
    return states


def _alive(pid: Any) -> bool:
    if not pid:
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    return True


def _local_logs(job_id: str) -> str:
    folder = _local_folder(job_id)
    parts = []
    for log in sorted(folder.glob("*.log")):
        parts.append(f"==> {log.name} <==\n{log.read_text()}")
    return "".join(parts)


def _cancel_local(job_id: str, wait_s: float = 180.0) -> None:
    """SIGTERM to the runner, which passes it to the pods (as deleting a Job does); returns
    once they stopped."""
    pid = _local_state(job_id).get("pid")
    if _alive(pid):
        os.kill(int(pid), signal.SIGTERM)
    deadline = time.monotonic() + wait_s
    while _alive(pid) and time.monotonic() < deadline:
        time.sleep(0.1)
