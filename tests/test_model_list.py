"""Ensembles of presets (--model default,deep-small): one model of each preset per view, one checkpoint,
the members' probabilities combined by their normalised geometric mean."""
import numpy as np
import pandas as pd
import pytest

from covidct.checkpoint import load_checkpoint, read_checkpoint
from covidct.cv import cross_validate
from covidct.data import read_dataset
from covidct.ensemble import Ensemble, combine_probabilities
from covidct.errors import CovidCTError
from covidct.evaluate import predict_checkpoint
from covidct.gradcam import gradcam
from covidct.model import DeepConfig, preset
from covidct.preprocess import Preprocess, load_image
from covidct.synthetic import write_dataset
from covidct.train import TrainConfig, Trainer, ensemble_members
from conftest_models import tiny_train_config, train_on_phantom

TWO_MODELS = dict(model="tiny,deep-small", image_size=32, lungs="none")


@pytest.fixture(scope="module")
def models_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    data, summary, logs = train_on_phantom(root, seed=4, size=48, tta=False, **TWO_MODELS)  # TTA: test_members
    return root, data, summary, logs


def test_deep_small_is_the_deep_family_with_half_the_filters():
    small, deep = preset("deep-small"), preset("deep")
    assert isinstance(small, DeepConfig) and small.channels == tuple(c // 2 for c in deep.channels)
    assert small.input_size == preset("default").input_size      # so default,deep-small share one input


def test_multiply_adds_are_counted_layer_by_layer():
    from covidct.model import build_model, count_multiply_adds

    tiny = build_model(preset("tiny"))                 # 1x32x32 -> conv 4 3x3 -> pool 2 -> conv 8 3x3 -> pool 2
    by_hand = (32 * 32 * 4 * 9) + (16 * 16 * 8 * 4 * 9) + (16 * 8 * 8 * 8) + (8 * 16) + (2 * 8)  # convs, FC block
    assert count_multiply_adds(tiny, (1, 32, 32)) == by_hand
    assert tiny.training                                     # left as it was, and its forward is the class's again
    assert "forward" not in vars(tiny[0])
    default, deep_small = (build_model(preset(name)) for name in ("default", "deep-small"))
    assert 2 < count_multiply_adds(deep_small, (1, 128, 128)) / count_multiply_adds(default, (1, 128, 128)) < 2.5


def test_a_model_list_is_checked_before_any_work():
    for bad, message in (("default,resnet50", "--model must be one of"), ("tiny,tiny", "several different"),
                         ("default,", "--model must be one of")):
        with pytest.raises(CovidCTError, match=message):
            TrainConfig(data="x", model=bad).validate()
    with pytest.raises(CovidCTError, match="different input sizes .32, 128 px.; give one with --image-size"):
        TrainConfig(data="x", model="tiny,default").validate()
    TrainConfig(data="x", model="tiny,default", image_size=64).validate()
    with pytest.raises(CovidCTError, match="fit one model"):
        TrainConfig(data="x", model="default,deep-small", pretrained=__file__).validate()
    with pytest.raises(CovidCTError, match="one model on one view"):
        Trainer(TrainConfig(data="x", model="default,deep-small", lungs="none"))


def test_members_are_every_view_times_every_preset_view_major():
    config = TrainConfig(data="x", model="default,deep-small", lungs="none,crop", members=2)
    plan = ensemble_members(config)
    assert [(view, c.lungs, c.model, suffix, seed) for view, c, suffix, seed in plan[:4]] == [
        (0, "none", "default", "-none-default", 0), (0, "none", "default", "-none-default", 1),
        (0, "none", "deep-small", "-none-deep-small", 0), (0, "none", "deep-small", "-none-deep-small", 1)]
    assert len(plan) == 8 and plan[-1][1].lungs == "crop" and all(c.members == 1 for _, c, _, _ in plan)
    assert [suffix for _, _, suffix, _ in ensemble_members(TrainConfig(model="default", lungs="none"))] == [""]
    assert config.is_ensemble and not TrainConfig(lungs="none", model="default").is_ensemble


def test_one_model_per_preset_joined_into_one_checkpoint(models_run):
    root, data, summary, logs = models_run
    run = root / "run"
    assert summary["members"] == 2
    members = [run / "member0-tiny" / "best.npz", run / "member0-deep-small" / "best.npz"]
    configs = [read_checkpoint(path)[2]["model_config"] for path in members]
    assert configs[0].get("arch") is None and configs[1]["arch"] == "deep" and configs[1]["input_size"] == 32
    ensemble, meta = load_checkpoint(run / "ensemble.npz")
    assert isinstance(ensemble, Ensemble) and ensemble.views is None and ensemble.combine == "geometric"
    paths = read_dataset(data, "test").paths
    images = np.stack([load_image(p, Preprocess.from_dict(meta["preprocess"])) for p in paths])
    together = predict_checkpoint(run / "ensemble.npz", images)
    alone = [predict_checkpoint(path, images) for path in members]
    assert not np.allclose(alone[0], alone[1])                       # two different networks
    np.testing.assert_allclose(together, combine_probabilities(alone), atol=1e-6)
    assert sum("--model deep-small" in line for line in logs) == 1


def test_gradcam_of_an_ensemble_of_presets_averages_both_networks(models_run):
    root, _, _, _ = models_run
    ensemble, _ = load_checkpoint(root / "run" / "ensemble.npz")
    x = np.random.default_rng(2).random((3, 1, 32, 32), dtype=np.float32)
    total = sum(gradcam(member, ensemble.member_input(x, index), target_class=1).astype(np.float64)
                for index, member in enumerate(ensemble.members))
    expected = total / total.max(axis=(1, 2), keepdims=True)
    np.testing.assert_allclose(gradcam(ensemble, x, target_class=1), expected, atol=1e-5)
    assert len(ensemble.members) == 2 and len(ensemble.members[0]) != len(ensemble.members[1])  # two families


def test_cv_trains_every_preset_per_fold_and_combines_them(tmp_path):
    data = write_dataset(tmp_path / "data", n=24, seed=6, size=48)
    logs = []
    cross_validate(tiny_train_config(data, tmp_path / "cv", epochs=1, **TWO_MODELS), folds=2, log=logs.append)
    assert sum("held-out AUC" in line for line in logs) == 4 and any("x 2 models" in line for line in logs)
    oof = pd.read_csv(tmp_path / "cv" / "oof.csv").set_index("file")
    for fold in range(2):
        scores = [pd.read_csv(tmp_path / "cv" / f"r0-fold{fold}-{model}" / "heldout.csv").set_index("file")["p_covid"]
                  for model in ("tiny", "deep-small")]
        assert np.allclose(oof.loc[scores[0].index, "p_covid"],
                           combine_probabilities([scores[0], scores[1].loc[scores[0].index]]))
    ensemble, _ = load_checkpoint(tmp_path / "cv" / "ensemble.npz")
    assert len(ensemble.members) == 4
    assert "2 models (--model tiny,deep-small)" in (tmp_path / "cv" / "cv.md").read_text()


def test_a_preset_may_take_a_view_of_its_own(tmp_path):
    config = TrainConfig(data="x")                                                # the default recipe
    assert (config.model, config.lungs) == ("default,deep-small:none-equalize,texture,texture:none-equalize",
                                            "none-window,crop")
    config.validate()
    assert config.views == (("none", "window"), ("crop", "none"), ("none", "equalize"))
    assert config.texture_intensities == ("window", "equalize")
    assert [(view, c.model, c.lungs, c.intensity, suffix) for view, c, suffix, _ in ensemble_members(config)] == [
        (0, "default", "none", "window", "-none-window-default"), (1, "default", "crop", "none", "-crop-default"),
        (2, "deep-small", "none", "equalize", "-none-equalize-deep-small")]
    both = TrainConfig(data="x", model="default,deep-small,deep-small:none-equalize")    # the session-10 five
    assert [suffix for _, _, suffix, _ in ensemble_members(both)] == [
        "-none-window-default", "-none-window-deep-small", "-crop-default", "-crop-deep-small",
        "-none-equalize-deep-small"]
    for bad, message in (("default,deep-small:lobes", "--model must be one of"),
                         ("default,default:crop", "already trained on every --lungs view"),
                         ("deep-small:crop", "for one preset among several")):
        with pytest.raises(CovidCTError, match=message):
            TrainConfig(data="x", model=bad, lungs="none,crop").validate()

    data = write_dataset(tmp_path / "data", n=24, seed=6, size=48)
    logs = []
    cross_validate(tiny_train_config(data, tmp_path / "cv", epochs=1, **dict(TWO_MODELS, model="tiny,deep-small:crop")),
                   folds=2, log=logs.append)
    assert sum("held-out AUC" in line for line in logs) == 4                   # 2 models per fold, not 4
    assert {path.name for path in (tmp_path / "cv").glob("r0-fold0-*")} == {"r0-fold0-none-tiny",
                                                                             "r0-fold0-crop-deep-small"}
    ensemble, meta = load_checkpoint(tmp_path / "cv" / "ensemble.npz")
    assert meta["preprocess"]["lungs"] == "none,crop" and ensemble.views == [0, 1, 0, 1]
    assert "x 2 models (--model tiny,deep-small:crop --lungs none" in (tmp_path / "cv" / "cv.md").read_text()
