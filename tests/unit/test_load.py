"""Using a result: a checkpoint, or the run directory around it, rebuilds the network and the
input preprocessing it was trained with, wherever it now lies, without the dataset."""

import json
import shutil
import sys
from pathlib import Path

import pytest
import torch
from hydra import initialize_config_dir
from hydra.core.global_hydra import GlobalHydra

import trainyard
from tests.conftest import compose_cfg
from tests.helpers.run_if import RunIf
from trainyard.conf_path import CONF_DIR
from trainyard.data import CIFAR10DataModule, DigitsDataModule, SyntheticDataModule
from trainyard.data.preprocess import Preprocess
from trainyard.errors import CheckpointError
from trainyard.tasks import Classifier
from trainyard.train import drive

ARGS = [
    "trainer.max_epochs=1",
    "trainer.limit_train_batches=6",
    "trainer.limit_val_batches=2",
    "logger=none",
    "callbacks.progress=null",
]


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """A run directory trained in this process (the test split is tested in full)."""
    root = tmp_path_factory.mktemp("trained")
    drive(compose_cfg(root, ARGS), root / "run", ARGS)
    return root / "run"


def held_out_digits() -> tuple[torch.Tensor, torch.Tensor]:
    """The test split as scikit-learn gives it (8x8 pixel values 0..16), and its labels."""
    dm = DigitsDataModule(normalize=False)
    dm.setup()
    x, y = dm.test_set.tensors
    return x[:, 0] * 16, y  # exact: the module divided by a power of two


# -- the data modules record their preprocessing ------------------------------------------


def test_digits_preprocess_replays_the_training_normalisation_on_raw_pixels():
    dm = DigitsDataModule(seed=3)
    dm.setup()
    raw, _ = held_out_digits()
    pre = dm.preprocess
    assert (pre.input_shape, pre.num_classes, pre.divide_by) == ((1, 8, 8), 10, 16)
    assert torch.equal(pre(raw), dm.test_set.tensors[0])  # bit for bit what was tested
    unnormalised = DigitsDataModule(normalize=False)
    unnormalised.setup()
    assert unnormalised.preprocess.mean == (0.0,) and unnormalised.preprocess.std == (1.0,)


def test_digits_statistics_are_those_of_the_training_split():
    dm = DigitsDataModule(seed=3, normalize=False)
    dm.setup()
    train = dm.train_set.tensors[0]
    normalised = DigitsDataModule(seed=3)
    normalised.setup()
    [mean], [std] = normalised.preprocess.mean, normalised.preprocess.std
    assert mean == float(train.mean()) and std == float(train.std())
    assert mean != float(dm.test_set.tensors[0].mean())  # never the held-out images'


def test_cifar10_preprocess_replays_torchvision_on_the_raw_hwc_arrays(tmp_path, monkeypatch):
    from torchvision.datasets import CIFAR10

    from tests.helpers.fake_datasets import write_cifar10

    # fake files: torchvision checks them against their own md5 sums (as test_data does)
    sums = write_cifar10(tmp_path)
    monkeypatch.setattr(
        CIFAR10, "train_list", [[f"data_batch_{i}", sums[f"data_batch_{i}"]] for i in range(1, 6)]
    )
    monkeypatch.setattr(CIFAR10, "test_list", [["test_batch", sums["test_batch"]]])
    monkeypatch.setitem(CIFAR10.meta, "md5", sums["batches.meta"])
    dm = CIFAR10DataModule(root=str(tmp_path))
    dm.marker.touch()
    dm.setup()
    # torchvision's own per-image path (what trainyard ran before it held images in memory)
    from torchvision import transforms as T

    normalize = T.Compose([T.ToTensor(), T.Normalize(dm.mean, dm.std)])
    per_image = CIFAR10(str(tmp_path), train=False, transform=normalize)
    raw = per_image.data[:5]  # uint8 (5, 32, 32, 3): what CIFAR10 holds and PIL gives
    expected = torch.stack([per_image[i][0] for i in range(5)])
    assert torch.equal(dm.preprocess(raw), expected)
    # the in-memory split, sample by sample or scaled per batch, is the same bit for bit
    assert torch.equal(torch.stack([dm.test_set[i][0] for i in range(5)]), expected)
    stored, _ = next(iter(dm.test_dataloader()))
    assert torch.equal(dm.on_after_batch_transfer((stored[:5], None), 0)[0], expected)


def test_synthetic_preprocess_is_the_identity():
    dm = SyntheticDataModule(shape=(12, 5), num_classes=4, num_samples=20, test_samples=4)
    dm.setup()
    x = dm.test_set.tensors[0]
    assert torch.equal(dm.preprocess(x), x) and dm.preprocess.num_classes == 4


# -- the transform ---------------------------------------------------------------------


