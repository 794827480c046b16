"""scikit-learn's bundled 8x8 digits: the offline default (1,797 images, 10 classes).

The CSV ships inside scikit-learn; it is read directly so that importing scikit-learn
(and SciPy behind it) does not cost every run a second of start-up.
"""

from __future__ import annotations

import gzip
import importlib.util
from pathlib import Path

import numpy as np
import torch

from trainyard.data.augment import random_shift
from trainyard.data.base import ClassificationDataModule, standardize, tensor_dataset
from trainyard.data.preprocess import Preprocess
from trainyard.errors import DataError

PIXEL_MAX = 16.0  # the digits' pixels are counts 0..16


def digits_csv_path() -> Path:
    spec = importlib.util.find_spec("sklearn")
    if spec is None or not spec.submodule_search_locations:
        raise DataError(
            "the digits dataset ships with scikit-learn, which is not installed",
            fix="make install (or pip install scikit-learn==1.9.1)",
        )
    path = Path(next(iter(spec.submodule_search_locations))) / "datasets/data/digits.csv.gz"
    if not path.is_file():
        raise DataError(f"scikit-learn's digits file is missing: {path}", fix="reinstall it")
    return path


def load_digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    with gzip.open(digits_csv_path(), "rt") as f:
        table = np.loadtxt(f, delimiter=",", dtype=np.float32)
    return table[:, :-1].reshape(-1, 1, 8, 8), table[:, -1].astype(np.int64)


class DigitsDataModule(ClassificationDataModule):
    def __init__(
        self,
        test_fraction: float = 0.2,
        normalize: bool = True,
        augment: bool = False,
        split_seed: int = 0,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.test_fraction = test_fraction
        self.split_seed = split_seed
        self.normalize = normalize
        self.augment = augment
        self.input_shape = (1, 8, 8)
        self.num_classes = 10

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        x, y = load_digits_arrays()
        x, y = torch.from_numpy(x) / PIXEL_MAX, torch.from_numpy(y)
        # the test split never moves with the training seed (a seed sweep is compared on one
        # test set); validation and training are split from the rest with the seed
        fixed = torch.randperm(len(x), generator=torch.Generator().manual_seed(self.split_seed))
        n_test = round(len(x) * self.test_fraction)
        test_idx, rest = fixed[:n_test], fixed[n_test:]
        rest_idx = rest[
            torch.randperm(len(rest), generator=torch.Generator().manual_seed(self.seed))
        ]
        n_val = max(1, round(len(rest_idx) * self.val_fraction))
        val_idx, train_idx = rest_idx[:n_val], rest_idx[n_val:]
        xs = [x[train_idx], x[val_idx], x[test_idx]]
        mean, std = 0.0, 1.0
        if self.normalize:
            xs, (mean, std) = standardize(*xs)
        self.preprocess = Preprocess(
            self.input_shape, self.num_classes, divide_by=PIXEL_MAX, mean=(mean,), std=(std,)
        )
        self.train_set = tensor_dataset(xs[0], y[train_idx])
        self.val_set = tensor_dataset(xs[1], y[val_idx])
        self.test_set = tensor_dataset(xs[2], y[test_idx])

    def augment_batch(self, x: torch.Tensor) -> torch.Tensor:
        return random_shift(x, pixels=1) if self.augment else x
