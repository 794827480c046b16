"""LightningDataModules. Each exposes ``input_shape`` and ``num_classes`` after ``setup``
so the model can be sized from the data."""

from trainyard.data.digits import DigitsDataModule
from trainyard.data.synthetic import SyntheticDataModule
from trainyard.data.vision import CIFAR10DataModule, MNISTDataModule

__all__ = ["CIFAR10DataModule", "DigitsDataModule", "MNISTDataModule", "SyntheticDataModule"]
