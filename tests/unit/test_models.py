import pytest
import torch
from torchvision.models import resnet18

from trainyard.models import CNN, MLP, ResNet18, RNNClassifier
from trainyard.models.resnet import WeightsError


@pytest.mark.parametrize("shape", [(1, 8, 8), (1, 28, 28), (3, 32, 32)])
@pytest.mark.parametrize("cls", [MLP, CNN, RNNClassifier])
def test_models_size_themselves_from_the_data(cls, shape):
    net = cls(input_shape=shape, num_classes=7)
    assert net(torch.randn(4, *shape)).shape == (4, 7)


@pytest.mark.parametrize("cell", ["rnn", "lstm", "gru"])
def test_rnn_cells_on_sequences(cell):
    net = RNNClassifier(input_shape=(20, 16), num_classes=5, cell=cell, num_layers=2, dropout=0.1)
    assert net(torch.randn(3, 20, 16)).shape == (3, 5)


def test_regularisation_switches_build_the_layers():
    mlp = MLP((1, 8, 8), 10, hidden=[32], dropout=0.5, batch_norm=True)
    kinds = {type(m).__name__ for m in mlp.modules()}
    assert {"BatchNorm1d", "Dropout"} <= kinds
    cnn = CNN((3, 32, 32), 10, batch_norm=False, dropout=0.0)
    assert not {"BatchNorm2d", "Dropout"} & {type(m).__name__ for m in cnn.modules()}


def test_unknown_rnn_cell_is_rejected():
    with pytest.raises(ValueError, match="choose one of"):
        RNNClassifier((10, 4), 2, cell="transformer")


@pytest.fixture
def weights_file(tmp_path):
    path = tmp_path / "resnet18.pth"
    torch.manual_seed(0)
    torch.save(resnet18(weights=None).state_dict(), path)
    return path


def test_resnet_loads_local_weights_and_freezes_the_backbone(weights_file):
    saved = torch.load(weights_file, weights_only=True)
    net = ResNet18((3, 32, 32), 10, weights=str(weights_file), freeze_backbone=True)
    assert torch.equal(net.net.layer1[0].conv1.weight, saved["layer1.0.conv1.weight"])
    trainable = [n for n, p in net.named_parameters() if p.requires_grad]
    assert trainable and all(n.startswith("net.fc.") for n in trainable)
    assert net(torch.randn(2, 3, 32, 32)).shape == (2, 10)


def test_resnet_grey_input_keeps_pretrained_kernels(weights_file):
    saved = torch.load(weights_file, weights_only=True)
    net = ResNet18((1, 28, 28), 10, weights=str(weights_file))
    assert torch.allclose(net.net.conv1.weight, saved["conv1.weight"].sum(1, keepdim=True))
    assert net(torch.randn(2, 1, 28, 28)).shape == (2, 10)


def test_resnet_weights_that_do_not_fit_are_refused(tmp_path):
    with pytest.raises(WeightsError, match="does not exist"):
        ResNet18((3, 32, 32), 10, weights=str(tmp_path / "missing.pth"))
    wrong = tmp_path / "mlp.pth"
    torch.save(MLP((1, 8, 8), 10).state_dict(), wrong)
    with pytest.raises(WeightsError, match="does not fit resnet18"):
        ResNet18((3, 32, 32), 10, weights=str(wrong))
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(WeightsError, match="cannot be read"):
        ResNet18((3, 32, 32), 10, weights=str(garbage))
