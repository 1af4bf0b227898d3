"""Image decoding, resizing, caching, skip_bad, normalisation."""
import time
import warnings

import numpy as np
import pytest
from PIL import Image

from conftest_data import REAL_DATA, gradient, make_ucsd, write_image, zero_size_png
from covidct.data import Dataset, read_dataset
from covidct.errors import DataError
from covidct.preprocess import (Preprocess, clear_memory_cache, compute_normalization, load_image, load_images,
                                normalize)

MODES = ["L", "RGB", "RGBA", "P", "LA", "1", "I;16", "CMYK", "F"]
FORMAT = {"CMYK": "JPEG", "F": "TIFF"}


@pytest.fixture(autouse=True)
def _fresh_memory_cache():
    clear_memory_cache()
    yield
    clear_memory_cache()


def _name(mode):
    return mode.replace(";", "") + "." + {"JPEG": "jpg", "TIFF": "tif"}.get(FORMAT.get(mode), "png")


@pytest.mark.parametrize("mode", MODES)
def test_every_mode_gives_one_gray_float_image(tmp_path, mode):
    path = write_image(tmp_path / _name(mode), mode, fmt=FORMAT.get(mode))
    assert Image.open(path).mode.startswith(mode[:1])
    image = load_image(path, Preprocess(size=32))
    assert image.shape == (1, 32, 32) and image.dtype == np.float32
    assert 0.0 <= image.min() and image.max() <= 1.0
    assert image.max() > 0.5                       # the bright square survived


@pytest.mark.parametrize("mode", ["RGB", "RGBA", "P", "LA", "I;16", "F"])
def test_modes_agree_with_grayscale(tmp_path, mode):
    """The same picture in another mode gives the same array: format is no label shortcut."""
    pre = Preprocess(size=24, resize="stretch")
    reference = load_image(write_image(tmp_path / "ref.png", "L"), pre)
    other = load_image(write_image(tmp_path / _name(mode), mode, fmt=FORMAT.get(mode)), pre)
    assert np.abs(other - reference).max() < 1.5 / 255


def test_16_bit_scaled_by_its_range_not_min_max(tmp_path):
    value = np.full((20, 24), 1000, np.uint16)
    path = tmp_path / "dark16.png"
    Image.fromarray(value).save(path)
    image = load_image(path, Preprocess(size=8, resize="stretch"))
    assert np.allclose(image, 1000 / 65535, atol=1e-6)


def test_rgba_alpha_composited_onto_black(tmp_path):
    rgba = np.zeros((20, 24, 4), np.uint8)
    rgba[..., :3] = 200
    rgba[..., 3] = 128
    path = tmp_path / "half.png"
    Image.fromarray(rgba).save(path)
    image = load_image(path, Preprocess(size=8, resize="stretch"))
    assert np.allclose(image, 200 / 255 * 128 / 255, atol=1e-5)


def test_pad_keeps_aspect_stretch_fills(tmp_path):
    path = write_image(tmp_path / "wide.png", "L", size=(40, 20), value=np.full((20, 40), 255, np.uint8))
    padded = load_image(path, Preprocess(size=32, resize="pad"))[0]
    stretched = load_image(path, Preprocess(size=32, resize="stretch"))[0]
    rows = np.flatnonzero(padded.max(axis=1) > 0.5)
    assert len(rows) == 16 and rows[0] == 8                   # centred band, black bars above and below
    assert padded[0].max() == 0 and padded[-1].max() == 0
    assert stretched.min() > 0.99                             # whole square filled
    assert Preprocess().resize == "pad"


