"""The GPU path has no host-NumPy leaks, proven without a GPU.

Every layer, the loss and the optimizers run on DeviceArrays (tests/fake_device.py),
a stand-in device whose namespace behaves like CuPy: any host-NumPy call on
its arrays, or any host array mixed into its arithmetic, raises. Results must
stay on the device and equal the host results.
"""
import numpy as np
import pytest

import minicnn as mc
from minicnn import optim
from minicnn.backend import get_array_module
from minicnn.module import Module
from fake_device import HostLeakError, device_xp, on_fake_device, to_fake_device


def small_net(rng):
    return mc.Sequential(
        mc.Conv2d(1, 3, 3, padding=1, rng=rng), mc.BatchNorm2d(3), mc.ReLU(), mc.MaxPool2d(2),
        mc.Conv2d(3, 4, (3, 2), stride=(1, 2), rng=rng), mc.ReLU(), mc.MaxPool2d(3, 1, 1),
        mc.AdaptiveAvgPool2d(1), mc.Flatten(), mc.Dropout(0.3, rng=np.random.default_rng(5)), mc.Linear(4, 6, rng=rng), mc.ReLU(),
        mc.Linear(6, 2, rng=rng))


def run_step(model, x, labels, optimizer_cls):
    """One training step; returns loss, logits, grad_x and the updated weights."""
    criterion = mc.SoftmaxCrossEntropy(weight=[1.0, 2.0])
    optimizer = optimizer_cls(model.parameters(), lr=0.1)
    optimizer.zero_grad()
    logits = model(x)
    loss = criterion(logits, labels)
    grad_x = model.backward(criterion.backward())
    optimizer.step()
    return loss, logits, grad_x, [p.data for p in model.parameters()], [p.grad for p in model.parameters()]


def test_namespace_of_device_array_is_the_fake_one():
    assert get_array_module(to_fake_device(np.zeros(3))) is device_xp


@pytest.mark.parametrize("optimizer_cls", [
    lambda params, lr: optim.SGD(params, lr, momentum=0.9, nesterov=True, weight_decay=1e-3),
    lambda params, lr: optim.Adam(params, lr, weight_decay=1e-3),
    lambda params, lr: optim.AdamW(params, lr),
])
def test_training_step_stays_on_device_and_matches_host(optimizer_cls):
    rng = np.random.default_rng(0)
    host_model = small_net(np.random.default_rng(1))
    device_model = small_net(np.random.default_rng(1)).map_arrays(to_fake_device)
    x = rng.standard_normal((4, 1, 10, 13)).astype(np.float32)
    labels = np.array([0, 1, 1, 0])

    host = run_step(host_model, x, labels, optimizer_cls)
    device = run_step(device_model, to_fake_device(x), to_fake_device(labels), optimizer_cls)

    loss, logits, grad_x, weights, grads = device
    for value in [loss, logits, grad_x, *weights, *grads]:
        assert on_fake_device(value), f"result left the device: {type(value).__name__}"
        assert value.dtype == np.float32
    np.testing.assert_allclose(np.asarray(loss.view(np.ndarray)), host[0], rtol=1e-6)
    for host_value, device_value in zip([host[1], host[2], *host[3]], [logits, grad_x, *weights]):
        np.testing.assert_allclose(device_value.view(np.ndarray), host_value, rtol=1e-5, atol=1e-6)


def test_optimizer_state_follows_model_to_device():
    model = small_net(np.random.default_rng(2))
    x, labels = np.random.default_rng(0).standard_normal((2, 1, 10, 13)).astype(np.float32), np.array([0, 1])
    optimizer = optim.Adam(model.parameters(), lr=0.01)
    criterion = mc.SoftmaxCrossEntropy()
    for to_device in (lambda a: a, to_fake_device):
        model.map_arrays(to_device)
        optimizer.zero_grad()
        criterion(model(to_device(x)), to_device(labels))
        model.backward(criterion.backward())
        optimizer.step()
    buffers = [value for state in optimizer.state for value in state.values() if not isinstance(value, int)]
    assert buffers and all(on_fake_device(buffer) for buffer in buffers)


class LeakyReLU(Module):
    """A ReLU with one planted host-NumPy leak, chosen by ``leak``."""

    def __init__(self, leak):
        self.leak = leak

    def forward(self, x):
        xp = get_array_module(x)
        if self.leak == "np.zeros buffer":
            out = np.zeros(x.shape, dtype=x.dtype)
            out[...] = xp.maximum(x, 0)
            return out
        if self.leak == "np.sum on a device array":
            return xp.maximum(x, 0) / np.sum(x * x)
        if self.leak == "np.random mask":
            return xp.maximum(x, 0) * (np.random.default_rng(0).random(x.shape) > 0.5)
        if self.leak == "np.asarray inside":
            return xp.maximum(np.asarray(x), 0)
        if self.leak == "np.where":
            return np.where(x > 0, x, 0)
        raise AssertionError(self.leak)


@pytest.mark.parametrize("leak", ["np.zeros buffer", "np.sum on a device array", "np.random mask",
                                  "np.asarray inside", "np.where"])
def test_guard_catches_a_planted_leak(leak):
    x = to_fake_device(np.random.default_rng(0).standard_normal((2, 3)).astype(np.float32))
    try:
        out = LeakyReLU(leak)(x)
    except HostLeakError:
        return
    assert not on_fake_device(out), "the planted leak went unnoticed"


def test_rotation_pretext_batches_stay_on_the_device():
    """covidct pretrain's rotate_batch and a frozen-backbone split run on device arrays without host leaks."""
    from covidct.model import build_model, preset, split_backbone_head
    from covidct.pretrain import rotate_batch

    x = np.random.default_rng(0).random((5, 1, 6, 6), dtype=np.float32)
    turns = np.array([0, 1, 2, 3, 1])
    rotated = rotate_batch(to_fake_device(x), turns)
    assert on_fake_device(rotated)
    np.testing.assert_array_equal(np.asarray(rotated.view(np.ndarray)), rotate_batch(x, turns))

    model = build_model(preset("tiny"), seed=0).eval()
    backbone, head = split_backbone_head(model)
    images = np.random.default_rng(1).random((2, 1, 32, 32), dtype=np.float32)
    expected = model(images)
    model.map_arrays(to_fake_device)                  # backbone and head share its layers
    logits = head(backbone(to_fake_device(images)))
    assert on_fake_device(logits)
    np.testing.assert_allclose(logits.view(np.ndarray), expected, rtol=1e-5)
