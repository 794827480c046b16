"""The Kubernetes manifests: what ``trainyard submit --dry-run cluster=k8s`` prints and what
``kubectl apply -k k8s/...`` applies, validated strictly against the schemas of Kubernetes
1.30 to 1.33 (custom resources against their CRDs), wired together correctly, meeting the
Pod Security "restricted" profile, and pinned by golden files.

No API server runs here: what an API server would also check (admission, quotas) is left to
the server-side dry run ``trainyard submit`` makes before sending (tests/integration/
test_k8s_api.py)."""

from __future__ import annotations

import copy
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from trainyard import kustomize
from trainyard.backends import k8s_manifests as manifests
from trainyard.backends.k8s_schema import VERSIONS, SchemaError, validate
from trainyard.errors import ConfigError

REPO = Path(__file__).resolve().parents[2]
K8S = REPO / "k8s"
GOLDEN = REPO / "tests" / "golden" / "k8s"
KUSTOMIZATIONS = ["base", "overlays/gpu", "overlays/multinode", "jobset", "volume", "ray"]
IMAGE = "registry.example/trainyard:0123abc"

# trainer settings -> (nodes, GPUs per pod)
SHAPES = {
    "cpu-1node": ([], 1, 0),
    "cpu-2nodes": (["trainer=ddp", "trainer.devices=2", "trainer.num_nodes=2"], 2, 0),
    "gpu-1node": (["trainer=gpu", "trainer.devices=1"], 1, 1),
    "gpu-2nodes": (
        ["trainer=ddp", "trainer.accelerator=gpu", "trainer.devices=4", "trainer.num_nodes=2"],
        2,
        4,
    ),
}


def dry_run(tmp_path, monkeypatch, capsys, *overrides) -> list[dict]:
    """The documents ``trainyard submit --dry-run`` prints (no kubeconfig here)."""
    from trainyard.submit import submit

    monkeypatch.setenv("TRAINYARD_ROOT", str(tmp_path))
    monkeypatch.setenv("KUBECONFIG", str(tmp_path / "no-kubeconfig"))
    monkeypatch.chdir(tmp_path)
    capsys.readouterr()
    submit(["cluster=k8s", f"cluster.image={IMAGE}", *overrides], dry_run=True)
    out = capsys.readouterr().out
    assert "not checked with the cluster" in out  # said, and still rendered
    return [d for d in yaml.safe_load_all(out) if d]


@pytest.fixture(params=[(shape, kind) for shape in SHAPES for kind in ("Job", "JobSet")],
                ids=lambda p: f"{p[0]}-{p[1]}")  # fmt: skip
def rendered(request, tmp_path, monkeypatch, capsys):
    shape, kind = request.param
    overrides, nodes, gpus = SHAPES[shape]
    docs = dry_run(tmp_path, monkeypatch, capsys, *overrides, f"cluster.kind={kind}")
    return docs, nodes, gpus, tmp_path


def _job_and_pod(docs: list[dict]) -> tuple[dict, dict]:
    """The Job spec (the JobSet's replicated Job's) and its pod template."""
    top = docs[-1]
    spec = (
        top["spec"]["replicatedJobs"][0]["template"]["spec"]
        if top["kind"] == "JobSet"
        else (top["spec"])
    )
    return spec, spec["template"]


# --- schemas ---------------------------------------------------------------------------


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("directory", KUSTOMIZATIONS)
def test_every_kustomization_validates_strictly(directory, version):
    for doc in kustomize.build(K8S / directory):
        validate(doc, version)


@pytest.mark.parametrize("version", VERSIONS)
def test_every_rendered_trial_validates_strictly(rendered, version):
    docs, *_ = rendered
    kinds = [d["kind"] for d in docs]
    assert kinds in (["ConfigMap", "Service", "Job"], ["ConfigMap", "JobSet"])
    for doc in docs:
        validate(doc, version)


