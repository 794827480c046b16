"""GPU runs. They skip cleanly on machines without CUDA GPUs (CI has none)."""

import functools
import json

import pytest

from tests.conftest import run_dirs, train_cli
from tests.helpers.run_if import RunIf
from tests.helpers.trainers import quiet_trainer
from tests.unit.test_task import _NormRecordingSGD, _task
from trainyard.data import DigitsDataModule

pytestmark = pytest.mark.slow


@RunIf(min_gpus=1)
def test_single_gpu_run_trains_in_mixed_precision(tmp_path):
    out = train_cli(["trainer=gpu", "trainer.max_epochs=3"], tmp_path)
    assert out.returncode == 0, out.stderr
    [run] = run_dirs(tmp_path)
    result = json.loads((run / "result.json").read_text())
    assert result["metrics"]["test/acc"] > 0.9
    assert "bf16-mixed" in (run / "config.yaml").read_text()


@RunIf(min_gpus=2)
def test_two_gpu_ddp_ranks_agree(tmp_path):
    args = ["trainer=ddp", "trainer.accelerator=gpu", "trainer.devices=2", "trainer.max_epochs=2"]
    out = train_cli(args, tmp_path)
    assert out.returncode == 0, out.stderr
    [run] = run_dirs(tmp_path)
    ranks = [json.loads(p.read_text()) for p in sorted((run / "ranks").glob("rank?.json"))]
    assert len(ranks) == 2 and ranks[0]["weights"] == ranks[1]["weights"]
    assert "backend: null" in (run / "config.yaml").read_text()  # nccl chosen at run time


@RunIf(min_gpus=1)
def test_fp16_clipping_bounds_the_unscaled_gradients_on_gpu():
    # the CPU unit tests reach the GradScaler through the plugin; this is the real
    # Trainer(precision="16-mixed") path with CUDA's scaler
    task = _task(gradient_clip_val=0.01)
    task.optimizer_factory = functools.partial(_NormRecordingSGD, lr=0.1)
    trainer = quiet_trainer(accelerator="gpu", devices=1, precision="16-mixed", max_steps=6)
    trainer.fit(task, datamodule=DigitsDataModule(batch_size=32))
    assert trainer.precision_plugin.scaler.get_scale() > 1
    [optimizer] = trainer.optimizers
    assert optimizer.seen  # steps the scaler skipped for overflow record nothing
    assert all(norm == pytest.approx(0.01, rel=1e-3) for norm, _ in optimizer.seen)
