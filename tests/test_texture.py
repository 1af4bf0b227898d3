"""covidct.texture (lung-texture features, logistic regression) and examples/texture_member.py."""
from dataclasses import replace

import numpy as np
import pandas as pd
import pytest

from covidct.checkpoint import read_checkpoint
from covidct.cv import cross_validate, join_runs
from covidct.lungs import find_lungs
from covidct.metrics import roc_auc
from covidct.synthetic import make_slice, write_dataset
from covidct.texture import N_FEATURES, L2_GRID, choose_l2, fit_logistic, lbp_codes, lung_texture_features

from conftest_models import load_example, tiny_train_config


def test_lbp_codes_of_flat_ramp_and_checkerboard_images():
    assert (lbp_codes(np.full((6, 6), 0.5), 1) == 8).all()              # every neighbour "at least as bright"
    ramp = np.tile(np.arange(9.0)[:, None], (1, 9))                     # brighter downwards
    assert (lbp_codes(ramp, 2) == 5).all()                              # 3 above darker, 5 level or below
    board = (np.indices((7, 7)).sum(axis=0) % 2).astype(float)
    codes = lbp_codes(board, 1)
    assert set(np.unique(codes[board[1:-1, 1:-1] == 1])) == {9}          # white: alternating ring, not uniform
    assert set(np.unique(codes[board[1:-1, 1:-1] == 0])) == {8}          # black: every neighbour as bright


def test_lung_texture_features_of_a_phantom_slice():
    gray = make_slice(1, np.random.default_rng(3), 128)
    lungs = find_lungs(gray)
    assert lungs.found
    features = lung_texture_features(gray, lungs.mask)
    assert features.shape == (N_FEATURES,) and np.isfinite(features).all()
    np.testing.assert_array_equal(features, lung_texture_features(gray, lungs.mask))
    assert (features[:32] ** 2).sum() == pytest.approx(1)              # the lungs' gray-level shares
    assert (features[32:48] ** 2).sum() == pytest.approx(1, abs=0.05)  # gradients above 0.3 fall outside
    whole = lung_texture_features(gray, None)                          # no plausible mask: the whole slice
    assert (whole[-8:] == 0).all() and not np.allclose(whole[:32], features[:32])


def test_fit_logistic_separates_and_shrinks():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(80, 3))
    y = (x[:, 0] + 0.5 * x[:, 1] > 0).astype(int)
    weak, strong = fit_logistic(x, y, 1e-4), fit_logistic(x, y, 1.0)
    assert roc_auc(y, weak.log_odds(x)) == 1.0
    assert np.linalg.norm(strong.weights) < 0.5 * np.linalg.norm(weak.weights)
    np.testing.assert_array_equal(weak.weights, fit_logistic(x, y, 1e-4).weights)
    groups = [f"s{i // 2}" for i in range(80)]                           # two slices per source
    assert choose_l2(x, y, groups) in L2_GRID


def test_texture_member_example_writes_a_run_that_cv_join_takes(tmp_path, capsys):
    data = write_dataset(tmp_path / "data", n=40, seed=8, size=64)
    config = tiny_train_config(data, tmp_path / "cv", epochs=1, lungs="none,crop")
    cross_validate(config, folds=2, log=lambda *_: None)
    example = load_example("texture_member")
    assert example.main([str(tmp_path / "cv"), "--out", str(tmp_path / "tex")]) == 0
    printed = capsys.readouterr().out
    assert "the texture model alone: pooled OOF AUC" in printed and "3 cross-validations joined" in printed
    import pandas as pd
    oof = pd.read_csv(tmp_path / "tex" / "oof.csv")
    run = pd.read_csv(tmp_path / "cv" / "oof.csv")
    run = run.sort_values("file")
    assert list(oof["file"]) == list(run["file"]) and (oof["fold_r0"].values == run["fold_r0"].values).all()
    assert oof["p_covid_r0"].between(0, 1, inclusive="neither").all()
    joined = join_runs([f"{tmp_path / 'cv'}:none", f"{tmp_path / 'cv'}:crop", tmp_path / "tex"])
    assert 0 <= joined["pooled"]["auc"] <= 1
    assert example.main([str(tmp_path / "cv"), "--out", str(tmp_path / "again")]) == 0     # deterministic
    pd.testing.assert_frame_equal(oof, pd.read_csv(tmp_path / "again" / "oof.csv"))

    capsys.readouterr()
    assert example.main([str(tmp_path / "nowhere")]) == 2
    error = capsys.readouterr().err
    assert "no such file" in error and len(error.strip().splitlines()) == 1


