"""Every layer's backward against central finite differences, float64, relative error <= 1e-6."""
import itertools

import numpy as np
import pytest

import minicnn as mc
from minicnn.gradcheck import check_function, check_module, numerical_gradient
from minicnn.module import Module

RTOL = 1e-6


def tie_free(shape, seed=0):
    """Distinct values spaced well apart (a shuffled linspace), so max-pool has no ties."""
    values = np.linspace(-1.0, 1.0, int(np.prod(shape)))
    return np.random.default_rng(seed).permutation(values).reshape(shape)


def kink_free(shape, seed=0, margin=0.05):
    """Random values at least ``margin`` away from 0, where ReLU has its kink."""
    x = np.random.default_rng(seed).uniform(margin, 1.0, size=shape)
    return x * np.random.default_rng(seed + 1).choice([-1.0, 1.0], size=shape)


def fits(size, kernel, padding):
    return kernel <= size + 2 * padding


CONV_GRID = [
    # (batch, in_ch, out_ch, (H, W), kernel, stride, padding)
    (n, c, f, hw, k, s, p)
    for (n, c, f), hw, k, s, p in itertools.product(
        [(1, 1, 1), (2, 3, 2)], [(7, 7), (6, 9)], [1, 3, 5, (3, 5)], [1, 2, 3, (2, 1)], [0, 1, 2, (2, 0)])
    if fits(hw[0], k if isinstance(k, int) else k[0], p if isinstance(p, int) else p[0])
    and fits(hw[1], k if isinstance(k, int) else k[1], p if isinstance(p, int) else p[1])
]


@pytest.mark.parametrize("n, c, f, hw, k, s, p", CONV_GRID)
def test_conv2d_gradients(n, c, f, hw, k, s, p):
    conv = mc.Conv2d(c, f, k, stride=s, padding=p, rng=np.random.default_rng(0), dtype=np.float64)
    errors = check_module(conv, np.random.default_rng(1).standard_normal((n, c, *hw)))
    assert set(errors) == {"input", "weight", "bias"}
    assert max(errors.values()) <= RTOL


def test_conv2d_without_bias_gradients():
    conv = mc.Conv2d(2, 3, (2, 3), stride=(1, 2), padding=(1, 0), bias=False, rng=np.random.default_rng(0))
    assert set(check_module(conv, np.random.default_rng(1).standard_normal((2, 2, 5, 6)))) == {"input", "weight"}


POOL_GRID = [
    # (kernel, stride, padding): includes overlapping windows (stride < kernel) and odd leftovers
    (2, None, 0), (3, None, 0), ((2, 3), None, 0), (3, 1, 0), (3, 2, 0), (3, 2, 1), (2, 1, 0), ((3, 2), (1, 2), (1, 0)),
]


@pytest.mark.parametrize("kernel, stride, padding", POOL_GRID)
@pytest.mark.parametrize("shape", [(1, 1, 7, 7), (2, 3, 6, 9)])
def test_maxpool2d_gradients(kernel, stride, padding, shape):
    pool = mc.MaxPool2d(kernel, stride, padding)
    assert check_module(pool, tie_free(shape))["input"] <= RTOL


@pytest.mark.parametrize("shape", [(3, 5), (2, 3, 4, 5)])
def test_relu_gradients(shape):
    assert check_module(mc.ReLU(), kink_free(shape))["input"] <= RTOL


@pytest.mark.parametrize("n, in_features, out_features, bias", [(1, 1, 1, True), (4, 7, 3, True), (3, 5, 2, False)])
def test_linear_gradients(n, in_features, out_features, bias):
    linear = mc.Linear(in_features, out_features, bias=bias, rng=np.random.default_rng(0))
    errors = check_module(linear, np.random.default_rng(1).standard_normal((n, in_features)))
    assert max(errors.values()) <= RTOL


def test_flatten_gradients():
    assert check_module(mc.Flatten(), np.random.default_rng(0).standard_normal((2, 3, 4, 5)))["input"] <= RTOL


@pytest.mark.parametrize("p", [0.0, 0.3, 0.7])
def test_dropout_gradients_in_train_and_eval_mode(p):
    x = np.random.default_rng(0).standard_normal((4, 6))
    assert check_module(mc.Dropout(p, rng=np.random.default_rng(3)), x)["input"] <= RTOL
    assert check_module(mc.Dropout(p).eval(), x)["input"] <= RTOL


@pytest.mark.parametrize("weight", [None, [1.0, 3.0, 0.5]])
@pytest.mark.parametrize("n", [1, 5])
def test_softmax_cross_entropy_gradients(weight, n):
    rng = np.random.default_rng(n)
    logits = rng.standard_normal((n, 3)) * 3
    labels = rng.integers(0, 3, size=n)
    assert check_module(mc.SoftmaxCrossEntropy(weight), logits, labels)["input"] <= RTOL


