import json
import os

import pytest

from trainyard.rundir import RunDir, atomic_write_text, identity_overrides, trial_key


def test_trial_key_is_stable_and_order_independent():
    a = trial_key(["optimizer.lr=0.01", "model=mlp"])
    b = trial_key(["model=mlp", "optimizer.lr=0.01"])
    assert a == b
    assert a.startswith("model-mlp__lr-0.01__")


def test_trial_key_differs_per_value_and_ignores_non_identity_keys():
    base = trial_key(["optimizer.lr=0.01"])
    assert trial_key(["optimizer.lr=0.02"]) != base
    # moving outputs, changing the logger or the name must find the same trial
    assert trial_key(["optimizer.lr=0.01", "paths.output_dir=/x", "logger=tensorboard"]) == base
    assert trial_key(["hydra.verbose=true", "resume=false"]) == "default"
    assert identity_overrides(["+paths.x=1", "~logger", "seed=3"]) == ["seed=3"]


@pytest.mark.parametrize(
    "hostile",
    ["name=../../etc", "data.root=/etc/passwd", "x=$(rm -rf ~)", "y=a b;c`d`", "z=" + "9" * 300],
)
def test_trial_key_is_filesystem_and_override_safe(hostile):
    key = trial_key([hostile, "seed=1"])
    assert "/" not in key and ".." not in key.split("__")[0][:2]
    assert all(c.isalnum() or c in "._-" for c in key)
    assert "=" not in key and "," not in key
    assert len(key) <= 64 + 2 + 8


def test_atomic_write_leaves_no_temp_files_and_keeps_umask(tmp_path):
    target = tmp_path / "a" / "f.json"
    atomic_write_text(target, "one")
    atomic_write_text(target, "two")
    assert target.read_text() == "two"
    assert [p.name for p in target.parent.iterdir()] == ["f.json"]
    umask = os.umask(0)
    os.umask(umask)
    assert target.stat().st_mode & 0o777 == 0o666 & ~umask


def test_status_transitions_record_history_and_attempts(tmp_path):
    run = RunDir(tmp_path)
    assert run.state is None
    run.transition("created")
    run.transition("running")
    run.transition("failed", error="boom")
    run.transition("running", resumed_from="last.ckpt")
    status = json.loads(run.status_file.read_text())
    assert status["state"] == "running"
    assert status["attempt"] == 2
    assert [h["state"] for h in status["history"]] == ["created", "running", "failed", "running"]
    assert status["history"][2]["error"] == "boom"
    with pytest.raises(ValueError, match="unknown run state"):
        run.transition("exploded")


def test_rank_info_merges(tmp_path):
    run = RunDir(tmp_path)
    run.write_rank_info(1, local_rank=1)
    run.write_rank_info(1, weights="abc")
    info = json.loads((tmp_path / "ranks" / "rank1.json").read_text())
    assert info["local_rank"] == 1 and info["weights"] == "abc" and info["pid"] == os.getpid()


def _transitions(root: str, n: int) -> None:
    run = RunDir(root)
    for _ in range(n):
        run.transition("failed", error="x")


def test_concurrent_transitions_lose_no_history(tmp_path):
    """Several processes recording states at once (ranks, a driver, a CLI) keep every entry."""
    import multiprocessing

    context = multiprocessing.get_context("spawn")
    procs = [context.Process(target=_transitions, args=(str(tmp_path), 25)) for _ in range(4)]
    for proc in procs:
        proc.start()
    for proc in procs:
        proc.join(60)
        assert proc.exitcode == 0
    assert len(RunDir(tmp_path).status()["history"]) == 100


def test_a_sweeps_key_does_not_depend_on_the_order_or_spelling_of_its_values():
    one = trial_key(["optimizer.lr=1e-3,1e-2", "trainer.max_epochs=2"])
    assert trial_key(["trainer.max_epochs=2", "optimizer.lr=1e-2,1e-3"]) == one
    assert trial_key(["optimizer.lr=0.01,0.001", "trainer.max_epochs=2"]) == one
    assert trial_key(["optimizer.lr=1e-3,1e-1", "trainer.max_epochs=2"]) != one
