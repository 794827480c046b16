"""The real entrypoint, as users run it: subprocesses, real files, real exit codes."""

import json
import os
import signal
import time
from pathlib import Path

import pytest

from tests.conftest import popen_train, run_dirs, train_cli
from trainyard.errors import EXIT_CONFIG

pytestmark = pytest.mark.slow


def _wait_for(predicate, timeout: float, proc=None) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"process ended early:\n{proc.stderr.read()}")
        if time.monotonic() > deadline:
            raise AssertionError("timed out waiting")
        time.sleep(0.05)


def _cli_status(root: Path) -> list[dict]:
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-m", "trainyard.cli", "status", "--json",
                          str(root / "outputs")], capture_output=True, text=True)  # fmt: skip
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def _status(run: Path) -> dict:
    return json.loads((run / "status.json").read_text())


def test_default_trains_to_95_percent_and_a_rerun_does_not_train_again(tmp_path):
    out = train_cli([], tmp_path)
    assert out.returncode == 0, out.stderr
    [run] = run_dirs(tmp_path)
    assert run == tmp_path / "outputs" / "default" / "runs" / "default"
    result = json.loads((run / "result.json").read_text())
    assert result["metrics"]["test/acc"] >= 0.95
    # the value reported is the best epoch's, whose checkpoint was tested
    assert result["monitor"] == "val/acc" and result["value"] == result["best_value"]
    assert result["value"] >= result["last_value"] == result["metrics"]["val/acc"]
    assert "${" not in (run / "config.yaml").read_text()
    provenance = json.loads((run / "provenance.json").read_text())
    assert provenance["packages"]["pytorch-lightning"] == "2.6.6"
    assert (run / "checkpoints" / "last.ckpt").exists()
    assert out.stdout.count("epoch 10/10") == 1  # plain progress lines when not on a terminal
    assert "\r" not in out.stdout
    _says_what_happened(out.stdout, run, result)

    ckpt_mtime = (run / "checkpoints" / "last.ckpt").stat().st_mtime_ns
    history = _status(run)["history"]
    again = train_cli([], tmp_path)
    assert again.returncode == 0, again.stderr
    assert "already completed" in again.stderr + again.stdout
    assert (run / "checkpoints" / "last.ckpt").stat().st_mtime_ns == ckpt_mtime
    assert _status(run)["history"] == history

    refused = train_cli(["resume=false"], tmp_path)
    assert refused.returncode == EXIT_CONFIG
    assert "resume=false" in refused.stderr and "name=<new name>" in refused.stderr


