"""Module bookkeeping: names, state_dict, modes, errors, the gradient contract."""
import numpy as np
import pytest

import minicnn as mc


def net(seed=0):
    rng = np.random.default_rng(seed)
    return mc.Sequential(mc.Conv2d(1, 2, 3, rng=rng), mc.ReLU(), mc.MaxPool2d(2), mc.Flatten(),
                         mc.Dropout(0.5, rng=np.random.default_rng(seed)), mc.Linear(2 * 2 * 2, 2, rng=rng))


def test_names_are_pytorch_style_and_weights_have_pytorch_shapes():
    model = net()
    assert list(model.state_dict()) == ["0.weight", "0.bias", "5.weight", "5.bias"]
    assert model[0].weight.shape == (2, 1, 3, 3) and model[5].weight.shape == (2, 8)


def test_same_seed_same_weights_and_outputs():
    x = np.random.default_rng(9).standard_normal((3, 1, 6, 6)).astype(np.float32)
    a, b, c = net(1), net(1), net(2)
    assert all(np.array_equal(a.state_dict()[k], b.state_dict()[k]) for k in a.state_dict())
    assert not np.array_equal(a[0].weight.data, c[0].weight.data)
    np.testing.assert_array_equal(a(x), b(x))


def test_manual_seed_makes_default_init_reproducible():
    mc.manual_seed(123)
    first = mc.Linear(4, 3).weight.data
    mc.manual_seed(123)
    assert np.array_equal(first, mc.Linear(4, 3).weight.data)


def test_default_init_is_within_pytorch_bound():
    conv = mc.Conv2d(16, 8, 3, rng=np.random.default_rng(0))
    bound = 1 / np.sqrt(16 * 9)
    assert np.abs(conv.weight.data).max() <= bound and np.abs(conv.bias.data).max() <= bound
    assert abs(conv.weight.data.std() - bound / np.sqrt(3)) < 0.1 * bound


def test_state_dict_round_trip_and_shape_check():
    source, target = net(1), net(2)
    target.load_state_dict(source.state_dict())
    assert all(np.array_equal(source.state_dict()[k], target.state_dict()[k]) for k in source.state_dict())
    bad = dict(source.state_dict(), **{"0.weight": np.zeros((3, 1, 3, 3), np.float32)})
    with pytest.raises(ValueError, match=r"'0.weight' has shape \(3, 1, 3, 3\), expected \(2, 1, 3, 3\)"):
        target.load_state_dict(bad)
    with pytest.raises(KeyError, match="missing keys \\['5.bias'\\]"):
        target.load_state_dict({k: v for k, v in source.state_dict().items() if k != "5.bias"})


def test_gradients_accumulate_until_zero_grad():
    model = net()
    x = np.random.default_rng(0).standard_normal((2, 1, 6, 6)).astype(np.float32)
    model.eval()
    model.backward(np.ones_like(model(x)))
    first = model[0].weight.grad.copy()
    model.backward(np.ones_like(model(x)))
    np.testing.assert_allclose(model[0].weight.grad, 2 * first, rtol=1e-6)
    model.zero_grad()
    assert all(p.grad is None for p in model.parameters())


def test_backward_before_forward_is_a_clear_error():
    with pytest.raises(RuntimeError, match=r"Conv2d.backward\(\) called before forward\(\)"):
        mc.Conv2d(1, 1, 3).backward(np.ones((1, 1, 2, 2), np.float32))
    relu = mc.ReLU()
    relu(np.ones(3))
    relu.backward(np.ones(3))
    with pytest.raises(RuntimeError, match="before forward"):
        relu.backward(np.ones(3))  # the saved state is used once


def test_backward_does_not_modify_its_inputs():
    model = net()
    x = np.random.default_rng(0).standard_normal((2, 1, 6, 6)).astype(np.float32)
    x_copy = x.copy()
    out = model(x)
    upstream = np.random.default_rng(1).standard_normal(out.shape).astype(np.float32)
    upstream_copy = upstream.copy()
    model.backward(upstream)
    assert np.array_equal(x, x_copy) and np.array_equal(upstream, upstream_copy)


