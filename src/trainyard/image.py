"""Build, tag and push the training image (``make image``, ``make push``).

The tag is the git commit (``-dirty`` when tracked files have uncommitted changes; ``-cpu``
for the CPU twin), so a job script or manifest that names it runs the code it was built
from. The two variants differ only in the base image and build arguments of one
Dockerfile (``docker/Dockerfile``).

    python -m trainyard.image build [--variant cpu] [--dry-run] [--pip-from-host]
    python -m trainyard.image push --registry REGISTRY [--variant cpu]
    python -m trainyard.image tag [--variant cpu]

Standard library only: it runs before any environment is installed.
"""

from __future__ import annotations

import argparse
import ast
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from trainyard import __version__

REPO = "trainyard"  # the image's repository name; REGISTRY/trainyard:<tag> when pushed
SOURCE = "https://github.com/trainyard/trainyard"


@dataclass(frozen=True)
class Variant:
    base: str
    torch_index: str  # PyTorch's wheel index for torch; "" for the package index
    torch_local: str  # the local label of torch's build there ("cpu": torch==X+cpu)
    suffix: str


VARIANTS = {
    # torch 2.14.1's wheels are built against CUDA 13.0 and bundle its libraries: the base
    # only needs to bring the driver hooks (NVIDIA_* settings) of that CUDA release
    "cuda": Variant("docker.io/nvidia/cuda:13.0.2-base-ubuntu24.04", "", "", ""),
    "cpu": Variant(
        "docker.io/library/ubuntu:24.04", "https://download.pytorch.org/whl/cpu", "cpu", "-cpu"
    ),
}


class ImageError(Exception):
    pass


def _git(root: Path, *args: str) -> str:
    out = subprocess.run(["git", *args], cwd=root, capture_output=True, text=True)
    if out.returncode != 0:
        raise ImageError(f"git {' '.join(args)} failed in {root}: {out.stderr.strip()}")
    return out.stdout.strip()


# what the build context lets into the image (.dockerignore) and how it is built
IMAGE_PATHS = ("pyproject.toml", "README.md", "conf", "src", "docker", ".dockerignore")


def is_dirty(root: Path) -> bool:
    """What goes into the image differs from the commit: a changed tracked file, or an
    untracked one under src/ or conf/ (it would be built in; git-ignored files are not)."""
    status = _git(root, "status", "--porcelain", "--untracked-files=all", "--", *IMAGE_PATHS)
    return bool(status)


def tag(root: Path, variant: str = "cuda", dirty: bool | None = None) -> str:
    commit = _git(root, "rev-parse", "--short=12", "HEAD")
    dirty = is_dirty(root) if dirty is None else dirty
    return f"{commit}{'-dirty' if dirty else ''}{VARIANTS[variant].suffix}"


def source_checkout() -> Path | None:
    """The git checkout images are built from: $TRAINYARD_SOURCE (trainyard installed from
    a wheel, the images built from a checkout), else the one this trainyard runs from (an
    editable install), if it is one."""
    given = os.environ.get("TRAINYARD_SOURCE")
    root = Path(given) if given else Path(__file__).resolve().parents[2]
    return root if (root / "docker" / "Dockerfile").exists() and (root / ".git").exists() else None


def reference(image: str, variant: str = "cuda", allow_dirty: bool = False,
              root: Path | None = None) -> str:  # fmt: skip
    """The image a job runs. An image named with a tag, a digest or as a file is taken as
    written; a bare repository (``registry.example.com/team/trainyard``) gets the tag of
    the checkout submitting it, which is what ``make image`` / ``make push`` built from
    it. A tree with uncommitted changes is refused unless ``allow_dirty``: its ``-dirty``
    image may hold other changes than the tree has now."""
    last = image.rsplit("/", 1)[-1]
    if image.startswith(("/", ".", "~")) or "@" in image or ":" in last:
        return image  # a tag, a digest, or a file (.sif, .sqsh) or sandbox directory
    root = root or source_checkout()
    if root is None:
        raise ImageError(
            f"{image} has no tag, and trainyard is not running from a git checkout to take "
            "one from: name the image with its tag (registry/trainyard:<tag>), or set "
            "TRAINYARD_SOURCE=<the checkout the images are built from>"
        )
    if is_dirty(root) and not allow_dirty:
        raise ImageError(
            f"{root} has uncommitted changes: no image built from a commit holds them. "
            "Commit, then make image && make push REGISTRY=...; or, to run the image "
            "`make image` built from this tree, cluster.container.allow_dirty=true"
        )
    return f"{image}:{tag(root, variant)}"


def find_engine() -> str:
    """podman where installed (rootless-friendly, no daemon), else docker."""
    for name in (os.environ.get("CONTAINER_ENGINE"), "podman", "docker"):
        if name and shutil.which(name):
            return name
    raise ImageError("no container engine: install podman (or docker)")


_HOST = "/run/host-pip"  # where the build sees pip.conf and the local files it names
_PIP_KEYS = ("index-url", "extra-index-url", "find-links", "cert", "client-cert",
             "constraint", "trusted-host")  # fmt: skip


