"""What changes where GPUs are visible, tried without one: torch is made to report GPUs
(tests/helpers/pretend_gpus), so every decision that asks how many there are is taken as
on a GPU machine, while any use of one fails ("no NVIDIA driver"). A CPU run that passes
here never touched a GPU; a GPU request is checked against the GPUs reported.

The GPU runs themselves are in test_gpu.py, for machines that have one.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.conftest import pretend_gpus, run_dirs, train_cli

pytestmark = pytest.mark.slow

TINY = ["trainer.max_epochs=1", "trainer.limit_train_batches=4", "trainer.limit_val_batches=2",
        "trainer.limit_test_batches=2"]  # fmt: skip


def _ranks(run) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted((run / "ranks").glob("rank?.json"))]


@pytest.mark.parametrize(("visible", "seen"), [("0,1", "True 2"), ("1", "True 1"),
                                               ("", "False 0")])  # fmt: skip
def test_the_pretended_gpus_are_what_torch_reports(tmp_path, visible, seen):
    probe = "import torch; print(torch.cuda.is_available(), torch.cuda.device_count())"
    env = {**os.environ, **pretend_gpus(2), "CUDA_VISIBLE_DEVICES": visible}
    out = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True,
                         timeout=120)  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == seen


def test_ddp_with_the_auto_accelerator_asks_the_gpus_and_names_the_cpu_fix(tmp_path):
    out = train_cli(["trainer=ddp", *TINY], tmp_path, env=pretend_gpus(1))  # 2 ranks, 1 GPU
    assert out.returncode == 2, out.stderr[-2000:]
    assert "trainer.devices=2 but this machine has 1 GPUs (trainer.accelerator=auto" in out.stderr
    assert "trainer.accelerator=cpu for CPU processes" in out.stderr
    assert not list(tmp_path.rglob("*.ckpt"))


def test_cpu_ddp_on_a_gpu_machine_never_touches_a_gpu(tmp_path):
    args = ["trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2", *TINY]
    out = train_cli(args, tmp_path, env=pretend_gpus(2))
    assert out.returncode == 0, out.stderr[-3000:]
    [run] = run_dirs(tmp_path)
    assert [(r["accelerator"], r["backend"]) for r in _ranks(run)] == [("cpu", "gloo")] * 2
