"""Lung attention (covidct.attention, --lung-attention): the penalty's gradient, the masks, and what training does."""
import numpy as np
import pytest

import minicnn as mc
from covidct.attention import LungAttention, lung_masks, outside_share_penalty, parse_strengths, strength_for
from covidct.errors import CovidCTError
from covidct.frozen import WholeModel, strategy_for
from covidct.synthetic import make_slice
from covidct.train import TrainConfig, TrainData, Trainer, ensemble_members


def test_the_penalty_gradient_matches_finite_differences():
    rng = np.random.default_rng(0)
    features = rng.uniform(0.0, 2.0, (3, 4, 4, 5))                      # (N, K, h, w) >= 0, float64
    masks = (rng.uniform(size=(3, 8, 10)) > 0.5).astype(np.float64)     # (N, H, W): 2x2 input pixels a cell
    weights = np.array([1.0, 0.0, 1.0])                                  # the second image: no plausible mask
    penalty, grad = outside_share_penalty(features, masks, weights, strength=0.7)
    numeric = np.zeros_like(features)
    step = 1e-6
    for index in np.ndindex(features.shape):
        plus, minus = features.copy(), features.copy()
        plus[index] += step
        minus[index] -= step
        numeric[index] = (outside_share_penalty(plus, masks, weights, 0.7)[0]
                          - outside_share_penalty(minus, masks, weights, 0.7)[0]) / (2 * step)
    assert np.abs(grad - numeric).max() / np.abs(numeric).max() <= 1e-6
    assert np.all(grad[1] == 0)                                          # weight 0: no gradient
    # the value: the weighted mean share of activation outside the lungs, times the strength
    inside = masks.reshape(3, 4, 2, 5, 2).mean(axis=(2, 4))[:, None]
    shares = (features * (1 - inside)).sum(axis=(1, 2, 3)) / features.sum(axis=(1, 2, 3))
    assert penalty == pytest.approx(0.7 / 3 * (shares[0] + shares[2]), rel=1e-6)


def test_the_penalty_needs_a_map_that_divides_the_input():
    with pytest.raises(CovidCTError, match="7x7 feature map"):
        outside_share_penalty(np.ones((1, 2, 7, 7)), np.ones((1, 32, 32)), np.ones(1), 1.0)


def test_masks_are_found_on_the_inputs_and_kept_with_their_mirror_images():
    image, truth = make_slice(1, np.random.default_rng([4, 1, 0]), size=128, with_lung_mask=True)
    blank = np.full((128, 128), 0.5, np.float32)
    x = np.stack([image, blank])[:, None] * 3.0 - 1.0                   # normalised: the masks do not change
    cache = {}
    masks, weights = lung_masks(x, cache)
    assert masks.shape == (2, 128, 128) and weights.tolist() == [1.0, 0.0]
    dice = 2 * (masks[0] * truth).sum() / (masks[0].sum() + truth.sum())
    assert dice > 0.9
    assert len(cache) == 3                                               # the image, its mirror, the blank slice
    mirrored, mirrored_weights = lung_masks(x[:, :, :, ::-1].copy(), cache)
    assert len(cache) == 3 and np.array_equal(mirrored, masks[:, :, ::-1]) and mirrored_weights.tolist() == [1, 0]


def phantom(n: int, size: int = 128, seed: int = 0):
    images = [make_slice(i % 2, np.random.default_rng([seed, i]), size=size, difficulty=0.3) for i in range(n)]
    return np.stack(images)[:, None].astype(np.float32), np.arange(n) % 2


def trained(tmp_path, strength: float):
    images, labels = phantom(32)
    config = TrainConfig(out=str(tmp_path / f"run-{strength}"), model="default", lungs="none", epochs=8, batch_size=8, progress=False, lung_attention=str(strength))
    trainer = Trainer(config, data=TrainData(images, labels, images[:8], labels[:8]), log=lambda *a: None)
    trainer.fit()
    return trainer


def outside_share_of(trainer) -> float:
    """Share of the Grad-CAM layer's activation outside the lungs on the (plain) training images."""
    probe = LungAttention(trainer)
    x = mc.to_device((trainer.data.train_images - trainer.mean) / trainer.std, "cpu")
    with mc.no_grad():
        features = probe.front(x)
    masks, weights = lung_masks(x)
    penalty, _ = outside_share_penalty(features, masks, weights, 1.0)
    return penalty * len(weights) / weights.sum()


