"""DataLoader: batches, epochs, determinism, prefetch, normalisation, device."""
import threading

import numpy as np
import pytest

from covidct.augment import parse_augment
from covidct.errors import DataError
from covidct.loader import DataLoader
from minicnn.backend import gpu_available


def data(n=23, size=8):
    rng = np.random.default_rng(0)
    return rng.uniform(0, 1, (n, 1, size, size)).astype(np.float32), (np.arange(n) % 2).astype(np.int64)


def collect(loader):
    return [(x.copy(), y.copy()) for x, y in loader]


def test_batches_cover_every_sample_once():
    x, y = data()
    loader = DataLoader(x, y, batch_size=5, seed=1)
    batches = collect(loader)
    assert len(loader) == len(batches) == 5
    assert [len(b[1]) for b in batches] == [5, 5, 5, 5, 3]
    xb, yb = batches[0]
    assert xb.dtype == np.float32 and xb.shape == (5, 1, 8, 8) and yb.dtype == np.int64
    seen = np.concatenate([b[0] for b in batches])
    assert sorted(map(bytes, seen)) == sorted(map(bytes, x))          # a permutation of the data


def test_drop_last_and_no_shuffle():
    x, y = data()
    loader = DataLoader(x, y, batch_size=5, drop_last=True, shuffle=False)
    batches = collect(loader)
    assert len(loader) == 4 and all(len(b[1]) == 5 for b in batches)
    assert np.array_equal(batches[0][0], x[:5])


def test_set_epoch_reproduces_order_and_augmentation():
    x, y = data()
    aug = parse_augment("flip,rotate:20,translate:0.1")
    a = DataLoader(x, y, 4, seed=7, augment=aug)
    run = [collect(a) for _ in range(3)]                 # epochs 0, 1, 2 via the internal counter
    b = DataLoader(x, y, 4, seed=7, augment=aug)
    b.set_epoch(2)                                        # a resumed run starting at epoch 2
    resumed = collect(b)
    for (x1, y1), (x2, y2) in zip(run[2], resumed):
        assert np.array_equal(x1, x2) and np.array_equal(y1, y2)
    assert not np.array_equal(run[0][0][0], run[1][0][0])              # epochs differ
    c = DataLoader(x, y, 4, seed=8, augment=aug)
    assert not np.array_equal(collect(c)[0][0], run[0][0][0])          # seeds differ


def test_prefetch_gives_identical_batches():
    x, y = data()
    aug = parse_augment("flip,rotate,blur:1:1")
    on = collect(DataLoader(x, y, 4, seed=3, augment=aug, prefetch=True))
    off = collect(DataLoader(x, y, 4, seed=3, augment=aug, prefetch=False))
    assert len(on) == len(off)
    for (x1, y1), (x2, y2) in zip(on, off):
        assert np.array_equal(x1, x2) and np.array_equal(y1, y2)


def test_break_stops_prefetch_thread():
    x, y = data(200)
    before = threading.active_count()
    for i, _ in enumerate(DataLoader(x, y, 2, prefetch=True)):
        if i == 1:
            break
    assert threading.active_count() == before


def test_prefetch_error_reaches_caller():
    x, y = data()

    def broken(batch, rng):
        raise RuntimeError("augment failed")
    with pytest.raises(RuntimeError, match="augment failed"):
        collect(DataLoader(x, y, 4, augment=broken, prefetch=True))


def test_no_augmentation_and_input_untouched():
    x, y = data()
    before = x.copy()
    loader = DataLoader(x, y, 4, shuffle=False, augment=parse_augment("none"))
    assert loader.augment is None
    batches = collect(DataLoader(x, y, 4, shuffle=False, augment=parse_augment("flip:1")))
    assert np.array_equal(batches[0][0], x[:4, :, :, ::-1])
    assert np.array_equal(x, before)


def test_normalize():
    x, y = data()
    batches = collect(DataLoader(x, y, 23, shuffle=False, normalize=(0.5, 0.25)))
    assert np.allclose(batches[0][0], (x - 0.5) / 0.25, atol=1e-6)


@pytest.mark.parametrize("kwargs, message", [
    (dict(batch_size=0), "batch_size=0"),
    (dict(batch_size=50, drop_last=True), "gives no batches"),
    (dict(device="tpu"), "device='tpu'"),
    (dict(normalize=(0.5, 0.0)), "std=0.0"),
])
def test_bad_arguments(kwargs, message):
    x, y = data()
    with pytest.raises(DataError, match=message):
        DataLoader(x, y, **{"batch_size": 4, **kwargs})


def test_bad_shapes():
    x, y = data()
    with pytest.raises(DataError, match="labels must be"):
        DataLoader(x, y[:-1], 4)
    with pytest.raises(DataError, match=r"\(N, C, H, W\)"):
        DataLoader(x[:, 0], y, 4)


@pytest.mark.skipif(not gpu_available(), reason="no usable GPU (CuPy)")
def test_gpu_batches():
    from minicnn.backend import device_of
    x, y = data()
    xb, yb = next(iter(DataLoader(x, y, 4, device="gpu")))
    assert device_of(xb) == "gpu" and device_of(yb) == "gpu"
