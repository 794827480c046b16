"""Image build times and sizes, measured side by side in one run (needs podman).

- a cold build (no cache) against a warm rebuild with nothing changed and a rebuild after a
  one-line source change: target < 30 s for the one-line change, with the dependency layer
  reused (no reinstall);
- the image's size against the installed environment plus the base: target within 10% (the
  environment exists once in the image, not copied into a second layer).

The source change is made in a copy of the build context, never in the checkout.

Usage: python benchmarks/image_build.py [--variant cpu] [--pip-from-host] [--torch-index URL]
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import REPO, report

sys.path.insert(0, str(REPO / "src"))
from trainyard import image


def _build(cmd: list[str], context: Path, *extra: str) -> tuple[float, str]:
    start = time.perf_counter()
    out = subprocess.run([*cmd[:2], *extra, *cmd[2:]], cwd=context, capture_output=True,
                         text=True, check=True)  # fmt: skip
    return time.perf_counter() - start, out.stdout + out.stderr


def _size(name: str) -> int:
    return int(json.loads(subprocess.check_output(["podman", "image", "inspect", name]))[0]["Size"])


def _du(name: str, path: str) -> int:
    out = subprocess.check_output(["podman", "run", "--rm", "--entrypoint=du", name, "-sb", path])
    return int(out.split()[0])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--variant", default="cpu", choices=sorted(image.VARIANTS))
    parser.add_argument("--pip-from-host", action="store_true")
    parser.add_argument("--torch-index", default=None)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        context = Path(tmp) / "context"
        shutil.copytree(
            REPO,
            context,
            symlinks=True,
            ignore=shutil.ignore_patterns(".venv", "outputs", "data", "__pycache__"),
        )
        name = "localhost/trainyard:bench"
        cmd = image.build_command(
            context,
            args.variant,
            name=name,
            torch_index=args.torch_index,
            pip_from_host=args.pip_from_host,
        )
        cold, _ = _build(cmd, context, "--no-cache")
        warm, _ = _build(cmd, context)
        with (context / "src" / "trainyard" / "errors.py").open("a") as f:
            f.write("# a one-line change\n")
        changed, log = _build(cmd, context)
        reinstalled = "-r /tmp/build/requirements.txt" in log and "Collecting torch" in log
        size, venv = _size(name), _du(name, "/opt/venv")
        base = _size(cmd[next(i for i, a in enumerate(cmd) if "BASE_IMAGE=" in a)].split("=", 2)[2])
    report(f"image build, variant {args.variant} (podman, 2 cores)", [
        ("cold build, no cache (s)", cold, ""),
        ("warm rebuild, nothing changed (s)", warm, f"{warm / cold:.3f}x of cold"),
        ("rebuild after a one-line source change (s)", changed, "target < 30 s"),
        ("dependencies reinstalled by that rebuild (1 = yes)", float(reinstalled), "target 0"),
        ("image size (GB)", size / 1e9, ""),
        ("installed environment /opt/venv (GB)", venv / 1e9, ""),
        ("base image (GB)", base / 1e9, ""),
        ("image / (environment + base)", size / (venv + base), "<= 1.10"),
    ])  # fmt: skip
    subprocess.run(["podman", "rmi", "-f", name], capture_output=True)


if __name__ == "__main__":
    main()