def test_unknown_fields_and_unknown_kinds_fail():
    job = next(d for d in kustomize.build(K8S / "base") if d["kind"] == "Job")
    bad = copy.deepcopy(job)
    bad["spec"]["template"]["spec"]["containers"][0]["gpus"] = 1
    with pytest.raises(SchemaError, match="gpus"):
        validate(bad, "1.30")
    jobset = next(d for d in kustomize.build(K8S / "jobset") if d["kind"] == "JobSet")
    bad = copy.deepcopy(jobset)
    bad["spec"]["replicatedJobs"][0]["replica"] = 2  # misspelt: the CRD has `replicas`
    with pytest.raises(SchemaError, match="replica"):
        validate(bad, "1.30")
    with pytest.raises(SchemaError, match="no schema"):
        validate({"apiVersion": "example.com/v1", "kind": "Widget", "metadata": {}}, "1.30")
    # a field newer than the release: Job successPolicy appeared in 1.31's schema (beta)
    newer = copy.deepcopy(job)
    newer["spec"]["successPolicy"] = {"rules": [{"succeededCount": 1}]}
    with pytest.raises(SchemaError, match="successPolicy"):
        validate(newer, "1.29")


# --- one source of truth -----------------------------------------------------------------


def _normal(doc):
    """Lists of named items are sets to Kubernetes (kustomize puts patched ones first)."""
    if isinstance(doc, dict):
        return {k: _normal(v) for k, v in doc.items()}
    if isinstance(doc, list):
        items = [_normal(v) for v in doc]
        if items and all(isinstance(i, dict) and "name" in i for i in items):
            return sorted(items, key=lambda i: i["name"])
        return items
    return doc


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="no kubectl to compare with")
@pytest.mark.parametrize("directory", KUSTOMIZATIONS)
def test_trainyard_renders_kustomizations_as_kubectl_does(directory):
    out = subprocess.run(["kubectl", "kustomize", str(K8S / directory)], capture_output=True,
                         text=True, check=True).stdout  # fmt: skip
    key = lambda d: (d["kind"], d["metadata"]["name"])  # noqa: E731
    theirs = sorted((d for d in yaml.safe_load_all(out) if d), key=key)
    ours = sorted(kustomize.build(K8S / directory), key=key)
    assert [_normal(d) for d in ours] == [_normal(d) for d in theirs]


def test_the_jobset_runs_the_base_jobs_pod_template():
    job = next(d for d in kustomize.build(K8S / "base") if d["kind"] == "Job")
    jobset = next(d for d in kustomize.build(K8S / "jobset") if d["kind"] == "JobSet")
    inner = copy.deepcopy(jobset["spec"]["replicatedJobs"][0]["template"]["spec"])
    expected = copy.deepcopy(job["spec"])
    # what differs, and why: the JobSet names its pods and Service itself
    del expected["template"]["spec"]["subdomain"]
    env = expected["template"]["spec"]["containers"][0]["env"]
    env[0]["value"] = "trainyard-node-0-0.trainyard"
    assert inner == expected


def test_trials_are_rendered_from_the_kustomizations(tmp_path, monkeypatch, capsys):
    """Change k8s/ and the submitted manifests change with it."""
    docs = dry_run(tmp_path, monkeypatch, capsys)
    job = next(d for d in kustomize.build(K8S / "base") if d["kind"] == "Job")
    _, pod = _job_and_pod(docs)
    assert pod["spec"]["securityContext"] == job["spec"]["template"]["spec"]["securityContext"]
    assert docs[-1]["spec"]["podFailurePolicy"] == job["spec"]["podFailurePolicy"]


# --- wiring --------------------------------------------------------------------------------