def test_preprocess_settings_round_trip_and_validate():
    pre = Preprocess(size=96, resize="stretch")
    assert Preprocess.from_dict(pre.to_dict()) == pre
    assert pre.to_dict() == {"size": 96, "resize": "stretch", "lungs": "none", "lung_margin": 0.08,
                             "intensity": "none"}
    assert Preprocess.from_dict({"size": 96, "resize": "stretch"}) == pre     # checkpoints from before lungs
    with pytest.raises(DataError, match="lungs='chest'"):
        Preprocess(lungs="chest")
    with pytest.raises(DataError, match="resize='crop'"):
        Preprocess(resize="crop")
    with pytest.raises(DataError, match="size=0"):
        Preprocess(size=0)
    with pytest.raises(DataError, match="unknown keys"):
        Preprocess.from_dict({"size": 8, "colour": 1})


# ------------------------------------------------------------------ bad files
def test_corrupt_truncated_image(tmp_path):
    good = write_image(tmp_path / "good.png", "L", size=(64, 64))
    bad = tmp_path / "truncated.png"
    bad.write_bytes(good.read_bytes()[:60])
    with pytest.raises(DataError, match=r"truncated\.png: (corrupt|not a readable)"):
        load_image(bad, Preprocess(size=16))


def test_non_image_and_empty_file(tmp_path):
    text = tmp_path / "notes.png"
    text.write_text("this is not a picture")
    with pytest.raises(DataError, match=r"notes\.png: not a readable image"):
        load_image(text, Preprocess(size=16))
    empty = tmp_path / "empty.jpg"
    empty.write_bytes(b"")
    with pytest.raises(DataError, match=r"empty\.jpg: empty file"):
        load_image(empty, Preprocess(size=16))


def test_zero_size_image(tmp_path):
    with pytest.raises(DataError, match=r"zero\.png: zero-size image \(0x0 px\)"):
        load_image(zero_size_png(tmp_path / "zero.png"), Preprocess(size=16))


def test_missing_file(tmp_path):
    with pytest.raises(DataError, match=r"gone\.png: file not found"):
        load_image(tmp_path / "gone.png", Preprocess(size=16))


def test_size_below_minimum(tmp_path):
    path = write_image(tmp_path / "a.png")
    with pytest.raises(DataError, match="size=8 is below the minimum image size 32"):
        load_image(path, Preprocess(size=8), min_size=32)
    ds = Dataset([str(path)], [1])
    with pytest.raises(DataError, match="size=8 is below"):
        load_images(ds, Preprocess(size=8), min_size=32)
    # "pad": a very wide image ends up too thin, and the error names it
    wide = write_image(tmp_path / "wide.png", "L", size=(200, 10), value=np.full((10, 200), 99, np.uint8))
    with pytest.raises(DataError, match=r"wide\.png: after resize .* content is 64x3 px"):
        load_image(wide, Preprocess(size=64), min_size=16)


def _dataset_with_bad_files(tmp_path):
    paths = [write_image(tmp_path / f"ok{i}.png", "L") for i in range(4)]
    (tmp_path / "broken.png").write_text("garbage")
    (tmp_path / "empty.png").write_bytes(b"")
    paths += [tmp_path / "broken.png", tmp_path / "empty.png", tmp_path / "missing.png"]
    return Dataset(paths, [1, 0, 1, 0, 1, 0, 1], "t", str(tmp_path))


def test_bad_file_stops_by_default(tmp_path):
    with pytest.raises(DataError, match=r"broken\.png: not a readable image"):
        load_images(_dataset_with_bad_files(tmp_path), Preprocess(size=16))


def test_skip_bad_warns_once_and_writes_list(tmp_path):
    ds = _dataset_with_bad_files(tmp_path)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        images, labels, paths = load_images(ds, Preprocess(size=16), cache_dir=tmp_path / "cache", skip_bad=True)
    messages = [str(w.message) for w in caught]
    assert len(messages) == 1 and "skipped 3 of 7 images" in messages[0]
    assert images.shape == (4, 1, 16, 16) and list(labels) == [1, 0, 1, 0]      # labels stay with their images
    assert len(paths) == 4
    listing = (tmp_path / "cache" / "skipped_files.txt").read_text().splitlines()
    assert len(listing) == 3
    assert listing[0].endswith("broken.png\tnot a readable image (cannot identify image file)")
    assert any("empty.png\tempty file" in line for line in listing)
    assert any("missing.png\tfile not found" in line for line in listing)


