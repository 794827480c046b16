"""Large sweeps are prepared through templates (trainyard.bulk): composed and frozen once per
group, patched per trial. Whatever path a trial takes, its run directory must hold exactly
what preparing it on its own would write."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import OmegaConf

from trainyard import submit
from trainyard.compose import Composer
from trainyard.conf_path import CONF_DIR


@pytest.fixture(autouse=True)
def _root(tmp_path, monkeypatch):
    monkeypatch.setenv("TRAINYARD_ROOT", str(tmp_path))


def _prepare(overrides: list[str], templates: bool, monkeypatch) -> list[submit.Planned]:
    """Plan, check and write every trial, as `trainyard submit` does before sbatch."""
    monkeypatch.setattr(submit, "BULK_MIN", 2 if templates else 10**9)
    planned = submit.plan(overrides)
    for trial in [submit._check(p) for p in planned]:
        assert submit._needs_training(trial)
    return planned


def _written(planned: list[submit.Planned]) -> dict[str, tuple]:
    out = {}
    for p in planned:
        status = json.loads((p.run_dir / "status.json").read_text())
        provenance = json.loads((p.run_dir / "provenance.json").read_text())
        for volatile in ("created",):
            provenance.pop(volatile)
        for entry in status["history"]:
            entry.pop("time")
        key = str(p.run_dir.relative_to(p.run_dir.parents[2]))
        out[key] = ((p.run_dir / "config.yaml").read_text(), status, provenance)
    return out


@pytest.mark.parametrize(
    "sweep",
    [
        ["seed=range(0,6)"],  # data.seed copies ${seed}: an alias the template follows
        ["optimizer.lr=0.001,0.01,1e-1", "trainer.max_epochs=1,2", "name=bulk"],
        ["scheduler=onecycle", "optimizer.lr=0.001,0.01"],  # max_lr: ${optimizer.lr}
        ["+tag='${optimizer.lr}-run'", "optimizer.lr=0.001,0.01"],  # derived: no template
        ["model=mlp,cnn", "optimizer.lr=0.5,0.25"],  # two groups, a template each
        ["+notes.x='yes'", "optimizer.lr=1,2"],  # values YAML must quote or type right
        ["scheduler=onecycle", "optimizer.lr=1,1.0"],  # equal values of different types
    ],
)
def test_templates_write_exactly_what_trial_by_trial_writes(sweep, tmp_path, monkeypatch):
    fast = _written(_prepare(sweep, True, monkeypatch))
    for path in tmp_path.iterdir():
        if path.is_dir():
            import shutil

            shutil.rmtree(path)
    slow = _written(_prepare(sweep, False, monkeypatch))
    assert fast.keys() == slow.keys() and len(fast) > 1
    for key in fast:
        assert fast[key] == slow[key], key


def test_a_derived_value_keeps_the_sweep_off_templates(monkeypatch):
    monkeypatch.setattr(submit, "BULK_MIN", 2)
    planned = submit.plan(["+tag='${optimizer.lr}-run'", "optimizer.lr=0.001,0.01"])
    assert all(p.template is None for p in planned)
    planned = submit.plan(["seed=range(0,4)"])
    assert all(p.template is planned[0].template is not None for p in planned)


def test_a_run_directory_that_is_not_a_plain_yaml_scalar_falls_back_to_dumping(
    tmp_path, monkeypatch
):
    monkeypatch.setenv("TRAINYARD_ROOT", str(tmp_path / "with space: and 'quote'"))
    planned = _prepare(["seed=range(0,3)"], True, monkeypatch)
    for p in planned:
        frozen = OmegaConf.load(p.run_dir / "config.yaml")
        assert frozen.paths.run_dir == str(p.run_dir) and frozen.data.seed == frozen.seed


def test_composing_once_per_group_equals_hydra_composing_each_trial():
    cases = [
        ["model=mlp", "optimizer.lr=0.1", "+notes.x=1", "~callbacks.early_stopping"],
        ["optimizer=sgd", "optimizer.lr=1e-2", "cluster=slurm_loopback", "cluster.partition=low"],
        ["data=synthetic", "model=mlp", "model.dropout=0.3", "trainer.devices=2"],
    ]
    with Composer() as composer:
        fast = [composer.compose(case) for case in cases]
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        full = [compose("train", overrides=case) for case in cases]
    GlobalHydra.instance().clear()
    for a, b in zip(fast, full, strict=True):
        assert OmegaConf.to_yaml(a) == OmegaConf.to_yaml(b)
        assert OmegaConf.is_struct(a) and OmegaConf.is_struct(b)


def test_an_unknown_key_in_a_large_sweep_is_refused_with_the_fix(monkeypatch):
    from trainyard.errors import ConfigError

    monkeypatch.setattr(submit, "BULK_MIN", 2)
    with pytest.raises(ConfigError, match=r"optimizer\.lrr") as info:
        submit.plan(["optimizer.lrr=1,2"])
    assert "trainyard-train --help" in info.value.render()


def test_a_trial_directory_appears_complete_or_not_at_all(tmp_path, monkeypatch):
    planned = _prepare(["seed=range(0,4)"], True, monkeypatch)
    sweep_dir = planned[0].run_dir.parent
    assert not [p for p in sweep_dir.iterdir() if p.name.startswith(".")]  # no staging left
    assert sorted(Path(p.run_dir) for p in planned) == sorted(
        p for p in sweep_dir.iterdir() if p.is_dir()
    )


def test_a_varying_value_that_decides_the_job_splits_the_sweep_into_jobs(monkeypatch):
    """cluster.time_min copies data.batch_size here: every trial needs its own --time."""
    monkeypatch.setattr(submit, "BULK_MIN", 2)
    sweep = ["cluster=slurm", "cluster.time_min=${data.batch_size}", "data.batch_size=100,101,102"]
    planned = submit.plan(sweep)
    assert planned[0].template is not None
    jobs = submit._jobs([submit._check(p) for p in planned])
    assert sorted(job.cluster["time_min"] for job in jobs) == [100, 101, 102]


def test_a_missing_mandatory_value_is_refused_when_frozen(tmp_path):
    from trainyard.errors import ConfigError
    from trainyard.freeze import freeze

    with pytest.raises(ConfigError, match="Missing mandatory value"):
        freeze(OmegaConf.create({"a": "???", "b": 1}))
