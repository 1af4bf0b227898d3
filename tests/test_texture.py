"""covidct.texture (lung-texture features, logistic regression) and examples/texture_member.py."""
import numpy as np
import pytest

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
