"""The calls trainyard makes to a Kubernetes API server, through the official client.

Authentication is the client's: the kubeconfig's current context (``KUBECONFIG`` picks the
file), else the pod's service account when trainyard itself runs in a cluster. Every
failure becomes a :class:`~trainyard.backends.kubernetes.KubernetesError` that says what
was refused and how to fix it: no credentials, 401, 403 (with the RBAC rule to ask for),
a missing namespace or claim, an object the server finds invalid, a server that cannot be
reached.
"""

from __future__ import annotations

import copy
import json
import time
from typing import Any

from trainyard.backends import k8s_manifests as manifests
from trainyard.backends.base import NoCluster
from trainyard.backends.kubernetes import KubernetesError

_JOBSET = ("jobset.x-k8s.io", "v1alpha2", "jobsets")
_RBAC = (
    "a Role in the namespace allowing create, get, list, patch, delete and deletecollection "
    "on jobs (batch), services, configmaps and jobsets (jobset.x-k8s.io), and get and list "
    "on pods, pods/log and persistentvolumeclaims"
)


def client_from_config() -> Any:
    """An ApiClient for the kubeconfig's current context, or the in-cluster account."""
    from kubernetes import client, config

    configuration = client.Configuration()
    try:
        config.load_kube_config(client_configuration=configuration)
    except (config.ConfigException, FileNotFoundError, TypeError):
        try:
            config.load_incluster_config(client_configuration=configuration)
        except config.ConfigException:
            raise NoCluster(
                "no Kubernetes credentials: no kubeconfig (~/.kube/config or $KUBECONFIG) "
                "and not running in a pod",
                fix="KUBECONFIG=<your kubeconfig> (kubectl get pods should work), or "
                "cluster=k8s_local to run the pods on this machine",
            ) from None
    return client.ApiClient(configuration)


class Unreachable(KubernetesError, NoCluster):
    """No answer from the API server: a submission stops, a dry run renders all the same."""


