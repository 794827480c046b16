"""A trial's Kubernetes manifests, rendered from the kustomizations in ``k8s/``.

Every trial becomes a ConfigMap (its frozen config), a headless Service and an Indexed Job
(or, with ``cluster.kind=JobSet``, a ConfigMap and a JobSet), built from ``k8s/base`` or
``k8s/overlays/gpu`` and patched with what is the trial's own: names, labels, the image,
the number of nodes, the GPUs and resources per pod, scheduling constraints, Secrets.
Settings a pod cannot be created with (names, quantities, label values) are refused here,
before anything is sent, with the setting to change.

Run directories: the pods see the claim at ``cluster.root_dir`` (``/work``), so the config
they get is the trial's frozen config with every path under this machine's
``paths.root_dir`` moved under ``cluster.root_dir`` (``cluster.root_dir=null``: the pods
see the same paths, as on a shared filesystem mounted alike).
"""

from __future__ import annotations

import copy
import functools
import hashlib
import re
from pathlib import Path
from typing import Any

from trainyard.errors import ConfigError

CONTAINER = "trainer"
CONFIG_MOUNT = "/etc/trainyard"
PORT = 29500
LABEL_JOB = "trainyard.dev/job"  # one trial: its pods, Service selector and anti-affinity
LABEL_SUBMISSION = "trainyard.dev/submission"  # what one `trainyard submit` sent
LABEL_INDEX = "trainyard.dev/trial-index"  # the trial's index in its submission
ANNOTATION_TRIAL = "trainyard.dev/trial"  # its run directory, under paths.output_dir
KINDS = ("Job", "JobSet")

_DNS_LABEL = re.compile(r"^[a-z]([-a-z0-9]{0,61}[a-z0-9])?$")
_DNS_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?$")
_LABEL_VALUE = re.compile(r"^(([A-Za-z0-9][-A-Za-z0-9_.]{0,61})?[A-Za-z0-9])?$")
_QUANTITY = re.compile(r"^[+]?([0-9]+(\.[0-9]*)?|\.[0-9]+)([eE][-+]?[0-9]+|[KMGTPE]i?|[mkMGTPE])?$")
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_.-]*$")
# environment variables that hold credentials belong in a Secret: names that say so, and
# values that carry a password (scheme://user:password@host)
_CREDENTIAL = re.compile(
    r"TOKEN|SECRET|PASSWORD|PASSWD|PASS$|KEY$|API_?KEY|ACCESS_?KEY|CREDENTIAL|AUTH", re.I
)
_URL_PASSWORD = re.compile(r"://[^/\s:@]+:[^/\s@]+@")
CONFIGMAP_MAX = 1_000_000  # bytes a ConfigMap may hold (etcd's 1 MiB, less its envelope)


def _k8s_dir() -> Path:
    """``k8s/`` beside the package (a symlink to the repository's in a checkout, real
    files in a wheel), as for ``conf/``."""
    return Path(__file__).resolve().parents[1] / "k8s"


@functools.cache
def base_resources(variant: str) -> tuple[dict[str, Any], ...]:
    """The rendered kustomization ``variant`` (``base``, ``overlays/gpu``, ``jobset``)."""
    from trainyard.kustomize import build

    return tuple(build(_k8s_dir() / variant))


def _named(resources, kind: str) -> dict[str, Any]:
    return copy.deepcopy(next(r for r in resources if r["kind"] == kind))


def refuse(key: str, value: Any, why: str, fix: str) -> ConfigError:
    return ConfigError(f"cluster.{key}={value!r}: {why}", fix=fix)


def dns_label(key: str, value: Any) -> str:
    text = str(value)
    if not _DNS_LABEL.match(text):
        raise refuse(key, text, "Kubernetes names are at most 63 lowercase letters, digits and "
                     "'-', starting with a letter", f"cluster.{key}=<such a name>")  # fmt: skip
    return text


def dns_subdomain(key: str, value: Any) -> str:
    text = str(value)
    if not _DNS_SUBDOMAIN.match(text) or len(text) > 253:
        raise refuse(key, text, "not a valid Kubernetes object name (lowercase letters, digits, "
                     "'-' and '.', at most 253)", f"cluster.{key}=<such a name>")  # fmt: skip
    return text


def quantity(key: str, value: Any) -> str:
    """A resource quantity as Kubernetes parses it, always as a string (the client refuses
    an unquoted number for ``nvidia.com/gpu``)."""
    text = str(value)
    if not _QUANTITY.match(text):
        raise refuse(key, value, "not a Kubernetes quantity",
                     f"cluster.{key}=<e.g. 4, 500m, 16Gi>")  # fmt: skip
    return text