def test_killed_run_resumes_from_last_ckpt_and_a_corrupt_one_is_left_alone(tmp_path):
    args = ["trainer.max_epochs=25", "callbacks.early_stopping=null", "name=resume"]
    proc = popen_train(args, tmp_path)
    runs = tmp_path / "outputs" / "resume" / "runs"
    last = lambda: next(runs.glob("*/checkpoints/last.ckpt"), None)  # noqa: E731
    _wait_for(lambda: last() is not None, 120, proc)
    alive = _cli_status(tmp_path)
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    run = last().parents[1]
    assert _status(run)["state"] == "running"  # what a crash leaves behind
    # trainyard status tells the two apart: nobody holds the trial's lock any more
    assert alive[0]["state"] == "running"
    assert _cli_status(tmp_path)[0]["state"].startswith("running (no process: killed?")

    good = last().read_bytes()
    last().write_bytes(good[: len(good) // 2])  # as if the disk filled up mid-write
    broken = last().read_bytes()
    out = train_cli(args, tmp_path)
    assert out.returncode == EXIT_CONFIG
    assert "is corrupt" in out.stderr and "Traceback" not in out.stderr
    assert "mv " in out.stderr  # the fix
    assert last().read_bytes() == broken  # left exactly as it was
    # the run's own log says why this attempt trained nothing, and the fix
    log_tail = (run / "train.log").read_text().splitlines()[-3:]
    assert any("is corrupt" in line for line in log_tail), log_tail

    last().write_bytes(good)
    out = train_cli(args, tmp_path)
    assert out.returncode == 0, out.stderr
    status = _status(run)
    assert status["state"] == "completed" and status["attempt"] >= 2
    assert status["history"][-2]["resumed_from"].endswith("last.ckpt")
    result = json.loads((run / "result.json").read_text())
    assert result["epochs"] == 25
    # every attempt keeps its own metrics file, numbered as the attempts are
    versions = {p.parent.name for p in (run / "logs").glob("version_*/metrics.csv")}
    assert f"version_{status['attempt']}" in versions and "version_0" not in versions
    # a resume says so in a line of its own, and Lightning's warning about the checkpoint
    # directory (which holds this trial's own best.ckpt) is not repeated at every resume
    assert f"resuming (attempt {status['attempt']}) from last.ckpt" in out.stdout
    assert "exists and is not empty" not in out.stdout + out.stderr


@pytest.mark.parametrize(
    ("overrides", "says"),
    [
        (["trainer.max_epoch=2"], "Could not override 'trainer.max_epoch'"),
        (["optimizer=Adam"], "Could not find 'optimizer/Adam'"),
        (["model.hidden=[8"], "no viable alternative"),
        (["-m", "optimizer.lrr=1,2"], "Could not override 'optimizer.lrr'"),
    ],
)
def test_what_hydra_refuses_exits_2(tmp_path, overrides, says):
    out = train_cli(overrides, tmp_path)
    assert out.returncode == EXIT_CONFIG and says in out.stderr, out.stderr
    assert not list((tmp_path / "outputs").glob("*/runs/*"))


def test_unknown_option_lists_the_valid_choices(tmp_path):
    out = train_cli(["model=transformer"], tmp_path)
    assert out.returncode == EXIT_CONFIG
    assert "Could not find 'model/transformer'" in out.stderr
    for choice in ("cnn", "mlp", "resnet18", "rnn"):
        assert choice in out.stderr
    assert not (tmp_path / "outputs").exists()


def test_wrong_type_exits_2_with_the_fix_and_no_traceback(tmp_path):
    out = train_cli(["data.batch_size=big"], tmp_path)
    assert out.returncode == EXIT_CONFIG
    assert "data.batch_size must be an integer" in out.stderr
    assert "fix: data.batch_size=64" in out.stderr
    assert "Traceback" not in out.stderr


@pytest.mark.parametrize(
    ("overrides", "says"),
    [
        (["+model.foo=1"], "unexpected keyword argument 'foo'"),
        (["model=mlp", "model.hidden=abc"], "model refuses this config"),
        (["data.batch_size=big"], "data.batch_size must be an integer"),
    ],
)
def test_bad_input_exits_2_and_leaves_no_run_directory(tmp_path, overrides, says):
    out = train_cli(overrides, tmp_path)
    assert out.returncode == EXIT_CONFIG, out.stderr
    assert says in out.stderr and "fix:" in out.stderr and "Traceback" not in out.stderr
    assert not list((tmp_path / "outputs").glob("*/runs/*"))  # not even Hydra's .hydra/


@pytest.mark.parametrize("where", ["/proc/trainyard-cannot-write", "{tmp}/a-file/outputs"])
def test_unwritable_output_dir_fails_before_anything_starts(tmp_path, where):
    (tmp_path / "a-file").write_text("")
    out = train_cli([f"paths.output_dir={where.format(tmp=tmp_path)}"], tmp_path)
    assert out.returncode == EXIT_CONFIG
    assert "cannot write the output directory" in out.stderr
    assert "paths.output_dir=" in out.stderr


def test_model_that_does_not_fit_the_data(tmp_path):
    out = train_cli(["data=synthetic_sequence", "model=cnn"], tmp_path)
    assert out.returncode == EXIT_CONFIG
    assert "does not fit the data" in out.stderr and "rnn" in out.stderr
    assert run_dirs(tmp_path) == []  # refused while preparing: nothing was created


def test_missing_weights_file(tmp_path):
    out = train_cli(["model=resnet18", f"model.weights={tmp_path}/nope.pth"], tmp_path)
    assert out.returncode == EXIT_CONFIG
    assert "nope.pth does not exist" in out.stderr and "model.weights" in out.stderr


def test_missing_dataset_without_download(tmp_path):
    out = train_cli(["data=mnist", "data.download=false"], tmp_path)
    assert out.returncode == EXIT_CONFIG
    assert "mnist was not found" in out.stderr and "data.download=true" in out.stderr


def test_logger_none_trains_without_a_logger(tmp_path):
    out = train_cli(["logger=none", "trainer.max_epochs=1"], tmp_path)
    assert out.returncode == 0, out.stderr
    [run] = run_dirs(tmp_path)
    assert json.loads((run / "result.json").read_text())["value"] > 0
    assert not list(run.glob("logs/*/metrics.csv"))


def test_callbacks_none_writes_only_trainyards_own_checkpoint(tmp_path):
    from trainyard.preflight import CLASSIFIER_MONITORABLE

    out = train_cli(["callbacks=none", "trainer.max_epochs=1"], tmp_path)
    assert out.returncode == 0, out.stderr
    [run] = run_dirs(tmp_path)
    assert [p.relative_to(run) for p in run.rglob("*.ckpt")] == [Path("checkpoints/last.ckpt")]
    result = json.loads((run / "result.json").read_text())
    assert result["best_checkpoint"] is None and result["value"] == result["last_value"]
    # what preflight lets `monitor` name is what the classifier logs
    assert set(CLASSIFIER_MONITORABLE) <= set(result["metrics"])


def test_status_command_reads_run_directories(tmp_path):
    import subprocess
    import sys

    out = train_cli(["trainer.max_epochs=1", "name=st"], tmp_path)
    assert out.returncode == 0, out.stderr
    status = subprocess.run(
        [sys.executable, "-m", "trainyard.cli", "status", str(tmp_path / "outputs"), "--json"],
        capture_output=True,
        text=True,
        check=True,
    )
    [row] = json.loads(status.stdout)
    assert row["state"] == "completed" and row["attempt"] == 1
    assert row["test_metric"] == "test/acc" and 0 < row["test"] <= 1
    # with no path: outputs/ where trainyard-train put it ($TRAINYARD_ROOT), from anywhere
    env = {**os.environ, "TRAINYARD_ROOT": str(tmp_path)}
    anywhere = subprocess.run([sys.executable, "-m", "trainyard.cli", "status", "--json"],
                              capture_output=True, text=True, env=env, cwd="/")  # fmt: skip
    assert json.loads(anywhere.stdout) == json.loads(status.stdout), anywhere.stderr
    # and the log of a run trained here is its train.log
    logs = subprocess.run([sys.executable, "-m", "trainyard.cli", "logs", row["run"]],
                          capture_output=True, text=True)  # fmt: skip
    assert logs.returncode == 0 and "epoch 1/1" in logs.stdout, logs.stderr


def test_cli_does_not_import_torch():
    import subprocess
    import sys

    code = "import sys, trainyard.cli; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True)
    help_ = subprocess.run(
        [sys.executable, "-m", "trainyard.cli", "--help"], capture_output=True, text=True
    )
    assert help_.returncode == 0 and "status" in help_.stdout


def _says_what_happened(stdout: str, run: Path, result: dict) -> None:
    """The console and train.log both carry each epoch (with its training loss), the test
    metrics and why training stopped; metrics.csv has the epoch on every row, the groups'
    names on its learning-rate columns, and the attempt's number on its directory."""
    test_line = f"test  test/loss {result['metrics']['test/loss']:.4g}"
    train_log = (run / "train.log").read_text()
    for text in (stdout, train_log):
        assert "epoch 1/10  step" in text and "train/loss" in text and "val/acc" in text
        assert test_line in text
    [csv] = list((run / "logs").glob("version_*/metrics.csv"))
    assert csv.parent.name == "version_1"  # attempt 1
    import csv as csvlib

    rows = list(csvlib.DictReader(csv.open()))
    assert {"lr-Adam/weights", "lr-Adam/no_decay"} <= set(rows[0])
    train_rows = [r for r in rows if r["train/loss"]]
    assert train_rows and all(r["epoch"] != "" for r in train_rows)


def test_early_stopping_says_why_it_stopped(tmp_path):
    out = train_cli(["trainer.max_epochs=30", "callbacks.early_stopping.patience=1",
                     "optimizer.lr=0.05"], tmp_path)  # fmt: skip
    assert out.returncode == 0, out.stderr
    [run] = run_dirs(tmp_path)
    stopped = [line for line in out.stdout.splitlines() if "early stopping after epoch" in line]
    assert len(stopped) == 1 and "did not improve in the last 1 records" in stopped[0]
    assert "epoch 30/30" not in out.stdout
    assert "early stopping after epoch" in (run / "train.log").read_text()
    # a threshold reached stops it too, and says so (after the first epoch: no patience)
    out = train_cli(["name=threshold", "trainer.max_epochs=30",
                     "+callbacks.early_stopping.stopping_threshold=0.5"], tmp_path)  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert "early stopping after epoch 1: Stopping threshold reached" in out.stdout


def test_a_misspelt_trainer_key_is_refused_before_anything_starts(tmp_path):
    out = train_cli(["+trainer.max_epoch=1"], tmp_path)
    assert out.returncode == EXIT_CONFIG, out.stderr
    assert "trainer.max_epoch is not an argument" in out.stderr
    assert "fix: trainer.max_epochs" in out.stderr and "Traceback" not in out.stderr
    assert run_dirs(tmp_path) == [] and not list((tmp_path / "outputs").rglob("*.yaml"))


def test_help_says_what_trainyard_is_and_how_to_complete_in_the_shell(tmp_path):
    out = train_cli(["--help"], tmp_path)
    assert out.returncode == 0, out.stderr
    expected = ["trainyard-train: train a model", "Exit codes", "model: cnn, mlp",
                "trainer.max_epochs=10", "-sc install=bash", "== The composed config"]  # fmt: skip
    assert [text for text in expected if text not in out.stdout] == []


def _first_epoch_acc(run: Path) -> float:
    import csv

    [metrics] = list((run / "logs").glob("version_*/metrics.csv"))
    return next(float(r["val/acc"]) for r in csv.DictReader(metrics.open()) if r["val/acc"])


def test_init_from_starts_a_new_trial_from_an_earlier_runs_weights(tmp_path):
    base = train_cli(["name=base", "trainer.max_epochs=3"], tmp_path)
    assert base.returncode == 0, base.stderr
    [earlier] = run_dirs(tmp_path)
    source = earlier.relative_to(tmp_path)  # relative: taken from paths.root_dir
    longer = train_cli(["name=base", f"init_from={source}", "trainer.max_epochs=1"], tmp_path)
    assert longer.returncode == 0, longer.stderr
    [run] = [r for r in run_dirs(tmp_path) if r != earlier]
    assert f"network weights from {earlier}/checkpoints/best.ckpt" in longer.stdout
    # a trained start: its first epoch beats the fresh start's first epoch
    assert _first_epoch_acc(run) > _first_epoch_acc(earlier)
    assert json.loads((run / "status.json").read_text())["state"] == "completed"
    assert longer.stdout.count("network weights from") == 1
    # the same path spelt another way (absolute, a trailing slash) is the same trial
    again = train_cli(["name=base", f"init_from={earlier}/", "trainer.max_epochs=1"], tmp_path)
    assert again.returncode == 0 and "already completed" in again.stdout + again.stderr
    assert len(run_dirs(tmp_path)) == 2


@pytest.mark.parametrize(
    ("overrides", "says"),
    [
        (["init_from=outputs/nothing/here"], "outputs/nothing/here does not exist"),
        (["model=mlp", "init_from={earlier}"], "does not fit this network"),
        (["init_from={earlier}/config.yaml"], "cannot be read as a checkpoint"),
    ],
)
def test_an_init_from_that_cannot_start_this_network_exits_2(tmp_path, overrides, says):
    base = train_cli(["name=base", "trainer.max_epochs=1"], tmp_path)
    assert base.returncode == 0, base.stderr
    [earlier] = run_dirs(tmp_path)
    args = [o.format(earlier=earlier) for o in overrides]
    out = train_cli(["name=other", *args], tmp_path)
    assert out.returncode == EXIT_CONFIG and says in out.stderr, out.stderr
    assert "Traceback" not in out.stderr and run_dirs(tmp_path) == [earlier]