def test_whole_network_gradients():
    rng = np.random.default_rng(0)
    net = mc.Sequential(mc.Conv2d(1, 2, 3, padding=1, rng=rng), mc.ReLU(), mc.MaxPool2d(2),
                        mc.Conv2d(2, 3, 3, rng=rng), mc.ReLU(), mc.MaxPool2d(2, 1),
                        mc.Flatten(), mc.Linear(3 * 1 * 2, 4, rng=rng), mc.ReLU(), mc.Dropout(0.25, rng=rng),
                        mc.Linear(4, 2, rng=rng))
    errors = check_module(net, np.random.default_rng(1).standard_normal((2, 1, 8, 10)))
    assert len(errors) == 1 + 8 and max(errors.values()) <= RTOL


# -- the checker itself -----------------------------------------------------------

class BrokenLinear(mc.Linear):
    """Linear whose backward forgets to transpose the weight gradient's roles (a classic bug)."""

    def backward(self, grad_output):
        (x,) = self.saved_for_backward()
        self.weight.accumulate_grad(grad_output.T @ x * 1.01)
        self.bias.accumulate_grad(grad_output.sum(axis=0))
        return grad_output @ self.weight.data


class BrokenPool(mc.MaxPool2d):
    """MaxPool2d whose backward uses '=' instead of '+=' (wrong only for overlapping windows)."""

    def backward(self, grad_output):
        argmax, x_shape, out_hw = self.saved_for_backward()
        grad = np.zeros(x_shape, dtype=grad_output.dtype)
        for offset, window in self._windows(grad, out_hw):
            window[...] = np.where(argmax == offset, grad_output, window)
        return grad


def test_checker_catches_a_wrong_weight_gradient():
    linear = BrokenLinear(4, 3, rng=np.random.default_rng(0))
    with pytest.raises(AssertionError, match=r"gradient of BrokenLinear\.weight is wrong: relative error .* worst at index"):
        check_module(linear, np.random.default_rng(1).standard_normal((2, 4)))


def test_checker_catches_assignment_instead_of_accumulation_in_overlapping_pool():
    x = tie_free((1, 1, 6, 6))
    check_module(BrokenPool(2), x)  # non-overlapping windows: '=' happens to be right
    with pytest.raises(AssertionError, match="BrokenPool input"):
        check_module(BrokenPool(3, 1), x)


def test_checker_reports_a_missing_parameter_gradient():
    class NoWeightGrad(mc.Linear):
        def backward(self, grad_output):
            self.saved_for_backward()
            self.bias.accumulate_grad(grad_output.sum(axis=0))
            return grad_output @ self.weight.data

    with pytest.raises(AssertionError, match="left .grad as None"):
        check_module(NoWeightGrad(2, 2), np.ones((1, 2)))


def test_check_module_does_not_change_the_module():
    conv = mc.Conv2d(1, 2, 3, rng=np.random.default_rng(0))
    before = conv.weight.data.copy()
    check_module(conv, np.ones((1, 1, 4, 4)))
    assert conv.weight.data.dtype == np.float32 and np.array_equal(conv.weight.data, before)
    assert conv.weight.grad is None


def test_function_form_and_numerical_gradient():
    errors = check_function(lambda a, b: a * b + np.sin(a),
                            lambda g, a, b: {"a": g * (b + np.cos(a)), "b": g * a},
                            {"a": np.linspace(-1, 1, 6), "b": np.linspace(2, 3, 6)})
    assert max(errors.values()) <= RTOL
    a = np.array([1.0, 2.0])
    np.testing.assert_allclose(numerical_gradient(lambda: float(np.sum(a ** 2)), a), 2 * a, rtol=1e-8)


@pytest.mark.parametrize("shape", [(1, 1, 1, 1), (2, 3, 4, 5)])
def test_adaptive_avg_pool2d_gradients(shape):
    x = np.random.default_rng(0).standard_normal(shape)
    assert check_module(mc.AdaptiveAvgPool2d(1), x)["input"] <= RTOL


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("shape", [(1, 1, 2, 3), (4, 3, 5, 6)])
def test_batchnorm2d_gradients(train, shape):
    rng = np.random.default_rng(0)
    bn = mc.BatchNorm2d(shape[1])
    bn.weight.data[:] = rng.uniform(0.5, 2.0, shape[1])
    bn.bias.data[:] = rng.standard_normal(shape[1])
    bn.running_mean[:], bn.running_var[:] = 0.3, 2.0
    bn.train(train)
    errors = check_module(bn, rng.standard_normal(shape))
    assert set(errors) == {"input", "weight", "bias"} and max(errors.values()) <= RTOL


@pytest.mark.parametrize("pairs, dim, temperature", [(1, 3, 0.5), (3, 5, 0.2), (4, 2, 1.0)])
def test_ntxent_loss_gradients(pairs, dim, temperature):
    h = np.random.default_rng(pairs).standard_normal((2 * pairs, dim)) * 2
    assert check_module(mc.NTXentLoss(temperature), h)["input"] <= RTOL


def test_ntxent_loss_refuses_an_odd_batch():
    with pytest.raises(ValueError, match=r"\(2B, D\)"):
        mc.NTXentLoss()(np.ones((3, 4)))
