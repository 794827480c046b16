"""DDP on CPU (gloo): trainyard starts the ranks from the frozen config; Lightning never
relaunches the script, so every rank trains the same trial, in a single run and in -m."""

import json
import os
import signal
import time
from pathlib import Path

import pytest

from tests.conftest import popen_train, run_dirs, train_cli
from trainyard.errors import EXIT_FAILED
from trainyard.rundir import trial_key

pytestmark = pytest.mark.slow


def _ranks(run: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted((run / "ranks").glob("rank?.json"))]


def test_two_ranks_train_one_trial_in_one_directory(tmp_path):
    out = train_cli(
        ["trainer=ddp", "trainer.accelerator=cpu", "trainer.max_epochs=2", "optimizer.lr=0.003"],
        tmp_path,
    )
    assert out.returncode == 0, out.stderr
    [run] = run_dirs(tmp_path)
    ranks = _ranks(run)
    assert len(ranks) == 2
    assert {r["host"] for r in ranks} and ranks[0]["pid"] != ranks[1]["pid"]
    assert all(lr == 0.003 for r in ranks for lr in r["lr"])
    assert ranks[0]["weights"] == ranks[1]["weights"]  # DDP kept them in sync
    assert ranks[0]["global_step"] == ranks[1]["global_step"] > 0
    result = json.loads((run / "result.json").read_text())
    assert result["world_size"] == 2
    assert not list(tmp_path.glob("outputs/**/multirun.yaml"))
    _test_metrics_count_every_sample_once(run, result["metrics"]["test/acc"])


def _test_metrics_count_every_sample_once(run: Path, reported: float) -> None:
    """The 2 ranks split the 359 test images 180/179 without padding: their test/acc is
    what one process gets from the same checkpoint on the same split, a count of 359."""
    import torch
    from hydra.utils import instantiate

    import trainyard
    from trainyard.freeze import load_frozen

    data = instantiate(load_frozen(run / "config.yaml").data)
    data.setup("test")
    x, y = data.test_set.tensors
    model = trainyard.load(run)
    with torch.inference_mode():
        correct = int((model.net(x).argmax(1) == y).sum())
    assert len(y) == 359 and abs(reported - correct / 359) < 1e-6, (reported, correct)


def test_sweep_of_ddp_trials_keeps_every_rank_on_its_trial(tmp_path):
    args = ["-m", "name=sw", "trainer=ddp", "trainer.accelerator=cpu", "trainer.max_epochs=1",
            "optimizer.lr=0.002,0.02"]  # fmt: skip
    out = train_cli(args, tmp_path)
    assert out.returncode == 0, out.stderr
    [sweep] = list((tmp_path / "outputs" / "sw" / "sweeps").iterdir())
    trials = sorted(p for p in sweep.iterdir() if p.is_dir())
    assert len(trials) == 2  # exactly the trials asked for, nothing else anywhere
    assert run_dirs(tmp_path) == trials
    seen = set()
    for trial in trials:
        frozen_lr = float(
            next(
                line.split(":")[1]
                for line in (trial / "config.yaml").read_text().splitlines()
                if line.startswith("  lr:")
            )
        )
        ranks = _ranks(trial)
        assert len(ranks) == 2
        assert all(lr == frozen_lr for r in ranks for lr in r["lr"])
        assert ranks[0]["weights"] == ranks[1]["weights"]
        seen.add(frozen_lr)
    assert seen == {0.002, 0.02}

    # relaunching the same sweep finds both trials completed and trains nothing
    again = train_cli(args, tmp_path)
    assert again.returncode == 0, again.stderr
    assert again.stderr.count("already completed") + again.stdout.count("already completed") == 2


def test_a_dead_rank_fails_the_run_quickly_and_names_the_rank(tmp_path):
    args = [
        "trainer=ddp",
        "trainer.accelerator=cpu",
        "trainer.max_epochs=500",
        "callbacks.early_stopping=null",
        "dist.timeout_s=60",
    ]
    runs = tmp_path / "outputs" / "default" / "runs"
    # an error file left by an earlier attempt must not be taken for this attempt's cause
    stale = runs / trial_key(args) / "ranks" / "rank1.error.json"
    stale.parent.mkdir(parents=True)
    stale.write_text(json.dumps({"message": "last.ckpt is corrupt (stale)", "exit_code": 2}))
    proc = popen_train(args, tmp_path)

    def rank1_training():
        info = next(runs.glob("*/ranks/rank1.json"), None)
        status = next(runs.glob("*/status.json"), None)
        return info and status and json.loads(status.read_text())["state"] == "running"

    deadline = time.monotonic() + 120
    while not rank1_training():
        assert proc.poll() is None, proc.stderr.read()
        assert time.monotonic() < deadline
        time.sleep(0.05)
    time.sleep(1.0)  # well into the training loop
    info_file = next(runs.glob("*/ranks/rank1.json"))
    os.kill(json.loads(info_file.read_text())["pid"], signal.SIGKILL)
    killed = time.monotonic()
    _, stderr = proc.communicate(timeout=120)
    took = time.monotonic() - killed
    assert proc.returncode == EXIT_FAILED
    assert "rank 1" in stderr and "SIGKILL" in stderr and "stale" not in stderr
    assert took < 30, f"took {took:.1f}s to notice the dead rank"
    status = json.loads((info_file.parents[1] / "status.json").read_text())
    assert status["state"] == "failed" and "rank 1" in status["history"][-1]["error"]


def test_ranks_started_by_torchrun_prepare_once_and_train_one_trial(tmp_path):
    """torchrun starts the driver on every rank: rank 0 prepares, the others wait for it."""
    import subprocess
    import sys

    args = ["trainer=ddp", "trainer.accelerator=cpu", "trainer.max_epochs=1"]
    torchrun = lambda *extra: subprocess.run(  # noqa: E731
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node=2",
            "--rdzv-backend=c10d",
            "--rdzv-endpoint=127.0.0.1:0",
            "--local-addr=127.0.0.1",
            "-m",
            "trainyard.train",
            *args,
            *extra,
        ],
        cwd=tmp_path,
        env={**os.environ, "TRAINYARD_ROOT": str(tmp_path), "PYTHONUNBUFFERED": "1"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    out = torchrun("resume=false")  # a fresh trial: rank 1 must not find rank 0's directory
    assert out.returncode == 0, out.stderr
    [run] = run_dirs(tmp_path)
    status = json.loads((run / "status.json").read_text())
    assert [h["state"] for h in status["history"]] == ["created", "running", "completed"]
    ranks = _ranks(run)
    assert len(ranks) == 2 and ranks[0]["weights"] == ranks[1]["weights"]
    again = torchrun()  # completed: every rank returns the stored result, none trains
    assert again.returncode == 0, again.stderr
    assert json.loads((run / "status.json").read_text()) == status