def test_skip_bad_refuses_to_empty_a_class(tmp_path):
    good = write_image(tmp_path / "ok.png")
    (tmp_path / "bad.png").write_text("x")
    ds = Dataset([good, tmp_path / "bad.png"], [1, 0])
    with pytest.warns(UserWarning, match="skipped 1"), pytest.raises(DataError, match="class 0 was bad"):
        load_images(ds, Preprocess(size=16), skip_bad=True, skipped_log=tmp_path / "skipped.txt")
    assert "bad.png" in (tmp_path / "skipped.txt").read_text()


# ------------------------------------------------------------------ cache
def test_cache_second_load_equals_first_and_invalidates(tmp_path):
    root = make_ucsd(tmp_path / "data", 2, 2)
    ds = read_dataset(root, "train")
    cache = tmp_path / "cache"
    pre = Preprocess(size=16)
    first = load_images(ds, pre, cache_dir=cache)
    assert len(list(cache.rglob("*.npz"))) == 4
    clear_memory_cache()                                     # force the on-disk cache
    second = load_images(ds, pre, cache_dir=cache)
    assert np.array_equal(first[0], second[0]) and np.array_equal(first[1], second[1])

    # Change one file's content (same name, same size): the cache must not return the old image.
    target = ds.paths[0]
    Image.fromarray(255 - gradient()).save(target)
    third = load_images(ds, pre, cache_dir=cache)
    assert not np.array_equal(third[0][0], first[0][0])
    assert np.array_equal(third[0][0], load_image(target, pre))
    assert np.array_equal(third[0][1:], first[0][1:])

    # Other settings: other cache entries.
    fourth = load_images(ds, Preprocess(size=16, resize="stretch"), cache_dir=cache)
    assert not np.array_equal(fourth[0], third[0])
    assert len(list(cache.glob("images-*"))) == 2


def test_damaged_cache_entry_is_rebuilt(tmp_path):
    ds = Dataset([write_image(tmp_path / "a.png")], [1])
    cache = tmp_path / "cache"
    first = load_images(ds, Preprocess(size=16), cache_dir=cache)[0]
    for entry in cache.rglob("*.npz"):
        entry.write_bytes(b"not an npz")
    clear_memory_cache()
    assert np.array_equal(load_images(ds, Preprocess(size=16), cache_dir=cache)[0], first)


# ------------------------------------------------------------------ normalisation
def test_normalization():
    rng = np.random.default_rng(0)
    images = rng.uniform(0.2, 0.6, size=(5, 1, 8, 8)).astype(np.float32)
    mean, std = compute_normalization(images)
    assert isinstance(mean, float) and isinstance(std, float)
    out = normalize(images, mean, std)
    assert out.dtype == np.float32 and out.shape == images.shape
    assert abs(out.mean()) < 1e-5 and abs(out.std() - 1) < 1e-4
    with pytest.raises(DataError, match="standard deviation"):
        compute_normalization(np.zeros((2, 1, 4, 4), np.float32))


# ------------------------------------------------------------------ real data
def test_real_images_of_every_mode_load(tmp_path):
    if not REAL_DATA.is_dir():
        pytest.skip(f"real COVID-CT data not found at {REAL_DATA} (set COVIDCT_DATA to its folder)")
    ds = read_dataset(REAL_DATA, "train")
    chosen, seen = [], set()
    for i, path in enumerate(ds.paths):                  # the first image of each (mode, format, class)
        with Image.open(path) as image:
            key = (image.mode, image.format, int(ds.labels[i]))
        if key not in seen:
            seen.add(key)
            chosen.append(i)
    assert {"RGB", "RGBA", "L"} <= {mode for mode, _, _ in seen}
    assert len(chosen) <= 20
    subset = ds.subset(chosen)
    start = time.perf_counter()
    images, labels, _ = load_images(subset, Preprocess(size=64), cache_dir=tmp_path)
    assert images.shape == (len(chosen), 1, 64, 64) and images.dtype == np.float32
    assert 0 <= images.min() and images.max() <= 1 and images.std() > 0.05
    assert time.perf_counter() - start < 30


