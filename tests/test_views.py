"""Multi-view ensembles (--lungs none,crop): one model per lung view, one checkpoint whose input has one
channel per view, the members' probabilities combined by their normalised geometric mean."""
import subprocess
import sys
from dataclasses import replace

import numpy as np
import pandas as pd
import pytest

from covidct.checkpoint import load_checkpoint, read_checkpoint
from covidct.cv import cross_validate
from covidct.data import read_dataset
from covidct.ensemble import Ensemble, build_ensemble, combine_probabilities, save_ensemble
from covidct.errors import CovidCTError, DataError
from covidct.evaluate import predict_checkpoint
from covidct.gradcam import gradcam
from covidct.preprocess import Preprocess, load_image
from covidct.synthetic import write_dataset
from covidct.train import TrainConfig, ensemble_members
from conftest_models import tiny_train_config, train_on_phantom, write_checkpoint


def config(data, out, **overrides):
    return tiny_train_config(data, out, **{**dict(lungs="none,crop"), **overrides})


@pytest.fixture(scope="module")
def views_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("views")
    data, summary, logs = train_on_phantom(root, seed=3, size=64, lungs="none,crop", tta=False)  # TTA: test_members
    return root, data, summary, logs


def test_a_multi_view_preprocess_stacks_one_channel_per_view(tmp_path):
    data = write_dataset(tmp_path / "data", n=6, seed=1, size=64)
    path = read_dataset(data, "train").paths[0]
    both = load_image(path, Preprocess(size=32, resize="stretch", lungs="none,crop"))
    whole = load_image(path, Preprocess(size=32, resize="stretch", lungs="none"))
    crop = load_image(path, Preprocess(size=32, resize="stretch", lungs="crop"))
    assert both.shape == (2, 32, 32)
    np.testing.assert_array_equal(both[0], whole[0])
    np.testing.assert_array_equal(both[1], crop[0])
    assert not np.array_equal(whole, crop)                   # the phantom's lungs were found and cut out
    assert Preprocess(lungs="none,crop").views == (("none", "none"), ("crop", "none"))
    four = load_image(path, Preprocess(size=32, resize="stretch", lungs="none,crop", intensity="none,equalize"))
    crop_equalized = load_image(path, Preprocess(size=32, resize="stretch", lungs="crop", intensity="equalize"))
    assert four.shape == (4, 32, 32)                          # lungs-major: whole, whole eq., crop, crop eq.
    np.testing.assert_array_equal(four[[0, 2]], both)
    np.testing.assert_array_equal(four[3], crop_equalized[0])
    for bad in ("crop,crop", "none,lobes", "", "none-lobes", "lobes-window", "none,none-none", "crop-window,crop-window"):
        with pytest.raises(DataError, match="lungs"):
            Preprocess(lungs=bad)
        with pytest.raises(CovidCTError, match="--lungs"):
            TrainConfig(data="x", lungs=bad).validate()
    with pytest.raises(CovidCTError, match="--intensity"):
        TrainConfig(data="x", intensity="none,none").validate()


def test_a_view_may_name_its_own_intensity(tmp_path):
    data = write_dataset(tmp_path / "data", n=6, seed=1, size=64)
    path = read_dataset(data, "train").paths[0]
    paired = Preprocess(size=32, resize="stretch", lungs="none-window,crop")
    assert paired.views == (("none", "window"), ("crop", "none"))
    assert Preprocess(lungs="none-window,crop", intensity="none,equalize").views == (
        ("none", "window"), ("crop", "none"), ("crop", "equalize"))       # a plain entry takes every --intensity
    both = load_image(path, paired)
    whole_window = load_image(path, Preprocess(size=32, resize="stretch", lungs="none", intensity="window"))
    crop = load_image(path, Preprocess(size=32, resize="stretch", lungs="crop"))
    assert both.shape == (2, 32, 32)
    np.testing.assert_array_equal(both[0], whole_window[0])
    np.testing.assert_array_equal(both[1], crop[0])
    assert not np.array_equal(whole_window, load_image(path, Preprocess(size=32, resize="stretch")))
    config = TrainConfig(data="x", lungs="none-window,crop", model="default,deep-small")
    config.validate()
    plan = [(view, member.lungs, member.intensity, suffix) for view, member, suffix, _ in ensemble_members(config)]
    assert plan == [(0, "none", "window", "-none-window-default"), (0, "none", "window", "-none-window-deep-small"),
                    (1, "crop", "none", "-crop-default"), (1, "crop", "none", "-crop-deep-small")]


