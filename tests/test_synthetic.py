"""Synthetic CT phantom: shape, range, determinism, learnable signal, UCSD layout on disk."""
import json
import time

import numpy as np
import pytest
from PIL import Image

from covidct.data import describe, list_splits, read_dataset
from covidct.errors import DataError
from covidct.preprocess import Preprocess, load_images
from covidct.synthetic import make_slice, make_slices, write_dataset


@pytest.mark.parametrize("label", [0, 1])
def test_slice_shape_range_and_seed(label):
    a = make_slice(label, np.random.default_rng(5), size=64)
    b = make_slice(label, np.random.default_rng(5), size=64)
    c = make_slice(label, np.random.default_rng(6), size=64)
    assert a.shape == (64, 64) and a.dtype == np.float32
    assert 0 <= a.min() and a.max() <= 1
    assert np.array_equal(a, b) and not np.array_equal(a, c)
    assert a[0, 0] < 0.1                              # air in the corner
    assert 0.3 < a[32, 32] < 1                        # tissue in the middle (mediastinum/heart)


def test_bad_arguments():
    rng = np.random.default_rng(0)
    with pytest.raises(DataError, match="label=2"):
        make_slice(2, rng)
    with pytest.raises(DataError, match="difficulty=1.5"):
        make_slice(1, rng, difficulty=1.5)
    with pytest.raises(DataError, match="split_fractions"):
        write_dataset("unused", n=10, split_fractions=(0.5, 0.6, 0.1))


def test_generation_is_fast():
    start = time.perf_counter()
    images, labels = make_slices(40, size=128)
    elapsed = time.perf_counter() - start
    assert images.shape == (40, 1, 128, 128) and labels.tolist() == [1, 0] * 20
    assert elapsed < 4.0                               # ~10 ms per slice; 600 slices in seconds


def _lesions(seed, size=64, difficulty=0.5):
    """COVID slice minus the non-COVID slice drawn from the same rng: the lesions alone."""
    covid = make_slice(1, np.random.default_rng(seed), size, difficulty)
    other = make_slice(0, np.random.default_rng(seed), size, difficulty)
    return covid - other


def test_only_lesions_differ_between_classes_and_they_brighten_the_lungs():
    for seed in range(6):
        diff = _lesions(seed)
        assert diff.min() > -0.02                       # lesions only add density
        assert diff.sum() > 5                           # ... and there are some (> 5 pixel-units)
        assert (diff > 0.05).mean() < 0.25              # inside the lungs, not everywhere


def test_difficulty_makes_lesions_fainter():
    easy = np.mean([_lesions(seed, difficulty=0.0).sum() for seed in range(8)])
    hard = np.mean([_lesions(seed, difficulty=1.0).sum() for seed in range(8)])
    assert easy > 1.5 * hard > 0


def test_write_dataset_ucsd_layout_and_reuse(tmp_path):
    out = write_dataset(tmp_path / "syn", n=20, seed=3, size=32)
    assert list_splits(out) == ["train", "val", "test"]
    sizes = {s: read_dataset(out, s).counts() for s in ("train", "val", "test")}
    assert sizes["train"] == {"non-COVID": 6, "COVID": 6}          # 10 per class: 6 / 2 / 2
    assert sizes["val"] == sizes["test"] == {"non-COVID": 2, "COVID": 2}
    png = next((out / "Images-processed" / "CT_COVID").glob("*.png"))
    with Image.open(png) as image:
        assert image.mode == "L" and image.format == "PNG" and image.size == (32, 32)
    d = describe(out)
    assert all(set(s["formats"]) == {"PNG"} and set(s["modes"]) == {"L"} for s in d["splits"].values())
    meta = json.loads((out / "synthetic.json").read_text())
    assert meta["n"] == 20 and meta["size"] == 32 and meta["difficulty"] == 0.5

    # Same parameters: reused, files untouched. Other parameters: rewritten.
    stamp = png.stat().st_mtime_ns
    write_dataset(out, n=20, seed=3, size=32)
    assert png.stat().st_mtime_ns == stamp
    write_dataset(out, n=12, seed=3, size=32)
    assert len(list((out / "Images-processed" / "CT_COVID").glob("*.png"))) == 6
    assert json.loads((out / "synthetic.json").read_text())["n"] == 12

    ds = read_dataset(out, "train")
    images, labels, _ = load_images(ds, Preprocess(size=32))
    assert images.shape[0] == len(ds) and set(labels.tolist()) == {0, 1}


def test_written_pngs_match_make_slices(tmp_path):
    out = write_dataset(tmp_path, n=6, seed=4, size=32)
    images, labels = make_slices(6, seed=4, size=32)
    png = np.asarray(Image.open(out / "Images-processed" / "CT_COVID" / "syn_covid_0000.png"), np.float32) / 255
    assert np.abs(png - images[0, 0]).max() <= 0.5 / 255 + 1e-6
