"""Compose-once in the launchers (trainyard.sweep_launch.Compositions): trial by trial, the
same config, hydra node included, as Hydra's own ``load_sweep_config``."""

from __future__ import annotations

import pytest
from omegaconf import OmegaConf

from trainyard.conf_path import CONF_DIR
from trainyard.sweep_launch import Compositions

TRIALS = [
    ["optimizer.lr=0.01", "seed=1"],
    ["optimizer.lr=0.02", "seed=2"],
    ["model=mlp", "optimizer.lr=0.01", "+trainer.limit_train_batches=4"],
    ["model=mlp", "optimizer.lr=0.03", "+trainer.limit_train_batches=4"],
    ["optimizer=sgd", "optimizer.momentum=0.5", "data.batch_size=32"],
    ["experiment=digits_mlp", "optimizer.lr=0.005"],
    ["trainer.max_epochs=3", "callbacks.early_stopping=null", "~callbacks.lr_monitor"],
    ["hydra.job.name=other", "optimizer.lr=0.01"],  # a hydra override: composed in full
]


@pytest.fixture
def loader_and_master():
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from trainyard import resolvers

    resolvers.register()
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        master = compose("train", overrides=["cluster=ray"], return_hydra_config=True)
        yield GlobalHydra.instance().config_loader(), master
    GlobalHydra.instance().clear()


def _plain(cfg):
    data = OmegaConf.to_container(cfg, resolve=False)
    data["hydra"]["runtime"].pop("cwd", None)
    return data


def test_each_trial_is_what_hydra_composes(loader_and_master):
    loader, master = loader_and_master
    compositions = Compositions(loader, master)
    for trial in TRIALS:
        ours = compositions.load(trial)
        hydras = loader.load_sweep_config(master, trial)
        assert _plain(ours) == _plain(hydras), trial
    # value-only trials shared one composition per set of group choices
    assert len(compositions._base) == 4  # (), model=mlp, optimizer=sgd, experiment=...


def test_a_trial_hydra_refuses_is_refused_alike(loader_and_master):
    from hydra.errors import ConfigCompositionException

    loader, master = loader_and_master
    with pytest.raises(ConfigCompositionException):
        Compositions(loader, master).load(["optimizer.lrr=0.1"])
    with pytest.raises(ConfigCompositionException):
        loader.load_sweep_config(master, ["optimizer.lrr=0.1"])