def test_members_of_views_that_make_no_product_join_view_by_view(tmp_path):
    def member(name, lungs, intensity="none", seed=0):
        return write_checkpoint(tmp_path / f"{name}.npz", seed=seed, epoch=1,
                                preprocess=Preprocess(size=32, resize="stretch", lungs=lungs, intensity=intensity))

    members = [member("whole-window", "none", "window"), member("crop", "crop", seed=1)]
    joined = save_ensemble(tmp_path / "ensemble.npz", members, threshold=0.5)
    ensemble, meta = load_checkpoint(joined)
    assert meta["preprocess"]["lungs"] == "none-window,crop" and ensemble.views == [0, 1]   # 2 channels, not 4
    product = save_ensemble(tmp_path / "product.npz", [member("whole", "none"), members[1]], threshold=0.5)
    assert load_checkpoint(product)[1]["preprocess"]["lungs"] == "none,crop"                # as before
    x = np.stack([load_image(p, Preprocess.from_dict(meta["preprocess"]))
                  for p in read_dataset(write_dataset(tmp_path / "data", n=6, seed=2, size=64), "train").paths])
    alone = [predict_checkpoint(members[0], x[:, :1].copy()), predict_checkpoint(members[1], x[:, 1:].copy())]
    np.testing.assert_allclose(predict_checkpoint(joined, x), combine_probabilities(alone), atol=1e-6)

    # Grad-CAM draws every member whose view lies in channel 0's frame: the whole slice, however shown
    members.append(member("whole-equalized", "none", "equalize", seed=2))
    three, meta = load_checkpoint(save_ensemble(tmp_path / "three.npz", members, threshold=0.5))
    assert meta["preprocess"]["lungs"] == "none-window,crop,none-equalize" and three.frame_views == [0, 2]
    x = np.random.default_rng(0).random((3, 3, 32, 32), dtype=np.float32)
    total = sum(gradcam(three.members[i], three.member_input(x, i), target_class=1).astype(np.float64)
                for i in (0, 2))
    np.testing.assert_allclose(gradcam(three, x, target_class=1),
                               total / total.max(axis=(1, 2), keepdims=True), atol=1e-5)


def test_one_model_per_view_joined_into_one_checkpoint(views_run):
    root, data, summary, logs = views_run
    run = root / "run"
    assert summary["members"] == 2 and summary["checkpoint"] == str(run / "ensemble.npz")
    _, _, whole_meta = read_checkpoint(run / "member0-none" / "best.npz")
    _, _, crop_meta = read_checkpoint(run / "member0-crop" / "best.npz")
    assert whole_meta["preprocess"]["lungs"] == "none" and crop_meta["preprocess"]["lungs"] == "crop"
    assert whole_meta["train_config"]["seed"] == crop_meta["train_config"]["seed"] == 0
    ensemble, meta = load_checkpoint(run / "ensemble.npz")
    assert isinstance(ensemble, Ensemble) and ensemble.views == [0, 1] and ensemble.combine == "geometric"
    assert meta["preprocess"]["lungs"] == "none,crop"
    paths = read_dataset(data, "test").paths
    both = np.stack([load_image(p, Preprocess.from_dict(meta["preprocess"])) for p in paths])
    together = predict_checkpoint(run / "ensemble.npz", both)
    alone = [predict_checkpoint(run / "member0-none" / "best.npz", both[:, :1].copy()),
             predict_checkpoint(run / "member0-crop" / "best.npz", both[:, 1:].copy())]
    np.testing.assert_allclose(together, combine_probabilities(alone), atol=1e-6)
    assert not np.allclose(together, np.mean(alone, axis=0), atol=1e-9)     # geometric, not arithmetic
    with pytest.raises(CovidCTError, match="one channel per view"):
        predict_checkpoint(run / "ensemble.npz", both[:, :1].copy())          # one view is not enough
    assert sum("--lungs crop --intensity none" in line for line in logs) == 1


