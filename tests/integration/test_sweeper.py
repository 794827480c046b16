"""trainyard's Optuna sweeper (``-m sweep=grid|random|bayes``) driving real trials: the
study on disk survives its driver, bad search spaces and storages are refused before
anything is written or lost, and poor trials are pruned from their validation metric."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import _env, run_dirs, train_cli
from trainyard.errors import EXIT_CONFIG

pytestmark = pytest.mark.slow

TINY = ["trainer.max_epochs=2", "+trainer.limit_train_batches=4", "+trainer.limit_val_batches=2",
        "logger=none", "test_after_fit=false"]  # fmt: skip


def _history(run: Path) -> list[str]:
    return [h["state"] for h in json.loads((run / "status.json").read_text())["history"]]


def _study(root: Path):
    import optuna
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    [journal] = (root / "outputs").rglob("study.journal")
    storage = JournalStorage(JournalFileBackend(str(journal)))
    [summary] = optuna.get_all_study_summaries(storage)
    return optuna.load_study(study_name=summary.study_name, storage=storage)


def test_a_grid_runs_every_point_once_and_a_relaunch_trains_nothing(tmp_path):
    args = ["-m", "sweep=grid", "optimizer.lr=0.001,0.01", "model.hidden=32,64", *TINY]
    out = train_cli(args, tmp_path)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    runs = run_dirs(tmp_path)
    assert len(runs) == 4
    assert all(_history(r) == ["created", "running", "completed"] for r in runs)
    study = _study(tmp_path)
    assert sorted(t.state.name for t in study.trials) == ["COMPLETE"] * 4
    points = {(t.params["optimizer.lr"], t.params["model.hidden"]) for t in study.trials}
    assert points == {(0.001, 32), (0.001, 64), (0.01, 32), (0.01, 64)}
    sweep_dir = runs[0].parent
    best = json.loads(json.dumps(__import__("yaml").safe_load(
        (sweep_dir / "optimization_results.yaml").read_text())))  # fmt: skip
    assert best["best_value"] == max(t.value for t in study.trials)
    again = train_cli(args, tmp_path)
    assert again.returncode == 0, again.stderr[-2000:]
    assert all(_history(r) == ["created", "running", "completed"] for r in runs)
    assert len(_study(tmp_path).trials) == 4


@pytest.mark.parametrize(
    ("space", "said"),
    [
        ("optimizer.lr=interval(0.1,0.001)", "low must be below high"),
        ("optimizer.lr=tag(log,interval(0,0.1))", "reaches zero"),
        ("data.batch_size=range(64,64)", "has no values"),
        ("optimizer.lrr=interval(0.001,0.1)", "did you mean optimizer.lr"),
        ("monitor=val/nope,val/acc", "not a metric the classifier logs"),
    ],
)
def test_a_search_space_that_cannot_be_sampled_is_refused_writing_nothing(tmp_path, space, said):
    sampler = "grid" if space.startswith("monitor") else "random"
    out = train_cli(["-m", f"sweep={sampler}", space, *TINY], tmp_path, timeout=120)
    assert out.returncode == EXIT_CONFIG, out.stdout[-2000:] + out.stderr[-2000:]
    assert said in out.stderr and "fix:" in out.stderr and "Traceback" not in out.stderr
    assert not (tmp_path / "outputs").exists()


def test_a_grid_over_an_interval_is_refused_naming_the_samplers_that_take_one(tmp_path):
    out = train_cli(["-m", "sweep=grid", "optimizer.lr=interval(0.001,0.1)"], tmp_path)
    assert out.returncode == EXIT_CONFIG and "sweep=random" in out.stderr, out.stderr


def _first_sweep(tmp_path: Path) -> tuple[list[str], Path]:
    args = ["-m", "sweep=random", "hydra.sweeper.n_trials=2", "hydra.sweeper.seed=0",
            "optimizer.lr=tag(log,interval(1e-4,1e-1))", *TINY]  # fmt: skip
    out = train_cli(args, tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    [journal] = (tmp_path / "outputs").rglob("study.journal")
    return args, journal


def test_a_corrupt_study_file_is_refused_and_left_as_it_is(tmp_path):
    args, journal = _first_sweep(tmp_path)
    corrupt = journal.read_bytes()[:-40] + b"\x00garbage{not json\n"
    journal.write_bytes(corrupt)
    out = train_cli(args, tmp_path)
    assert out.returncode == EXIT_CONFIG, out.stdout[-2000:] + out.stderr[-2000:]
    assert "cannot be read" in out.stderr and "fix:" in out.stderr
    assert journal.read_bytes() == corrupt  # nothing rewritten


def test_a_storage_holding_another_study_is_refused_and_untouched(tmp_path):
    _, journal = _first_sweep(tmp_path)
    before = journal.read_bytes()
    other = ["-m", "sweep=random", "hydra.sweeper.n_trials=2", f"hydra.sweeper.storage={journal}",
             "optimizer.weight_decay=interval(0.0,0.1)", *TINY]  # fmt: skip
    out = train_cli(other, tmp_path)
    assert out.returncode == EXIT_CONFIG, out.stdout[-2000:] + out.stderr[-2000:]
    assert "not this sweep's" in out.stderr and "hydra.sweeper.storage" in out.stderr
    assert journal.read_bytes() == before


def test_a_driver_killed_mid_sweep_is_relaunched_and_every_trial_trains_once(tmp_path):
    args = ["-m", "sweep=grid", "optimizer.lr=0.001,0.002,0.003,0.004", "seed=1,2,3,4",
            "trainer.max_epochs=3", "+trainer.limit_train_batches=8",
            "+trainer.limit_val_batches=2", "logger=none", "test_after_fit=false"]  # fmt: skip
    cmd = [sys.executable, "-m", "trainyard.train", *args]
    driver = subprocess.Popen(cmd, cwd=tmp_path, env=_env(tmp_path, None),
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                              start_new_session=True)  # fmt: skip
    try:
        deadline = time.monotonic() + 300
        while sum((r / "result.json").exists() for r in run_dirs(tmp_path)) < 6:
            assert driver.poll() is None and time.monotonic() < deadline
            time.sleep(0.1)
    finally:
        os.killpg(driver.pid, signal.SIGKILL)  # no chance to record anything
        driver.wait()
    done_before = {r: _history(r) for r in run_dirs(tmp_path) if (r / "result.json").exists()}
    assert 6 <= len(done_before) < 16
    out = train_cli(args, tmp_path, timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    runs = run_dirs(tmp_path)
    assert len(runs) == 16 and all((r / "result.json").exists() for r in runs)
    for run in runs:
        history = _history(run)
        assert history.count("completed") == 1, (run, history)
        if run in done_before:  # finished before the kill: not trained again
            assert history == done_before[run]
    study = _study(tmp_path)
    assert sorted(t.state.name for t in study.trials) == ["COMPLETE"] * 16


def test_poor_trials_are_pruned_at_an_epoch_boundary_and_recorded_so(tmp_path):
    # one learning rate that learns, three that barely move: successive halving keeps the
    # best at each rung, so the slow ones that come after a better one stop after epoch 1
    args = ["-m", "sweep=grid", "hydra.sweeper.pruner=asha", "hydra.sweeper.min_resource=1",
            "optimizer.lr=0.01,1e-7,2e-7,3e-7", "optimizer=sgd", "trainer.max_epochs=4",
            "+trainer.limit_train_batches=8", "+trainer.limit_val_batches=4",
            "callbacks.early_stopping=null", "logger=none", "test_after_fit=false"]  # fmt: skip
    out = train_cli(args, tmp_path)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    study = _study(tmp_path)
    states = {t.params["optimizer.lr"]: t.state.name for t in study.trials}
    assert states[0.01] == "COMPLETE" and "PRUNED" in states.values(), states
    for run in run_dirs(tmp_path):
        result = json.loads((run / "result.json").read_text())
        if (run / "pruned.json").exists():
            assert result["epochs"] < 4  # stopped early, its result and checkpoints kept
            assert (run / "checkpoints" / "last.ckpt").exists()
        else:
            assert result["epochs"] == 4
    assert "pruned" in out.stdout
    # run on its own, a pruned trial is not taken for a finished one: it trains to its end
    pruned = next(r for r in run_dirs(tmp_path) if (r / "pruned.json").exists())
    lr = json.loads((pruned / "provenance.json").read_text())["overrides"]
    alone = [o for o in lr if not o.startswith(("sweep=", "hydra."))]
    out = train_cli(alone, tmp_path)
    assert out.returncode == 0 and "already completed" not in out.stderr + out.stdout
    [again] = [r for r in run_dirs(tmp_path) if r.parent.name == "runs"]
    assert json.loads((again / "result.json").read_text())["epochs"] == 4


def test_report_ranks_the_trials_and_writes_a_best_experiment_that_reproduces_it(tmp_path):
    import yaml
    from omegaconf import OmegaConf

    from tests.conftest import cli
    from trainyard.trial import identity_changes

    args = ["-m", "sweep=grid", "optimizer.lr=0.001,0.01,0.1", "model=mlp", "logger=csv",
            *[a for a in TINY if a != "logger=none"]]  # fmt: skip
    assert train_cli(args, tmp_path).returncode == 0
    runs = run_dirs(tmp_path)
    sweep_dir = runs[0].parent
    out = cli(tmp_path, "report", str(sweep_dir))
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("3 trial(s): 3 completed; best val/acc=")
    with open(sweep_dir / "report" / "trials.csv") as f:
        rows = list(__import__("csv").reader(f))
    assert rows[0][:3] == ["rank", "state", "optimizer.lr"] and len(rows) == 4
    values = [float(r[3]) for r in rows[1:]]
    assert values == sorted(values, reverse=True)  # best first (val/acc: max)
    assert (sweep_dir / "report" / "trials.md").read_text().count("\n") == 5
    plots = sorted(p.name for p in (sweep_dir / "report" / "plots").iterdir())
    assert plots == ["learning_curves.png", "val_acc_vs_optimizer.lr.png"]
    assert all((sweep_dir / "report" / "plots" / p).read_bytes()[:4] == b"\x89PNG" for p in plots)
    # the experiment file composes to the best trial's config
    best_run = sweep_dir / rows[1][-1]
    searchpath = f"hydra.searchpath=[file://{sweep_dir / 'report'}]"
    composed = train_cli([searchpath, "experiment=best", "--cfg", "job", "--resolve"], tmp_path)
    assert composed.returncode == 0, composed.stderr
    text = (sweep_dir / "report" / "experiment" / "best.yaml").read_text()
    assert "dirpath" not in text and str(tmp_path / "outputs") not in text.split("\n", 6)[-1]
    best = OmegaConf.load(best_run / "config.yaml")
    assert identity_changes(best, OmegaConf.create(yaml.safe_load(composed.stdout))) == []
    watch = cli(tmp_path, "report", "--watch", "--no-plots", str(sweep_dir))
    assert watch.returncode == 0 and "3 completed" in watch.stdout.splitlines()[0]
    missing = cli(tmp_path, "report", str(tmp_path / "nowhere"))
    assert missing.returncode == EXIT_CONFIG and "fix:" in missing.stderr


def test_a_point_the_sampler_proposes_again_is_a_trial_of_the_budget(tmp_path):
    # two points, three trials: the third finds a finished run directory and its result
    args = ["-m", "sweep=random", "hydra.sweeper.n_trials=3", "hydra.sweeper.seed=0",
            "model.hidden=choice(32,64)", *TINY]  # fmt: skip
    out = train_cli(args, tmp_path, timeout=300)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    assert len(_study(tmp_path).trials) == 3
    assert len(run_dirs(tmp_path)) <= 2
    assert all(_history(r).count("running") == 1 for r in run_dirs(tmp_path))


def test_a_trial_refused_for_bad_input_is_not_run_again_and_the_sweep_says_so(tmp_path):
    # 64 CPU ranks on one machine: refused where the ranks would start (bad input, exit 2)
    args = ["-m", "sweep=grid", "trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=1,64",
            *TINY]  # fmt: skip
    out = train_cli(args, tmp_path)
    assert out.returncode == EXIT_CONFIG, out.stdout[-2000:] + out.stderr[-2000:]
    assert "failed" in out.stdout and "run again" not in out.stdout
    states = sorted(t.state.name for t in _study(tmp_path).trials)
    assert states == ["COMPLETE", "FAIL"]  # once each: the refused point was not retried
    again = train_cli(args, tmp_path)  # nor on relaunch: the point has ended
    assert sorted(t.state.name for t in _study(tmp_path).trials) == ["COMPLETE", "FAIL"]
    assert again.returncode == 0 and "run again" not in again.stdout, again.stderr[-2000:]
