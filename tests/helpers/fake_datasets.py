"""Small datasets in the exact on-disk formats torchvision reads (MNIST idx, CIFAR-10
pickles), so the real loading and download code can be exercised without the internet."""

from __future__ import annotations

import gzip
import hashlib
import pickle
import struct
import tarfile
from pathlib import Path

import numpy as np


def _idx_images(images: np.ndarray) -> bytes:
    n, rows, cols = images.shape
    return struct.pack(">IIII", 2051, n, rows, cols) + images.astype(np.uint8).tobytes()


def _idx_labels(labels: np.ndarray) -> bytes:
    return struct.pack(">II", 2049, len(labels)) + labels.astype(np.uint8).tobytes()


def mnist_files(n_train: int = 200, n_test: int = 50, seed: int = 0) -> dict[str, bytes]:
    """The four gzipped MNIST files, with a learnable signal (class-dependent blobs)."""
    rng = np.random.default_rng(seed)

    def split(n):
        labels = rng.integers(0, 10, n)
        images = rng.integers(0, 60, (n, 28, 28))
        for i, label in enumerate(labels):
            images[i, 2 * label : 2 * label + 6, 4:24] = 250
        return images, labels

    (xtr, ytr), (xte, yte) = split(n_train), split(n_test)
    return {
        "train-images-idx3-ubyte.gz": gzip.compress(_idx_images(xtr)),
        "train-labels-idx1-ubyte.gz": gzip.compress(_idx_labels(ytr)),
        "t10k-images-idx3-ubyte.gz": gzip.compress(_idx_images(xte)),
        "t10k-labels-idx1-ubyte.gz": gzip.compress(_idx_labels(yte)),
    }


def md5(data: bytes) -> str:
    return hashlib.md5(data).hexdigest()


def write_cifar10(root: Path, per_batch: int = 40, seed: int = 0) -> dict[str, str]:
    """CIFAR-10's python pickles under root/cifar-10-batches-py; returns name -> md5."""
    rng = np.random.default_rng(seed)
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True, exist_ok=True)
    sums = {}
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    for name in names:
        labels = rng.integers(0, 10, per_batch)
        data = rng.integers(0, 255, (per_batch, 3072), dtype=np.uint8)
        blob = pickle.dumps({"data": data, "labels": labels.tolist()})
        (folder / name).write_bytes(blob)
        sums[name] = md5(blob)
    meta = pickle.dumps({"label_names": [f"c{i}" for i in range(10)]})
    (folder / "batches.meta").write_bytes(meta)
    sums["batches.meta"] = md5(meta)
    return sums


def cifar10_archive(root: Path) -> tuple[Path, dict[str, str]]:
    """A cifar-10-python.tar.gz like the real one, and the md5 of each member."""
    staging = root / "staging"
    sums = write_cifar10(staging)
    archive = root / "cifar-10-python.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(staging / "cifar-10-batches-py", arcname="cifar-10-batches-py")
    return archive, sums
