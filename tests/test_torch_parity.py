"""minicnn against PyTorch: same weights, same inputs, same upstream gradient.

Every layer's forward output, input gradient and parameter gradients must
match torch (float32) within ~1e-5 relative to the tensor's own scale; the
optimizers must follow torch.optim's update rules (float64, 5 steps).
"""
import copy
import io
import math

import numpy as np
import pytest

torch = pytest.importorskip("torch")
import torch.nn.functional as F  # noqa: E402

import minicnn  # noqa: E402
from minicnn import optim  # noqa: E402

torch.set_num_threads(1)

RTOL = 1e-5


# -- helpers ---------------------------------------------------------------------------------

def assert_close(actual, expected, rtol=RTOL, what=""):
    """|a - b| <= rtol * |b| + rtol * max|b|: relative to the tensor's own scale."""
    actual = minicnn.as_numpy(actual)
    expected = expected.detach().cpu().numpy() if isinstance(expected, torch.Tensor) else np.asarray(expected)
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != {expected.shape}"
    scale = float(np.abs(expected).max(initial=0.0))
    np.testing.assert_allclose(actual, expected, rtol=rtol, atol=rtol * max(scale, 1e-30), err_msg=what)


def t(array, requires_grad=False):
    tensor = torch.from_numpy(np.ascontiguousarray(array).copy())
    return tensor.requires_grad_(requires_grad)


def shuffled_linspace(shape, seed=0, low=-3.0, high=3.0, dtype=np.float32):
    """Distinct values (no ties for max-pool), in random order."""
    values = np.linspace(low, high, math.prod(shape), dtype=np.float64)
    np.random.default_rng(seed).shuffle(values)
    return values.reshape(shape).astype(dtype)


def compare_layer(layer, torch_layer, x, seed=1, params=("weight", "bias")):
    """Forward + backward of a minicnn layer and a torch layer (weights already equal)."""
    rng = np.random.default_rng(seed)
    out = layer(x)
    x_t = t(x, requires_grad=True)
    out_t = torch_layer(x_t)
    assert_close(out, out_t, what="output")
    assert out.dtype == np.float32

    upstream = rng.standard_normal(out_t.shape).astype(np.float32)
    grad_x = layer.backward(upstream.copy())
    out_t.backward(t(upstream))
    assert_close(grad_x, x_t.grad, what="grad input")
    assert grad_x.dtype == np.float32
    for name in params:
        param = getattr(layer, name, None)
        torch_param = getattr(torch_layer, name, None)
        if param is None:
            assert torch_param is None
            continue
        assert_close(param.grad, torch_param.grad, what=f"grad {name}")
        assert param.grad.dtype == np.float32


def torch_conv_from(layer):
    conv = torch.nn.Conv2d(layer.in_channels, layer.out_channels, layer.kernel_size, layer.stride,
                           layer.padding, bias=layer.bias is not None)
    with torch.no_grad():
        conv.weight.copy_(t(layer.weight.data))
        if layer.bias is not None:
            conv.bias.copy_(t(layer.bias.data))
    return conv


# -- Conv2d ----------------------------------------------------------------------------------

# (N, C_in, C_out, H, W): batch 1 and >1, channels 1 and >1, non-square inputs.
CONV_SHAPES = [(1, 1, 1, 7, 9), (3, 2, 4, 8, 6), (2, 3, 2, 4, 3)]


def fits(hw, kernel, padding):
    return all(k <= size + 2 * p for size, k, p in zip(hw, kernel, padding))


@pytest.mark.parametrize("shape", CONV_SHAPES, ids=lambda s: "N{}C{}F{}_{}x{}".format(*s))
@pytest.mark.parametrize("padding", [0, 1, 2])
@pytest.mark.parametrize("stride", [1, 2, 3])
@pytest.mark.parametrize("kernel", [1, 3, 5])
def test_conv2d_matches_torch(kernel, stride, padding, shape):
    n, c, f, h, w = shape
    if not fits((h, w), (kernel, kernel), (padding, padding)):
        pytest.skip("kernel larger than the padded input")
    rng = np.random.default_rng(kernel * 100 + stride * 10 + padding)
    layer = minicnn.Conv2d(c, f, kernel, stride, padding, rng=rng)
    x = rng.standard_normal((n, c, h, w)).astype(np.float32)
    compare_layer(layer, torch_conv_from(layer), x)