def test_the_pieces_fit_together(rendered):
    docs, nodes, gpus, root = rendered
    config_map, top = docs[0], docs[-1]
    spec, pod = _job_and_pod(docs)
    name = top["metadata"]["name"]
    labels = pod["metadata"]["labels"]
    container = pod["spec"]["containers"][0]
    env = {e["name"]: e["value"] for e in container["env"]}
    assert spec["completions"] == spec["parallelism"] == nodes
    assert spec["completionMode"] == "Indexed"
    # one failure of a multi-node group ends every pod of it: counted once per failure
    if top["kind"] == "Job":
        assert spec["backoffLimit"] == 3 * nodes
    else:  # a failed pod fails its Job; the JobSet restarts the group
        assert spec["backoffLimit"] == 0 and top["spec"]["failurePolicy"]["maxRestarts"] == 3
    # GPU pods get the GPU overlay's resources, whichever kind runs them
    gpu_overlay = next(d for d in kustomize.build(K8S / "overlays/gpu") if d["kind"] == "Job")
    gpu_resources = gpu_overlay["spec"]["template"]["spec"]["containers"][0]["resources"]
    if gpus:
        resources = pod["spec"]["containers"][0]["resources"]
        assert resources["limits"]["memory"] == gpu_resources["limits"]["memory"]
        assert resources["requests"]["cpu"] == gpu_resources["requests"]["cpu"]
    if top["kind"] == "Job":
        service = docs[1]
        assert service["spec"]["clusterIP"] == "None"
        assert service["spec"]["publishNotReadyAddresses"] is True
        assert service["spec"]["selector"].items() <= labels.items()
        assert pod["spec"]["subdomain"] == service["metadata"]["name"]
        assert env["MASTER_ADDR"] == f"{name}-0.{service['metadata']['name']}"
    else:
        replicated = top["spec"]["replicatedJobs"][0]
        assert top["spec"]["network"]["enableDNSHostnames"] is True
        assert env["MASTER_ADDR"] == f"{name}-{replicated['name']}-0-0.{name}"
    anti = pod["spec"]["affinity"]["podAntiAffinity"]
    anti = anti["requiredDuringSchedulingIgnoredDuringExecution"]
    assert anti[0]["labelSelector"]["matchLabels"].items() <= labels.items()
    # one rank per GPU: trainyard-pod starts trainer.devices ranks, and the pod asks for that
    config = yaml.safe_load(config_map["data"]["config.yaml"])
    limits = container["resources"]["limits"]
    assert int(limits.get("nvidia.com/gpu", 0)) == gpus
    if gpus:
        assert config["trainer"]["devices"] == gpus
        assert container["resources"]["requests"]["nvidia.com/gpu"] == str(gpus)
    assert config["trainer"]["num_nodes"] == nodes
    # pod 0 leaves the metric where Kubernetes reads the termination message from
    assert env["TRAINYARD_TERMINATION_LOG"] == container["terminationMessagePath"]
    # the config is mounted where the command reads it, from this trial's ConfigMap
    assert container["args"][0] == "trainyard-pod"
    mount = next(m for m in container["volumeMounts"] if m["name"] == "config")
    assert Path(container["args"][1]).parent == Path(mount["mountPath"])
    volumes = {v["name"]: v for v in pod["spec"]["volumes"]}
    assert volumes["config"]["configMap"]["name"] == config_map["metadata"]["name"]
    assert Path(container["args"][1]).name in config_map["data"]
    # the run directory is on the claim, where the pods mount it
    work = next(m for m in container["volumeMounts"] if m["name"] == "work")["mountPath"]
    assert env["TRAINYARD_ROOT"] == work == "/work"
    assert config["paths"]["run_dir"].startswith(f"{work}/outputs/default/")
    assert str(root) not in config_map["data"]["config.yaml"]  # no path of this machine
    [claim] = kustomize.build(K8S / "volume")  # the claim k8s/volume creates
    assert volumes["work"]["persistentVolumeClaim"]["claimName"] == claim["metadata"]["name"]
    assert "ReadWriteMany" in claim["spec"]["accessModes"]  # every node mounts it
    # every object of the trial says which submission and trial it belongs to
    for doc in docs:
        assert doc["metadata"]["labels"][manifests.LABEL_INDEX] == "0"
        assert doc["metadata"]["labels"][manifests.LABEL_SUBMISSION]
        assert doc["metadata"]["namespace"] == "default"


def test_preemption_is_not_a_failure_and_bad_input_is_final(rendered):
    docs, *_ = rendered
    spec, pod = _job_and_pod(docs)
    rules = spec["podFailurePolicy"]["rules"]
    by_code = {
        code: rule["action"]
        for rule in rules
        if "onExitCodes" in rule
        for code in rule["onExitCodes"]["values"]
    }
    assert by_code[75] == "Ignore"  # EXIT_PREEMPTED: replaced, resumes from last.ckpt
    assert by_code[2] == "FailJob"  # bad input
    assert 3 not in by_code  # failed training: counted, retried up to backoffLimit
    assert any(
        c["type"] == "DisruptionTarget" for r in rules if r["action"] == "Ignore"
        for c in r.get("onPodConditions", [])
    )  # fmt: skip
    assert pod["spec"]["restartPolicy"] == "Never"
    assert spec["podReplacementPolicy"] == "Failed"  # never two pods of one index at once
    assert pod["spec"]["terminationGracePeriodSeconds"] == 120