class Api:
    def __init__(self, api_client: Any) -> None:
        from kubernetes import client

        self.client = api_client
        self.core = client.CoreV1Api(api_client)
        self.batch = client.BatchV1Api(api_client)
        self.custom = client.CustomObjectsApi(api_client)

    # --- creating ---------------------------------------------------------------------

    def create(self, obj: dict[str, Any], dry_run: bool = False) -> dict[str, Any]:
        """Create ``obj`` (``dry_run``: ask the server whether it would); the server's copy."""
        kind, namespace = obj["kind"], obj["metadata"]["namespace"]
        extra = {"dry_run": "All"} if dry_run else {}
        what = f"{'checking' if dry_run else 'creating'} {kind} {namespace}/{_name(obj)}"
        if kind == "ConfigMap":
            made = self._call(what, self.core.create_namespaced_config_map, namespace, obj, **extra)
        elif kind == "Service":
            made = self._call(what, self.core.create_namespaced_service, namespace, obj, **extra)
        elif kind == "Job":
            made = self._call(what, self.batch.create_namespaced_job, namespace, obj, **extra)
        elif kind == "JobSet":
            create = self.custom.create_namespaced_custom_object
            made = self._call(what, create, *_JOBSET[:2], namespace, _JOBSET[2], obj, **extra)
        else:
            raise ValueError(f"trainyard does not create {kind}")
        return made if isinstance(made, dict) else self.client.sanitize_for_serialization(made)

    def create_trial(self, objects: list[dict[str, Any]]) -> None:
        """Create a trial's objects: its Job (or JobSet) first and suspended, then the
        ConfigMap and Service it owns (``ownerReferences``: deleting the Job deletes them,
        so they never outlive it), then the Job is resumed and its pods start.

        A trial sent before: while its Job runs, nothing is touched (the trial is still
        training) and the submission is refused; a finished one is deleted first, with
        what it owns. A failure half way deletes what this call created."""
        top, parts = objects[-1], objects[:-1]
        kind, namespace, name = top["kind"], top["metadata"]["namespace"], _name(top)
        existing = self._find(kind, namespace, name)
        if existing is not None:
            state = self._state(existing)
            if state not in ("COMPLETED", "FAILED"):
                raise KubernetesError(
                    f"{kind} {namespace}/{name} already exists and is {state.lower()}: this "
                    "trial is being trained by an earlier submission (nothing was changed)",
                    fix=f"wait for it, or trainyard cancel <its run directory> (or kubectl "
                    f"delete {kind.lower()} -n {namespace} {name})",
                )
            self._delete_one(kind, namespace, name)
        created = self.create(_suspended(top))
        owner = {"apiVersion": top["apiVersion"], "kind": kind, "name": name,
                 "uid": created["metadata"]["uid"], "controller": True,
                 "blockOwnerDeletion": True}  # fmt: skip
        try:
            for part in parts:
                owned = copy.deepcopy(part)
                owned["metadata"]["ownerReferences"] = [owner]
                self._create_replacing(owned)
            self._resume(kind, namespace, name)
        except KubernetesError:
            self._delete_one(kind, namespace, name)
            raise

    def _create_replacing(self, obj: dict[str, Any]) -> None:
        """Create ``obj``; one of its name left behind (by a Job deleted without its
        dependents) is deleted first."""
        try:
            self.create(obj)
        except KubernetesError as exc:
            if getattr(exc, "status", None) != 409:
                raise
            self._delete_one(obj["kind"], obj["metadata"]["namespace"], _name(obj))
            self.create(obj)

    def _resume(self, kind: str, namespace: str, name: str) -> None:
        body = {"spec": {"suspend": False}}
        if kind == "Job":
            patch = self.batch.patch_namespaced_job
            self._call(f"starting Job {name}", patch, name, namespace, body)
        else:
            patch = self.custom.patch_namespaced_custom_object
            self._call(f"starting JobSet {name}", patch, *_JOBSET[:2], namespace, _JOBSET[2],
                       name, body)  # fmt: skip

    def _find(self, kind: str, namespace: str, name: str) -> dict[str, Any] | None:
        try:
            return self._read(kind, namespace, name)
        except KubernetesError as exc:
            if getattr(exc, "status", None) == 404:
                return None
            raise

    def _read(self, kind: str, namespace: str, name: str) -> dict[str, Any]:
        what = f"reading {kind} {namespace}/{name}"
        if kind == "Job":
            job = self._call(what, self.batch.read_namespaced_job, name, namespace)
            return self.client.sanitize_for_serialization(job)
        if kind == "ConfigMap":
            return self._call(what, self.core.read_namespaced_config_map, name, namespace)
        if kind == "Service":
            return self._call(what, self.core.read_namespaced_service, name, namespace)
        get = self.custom.get_namespaced_custom_object
        return self._call(what, get, *_JOBSET[:2], namespace, _JOBSET[2], name)

    def _delete_one(self, kind: str, namespace: str, name: str, wait_s: float = 120) -> None:
        """Delete one object and wait until it is gone (a new one of the same name waits for
        it); a Job's or JobSet's pods and dependents go first (foreground)."""
        from kubernetes import client

        body = client.V1DeleteOptions(propagation_policy="Foreground")
        what = f"deleting {kind} {namespace}/{name}"
        delete = {
            "Job": self.batch.delete_namespaced_job,
            "ConfigMap": self.core.delete_namespaced_config_map,
            "Service": self.core.delete_namespaced_service,
        }.get(kind)
        try:
            if delete is not None:
                self._call(what, delete, name, namespace, body=body)
            else:
                delete = self.custom.delete_namespaced_custom_object
                self._call(what, delete, *_JOBSET[:2], namespace, _JOBSET[2], name, body=body)
        except KubernetesError as exc:
            if getattr(exc, "status", None) != 404:
                raise
        deadline = time.monotonic() + wait_s
        while self._find(kind, namespace, name) is not None:
            if time.monotonic() > deadline:
                raise KubernetesError(
                    f"{kind} {namespace}/{name} is still being deleted after {wait_s:.0f} s",
                    fix=f"submit again once kubectl get -n {namespace} {kind.lower()} {name} "
                    "finds nothing",
                )
            time.sleep(1)

    def require_claim(self, namespace: str, claim: str) -> None:
        try:
            read = self.core.read_namespaced_persistent_volume_claim
            self._call(f"reading PersistentVolumeClaim {namespace}/{claim}", read, claim, namespace)
        except KubernetesError as exc:
            if getattr(exc, "status", None) != 404:
                raise
            raise KubernetesError(
                f"the claim {claim} does not exist in namespace {namespace}: the pods keep "
                "run directories and data on it",
                fix=f"kubectl apply -n {namespace} -k k8s/volume (ReadWriteMany), or "
                "cluster.claim=<an existing claim>",
            ) from None

    # --- reading and deleting what was submitted --------------------------------------

    def _selector(self, submission: str, index: int | None) -> str:
        selector = f"{manifests.LABEL_SUBMISSION}={submission}"
        return selector if index is None else f"{selector},{manifests.LABEL_INDEX}={index}"

    def states(self, namespace: str, submission: str) -> dict[str, str]:
        """``<namespace>/<submission>_<index>`` -> the state of that trial's Job."""
        selector = self._selector(submission, None)
        listed = self._call("listing Jobs", self.batch.list_namespaced_job, namespace,
                            label_selector=selector)  # fmt: skip
        found = self.client.sanitize_for_serialization(listed).get("items", [])
        found += self._jobsets(namespace, selector)
        states = {}
        for obj in found:
            labels = obj["metadata"].get("labels", {})
            if manifests.LABEL_INDEX in labels and "jobset.sigs.k8s.io/jobset-name" not in labels:
                states[f"{namespace}/{submission}_{labels[manifests.LABEL_INDEX]}"] = self._state(
                    obj
                )
        return states

    def _jobsets(self, namespace: str, selector: str) -> list[dict[str, Any]]:
        try:
            list_all = self.custom.list_namespaced_custom_object
            listed = self._call("listing JobSets", list_all, *_JOBSET[:2], namespace,
                                _JOBSET[2], label_selector=selector)  # fmt: skip
        except KubernetesError as exc:
            if getattr(exc, "status", None) == 404:  # no JobSet controller in this cluster
                return []
            raise
        return listed.get("items", [])

    @staticmethod
    def _state(obj: dict[str, Any]) -> str:
        status = obj.get("status") or {}
        true = {c["type"] for c in status.get("conditions") or [] if c.get("status") == "True"}
        if true & {"Complete", "Completed"}:
            return "COMPLETED"
        if "Failed" in true:
            return "FAILED"
        if "Suspended" in true:
            return "SUSPENDED"
        if obj["kind"] == "Job" and not status.get("ready") and not status.get("succeeded"):
            return "PENDING"
        return "RUNNING"

    def logs(self, namespace: str, submission: str, index: int | None) -> str:
        selector = self._selector(submission, index)
        pods = self._call("listing pods", self.core.list_namespaced_pod, namespace,
                          label_selector=selector).items  # fmt: skip
        pods.sort(key=lambda p: (p.metadata.labels.get(manifests.LABEL_INDEX, ""), p.metadata.name))
        parts = []
        for pod in pods:
            read = self.core.read_namespaced_pod_log
            name = pod.metadata.name
            try:
                text = self._call(f"reading the log of pod {name}", read, name, namespace,
                                  container=manifests.CONTAINER)  # fmt: skip
            except KubernetesError as exc:  # a pod still waiting to start has no log yet
                phase = pod.status.phase if pod.status else "unknown"
                text = f"(no log: the pod is {phase}; {exc.message.splitlines()[0]})\n"
            parts.append(f"==> pod {name} <==\n{text}")
        return "".join(parts)

    def results(self, namespace: str, submission: str) -> dict[int, dict[str, Any]]:
        """Trial index -> the termination message of pod 0 of its Job, parsed."""
        pods = self._call("listing pods", self.core.list_namespaced_pod, namespace,
                          label_selector=self._selector(submission, None)).items  # fmt: skip
        found = {}
        for pod in pods:
            labels = pod.metadata.labels or {}
            if labels.get("batch.kubernetes.io/job-completion-index") != "0":
                continue
            for status in (pod.status and pod.status.container_statuses) or []:
                done = status.state and status.state.terminated
                if status.name == manifests.CONTAINER and done and done.message:
                    try:
                        found[int(labels[manifests.LABEL_INDEX])] = json.loads(done.message)
                    except (ValueError, KeyError):
                        continue  # not trainyard's message (a crash's last lines)
        return found

    def delete(self, namespace: str, submission: str, index: int | None) -> None:
        """Delete the trials' Jobs (their pods get SIGTERM: they checkpoint and stop within
        the grace period), then their Services and ConfigMaps."""
        selector = self._selector(submission, index)
        foreground = {"label_selector": selector, "propagation_policy": "Foreground"}
        self._call("deleting Jobs", self.batch.delete_collection_namespaced_job, namespace,
                   **foreground)  # fmt: skip
        try:
            self._call("deleting JobSets", self.custom.delete_collection_namespaced_custom_object,
                       *_JOBSET[:2], namespace, _JOBSET[2], label_selector=selector)  # fmt: skip
        except KubernetesError as exc:
            if getattr(exc, "status", None) != 404:
                raise
        for kind in ("service", "config_map"):
            delete = getattr(self.core, f"delete_collection_namespaced_{kind}", None)
            if kind == "service" and delete is None:  # older clients: one by one
                continue
            self._call(f"deleting {kind}s", delete, namespace, label_selector=selector)

    # --- errors -------------------------------------------------------------------------

    def _call(self, what: str, function, *args, **kwargs) -> Any:
        from kubernetes.client.exceptions import ApiException
        from urllib3.exceptions import HTTPError

        try:
            return function(*args, **kwargs)
        except ApiException as exc:
            raise self._refused(what, exc) from None
        except (HTTPError, OSError) as exc:
            host = self.client.configuration.host
            raise Unreachable(
                f"{what}: cannot reach the Kubernetes API server at {host} ({type(exc).__name__})",
                fix="check that the cluster is up and your kubeconfig's current context "
                "points at it (kubectl cluster-info)",
            ) from None

    @staticmethod
    def _refused(what: str, exc: Any) -> KubernetesError:
        try:
            message = json.loads(exc.body or "{}").get("message") or exc.reason
        except (ValueError, AttributeError):
            message = exc.reason
        fixes = {
            401: "your credentials were not accepted: refresh them (kubectl get pods must work)",
            403: f"kubectl auth can-i create jobs -n <namespace>; ask your admin for {_RBAC}",
            404: "check the namespace (cluster.namespace) and that the kind is served",
            422: "the object is invalid for this server: check cluster.* and "
            "cluster.kubernetes_version",
        }
        error = KubernetesError(
            f"{what}: the API server answered {exc.status} {exc.reason}: {message}",
            fix=fixes.get(exc.status),
        )
        error.status = exc.status
        return error


def _name(obj: dict[str, Any]) -> str:
    return obj["metadata"]["name"]


def _suspended(top: dict[str, Any]) -> dict[str, Any]:
    """The Job (or JobSet) created suspended: no pod starts before its ConfigMap exists."""
    suspended = copy.deepcopy(top)
    suspended["spec"]["suspend"] = True
    return suspended