@pytest.mark.parametrize("kernel, stride, padding, hw", [
    ((1, 3), 1, 0, (5, 7)),
    ((3, 1), (2, 1), (1, 0), (7, 4)),
    ((3, 5), (1, 2), (1, 2), (6, 9)),
    ((5, 2), (3, 2), (2, 1), (9, 5)),
    ((2, 3), (2, 3), 0, (4, 6)),       # kernel == stride: non-overlapping windows
    ((3, 3), 3, 2, (2, 2)),           # padding larger than the input itself
    ((5, 5), 1, 0, (5, 5)),           # kernel == input: a 1x1 output
])
@pytest.mark.parametrize("n, c, f", [(1, 1, 2), (2, 3, 2)])
def test_conv2d_non_square_matches_torch(kernel, stride, padding, hw, n, c, f):
    rng = np.random.default_rng(7)
    layer = minicnn.Conv2d(c, f, kernel, stride, padding, rng=rng)
    x = rng.standard_normal((n, c, *hw)).astype(np.float32)
    compare_layer(layer, torch_conv_from(layer), x)


def test_conv2d_without_bias_matches_torch():
    rng = np.random.default_rng(3)
    layer = minicnn.Conv2d(2, 3, 3, stride=2, padding=1, bias=False, rng=rng)
    assert layer.bias is None
    x = rng.standard_normal((2, 2, 7, 6)).astype(np.float32)
    compare_layer(layer, torch_conv_from(layer), x)


def test_conv2d_backward_accumulates_like_torch():
    """Two forward/backward passes without zero_grad: grads add up, as in torch."""
    rng = np.random.default_rng(4)
    layer = minicnn.Conv2d(2, 3, 3, padding=1, rng=rng)
    conv = torch_conv_from(layer)
    for _ in range(2):
        x = rng.standard_normal((2, 2, 5, 5)).astype(np.float32)
        upstream = rng.standard_normal((2, 3, 5, 5)).astype(np.float32)
        layer(x)
        layer.backward(upstream)
        conv(t(x)).backward(t(upstream))
    assert_close(layer.weight.grad, conv.weight.grad, what="accumulated grad weight")
    assert_close(layer.bias.grad, conv.bias.grad, what="accumulated grad bias")


def test_conv2d_first_layer_skips_input_grad():
    rng = np.random.default_rng(5)
    layer = minicnn.Conv2d(1, 2, 3, rng=rng)
    layer.needs_input_grad = False
    conv = torch_conv_from(layer)
    x = rng.standard_normal((2, 1, 5, 5)).astype(np.float32)
    upstream = rng.standard_normal((2, 2, 3, 3)).astype(np.float32)
    layer(x)
    assert layer.backward(upstream) is None
    conv(t(x)).backward(t(upstream))
    assert_close(layer.weight.grad, conv.weight.grad, what="grad weight")
    assert_close(layer.bias.grad, conv.bias.grad, what="grad bias")


# -- MaxPool2d -------------------------------------------------------------------------------

POOL_CASES = [
    # kernel, stride, padding
    (2, None, 0),
    (2, 1, 0),
    (3, 1, 0),                 # overlapping windows
    (3, 2, 1),                 # overlapping + padding (ResNet stem)
    (3, 2, 0),
    (3, 3, 1),
    ((2, 3), None, 0),         # non-square kernel
    ((2, 3), (1, 2), (1, 1)),
    ((3, 2), (2, 1), (1, 0)),
]