# --- Pod Security "restricted" ---------------------------------------------------------------

_RESTRICTED_VOLUMES = {"configMap", "csi", "downwardAPI", "emptyDir", "ephemeral",
                       "persistentVolumeClaim", "projected", "secret"}  # fmt: skip


def restricted_violations(pod_spec: dict) -> list[str]:
    """The Pod Security Standards' "restricted" profile (v1.30), checked as its admission
    controller does."""
    found = []
    pod_sc = pod_spec.get("securityContext", {})
    for key in ("hostNetwork", "hostPID", "hostIPC"):
        if pod_spec.get(key):
            found.append(key)
    for volume in pod_spec.get("volumes", []):
        kinds = set(volume) - {"name"}
        if not kinds <= _RESTRICTED_VOLUMES:
            found.append(f"volume {volume['name']}: {kinds}")
    if (pod_sc.get("seccompProfile") or {}).get("type") not in ("RuntimeDefault", "Localhost"):
        found.append("seccompProfile")
    for container in pod_spec["containers"] + pod_spec.get("initContainers", []):
        sc = container.get("securityContext", {})
        if sc.get("privileged"):
            found.append("privileged")
        if sc.get("allowPrivilegeEscalation") is not False:
            found.append("allowPrivilegeEscalation")
        if sc.get("capabilities", {}).get("drop") != ["ALL"]:
            found.append("capabilities.drop")
        if set(sc.get("capabilities", {}).get("add", [])) - {"NET_BIND_SERVICE"}:
            found.append("capabilities.add")
        if not (sc.get("runAsNonRoot", pod_sc.get("runAsNonRoot"))):
            found.append("runAsNonRoot")
        if sc.get("runAsUser", pod_sc.get("runAsUser")) == 0:
            found.append("runAsUser 0")
        if any(p.get("hostPort") for p in container.get("ports", [])):
            found.append("hostPort")
    return found


def test_pods_meet_the_restricted_profile(rendered):
    docs, *_ = rendered
    _, pod = _job_and_pod(docs)
    assert restricted_violations(pod["spec"]) == []
    container = pod["spec"]["containers"][0]
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert pod["spec"]["automountServiceAccountToken"] is False
    # every place a pod writes is a volume: the claim, /tmp, /dev/shm (nothing else)
    writable = {m["mountPath"] for m in container["volumeMounts"] if not m.get("readOnly")}
    assert writable == {"/work", "/tmp", "/dev/shm"}
    assert container["resources"]["limits"]["memory"]
    assert container["resources"]["requests"]["cpu"]


def test_the_checker_catches_what_the_profile_forbids():
    pod = copy.deepcopy(_job_and_pod([kustomize.build(K8S / "base")[-1]])[1]["spec"])
    assert restricted_violations(pod) == []
    pod["hostNetwork"] = True
    pod["volumes"].append({"name": "host", "hostPath": {"path": "/"}})
    pod["containers"][0]["securityContext"]["allowPrivilegeEscalation"] = True
    del pod["securityContext"]["runAsNonRoot"]
    del pod["containers"][0]["securityContext"]["runAsNonRoot"]
    assert len(restricted_violations(pod)) == 4


def test_credentials_come_from_secrets_only(tmp_path, monkeypatch, capsys):
    docs = dry_run(tmp_path, monkeypatch, capsys, "cluster.secrets=[wandb,s3]",
                   "+cluster.env.WANDB_PROJECT=mnist")  # fmt: skip
    _, pod = _job_and_pod(docs)
    container = pod["spec"]["containers"][0]
    assert container["envFrom"] == [{"secretRef": {"name": "wandb"}}, {"secretRef": {"name": "s3"}}]
    assert {"name": "WANDB_PROJECT", "value": "mnist"} in container["env"]
    with pytest.raises(ConfigError, match="credential") as refused:
        dry_run(tmp_path, monkeypatch, capsys, "+cluster.env.WANDB_API_KEY=hunter2")
    assert "hunter2" not in str(refused.value)
    assert "cluster.secrets" in refused.value.fix


# --- pre-flight: refused before anything is sent ---------------------------------------------


