"""Lung fields (covidct.lungs): Dice on the phantom's known lungs, plausibility, and the crop in preprocessing."""
import numpy as np
import pytest

from covidct.lungs import MAX_AREA, crop_to_lungs, find_lungs, lung_mask
from covidct.preprocess import Preprocess, load_image, load_images
from covidct.synthetic import make_slice, write_dataset


def dice(a, b) -> float:
    return 2 * np.logical_and(a, b).sum() / (a.sum() + b.sum())


def test_mask_matches_the_phantoms_true_lungs():
    scores, found = [], 0
    for index in range(24):
        label = index % 2
        image, truth = make_slice(label, np.random.default_rng([3, label, index]), size=128, difficulty=0.3,
                                  with_lung_mask=True)
        lungs = find_lungs(image)
        found += lungs.found
        scores.append(dice(lungs.mask, truth) if lungs.found else 0.0)
    assert found >= 22                                   # fallbacks are rare on the phantom
    assert np.mean(scores) >= 0.9


def test_the_same_slice_with_and_without_the_mask():
    rng = np.random.default_rng([5, 1, 0])
    image, truth = make_slice(1, rng, size=96, with_lung_mask=True)
    again = make_slice(1, np.random.default_rng([5, 1, 0]), size=96)
    assert np.array_equal(image, again)                  # asking for the mask draws no random numbers
    assert 0.1 < truth.mean() < 0.6


def test_implausible_masks_fall_back_to_the_whole_slice():
    blank = np.full((64, 80), 0.5, np.float32)           # no lungs at all
    lungs = find_lungs(blank)
    assert not lungs.found and lungs.box == (0, 64, 0, 80) and lungs.mask.all()
    assert np.array_equal(crop_to_lungs(blank, lungs), blank)
    dark = np.zeros((64, 64), np.float32)
    dark[2:-2, 2:-2] = 0.1                               # a "lung" filling nearly the whole frame
    dark[:2], dark[-2:], dark[:, :2], dark[:, -2:] = 0.9, 0.9, 0.9, 0.9
    assert lung_mask(dark).mean() > MAX_AREA and not find_lungs(dark).found


def test_crop_cuts_to_the_box_and_mask_blanks_outside():
    image, truth = make_slice(0, np.random.default_rng([9, 0, 1]), size=128, with_lung_mask=True)
    lungs = find_lungs(image)
    assert lungs.found
    top, bottom, left, right = lungs.box
    crop = crop_to_lungs(image, lungs, margin=0.0)
    assert crop.shape == (bottom - top, right - left)
    assert np.array_equal(crop, image[top:bottom, left:right])
    blanked = crop_to_lungs(image, lungs, margin=0.0, blank_outside=True)
    outside = ~lungs.mask[top:bottom, left:right]
    assert blanked[outside].max() <= image[top:bottom, left:right][outside].max()
    assert (blanked == 0).mean() > (crop == 0).mean()    # more air than before
    with_margin = crop_to_lungs(image, lungs, margin=0.1)
    assert with_margin.shape[0] > crop.shape[0] and with_margin.shape[1] > crop.shape[1]


def test_big_masks_are_computed_small_and_scaled_back():
    image, _ = make_slice(0, np.random.default_rng([2, 0, 0]), size=128, with_lung_mask=True)
    big = np.kron(image, np.ones((4, 4), np.float32))    # 512 x 512, same picture
    small, large = find_lungs(image), find_lungs(big)
    assert large.mask.shape == big.shape and large.found
    assert abs(large.mask.mean() - small.mask.mean()) < 0.03


def test_preprocess_crop_changes_the_image_and_counts_fallbacks(tmp_path):
    data = write_dataset(tmp_path / "data", n=20, seed=2, size=96)
    path = sorted((data / "Images-processed" / "CT_COVID").glob("*.png"))[0]
    whole = load_image(path, Preprocess(size=64))
    cropped = load_image(path, Preprocess(size=64, lungs="crop"))
    assert cropped.shape == whole.shape == (1, 64, 64)
    assert not np.array_equal(whole, cropped)
    # the padding bands (air) shrink: the lungs fill more of the square
    assert (cropped < 0.02).mean() < (whole < 0.02).mean()

    from covidct.data import read_dataset
    stats = {}
    images, labels, _ = load_images(read_dataset(data, split="train"), Preprocess(size=32, lungs="mask"),
                                    cache_dir=tmp_path / "cache", stats=stats)
    assert stats["images"] == len(images) and 0 <= stats["lung_fallbacks"] <= len(images) // 4
    again = load_images(read_dataset(data, split="train"), Preprocess(size=32, lungs="mask"),
                        cache_dir=tmp_path / "cache", stats=stats)[0]
    assert np.array_equal(images, again)                 # cached entries keep the same pixels


@pytest.mark.parametrize("bad", [{"lungs": "chest"}, {"lung_margin": 2.0}])
def test_preprocess_refuses_bad_lung_settings(bad):
    from covidct.errors import DataError
    with pytest.raises(DataError, match=list(bad)[0]):
        Preprocess(**bad)


def test_viz_lungs_draws_a_contact_sheet_with_red_masks(tmp_path, capsys):
    from covidct.cli import main
    from pictures import assert_picture

    data = write_dataset(tmp_path / "data", n=12, seed=6, size=64)
    out = tmp_path / "lungs.png"
    assert main(["viz", "lungs", "--data", str(data), "--out", str(out), "--n", "6"]) == 0
    assert "of 6 slices fall back" in capsys.readouterr().out
    pixels = assert_picture(out, size=(2.6 * 6 * 100, 2.4 * 100), tolerance=0.4).astype(int)
    red = (pixels[..., 0] > 180) & (pixels[..., 1] < 80) & (pixels[..., 2] < 80)
    assert red.sum() > 100                                 # the mask outlines are drawn
    assert main(["viz", "lungs", "--data", str(data), "--out", str(out), "--n", "0"]) == 2
