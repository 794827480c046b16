"""Plain ``nn.Module`` networks. They import only torch (and torchvision for ResNet).

Each takes ``input_shape`` (without the batch dimension) and ``num_classes`` from the data,
so one model config works with every dataset. Devices, precision and parallelism are
chosen by the trainer config, never here.
"""

from trainyard.models.cnn import CNN
from trainyard.models.mlp import MLP
from trainyard.models.resnet import ResNet18
from trainyard.models.rnn import RNNClassifier

__all__ = ["CNN", "MLP", "RNNClassifier", "ResNet18"]