# ------------------------------------------------------------------ the texture member in saved ensembles
@pytest.fixture(scope="module")
def texture_run(tmp_path_factory):
    """A tiny ensemble with two texture members (--model tiny,texture,texture:none-equalize: the
    window-calibrated and the equalised gray scale) trained on a phantom -> (data, run)."""
    from covidct.train import train

    root = tmp_path_factory.mktemp("texture-run")
    data = write_dataset(root / "data", n=40, seed=5, size=64)
    train(tiny_train_config(data, root / "run", epochs=1, lungs="none,crop",
                            model="tiny,texture,texture:none-equalize"), log=lambda *_: None)
    return data, root / "run"


def test_saved_ensemble_predicts_with_its_texture_member_as_on_validation(texture_run):
    import pandas as pd
    from covidct.checkpoint import load_checkpoint
    from covidct.predict import predict_files

    data, run = texture_run
    model, meta = load_checkpoint(run / "ensemble.npz")
    assert len(model.members) == 2 and [t.intensity for t in model.textures] == ["window", "equalize"]
    assert [t["view"]["intensity"] for t in meta["textures"]] == ["window", "equalize"]
    assert meta["textures"][0]["features"] == N_FEATURES
    assert meta["textures"][0]["l2"] in L2_GRID
    saved = pd.read_csv(run / "predictions.csv")           # the validation scores train_members combined
    rows, failures, _ = predict_files(run / "ensemble.npz", list(saved["file"]))
    assert not failures
    np.testing.assert_allclose([row["p_covid"] for row in rows], saved["p_covid"], atol=1e-5)


def test_texture_member_changes_the_prediction_and_is_required(texture_run):
    from covidct.checkpoint import load_checkpoint
    from covidct.ensemble import Ensemble, reads_texture
    from covidct.errors import CovidCTError
    from covidct.evaluate import predict_proba
    from covidct.preprocess import Preprocess, load_images
    from covidct.data import read_dataset
    from covidct.texture import gray_scale_features, texture_features

    data, run = texture_run
    model, meta = load_checkpoint(run / "ensemble.npz")
    images, labels, paths = load_images(read_dataset(data, split="val"), Preprocess.from_dict(meta["preprocess"]))
    with pytest.raises(CovidCTError, match="lung-texture member"):
        predict_proba(model, images, 0.0, 1.0)
    with pytest.raises(CovidCTError, match=r"shape \(\d+, 188\)"):              # one gray scale is not enough
        predict_proba(model, images, 0.0, 1.0, features=texture_features(paths))
    features = texture_features(paths, ["window", "equalize"])
    with_texture = predict_proba(model, images, 0.0, 1.0, features=features)
    cnns = Ensemble(model.members, model.normalizations, model.tta, model.views, model.combine, model.frame_views)
    assert reads_texture(model) and not reads_texture(cnns)
    without = predict_proba(cnns, images, 0.0, 1.0)
    window, equalized = (model.textures[i].p_covid(gray_scale_features(features, i)) for i in (0, 1))
    log_odds = lambda p: np.log(p) - np.log1p(-p)             # noqa: E731
    # four members alike: the mean log-odds of the two CNNs (each with its mirror image) and the texture models
    np.testing.assert_allclose(log_odds(with_texture),
                               (2 * log_odds(without) + log_odds(window) + log_odds(equalized)) / 4, atol=1e-4)
    assert not np.allclose(window, equalized)


def test_texture_ensemble_export_and_cli(texture_run, tmp_path):
    import subprocess
    import sys

    data, run = texture_run
    onnx = subprocess.run([sys.executable, "-m", "covidct", "export", "--checkpoint", str(run / "ensemble.npz"),
                           "--format", "onnx", "--out", str(tmp_path / "model.onnx")], capture_output=True, text=True)
    assert onnx.returncode != 0 and "lung-texture members" in onnx.stderr and "Traceback" not in onnx.stderr
    assert len(onnx.stderr.strip().splitlines()) == 1
    evaluate = subprocess.run([sys.executable, "-m", "covidct", "evaluate", "--checkpoint", str(run / "ensemble.npz"),
                               "--data", str(data), "--split", "val", "--out", str(tmp_path / "eval")],
                              capture_output=True, text=True)
    assert evaluate.returncode == 0, evaluate.stderr
    import pandas as pd
    np.testing.assert_allclose(pd.read_csv(tmp_path / "eval" / "predictions.csv")["p_covid"],
                               pd.read_csv(run / "predictions.csv")["p_covid"], atol=1e-5)