def test_train_and_eval_modes_switch_dropout():
    model = net()
    x = np.ones((4, 1, 6, 6), np.float32)
    model.eval()
    assert not model[4].training
    np.testing.assert_array_equal(model(x), model(x))
    model.train()
    assert model[4].training and not np.array_equal(model(x), model(x))


@pytest.mark.parametrize("make, x, message", [
    (lambda: mc.Conv2d(1, 1, 5), np.zeros((1, 1, 3, 3), np.float32), "Conv2d: kernel 5x5 larger than padded input 3x3"),
    (lambda: mc.Conv2d(3, 1, 3), np.zeros((1, 1, 8, 8), np.float32), "Conv2d: expected 3 input channels"),
    (lambda: mc.Conv2d(1, 1, 3), np.zeros((8, 8), np.float32), r"Conv2d: expected input of shape \(N, 1, H, W\)"),
    (lambda: mc.Conv2d(1, 1, 3), np.zeros((1, 1, 8, 8)), "Conv2d: input dtype float64 does not match weight dtype float32"),
    (lambda: mc.MaxPool2d(4), np.zeros((1, 1, 3, 3)), "MaxPool2d: kernel 4x4 larger than padded input 3x3"),
    (lambda: mc.Linear(4, 2), np.zeros((2, 5), np.float32), r"Linear: expected input of shape \(N, 4\)"),
])
def test_bad_shapes_give_a_sentence(make, x, message):
    with pytest.raises((ValueError, TypeError), match=message):
        make()(x)


@pytest.mark.parametrize("logits, labels, message", [
    (np.zeros((2, 2)), np.array([0, 2]), r"labels must be in \[0, 1\], got values in \[0, 2\]"),
    (np.zeros((2, 2)), np.array([0, 1, 1]), r"labels must have shape \(2,\)"),
    (np.zeros((2, 2)), np.array([0.0, 1.0]), "labels must be integers"),
    (np.zeros(2), np.array([0, 1]), r"logits must have shape \(N, K\)"),
])
def test_loss_rejects_bad_labels(logits, labels, message):
    with pytest.raises((ValueError, TypeError), match=message):
        mc.SoftmaxCrossEntropy()(logits, labels)


def test_bad_constructor_arguments():
    with pytest.raises(ValueError, match="kernel_size must be an int or a pair"):
        mc.Conv2d(1, 1, (3, 3, 3))
    with pytest.raises(ValueError, match="Dropout: p must be in"):
        mc.Dropout(1.0)


def test_class_weighted_loss_equals_weighted_mean():
    logits = np.array([[2.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    labels = np.array([0, 1, 1])
    nll = -np.log(np.exp(logits[np.arange(3), labels]) / np.exp(logits).sum(1))
    w = np.array([1.0, 3.0])[labels]
    assert np.isclose(mc.SoftmaxCrossEntropy([1.0, 3.0])(logits, labels), np.sum(w * nll) / w.sum())
    assert np.isclose(mc.SoftmaxCrossEntropy()(logits, labels), nll.mean())


def test_loss_is_stable_for_huge_logits():
    value = mc.SoftmaxCrossEntropy()(np.array([[1000.0, -1000.0]]), np.array([1]))
    assert np.isfinite(value) and np.isclose(value, 2000.0)


def test_repr_lists_layers():
    text = repr(net())
    assert "(0): Conv2d(1, 2, kernel_size=(3, 3)" in text and "(5): Linear(in_features=8" in text


def test_sgd_reduces_the_loss_on_a_tiny_problem():
    rng = np.random.default_rng(0)
    model = mc.Sequential(mc.Linear(2, 8, rng=rng), mc.ReLU(), mc.Linear(8, 2, rng=rng))
    x = rng.standard_normal((32, 2)).astype(np.float32)
    y = (x[:, 0] * x[:, 1] > 0).astype(np.int64)
    criterion, optimizer = mc.SoftmaxCrossEntropy(), mc.optim.SGD(model.parameters(), lr=0.5, momentum=0.9)
    losses = []
    for _ in range(200):
        optimizer.zero_grad()
        losses.append(float(criterion(model(x), y)))
        model.backward(criterion.backward())
        optimizer.step()
    assert losses[-1] < 0.5 * losses[0]
