"""One preemption story: a signal stops training at a step boundary, last.ckpt holds that
step, the trial is marked preempted (exit 75) or interrupted (exit 130), and running it
again resumes to final weights bit-identical to a run that was never stopped."""

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import REPO, popen_train, run_dirs, train_cli
from trainyard.errors import EXIT_INTERRUPTED, EXIT_PREEMPTED

pytestmark = pytest.mark.slow

# the tests' helpers importable, in front of whatever PYTHONPATH the suite runs under (a
# checkout tested through another checkout's virtualenv keeps importing its own trainyard)
ENV = {"PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
# dropout (the CNN's default) and augmentation both draw random numbers every step
BASE = ["data.augment=true", "trainer.max_epochs=3", "callbacks.early_stopping=null"]
SIG = "+callbacks.sig._target_=tests.helpers.signals.SignalAt"
DDP = ["trainer=ddp", "trainer.accelerator=cpu", "signals.check_every_n_steps=3"]


def _status(run: Path) -> dict:
    return json.loads((run / "status.json").read_text())


def _final(run: Path) -> tuple[list[str], dict]:
    """Every rank's parameters and buffers, and the metrics."""
    ranks = [json.loads(p.read_text()) for p in sorted((run / "ranks").glob("rank?.json"))]
    metrics = json.loads((run / "result.json").read_text())["metrics"]
    # the learning-rate monitor logs at epoch start: an attempt that resumed mid-epoch
    # never saw one (its value is in the first attempt's logs)
    metrics = {k: v for k, v in metrics.items() if not k.startswith("lr-")}
    return [r["full_state"] for r in ranks], metrics


def _epoch_losses(run: Path) -> dict[str, str]:
    """train/loss_epoch of every epoch, from all the attempts' metrics.csv together."""
    found: dict[str, str] = {}
    for path in sorted((run / "logs").glob("version_*/metrics.csv")):
        with open(path) as f:
            for row in csv.DictReader(f):
                if row.get("train/loss_epoch"):
                    assert row["epoch"] not in found, f"epoch {row['epoch']} logged twice"
                    found[row["epoch"]] = row["train/loss_epoch"]
    return found


def _reference(tmp_path, extra: list[str]) -> tuple[tuple, dict]:
    out = train_cli([*BASE, *extra, "name=ref"], tmp_path, env=ENV)
    assert out.returncode == 0, out.stderr
    [run] = [r for r in run_dirs(tmp_path) if "/ref/" in str(r)]
    return _final(run), _epoch_losses(run)


@pytest.mark.parametrize(
    ("extra", "stop_at"),
    [
        pytest.param([], ["+callbacks.sig.step=30"], id="one-device-mid-epoch"),
        pytest.param([], ["+callbacks.sig.epoch=1"], id="one-device-epoch-boundary"),
        # the signal during the epoch's last step (21 batches an epoch): the stop waits for
        # the epoch's end (validation, scheduler, epoch loss), which a resume would skip
        pytest.param([], ["+callbacks.sig.step=21"], id="one-device-last-batch"),
        pytest.param(
            ["trainer.accumulate_grad_batches=3"],
            ["+callbacks.sig.batch=7"],  # between two optimizer steps
            id="one-device-accumulating",
        ),
        # a checkpoint's weights in the dtype they trained in, restored without rounding
        pytest.param(["trainer.precision=64-true"], ["+callbacks.sig.step=30"], id="64-true"),
        pytest.param(
            ["trainer.precision=bf16-true"], ["+callbacks.sig.epoch=1"], id="bf16-true-epoch"
        ),
        pytest.param(
            DDP, ["+callbacks.sig.step=25", "+callbacks.sig.target=parent"], id="ddp-mid-epoch"
        ),
        pytest.param(
            DDP, ["+callbacks.sig.epoch=0", "+callbacks.sig.target=parent"], id="ddp-epoch-boundary"
        ),
    ],
)
def test_stopped_and_resumed_run_ends_bit_identical(tmp_path, extra, stop_at):
    reference, reference_losses = _reference(tmp_path, [*extra, SIG])
    args = [*BASE, *extra, SIG, *stop_at, "name=stopped"]

    stopped = train_cli(args, tmp_path, env=ENV)
    assert stopped.returncode == EXIT_PREEMPTED, stopped.stderr
    assert "Traceback" not in stopped.stderr
    [run] = [r for r in run_dirs(tmp_path) if "/stopped/" in str(r)]
    status = _status(run)
    assert status["state"] == "preempted" and status["attempt"] == 1
    assert "SIGTERM" in status["history"][-1]["reason"]
    assert (run / "checkpoints" / "last.ckpt").exists() and not (run / "result.json").exists()
    # the run's own log says why it ended, and how to go on
    last_line = (run / "train.log").read_text().splitlines()[-1]
    assert "SIGTERM received: stopped" in last_line and "same command again" in last_line

    resumed = train_cli(args, tmp_path, env=ENV)
    assert resumed.returncode == 0, resumed.stderr
    assert "not resumable" not in resumed.stderr  # Lightning's replaying-epoch warning
    status = _status(run)
    assert status["state"] == "completed" and status["attempt"] == 2
    assert [h["state"] for h in status["history"]] == [
        "created", "running", "preempted", "running", "completed",
    ]  # fmt: skip
    assert _final(run) == reference
    # every epoch's mean training loss reached the logs once, as in the run never stopped
    assert _epoch_losses(run) == reference_losses and len(reference_losses) == 3


def _wait_running(tmp_path: Path, proc, timeout: float = 120) -> Path:
    deadline = time.monotonic() + timeout
    while True:
        runs = run_dirs(tmp_path)
        if runs and _status(runs[0])["state"] == "running":
            time.sleep(1.5)  # well into the training loop
            return runs[0]
        assert proc.poll() is None, proc.communicate()[1]
        assert time.monotonic() < deadline, "the run never started"
        time.sleep(0.05)


@pytest.mark.parametrize(
    ("signum", "code", "state", "extra"),
    [
        pytest.param(signal.SIGTERM, EXIT_PREEMPTED, "preempted", [], id="sigterm"),
        pytest.param(signal.SIGUSR1, EXIT_PREEMPTED, "preempted", [], id="sigusr1"),
        pytest.param(signal.SIGINT, EXIT_INTERRUPTED, "interrupted", [], id="ctrl-c"),
        pytest.param(signal.SIGTERM, EXIT_PREEMPTED, "preempted", DDP, id="ddp-sigterm"),
        pytest.param(signal.SIGINT, EXIT_INTERRUPTED, "interrupted", DDP, id="ddp-ctrl-c"),
    ],
)
def test_a_signal_at_any_moment_is_recorded_and_never_a_success(
    tmp_path, signum, code, state, extra
):
    args = ["trainer.max_epochs=400", "callbacks.early_stopping=null", *extra]
    proc = popen_train(args, tmp_path)
    run = _wait_running(tmp_path, proc)
    proc.send_signal(signum)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == code, stderr
    assert "Traceback" not in stderr
    assert stderr.count("received: stopped") == 1, stderr  # once, by whoever started the ranks
    status = _status(run)
    assert status["state"] == state
    assert not (run / "result.json").exists()
    last = run / "checkpoints" / "last.ckpt"
    assert last.exists()
    # the checkpoint holds the step where training stopped, not an older epoch
    import torch

    ckpt = torch.load(last, map_location="cpu", weights_only=True)
    ranks = json.loads((run / "ranks" / "rank0.json").read_text())
    assert ckpt["global_step"] > 0 and "weights" not in ranks  # stopped before fit ended


@pytest.mark.parametrize("signum", [signal.SIGUSR1, signal.SIGTERM], ids=["sigusr1", "sigterm"])
def test_a_stop_signal_blocked_by_the_launcher_still_stops_training(tmp_path, signum):
    """A signal mask is inherited through fork and exec, and Python leaves it as it finds
    it: a launcher that blocks SIGUSR1 (an agent, a thread that forks) would otherwise
    leave Slurm's warning signal pending, and the job would be killed at its time limit."""
    blocked = {signal.SIGUSR1, signal.SIGUSR2, signal.SIGTERM}
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, blocked)
    try:  # what this process blocks when it forks, the trainyard-train process inherits
        proc = popen_train(["trainer.max_epochs=400", "callbacks.early_stopping=null"], tmp_path)
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)
    run = _wait_running(tmp_path, proc)
    proc.send_signal(signum)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == EXIT_PREEMPTED, stderr
    assert _status(run)["state"] == "preempted"
    assert (run / "checkpoints" / "last.ckpt").exists()


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["sigterm", "ctrl-c"])
def test_a_signal_while_the_ranks_start_is_a_stop_not_a_success(tmp_path, signum):
    proc = popen_train([*DDP, "trainer.max_epochs=50"], tmp_path)
    deadline = time.monotonic() + 120
    while not run_dirs(tmp_path):  # prepared: the ranks are being started right now
        assert proc.poll() is None and time.monotonic() < deadline
        time.sleep(0.01)
    proc.send_signal(signum)
    _, stderr = proc.communicate(timeout=120)
    expected = EXIT_PREEMPTED if signum == signal.SIGTERM else EXIT_INTERRUPTED
    assert proc.returncode == expected, stderr
    [run] = run_dirs(tmp_path)
    assert _status(run)["state"] in ("preempted", "interrupted")
    assert not (run / "result.json").exists()


