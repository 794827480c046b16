"""The training image, built and run for real with podman: the CPU twin of docker/Dockerfile
(the CUDA image differs only in its base and build arguments; tests/unit/test_image.py checks
those). Built once per session; the tests then run it as a cluster would: as its non-root
user with the run directory on a mounted volume, two containers forming one DDP group, and
started wrong in the ways users start it wrong.

No registry can be reached from CI: ``.ci/run`` tags a locally made Debian base under the
base images' names (docker/engine.sh base), and the build takes packages through this
machine's pip settings (--pip-from-host). PyTorch's CPU wheel index cannot be reached either,
so the twin built here carries torch's default (CUDA) wheel; elsewhere it gets the CPU build.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from trainyard import image

ROOT = Path(__file__).resolve().parents[2]
ENGINE = shutil.which("podman")

pytestmark = [
    pytest.mark.container,
    pytest.mark.slow,
    pytest.mark.skipif(ENGINE is None, reason="needs podman (bash docker/engine.sh install)"),
]

SHORT = ["trainer.max_epochs=1", "+trainer.limit_train_batches=4", "+trainer.limit_val_batches=2"]


def _podman(*args: str, timeout: float = 300, check: bool = True) -> subprocess.CompletedProcess:
    out = subprocess.run(["podman", *args], capture_output=True, text=True, timeout=timeout)
    if check:
        assert out.returncode == 0, f"podman {' '.join(args)}:\n{out.stdout}\n{out.stderr}"
    return out


@pytest.fixture(scope="session")
def cpu_image() -> Iterator[str]:
    base = image.VARIANTS["cpu"].base
    if _podman("image", "exists", base, check=False).returncode != 0:
        pytest.fail(f"no base image {base}: bash docker/engine.sh base {base} (no registry here)")
    cmd = image.build_command(ROOT, "cpu", torch_index="", pip_from_host=True)
    existed = _podman("image", "exists", cmd[cmd.index("-t") + 1], check=False).returncode == 0
    started = time.monotonic()
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-4000:]
    tag = cmd[cmd.index("-t") + 1]
    print(f"built {tag} in {time.monotonic() - started:.1f} s")
    yield tag
    # Each commit gets its own multi-GB tag: a suite that kept them would fill a developer's
    # (or a shared CI host's) disk within a day. The build cache stays, so the next build of
    # unchanged dependencies takes seconds.
    if not existed:
        _podman("rmi", tag, check=False)


def _volume(tmp_path: Path, name: str = "work", owner: int = 1000) -> Path:
    volume = tmp_path / name
    volume.mkdir()
    os.chown(volume, owner, owner)  # the image's user (rootful podman maps it as is)
    return volume


def _run(img: str, volume: Path, *command: str, env: dict | None = None, timeout=300):
    flags = [f"--env={k}={v}" for k, v in (env or {}).items()]
    return _podman("run", "--rm", f"--volume={volume}:/work", *flags, img, *command,
                   timeout=timeout, check=False)  # fmt: skip


def _inspect(img: str) -> dict:
    return json.loads(_podman("image", "inspect", img).stdout)[0]


def test_the_image_runs_as_its_user_with_labels_and_entrypoint(cpu_image):
    config = _inspect(cpu_image)["Config"]
    labels = config["Labels"]
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True,
                            text=True).stdout.strip()  # fmt: skip
    # this commit's, also when an earlier build of another revision left its layers cached
    assert labels["org.opencontainers.image.revision"].startswith(commit)
    stamp = _podman("run", "--rm", "--entrypoint=cat", cpu_image, "/opt/venv/trainyard-image.txt")
    assert labels["org.opencontainers.image.revision"] in stamp.stdout
    assert labels["org.opencontainers.image.version"] == image.__version__
    assert labels["org.opencontainers.image.source"] == image.SOURCE
    assert config["User"] == "1000"  # numeric: runAsNonRoot can verify it
    assert config["Entrypoint"] == ["tini", "--", "trainyard-entry"]
    assert config["Cmd"] == ["trainyard-train"]
    # build-time settings (the host's pip mirror and CA bundle) stay out of the image,
    # its environment and its history (which keeps every build argument)
    assert not [e for e in config["Env"] if e.startswith("PIP_")]
    history = _podman("history", "--no-trunc", "--format={{.CreatedBy}}", cpu_image).stdout
    settings = [v for value in image._pip_settings().values() for v in value.split()]
    assert settings and not [v for v in settings if v in history], history


def test_the_image_holds_no_compilers_caches_sources_or_secrets(cpu_image):
    script = """
    for tool in gcc cc g++ c++ clang make ld; do command -v $tool && echo "compiler: $tool"; done
    for d in /root/.cache /home/trainyard/.cache /var/cache/apt/archives/*.deb \\
             /var/lib/apt/lists/*_Packages /tmp/build /tmp/wheels; do
        [ -e "$d" ] && echo "leftover: $d"
    done
    # podman leaves the build's mount points (empty files and directories): nothing in them
    find /run/host-pip -type f -size +0 2>/dev/null | sed 's/^/leftover: /'
    find / -xdev \\( -name .git -o -name .env -o -name id_rsa -o -name .netrc \\
         -o -name '*.pem' -path '*/home/*' -o -name .venv -o -name outputs \\) 2>/dev/null |
        sed 's/^/secret or source: /'
    id -u
    """
    out = _podman("run", "--rm", "--user=root", "--entrypoint=sh", cpu_image, "-c", script)
    lines = out.stdout.split()
    assert lines[-1] == "0" and "compiler:" not in out.stdout, out.stdout
    assert "leftover:" not in out.stdout and "secret" not in out.stdout, out.stdout
    user = _podman("run", "--rm", "--entrypoint=id", cpu_image, "-u").stdout.strip()
    assert user == "1000"


def test_an_arbitrary_uid_in_group_0_can_train_as_openshift_runs_images(cpu_image):
    out = _podman("run", "--rm", "--user=4242:0", cpu_image, "trainyard-train", *SHORT,
                  check=False)  # fmt: skip
    assert out.returncode == 0, out.stderr[-2000:]
    assert "is not a mounted volume" in out.stderr  # /work of the image itself: said so


def test_the_entrypoint_trains_the_default_on_a_mounted_volume(cpu_image, tmp_path):
    volume = _volume(tmp_path)
    out = _run(cpu_image, volume, "trainyard-train", *SHORT)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "trainyard-entry: trainyard" in out.stderr and "torch 2.14.1" in out.stderr
    assert "is not a mounted volume" not in out.stderr
    [result] = list(volume.glob("outputs/default/runs/*/result.json"))
    run = result.parent
    assert json.loads((run / "status.json").read_text())["state"] == "completed"
    assert (run / "checkpoints" / "best.ckpt").stat().st_uid == 1000  # the image's user
    provenance = json.loads((run / "provenance.json").read_text())
    assert provenance["image"]["revision"].startswith(
        _inspect(cpu_image)["Config"]["Labels"]["org.opencontainers.image.revision"]
    )