@pytest.mark.parametrize("shape", [(1, 1, 7, 9), (3, 2, 8, 6), (2, 3, 5, 5)], ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("kernel, stride, padding", POOL_CASES, ids=str)
def test_maxpool2d_matches_torch(kernel, stride, padding, shape):
    layer = minicnn.MaxPool2d(kernel, stride, padding)
    pool = torch.nn.MaxPool2d(kernel, stride, padding)
    x = shuffled_linspace(shape, seed=sum(shape))
    compare_layer(layer, pool, x, params=())


def test_maxpool2d_overlapping_windows_add_gradients():
    """3x3 stride 1 on a 3x4 input where one pixel is the max of both windows."""
    x = np.zeros((1, 1, 3, 4), np.float32)
    x[0, 0, 1, 1:3] = [5.0, 4.0]   # 5 wins both windows
    x[0, 0] += np.arange(12, dtype=np.float32).reshape(3, 4) * 1e-3
    layer = minicnn.MaxPool2d(3, stride=1)
    out = layer(x)
    assert out.shape == (1, 1, 1, 2)
    grad = layer.backward(np.array([[[[1.5, 2.0]]]], np.float32))
    expected = np.zeros_like(x)
    expected[0, 0, 1, 1] = 3.5
    np.testing.assert_array_equal(grad, expected)
    compare_layer(minicnn.MaxPool2d(3, stride=1), torch.nn.MaxPool2d(3, stride=1), x, params=())


# -- Linear, ReLU, Flatten -------------------------------------------------------------------

@pytest.mark.parametrize("n, fan_in, fan_out, bias", [(1, 5, 3, True), (4, 7, 2, True), (6, 1, 4, True),
                                                       (3, 8, 8, False)])
def test_linear_matches_torch(n, fan_in, fan_out, bias):
    rng = np.random.default_rng(n + fan_in + fan_out)
    layer = minicnn.Linear(fan_in, fan_out, bias=bias, rng=rng)
    linear = torch.nn.Linear(fan_in, fan_out, bias=bias)
    with torch.no_grad():
        linear.weight.copy_(t(layer.weight.data))
        if bias:
            linear.bias.copy_(t(layer.bias.data))
    x = rng.standard_normal((n, fan_in)).astype(np.float32)
    compare_layer(layer, linear, x)


@pytest.mark.parametrize("shape", [(1, 5), (3, 2, 4, 5)])
def test_relu_matches_torch(shape):
    x = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    compare_layer(minicnn.ReLU(), torch.nn.ReLU(), x, params=())


def test_relu_gradient_at_zero_is_zero_like_torch():
    x = np.array([[-1.0, 0.0, 2.0, -0.0]], np.float32)
    layer = minicnn.ReLU()
    layer(x)
    grad = layer.backward(np.ones_like(x))
    x_t = t(x, requires_grad=True)
    torch.relu(x_t).backward(torch.ones(1, 4))
    np.testing.assert_array_equal(grad, x_t.grad.numpy())
    np.testing.assert_array_equal(grad, [[0.0, 0.0, 1.0, 0.0]])


def test_relu_does_not_modify_upstream_gradient():
    layer = minicnn.ReLU()
    layer(np.array([-1.0, 1.0], np.float32))
    upstream = np.array([3.0, 4.0], np.float32)
    layer.backward(upstream)
    np.testing.assert_array_equal(upstream, [3.0, 4.0])


@pytest.mark.parametrize("shape", [(1, 1, 1, 1), (2, 3, 4, 5), (4, 6, 1, 2)])
def test_flatten_matches_torch(shape):
    x = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    compare_layer(minicnn.Flatten(), torch.nn.Flatten(), x, params=())


@pytest.mark.parametrize("shape", [(1, 1, 1, 1), (2, 3, 4, 5), (3, 2, 7, 3)])
def test_adaptive_avg_pool2d_matches_torch(shape):
    x = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    compare_layer(minicnn.AdaptiveAvgPool2d(1), torch.nn.AdaptiveAvgPool2d(1), x, params=())


@pytest.mark.parametrize("shape", [(2, 3, 4, 5), (8, 1, 3, 3), (1, 4, 6, 2)])
def test_batchnorm2d_matches_torch_in_train_and_eval_mode(shape):
    rng = np.random.default_rng(0)
    layer, torch_layer = minicnn.BatchNorm2d(shape[1], momentum=0.2), torch.nn.BatchNorm2d(shape[1], momentum=0.2)
    layer.weight.data[:] = rng.uniform(0.5, 2.0, shape[1])
    layer.bias.data[:] = rng.standard_normal(shape[1])
    with torch.no_grad():
        torch_layer.weight.copy_(t(layer.weight.data))
        torch_layer.bias.copy_(t(layer.bias.data))
    for _ in range(2):  # train mode: batch statistics, running statistics updated
        x = (rng.standard_normal(shape) * 3 + 1).astype(np.float32)
        layer.zero_grad()
        torch_layer.zero_grad()
        compare_layer(layer, torch_layer, x)
    for name in ("running_mean", "running_var"):
        assert_close(getattr(layer, name), getattr(torch_layer, name), what=name)
    assert int(layer.num_batches_tracked) == int(torch_layer.num_batches_tracked) == 2
    assert list(layer.state_dict()) == list(torch_layer.state_dict())
    layer.eval(), torch_layer.eval()
    layer.zero_grad(), torch_layer.zero_grad()
    compare_layer(layer, torch_layer, rng.standard_normal(shape).astype(np.float32))


# -- SoftmaxCrossEntropy ---------------------------------------------------------------------

@pytest.mark.parametrize("n, k", [(1, 2), (5, 3), (16, 10)])
@pytest.mark.parametrize("weighted", [False, True], ids=["plain", "class_weights"])
@pytest.mark.parametrize("scale", [1.0, 50.0], ids=["logits_1", "logits_50"])
@pytest.mark.parametrize("grad_output", [1.0, 0.37])
def test_softmax_cross_entropy_matches_torch(n, k, weighted, scale, grad_output):
    rng = np.random.default_rng(n * k)
    logits = (rng.standard_normal((n, k)) * scale).astype(np.float32)
    labels = rng.integers(0, k, size=n)
    weight = rng.uniform(0.2, 3.0, size=k).astype(np.float32) if weighted else None

    criterion = minicnn.SoftmaxCrossEntropy(weight=weight)
    loss = criterion(logits, labels)
    assert np.ndim(loss) == 0
    logits_t = t(logits, requires_grad=True)
    loss_t = F.cross_entropy(logits_t, torch.from_numpy(labels),
                             weight=None if weight is None else t(weight))
    assert_close(np.asarray(loss), loss_t, what="loss")
    grad = criterion.backward() if grad_output == 1.0 else criterion.backward(grad_output)
    loss_t.backward(torch.tensor(grad_output))
    assert_close(grad, logits_t.grad, what="grad logits")
    assert grad.dtype == np.float32
    assert np.all(np.isfinite(grad))


def test_softmax_cross_entropy_returns_0d_array():
    loss = minicnn.SoftmaxCrossEntropy()(np.zeros((2, 3), np.float32), np.array([0, 1]))
    assert isinstance(loss, np.ndarray) and loss.shape == ()


def test_softmax_cross_entropy_int32_labels_and_extreme_logits():
    logits = np.array([[1000.0, -1000.0, 0.0], [-1e4, 1e4, 1e4]], np.float32)
    labels = np.array([1, 2], np.int32)
    criterion = minicnn.SoftmaxCrossEntropy()
    loss = criterion(logits, labels)
    logits_t = t(logits, requires_grad=True)
    loss_t = F.cross_entropy(logits_t, torch.from_numpy(labels).long())
    assert np.isfinite(loss)
    assert_close(np.asarray(loss), loss_t, what="loss")
    loss_t.backward()
    assert_close(criterion.backward(), logits_t.grad, what="grad logits")


# -- default initialisation ------------------------------------------------------------------

@pytest.mark.parametrize("make, torch_make, fan_in", [
    (lambda: minicnn.Conv2d(16, 8, 3, rng=np.random.default_rng(0)), lambda: torch.nn.Conv2d(16, 8, 3), 16 * 9),
    (lambda: minicnn.Conv2d(3, 64, (3, 5), rng=np.random.default_rng(1)), lambda: torch.nn.Conv2d(3, 64, (3, 5)),
     3 * 15),
    (lambda: minicnn.Linear(100, 50, rng=np.random.default_rng(2)), lambda: torch.nn.Linear(100, 50), 100),
], ids=["conv16-8-3", "conv3-64-3x5", "linear100-50"])
def test_default_init_matches_torch_distribution(make, torch_make, fan_in):
    torch.manual_seed(0)
    layer, reference = make(), torch_make()
    bound = 1.0 / math.sqrt(fan_in)
    weight, bias = layer.weight.data, layer.bias.data
    assert weight.dtype == np.float32 and bias.dtype == np.float32
    assert weight.shape == tuple(reference.weight.shape)
    assert bias.shape == tuple(reference.bias.shape)
    torch_weight = reference.weight.detach().numpy()
    # torch's own weights respect the same bound: the two distributions are the same U(-b, b).
    assert np.abs(torch_weight).max() <= bound
    assert np.abs(weight).max() <= bound
    assert np.abs(bias).max() <= bound
    assert np.abs(weight).max() > 0.9 * bound                   # the whole range is used
    expected_std = bound / math.sqrt(3.0)
    assert weight.std() == pytest.approx(expected_std, rel=0.07)
    assert weight.std() == pytest.approx(torch_weight.std(), rel=0.1)
    assert abs(weight.mean()) < 4 * expected_std / math.sqrt(weight.size)


def test_default_init_bias_distribution():
    layer = minicnn.Linear(64, 4000, rng=np.random.default_rng(3))
    bound = 1.0 / 8.0
    bias = layer.bias.data
    assert np.abs(bias).max() <= bound
    assert bias.std() == pytest.approx(bound / math.sqrt(3.0), rel=0.05)


def test_manual_seed_makes_default_init_reproducible():
    minicnn.manual_seed(123)
    first = minicnn.Conv2d(2, 3, 3).weight.data.copy()
    minicnn.manual_seed(123)
    second = minicnn.Conv2d(2, 3, 3).weight.data
    np.testing.assert_array_equal(first, second)


# -- optimizers ------------------------------------------------------------------------------

PARAM_SHAPES = [(4, 3), (5,), (2, 3, 2, 2)]

OPTIMIZERS = {
    "sgd": (lambda p: optim.SGD(p, lr=0.1), lambda p: torch.optim.SGD(p, lr=0.1)),
    "sgd_momentum": (lambda p: optim.SGD(p, lr=0.05, momentum=0.9),
                     lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9)),
    "sgd_nesterov": (lambda p: optim.SGD(p, lr=0.05, momentum=0.8, nesterov=True),
                     lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.8, nesterov=True)),
    "sgd_weight_decay": (lambda p: optim.SGD(p, lr=0.1, weight_decay=0.01),
                         lambda p: torch.optim.SGD(p, lr=0.1, weight_decay=0.01)),
    "sgd_all": (lambda p: optim.SGD(p, lr=0.05, momentum=0.9, nesterov=True, weight_decay=5e-4),
                lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9, nesterov=True, weight_decay=5e-4)),
    "adam": (lambda p: optim.Adam(p, lr=1e-2), lambda p: torch.optim.Adam(p, lr=1e-2, foreach=False)),
    "adam_betas_eps": (lambda p: optim.Adam(p, lr=3e-3, betas=(0.8, 0.99), eps=1e-6),
                       lambda p: torch.optim.Adam(p, lr=3e-3, betas=(0.8, 0.99), eps=1e-6, foreach=False)),
    "adam_weight_decay": (lambda p: optim.Adam(p, lr=1e-2, weight_decay=0.1),
                          lambda p: torch.optim.Adam(p, lr=1e-2, weight_decay=0.1, foreach=False)),
    "adamw": (lambda p: optim.AdamW(p, lr=1e-2), lambda p: torch.optim.AdamW(p, lr=1e-2, foreach=False)),
    "adamw_weight_decay": (lambda p: optim.AdamW(p, lr=1e-2, weight_decay=0.3),
                           lambda p: torch.optim.AdamW(p, lr=1e-2, weight_decay=0.3, foreach=False)),
}