@pytest.mark.parametrize("model, message", [("texture", "name a CNN preset too"),
                                            ("tiny,texture:crop", "optionally 'texture'"),
                                            ("tiny,texture:none-window,crop", "optionally 'texture'"),
                                            ("tiny,texture:none-bright", "optionally 'texture'"),
                                            ("tiny,texture,texture", "optionally 'texture'"),
                                            ("tiny,texture,texture:none-window", "two texture models on the same")])
def test_texture_entry_of_model_is_checked(model, message):
    from covidct.errors import CovidCTError
    from covidct.train import TrainConfig

    with pytest.raises(CovidCTError, match=message):
        TrainConfig(model=model).validate()
    default = TrainConfig()
    assert default.texture and default.is_ensemble and len(default.model_views) == 2
    assert TrainConfig(model="tiny,texture", lungs="none").is_ensemble
    both = TrainConfig(model="tiny,texture:none-equalize,texture:none", lungs="none")
    both.validate()
    assert both.texture_intensities == ("equalize", "none") and both.model_views == (("tiny", None),)


def test_texture_features_on_several_gray_scales():
    from covidct.texture import gray_texture_features, texture_name

    gray = make_slice(1, np.random.default_rng(4), 160)
    window = gray_texture_features(gray)
    three = gray_texture_features(gray, ("window", "equalize", "none"))
    assert three.shape == (3 * N_FEATURES,)
    np.testing.assert_array_equal(three[:N_FEATURES], window)                  # the same mask, read three ways
    assert not np.allclose(three[N_FEATURES:2 * N_FEATURES], window)
    assert [texture_name(i) for i in ("window", "equalize", "none")] == ["texture", "texture-none-equalize",
                                                                         "texture-none"]


def test_texture_inputs_in_worker_processes_are_the_serial_numbers(texture_run):
    """evaluate / predict compute an ensemble's texture features in one worker per core: each worker
    takes a run of neighbouring slices, and the rows come back in order, bit for bit the serial ones."""
    from covidct.checkpoint import load_checkpoint
    from covidct.preprocess import read_gray
    from covidct.texture import gray_texture_features, texture_features, texture_inputs

    data, run = texture_run
    model, _ = load_checkpoint(run / "ensemble.npz")
    paths = sorted(data.rglob("*.png"))[:7]                      # 7 = 3 + 4: uneven runs
    serial = np.stack([gray_texture_features(read_gray(path), ("window", "equalize")) for path in paths])
    for jobs in (1, 2, 3):
        np.testing.assert_array_equal(texture_inputs(model, paths, jobs=jobs), serial)
    np.testing.assert_array_equal(texture_inputs(model, grays=[read_gray(path) for path in paths], jobs=2), serial)
    assert texture_features([], ("window",), jobs=2).shape == (0, N_FEATURES)
    assert texture_inputs(model, grays=[], jobs=2).shape == (0, 2 * N_FEATURES)


def test_cv_fits_the_texture_model_per_fold_and_joins_it(tmp_path):
    from covidct.checkpoint import load_checkpoint
    from covidct.cv import model_names

    data = write_dataset(tmp_path / "data", n=40, seed=8, size=64)
    config = tiny_train_config(data, tmp_path / "cv", epochs=1, lungs="none",
                               model="tiny,texture,texture:none-equalize", tta=False)
    result = cross_validate(config, folds=2, log=lambda *_: None)
    assert model_names(tmp_path / "cv") == ["texture", "texture-none-equalize"]   # r<R>-fold<F>-<name>/heldout.csv
    cnn = cross_validate(tiny_train_config(data, tmp_path / "cnn", epochs=1, lungs="none", tta=False), folds=2,
                         log=lambda *_: None)
    joined = join_runs([tmp_path / "cnn", f"{tmp_path / 'cv'}:texture",      # the same CNN folds + the texture models
                        f"{tmp_path / 'cv'}:texture-none-equalize"])
    assert result["pooled"]["auc"] == pytest.approx(joined["pooled"]["auc"])
    assert cnn["pooled"]["auc"] != result["pooled"]["auc"] or cnn["threshold"] != result["threshold"]
    model, meta = load_checkpoint(tmp_path / "cv" / "ensemble.npz")
    assert len(model.members) == 2 and len(model.textures) == 4               # one CNN and two texture models a fold
    assert [t.intensity for t in model.textures] == ["window", "equalize"] * 2


