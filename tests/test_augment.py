"""Augmentation: each transform does what it says, is seeded, keeps dtype/shape, never edits its input."""
import numpy as np
import pytest
from scipy import ndimage

from covidct.augment import (Blur, Brightness, Compose, Contrast, HorizontalFlip, RandomResizedCrop, Rotate,
                             Translate, VerticalFlip, parse_augment)
from covidct.errors import DataError

ALL = [HorizontalFlip(), VerticalFlip(), Rotate(15), Translate(0.1), Blur(1.0), Brightness(0.1), Contrast(0.1),
       RandomResizedCrop(0.8)]


def batch(n=4, size=32, seed=0):
    x = np.random.default_rng(seed).uniform(0, 1, size=(n, 1, size, size)).astype(np.float32)
    x[:, :, 4:12, 6:14] = 1.0                     # an off-centre bright block
    return x


def rng(seed=0):
    return np.random.default_rng(seed)


@pytest.mark.parametrize("transform", ALL, ids=str)
def test_dtype_shape_and_input_untouched(transform):
    x = batch()
    before = x.copy()
    out = transform(x, rng())
    assert out.dtype == np.float32 and out.shape == x.shape
    assert np.array_equal(x, before)
    assert out is not x


@pytest.mark.parametrize("transform", ALL, ids=str)
def test_same_seed_same_batch_different_seed_different(transform):
    x = batch(n=8)
    assert np.array_equal(transform(x, rng(1)), transform(x, rng(1)))
    assert not np.array_equal(transform(x, rng(1)), transform(x, rng(2)))


def test_flip_twice_is_identity():
    x = batch()
    for flip in (HorizontalFlip(p=1), VerticalFlip(p=1)):
        once = flip(x, rng())
        assert not np.array_equal(once, x)
        assert np.array_equal(flip(once, rng()), x)
    assert np.array_equal(HorizontalFlip(p=1)(x, rng())[..., ::-1], x)


def test_rotate_zero_is_identity_and_rotation_moves_pixels():
    x = batch()
    assert np.array_equal(Rotate(0)(x, rng()), x)
    assert np.abs(Rotate(30)(x, rng()) - x).mean() > 0.05


def _centre_of_mass(image):
    return np.array(ndimage.center_of_mass(image[0]))


def test_translate_moves_centre_of_mass():
    x = np.zeros((1, 1, 32, 32), np.float32)
    x[0, 0, 12:20, 12:20] = 1
    out = Translate(0.2)(x, rng(3))
    shift = _centre_of_mass(out[0]) - _centre_of_mass(x[0])
    assert np.abs(shift).max() > 0.5
    assert abs(out.sum() - x.sum()) < 1e-3                    # moved, not lost (it stays inside)


def test_blur_lowers_high_frequency_energy():
    x = batch()
    out = Blur(sigma=2.0, p=1.0)(x, rng())

    def high_freq(a):
        return float(np.sum(np.diff(a, axis=-1) ** 2) + np.sum(np.diff(a, axis=-2) ** 2))
    assert high_freq(out) < 0.7 * high_freq(x)


def test_brightness_contrast_stay_in_range():
    x = batch()
    for transform in (Brightness(0.5), Contrast(0.9)):
        out = transform(x, rng())
        assert out.min() >= 0 and out.max() <= 1


def test_random_resized_crop_zooms_in():
    x = np.zeros((1, 1, 32, 32), np.float32)
    x[0, 0, 14:18, 14:18] = 1
    out = RandomResizedCrop(0.3)(x, rng(1))
    assert (out > 0.5).sum() > (x > 0.5).sum()                 # the square got bigger
    assert np.array_equal(RandomResizedCrop(1.0)(np.ones_like(x), rng()), np.ones_like(x))


# ------------------------------------------------------------------ spec strings
def test_parse_aliases_and_canonical_string():
    full = parse_augment("flip,rotate:15,translate:0.1,blur:1.0")
    assert str(full) == "hflip:0.5,rotate:15,translate:0.1,blur:1"
    assert parse_augment("1,2,3,5") == full
    assert str(parse_augment("2")) == str(parse_augment("rotate")) == "rotate:15"
    assert parse_augment(str(full)) == full                     # round trip
    assert str(parse_augment(" Rotate:10 , vflip:0.2,crop:0.7,brightness:0.2,contrast:0.3,blur:2:1")) == \
        "rotate:10,vflip:0.2,crop:0.7,brightness:0.2,contrast:0.3,blur:2:1"
    assert full.describe() == str(full)


@pytest.mark.parametrize("spec", ["none", "", None, "NONE"])
def test_none_is_no_augmentation(spec):
    aug = parse_augment(spec)
    assert isinstance(aug, Compose) and len(aug) == 0 and str(aug) == "none" and not aug
    x = batch()
    assert np.array_equal(aug(x, rng()), x)


@pytest.mark.parametrize("spec, bad", [("flip,spin", "'spin'"), ("4", "'4'"), ("rotate:abc", "'rotate:abc'"),
                                       ("rotate:500", "'rotate:500'"), ("flip:1:2", "'flip:1:2'"),
                                       ("translate:0.9", "'translate:0.9'")])
def test_bad_spec_names_token_and_valid_names(spec, bad):
    with pytest.raises(DataError) as info:
        parse_augment(spec)
    message = str(info.value)
    assert bad in message and "\n" not in message
    if "unknown" in message:
        assert "valid names: hflip, vflip, rotate, translate, blur" in message


def test_compose_applies_in_order_with_one_rng():
    x = batch()
    aug = Compose([HorizontalFlip(p=1), VerticalFlip(p=1)])
    assert np.array_equal(aug(x, rng()), x[..., ::-1, ::-1])
    assert parse_augment(aug) is aug and parse_augment(Rotate(5)) == Compose([Rotate(5)])