def make_params(seed=0):
    rng = np.random.default_rng(seed)
    return [minicnn.Parameter(rng.standard_normal(shape)) for shape in PARAM_SHAPES]


def fake_grads(params, step):
    """Gradients that depend on the step and on the current parameters (float64)."""
    rng = np.random.default_rng(1000 + step)
    return [rng.standard_normal(p.shape) + 0.5 * np.asarray(p) for p in params]


def run_minicnn(optimizer, params, steps, first_step=0):
    for step in range(first_step, first_step + steps):
        optimizer.zero_grad()
        for param, grad in zip(params, fake_grads([p.data for p in params], step)):
            param.accumulate_grad(grad)
        optimizer.step()


def step_both(optimizer, torch_optimizer, params, torch_params, step):
    """One step of each optimizer with the same fake gradients."""
    optimizer.zero_grad()
    torch_optimizer.zero_grad()
    for param, torch_param, grad in zip(params, torch_params, fake_grads([p.data for p in params], step)):
        param.accumulate_grad(grad)
        torch_param.grad = t(grad)
    optimizer.step()
    torch_optimizer.step()


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_optimizer_matches_torch(name):
    make, make_torch = OPTIMIZERS[name]
    params = make_params()
    torch_params = [torch.nn.Parameter(t(p.data)) for p in params]
    optimizer, torch_optimizer = make(params), make_torch(torch_params)
    for step in range(5):
        step_both(optimizer, torch_optimizer, params, torch_params, step)
        for param, torch_param in zip(params, torch_params):
            assert param.data.dtype == np.float64
            np.testing.assert_allclose(param.data, torch_param.detach().numpy(), rtol=1e-6, atol=1e-9,
                                       err_msg=f"{name}, step {step + 1}")


