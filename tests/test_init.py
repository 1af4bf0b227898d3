"""minicnn.init: the Glorot (Xavier) initialisers keep their documented bound and spread, as PyTorch's do."""
import math

import numpy as np
import pytest

from minicnn import init

SHAPE = (64, 32, 3, 3)                     # conv weight: fan_in 288, fan_out 576
FAN_SUM = 32 * 9 + 64 * 9


def test_xavier_uniform_fills_its_bound():
    weight = init.xavier_uniform(SHAPE, gain=2.0, rng=np.random.default_rng(0))
    bound = 2.0 * math.sqrt(6.0 / FAN_SUM)
    assert weight.dtype == np.float32 and weight.shape == SHAPE
    assert np.abs(weight).max() <= bound and np.abs(weight).max() > 0.99 * bound
    assert weight.std() == pytest.approx(bound / math.sqrt(3), rel=0.02)   # U(-b, b): std b / sqrt(3)


def test_xavier_normal_has_its_standard_deviation():
    weight = init.xavier_normal(SHAPE, gain=0.5, rng=np.random.default_rng(1), dtype=np.float64)
    assert weight.dtype == np.float64
    assert weight.std() == pytest.approx(0.5 * math.sqrt(2.0 / FAN_SUM), rel=0.02)
    assert abs(weight.mean()) < 0.05 * weight.std()


def test_xavier_matches_pytorch_in_distribution():
    torch = pytest.importorskip("torch")
    torch.manual_seed(0)
    for ours, theirs in ((init.xavier_uniform, torch.nn.init.xavier_uniform_),
                         (init.xavier_normal, torch.nn.init.xavier_normal_)):
        reference = theirs(torch.empty(SHAPE, dtype=torch.float64), gain=1.5).numpy()
        mine = ours(SHAPE, gain=1.5, rng=np.random.default_rng(2), dtype=np.float64)
        assert mine.std() == pytest.approx(reference.std(), rel=0.03), ours.__name__
    uniform = torch.nn.init.xavier_uniform_(torch.empty(SHAPE, dtype=torch.float64)).numpy()
    assert np.abs(init.xavier_uniform(SHAPE, rng=np.random.default_rng(3))).max() == pytest.approx(
        np.abs(uniform).max(), rel=0.01)                                   # the same bound


def test_xavier_needs_a_two_dimensional_weight():
    with pytest.raises(ValueError, match="at least 2 dimensions"):
        init.xavier_uniform((5,))
