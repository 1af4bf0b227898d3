"""The fast im2col / strided-slice paths equal naive loop implementations."""
import numpy as np
import pytest

import minicnn as mc
from minicnn.im2col import col2im, im2col
from reference import conv2d_naive, maxpool2d_naive, maxpool2d_naive_backward
from test_gradcheck import tie_free


@pytest.mark.parametrize("shape, kernel, stride, padding", [
    ((2, 3, 7, 9), (3, 3), (1, 1), (1, 1)),
    ((1, 2, 8, 5), (5, 2), (2, 1), (2, 0)),
    ((3, 1, 10, 10), (3, 3), (3, 3), (0, 0)),   # size that does not divide: rounds down
    ((1, 4, 6, 7), (1, 1), (2, 3), (0, 1)),
])
def test_conv2d_forward_matches_loops(shape, kernel, stride, padding):
    rng = np.random.default_rng(0)
    conv = mc.Conv2d(shape[1], 4, kernel, stride, padding, rng=rng, dtype=np.float64)
    x = rng.standard_normal(shape)
    expected = conv2d_naive(x, conv.weight.data, conv.bias.data, stride, padding)
    np.testing.assert_allclose(conv(x), expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("kernel, stride, padding", [((2, 2), (2, 2), (0, 0)), ((3, 3), (1, 1), (0, 0)),
                                                     ((3, 3), (2, 2), (1, 1)), ((2, 3), (1, 2), (1, 1))])
def test_maxpool2d_forward_and_backward_match_loops(kernel, stride, padding):
    x = tie_free((2, 3, 7, 8))
    pool = mc.MaxPool2d(kernel, stride, padding)
    expected, winner = maxpool2d_naive(x, kernel, stride, padding)
    out = pool(x)
    np.testing.assert_array_equal(out, expected)
    upstream = np.random.default_rng(0).standard_normal(out.shape)
    np.testing.assert_allclose(pool.backward(upstream), maxpool2d_naive_backward(upstream, winner, x.shape), atol=1e-12)


def test_maxpool2d_ties_go_to_the_first_element_like_pytorch():
    pool = mc.MaxPool2d(2)
    pool(np.ones((1, 1, 2, 2)))
    np.testing.assert_array_equal(pool.backward(np.ones((1, 1, 1, 1)))[0, 0], [[1, 0], [0, 0]])


def test_col2im_is_the_adjoint_of_im2col():
    """<im2col(x), c> == <x, col2im(c)> for all x, c: col2im is exactly im2col's transpose."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 3, 7, 6))
    args = dict(kernel=(3, 2), stride=(2, 1), padding=(1, 2))
    col = im2col(x, args["kernel"], args["stride"], args["padding"], (4, 9))
    c = rng.standard_normal(col.shape)
    assert np.isclose(np.sum(col * c), np.sum(x * col2im(c, x.shape, args["stride"], args["padding"])))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_dtype_is_preserved_through_every_layer(dtype):
    rng = np.random.default_rng(0)
    net = mc.Sequential(mc.Conv2d(1, 2, 3, padding=1, rng=rng, dtype=dtype), mc.ReLU(), mc.MaxPool2d(2),
                        mc.Flatten(), mc.Dropout(0.5), mc.Linear(2 * 3 * 3, 2, rng=rng, dtype=dtype))
    x = rng.standard_normal((2, 1, 6, 6)).astype(dtype)
    out = net(x)
    loss = mc.SoftmaxCrossEntropy([1, 2])
    value = loss(out, np.array([0, 1]))
    grad_x = net.backward(loss.backward())
    assert out.dtype == dtype and value.dtype == dtype and grad_x.dtype == dtype
    assert all(p.grad.dtype == dtype for p in net.parameters())