def test_training_with_the_penalty_moves_activation_into_the_lungs(tmp_path):
    plain, attending = trained(tmp_path, 0.0), trained(tmp_path, 10.0)
    assert isinstance(plain.strategy, WholeModel) and not isinstance(plain.strategy, LungAttention)
    assert isinstance(attending.strategy, LungAttention)
    assert "train_outside_lungs" in attending.history[-1] and "train_outside_lungs" not in plain.history[-1]
    assert outside_share_of(attending) < outside_share_of(plain) - 0.1
    # the same seed, the same weights
    again = trained(tmp_path / "again", 10.0)
    for (name, a), (_, b) in zip(attending.model.state_dict().items(), again.model.state_dict().items()):
        assert np.array_equal(a, b), name


def test_strengths_per_model_of_the_recipe():
    members = {suffix: member.attention_strength for _, member, suffix, _ in ensemble_members(TrainConfig())}
    assert members == {"-none-window-default": 0.3, "-crop-default": 0.0, "-none-equalize-deep-small": 3.0}
    config = TrainConfig(model="default,deep-small", lungs="none,crop", lung_attention="default=2,deep-small:crop=0.5")
    config.validate()
    assert [(model, view, strength_for(config.lung_attention, model, view)) for model, view in config.cnn_views] == [
        ("default", ("none", "none"), 2.0), ("deep-small", ("none", "none"), 0.0),
        ("default", ("crop", "none"), 2.0), ("deep-small", ("crop", "none"), 0.5)]
    assert parse_strengths("0.25") == {None: 0.25} and strength_for("0.25", "tiny", ("crop", "none")) == 0.25
    assert TrainConfig(model="tiny", lungs="none").attention_strength == 0.0      # no entry for it: none


@pytest.mark.parametrize("spec", ["-0.5", "nan", "inf", "strong", "default=", "=1", "defualt=1", "default:none-wndow=1",
                                  "default:none,crop=1", "0.3,default=1", "0.3,0.4"])
def test_bad_strengths_are_refused_in_one_line(spec):
    with pytest.raises(CovidCTError, match=f"--lung-attention {spec}: expected a number >= 0, or PRESET"):
        TrainConfig(lung_attention=spec).validate()


def test_the_penalty_is_refused_where_it_cannot_work():
    with pytest.raises(CovidCTError, match="--freeze-backbone"):
        TrainConfig(lung_attention="1", model="default", lungs="none", freeze_backbone=True).validate()
    with pytest.raises(CovidCTError, match="not on resnet-small"):
        TrainConfig(lung_attention="1", model="resnet-small", lungs="none").validate()
    # the default's entries do not name these models: nothing to refuse
    TrainConfig(model="resnet-small", lungs="none", freeze_backbone=True).validate()


def test_the_strategy_is_chosen_by_the_option(tmp_path):
    images, labels = phantom(8)
    config = TrainConfig(out=str(tmp_path / "r"), model="default", lungs="none", epochs=1,
                         progress=False, lung_attention="default=0.5")
    trainer = Trainer(config, data=TrainData(images, labels, images, labels), log=lambda *a: None)
    strategy = strategy_for(trainer, 0)
    assert isinstance(strategy, LungAttention) and strategy.strength == 0.5
    assert len(strategy.front) + len(strategy.back) == len(trainer.model)


def test_a_run_saved_before_the_option_resumes_without_the_penalty(tmp_path):
    import argparse
    import json
    from dataclasses import asdict

    from covidct.options import config_from_args

    saved = asdict(TrainConfig(out=str(tmp_path)))
    del saved["lung_attention"]                                          # a session-17 run's config.json
    (tmp_path / "config.json").write_text(json.dumps(saved))
    resumed = config_from_args(TrainConfig, argparse.Namespace(resume=str(tmp_path)))
    assert resumed.lung_attention == "0" and resumed.model == TrainConfig().model
    saved["lung_attention"] = "deep-small=2"
    (tmp_path / "config.json").write_text(json.dumps(saved))
    assert config_from_args(TrainConfig, argparse.Namespace(resume=str(tmp_path))).lung_attention == "deep-small=2"
