"""Make torch report ``TRAINYARD_PRETEND_GPUS`` CUDA devices, in every Python process.

What a test run on a GPU machine does differently happens where code asks torch how many
GPUs there are: Lightning's ``accelerator="auto"``, trainyard's preflight, a backend
deciding what a trial may use. This machine and CI have no GPU, so those branches would
go untried until someone runs the suite on one. With this folder first on ``PYTHONPATH``
(``sitecustomize`` is imported by every interpreter at start, so subprocesses, Slurm
tasks, Ray workers and local pods get it too), torch answers as a machine with that many
GPUs would, and as the devices ``CUDA_VISIBLE_DEVICES`` leaves visible would: an empty
value hides them all, which is how a scheduler keeps a trial off GPUs it did not allocate.

Nothing can run on these devices: a test that touches one fails with CUDA's "no NVIDIA
driver" error, which is the point. A test that does not ask for a GPU must not touch one.

    PYTHONPATH=$PWD/tests/helpers/pretend_gpus TRAINYARD_PRETEND_GPUS=1 pytest -m "not gpu"

What it cannot be: only ``torch.cuda``'s answers change (what Lightning and trainyard ask);
``torch.accelerator`` says "none", so torch's own CPU code (an optimizer's graph-capture
check, ``pin_memory``) stays on the CPU where a real GPU machine would quietly create a CUDA
context. It also stands in for any other ``sitecustomize`` (Debian's system Python has one).
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import os
import sys


def _visible(pretended: int) -> int:
    listed = os.environ.get("CUDA_VISIBLE_DEVICES")
    if listed is None:
        return pretended
    # CUDA stops at the first entry that names no device it has
    count = 0
    for entry in listed.split(","):
        if not entry.strip().isdigit() or int(entry) >= pretended:
            break
        count += 1
    return count


def _pretend(torch) -> None:
    count = lambda: _visible(int(os.environ.get("TRAINYARD_PRETEND_GPUS", "0")))  # noqa: E731
    torch.cuda.is_available = lambda: count() > 0
    torch.cuda.device_count = count
    # torch's own CPU paths (the optimizers' graph-capture check) ask for the current
    # accelerator; on a GPU machine that answer costs nothing for CPU tensors, here it
    # would initialise CUDA, so it is "none" as on a CPU-only machine
    torch.accelerator.current_accelerator = lambda check_available=False: None


class _AfterTorch(importlib.abc.MetaPathFinder):
    """Patches torch once it is imported (importing it here would slow every process)."""

    def find_spec(self, name, path, target=None):
        if name != "torch":
            return None
        sys.meta_path.remove(self)
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        if spec is None or spec.loader is None:
            return spec
        load = spec.loader.exec_module

        def exec_module(module):
            load(module)
            _pretend(module)

        spec.loader.exec_module = exec_module
        return spec


if os.environ.get("TRAINYARD_PRETEND_GPUS"):
    sys.meta_path.insert(0, _AfterTorch())
