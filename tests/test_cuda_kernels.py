"""minicnn/cuda_kernels.py: each fused CuPy kernel against the readable path.

These need a GPU (the ``gpu`` fixture skips without one; MINICNN_REQUIRE_GPU=1
fails instead). The first test needs none: host arrays never take the kernels.
"""
import contextlib

import numpy as np
import pytest

import minicnn as mc
from minicnn import cuda_kernels, fast, optim
from minicnn.im2col import col2im, im2col, output_size


def test_host_arrays_never_take_the_kernels(monkeypatch):
    monkeypatch.delenv("MINICNN_CUDA_KERNELS", raising=False)
    assert not cuda_kernels.enabled(np.zeros(3))
    monkeypatch.setenv("MINICNN_CUDA_KERNELS", "1")
    assert not cuda_kernels.enabled(np.zeros(3))


def test_kernels_are_used_on_the_gpu_unless_switched_off(gpu, monkeypatch):
    x = gpu.zeros(3)
    monkeypatch.delenv("MINICNN_CUDA_KERNELS", raising=False)
    assert cuda_kernels.enabled(x)
    assert not cuda_kernels.enabled(x, np.zeros(3))     # all arrays must be on the GPU
    monkeypatch.setenv("MINICNN_CUDA_KERNELS", "0")
    assert not cuda_kernels.enabled(x)


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
def test_optimizer_updates_match_readable(gpu, make, monkeypatch):
    """The fused update gives the readable GPU path's bits (--fmad=false), and the CPU's numbers."""
    rng = np.random.default_rng(0)
    data, grads = rng.standard_normal((5, 7)).astype(np.float32), rng.standard_normal((3, 5, 7)).astype(np.float32)
    params = {"cpu": mc.Parameter(data.copy()), "readable": mc.Parameter(gpu.asarray(data)),
              "fused": mc.Parameter(gpu.asarray(data))}
    optimizers = {path: make([param]) for path, param in params.items()}
    for grad in grads:
        for path, param in params.items():
            monkeypatch.setenv("MINICNN_CUDA_KERNELS", "1" if path == "fused" else "0")
            param.grad = grad.copy() if path == "cpu" else gpu.asarray(grad)
            optimizers[path].step()
    np.testing.assert_array_equal(gpu.asnumpy(params["fused"].data), gpu.asnumpy(params["readable"].data))
    np.testing.assert_allclose(gpu.asnumpy(params["fused"].data), params["cpu"].data, rtol=1e-5, atol=1e-6)
    for name, value in optimizers["cpu"].state[0].items():
        if name != "step":
            fused, readable = (gpu.asnumpy(optimizers[path].state[0][name]) for path in ("fused", "readable"))
            np.testing.assert_array_equal(fused, readable)
            np.testing.assert_allclose(fused, value, rtol=1e-5, atol=1e-6)


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


@pytest.mark.parametrize("inplace", [False, True], ids=["new", "inplace"])
@pytest.mark.parametrize("grad", [True, False], ids=["grad", "no_grad"])
def test_relu_matches_readable(gpu, monkeypatch, inplace, grad):
    x = np.random.default_rng(3).standard_normal((2, 3, 5, 4)).astype(np.float32)
    x[0, 0, 0, :2] = [np.nan, 0.0]
    results = {}
    for path in ("readable", "fused"):
        monkeypatch.setenv("MINICNN_CUDA_KERNELS", "1" if path == "fused" else "0")
        layer, device_x = mc.ReLU(inplace=inplace), gpu.asarray(x)
        with (contextlib.nullcontext() if grad else mc.no_grad()):
            out = layer(device_x)
        assert (out is device_x) == inplace
        results[path] = (gpu.asnumpy(out), gpu.asnumpy(layer.backward(gpu.ones_like(out))) if grad else None)
    np.testing.assert_array_equal(results["fused"][0], results["readable"][0])     # NaN stays NaN in both
    if grad:
        np.testing.assert_array_equal(results["fused"][1], results["readable"][1])


def test_batchnorm_matches_readable(gpu, monkeypatch):
    rng = np.random.default_rng(4)
    x, upstream = rng.standard_normal((2, 3, 4, 5, 6)).astype(np.float32) * 3 + 1
    weight = rng.standard_normal(4).astype(np.float32)
    results = {}
    for path in ("readable", "fused"):
        monkeypatch.setenv("MINICNN_CUDA_KERNELS", "1" if path == "fused" else "0")
        layer = mc.BatchNorm2d(4)
        layer.weight.data[...] = weight
        layer.to("gpu")
        out = layer(gpu.asarray(x))
        grad_x = layer.backward(gpu.asarray(upstream))
        results[path] = [gpu.asnumpy(a) for a in (out, grad_x, layer.weight.grad, layer.bias.grad,
                                                  layer.running_mean, layer.running_var)]
    # The variance's sum runs in another order (one reduction instead of einsum): not bit-equal.
    for fused, readable in zip(results["fused"], results["readable"]):
        np.testing.assert_allclose(fused, readable, rtol=1e-5, atol=1e-4)
    a, b = (gpu.asarray(array) for array in (x, upstream))
    np.testing.assert_allclose(gpu.asnumpy(cuda_kernels.channel_dot(a, b)),
                               np.einsum("nchw,nchw->c", x.astype(np.float64), upstream.astype(np.float64)),
                               rtol=1e-5, atol=1e-3)
