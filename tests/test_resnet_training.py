"""ResNet-18 from the covidct trainer: from scratch, and fine-tuned from saved weights with a frozen backbone."""
import numpy as np
import pytest

from covidct.checkpoint import load_checkpoint
from covidct.errors import CovidCTError
from covidct.synthetic import write_dataset
from covidct.train import TrainConfig, train
from minicnn import serialization
from minicnn.models import resnet18


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_dataset(tmp_path_factory.mktemp("resnet-data"), n=24, seed=4, size=32)


def config(data, out, **overrides):
    values = dict(data=str(data), out=str(out), model="resnet18", image_size=32, epochs=1, batch_size=8,
                  progress=False, augment="none", warmup_epochs=0, cache_dir=str(out) + "-cache", lungs="none")
    values.update(overrides)
    return TrainConfig(**values)


def test_resnet18_trains_and_its_checkpoint_rebuilds(data, tmp_path):
    train(config(data, tmp_path / "run"), log=lambda *a: None)
    model, meta = load_checkpoint(tmp_path / "run" / "best.npz")
    assert meta["model_config"]["arch"] == "resnet18" and model.conv1.weight.shape == (64, 1, 7, 7)
    assert model(np.zeros((1, 1, 32, 32), np.float32)).shape == (1, 2)


def test_frozen_backbone_fine_tuning_from_imagenet_shaped_weights(data, tmp_path):
    imagenet_like = resnet18(num_classes=1000, in_channels=3, rng=np.random.default_rng(7))
    weights = serialization.save(tmp_path / "imagenet_like.npz", imagenet_like.state_dict())
    messages = []
    train(config(data, tmp_path / "ft", pretrained=str(weights), freeze_backbone=True, epochs=2),
          log=messages.append)
    assert any("freshly initialised: ['fc.weight', 'fc.bias']" in str(m) for m in messages)
    model, _ = load_checkpoint(tmp_path / "ft" / "last.npz")
    source = imagenet_like.state_dict()
    np.testing.assert_allclose(model.conv1.weight.data, source["conv1.weight"].sum(axis=1, keepdims=True), rtol=1e-6)
    np.testing.assert_array_equal(model.layer4[1].conv2.weight.data, source["layer4.1.conv2.weight"])
    np.testing.assert_array_equal(model.layer1[0].bn1.running_mean, source["layer1.0.bn1.running_mean"])
    assert model.fc.weight.shape == (2, 512)


def test_unfreeze_after_needs_freeze_backbone_and_pretrained_must_exist(data, tmp_path):
    with pytest.raises(CovidCTError, match="--unfreeze-after 2: .* together with --freeze-backbone"):
        train(config(data, tmp_path / "x", model="tiny", unfreeze_after=2), log=lambda *a: None)
    with pytest.raises(CovidCTError, match="--backbone-lr-scale must be > 0"):
        train(config(data, tmp_path / "z", model="tiny", backbone_lr_scale=0.0), log=lambda *a: None)
    with pytest.raises(CovidCTError, match="--pretrained /no/such.pth: no such file"):
        train(config(data, tmp_path / "y", pretrained="/no/such.pth"), log=lambda *a: None)
