"""minicnn/cuda_kernels.py: each fused CuPy kernel against the readable path.

These need a GPU (the ``gpu`` fixture skips without one; MINICNN_REQUIRE_GPU=1
fails instead). The first tests need none: the kernels stay off unless asked for,
and never touch host arrays.
"""
import numpy as np
import pytest

import minicnn as mc
from minicnn import cuda_kernels, fast, optim
from minicnn.im2col import col2im, im2col, output_size


def test_kernels_are_off_unless_asked_for(monkeypatch):
    monkeypatch.delenv("MINICNN_CUDA_KERNELS", raising=False)
    assert not cuda_kernels.enabled()
    monkeypatch.setenv("MINICNN_CUDA_KERNELS", "1")
    assert not cuda_kernels.enabled(np.zeros(3))        # host arrays never take them


def test_kernels_are_used_on_the_gpu_when_asked_for(gpu, monkeypatch):
    x = gpu.zeros(3)
    monkeypatch.delenv("MINICNN_CUDA_KERNELS", raising=False)
    assert not cuda_kernels.enabled(x)
    monkeypatch.setenv("MINICNN_CUDA_KERNELS", "1")
    assert cuda_kernels.enabled(x)


@pytest.fixture
def kernels_on(monkeypatch):
    monkeypatch.setenv("MINICNN_CUDA_KERNELS", "1")


CONVS = [((2, 3, 9, 8), (3, 3), (1, 1), (1, 1)), ((3, 2, 11, 7), (3, 2), (2, 1), (1, 0)),
         ((2, 1, 16, 16), (5, 5), (2, 2), (2, 2)), ((1, 4, 6, 5), (1, 1), (2, 2), (0, 0))]


@pytest.mark.parametrize("shape, kernel, stride, padding", CONVS)
def test_im2col_and_col2im_match_readable(gpu, kernels_on, shape, kernel, stride, padding):
    x = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    out_hw = output_size("test", shape[2:], kernel, stride, padding)
    with fast.disabled():
        col = im2col(x, kernel, stride, padding, out_hw)
        back = col2im(col, shape, stride, padding)
    col_gpu = cuda_kernels.im2col(gpu.asarray(x), kernel, stride, padding, out_hw)
    np.testing.assert_array_equal(gpu.asnumpy(col_gpu), col)
    back_gpu = cuda_kernels.col2im(col_gpu, shape, stride, padding)
    np.testing.assert_array_equal(gpu.asnumpy(back_gpu), back)       # the same sums in the same order


POOLS = [(2, None, 0, (3, 2, 8, 9)), (3, 2, 1, (2, 3, 11, 10)), (3, 1, 1, (2, 2, 5, 6)), ((2, 3), (2, 1), 0, (2, 2, 7, 7))]


@pytest.mark.parametrize("relu", [False, True])
@pytest.mark.parametrize("kernel, stride, padding, shape", POOLS)
def test_maxpool_matches_readable(gpu, kernels_on, kernel, stride, padding, shape, relu):
    rng = np.random.default_rng(0)
    x = np.round(rng.standard_normal(shape), 1).astype(np.float32)    # ties and zeros included
    with fast.disabled():
        host = mc.Sequential(mc.ReLU(), mc.MaxPool2d(kernel, stride, padding)) if relu else mc.MaxPool2d(kernel, stride, padding)
        out = host(x)
        grad_out = rng.standard_normal(out.shape).astype(np.float32)
        grad_x = host.backward(grad_out)
    device = (mc.Sequential(mc.ReLU(), mc.MaxPool2d(kernel, stride, padding)) if relu
              else mc.MaxPool2d(kernel, stride, padding))
    out_gpu = device(gpu.asarray(x))
    np.testing.assert_array_equal(gpu.asnumpy(out_gpu), out)
    np.testing.assert_array_equal(gpu.asnumpy(device.backward(gpu.asarray(grad_out))), grad_x)


@pytest.mark.parametrize("make", [
    lambda params: optim.SGD(params, lr=0.1, momentum=0.9, weight_decay=1e-2),
    lambda params: optim.SGD(params, lr=0.1, momentum=0.9, nesterov=True),
    lambda params: optim.Adam(params, lr=0.01, weight_decay=1e-2),
    lambda params: optim.AdamW(params, lr=0.01),
])
def test_optimizer_updates_match_readable(gpu, kernels_on, make):
    rng = np.random.default_rng(0)
    data, grads = rng.standard_normal((5, 7)).astype(np.float32), rng.standard_normal((3, 5, 7)).astype(np.float32)
    host, device = mc.Parameter(data.copy()), mc.Parameter(gpu.asarray(data))
    host_optimizer, device_optimizer = make([host]), make([device])
    for grad in grads:
        host.grad, device.grad = grad.copy(), gpu.asarray(grad)
        host_optimizer.step()
        device_optimizer.step()
    # The CUDA compiler fuses a * b + c into one rounding: the last bit may differ.
    np.testing.assert_allclose(gpu.asnumpy(device.data), host.data, rtol=1e-5, atol=1e-6)
    for name, value in host_optimizer.state[0].items():
        if name != "step":
            np.testing.assert_allclose(gpu.asnumpy(device_optimizer.state[0][name]), value, rtol=1e-5, atol=1e-6)


def test_a_training_step_with_kernels_matches_the_cpu(gpu, kernels_on):
    def net():
        rng = np.random.default_rng(1)
        return mc.Sequential(mc.Conv2d(1, 3, 3, padding=1, rng=rng), mc.ReLU(), mc.MaxPool2d(2),
                             mc.Conv2d(3, 4, 3, stride=2, rng=rng), mc.ReLU(), mc.MaxPool2d(3, 1, 1),
                             mc.Flatten(), mc.Linear(4 * 3 * 3, 2, rng=rng))
    x = np.random.default_rng(0).standard_normal((4, 1, 14, 14)).astype(np.float32)
    labels = np.array([0, 1, 1, 0])
    results = []
    for device in ("cpu", "gpu"):
        model = net().to(device)
        optimizer = optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        criterion = mc.SoftmaxCrossEntropy()
        for _ in range(2):
            optimizer.zero_grad()
            criterion(model(mc.to_device(x, device)), mc.to_device(labels, device))
            model.backward(criterion.backward())
            optimizer.step()
        results.append([mc.as_numpy(p.data) for p in model.parameters()])
    for cpu_value, gpu_value in zip(*results):
        np.testing.assert_allclose(gpu_value, cpu_value, rtol=1e-4, atol=1e-5)