def test_two_containers_form_one_ddp_group_and_end_with_identical_weights(cpu_image, tmp_path):
    volume, pod = _volume(tmp_path), f"trainyard-test-{uuid.uuid4().hex[:8]}"
    _podman("pod", "create", f"--name={pod}", "--network=none")  # loopback shared by the pod
    try:
        containers = []
        for rank in (0, 1):  # one container per node, as a Kubernetes Indexed Job's pods
            torchrun = ["torchrun", "--nnodes=2", "--nproc-per-node=1", f"--node-rank={rank}",
                        "--master-addr=127.0.0.1", "--master-port=29531", "--no-python",
                        "trainyard-train", "trainer=ddp", "trainer.num_nodes=2",
                        "trainer.devices=1", *SHORT]  # fmt: skip
            started = _podman("run", "-d", f"--pod={pod}", f"--volume={volume}:/work",
                              f"--name={pod}-{rank}", cpu_image, *torchrun)  # fmt: skip
            containers.append(started.stdout.strip())
        codes = [_podman("wait", c, timeout=300).stdout.strip() for c in containers]
        logs = [_podman("logs", c).stderr[-2000:] for c in containers]
        assert codes == ["0", "0"], logs
    finally:
        _podman("pod", "rm", "--force", pod, check=False)
    [run] = [p.parent for p in volume.glob("outputs/default/runs/*/status.json")]
    ranks = [json.loads((run / "ranks" / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0]["host"] and ranks[0]["weights"] == ranks[1]["weights"]
    assert json.loads((run / "status.json").read_text())["state"] == "completed"


def test_an_output_volume_the_user_cannot_write_is_refused(cpu_image, tmp_path):
    volume = _volume(tmp_path, owner=0)
    volume.chmod(0o755)
    out = _run(cpu_image, volume, "trainyard-train", *SHORT)
    assert out.returncode == 2, out.stderr
    assert "/work is not writable by uid 1000" in out.stderr and "fix:" in out.stderr
    assert list(volume.iterdir()) == []


def test_a_config_directory_that_was_not_mounted_is_refused(cpu_image, tmp_path):
    volume = _volume(tmp_path)
    out = _run(cpu_image, volume, "trainyard-train", "--config-dir", "/conf", *SHORT)
    assert out.returncode == 2 and "/conf, which is not a directory" in out.stderr, out.stderr
    out = _run(cpu_image, volume, "trainyard-train", env={"TRAINYARD_CONF": "/site-conf"})
    assert out.returncode == 2 and "TRAINYARD_CONF names /site-conf" in out.stderr, out.stderr
    assert list(volume.iterdir()) == []


def test_a_gpu_requested_where_the_container_sees_none_is_refused(cpu_image, tmp_path):
    volume = _volume(tmp_path)
    out = _run(cpu_image, volume, "trainyard-train", "trainer=gpu", *SHORT)
    assert out.returncode == 2, out.stderr[-2000:]
    assert "GPU" in out.stderr and "fix" in out.stderr.lower(), out.stderr[-2000:]
    assert not list(volume.glob("outputs/**/status.json"))


def _wait_for(predicate, timeout: float = 120):
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.5)


def test_podman_stop_checkpoints_and_the_same_command_resumes(cpu_image, tmp_path):
    volume, name = _volume(tmp_path), f"trainyard-stop-{uuid.uuid4().hex[:8]}"
    command = ["trainyard-train", "trainer.max_epochs=40"]
    _podman("run", "-d", f"--name={name}", f"--volume={volume}:/work", cpu_image, *command)
    try:
        status = lambda: next(volume.glob("outputs/default/runs/*/status.json"), None)  # noqa: E731
        last = lambda: next(volume.glob("outputs/default/runs/*/checkpoints/last.ckpt"), None)  # noqa: E731
        _wait_for(lambda: status() is not None and last() is not None)
        _podman("stop", "--time=60", name)  # SIGTERM, as Kubernetes and Slurm send it
        code = _podman("inspect", "--format={{.State.ExitCode}}", name).stdout.strip()
    finally:
        _podman("rm", "--force", name, check=False)
    state = json.loads(status().read_text())
    assert code == "75" and state["state"] == "preempted", (code, state)
    out = _run(cpu_image, volume, *command)
    assert out.returncode == 0, out.stderr[-2000:]
    history = json.loads(status().read_text())["history"]
    assert history[-1]["state"] == "completed"
    assert [h for h in history if h["state"] == "running"][-1]["resumed_from"].endswith("last.ckpt")


def test_a_stop_while_the_container_starts_is_not_lost(cpu_image, tmp_path):
    volume, name = _volume(tmp_path), f"trainyard-early-{uuid.uuid4().hex[:8]}"
    _podman("run", "-d", f"--name={name}", f"--volume={volume}:/work", cpu_image,
            "trainyard-train", "trainer.max_epochs=40")  # fmt: skip
    try:
        started = time.monotonic()
        _podman("stop", "--time=60", name)  # before Python installed any handler
        took = time.monotonic() - started
    finally:
        _podman("rm", "--force", name, check=False)
    assert took < 20, f"podman stop took {took:.1f} s: the signal was lost"


def _pod_flags(pod_spec: dict, config_dir: Path, work: Path, index: int, job: str) -> list[str]:
    """``podman run`` flags for one pod of the rendered Job, read from its spec: the user,
    read-only root, dropped capabilities and no privilege escalation of its security
    context; its volumes (the ConfigMap's files, the claim, memory-backed /dev/shm, /tmp);
    its env, and what Kubernetes adds to a pod of an Indexed Job."""
    container = pod_spec["containers"][0]
    security, pod_security = container["securityContext"], pod_spec["securityContext"]
    flags = [f"--user={pod_security['runAsUser']}", f"--group-add={pod_security['fsGroup']}",
             f"--hostname={job}-{index}", f"--env=JOB_COMPLETION_INDEX={index}",
             *(f"--cap-drop={c}" for c in security["capabilities"]["drop"])]  # fmt: skip
    if security["readOnlyRootFilesystem"]:
        flags.append("--read-only")
    if security["allowPrivilegeEscalation"] is False:
        flags.append("--security-opt=no-new-privileges")
    volumes = {v["name"]: v for v in pod_spec["volumes"]}
    for mount in container["volumeMounts"]:
        volume = volumes[mount["name"]]
        if "configMap" in volume:
            flags.append(f"--volume={config_dir}:{mount['mountPath']}:ro")
        elif "persistentVolumeClaim" in volume:
            flags.append(f"--volume={work}:{mount['mountPath']}")
        elif mount["mountPath"] == "/dev/shm":
            flags.append(f"--shm-size={volume['emptyDir']['sizeLimit'].removesuffix('i')}")
        else:
            flags.append(f"--tmpfs={mount['mountPath']}:rw,size=1g,mode=1777")
    flags += [f"--env={e['name']}={e['value']}" for e in container["env"]]
    return flags


def test_the_rendered_pod_template_trains_in_podman_as_kubernetes_would_run_it(cpu_image, tmp_path):
    """The Job rendered for cluster=k8s, its two pods run as containers of the project
    image in one podman pod (shared loopback; <job>-0.<service> resolves to it): the
    restricted security context holds (read-only root, uid 1000, no capabilities), the
    ConfigMap's config is what they train, and they form one DDP group."""
    import yaml

    env = {**os.environ, "TRAINYARD_ROOT": str(tmp_path), "KUBECONFIG": str(tmp_path / "none")}
    out = subprocess.run(
        [sys.executable, "-m", "trainyard.cli", "submit", "--dry-run", "cluster=k8s",
         f"cluster.image={cpu_image}", "trainer=ddp", "trainer.devices=1", "trainer.num_nodes=2",
         *SHORT], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    config_map, service, job = [d for d in yaml.safe_load_all(out.stdout) if d]
    pod_spec, name = job["spec"]["template"]["spec"], job["metadata"]["name"]
    assert pod_spec["containers"][0]["image"] == cpu_image
    config_dir = tmp_path / "configmap"
    config_dir.mkdir()
    for key, text in config_map["data"].items():
        (config_dir / key).write_text(text)
    work, pod = _volume(tmp_path), f"trainyard-k8s-{uuid.uuid4().hex[:8]}"
    master = f"{name}-0.{service['metadata']['name']}"
    # a Kubernetes pod per node; here the network namespace is shared (the one loopback),
    # each keeping its own hostname. The kubelet writes a pod's /etc/hosts; so does this test
    # (the Service's DNS name of pod 0 is this loopback)
    _podman("pod", "create", f"--name={pod}", "--network=none", "--share=net")
    hosts = tmp_path / "hosts"
    hosts.write_text(f"127.0.0.1\tlocalhost\n127.0.0.1\t{master}\n")
    try:
        containers = []
        for index in range(job["spec"]["completions"]):
            flags = [*_pod_flags(pod_spec, config_dir, work, index, name),
                     f"--volume={hosts}:/etc/hosts:ro"]  # fmt: skip
            args = pod_spec["containers"][0]["args"]
            started = _podman("run", "-d", f"--pod={pod}", *flags, cpu_image, *args)
            containers.append(started.stdout.strip())
        codes = [_podman("wait", c, timeout=240, check=False).stdout.strip() for c in containers]
        logs = [_podman("logs", c).stderr[-3000:] for c in containers]
        assert codes == ["0", "0"], logs
    finally:
        _podman("pod", "rm", "--force", "--time=0", pod, check=False)
    [run] = [p.parent for p in work.glob("outputs/default/runs/*/status.json")]
    assert json.loads((run / "status.json").read_text())["state"] == "completed"
    assert json.loads((run / "result.json").read_text())["world_size"] == 2
    assert (run / "config.yaml").read_text() == config_map["data"]["config.yaml"]