def _pip_settings() -> dict[str, str]:
    """The settings pip uses here, as ``pip config list`` shows them: a setting from the
    environment (``:env:``) wins over the files', as it does for pip."""
    out = subprocess.run(
        [sys.executable, "-m", "pip", "config", "list"], capture_output=True, text=True
    ).stdout
    found: dict[str, tuple[bool, str]] = {}
    for line in out.splitlines():  # "global.cert='...'", ":env:.cert='...'"
        key, _, value = line.partition("=")
        name = key.rsplit(".", 1)[-1]
        from_env = key.startswith(":env:")
        if name in _PIP_KEYS and (from_env or not found.get(name, (False, ""))[0]):
            found[name] = (from_env, str(ast.literal_eval(value)))
    return {name: value for name, (_, value) in found.items()}


def host_pip_settings(conf: Path) -> list[str]:
    """Write this machine's pip settings (mirror, find-links, CA bundle, constraints) to
    ``conf`` as a pip.conf whose local paths point under /run/host-pip, and return the
    read-only mounts for the build: the pip.conf and the files it names. A site behind a
    TLS proxy or with its own package mirror builds as it installs; nothing of it is
    kept in the image or its history."""
    lines, mounts = ["[global]"], {f"{conf}:{_HOST}/pip.conf:ro"}
    for name, value in sorted(_pip_settings().items()):
        words = []
        for word in value.split():
            local = Path(word.removeprefix("file://"))
            if not (local.is_absolute() and local.exists()):
                words.append(word)
                continue
            # an index's pages link to files beside it: mount the index's parent
            mount = local.parent if name.endswith("index-url") or local.is_file() else local
            mounts.add(f"{mount}:{_HOST}{mount}:ro")
            words.append(word.replace(str(local), f"{_HOST}{local}", 1))
        lines.append(f"{name} = {' '.join(words)}")
    conf.write_text("\n".join(lines) + "\n")
    return sorted(mounts)


def build_command(
    root: Path,
    variant: str = "cuda",
    name: str | None = None,
    base: str | None = None,
    torch_index: str | None = None,
    pip_from_host: bool = False,
    engine: str | None = None,
) -> list[str]:
    """The exact build command (``engine``: podman or docker; found on PATH if not given)."""
    v, dirty = VARIANTS[variant], is_dirty(root)
    name = name or f"{REPO}:{tag(root, variant, dirty)}"
    index = v.torch_index if torch_index is None else torch_index
    build_args = {
        "BASE_IMAGE": base or v.base,
        "TORCH_INDEX_URL": index,
        "TORCH_LOCAL": v.torch_local if index else "",  # the label is that index's
        "VARIANT": variant,
        "VERSION": __version__,
        "REVISION": _git(root, "rev-parse", "HEAD") + ("-dirty" if dirty else ""),
        "SOURCE": SOURCE,
    }
    cmd = [engine or find_engine(), "build", "-f", "docker/Dockerfile", "-t", name]
    cmd += ["--network", "host"]
    cmd += [f"--build-arg={k}={val}" for k, val in build_args.items()]
    if pip_from_host:
        if Path(cmd[0]).name != "podman":
            raise ImageError("--pip-from-host needs podman: docker build mounts no volumes")
        conf = Path(tempfile.gettempdir()) / f"trainyard-pip-{os.getuid()}.conf"
        cmd += [f"--volume={m}" for m in host_pip_settings(conf)]
    return [*cmd, "."]


def push_commands(
    root: Path, registry: str, variant: str = "cuda", engine: str | None = None
) -> list[list[str]]:
    local = f"{REPO}:{tag(root, variant)}"
    remote = f"{registry.rstrip('/')}/{local}"
    engine = engine or find_engine()
    return [[engine, "tag", local, remote], [engine, "push", remote]]


def _run(cmd: list[str], dry_run: bool, root: Path) -> None:
    print(shlex.join(cmd), flush=True)
    if not dry_run:
        subprocess.run(cmd, cwd=root, check=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m trainyard.image",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("action", choices=["build", "push", "tag"])
    parser.add_argument("--variant", choices=sorted(VARIANTS), default="cuda")
    parser.add_argument("--registry", help="push: where to (e.g. registry.example.com/team)")
    parser.add_argument("--base", help="build: another base image (Debian or Ubuntu)")
    parser.add_argument("--torch-index", help="build: PyTorch wheel index ('' for PyPI's)")
    parser.add_argument("--pip-from-host", action="store_true",
                        help="build: pass this machine's pip mirror and CA settings")  # fmt: skip
    parser.add_argument("--dry-run", action="store_true", help="print the commands only")
    args = parser.parse_args(argv)
    root = Path.cwd()
    try:
        if not (root / "docker" / "Dockerfile").exists():
            raise ImageError(f"no docker/Dockerfile in {root}: run from the trainyard checkout")
        if args.action == "tag":
            print(f"{REPO}:{tag(root, args.variant)}")
        elif args.action == "build":
            cmd = build_command(
                root,
                args.variant,
                base=args.base,
                torch_index=args.torch_index,
                pip_from_host=args.pip_from_host,
            )
            _run(cmd, args.dry_run, root)
            print(f"{'would build' if args.dry_run else 'built'} {cmd[cmd.index('-t') + 1]}")
        else:
            if not args.registry:
                parser.error("push needs --registry (make push REGISTRY=...)")
            for cmd in push_commands(root, args.registry, args.variant):
                _run(cmd, args.dry_run, root)
    except (ImageError, subprocess.CalledProcessError) as exc:
        print(f"trainyard image: {exc}", file=sys.stderr)
        return 2 if isinstance(exc, ImageError) else 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