# -- intensity="equalize" ---------------------------------------------------------------------------

def test_equalize_spreads_gray_levels_in_order_and_ignores_window_and_gamma():
    from covidct.preprocess import equalize
    gray = (np.random.default_rng(0).integers(0, 10, (40, 50)) / 10).astype(np.float32)
    flat = equalize(gray)
    assert flat.dtype == np.float32 and flat.shape == gray.shape
    assert flat[gray == 0].max() == 0 and flat[gray == gray.max()].min() == 1     # air stays black
    order = np.argsort(gray.ravel(), kind="stable")
    assert np.all(np.diff(flat.ravel()[order]) >= 0)                           # brighter never maps darker
    # another window (gamma, contrast, offset) of the same slice: the same equalised slice
    assert np.array_equal(equalize(gray ** 2), flat)
    assert np.array_equal(equalize(0.2 + 0.5 * gray), flat)
    blank = np.full((8, 8), 0.3, np.float32)
    assert np.array_equal(equalize(blank), blank)                              # nothing to spread


def test_window_calibrate_puts_lungs_and_soft_tissue_at_fixed_grays_whatever_the_window():
    from covidct.lungs import find_lungs
    from covidct.preprocess import LUNG_GRAY, SOFT_TISSUE_GRAY, window_calibrate
    from covidct.synthetic import make_slice
    gray = make_slice(1, np.random.default_rng(3), size=128).astype(np.float32)
    calibrated = window_calibrate(gray)
    lungs = find_lungs(gray)
    assert lungs.found and calibrated.dtype == np.float32 and calibrated.shape == gray.shape
    assert np.median(calibrated[lungs.mask]) == pytest.approx(LUNG_GRAY, abs=1e-3)
    assert SOFT_TISSUE_GRAY > LUNG_GRAY and 0 <= calibrated.min() and calibrated.max() <= 1
    # the same slice shown with another (linear, unsaturated) window and level: the same calibrated slice
    np.testing.assert_allclose(window_calibrate(0.25 + 0.5 * gray), calibrated, atol=0.02)
    order = np.argsort(gray.ravel(), kind="stable")
    assert np.all(np.diff(calibrated.ravel()[order]) >= 0)                     # density order kept
    blank = np.full((64, 64), 0.3, np.float32)
    assert window_calibrate(blank) is blank                                    # no lungs: unchanged


def test_preprocess_equalize_is_stored_and_changes_the_cache_key(tmp_path):
    from covidct.model import preset
    from covidct.train import TrainConfig, preprocess_for
    pre = preprocess_for(TrainConfig(intensity="equalize", lungs="none", model="tiny"), preset("tiny"))
    assert pre.intensity == "equalize" and Preprocess.from_dict(pre.to_dict()) == pre
    assert pre.key() != Preprocess(size=pre.size).key()
    assert Preprocess(size=32).key() == Preprocess(size=32, intensity="none").key()
    path = write_image(tmp_path / "g.png", "L", value=(gradient(60, 40) // 2).astype(np.uint8))
    image = load_image(path, Preprocess(size=32, intensity="equalize"))
    assert image.max() == pytest.approx(1.0) and image.shape == (1, 32, 32)
    with pytest.raises(DataError, match="intensity"):
        Preprocess(intensity="clahe")
    window = Preprocess(size=32, intensity="window")
    assert window.key() not in (pre.key(), Preprocess(size=32).key())
    assert load_image(path, window).shape == (1, 32, 32)                     # no lungs here: the slice as is
    TrainConfig(data="x", intensity="none,window").validate()                 # a view of its own too
