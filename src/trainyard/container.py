"""The image's entrypoint (``trainyard-entry``): say what runs, check what the container was
given, then become the command.

A container that is started wrong (an output volume its user cannot write, a config
directory that was not mounted, a driver too old for the image's CUDA) would otherwise fail
minutes later, deep inside a traceback, or on one node of many. These checks take
milliseconds and import nothing heavy: versions are read from package metadata and
``torch/version.py``, not by importing torch.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import sys
import tempfile
from pathlib import Path

from trainyard.errors import EXIT_CONFIG

# Oldest Linux driver each CUDA major release runs on (minor-version compatibility:
# CUDA release notes, "CUDA Toolkit and Corresponding Driver Versions").
MIN_DRIVER = {11: "450.80.02", 12: "525.60.13", 13: "580.65.06"}

# commands that train: the checks below apply to them (a shell or `trainyard status`
# started in the image is left alone)
_TRAINING = ("trainyard-train", "torchrun", "trainyard-pod")

_NVIDIA_PROC = Path("/proc/driver/nvidia/version")
# flags that only print (help, config, completion): nothing to check for them
_INFO_FLAGS = {"--help", "-h", "--hydra-help", "--info", "-i", "--cfg", "-c", "-sc",
               "--shell-completion", "--version"}  # fmt: skip


class EntryError(Exception):
    """The container was started in a way that cannot work; the message names the fix."""


def _torch_cuda() -> str | None:
    """torch's CUDA version from ``torch/version.py`` (importing torch takes seconds)."""
    spec = importlib.util.find_spec("torch")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / "version.py"
    values: dict = {}
    try:
        exec(compile(path.read_text(), str(path), "exec"), values)  # plain assignments only
    except OSError:
        return None
    return values.get("cuda")


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def _nccl() -> str | None:
    for dist in importlib.metadata.distributions():
        name = dist.metadata["Name"] or ""
        if name.lower().replace("_", "-").startswith("nvidia-nccl"):
            return dist.version
    return None


def driver_version(proc: Path = _NVIDIA_PROC) -> str | None:
    """The NVIDIA kernel driver's version, None where the container sees no driver."""
    try:
        text = proc.read_text()
    except OSError:
        return None
    for word in text.split():
        parts = word.split(".")
        if len(parts) >= 2 and all(p.isdigit() for p in parts):
            return word
    return None


def _as_tuple(version: str) -> tuple[int, ...]:
    return tuple(int(p) for p in version.split(".") if p.isdigit())


def check_driver(driver: str | None, cuda: str | None) -> None:
    """Refuse a driver older than the image's CUDA needs (CUDA would only say 'no GPU')."""
    if driver is None or cuda is None:
        return
    needed = MIN_DRIVER.get(_as_tuple(cuda)[0])
    if needed and _as_tuple(driver) < _as_tuple(needed):
        raise EntryError(
            f"the NVIDIA driver {driver} is too old for CUDA {cuda} in this image "
            f"(it needs {needed} or newer)",
            "run on nodes with a newer driver, or build the image on an older CUDA base: "
            'make image IMAGE_ARGS="--base <the nvidia/cuda base of your driver\'s CUDA>"',
        )


def check_writable(directory: Path) -> None:
    """The output root must exist and take files from this container's user."""
    who = f"uid {os.getuid()}"
    fix = (
        f"mount a directory writable by {who} at {directory}: podman run -v DIR:{directory}:U "
        f"(chowns it to the container's user), chown {os.getuid()} DIR on the host, or "
        "Kubernetes securityContext.fsGroup"
    )
    if not directory.is_dir():
        raise EntryError(f"the output directory {directory} does not exist", fix)
    try:
        with tempfile.NamedTemporaryFile(dir=directory, prefix=".trainyard-write-check-"):
            pass
    except OSError as exc:
        raise EntryError(
            f"the output directory {directory} is not writable by {who}: {exc.strerror}", fix
        ) from None