# a scheduler's SIGTERM in a finished process's last moment: sent by an object that Python
# destroys while it tears its modules down, after it has put back the signals' defaults
_SIGNAL_AT_SHUTDOWN = """
import os, signal, sys, time

class Late:
    def __del__(self, kill=os.kill, pid=os.getpid(), term=signal.SIGTERM, sleep=time.sleep):
        kill(pid, term)
        sleep(1)

late = Late()
from trainyard import train
sys.argv[0] = "trainyard-train"
train.main()
"""


@pytest.mark.parametrize("extra", [[], DDP], ids=["one-device", "ddp"])
def test_a_stop_signal_as_a_completed_run_exits_leaves_it_a_success(tmp_path, extra):
    """Status says completed and a re-run trains nothing: the exit code must say so too,
    not 143 (killed), which a scheduler would count against the job."""
    args = ["trainer.max_epochs=1", "trainer.limit_train_batches=4", *extra]
    env = {**os.environ, **ENV, "TRAINYARD_ROOT": str(tmp_path)}
    out = subprocess.run(
        [sys.executable, "-c", _SIGNAL_AT_SHUTDOWN, *args],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert out.returncode == 0, (out.returncode, out.stderr[-2000:])
    [run] = run_dirs(tmp_path)
    assert _status(run)["state"] == "completed"
