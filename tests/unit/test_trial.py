"""Trial preparation: one Hydra-free function every launcher calls on the submitting
machine. It checks what the config alone can tell, freezes it without facts about the
machine, and keys trials on what they train (values, not their spelling)."""

import pytest
from omegaconf import OmegaConf

from trainyard.errors import ConfigError, RunDirError
from trainyard.rundir import trial_key
from trainyard.trial import prepare

FAST = ["++trainer.fast_dev_run=2"]


def test_a_gpu_trial_is_prepared_on_a_machine_without_gpus(cfg_factory, tmp_path, monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    trial = prepare(cfg_factory("trainer=gpu"), tmp_path / "gpu", ["trainer=gpu"])
    frozen = OmegaConf.load(trial.config_path)
    assert frozen.trainer.accelerator == "gpu" and frozen.trainer.devices == 1
    ddp = prepare(cfg_factory("trainer=ddp"), tmp_path / "ddp", ["trainer=ddp"])
    assert OmegaConf.load(ddp.config_path).trainer.accelerator == "auto"  # decided on the node
    # picked up again on "another machine": same trial, nothing refused
    again = prepare(cfg_factory("trainer=gpu"), tmp_path / "gpu", ["trainer=gpu"])
    assert not again.completed and again.run.root == trial.run.root


def test_prepare_does_not_need_hydras_runtime(cfg_factory, tmp_path):
    from hydra.core.hydra_config import HydraConfig

    assert not HydraConfig.initialized()
    trial = prepare(cfg_factory(), tmp_path / "t", [])
    assert trial.run.config.exists() and trial.run.provenance.exists()
    assert trial.run.state == "created"


@pytest.mark.parametrize(
    ("override", "names"),
    [
        ("optimizer.lr=nan", "optimizer.lr"),
        ("optimizer.lr=inf", "optimizer.lr"),
        ("loss.label_smoothing=2", "loss"),
        ("optimizer.betas=[0.9,1.5]", "optimizer"),
        ("scheduler=step", None),  # valid: must pass
        ("scheduler=onecycle", None),
        ("data.val_fraction=1.5", "data"),
        ("trainer.strategy=ddp_spawn", "trainer.strategy"),
        ("trainer.devices=3", "trainer.strategy"),
        ("callbacks.checkpoint.save_last=true", "save_last"),
        ("signals.preempt=[SIGNOPE]", "signals.preempt"),
    ],
)
def test_values_a_constructor_would_refuse_fail_while_preparing(
    cfg_factory, tmp_path, override, names
):
    if names is None:
        prepare(cfg_factory(override), tmp_path / "ok", [override])
        return
    with pytest.raises(ConfigError) as info:
        prepare(cfg_factory(override), tmp_path / "bad", [override])
    assert names in info.value.render()
    assert info.value.fix
    assert not (tmp_path / "bad").exists()  # nothing created for a bad config


def test_keys_follow_values_not_spelling():
    assert trial_key(["optimizer.lr=0.01"]) == trial_key(["optimizer.lr=1e-2"])
    assert trial_key(["+model.foo=1"]) == trial_key(["model.foo=1"])
    assert trial_key(["seed=1", "model=mlp"]) == trial_key(["model=mlp", "seed=1"])
    assert trial_key(["optimizer.lr=0.01"]) != trial_key(["optimizer.lr=0.02"])
    assert trial_key(["model.name='a b'"]) == trial_key(["model.name=a b"])


def test_operational_settings_are_not_part_of_the_identity():
    base = trial_key(["optimizer.lr=0.01"])
    for extra in ("data.num_workers=4", "paths.data_dir=/x", "logger=tensorboard",
                  "dist.timeout_s=60", "signals.check_every_n_steps=5"):  # fmt: skip
        assert trial_key(["optimizer.lr=0.01", extra]) == base, extra
    assert trial_key(["optimizer.lr=0.01", "data.batch_size=32"]) != base


def test_a_moved_data_directory_resumes_the_same_trial(cfg_factory, tmp_path):
    run_dir = tmp_path / "run"
    prepare(cfg_factory("data=mnist", "paths.data_dir=/data/a"), run_dir, ["data=mnist"])
    trial = prepare(
        cfg_factory("data=mnist", "paths.data_dir=/data/b", "data.num_workers=2"),
        run_dir,
        ["data=mnist"],
    )
    assert trial.config.data.root == "/data/b" and trial.config.data.num_workers == 2
    assert OmegaConf.load(run_dir / "config.yaml").data.root == "/data/b"


def test_what_defines_a_trial_cannot_change_under_it(cfg_factory, tmp_path):
    run_dir = tmp_path / "run"
    prepare(cfg_factory(), run_dir, [])
    frozen = (run_dir / "config.yaml").read_text()
    with pytest.raises(RunDirError, match=r"changed: optimizer\.lr\)"):
        prepare(cfg_factory("optimizer.lr=0.5"), run_dir, [])
    assert (run_dir / "config.yaml").read_text() == frozen


def test_one_process_trains_a_trial_at_a_time(cfg_factory, tmp_path):
    trial = prepare(cfg_factory(), tmp_path / "run", [])
    claim = trial.run.claim()
    with pytest.raises(RunDirError, match=f"pid {__import__('os').getpid()}"):
        trial.run.claim()
    claim.release()
    trial.run.claim().release()


def test_only_a_completed_twin_with_the_same_identity_is_reused(cfg_factory, tmp_path):
    from trainyard.rundir import write_json

    exp = tmp_path / "outputs" / "exp"
    first = prepare(cfg_factory(), exp / "sweeps" / "a" / "t", [])
    first.run.transition("running")
    assert not prepare(cfg_factory(), exp / "sweeps" / "b" / "t", []).completed  # not done yet

    first.run.transition("completed")
    write_json(first.run.result_file, {"value": 0.5, "monitor": "val/acc"})
    other_seed = prepare(cfg_factory("seed=7"), exp / "sweeps" / "c" / "t", [])
    assert not other_seed.completed  # same key, another trial: trained, not reused
    twin = prepare(cfg_factory("logger=tensorboard"), exp / "runs" / "t", [])
    assert twin.completed and twin.run.state == "completed"  # the logger does not define it
    assert twin.run.status()["history"][-1]["reused_from"] == str(first.run.root)
    elsewhere = prepare(cfg_factory(), tmp_path / "elsewhere" / "t", [])
    assert not elsewhere.completed  # outside an experiment's runs/ and sweeps/: no search


def test_another_logger_on_a_completed_trial_says_how_to_get_its_files(cfg_factory, tmp_path,
                                                                       caplog):  # fmt: skip
    from trainyard.rundir import write_json

    done = prepare(cfg_factory(), tmp_path / "t", [])
    (done.run.root / "logs" / "version_1").mkdir(parents=True)
    (done.run.root / "logs" / "version_1" / "metrics.csv").write_text("epoch\n")
    done.run.transition("completed")
    write_json(done.run.result_file, {"value": 0.5})
    with caplog.at_level("WARNING", logger="trainyard"):
        again = prepare(cfg_factory("logger=tensorboard"), tmp_path / "t", [])
    assert again.completed
    [message] = [r.getMessage() for r in caplog.records]
    assert "logger CSVLogger, so logger TensorBoardLogger writes nothing" in message
    assert "logs/version_1/metrics.csv" in message and "name=<new name>" in message
