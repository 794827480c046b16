import contextlib
import functools
import http.server
import multiprocessing
import threading
from pathlib import Path

import pytest
import torch

from tests.helpers.fake_datasets import cifar10_archive, md5, mnist_files
from trainyard.data import (
    CIFAR10DataModule,
    DigitsDataModule,
    MNISTDataModule,
    SyntheticDataModule,
)
from trainyard.errors import DataError


def test_digits_splits_are_seeded_disjoint_and_normalised():
    a, b = DigitsDataModule(seed=1), DigitsDataModule(seed=1)
    a.setup(), b.setup()
    assert (len(a.train_set), len(a.val_set), len(a.test_set)) == (1294, 144, 359)
    assert torch.equal(a.test_set.tensors[0], b.test_set.tensors[0])
    # another training seed draws other training and validation images, never other test
    # images: a seed sweep is compared on one test set
    raw = [DigitsDataModule(seed=s, normalize=False) for s in (1, 2)]
    for dm in raw:
        dm.setup()
    assert torch.equal(raw[0].test_set.tensors[0], raw[1].test_set.tensors[0])
    assert torch.equal(raw[0].test_set.tensors[1], raw[1].test_set.tensors[1])
    assert not torch.equal(raw[0].val_set.tensors[1], raw[1].val_set.tensors[1])
    x = a.train_set.tensors[0]
    assert x.shape[1:] == (1, 8, 8) and abs(float(x.mean())) < 1e-4
    assert a.input_shape == (1, 8, 8) and a.num_classes == 10


