"""Every config option composes, and every experiment trains (LHT-style smoke tests)."""

import gzip
from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate
from torchvision.models import resnet18

from tests.conftest import CONF_DIR
from tests.helpers.fake_datasets import mnist_files, write_cifar10
from trainyard import preflight
from trainyard.freeze import freeze
from trainyard.rundir import read_json
from trainyard.train import drive

GROUPS = ["data", "model", "optimizer", "scheduler", "loss", "logger", "callbacks", "trainer"]
OPTIONS = [(g, p.stem) for g in GROUPS for p in sorted((CONF_DIR / g).glob("*.yaml"))]
EXPERIMENTS = sorted(p.stem for p in (CONF_DIR / "experiment").glob("*.yaml"))


def test_each_group_has_the_promised_options():
    have = {(g, o) for g, o in OPTIONS}
    for option in [
        ("data", "digits"), ("data", "mnist"), ("data", "cifar10"), ("data", "synthetic"),
        ("model", "mlp"), ("model", "cnn"), ("model", "rnn"), ("model", "resnet18"),
        ("optimizer", "sgd"), ("optimizer", "adam"), ("optimizer", "adamw"),
        ("scheduler", "none"), ("scheduler", "cosine"), ("scheduler", "step"),
        ("scheduler", "onecycle"), ("trainer", "cpu"), ("trainer", "gpu"), ("trainer", "ddp"),
        ("logger", "csv"), ("logger", "tensorboard"),
    ]:  # fmt: skip
        assert option in have
    assert len(EXPERIMENTS) >= 3


@pytest.mark.parametrize(("group", "option"), OPTIONS)
def test_every_option_composes_and_instantiates(cfg_factory, group, option):
    extra = ["model=rnn"] if option == "synthetic_sequence" else []
    cfg = freeze(cfg_factory(f"{group}={option}", *extra))
    preflight.check_types(cfg)
    preflight.check_flags(cfg)  # no shipped true/false setting is taken for anything else
    if group == "trainer" and option == "gpu":
        return  # its devices are checked against the machine in test_preflight
    data = instantiate(cfg.data)
    net = instantiate(cfg.model)(input_shape=data.input_shape, num_classes=data.num_classes)
    optimizer = instantiate(cfg.optimizer)(params=net.parameters())
    if cfg.scheduler:
        kwargs = {"total_steps": 10} if "OneCycle" in cfg.scheduler._target_ else {}
        instantiate(cfg.scheduler)(optimizer=optimizer, **kwargs)
    instantiate(cfg.loss)(torch.randn(2, data.num_classes), torch.tensor([0, 1]))


@pytest.fixture
def offline_datasets(tmp_path, monkeypatch):
    """MNIST and CIFAR-10 files where paths.data_dir points, as a site would pre-stage them."""
    from torchvision.datasets import CIFAR10

    raw = tmp_path / "data" / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for name, blob in mnist_files().items():
        (raw / name.removesuffix(".gz")).write_bytes(gzip.decompress(blob))
    sums = write_cifar10(tmp_path / "data")
    train = [[f"data_batch_{i}", sums[f"data_batch_{i}"]] for i in range(1, 6)]
    monkeypatch.setattr(CIFAR10, "train_list", train)
    monkeypatch.setattr(CIFAR10, "test_list", [["test_batch", sums["test_batch"]]])
    monkeypatch.setitem(CIFAR10.meta, "md5", sums["batches.meta"])
    weights = tmp_path / "resnet18.pth"
    torch.save(resnet18(weights=None).state_dict(), weights)
    return weights


@pytest.mark.slow
@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_every_experiment_trains(cfg_factory, tmp_path, offline_datasets, experiment):
    overrides = [
        f"experiment={experiment}",
        "++trainer.fast_dev_run=2",
        "data.num_workers=0",
        "data.download=false" if experiment in ("mnist_cnn", "cifar10_resnet18") else "seed=42",
    ]
    if experiment == "cifar10_resnet18":
        overrides.append(f"model.weights={offline_datasets}")
    run_dir = tmp_path / "run"
    cfg = cfg_factory(*overrides)
    drive(cfg, run_dir, overrides)
    result = read_json(run_dir / "result.json")
    assert result["global_step"] == 2
    assert read_json(run_dir / "status.json")["state"] == "completed"
    assert Path(run_dir / "config.yaml").exists()
