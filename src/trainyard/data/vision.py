"""MNIST and CIFAR-10 through torchvision, prepared once per node.

Preparation runs under a file lock in the data directory, so the ranks of a node and the
trials of a sweep that share a directory download once while the others wait. A marker
file is written only after the downloaded files load; a directory without it (a download
that was cut off, a truncated file) is removed and fetched again. With
``download=false`` a missing dataset is an error that says where to put it.

Once prepared, the images are read once into uint8 tensors (N, C, H, W) and held in memory
(:mod:`trainyard.data.memory`): no PIL image is decoded per sample, and scaling to floats
and normalising happen per batch on the device (:class:`~trainyard.data.memory.Scale`).
"""

from __future__ import annotations

import shutil
from abc import abstractmethod
from pathlib import Path
from typing import Any, ClassVar

import torch
from filelock import FileLock, Timeout

from trainyard.data import augment
from trainyard.data.base import ClassificationDataModule
from trainyard.data.memory import InMemoryDataset, Scale
from trainyard.data.preprocess import Preprocess
from trainyard.errors import DataError


class TorchvisionDataModule(ClassificationDataModule):
    name: ClassVar[str]
    torchvision_name: ClassVar[str]  # the class in torchvision.datasets
    folder: ClassVar[str]  # the sub-folder torchvision creates under root
    input_shape_: ClassVar[tuple[int, int, int]]
    mean: ClassVar[tuple[float, ...]]
    std: ClassVar[tuple[float, ...]]
    channels_last: ClassVar[bool] = False  # how the dataset stores its raw images

    def __init__(
        self,
        root: str = "data",
        download: bool = True,
        mirror: str | None = None,
        normalize: bool = True,
        augment: bool = False,
        lock_timeout_s: float = 3600.0,
        **kwargs: Any,
    ):
        super().__init__(**kwargs)
        self.root = Path(root)
        self.download = download
        self.mirror = mirror
        self.normalize = normalize
        self.augment = augment
        self.lock_timeout_s = lock_timeout_s
        self.input_shape = self.input_shape_
        self.num_classes = 10
        # what torchvision's ToTensor + Normalize do: 8-bit pixels to [0, 1], then per channel
        self.preprocess = Preprocess(
            self.input_shape,
            self.num_classes,
            divide_by=255.0,
            mean=self.mean if normalize else (0.0,),
            std=self.std if normalize else (1.0,),
            channels_last=self.channels_last,
        )
        pre = self.preprocess
        self.scale = Scale(pre.divide_by, pre.mean, pre.std)  # the same, per batch on device

    # -- torchvision specifics ---------------------------------------------------------
    def dataset_class(self) -> type:
        """The torchvision dataset class, imported only when needed."""
        import torchvision.datasets

        return getattr(torchvision.datasets, self.torchvision_name)

    def mirrored_class(self) -> type:
        """The same class, downloading from ``self.mirror`` when one is set."""
        base = self.dataset_class()
        if not self.mirror:
            return base
        # keep the class name: torchvision derives the folder from it
        return type(base.__name__, (base,), self.mirror_attributes(base, self.mirror.rstrip("/")))

    @abstractmethod
    def mirror_attributes(self, base: type, mirror: str) -> dict:
        """Class attributes that point ``base``'s download at ``mirror``."""

    @abstractmethod
    def augment_images(self, x, fill):
        """Training-only augmentation of a normalised batch (see trainyard.data.augment);
        ``fill`` is the per-channel value of a black pixel after normalisation."""

    def augment_batch(self, x):
        if not self.augment:
            return x
        return self.augment_images(x, self._fill(x.device))

    def _fill(self, device: torch.device) -> torch.Tensor | float:
        """A black pixel after normalisation, per channel; made once per device (a list
        turned into a tensor every batch would be a host-to-device copy every batch)."""
        if not self.normalize:
            return 0.0
        fills = self.__dict__.setdefault("_fills", {})
        if device not in fills:
            fill = [-m / s for m, s in zip(self.mean, self.std, strict=True)]
            fills[device] = torch.tensor(fill, device=device)
        return fills[device]

    # -- preparation ---------------------------------------------------------------
    @property
    def marker(self) -> Path:
        return self.root / f".{self.name}.complete"

    def _loads(self) -> bool:
        cls = self.dataset_class()
        try:
            cls(str(self.root), train=True, download=False)
            cls(str(self.root), train=False, download=False)
        except Exception:
            return False
        return True

    def prepare_data(self) -> None:
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise DataError(
                f"cannot create the data directory {self.root}: {exc.strerror}",
                fix="point paths.data_dir at a writable directory",
            ) from exc
        lock = FileLock(str(self.root / f".{self.name}.lock"), timeout=self.lock_timeout_s)
        try:
            with lock:
                self._prepare_locked()
        except Timeout as exc:
            raise DataError(
                f"waited {self.lock_timeout_s:.0f}s for another process preparing {self.name}",
                fix=f"check for a stuck download, then remove {lock.lock_file}",
            ) from exc

    def _prepare_locked(self) -> None:
        if self.marker.exists() and self._loads():
            return
        if self._loads():  # a complete copy put there by hand
            self.marker.touch()
            return
        if not self.download:
            raise DataError(
                f"{self.name} was not found (or is incomplete) under {self.root}",
                fix=(
                    f"set data.download=true on a machine that can reach the dataset's "
                    f"mirror (or data.mirror=<url>), or copy {self.folder}/ into {self.root}"
                ),
            )
        shutil.rmtree(self.root / self.folder, ignore_errors=True)
        cls = self.mirrored_class()
        try:
            cls(str(self.root), train=True, download=True)
            cls(str(self.root), train=False, download=True)
        except Exception as exc:
            raise DataError(
                f"downloading {self.name} into {self.root} failed: {exc}",
                fix="check the network or data.mirror, or copy the files in by hand",
            ) from exc
        if not self._loads():
            raise DataError(f"{self.name} downloaded into {self.root} but does not load")
        self.marker.touch()

    # -- datasets --------------------------------------------------------------------
    def _read(self, train: bool) -> InMemoryDataset:
        """One split as uint8 (N, C, H, W) tensors: the dataset's arrays, read once."""
        raw = self.dataset_class()(str(self.root), train=train)
        x = self.preprocess.batched(torch.as_tensor(raw.data))  # channels first, as stored
        return InMemoryDataset(x, torch.as_tensor(raw.targets), self.scale)

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        if not self.marker.exists():
            raise DataError(
                f"{self.name} is not prepared under {self.root}",
                fix="run prepare_data first (trainyard-train does), or set data.download=true",
            )
        self.train_set, self.val_set = self.split_train_val(self._read(train=True))
        self.test_set = self._read(train=False)


class MNISTDataModule(TorchvisionDataModule):
    name = "mnist"
    torchvision_name = folder = "MNIST"
    input_shape_ = (1, 28, 28)
    mean, std = (0.1307,), (0.3081,)

    def mirror_attributes(self, base: type, mirror: str) -> dict:
        return {"mirrors": [mirror + "/"]}

    def augment_images(self, x, fill):
        return augment.random_crop(x, padding=2, fill=fill)


class CIFAR10DataModule(TorchvisionDataModule):
    name = "cifar10"
    torchvision_name = "CIFAR10"
    folder = "cifar-10-batches-py"
    input_shape_ = (3, 32, 32)
    channels_last = True  # CIFAR10.data is (N, 32, 32, 3), as PIL images are
    mean, std = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)

    def mirror_attributes(self, base: type, mirror: str) -> dict:
        return {"url": f"{mirror}/{base.filename}"}

    def augment_images(self, x, fill):
        return augment.random_hflip(augment.random_crop(x, padding=4, fill=fill))