def job_name(trial: Path, name: str, output_dir: str) -> str:
    """The trial's Kubernetes name: its experiment name and a hash of its run directory
    under the output directory, so a trial keeps its name whichever machine submits it
    (and a second submission of a running trial meets the first). Short enough for pod
    hostnames (``<job>-<index>``, ``<job>-node-0-<index>``) to stay within 63 characters."""
    try:
        identity = str(trial.relative_to(output_dir))
    except ValueError:
        identity = str(trial)
    digest = hashlib.sha256(identity.encode()).hexdigest()[:10]
    return f"{slug(name)}-{digest}"


def slug(name: str) -> str:
    """``name`` as the start of a Kubernetes name: at most 20 of [a-z0-9-], a letter first."""
    text = re.sub(r"[^a-z0-9-]+", "-", name.lower()).strip("-")[:20].strip("-")
    if not text or not text[0].isalpha():
        text = f"t{text}"[:20].strip("-")
    return text


def pod_config(data: dict[str, Any], root_dir: str | None) -> dict[str, Any]:
    """The frozen config as the pods see it: paths under ``paths.root_dir`` moved under
    ``root_dir`` (where the claim is mounted); unchanged when ``root_dir`` is null."""
    here = str(data.get("paths", {}).get("root_dir", "")).rstrip("/")
    if not root_dir or not here or root_dir.rstrip("/") == here:
        return data
    there = root_dir.rstrip("/")

    def move(value: Any) -> Any:
        if isinstance(value, dict):
            return {k: move(v) for k, v in value.items()}
        if isinstance(value, list):
            return [move(v) for v in value]
        if isinstance(value, str) and (value == here or value.startswith(here + "/")):
            return there + value[len(here) :]
        return value

    return move(data)


def variant(cluster: dict[str, Any], gpus: int) -> str:
    kind = cluster.get("kind") or "Job"
    if kind not in KINDS:
        raise refuse("kind", kind, "trainyard submits a Job or a JobSet", "cluster.kind=Job")
    if kind == "JobSet":
        return "jobset"
    return "overlays/gpu" if gpus else "base"


def render_trial(
    cluster: dict[str, Any],
    resources: Any,
    image: str,
    job: str,
    config_text: str,
    labels: dict[str, str],
    trial: str | None = None,
) -> list[dict[str, Any]]:
    """ConfigMap, Service and Job (or ConfigMap and JobSet) of one trial; ``trial``: its
    run directory, as an annotation that ``kubectl describe`` shows."""
    if resources.gpus_per_node and cluster.get("variant") == "cpu":
        raise refuse("variant", "cpu", f"the CPU image cannot use the {resources.gpus_per_node} "
                     "GPU(s) per pod the trainer asks for",
                     "cluster.variant=cuda, or trainer.accelerator=cpu")  # fmt: skip
    if len(config_text.encode()) > CONFIGMAP_MAX:
        raise ConfigError(
            f"the frozen config is {len(config_text.encode())} bytes: a ConfigMap holds at "
            "most 1 MiB",
            fix="keep large values (class lists, grids) in files under paths.data_dir",
        )
    namespace = dns_label("namespace", cluster.get("namespace") or "default")
    chosen = variant(cluster, resources.gpus_per_node)
    base = base_resources(chosen)
    all_labels = {**_user_labels(cluster), **labels, LABEL_JOB: job}
    config_map = _named(base, "ConfigMap")
    config_map["metadata"].update(name=f"{job}-config", namespace=namespace)
    config_map["metadata"].setdefault("labels", {}).update(all_labels)
    config_map["data"] = {"config.yaml": config_text}
    annotations = {ANNOTATION_TRIAL: trial} if trial else {}
    if chosen == "jobset":
        jobset = _named(base, "JobSet")
        _meta(jobset, job, namespace, all_labels, annotations)
        jobset["spec"]["failurePolicy"]["maxRestarts"] = int(cluster.get("backoff_limit", 3))
        spec = jobset["spec"]["replicatedJobs"][0]["template"]["spec"]
        if resources.gpus_per_node:  # the JobSet's pods as overlays/gpu makes the Job's
            from trainyard.kustomize import merge

            spec["template"] = merge(spec["template"], _gpu_patch()["spec"]["template"])
        _job_spec(spec, cluster, resources, image, job, all_labels, f"{job}-node-0-0.{job}")
        # a failed pod fails its Job at once and the JobSet restarts the whole group (at
        # most maxRestarts times): retries are counted once, by the JobSet
        spec["backoffLimit"] = 0
        return [config_map, jobset]
    service = _named(base, "Service")
    _meta(service, job, namespace, all_labels)
    service["spec"]["selector"] = {LABEL_JOB: job}
    batch = _named(base, "Job")
    _meta(batch, job, namespace, all_labels, annotations)
    _job_spec(batch["spec"], cluster, resources, image, job, all_labels, f"{job}-0.{job}")
    batch["spec"]["template"]["spec"]["subdomain"] = job
    return [config_map, service, batch]