@pytest.mark.parametrize(
    ("override", "match"),
    [
        ("cluster.namespace=Team_A", "Kubernetes names"),
        ("cluster.memory=lots", "quantity"),
        ("cluster.cpu=2cores", "quantity"),
        ("cluster.image=registry.example/trainyard:latest", "latest"),
        ("cluster.claim=Work_Dir", "object name"),
        ("cluster.kind=Deployment", "Job or a JobSet"),
        ("+cluster.labels.team=a b", "label"),
        ("cluster.local_pods=true", "root_dir"),
        ("cluster.kubernetes_version=1.12", "1.12"),
        ("cluster.kubernetes_version=1.30", "unquoted 1.30 reads as the number 1.3"),
        ("cluster.kubernetes_version='\"1.28\"'", "1.30 or newer"),
        ("cluster.claim=''", "object name"),
        ("cluster.shm=100Gi", "larger than the pod's memory limit"),
        ("+cluster.env.WANDB_KEY=abc", "credential"),
        ("+cluster.env.DATABASE_URL='postgres://u:pw@db/x'", "credential"),
        ("cluster.run_as_user=0", "never run as root"),
    ],
)
def test_requests_the_cluster_would_refuse_are_refused_here(
    override, match, tmp_path, monkeypatch, capsys
):
    with pytest.raises(ConfigError, match=match) as refused:
        dry_run(tmp_path, monkeypatch, capsys, override)
    assert refused.value.exit_code == 2


def test_the_cpu_image_cannot_serve_gpu_pods(tmp_path, monkeypatch, capsys):
    with pytest.raises(ConfigError, match="CPU image"):
        dry_run(tmp_path, monkeypatch, capsys, "trainer=gpu", "cluster.variant=cpu")


def test_cpu_ranks_get_a_core_each_and_gpus_their_resource_and_taint(tmp_path, monkeypatch, capsys):
    docs = dry_run(tmp_path, monkeypatch, capsys, "trainer=ddp", "trainer.devices=8")
    _, pod = _job_and_pod(docs)
    assert pod["spec"]["containers"][0]["resources"]["requests"]["cpu"] == "8"
    docs = dry_run(tmp_path, monkeypatch, capsys, "trainer=ddp", "trainer.accelerator=gpu",
                   "trainer.devices=2", "cluster.gpu_resource=amd.com/gpu")  # fmt: skip
    _, pod = _job_and_pod(docs)
    assert pod["spec"]["containers"][0]["resources"]["limits"]["amd.com/gpu"] == "2"
    assert [t["key"] for t in pod["spec"]["tolerations"]] == ["amd.com/gpu"]


def test_pods_use_only_the_gpus_they_ask_for(rendered):
    """A GPU node's default NVIDIA runtime shows a pod every GPU of the node unless told
    otherwise: a CPU pod (trainer.accelerator auto, say) would take GPUs given to others."""
    docs, _, gpus, _ = rendered
    _, pod = _job_and_pod(docs)
    env = {e["name"]: e["value"] for e in pod["spec"]["containers"][0]["env"]}
    if gpus:  # the device plugin's to set
        assert "NVIDIA_VISIBLE_DEVICES" not in env
    else:
        assert env["NVIDIA_VISIBLE_DEVICES"] == "void"


def test_a_users_env_value_replaces_the_templates(tmp_path, monkeypatch, capsys):
    docs = dry_run(tmp_path, monkeypatch, capsys, "+cluster.env.XDG_CACHE_HOME=/work/cache")
    _, pod = _job_and_pod(docs)
    env = [e for e in pod["spec"]["containers"][0]["env"] if e["name"] == "XDG_CACHE_HOME"]
    assert env == [{"name": "XDG_CACHE_HOME", "value": "/work/cache"}]


@pytest.mark.parametrize("name", ["NVIDIA_VISIBLE_DEVICES", "CUDA_VISIBLE_DEVICES"])
def test_the_gpus_a_pod_sees_cannot_be_set_apart_from_what_it_asks_for(
    tmp_path, monkeypatch, capsys, name
):
    with pytest.raises(ConfigError, match=f"env.{name}") as refused:
        dry_run(tmp_path, monkeypatch, capsys, "trainer=gpu", f"+cluster.env.{name}=all")
    assert "trainer.devices" in refused.value.fix


def test_each_job_names_its_run_directory(tmp_path, monkeypatch, capsys):
    docs = dry_run(tmp_path, monkeypatch, capsys, "optimizer.lr=0.02")
    annotation = docs[-1]["metadata"]["annotations"][manifests.ANNOTATION_TRIAL]
    assert annotation.startswith("default/runs/lr-0.02__")  # under paths.output_dir