@pytest.mark.parametrize("name", ["sgd_momentum", "adam"])
def test_optimizer_skips_parameters_without_grad(name):
    """A parameter whose grad is None is left alone (and gets no state), as in torch."""
    make, make_torch = OPTIMIZERS[name]
    params = make_params()
    torch_params = [torch.nn.Parameter(t(p.data)) for p in params]
    optimizer, torch_optimizer = make(params), make_torch(torch_params)
    frozen_before = params[1].data.copy()
    for step in range(3):
        optimizer.zero_grad()
        torch_optimizer.zero_grad()
        for index, grad in enumerate(fake_grads([p.data for p in params], step)):
            if index == 1:
                continue
            params[index].accumulate_grad(grad)
            torch_params[index].grad = t(grad)
        optimizer.step()
        torch_optimizer.step()
    np.testing.assert_array_equal(params[1].data, frozen_before)
    assert not any(key.startswith("1.") for key in optimizer.state_dict())
    for param, torch_param in zip(params, torch_params):
        np.testing.assert_allclose(param.data, torch_param.detach().numpy(), rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("name", ["adam", "adamw"])
def test_adam_bias_correction_is_per_parameter_like_torch(name):
    """A parameter that starts receiving gradients only at step 3 (e.g. unfrozen late)."""
    make, make_torch = OPTIMIZERS[name]
    params = make_params()
    torch_params = [torch.nn.Parameter(t(p.data)) for p in params]
    optimizer, torch_optimizer = make(params), make_torch(torch_params)
    for step in range(5):
        optimizer.zero_grad()
        torch_optimizer.zero_grad()
        for index, grad in enumerate(fake_grads([p.data for p in params], step)):
            if index == 1 and step < 2:
                continue
            params[index].accumulate_grad(grad)
            torch_params[index].grad = t(grad)
        optimizer.step()
        torch_optimizer.step()
    np.testing.assert_allclose(params[1].data, torch_params[1].detach().numpy(), rtol=1e-6, atol=1e-9)


GROUP_OPTIMIZERS = {
    "sgd": (lambda groups: optim.SGD(groups, lr=0.1, momentum=0.9, weight_decay=0.01),
            lambda groups: torch.optim.SGD(groups, lr=0.1, momentum=0.9, weight_decay=0.01, foreach=False)),
    "adamw": (lambda groups: optim.AdamW(groups, lr=1e-2, weight_decay=0.1),
              lambda groups: torch.optim.AdamW(groups, lr=1e-2, weight_decay=0.1, foreach=False)),
}


@pytest.mark.parametrize("name", list(GROUP_OPTIMIZERS))
def test_parameter_groups_match_torch_per_group_lr(name):
    """lr_scale 0.1 on the first two parameters = torch's param group with lr * 0.1, also after an lr change."""
    make, make_torch = GROUP_OPTIMIZERS[name]
    params = make_params()
    torch_params = [torch.nn.Parameter(t(p.data)) for p in params]
    optimizer = make([{"params": params[:2], "lr_scale": 0.1}, {"params": params[2:]}])
    base_lr = optimizer.lr
    torch_optimizer = make_torch([{"params": torch_params[:2], "lr": base_lr * 0.1}, {"params": torch_params[2:]}])
    for step in range(4):
        if step == 2:                                     # a schedule changes lr: every group follows
            optimizer.lr = base_lr * 0.5
            for group, scale in zip(torch_optimizer.param_groups, (0.1, 1.0)):
                group["lr"] = base_lr * 0.5 * scale
        step_both(optimizer, torch_optimizer, params, torch_params, step)
    for index, (param, torch_param) in enumerate(zip(params, torch_params)):
        np.testing.assert_allclose(param.data, torch_param.detach().numpy(), rtol=1e-6, atol=1e-9,
                                   err_msg=f"{name}, parameter {index}")


def test_parameter_group_errors_say_what_was_expected():
    params = make_params()
    with pytest.raises(ValueError, match="unknown keys \\['lr'\\]"):
        optim.SGD([{"params": params, "lr": 0.1}], lr=0.1)
    with pytest.raises(ValueError, match="lr_scale must be >= 0"):
        optim.SGD([{"params": params, "lr_scale": -1}], lr=0.1)


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_optimizer_state_dict_round_trip_is_exact(name):
    make, _ = OPTIMIZERS[name]
    uninterrupted = make_params()
    reference = make(uninterrupted)
    run_minicnn(reference, uninterrupted, 5)

    resumed = make_params()
    first = make(resumed)
    run_minicnn(first, resumed, 3)
    # Through an .npz file, as a checkpoint would be saved.
    buffer = io.BytesIO()
    np.savez(buffer, **first.state_dict())
    buffer.seek(0)
    with np.load(buffer) as archive:
        state = {key: archive[key] for key in archive.files}
    assert int(state["step"]) == 3
    restored_params = [minicnn.Parameter(p.data.copy()) for p in resumed]
    del first

    second = make(restored_params)
    second.load_state_dict(state)
    assert second.step_count == 3
    run_minicnn(second, restored_params, 2, first_step=3)
    for index, (a, b) in enumerate(zip(restored_params, uninterrupted)):
        np.testing.assert_array_equal(a.data, b.data, err_msg=f"{name}: parameter {index}")
    final_resumed, final_uninterrupted = second.state_dict(), reference.state_dict()
    assert final_resumed.keys() == final_uninterrupted.keys()
    for key in final_resumed:
        np.testing.assert_array_equal(final_resumed[key], final_uninterrupted[key], err_msg=key)


def test_optimizer_load_state_dict_restores_lr():
    params = make_params()
    optimizer = optim.SGD(params, lr=0.5, momentum=0.9)
    run_minicnn(optimizer, params, 1)
    fresh = optim.SGD(params, lr=0.01, momentum=0.9)
    fresh.load_state_dict(copy.deepcopy(optimizer.state_dict()))
    assert fresh.lr == 0.5


# -- a small network end to end --------------------------------------------------------------

def small_net(rng):
    return minicnn.Sequential(
        minicnn.Conv2d(1, 4, 3, padding=1, rng=rng), minicnn.ReLU(), minicnn.MaxPool2d(2),
        minicnn.Conv2d(4, 8, 3, rng=rng), minicnn.ReLU(), minicnn.MaxPool2d(2),
        minicnn.Flatten(),
        minicnn.Linear(8 * 2 * 2, 16, rng=rng), minicnn.ReLU(),
        minicnn.Linear(16, 2, rng=rng))


def small_torch_net():
    return torch.nn.Sequential(
        torch.nn.Conv2d(1, 4, 3, padding=1), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
        torch.nn.Conv2d(4, 8, 3), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
        torch.nn.Flatten(),
        torch.nn.Linear(8 * 2 * 2, 16), torch.nn.ReLU(),
        torch.nn.Linear(16, 2))


@pytest.mark.parametrize("weighted", [False, True], ids=["plain", "class_weights"])
def test_small_network_matches_torch(weighted):
    rng = np.random.default_rng(42)
    model = small_net(rng)
    reference = small_torch_net()
    state = model.state_dict()
    assert list(state) == list(reference.state_dict())        # "0.weight", "0.bias", "3.weight", ...
    reference.load_state_dict({key: t(value) for key, value in state.items()})

    x = rng.standard_normal((4, 1, 12, 14)).astype(np.float32)   # 12x14 -> 6x7 -> 4x5 -> 2x2
    labels = np.array([0, 1, 1, 0])
    weight = np.array([0.3, 1.7], np.float32) if weighted else None
    criterion = minicnn.SoftmaxCrossEntropy(weight)

    logits = model(x)
    loss = criterion(logits, labels)
    x_t = t(x, requires_grad=True)
    logits_t = reference(x_t)
    loss_t = F.cross_entropy(logits_t, torch.from_numpy(labels), weight=None if weight is None else t(weight))
    assert_close(logits, logits_t, what="logits")
    assert_close(np.asarray(loss), loss_t, what="loss")

    grad_x = model.backward(criterion.backward())
    loss_t.backward()
    assert_close(grad_x, x_t.grad, what="grad input")
    torch_params = dict(reference.named_parameters())
    for name, param in model.named_parameters():
        assert_close(param.grad, torch_params[name].grad, what=f"grad {name}")

    # One SGD step on both keeps them equal.
    optimizer = optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    torch_optimizer = torch.optim.SGD(reference.parameters(), lr=0.1, momentum=0.9)
    optimizer.step()
    torch_optimizer.step()
    for name, value in model.state_dict().items():
        assert_close(value, reference.state_dict()[name], what=f"{name} after one step")


def test_state_dict_loads_from_torch():
    """The reverse direction: torch's weights load into minicnn and give torch's outputs."""
    torch.manual_seed(0)
    reference = small_torch_net()
    model = small_net(np.random.default_rng(0))
    model.load_state_dict({key: value.detach().numpy() for key, value in reference.state_dict().items()})
    x = shuffled_linspace((2, 1, 12, 14), seed=3)
    with torch.no_grad():
        expected = reference(t(x))
    assert_close(model(x), expected, what="logits")


# -- NTXentLoss (SimCLR) -------------------------------------------------------------------------

@pytest.mark.parametrize("pairs, dim", [(1, 4), (6, 8), (16, 32)])
@pytest.mark.parametrize("temperature", [0.1, 0.5])
def test_ntxent_loss_matches_a_torch_reference(pairs, dim, temperature):
    h = np.random.default_rng(pairs * dim).standard_normal((2 * pairs, dim)).astype(np.float32)
    criterion = minicnn.NTXentLoss(temperature)
    loss = criterion(h)
    grad = criterion.backward(0.37)

    h_t = t(h, requires_grad=True)                       # the usual PyTorch SimCLR implementation
    z = F.normalize(h_t, dim=1)
    sim = z @ z.T / temperature
    sim = sim.masked_fill(torch.eye(2 * pairs, dtype=torch.bool), float("-inf"))
    target = (torch.arange(2 * pairs) + pairs) % (2 * pairs)
    loss_t = F.cross_entropy(sim, target)
    loss_t.backward(torch.tensor(0.37))
    assert_close(np.asarray(loss), loss_t, what="loss")
    assert_close(grad, h_t.grad, what="grad h")
    assert grad.dtype == np.float32