def test_transform_takes_the_natural_shapes_of_one_sample_or_a_batch():
    pre = Preprocess((1, 8, 8), 10, divide_by=2, mean=(1.0,), std=(2.0,))
    image = torch.arange(64.0).reshape(8, 8)
    one = pre(image)
    assert one.shape == (1, 1, 8, 8) and one[0, 0, 0, 1] == (1 * 0.5 - 1.0) / 2.0
    for form in (image[None], image.reshape(64), image.numpy(), image.tolist()):
        assert torch.equal(pre(form), one)
    batch = torch.stack([image, image + 1])
    assert pre(batch).shape == (2, 1, 8, 8) and torch.equal(pre(batch.reshape(2, 64))[0], one[0])
    with pytest.raises(ValueError, match=r"\(1, 8, 8\)"):
        pre(torch.zeros(7, 9))
    assert Preprocess.from_dict(pre.to_dict()) == pre


def test_transform_scales_uint8_and_moves_channels_last_per_channel():
    pre = Preprocess((3, 2, 2), 10, divide_by=255, mean=(0.0, 0.5, 1.0), std=(1.0, 1.0, 2.0),
                     channels_last=True)  # fmt: skip
    hwc = torch.full((2, 2, 3), 255, dtype=torch.uint8)
    out = pre(hwc)
    assert out.dtype == torch.float32 and out.shape == (1, 3, 2, 2)
    assert out[0, :, 0, 0].tolist() == [1.0, 0.5, 0.0]


# -- checkpoints -------------------------------------------------------------------------


def test_load_from_checkpoint_rebuilds_the_task_from_the_best_checkpoint_alone(trained, tmp_path):
    best = tmp_path / "anywhere.ckpt"
    shutil.copy(trained / "checkpoints" / "best.ckpt", best)
    task = Classifier.load_from_checkpoint(best, weights_only=True)
    saved = torch.load(best, map_location="cpu", weights_only=True)
    for name, tensor in task.state_dict().items():
        assert torch.equal(tensor, saved["state_dict"][name])
    digits = DigitsDataModule(seed=42)  # the seed it trained with
    digits.setup()
    assert task.preprocess == digits.preprocess
    # small: a description of the network, not a pickled object
    assert len(json.dumps(saved["hyper_parameters"])) < 2000
    assert saved["hyper_parameters"]["net"]["_target_"] == "trainyard.models.CNN"
    assert saved["hyper_parameters"]["optimizer"]["_target_"] == "torch.optim.Adam"


def test_a_loaded_task_trains_on_with_the_optimizer_it_recorded(trained):
    from tests.helpers.trainers import quiet_trainer

    task = Classifier.load_from_checkpoint(trained / "checkpoints" / "best.ckpt")
    quiet_trainer(max_steps=2).fit(task, datamodule=DigitsDataModule(batch_size=32))
    assert type(task.optimizers().optimizer) is torch.optim.Adam
    without = Classifier(net=task.net, num_classes=10)  # no optimizer: fine to predict
    with pytest.raises(ValueError, match="no optimizer"):
        quiet_trainer(max_steps=1).fit(without, datamodule=DigitsDataModule(batch_size=32))


def test_the_resume_checkpoint_carries_the_same(trained):
    task = Classifier.load_from_checkpoint(trained / "checkpoints" / "last.ckpt")
    assert task.preprocess is not None and task.hparams.num_classes == 10


def test_load_a_moved_run_directory_and_predict_held_out_digits(trained, tmp_path):
    moved = tmp_path / "elsewhere" / "run"
    shutil.copytree(trained, moved)
    model = trainyard.load(moved)
    assert model.checkpoint == moved / "checkpoints" / "best.ckpt"  # not the recorded path
    assert not model.net.training
    assert next(model.net.parameters()).device == torch.device("cpu")
    raw, labels = held_out_digits()
    predicted = model.predict(raw)
    assert predicted.shape == labels.shape and predicted.dtype == torch.long
    result = json.loads((moved / "result.json").read_text())
    accuracy = float((predicted == labels).float().mean())
    assert accuracy == pytest.approx(result["metrics"]["test/acc"], abs=1e-6)
    assert torch.equal(model.predict(raw[0]), predicted[:1])  # one image is a batch of one


@RunIf(min_gpus=1)
def test_trained_on_a_gpu_predicts_on_the_cpu_and_on_a_gpu(tmp_path):
    args = [*ARGS, "trainer=gpu"]
    drive(compose_cfg(tmp_path, args), tmp_path / "run", args)
    raw, labels = held_out_digits()
    on_cpu = trainyard.load(tmp_path / "run")  # a machine without a GPU
    on_gpu = trainyard.load(tmp_path / "run", device="cuda")
    assert next(on_cpu.net.parameters()).device.type == "cpu"
    assert next(on_gpu.net.parameters()).device.type == "cuda"
    predicted = on_gpu.predict(raw)
    assert predicted.device.type == "cpu"
    assert float((predicted == on_cpu.predict(raw)).float().mean()) > 0.99  # TF32 kernels
    result = json.loads((tmp_path / "run" / "result.json").read_text())
    accuracy = float((predicted == labels).float().mean())
    assert accuracy == pytest.approx(result["metrics"]["test/acc"], abs=0.02)  # tested in fp16