def test_digits_are_read_without_importing_scikit_learn():
    import ast
    import subprocess
    import sys

    from trainyard.data import digits

    # our code never imports it (it only finds the bundled file) ...
    tree = ast.parse(Path(digits.__file__).read_text())
    imported = [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
    imported += [n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)]
    assert not [m for m in imported if m and m.split(".")[0] == "sklearn"]
    # ... and reading the data does not either (whether another installed package imports
    # it at start-up is none of this test's business: a GPU machine's stack did)
    code = (
        "import sys; from trainyard.data.digits import load_digits_arrays; "
        "before = set(sys.modules); x, y = load_digits_arrays(); "
        "assert x.shape == (1797, 1, 8, 8); "
        "assert not [m for m in set(sys.modules) - before if m.startswith('sklearn')]"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_digits_augmentation_shifts_training_batches_only():
    dm = DigitsDataModule(augment=True, seed=0)
    dm.setup()
    x, _ = next(iter(dm.train_dataloader()))
    assert dm.augment_batch(x).shape == x.shape and not torch.equal(dm.augment_batch(x), x)
    # outside training (no trainer, or validating) batches pass through untouched
    assert dm.on_after_batch_transfer((x, None), 0)[0] is x
    assert DigitsDataModule(augment=False).augment_batch(x) is x


@pytest.mark.parametrize("shape", [(3, 16, 16), (12, 5)])
def test_synthetic_data_is_learnable_shape(shape):
    dm = SyntheticDataModule(shape=shape, num_classes=4, num_samples=200, test_samples=40)
    dm.setup()
    x, y = dm.train_set[0]
    assert tuple(x.shape) == shape and 0 <= int(y) < 4
    assert len(dm.train_set) + len(dm.val_set) == 200 and len(dm.test_set) == 40


# -- torchvision datasets: the real prepare/download path against a loopback mirror -----


class _Mirror:
    """A static HTTP server on 127.0.0.1 that counts the requests it serves."""

    def __init__(self, directory: Path):
        self.requests: list[str] = []
        mirror = self

        class Handler(http.server.SimpleHTTPRequestHandler):
            def log_message(self, *args):
                mirror.requests.append(f"{self.command} {self.path}")

            def handle(self):
                with contextlib.suppress(ConnectionError):  # a client that wanted headers only
                    super().handle()

        handler = functools.partial(Handler, directory=str(directory))
        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()


@pytest.fixture
def mnist_mirror(tmp_path, monkeypatch):
    from torchvision.datasets import MNIST

    files = mnist_files()
    served = tmp_path / "mirror"
    served.mkdir()
    for name, blob in files.items():
        (served / name).write_bytes(blob)
    # the small files' checksums instead of the real dataset's
    monkeypatch.setattr(MNIST, "resources", [(name, md5(blob)) for name, blob in files.items()])
    mirror = _Mirror(served)
    yield mirror
    mirror.close()


def _prepare(root, url):
    MNISTDataModule(root=str(root), mirror=url, batch_size=16).prepare_data()


def test_mnist_downloads_once_while_other_ranks_wait(tmp_path, mnist_mirror):
    root = tmp_path / "data"
    ctx = multiprocessing.get_context("fork")
    procs = [ctx.Process(target=_prepare, args=(root, mnist_mirror.url)) for _ in range(3)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    assert [p.exitcode for p in procs] == [0, 0, 0]
    # four files fetched once in all (torchvision probes each URL for redirects first)
    assert sorted(set(mnist_mirror.requests)) == sorted(f"GET /{n}" for n in mnist_files())
    assert len(mnist_mirror.requests) == 2 * 4
    dm = MNISTDataModule(root=str(root), download=False, batch_size=16)
    dm.prepare_data()
    dm.setup()
    x, _ = next(iter(dm.train_dataloader()))
    assert x.shape == (16, 1, 28, 28) and dm.num_classes == 10
    assert len(dm.train_set) + len(dm.val_set) == 200 and len(dm.test_set) == 50
    # held as uint8, scaled per batch: what torchvision's per-image transforms give, exactly
    from torchvision import transforms as T
    from torchvision.datasets import MNIST

    normalize = T.Compose([T.ToTensor(), T.Normalize(dm.mean, dm.std)])
    per_image = MNIST(str(root), train=False, transform=normalize)
    stored, labels = next(iter(dm.test_dataloader()))
    assert stored.dtype == torch.uint8
    x, _ = dm.on_after_batch_transfer((stored, labels), 0)
    assert torch.equal(x, torch.stack([per_image[i][0] for i in range(len(x))]))
    assert labels.tolist() == [per_image[i][1] for i in range(len(x))]


def test_mnist_partial_download_is_detected_and_redone(tmp_path, mnist_mirror):
    root = tmp_path / "data"
    _prepare(root, mnist_mirror.url)
    marker = root / ".mnist.complete"
    raw = root / "MNIST" / "raw" / "train-images-idx3-ubyte"
    # a download cut off mid-file: truncated raw file, no completion marker
    raw.write_bytes(raw.read_bytes()[:1000])
    marker.unlink()
    before = len(mnist_mirror.requests)
    _prepare(root, mnist_mirror.url)
    assert len(mnist_mirror.requests) == before + 2 * 4
    assert marker.exists()
    MNISTDataModule(root=str(root), download=False).setup()


def test_missing_dataset_without_download_names_the_fix(tmp_path):
    dm = MNISTDataModule(root=str(tmp_path / "nothing"), download=False)
    with pytest.raises(DataError, match=r"not found.*\n  fix: set data.download=true"):
        dm.prepare_data()


def test_unwritable_data_dir_is_a_data_error(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(DataError, match="writable"):
        MNISTDataModule(root=str(blocker / "data")).prepare_data()


def test_cifar10_from_a_mirror_with_augmentation(tmp_path, monkeypatch):
    from torchvision.datasets import CIFAR10

    archive, sums = cifar10_archive(tmp_path / "mirror")
    monkeypatch.setattr(CIFAR10, "tgz_md5", md5(archive.read_bytes()))
    monkeypatch.setattr(
        CIFAR10, "train_list", [[f"data_batch_{i}", sums[f"data_batch_{i}"]] for i in range(1, 6)]
    )
    monkeypatch.setattr(CIFAR10, "test_list", [["test_batch", sums["test_batch"]]])
    monkeypatch.setitem(CIFAR10.meta, "md5", sums["batches.meta"])
    mirror = _Mirror(archive.parent)
    try:
        dm = CIFAR10DataModule(
            root=str(tmp_path / "data"), mirror=mirror.url, batch_size=8, augment=True
        )
        dm.prepare_data()
        dm.setup()
    finally:
        mirror.close()
    # batches come as stored (uint8) and become network input where they land
    raw, _ = next(iter(dm.train_dataloader()))
    assert raw.shape == (8, 3, 32, 32) and raw.dtype == torch.uint8
    x, _ = dm.on_after_batch_transfer((raw, None), 0)
    assert x.dtype == torch.float32 and torch.equal(x, dm.preprocess(raw))
    assert len(dm.train_set) + len(dm.val_set) == 200 and len(dm.test_set) == 40
    assert not torch.equal(dm.augment_batch(x), x)  # random crop and flip, per batch
    assert torch.equal(next(iter(dm.val_dataloader()))[0], next(iter(dm.val_dataloader()))[0])