def test_the_multi_view_ensemble_on_the_command_line(views_run, tmp_path):
    root, data, _, _ = views_run
    checkpoint = root / "run" / "ensemble.npz"

    def covidct(*args):
        return subprocess.run([sys.executable, "-m", "covidct", *map(str, args)], capture_output=True, text=True,
                              timeout=300)

    image = read_dataset(data, "test").paths[0]
    predicted = covidct("predict", "--checkpoint", checkpoint, image, "--gradcam", tmp_path / "overlays")
    assert predicted.returncode == 0 and "COVID" in predicted.stdout, predicted.stderr
    assert len(list((tmp_path / "overlays").glob("*.png"))) == 1
    evaluated = covidct("evaluate", "--checkpoint", checkpoint, "--data", data, "--split", "test",
                        "--out", tmp_path / "eval", "--cache-dir", tmp_path / "cache")
    assert evaluated.returncode == 0 and "test split" in evaluated.stdout, evaluated.stderr
    pictures = covidct("viz", "gradcam", "--checkpoint", checkpoint, "--data", data, "--split", "test",
                       "--out", tmp_path / "cam.png", "--cache-dir", tmp_path / "cache")
    assert pictures.returncode == 0 and (tmp_path / "cam.png").is_file(), pictures.stderr
    refused = covidct("train", "--data", data, "--lungs", "crop,crop", "--out", tmp_path / "bad")
    assert refused.returncode != 0 and "--lungs='crop,crop': expected one of" in refused.stderr
    assert "Traceback" not in refused.stderr


def test_gradcam_of_a_multi_view_ensemble_is_that_of_its_whole_slice_members(views_run):
    root, _, _, _ = views_run
    ensemble, _ = load_checkpoint(root / "run" / "ensemble.npz")
    whole, meta = load_checkpoint(root / "run" / "member0-none" / "best.npz")
    x = np.random.default_rng(0).random((3, 2, 32, 32), dtype=np.float32)
    mean, std = meta["normalization"]["mean"], meta["normalization"]["std"]
    expected = gradcam(whole, (x[:, :1] - np.float32(mean)) / np.float32(std), target_class=1)
    np.testing.assert_allclose(gradcam(ensemble, x, target_class=1), expected, atol=1e-5)


def test_frame_boxes_place_each_lung_crop_in_the_whole_slice():
    from covidct.lungs import crop_box, crop_to_lungs, find_lungs
    from covidct.preprocess import frame_boxes
    from covidct.synthetic import make_slice

    gray = np.pad(make_slice(1, np.random.default_rng(2), size=96), ((0, 0), (24, 24)))   # 96 x 144: wider than high
    lungs = find_lungs(gray)
    top, bottom, left, right = crop_box(lungs, gray.shape, 0.08)
    assert lungs.found and crop_to_lungs(gray, lungs).shape == (bottom - top, right - left)
    stretch = frame_boxes(gray, Preprocess(size=48, resize="stretch", lungs="none,crop"))
    np.testing.assert_allclose(stretch[0], [0, 48, 0, 48])                  # channel 0: the whole frame
    np.testing.assert_allclose(stretch[1], [top / 2, bottom / 2, left / 3, right / 3])     # 96 -> 48, 144 -> 48
    pad = frame_boxes(gray, Preprocess(size=48, resize="pad", lungs="none,crop"))
    np.testing.assert_allclose(pad[1], [8 + top / 3, 8 + bottom / 3, left / 3, right / 3])  # 32 rows, 8 above
    assert np.isnan(frame_boxes(gray, Preprocess(size=48, lungs="crop,none"))).all()      # channel 0 a crop


def test_gradcam_pastes_the_crop_members_heat_into_the_crop_box(views_run):
    from covidct.gradcam import frame_boxes_of, paste_map
    from covidct.preprocess import read_gray

    np.testing.assert_allclose(paste_map(np.ones((4, 4)), (2, 6, 1, 3), (8, 8)),
                               np.pad(np.ones((4, 2)), ((2, 2), (1, 5))))
    root, data, _, _ = views_run
    ensemble, meta = load_checkpoint(root / "run" / "ensemble.npz")
    crop, crop_meta = load_checkpoint(root / "run" / "member0-crop" / "best.npz")
    preprocess = Preprocess.from_dict(meta["preprocess"])
    paths = read_dataset(data, "test").paths[:3]
    x = np.stack([load_image(p, preprocess) for p in paths])
    boxes = frame_boxes_of(ensemble, preprocess, map(read_gray, paths))
    assert boxes.shape == (3, 2, 4) and frame_boxes_of(crop, preprocess, map(read_gray, paths)) is None
    whole_only = gradcam(ensemble, x, target_class=1).astype(np.float64)   # the whole-slice member alone
    mean, std = crop_meta["normalization"]["mean"], crop_meta["normalization"]["std"]
    crop_maps = gradcam(crop, (x[:, 1:] - np.float32(mean)) / np.float32(std), target_class=1)
    total = whole_only + [paste_map(m, box, (32, 32)) for m, box in zip(crop_maps, boxes[:, 1])]
    both = gradcam(ensemble, x, target_class=1, boxes=boxes)
    np.testing.assert_allclose(both, total / total.max(axis=(1, 2), keepdims=True), atol=1e-5)
    assert not np.allclose(both, whole_only, atol=1e-3)