def test_cv_workers_compute_the_texture_features_beside_the_slowest_models_first(tmp_path):
    from covidct.cv import model_names
    from covidct.workers import training_cost

    data = write_dataset(tmp_path / "data", n=32, seed=9, size=48)
    extra = write_dataset(tmp_path / "extra", n=12, seed=10, size=48)
    config = tiny_train_config(data, tmp_path / "one", epochs=1, lungs="none", tta=False, image_size=32,
                               model="tiny,deep-small,texture", extra_data=(str(extra / "Images-processed"),))
    one = cross_validate(config, folds=2, log=lambda *_: None)
    logs = []
    two = cross_validate(replace(config, out=str(tmp_path / "two")), folds=2, jobs=2, log=logs.append)
    assert any("beside the fold models" in line for line in logs)
    assert two["pooled"] == one["pooled"] and two["per_fold"] == one["per_fold"]
    for name in model_names(tmp_path / "one"):                          # tiny, deep-small and texture alike
        for fold in range(2):
            held_out = [pd.read_csv(tmp_path / run / f"r0-fold{fold}-{name}" / "heldout.csv") for run in ("one", "two")]
            pd.testing.assert_frame_equal(*held_out)

    assert training_cost(replace(config, model="deep-small"), 10) > 2 * training_cost(replace(config, model="tiny"), 10)


def test_train_jobs_trains_the_members_in_workers_with_the_serial_results(tmp_path):
    from covidct.errors import CovidCTError
    from covidct.train import train
    from covidct.workers import check_jobs

    data = write_dataset(tmp_path / "data", n=32, seed=11, size=48)
    config = tiny_train_config(data, tmp_path / "one", epochs=1, lungs="none,crop", tta=False, image_size=32,
                               model="tiny,texture")
    one = train(config, log=lambda *_: None)
    logs = []
    two = train(replace(config, out=str(tmp_path / "two")), jobs=2, log=logs.append)
    assert any("beside the members" in line for line in logs)
    assert sum("trained:" in line for line in logs) == 2                # tiny on both views
    assert two["val"] == one["val"] and two["threshold"] == one["threshold"]
    for name in ("member0-none", "member0-crop"):                       # bit for bit
        serial, _, _ = read_checkpoint(tmp_path / "one" / name / "best.npz")
        parallel, _, _ = read_checkpoint(tmp_path / "two" / name / "best.npz")
        for key in serial:
            np.testing.assert_array_equal(serial[key], parallel[key], err_msg=f"{name} {key}")
        assert "epoch 1" in (tmp_path / "two" / name / "log.txt").read_text()
    pd.testing.assert_frame_equal(pd.read_csv(tmp_path / "one" / "predictions.csv"),
                                  pd.read_csv(tmp_path / "two" / "predictions.csv"))
    with pytest.raises(CovidCTError, match="--jobs 2 trains models in CPU worker processes"):
        check_jobs(2, "gpu")                         # (train checks --device gpu's CuPy first)
    with pytest.raises(CovidCTError, match="--jobs must be >= 1"):
        train(config, jobs=0)


def test_hand_edited_texture_gray_scale_is_one_line(texture_run, tmp_path):
    import subprocess
    import sys

    import minicnn as mc

    data, run = texture_run
    stored, meta = mc.serialization.load(run / "ensemble.npz")
    meta["textures"][1]["view"]["intensity"] = "sepia"
    edited = mc.serialization.save(tmp_path / "edited.npz", stored, meta)
    image = next(data.rglob("*.png"))
    done = subprocess.run([sys.executable, "-m", "covidct", "predict", "--checkpoint", str(edited), str(image)],
                          capture_output=True, text=True)
    assert done.returncode != 0 and "Traceback" not in done.stderr and len(done.stderr.strip().splitlines()) == 1
    assert "gray scale of window, equalize, none" in done.stderr
