"""The package as ``pip install .`` (and so every image) gets it: the wheel built from this
checkout, installed into a fresh virtual environment outside the checkout, run through its
console scripts from a directory outside the checkout.

Installing torch & co. into the fresh venv would take minutes and gigabytes, so it borrows
the current interpreter's site-packages through a ``.pth`` file holding a plain path. Python
adds such a path to ``sys.path`` but does not process the ``.pth`` files inside it, so the
checkout's editable install (``__editable__.trainyard-*.pth``) stays inactive there; the test
checks that the ``trainyard`` imported is the installed one.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import time
import zipfile
from pathlib import Path

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

REPO = Path(__file__).resolve().parents[2]
# Environment variables that could point the fresh venv back at the checkout or its venv.
# TRAINYARD_ROOT too: outputs must land under the working directory of each run.
_SCRUB = {"PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV", "TRAINYARD_CONF", "TRAINYARD_ROOT"}


def _run(args: list, timeout: float = 120, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(a) for a in args], capture_output=True, text=True, timeout=timeout, **kwargs
    )


def _ok(out: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert out.returncode == 0, f"{out.args}\nstdout:\n{out.stdout}\nstderr:\n{out.stderr}"
    return out


def _copy_checkout(dest: Path) -> Path:
    """What a build sees, without building inside the shared checkout (an in-tree build
    writes build/ and *.egg-info there). Symlinks are kept: src/trainyard/conf is one."""
    junk = shutil.ignore_patterns("__pycache__", "*.egg-info", "build", "dist")
    dest.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(REPO / name, dest / name)
    for name in ("src", "conf", "k8s"):
        shutil.copytree(REPO / name, dest / name, symlinks=True, ignore=junk)
    return dest


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> dict:
    tmp = tmp_path_factory.mktemp("wheel")
    assert not tmp.resolve().is_relative_to(REPO)
    source = _copy_checkout(tmp.joinpath("source").resolve())
    assert (source / "src" / "trainyard" / "conf").is_symlink()
    # A builder's per-machine settings must never end up in the wheel.
    (source / "conf" / "local" / "default.yaml").write_text("trainer:\n  max_epochs: 999\n")

    build_env = {**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1", "PIP_NO_INDEX": "1"}
    pip = [sys.executable, "-m", "pip"]
    dist = tmp / "dist"
    _ok(
        _run(
            [*pip, "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", dist, source],
            env=build_env,
        )
    )
    [wheel] = dist.glob("trainyard-*.whl")

    venv = tmp / "venv"
    _ok(_run([sys.executable, "-m", "venv", "--without-pip", venv]))
    python = venv / "bin" / "python"
    _ok(_run([*pip, "--python", python, "install", "--no-deps", "-q", wheel], env=build_env))
    # Borrow the dependencies, not the checkout: one plain path line per site directory.
    where = _ok(_run([python, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"]))
    purelib = Path(where.stdout.strip())
    borrowed = dict.fromkeys(sysconfig.get_path(k) for k in ("purelib", "platlib"))
    (purelib / "_borrowed_deps.pth").write_text("".join(f"{p}\n" for p in borrowed))

    env = {k: v for k, v in os.environ.items() if k not in _SCRUB}
    env.update(PATH=f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}", PYTHONNOUSERSITE="1")
    return {"tmp": tmp, "wheel": wheel, "venv": venv, "python": python, "env": env}


def _train(installed: dict, cwd: Path, *args: str) -> subprocess.CompletedProcess:
    cwd.mkdir()
    return _ok(_run(["trainyard-train", *args], timeout=150, cwd=cwd, env=installed["env"]))


def _completed_run(root: Path, name: str) -> Path:
    [status] = (root / "outputs" / name).rglob("status.json")
    assert json.loads(status.read_text())["state"] == "completed"
    assert (status.parent / "result.json").is_file()
    return status.parent


def test_wheel_ships_the_configs_but_not_local_ones(installed):
    names = zipfile.ZipFile(installed["wheel"]).namelist()
    shipped = {
        n.removeprefix("trainyard/conf/")
        for n in names
        if n.startswith("trainyard/conf/") and n.endswith(".yaml")
    }
    expected = {
        p.relative_to(REPO / "conf").as_posix()
        for p in (REPO / "conf").rglob("*.yaml")
        if p.parent.name != "local"
    }
    assert "train.yaml" in expected and shipped == expected
    assert not [n for n in names if "/local/" in n]


def test_installed_package_is_the_wheel_not_the_checkout(installed):
    probe = (
        "import json, sys, trainyard, trainyard.conf_path as c, torch;"
        "print(json.dumps({'file': trainyard.__file__, 'conf': str(c.CONF_DIR),"
        " 'path': sys.path, 'finders': [repr(f) for f in sys.meta_path]}))"
    )
    out = _ok(_run([installed["python"], "-c", probe], cwd=installed["tmp"], env=installed["env"]))
    seen = json.loads(out.stdout)
    venv = installed["venv"].resolve()
    assert Path(seen["file"]).resolve().is_relative_to(venv)
    assert Path(seen["conf"]).is_relative_to(venv)
    assert (Path(seen["conf"]) / "train.yaml").is_file()
    assert not [p for p in seen["path"] if p and Path(p).resolve().is_relative_to(REPO / "src")]
    assert not [f for f in seen["finders"] if "editable" in f.lower()]

    help_out = _ok(_run(["trainyard", "--help"], cwd=installed["tmp"], env=installed["env"]))
    assert "status" in help_out.stdout


def test_console_script_trains_from_the_shipped_configs(installed):
    root = installed["tmp"] / "plain"
    _train(installed, root, "trainer.max_epochs=1")
    run = _completed_run(root, "default")
    assert run.is_relative_to(root)


def test_config_dir_adds_a_users_experiment(installed):
    user_conf = installed["tmp"] / "user_conf"
    (user_conf / "experiment").mkdir(parents=True)
    (user_conf / "experiment" / "from_user_dir.yaml").write_text(
        "# @package _global_\n"
        "defaults:\n"
        "  - override /model: mlp\n"
        "name: from_user_dir\n"
        "model:\n"
        "  hidden: [17]\n"
        "trainer:\n"
        "  max_epochs: 1\n"
    )
    root = installed["tmp"] / "user"
    _train(installed, root, "--config-dir", str(user_conf), "experiment=from_user_dir")
    run = _completed_run(root, "from_user_dir")
    frozen = (run / "config.yaml").read_text()
    assert "trainyard.models.MLP" in frozen and "17" in frozen


def test_the_kubernetes_backend_renders_and_runs_from_the_wheel(installed):
    """The manifests come from k8s/ shipped inside the package; the pods run trainyard-pod
    from the installed package (here as processes: cluster=k8s_local)."""
    names = zipfile.ZipFile(installed["wheel"]).namelist()
    shipped = {n.removeprefix("trainyard/k8s/") for n in names if n.startswith("trainyard/k8s/")}
    expected = {p.relative_to(REPO / "k8s").as_posix() for p in (REPO / "k8s").rglob("*.yaml")}
    assert "base/job.yaml" in expected and expected <= shipped
    root = installed["tmp"] / "k8s"
    root.mkdir()
    env = {**installed["env"], "KUBECONFIG": str(root / "none")}
    dry = _ok(_run(["trainyard", "submit", "--dry-run", "cluster=k8s",
                    "cluster.image=registry.example/trainyard:v1"], cwd=root, env=env))  # fmt: skip
    assert dry.stdout.count("\nkind: Job\n") == 1
    _ok(_run(["trainyard", "submit", "cluster=k8s_local", "trainer.max_epochs=1"], cwd=root,
             env=env))  # fmt: skip
    deadline = time.monotonic() + 150
    while True:
        states = list((root / "outputs").rglob("k8s/*/state.json"))
        trials = json.loads(states[0].read_text())["trials"] if states else []
        if trials and trials[0] not in ("PENDING", "RUNNING"):
            break
        assert time.monotonic() < deadline, trials
        time.sleep(0.5)
    assert trials == ["COMPLETED"]
    _completed_run(root, "default")
