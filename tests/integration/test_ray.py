"""The Ray backend against a real Ray head on 127.0.0.1, started by these tests with
``cluster/ray/ray.sh`` (or the one already up there): sweeps, a 2-rank DDP trial, a worker
killed mid-trial, a stopped job, and requests the cluster cannot hold."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import cli, run_dirs, train_cli
from trainyard.errors import EXIT_CONFIG

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "cluster" / "ray" / "ray.sh"
ADDRESS = "http://127.0.0.1:8265"

pytest.importorskip("ray", reason="the Ray backend needs ray: pip install 'trainyard[ray]'")
pytestmark = [pytest.mark.ray, pytest.mark.slow]

SHORT = ["trainer.max_epochs=1", "+trainer.limit_train_batches=4", "+trainer.limit_val_batches=2"]
# several epochs of a few steps: last.ckpt (written every epoch) appears early, and the
# trial lasts long enough to be stopped in the middle
LONG = ["trainer.max_epochs=200", "callbacks.early_stopping=null", "+trainer.limit_val_batches=1"]


def _ray(command: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "RAY_NUM_CPUS": "2"}
    return subprocess.run(["bash", str(SCRIPT), command], capture_output=True, text=True,
                          env=env, timeout=180)  # fmt: skip


@pytest.fixture(scope="module")
def ray_head() -> Iterator[str]:
    started = _ray("status").returncode != 0
    if started:
        out = _ray("start")
        assert out.returncode == 0, out.stdout + out.stderr
    yield ADDRESS
    if started:
        _ray("stop")


def _state(run: Path) -> dict:
    path = run / "status.json"
    return json.loads(path.read_text()) if path.exists() else {"state": None, "history": []}


def _wait(predicate, timeout: float = 180, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)


def test_a_four_trial_sweep_trains_every_trial_once_on_the_cluster(ray_head, tmp_path):
    lrs = "optimizer.lr=0.001,0.01,0.05,0.1"
    out = train_cli(["-m", "cluster=ray", f"cluster.address={ray_head}", lrs, *SHORT], tmp_path)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    runs = run_dirs(tmp_path)
    assert len(runs) == 4
    for run in runs:
        result = json.loads((run / "result.json").read_text())
        assert result["value"] is not None
        assert [h["state"] for h in _state(run)["history"]] == ["created", "running", "completed"]
    [record] = json.loads((runs[0].parent / "submission.json").read_text())
    assert record["backend"] == "ray" and record["job_id"].endswith("@127.0.0.1:8265")
    # the scheduler's view, its logs, and the sweep launched again: nothing trains twice
    status = cli(tmp_path, "status", str(runs[0].parent))
    assert status.returncode == 0 and status.stdout.count("completed") >= 4, status.stdout
    logs = cli(tmp_path, "logs", str(runs[0].parent))
    assert "4/4 trial(s) completed" in logs.stdout, logs.stdout[-2000:]
    again = train_cli(["-m", "cluster=ray", f"cluster.address={ray_head}", lrs, *SHORT], tmp_path)
    assert again.returncode == 0, again.stderr[-2000:]
    assert all(len(_state(r)["history"]) == 3 for r in runs)


def test_a_two_rank_ddp_trial_runs_its_ranks_in_one_task(ray_head, tmp_path):
    args = ["-m", "cluster=ray", f"cluster.address={ray_head}", "trainer=ddp",
            "trainer.devices=2", "optimizer.lr=0.01,0.02", *SHORT]  # fmt: skip
    out = train_cli(args, tmp_path)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    for run in run_dirs(tmp_path):
        ranks = [json.loads((run / "ranks" / f"rank{r}.json").read_text()) for r in (0, 1)]
        assert ranks[0]["pid"] != ranks[1]["pid"]
        # a task Ray gave no GPU sees none, where the node has some too
        assert [(r["accelerator"], r["cuda_visible_devices"]) for r in ranks] == [("cpu", "")] * 2
        assert (run / "result.json").exists()


def _worker_pid(run: Path) -> int:
    return json.loads((run / "ranks" / "rank0.json").read_text())["pid"]


def _submit_long(tmp_path: Path, ray_head: str, *extra: str) -> Path:
    out = cli(tmp_path, "submit", "cluster=ray", f"cluster.address={ray_head}", *LONG, *extra)
    assert out.returncode == 0, out.stderr
    [run] = run_dirs(tmp_path)
    _wait(lambda: (run / "checkpoints" / "last.ckpt").exists(), what="a first checkpoint")
    return run


def test_a_worker_killed_mid_trial_is_retried_and_resumes_from_its_checkpoint(ray_head, tmp_path):
    run = _submit_long(tmp_path, ray_head, "trainer.max_epochs=30")
    os.kill(_worker_pid(run), signal.SIGKILL)
    _wait(lambda: _state(run)["state"] in ("completed", "failed"), what="the retried trial")
    history = _state(run)["history"]
    assert history[-1]["state"] == "completed", history
    attempts = [h for h in history if h["state"] == "running"]
    assert len(attempts) == 2 and attempts[1]["resumed_from"].endswith("last.ckpt"), history
    assert json.loads((run / "result.json").read_text())["value"] is not None


def test_cancel_checkpoints_the_trial_and_a_resubmission_resumes_it(ray_head, tmp_path):
    run = _submit_long(tmp_path, ray_head)
    out = cli(tmp_path, "cancel", str(run))
    assert out.returncode == 0, out.stderr
    _wait(lambda: _state(run)["state"] in ("preempted", "interrupted"), 90, "the stop")
    step = _state(run)["history"][-1].get("step")
    assert step, _state(run)["history"][-1]
    again = cli(tmp_path, "submit", "cluster=ray", f"cluster.address={ray_head}", *LONG)
    assert again.returncode == 0, again.stderr
    _wait(lambda: _state(run)["attempt"] == 2 and _state(run)["state"] == "running")
    assert _state(run)["history"][-1]["resumed_from"].endswith("last.ckpt")
    assert cli(tmp_path, "cancel", str(run)).returncode == 0


def test_a_trial_no_node_can_hold_is_refused_before_anything_is_written(ray_head, tmp_path):
    out = cli(tmp_path, "submit", "cluster=ray", f"cluster.address={ray_head}",
              "trainer=ddp", "trainer.devices=8")  # fmt: skip
    assert out.returncode == EXIT_CONFIG, out.stdout + out.stderr
    assert "cannot hold a trial" in out.stderr and "fix:" in out.stderr
    assert not (tmp_path / "outputs").exists()


def test_no_head_at_the_address_says_how_to_start_one(tmp_path):
    out = cli(tmp_path, "submit", "cluster=ray", "cluster.address=http://127.0.0.1:9")
    assert out.returncode == EXIT_CONFIG, out.stdout + out.stderr
    assert "cluster/ray/ray.sh start" in out.stderr and "Traceback" not in out.stderr
    assert not (tmp_path / "outputs").exists()
    dry = cli(tmp_path, "submit", "--dry-run", "cluster=ray", "cluster.address=127.0.0.1:9")
    assert dry.returncode == 0 and '"entrypoint"' in dry.stdout, dry.stderr
    assert "not checked with the cluster" in dry.stdout


def test_an_optuna_sweep_keeps_two_trials_in_flight_on_the_cluster(ray_head, tmp_path):
    args = ["-m", "cluster=ray", f"cluster.address={ray_head}", "sweep=random",
            "hydra.sweeper.n_jobs=2", "hydra.sweeper.n_trials=4", "hydra.sweeper.seed=0",
            "hydra.sweeper.poll_s=0.2", "optimizer.lr=tag(log,interval(1e-4,1e-1))",
            *SHORT]  # fmt: skip
    out = train_cli(args, tmp_path, timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    runs = run_dirs(tmp_path)
    assert len(runs) == 4 and all((r / "result.json").exists() for r in runs)
    # one submission per trial, recorded in its run directory
    records = [r for run in runs for r in json.loads((run / "submission.json").read_text())]
    assert len(records) == 4 and {r["backend"] for r in records} == {"ray"}
    records.sort(key=lambda r: r["time"])
    ended = {r["trials"][0]: _state(Path(r["trials"][0]))["history"][-1]["time"] for r in records}
    # two in flight: the second trial went out before the first one ended, and every later
    # one as soon as one ended, not when both had
    assert records[1]["time"] < ended[records[0]["trials"][0]]
    for later in records[2:]:
        finished_before = [t for t, end in ended.items() if end < later["time"]]
        assert len(finished_before) >= 1


def test_a_relaunched_sweep_follows_the_trials_its_dead_driver_left_running(ray_head, tmp_path):
    import subprocess
    import sys

    from tests.conftest import _env

    args = ["-m", "cluster=ray", f"cluster.address={ray_head}", "sweep=random",
            "hydra.sweeper.n_jobs=2", "hydra.sweeper.n_trials=2", "hydra.sweeper.seed=0",
            "hydra.sweeper.pruner=median", "optimizer.lr=tag(log,interval(1e-3,1e-2))",
            "trainer.max_epochs=40", "callbacks.early_stopping=null",
            "+trainer.limit_val_batches=1", "logger=none", "test_after_fit=false"]  # fmt: skip
    driver = subprocess.Popen([sys.executable, "-m", "trainyard.train", *args], cwd=tmp_path,
                              env=_env(tmp_path, None), stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL, start_new_session=True)  # fmt: skip
    try:
        _wait(lambda: len(run_dirs(tmp_path)) == 2
              and all((r / "checkpoints" / "last.ckpt").exists() for r in run_dirs(tmp_path)),
              what="both trials training")  # fmt: skip
    finally:
        os.killpg(driver.pid, signal.SIGKILL)  # the driver dies; its Ray jobs go on
        driver.wait()
    assert all(_state(r)["state"] == "running" for r in run_dirs(tmp_path))
    out = train_cli(args, tmp_path, timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "run again" not in out.stdout  # neither was taken for failed
    for run in run_dirs(tmp_path):
        states = [h["state"] for h in _state(run)["history"]]
        assert states == ["created", "running", "completed"], (run, states)  # trained once
    import optuna
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    [journal] = (tmp_path / "outputs").rglob("study.journal")
    storage = JournalStorage(JournalFileBackend(str(journal)))
    [summary] = optuna.get_all_study_summaries(storage)
    study = optuna.load_study(study_name=summary.study_name, storage=storage)
    assert sorted(t.state.name for t in study.trials) == ["COMPLETE", "COMPLETE"]