def test_more_gpus_than_the_nodes_have_is_refused(tmp_path, monkeypatch, capsys):
    with pytest.raises(ConfigError, match="gpus_per_node=8") as refused:
        dry_run(tmp_path, monkeypatch, capsys, "trainer=ddp", "trainer.accelerator=gpu",
                "trainer.devices=16",
                "cluster.gpus_per_node=8")  # fmt: skip
    assert "trainer.devices=8" in refused.value.fix


def test_no_image_names_the_fix(tmp_path, monkeypatch, capsys):
    with pytest.raises(ConfigError, match=r"cluster\.image") as refused:
        dry_run(tmp_path, monkeypatch, capsys, "cluster.image=null")
    assert "make image" in refused.value.fix


def test_names_fit_in_pod_hostnames():
    long = "an-experiment-name-far-longer-than-kubernetes-would-ever-accept-as-a-label"
    name = manifests.job_name(Path("/out/x/runs/k"), long, "/out")
    assert len(f"{name}-node-0-9999") <= 63
    assert manifests.job_name(Path("/a/out/x/runs/k"), long, "/a/out") == name  # any machine
    assert manifests.job_name(Path("/out/x/runs/k"), "0-digits_first", "/out").startswith("t0")


def test_the_pods_config_moves_only_paths_under_the_root():
    data = {"paths": {"root_dir": "/home/me/p", "data_dir": "/datasets"},
            "logger": {"save_dir": "/home/me/p/outputs/r"}, "other": "/home/me/pp"}  # fmt: skip
    moved = manifests.pod_config(data, "/work")
    assert moved["logger"]["save_dir"] == "/work/outputs/r"
    assert moved["paths"] == {"root_dir": "/work", "data_dir": "/datasets"}
    assert moved["other"] == "/home/me/pp"  # a sibling, not under the root
    assert manifests.pod_config(data, None) is data


# --- golden files --------------------------------------------------------------------------


def _golden_text(docs: list[dict]) -> str:
    """Rendered documents without what changes per submission or machine."""
    docs = copy.deepcopy(docs)
    for doc in docs:
        doc["metadata"]["labels"][manifests.LABEL_SUBMISSION] = "<submission>"
        for pod in _pods(doc):
            pod["metadata"]["labels"][manifests.LABEL_SUBMISSION] = "<submission>"
        if doc["kind"] == "ConfigMap":
            doc["data"]["config.yaml"] = "<the frozen config>"
    return yaml.safe_dump_all(docs, sort_keys=False, width=100)


def _pods(doc: dict) -> list[dict]:
    if doc["kind"] == "Job":
        return [doc["spec"]["template"]]
    if doc["kind"] == "JobSet":
        return [doc["spec"]["replicatedJobs"][0]["template"]["spec"]["template"]]
    return []


@pytest.mark.parametrize("directory", KUSTOMIZATIONS)
def test_kustomizations_match_their_golden_files(directory):
    text = yaml.safe_dump_all(kustomize.build(K8S / directory), sort_keys=False, width=100)
    _check_golden(f"kustomize-{directory.replace('/', '-')}.yaml", text)


def test_rendered_trials_match_their_golden_files(rendered, request):
    docs, *_ = rendered
    _check_golden(f"trial-{request.node.callspec.id}.yaml", _golden_text(docs))


def _check_golden(name: str, text: str) -> None:
    golden = GOLDEN / name
    if not golden.exists():  # a new case: written, to be reviewed and committed
        golden.parent.mkdir(parents=True, exist_ok=True)
        golden.write_text(text)
        pytest.fail(f"{golden} was missing: written now; review it and commit it")
    assert text == golden.read_text(), f"{golden} differs: review, then delete it to renew"


def test_the_renderer_refuses_what_it_does_not_implement(tmp_path):
    (tmp_path / "a.yaml").write_text("apiVersion: v1\nkind: ConfigMap\nmetadata: {name: a}\n")
    (tmp_path / "kustomization.yaml").write_text("resources: [a.yaml]\nnamePrefix: team-\n")
    with pytest.raises(kustomize.KustomizeError, match="namePrefix"):
        kustomize.build(tmp_path)
    (tmp_path / "kustomization.yaml").write_text(
        "resources: [a.yaml]\npatches:\n  - path: p.yaml\n    target: {kind: Job}\n"
    )
    with pytest.raises(kustomize.KustomizeError, match="path or patch only"):
        kustomize.build(tmp_path)


