"""Fine-tuning options of the trainer: frozen backbone (with cached features), unfreezing, backbone lr scale."""
import numpy as np
import pytest

from covidct.checkpoint import read_checkpoint
from covidct.model import build_model, preset, split_backbone_head
from covidct.synthetic import write_dataset
from covidct.train import Trainer, TrainConfig, train


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_dataset(tmp_path_factory.mktemp("transfer-data"), n=40, seed=5, size=32)


def config(data, out, **overrides):
    values = dict(data=str(data), out=str(out), model="tiny", epochs=2, batch_size=8, progress=False,
                  augment="none", warmup_epochs=0, cache_dir=str(out) + "-cache", lungs="none")
    values.update(overrides)
    return TrainConfig(**values)


def weights(run_dir, name="last.npz"):
    model_arrays, _, _ = read_checkpoint(run_dir / name)
    return model_arrays


def initial_weights(model_name="tiny", seed=0):
    return build_model(preset(model_name), seed=seed).state_dict()


BACKBONE_KEYS = ("0.weight", "0.bias", "3.weight", "3.bias")     # tiny: conv, relu, pool, conv, relu, pool, flatten


@pytest.mark.parametrize("name", ["tiny", "deep", "resnet18"])
def test_split_backbone_head_recomposes_the_model(name):
    model_config = preset(name)
    model_config.input_size = 32
    model = build_model(model_config, seed=1).eval()
    backbone, head = split_backbone_head(model)
    x = np.random.default_rng(0).random((3, 1, 32, 32), dtype=np.float32)
    np.testing.assert_array_equal(head(backbone(x)), model(x))
    assert len(backbone.parameters()) + len(head.parameters()) == len(model.parameters())
    assert backbone(x).ndim == 2                                   # (N, features): ends with the flatten


def test_frozen_backbone_caches_features_and_keeps_the_backbone_exact(data, tmp_path):
    messages = []
    train(config(data, tmp_path / "frozen", freeze_backbone=True), log=messages.append)
    assert sum("frozen backbone: cached" in str(m) for m in messages) == 1     # computed once, not per epoch
    trained, start = weights(tmp_path / "frozen"), initial_weights()
    for key in BACKBONE_KEYS:
        np.testing.assert_array_equal(trained[key], start[key], err_msg=key)
    assert not np.array_equal(trained["7.weight"], start["7.weight"])           # the head learned


def test_cached_features_train_the_head_like_the_uncached_path(data, tmp_path, monkeypatch):
    train(config(data, tmp_path / "cached", freeze_backbone=True), log=lambda *a: None)
    monkeypatch.setattr(Trainer, "cache_features", False)                     # backbone forward every batch
    train(config(data, tmp_path / "uncached", freeze_backbone=True), log=lambda *a: None)
    cached, uncached = weights(tmp_path / "cached"), weights(tmp_path / "uncached")
    for key in cached:
        np.testing.assert_allclose(cached[key], uncached[key], rtol=1e-5, atol=1e-6, err_msg=key)


def test_frozen_backbone_with_augmentation_runs_the_backbone_every_batch(data, tmp_path):
    messages = []
    train(config(data, tmp_path / "aug", freeze_backbone=True, augment="flip"), log=messages.append)
    assert not any("cached" in str(m) for m in messages)
    trained, start = weights(tmp_path / "aug"), initial_weights()
    for key in BACKBONE_KEYS:
        np.testing.assert_array_equal(trained[key], start[key], err_msg=key)


def test_unfreeze_after_trains_the_backbone_from_that_epoch(data, tmp_path):
    train(config(data, tmp_path / "one", freeze_backbone=True, unfreeze_after=1, epochs=1), log=lambda *a: None)
    train(config(data, tmp_path / "two", freeze_backbone=True, unfreeze_after=1, epochs=2), log=lambda *a: None)
    start, after_one, after_two = initial_weights(), weights(tmp_path / "one"), weights(tmp_path / "two")
    for key in BACKBONE_KEYS:
        np.testing.assert_array_equal(after_one[key], start[key], err_msg=key)
        assert not np.array_equal(after_two[key], start[key]), f"{key} did not train after unfreezing"


def test_backbone_lr_scale_slows_only_the_backbone(data, tmp_path):
    """With SGD (no momentum, no decay) the first step moves a parameter by lr * scale * grad exactly."""
    sgd = dict(optimizer="sgd", momentum=0.0, weight_decay=0.0, schedule="none", epochs=1, lr=0.05)
    train(config(data, tmp_path / "full", **sgd), log=lambda *a: None)
    train(config(data, tmp_path / "slow", backbone_lr_scale=0.001, **sgd), log=lambda *a: None)
    start, full, slow = initial_weights(), weights(tmp_path / "full"), weights(tmp_path / "slow")
    moved_full = np.abs(full["0.weight"] - start["0.weight"]).max()
    moved_slow = np.abs(slow["0.weight"] - start["0.weight"]).max()
    assert 0 < moved_slow < 0.05 * moved_full