def _meta(resource: dict, name: str, namespace: str, labels: dict[str, str],
          annotations: dict[str, str] | None = None) -> None:  # fmt: skip
    resource["metadata"].update(name=name, namespace=namespace)
    resource["metadata"].setdefault("labels", {}).update(labels)
    if annotations:
        resource["metadata"].setdefault("annotations", {}).update(annotations)


def _user_labels(cluster: dict[str, Any]) -> dict[str, str]:
    labels = {}
    for key, value in (cluster.get("labels") or {}).items():
        prefix, _, name = str(key).rpartition("/")
        if (
            (prefix and not _DNS_SUBDOMAIN.match(prefix))
            or not _LABEL_VALUE.match(name)
            or not (name and _LABEL_VALUE.match(str(value)))
        ):
            raise refuse(f"labels.{key}", value, "not a valid Kubernetes label",
                         "keys [prefix/]name and values of at most 63 letters, digits, '-', "
                         "'_', '.'")  # fmt: skip
        labels[str(key)] = str(value)
    return labels


def _job_spec(spec, cluster, resources, image, job, labels, master: str) -> None:
    """Patch a Job spec (the Job's, or the JobSet's replicated Job's) for one trial."""
    spec["completions"] = spec["parallelism"] = resources.nodes
    # one failure of a multi-node trial (a pod OOM-killed, a node lost) ends every pod of it
    # (their collectives fail): the limit counts such failures, not pods
    spec["backoffLimit"] = int(cluster.get("backoff_limit", 3)) * resources.nodes
    if cluster.get("ttl_s") is not None:
        spec["ttlSecondsAfterFinished"] = int(cluster["ttl_s"])
    pod = spec["template"]
    pod["metadata"].setdefault("labels", {}).update(labels)
    pod_spec = pod["spec"]
    pod_spec["terminationGracePeriodSeconds"] = int(cluster.get("grace_period_s", 120))
    _user(pod_spec["securityContext"], cluster)
    term = pod_spec["affinity"]["podAntiAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]
    term[0]["labelSelector"]["matchLabels"] = {LABEL_JOB: job}
    _scheduling(pod_spec, cluster, resources.gpus_per_node)
    for volume in pod_spec["volumes"]:
        if volume["name"] == "config":
            volume["configMap"]["name"] = f"{job}-config"
        elif volume["name"] == "work":
            claim = dns_subdomain("claim", cluster.get("claim", "trainyard-work"))
            volume["persistentVolumeClaim"]["claimName"] = claim
        elif volume["name"] == "shm" and cluster.get("shm"):
            volume["emptyDir"]["sizeLimit"] = quantity("shm", cluster["shm"])
    container = next(c for c in pod_spec["containers"] if c["name"] == CONTAINER)
    container["image"] = image
    container["imagePullPolicy"] = str(cluster.get("image_pull_policy") or "IfNotPresent")
    _container_env(container, cluster, master)
    _container_resources(container, cluster, resources)
    _check_shm(pod_spec, container)


def _user(security: dict, cluster: dict) -> None:
    """``cluster.run_as_user`` / ``fs_group`` (the image's 1000 by default); null leaves
    them to the platform (OpenShift assigns a uid from the namespace's range, and the image
    works under any uid in group 0)."""
    for key, field in (("run_as_user", "runAsUser"), ("fs_group", "fsGroup")):
        value = cluster.get(key, security.get(field))
        if value is None:
            security.pop(field, None)
        elif not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise refuse(key, value, "a uid or gid above 0 (the pods never run as root)",
                         f"cluster.{key}=1000, or null to let the platform choose")  # fmt: skip
        else:
            security[field] = value


def _check_shm(pod_spec: dict, container: dict) -> None:
    """A memory-backed /dev/shm counts against the pod's memory limit: larger than the
    limit, it would get the pod OOM-killed when the ranks fill it."""
    shm = next((v for v in pod_spec["volumes"] if v["name"] == "shm"), None)
    limit = container["resources"]["limits"].get("memory")
    size = shm and shm["emptyDir"].get("sizeLimit")
    if size and limit and parse_quantity(size) > parse_quantity(limit):
        raise refuse("shm", size, f"larger than the pod's memory limit ({limit}), which the "
                     "memory-backed /dev/shm counts against",
                     f"cluster.shm=<at most {limit}>, or cluster.memory=<more>")  # fmt: skip


def _scheduling(pod_spec: dict, cluster: dict, gpus: int) -> None:
    selector = {str(k): str(v) for k, v in (cluster.get("node_selector") or {}).items()}
    if selector:
        pod_spec["nodeSelector"] = selector
    resource = str(cluster.get("gpu_resource") or "nvidia.com/gpu")
    for toleration in pod_spec.get("tolerations", []):
        if toleration.get("key") == "nvidia.com/gpu":  # GPU nodes' taint: their resource's
            toleration["key"] = resource
    tolerations = [dict(t) for t in cluster.get("tolerations") or []]
    if tolerations:
        pod_spec["tolerations"] = [*pod_spec.get("tolerations", []), *tolerations]
    if cluster.get("service_account"):
        account = dns_subdomain("service_account", cluster["service_account"])
        pod_spec["serviceAccountName"] = account
    secrets = cluster.get("image_pull_secrets") or []
    if secrets:
        pod_spec["imagePullSecrets"] = [
            {"name": dns_subdomain("image_pull_secrets", s)} for s in secrets
        ]


@functools.cache
def _gpu_patch() -> dict[str, Any]:
    import yaml

    return yaml.safe_load((_k8s_dir() / "overlays" / "gpu" / "gpu.yaml").read_text())


_DEVICE_VARIABLES = ("NVIDIA_VISIBLE_DEVICES", "CUDA_VISIBLE_DEVICES")


def _container_env(container: dict, cluster: dict, master: str) -> None:
    env = container["env"]
    next(e for e in env if e["name"] == "MASTER_ADDR")["value"] = master
    for name, value in (cluster.get("env") or {}).items():
        if not _ENV_NAME.match(str(name)):
            raise refuse(f"env.{name}", value, "not an environment variable name",
                         "cluster.env.<NAME>=<value>")  # fmt: skip
        if str(name) in _DEVICE_VARIABLES:
            raise refuse(f"env.{name}", value, "may not be set: a pod sees the GPUs it asks "
                         "for and no others (a pod's env would override the device plugin's; "
                         "pods without GPUs already see none)",
                         "drop it; for GPUs: trainer.accelerator=gpu "
                         "trainer.devices=<GPUs per pod>")  # fmt: skip
        if _CREDENTIAL.search(str(name)) or _URL_PASSWORD.search(str(value)):
            raise refuse(
                f"env.{name}", "<hidden>",
                "looks like a credential (by its name or a password in its value): a "
                "literal value would sit in the Job's spec, the frozen config and the "
                "submission records for anyone who can read them",
                f"kubectl create secret generic <name> --from-literal={name}=...; then "
                "cluster.secrets=[<name>] (its keys become environment variables)",
            )  # fmt: skip
        given = next((e for e in env if e["name"] == str(name)), None)
        if given is None:
            env.append({"name": str(name), "value": str(value)})
        else:  # one entry per name: the user's value replaces the template's
            given["value"] = str(value)
    secrets = cluster.get("secrets") or []
    if secrets:
        container["envFrom"] = [
            {"secretRef": {"name": dns_subdomain("secrets", s)}} for s in secrets
        ]


def _container_resources(container: dict, cluster: dict, resources: Any) -> None:
    requests = container["resources"]["requests"]
    limits = container["resources"]["limits"]
    gpus = resources.gpus_per_node
    if cluster.get("cpu") is not None:
        requests["cpu"] = quantity("cpu", cluster["cpu"])
    elif not gpus and parse_quantity(requests["cpu"]) < resources.tasks_per_node:
        requests["cpu"] = str(resources.tasks_per_node)  # CPU ranks: a core each at least
    if cluster.get("memory") is not None:
        requests["memory"] = limits["memory"] = quantity("memory", cluster["memory"])
    key = str(cluster.get("gpu_resource") or "nvidia.com/gpu")
    for table in (requests, limits):
        table.pop("nvidia.com/gpu", None)
        if gpus:
            table[key] = str(gpus)


_SUFFIX = {"": 1, "m": 1e-3, "k": 1e3, "M": 1e6, "G": 1e9, "T": 1e12, "P": 1e15,
           "E": 1e18, "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "Pi": 2**50,
           "Ei": 2**60}  # fmt: skip


def parse_quantity(text: str) -> float:
    """A Kubernetes quantity's value (``8Gi`` -> 8589934592, ``500m`` -> 0.5)."""
    match = re.match(r"^([+]?[0-9.]+(?:[eE][-+]?[0-9]+)?)([a-zA-Z]*)$", str(text))
    if not match or match.group(2) not in _SUFFIX:
        raise ValueError(f"not a quantity: {text!r}")
    return float(match.group(1)) * _SUFFIX[match.group(2)]