def warn_unmounted(directory: Path) -> str | None:
    """Runs written inside the container's own filesystem are lost with it: say so (a
    warning, not an error: a throwaway smoke test may mean it)."""
    if directory.is_mount() or os.environ.get("TRAINYARD_EPHEMERAL_OK") == "1":
        return None
    return (
        f"trainyard-entry: warning: {directory} is not a mounted volume: the run directories "
        "written there are lost when the container goes (podman run -v DIR:"
        f"{directory}:U ...; TRAINYARD_EPHEMERAL_OK=1 silences this)"
    )


def _config_dirs(argv: list[str]) -> list[tuple[str, Path]]:
    """Config directories the command names (Hydra's --config-dir/-cd, TRAINYARD_CONF)."""
    found = []
    if os.environ.get("TRAINYARD_CONF"):
        found.append(("TRAINYARD_CONF", Path(os.environ["TRAINYARD_CONF"])))
    for i, arg in enumerate(argv):
        for flag in ("--config-dir", "-cd"):
            if arg == flag and i + 1 < len(argv):
                found.append((flag, Path(argv[i + 1])))
            elif arg.startswith(f"{flag}="):
                found.append((flag, Path(arg.split("=", 1)[1])))
    return found


def check_config_dirs(argv: list[str]) -> None:
    """Each named config directory exists, and the container's user can read every
    directory and YAML file in it (Hydra would fail on the first one it opens)."""
    for source, directory in _config_dirs(argv):
        if not directory.is_dir():
            raise EntryError(
                f"{source} names {directory}, which is not a directory in the container",
                f"mount your config directory there (-v <host dir>:{directory}:ro)",
            )
        for path in [directory, *sorted(directory.rglob("*"))]:
            readable = os.R_OK | (os.X_OK if path.is_dir() else 0)
            if (path.is_dir() or path.suffix in (".yaml", ".yml")) and not os.access(
                path, readable
            ):
                raise EntryError(
                    f"{source}: uid {os.getuid()} cannot read {path}",
                    "make the mounted config directory readable (chmod -R a+rX on the host)",
                )
            if not os.access(path.parent, os.X_OK):
                break  # below an unreadable directory: reported above


def describe(driver: str | None, cuda: str | None) -> str:
    image = os.environ.get("TRAINYARD_IMAGE_REVISION", "unknown")
    variant = os.environ.get("TRAINYARD_IMAGE_VARIANT", "?")
    return (
        f"trainyard {_version('trainyard')} (image {image}, {variant}); "
        f"python {sys.version.split()[0]}; torch {_version('torch')}; "
        f"CUDA {cuda or 'none'}; NCCL {_nccl() or 'none'}; "
        f"NVIDIA driver {driver or 'none visible'}"
    )


def _is_cluster_task(argv: list[str]) -> bool:
    """One rank started by a scheduler in the image (Slurm through pyxis or apptainer):
    its paths and user are the site's, so only the driver is checked."""
    return "submitit.core._submit" in argv


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv) or ["trainyard-train"]
    driver, cuda = driver_version(), _torch_cuda()
    print(f"trainyard-entry: {describe(driver, cuda)}", file=sys.stderr, flush=True)
    try:
        if Path(argv[0]).name in _TRAINING and not set(argv) & _INFO_FLAGS:
            check_driver(driver, cuda)
            check_config_dirs(argv)
            output = Path(os.environ.get("TRAINYARD_ROOT", os.getcwd()))
            check_writable(output)
            warning = warn_unmounted(output)
            if warning:
                print(warning, file=sys.stderr, flush=True)
        elif _is_cluster_task(argv):
            check_driver(driver, cuda)
    except EntryError as exc:
        message, fix = exc.args
        print(f"trainyard-entry: {message}\n  fix: {fix}", file=sys.stderr)
        sys.exit(EXIT_CONFIG)
    try:
        os.execvp(argv[0], argv)
    except OSError as exc:
        print(f"trainyard-entry: cannot run {argv[0]}: {exc.strerror}", file=sys.stderr)
        sys.exit(127 if isinstance(exc, FileNotFoundError) else 126)


if __name__ == "__main__":
    main()