def test_strategic_merge_merges_named_items_and_replaces_other_lists():
    base = {"containers": [{"name": "a", "env": [{"name": "X", "value": "1"}]}],
            "tolerations": [{"key": "a"}], "keep": 1, "drop": 2}  # fmt: skip
    patch = {"containers": [{"name": "a", "env": [{"name": "Y", "value": "2"}]},
                            {"name": "b"}],
             "tolerations": [{"key": "b"}], "drop": None}  # fmt: skip
    merged = kustomize.merge(base, patch)
    assert merged["containers"][0]["env"] == [{"name": "X", "value": "1"},
                                              {"name": "Y", "value": "2"}]  # fmt: skip
    assert [c["name"] for c in merged["containers"]] == ["a", "b"]
    assert merged["tolerations"] == [{"key": "b"}]
    assert merged["keep"] == 1 and "drop" not in merged
    assert base["containers"][0]["env"] == [{"name": "X", "value": "1"}]  # untouched


# --- KubeRay ---------------------------------------------------------------------------------


def _ray_docs() -> dict[str, dict]:
    return {d["kind"]: d for d in kustomize.build(K8S / "ray")}


def _ray_pods(spec: dict) -> list[dict]:
    groups = [spec["headGroupSpec"], *spec["workerGroupSpecs"]]
    return [g["template"]["spec"] for g in groups]


def test_the_rayjob_starts_the_same_cluster_as_the_raycluster():
    docs = _ray_docs()
    assert docs["RayJob"]["spec"]["rayClusterSpec"] == docs["RayCluster"]["spec"]


def test_ray_nodes_run_the_pinned_ray_in_the_image_as_its_user_with_the_claim():
    import tomllib

    pins = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    [ray_pin] = pins["optional-dependencies"]["ray"]
    spec = _ray_docs()["RayCluster"]["spec"]
    assert ray_pin.endswith("==" + spec["rayVersion"])
    assert spec["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"  # no trial on the head
    for pod in _ray_pods(spec):
        assert (
            pod["securityContext"]["runAsUser"] == 1000 and not pod["automountServiceAccountToken"]
        )
        [container] = pod["containers"]
        assert container["image"] == "trainyard"
        assert container["securityContext"]["capabilities"]["drop"] == ["ALL"]
        assert not container["securityContext"]["allowPrivilegeEscalation"]
        mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
        volumes = {v["name"]: v for v in pod["volumes"]}
        assert volumes[mounts["/work"]]["persistentVolumeClaim"]["claimName"] == "trainyard-work"
        assert volumes[mounts["/dev/shm"]]["emptyDir"]["medium"] == "Memory"
        env = {e["name"]: e.get("value") for e in container["env"]}
        assert env["TRAINYARD_ROOT"] == "/work"
    entrypoint = _ray_docs()["RayJob"]["spec"]["entrypoint"]
    assert "cluster=ray" in entrypoint and "cluster.address=http://127.0.0.1:8265" in entrypoint


def test_a_misspelt_ray_field_fails_against_the_crd():
    cluster = copy.deepcopy(_ray_docs()["RayCluster"])
    cluster["spec"]["workerGroupSpecs"][0]["replica"] = 2  # the CRD has `replicas`
    with pytest.raises(SchemaError, match="replica"):
        validate(cluster, "1.30")
    job = copy.deepcopy(_ray_docs()["RayJob"])
    job["spec"]["shutdownAfterJobFinish"] = True  # the CRD has shutdownAfterJobFinishes
    with pytest.raises(SchemaError, match="shutdownAfterJobFinish"):
        validate(job, "1.30")


@pytest.mark.parametrize(
    ("listed", "gpus"),
    [("3,5", ["3", "5"]), ("0,-1,1", ["0"]), ("GPU-a1,GPU-b2", ["GPU-a1", "GPU-b2"]), ("", [])],
)
def test_local_pods_share_out_the_gpus_cuda_would_see(monkeypatch, listed, gpus):
    from trainyard.backends.k8s_local import host_gpus

    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", listed)
    assert host_gpus() == gpus
