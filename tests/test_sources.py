"""Sources of slices (covidct.sources) and source-balanced sampling (DataLoader weights, --sampling sources)."""
import numpy as np
import pytest

from covidct.errors import CovidCTError, DataError
from covidct.loader import DataLoader
from covidct.sources import slice_groups, source_weights
from covidct.train import TrainConfig, TrainData, Trainer

PATHS = ["x/2020.1-p1-1.png", "x/2020.1-p1-2.png", "x/2020.1-p2-3.png", "x/2020.1-p3-4.png",   # one preprint: 4
         "x/2020.2-p1-1.png",                                                                     # another: 1
         "x/39%0.jpg", "x/39%1.jpg", "x/40%0.jpg", "x/1058.png", "x/1059.png", "x/77.png"]
LABELS = [1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0]


def test_every_source_of_a_class_weighs_alike_and_classes_keep_their_share():
    weights = source_weights(PATHS, LABELS)
    groups = np.array(slice_groups(PATHS, LABELS))
    labels = np.array(LABELS)
    for label in (0, 1):
        totals = [weights[groups == g].sum() for g in set(groups[labels == label])]
        assert np.allclose(totals, totals[0])                          # each source the same total
        assert weights[labels == label].sum() == pytest.approx((labels == label).sum())
    assert weights[0] == pytest.approx(weights[4] / 4)                  # a slice of 4 vs a slice alone


def test_weighted_loader_draws_in_proportion_and_repeats_per_seed():
    images = np.zeros((4, 1, 2, 2), np.float32)
    loader = DataLoader(images, np.array([0, 1, 0, 1]), batch_size=4, weights=[3, 1, 0, 0], prefetch=False)
    draws = np.concatenate([loader.order(epoch) for epoch in range(500)])
    assert set(draws) == {0, 1} and np.mean(draws == 0) == pytest.approx(0.75, abs=0.03)
    again = DataLoader(images, np.array([0, 1, 0, 1]), batch_size=4, weights=[3, 1, 0, 0])
    assert np.array_equal(loader.order(7), again.order(7)) and len(loader.order(7)) == 4
    for bad in ([1, 1], [1, -1, 1, 1], [0, 0, 0, 0], [np.nan, 1, 1, 1]):
        with pytest.raises(DataError, match="weights must be"):
            DataLoader(images, np.array([0, 1, 0, 1]), weights=bad)


def make_config(tmp_path, **overrides):
    values = dict(out=str(tmp_path / "run"), model="tiny", epochs=1, batch_size=4, progress=False,
                  warmup_epochs=0, sampling="sources", lungs="none")
    values.update(overrides)
    return TrainConfig(**values)


def test_trainer_samples_by_source_only_when_asked_and_when_sources_differ(tmp_path):
    rng = np.random.default_rng(0)
    images = rng.random((len(PATHS), 1, 32, 32), dtype=np.float32)
    data = TrainData(images, np.array(LABELS), images[:4], np.array([0, 1, 0, 1]), PATHS, PATHS[:4])
    by_source = Trainer(make_config(tmp_path), data=data, log=lambda *a: None)
    assert np.allclose(by_source.loader.weights * len(PATHS), source_weights(PATHS, LABELS))
    by_source.fit()
    assert Trainer(make_config(tmp_path, sampling="shuffle"), data=data).loader.weights is None
    singletons = TrainData(images, np.array(LABELS), images[:4], np.array([0, 1, 0, 1]))   # train[i]: one each
    assert Trainer(make_config(tmp_path), data=singletons).loader.weights is None
    with pytest.raises(CovidCTError, match="--sampling must be shuffle or sources"):
        make_config(tmp_path, sampling="sources-ish").validate()
