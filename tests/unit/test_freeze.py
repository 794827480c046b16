import json

import pytest
from omegaconf import OmegaConf

from trainyard.errors import ConfigError
from trainyard.freeze import freeze, load_frozen, provenance, save_frozen
from trainyard.trial import SOURCE_DIR


def test_freeze_resolves_everything_once(cfg_factory, tmp_path):
    frozen = freeze(cfg_factory("optimizer.lr=0.5"))
    text = OmegaConf.to_yaml(frozen)
    assert "${" not in text
    assert frozen.optimizer.lr == 0.5
    assert frozen.callbacks.checkpoint.dirpath == str(tmp_path / "run" / "checkpoints")
    assert frozen.data.seed == frozen.seed


def test_credentials_from_the_environment_stay_out_of_the_frozen_config(
    cfg_factory, tmp_path, monkeypatch
):
    monkeypatch.setenv("TY_TEST_API_KEY", "sekrit-value-123")
    cfg = cfg_factory("+logger.api_key=${oc.env:TY_TEST_API_KEY}")
    frozen = freeze(cfg)
    path = tmp_path / "config.yaml"
    save_frozen(frozen, path)
    assert "sekrit-value-123" not in path.read_text()
    assert "${oc.env:TY_TEST_API_KEY}" in path.read_text()
    # ranks re-read it from their own environment
    assert load_frozen(path).logger.api_key == "sekrit-value-123"


def test_a_secret_copied_through_another_key_is_refused(cfg_factory, monkeypatch):
    monkeypatch.setenv("TY_TEST_TOKEN", "tok-abcdef")
    cfg = cfg_factory("+logger.token=${oc.env:TY_TEST_TOKEN}", "+logger.note=${logger.token}")
    with pytest.raises(ConfigError, match="TY_TEST_TOKEN"):
        freeze(cfg)


def test_unresolvable_interpolation_is_a_config_error(cfg_factory):
    with pytest.raises(ConfigError, match="cannot be resolved"):
        freeze(cfg_factory("+foo=${does.not.exist}"))


def test_provenance_records_code_and_environment():
    info = provenance(7, ["seed=7"], SOURCE_DIR)
    assert info["seed"] == 7 and info["overrides"] == ["seed=7"]
    import torch

    assert info["packages"]["torch"] == torch.__version__.split("+")[0]
    assert info["git_dirty"] in (True, False, None)
    json.dumps(info)  # serialisable