def test_onnx_export_of_a_multi_view_ensemble(views_run, tmp_path):
    pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    from covidct.cli import main
    from covidct.evaluate import predict_logits
    root, _, _, _ = views_run
    out = tmp_path / "views.onnx"
    assert main(["export", "--checkpoint", str(root / "run" / "ensemble.npz"), "--format", "onnx",
                 "--out", str(out)]) == 0
    ensemble, _ = load_checkpoint(root / "run" / "ensemble.npz")
    x = np.random.default_rng(1).random((4, 2, 32, 32), dtype=np.float32)
    for tta in (False, True):
        ensemble.tta = tta
        if tta:
            from covidct.export import export_onnx
            export_onnx(ensemble, load_checkpoint(root / "run" / "ensemble.npz")[1], out)
        session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
        assert session.get_inputs()[0].shape[1] == 2
        logits, probabilities = session.run(["logits", "probabilities"], {"image": x})
        expected = predict_logits(ensemble, x, 0.0, 1.0)
        np.testing.assert_allclose(logits, expected, atol=1e-5)
        np.testing.assert_allclose(probabilities, np.exp(expected), atol=1e-6)


def test_ensembles_saved_before_combine_rules_keep_the_arithmetic_mean(views_run):
    root, _, _, _ = views_run
    _, _, meta = read_checkpoint(root / "run" / "ensemble.npz")
    old = {k: v for k, v in meta.items() if k != "combine"}
    assert build_ensemble(old).combine == "mean"
    p = np.array([[0.9, 0.2], [0.5, 0.4]])
    np.testing.assert_allclose(combine_probabilities(p, "mean"), [0.7, 0.3])
    odds = np.sqrt(0.9 / 0.1 * 0.5 / 0.5)                      # geometric: the mean log-odds
    assert combine_probabilities(p)[0] == pytest.approx(odds / (1 + odds))
    with pytest.raises(CovidCTError, match="view 5"):
        build_ensemble({**meta, "members": [{**m, "view": 5} for m in meta["members"]]})
    with pytest.raises(CovidCTError, match="combine rule"):
        Ensemble([object()], [(0.0, 1.0)], combine="median")


def test_cv_trains_every_view_per_fold_and_combines_them(tmp_path):
    data = write_dataset(tmp_path / "data", n=24, seed=5, size=64)
    cv_config = config(data, tmp_path / "cv", epochs=1)
    logs = []
    result = cross_validate(cv_config, folds=2, log=logs.append)
    assert sum("held-out AUC" in line for line in logs) == 4 and any("x 2 views" in l for l in logs)
    oof = pd.read_csv(tmp_path / "cv" / "oof.csv").set_index("file")
    for fold in range(2):
        whole = pd.read_csv(tmp_path / "cv" / f"r0-fold{fold}-none" / "heldout.csv").set_index("file")["p_covid"]
        crop = pd.read_csv(tmp_path / "cv" / f"r0-fold{fold}-crop" / "heldout.csv").set_index("file")["p_covid"]
        assert np.allclose(oof.loc[whole.index, "p_covid"], combine_probabilities([whole, crop.loc[whole.index]]))
    ensemble, meta = load_checkpoint(tmp_path / "cv" / "ensemble.npz")
    assert len(ensemble.members) == 4 and meta["preprocess"]["lungs"] == "none,crop"
    assert "2 views (--lungs none,crop" in (tmp_path / "cv" / "cv.md").read_text() and result["members"] == 1
    with pytest.raises(CovidCTError, match="--extra-mode pretrain"):
        cross_validate(replace(cv_config, extra_data=(str(data),), extra_mode="pretrain"), folds=2)