def test_load_a_checkpoint_file_gives_the_same_predictions(trained, tmp_path):
    standalone = tmp_path / "model.ckpt"
    shutil.copy(trained / "checkpoints" / "best.ckpt", standalone)
    raw, _ = held_out_digits()
    from_file = trainyard.load(standalone).predict(raw)
    assert torch.equal(from_file, trainyard.load(trained).predict(raw))


def test_the_recorded_best_checkpoint_is_found_under_the_run_directory(trained, tmp_path):
    moved = tmp_path / "run"
    shutil.copytree(trained, moved)
    (moved / "checkpoints" / "best.ckpt").rename(moved / "checkpoints" / "epoch0.ckpt")
    result = json.loads((moved / "result.json").read_text())
    result["best_checkpoint"] = str(trained / "checkpoints" / "epoch0.ckpt")  # as recorded
    (moved / "result.json").write_text(json.dumps(result))
    assert trainyard.load(moved).checkpoint == moved / "checkpoints" / "epoch0.ckpt"


def test_load_leaves_a_running_hydra_app_alone(trained):
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        trainyard.load(trained)
        assert GlobalHydra.instance().is_initialized()
    GlobalHydra.instance().clear()


def test_what_cannot_be_loaded_says_why(trained, tmp_path):
    with pytest.raises(CheckpointError, match="no checkpoint"):
        trainyard.load(tmp_path)
    with pytest.raises(CheckpointError, match="does not exist"):
        trainyard.load(tmp_path / "missing")
    old = torch.load(trained / "checkpoints" / "best.ckpt", weights_only=True)
    del old["hyper_parameters"]  # as written before checkpoints described the network
    torch.save(old, tmp_path / "old.ckpt")
    with pytest.raises(CheckpointError, match="does not describe the network"):
        trainyard.load(tmp_path / "old.ckpt")


def test_a_checkpoint_cannot_name_arbitrary_code_to_run(trained, tmp_path):
    ckpt = torch.load(trained / "checkpoints" / "best.ckpt", weights_only=True)
    ckpt["hyper_parameters"]["net"] = {"_target_": "os.system", "_args_": ["true"]}
    torch.save(ckpt, tmp_path / "hostile.ckpt")
    with pytest.raises(ValueError, match=r"os\.system"):
        Classifier.load_from_checkpoint(tmp_path / "hostile.ckpt")
    nested = {"_target_": "trainyard.models.MLP", "input_shape": [1, 8, 8], "num_classes": 10,
              "hidden": {"_target_": "os.getcwd"}}  # fmt: skip
    ckpt["hyper_parameters"]["net"] = nested
    torch.save(ckpt, tmp_path / "nested.ckpt")
    with pytest.raises(ValueError, match=r"os\.getcwd"):
        Classifier.load_from_checkpoint(tmp_path / "nested.ckpt")
    # an interpolation would be resolved by Hydra into a new, unchecked target
    marker = tmp_path / "pwned"
    smuggled = "${oc.create:{_target_: builtins.open, _args_: ['" + str(marker) + "', 'w']}}"
    for hostile in (
        {**nested, "hidden": [16], "dropout": smuggled},
        {**nested, "hidden": [16], "_convert_": "all", "_recursive_": False},
        {"_target_": "this.Anything"},  # naming a module imports it: refused before that
    ):
        ckpt["hyper_parameters"]["net"] = hostile
        torch.save(ckpt, tmp_path / "smuggled.ckpt")
        with pytest.raises(ValueError, match=r"interpolation|may steer|trusted package"):
            Classifier.load_from_checkpoint(tmp_path / "smuggled.ckpt")
    assert not marker.exists() and "this" not in sys.modules


def test_a_pretrained_weights_file_is_not_needed_to_load(tmp_path):
    from trainyard.tasks.specs import architecture

    spec = {"_target_": "trainyard.models.ResNet18", "weights": "/gone/resnet18.pth",
            "input_shape": [3, 32, 32], "num_classes": 10}  # fmt: skip
    assert architecture(spec)["weights"] is None and spec["weights"] == "/gone/resnet18.pth"


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is visible: nothing to refuse")
def test_a_cuda_device_without_a_gpu_is_refused_with_the_fix(tmp_path):
    with pytest.raises(ValueError, match="use device='cpu'"):
        trainyard.load(tmp_path, device="cuda")
