"""The CuPy path: every layer, the loss and the optimizers give the CPU's numbers on the GPU.

Tests that take the ``gpu`` fixture (tests/conftest.py) skip with the reason
when CuPy has no working GPU, and fail instead under MINICNN_REQUIRE_GPU=1.
The last tests in this file need no GPU: they check the messages a user gets
when there is none.
"""
import copy

import numpy as np
import pytest

import minicnn
from minicnn import optim
from minicnn.backend import gpu_status, to_device
from minicnn.layers import BasicBlock, make_downsample

RTOL = 1e-4   # float32, CPU BLAS vs cuBLAS


# -- helpers ---------------------------------------------------------------------------------

def shuffled_linspace(shape, seed=0, low=-2.0, high=2.0):
    """Distinct float32 values (no max-pool ties, nothing exactly at ReLU's kink), shuffled."""
    size = int(np.prod(shape))
    values = np.linspace(low, high, size + 1)
    values = values[values != 0.0][:size]
    np.random.default_rng(seed).shuffle(values)
    return values.reshape(shape).astype(np.float32)


def assert_gpu_matches(gpu_value, cpu_value, cupy, rtol=RTOL, what="value"):
    """gpu_value is a CuPy array with the CPU result's shape and dtype, equal within rtol of its scale."""
    assert isinstance(gpu_value, cupy.ndarray), f"{what}: expected a cupy.ndarray, got {type(gpu_value)}"
    host = cupy.asnumpy(gpu_value)
    expected = np.asarray(cpu_value)
    assert host.shape == expected.shape, f"{what}: shape {host.shape} != {expected.shape}"
    assert host.dtype == expected.dtype, f"{what}: dtype {host.dtype} != {expected.dtype}"
    scale = float(np.abs(expected).max(initial=0.0))
    np.testing.assert_allclose(host, expected, rtol=rtol, atol=rtol * max(scale, 1e-6), err_msg=what)


def assert_optimizer_state_on_gpu(optimizer, gpu, what="optimizer state"):
    """Every state array lives on the GPU; Adam's per-parameter step count stays a host int (like torch's)."""
    for buffers in optimizer.state:
        for buffer_name, value in buffers.items():
            if buffer_name == "step":
                assert isinstance(value, int), f"{what}: step count is {type(value)}, expected a host int"
            else:
                assert isinstance(value, gpu.ndarray), f"{what}: {buffer_name} is not on the GPU"


def on_gpu(module):
    """A GPU copy of a CPU module (same weights; a Dropout copy keeps the same random stream)."""
    return copy.deepcopy(module).to("gpu")


def two_conv_three_fc(seed=0):
    rng = np.random.default_rng(seed)
    return minicnn.Sequential(
        minicnn.Conv2d(1, 4, 3, padding=1, rng=rng), minicnn.ReLU(), minicnn.MaxPool2d(2),
        minicnn.Conv2d(4, 8, 3, padding=1, rng=rng), minicnn.ReLU(), minicnn.MaxPool2d(2),
        minicnn.Flatten(),
        minicnn.Linear(8 * 4 * 4, 32, rng=rng), minicnn.ReLU(),
        minicnn.Linear(32, 16, rng=rng), minicnn.ReLU(),
        minicnn.Linear(16, 3, rng=rng))


def batch(seed=0, n=6):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, 1, 16, 16)).astype(np.float32)
    labels = rng.integers(0, 3, size=n)
    return x, labels


def train_step(model, optimizer, criterion, x, labels):
    optimizer.zero_grad()
    loss = criterion(model(x), labels)
    model.backward(criterion.backward())
    optimizer.step()
    return loss


# -- layers ----------------------------------------------------------------------------------

def _rng():
    return np.random.default_rng(3)


LAYERS = {
    "conv3": (lambda: minicnn.Conv2d(2, 3, 3, rng=_rng()), (2, 2, 7, 6)),
    "conv3_s2_p1": (lambda: minicnn.Conv2d(2, 3, 3, stride=2, padding=1, rng=_rng()), (3, 2, 9, 8)),
    "conv1": (lambda: minicnn.Conv2d(3, 2, 1, rng=_rng()), (1, 3, 4, 5)),
    "conv5_s3_p2": (lambda: minicnn.Conv2d(1, 2, 5, stride=3, padding=2, rng=_rng()), (2, 1, 8, 7)),
    "conv2x3_nonsquare": (lambda: minicnn.Conv2d(2, 4, (2, 3), stride=(1, 2), padding=(1, 0), rng=_rng()),
                          (2, 2, 6, 9)),
    "conv_no_bias": (lambda: minicnn.Conv2d(2, 3, 3, bias=False, rng=_rng()), (2, 2, 5, 5)),
    "maxpool2": (lambda: minicnn.MaxPool2d(2), (2, 3, 8, 6)),
    "maxpool3_s1": (lambda: minicnn.MaxPool2d(3, stride=1), (2, 2, 6, 7)),
    "maxpool3_s2_p1": (lambda: minicnn.MaxPool2d(3, stride=2, padding=1), (2, 2, 7, 8)),
    "maxpool2x3": (lambda: minicnn.MaxPool2d((2, 3)), (1, 2, 6, 9)),
    "relu": (lambda: minicnn.ReLU(), (2, 3, 4, 5)),
    "batchnorm": (lambda: minicnn.BatchNorm2d(3), (2, 3, 4, 5)),
    "batchnorm_eval": (lambda: minicnn.BatchNorm2d(3).eval(), (2, 3, 4, 5)),
    "basic_block": (lambda: BasicBlock(3, 3, rng=_rng()), (2, 3, 6, 5)),
    "basic_block_downsample": (lambda: BasicBlock(2, 4, 2, make_downsample(2, 4, 2, rng=_rng()), rng=_rng()),
                               (2, 2, 7, 6)),
    "flatten": (lambda: minicnn.Flatten(), (2, 3, 4, 5)),
    "linear": (lambda: minicnn.Linear(5, 3, rng=_rng()), (4, 5)),
    "dropout": (lambda: minicnn.Dropout(0.3, rng=np.random.default_rng(9)), (4, 3, 5, 5)),
    "dropout_eval": (lambda: minicnn.Dropout(0.3, rng=np.random.default_rng(9)).eval(), (4, 10)),
    "sequential": (lambda: two_conv_three_fc(), (2, 1, 16, 16)),
}


@pytest.mark.parametrize("name", list(LAYERS))
def test_layer_forward_backward_matches_cpu(gpu, name):
    make, shape = LAYERS[name]
    layer = make()
    gpu_layer = on_gpu(layer)
    for param_name, param in gpu_layer.named_parameters():
        assert isinstance(param.data, gpu.ndarray), f"{param_name} was not moved to the GPU"
        assert param.data.dtype == np.float32

    x = shuffled_linspace(shape, seed=1)
    out = layer(x)
    out_gpu = gpu_layer(minicnn.to_device(x, "gpu"))
    assert_gpu_matches(out_gpu, out, gpu, what=f"{name} output")

    upstream = np.random.default_rng(2).standard_normal(out.shape).astype(np.float32)
    grad = layer.backward(upstream)
    grad_gpu = gpu_layer.backward(minicnn.to_device(upstream, "gpu"))
    assert_gpu_matches(grad_gpu, grad, gpu, what=f"{name} grad input")

    gpu_params = dict(gpu_layer.named_parameters())
    for param_name, param in layer.named_parameters():
        assert_gpu_matches(gpu_params[param_name].grad, param.grad, gpu, what=f"{name} grad {param_name}")
        assert isinstance(gpu_params[param_name].data, gpu.ndarray)


def test_backward_accumulates_on_gpu(gpu):
    layer = minicnn.Conv2d(2, 3, 3, padding=1, rng=_rng())
    gpu_layer = on_gpu(layer)
    rng = np.random.default_rng(4)
    for _ in range(2):
        x = rng.standard_normal((2, 2, 5, 5)).astype(np.float32)
        upstream = rng.standard_normal((2, 3, 5, 5)).astype(np.float32)
        layer(x)
        layer.backward(upstream)
        gpu_layer(minicnn.to_device(x, "gpu"))
        gpu_layer.backward(minicnn.to_device(upstream, "gpu"))
    assert_gpu_matches(gpu_layer.weight.grad, layer.weight.grad, gpu, what="accumulated grad weight")
    assert_gpu_matches(gpu_layer.bias.grad, layer.bias.grad, gpu, what="accumulated grad bias")


# -- loss ------------------------------------------------------------------------------------

@pytest.mark.parametrize("weighted", [False, True], ids=["plain", "class_weights"])
def test_loss_matches_cpu(gpu, weighted):
    rng = np.random.default_rng(5)
    logits = (rng.standard_normal((7, 4)) * 3).astype(np.float32)
    labels = rng.integers(0, 4, size=7)
    weight = np.array([0.5, 2.0, 1.0, 3.0], np.float32) if weighted else None

    criterion, gpu_criterion = minicnn.SoftmaxCrossEntropy(weight), minicnn.SoftmaxCrossEntropy(weight)
    loss = criterion(logits, labels)
    loss_gpu = gpu_criterion(minicnn.to_device(logits, "gpu"), minicnn.to_device(labels, "gpu"))
    assert isinstance(loss_gpu, gpu.ndarray) and loss_gpu.shape == ()
    assert_gpu_matches(loss_gpu, np.asarray(loss), gpu, what="loss")
    assert_gpu_matches(gpu_criterion.backward(), criterion.backward(), gpu, what="grad logits")


@pytest.mark.parametrize("weighted", [False, True], ids=["plain", "class_weights"])
def test_out_of_range_gpu_labels_make_the_loss_nan(gpu, weighted):
    """On the GPU the label range is not read back to the host (a sync per step): a bad label -> NaN."""
    weight = np.array([1.0, 2.0], np.float32) if weighted else None
    logits = gpu.asarray(np.zeros((3, 2), np.float32))
    good = minicnn.SoftmaxCrossEntropy(weight)(logits, gpu.asarray(np.array([0, 1, 1])))
    assert np.isfinite(float(good))
    for bad in ([0, 2, 1], [-1, 0, 1]):
        assert np.isnan(float(minicnn.SoftmaxCrossEntropy(weight)(logits, gpu.asarray(np.array(bad)))))


# -- optimizers ------------------------------------------------------------------------------

OPTIMIZERS = {
    "sgd": lambda p: optim.SGD(p, lr=0.1),
    "sgd_momentum_wd": lambda p: optim.SGD(p, lr=0.05, momentum=0.9, weight_decay=1e-3),
    "sgd_nesterov": lambda p: optim.SGD(p, lr=0.05, momentum=0.9, nesterov=True),
    "adam": lambda p: optim.Adam(p, lr=1e-2),
    "adam_wd": lambda p: optim.Adam(p, lr=1e-2, weight_decay=0.1),
    "adamw": lambda p: optim.AdamW(p, lr=1e-2, weight_decay=0.1),
}


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_optimizer_step_matches_cpu(gpu, name):
    rng = np.random.default_rng(6)
    host = [rng.standard_normal(shape).astype(np.float32) for shape in [(4, 3), (5,), (2, 3, 3, 3)]]
    params = [minicnn.Parameter(a.copy()) for a in host]
    gpu_params = [minicnn.Parameter(minicnn.to_device(a, "gpu")) for a in host]
    optimizer, gpu_optimizer = OPTIMIZERS[name](params), OPTIMIZERS[name](gpu_params)
    for step in range(3):
        optimizer.zero_grad()
        gpu_optimizer.zero_grad()
        for param, gpu_param in zip(params, gpu_params):
            grad = rng.standard_normal(param.shape).astype(np.float32)
            param.accumulate_grad(grad)
            gpu_param.accumulate_grad(minicnn.to_device(grad, "gpu"))
        optimizer.step()
        gpu_optimizer.step()
    for index, (param, gpu_param) in enumerate(zip(params, gpu_params)):
        assert_gpu_matches(gpu_param.data, param.data, gpu, rtol=1e-5, what=f"{name} parameter {index}")
    assert_optimizer_state_on_gpu(gpu_optimizer, gpu)
    # The state_dict is host NumPy (for .npz checkpoints) and equals the CPU optimizer's.
    state, gpu_state = optimizer.state_dict(), gpu_optimizer.state_dict()
    assert state.keys() == gpu_state.keys()
    for key, value in gpu_state.items():
        assert isinstance(value, np.ndarray), f"state_dict()['{key}'] is {type(value)}, not NumPy"
        np.testing.assert_allclose(value, state[key], rtol=1e-5, atol=1e-6, err_msg=key)


# -- a full training step ----------------------------------------------------------------------

def test_training_steps_match_cpu(gpu):
    model = two_conv_three_fc(seed=1)
    gpu_model = on_gpu(model)
    optimizer = optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    gpu_optimizer = optim.SGD(gpu_model.parameters(), lr=0.05, momentum=0.9)
    criterion, gpu_criterion = minicnn.SoftmaxCrossEntropy(), minicnn.SoftmaxCrossEntropy()
    for step in range(3):
        x, labels = batch(seed=step)
        loss = train_step(model, optimizer, criterion, x, labels)
        gpu_loss = train_step(gpu_model, gpu_optimizer, gpu_criterion,
                              minicnn.to_device(x, "gpu"), minicnn.to_device(labels, "gpu"))
        assert_gpu_matches(gpu_loss, np.asarray(loss), gpu, what=f"loss at step {step + 1}")
    gpu_params = dict(gpu_model.named_parameters())
    for name, param in model.named_parameters():
        assert isinstance(gpu_params[name].grad, gpu.ndarray), f"{name}.grad is not a cupy array"
        assert_gpu_matches(gpu_params[name].grad, param.grad, gpu, what=f"grad {name}")
        assert_gpu_matches(gpu_params[name].data, param.data, gpu, what=f"{name} after 3 steps")


def test_adam_training_steps_match_cpu(gpu):
    model = two_conv_three_fc(seed=2)
    gpu_model = on_gpu(model)
    optimizer, gpu_optimizer = optim.Adam(model.parameters(), lr=1e-3), optim.Adam(gpu_model.parameters(), lr=1e-3)
    criterion = minicnn.SoftmaxCrossEntropy(weight=[1.0, 2.0, 0.5])
    for step in range(3):
        x, labels = batch(seed=10 + step)
        loss = train_step(model, optimizer, criterion, x, labels)
        gpu_loss = train_step(gpu_model, gpu_optimizer, criterion,
                              minicnn.to_device(x, "gpu"), minicnn.to_device(labels, "gpu"))
        assert_gpu_matches(gpu_loss, np.asarray(loss), gpu, what=f"loss at step {step + 1}")
    gpu_state = gpu_model.state_dict()
    for name, value in model.state_dict().items():
        assert_gpu_matches(gpu_state[name], value, gpu, what=f"{name} after 3 Adam steps")


# -- devices -----------------------------------------------------------------------------------

@pytest.mark.parametrize("layer", [minicnn.Conv2d(1, 2, 3), minicnn.Linear(4, 2)], ids=["conv", "linear"])
def test_gpu_input_with_cpu_weights_says_what_to_call(gpu, layer):
    shape = (2, 1, 5, 5) if isinstance(layer, minicnn.Conv2d) else (2, 4)
    x = minicnn.to_device(np.ones(shape, np.float32), "gpu")
    with pytest.raises(TypeError, match=r"model\.to\('gpu'\)"):
        layer(x)


def test_cpu_input_with_gpu_weights_says_what_to_call(gpu):
    layer = minicnn.Conv2d(1, 2, 3).to("gpu")
    with pytest.raises(TypeError, match=r"model\.to\('cpu'\)|to_device\(x, 'gpu'\)"):
        layer(np.ones((1, 1, 5, 5), np.float32))


def test_module_to_gpu_and_back_round_trips_exactly(gpu):
    model = two_conv_three_fc(seed=3)
    before = {name: value.copy() for name, value in model.state_dict().items()}
    assert model.to("gpu") is model
    for name, value in model.state_dict().items():
        assert isinstance(value, gpu.ndarray), f"{name} is not on the GPU"
        assert value.dtype == before[name].dtype
    model.to("cpu")
    after = model.state_dict()
    assert after.keys() == before.keys()
    for name, value in after.items():
        assert type(value) is np.ndarray, f"{name} is {type(value)} after .to('cpu')"
        assert value.dtype == before[name].dtype
        np.testing.assert_array_equal(value, before[name], err_msg=name)


def test_load_state_dict_keeps_the_gpu(gpu):
    source = two_conv_three_fc(seed=4)
    model = two_conv_three_fc(seed=5).to("gpu")
    model.load_state_dict(source.state_dict())
    for name, value in model.state_dict().items():
        assert isinstance(value, gpu.ndarray), f"{name} left the GPU on load_state_dict"
        np.testing.assert_array_equal(gpu.asnumpy(value), source.state_dict()[name])


@pytest.mark.parametrize("name", ["sgd_momentum_wd", "adam", "adamw"])
def test_optimizer_state_follows_the_model_to_the_gpu(gpu, name):
    """One step on the CPU, model.to('gpu'), two more steps: the same as three CPU steps."""
    reference = two_conv_three_fc(seed=6)
    moved = copy.deepcopy(reference)
    reference_optimizer, moved_optimizer = OPTIMIZERS[name](reference.parameters()), OPTIMIZERS[name](moved.parameters())
    criterion = minicnn.SoftmaxCrossEntropy()

    for step in range(3):
        x, labels = batch(seed=20 + step)
        train_step(reference, reference_optimizer, criterion, x, labels)
        if step == 0:
            train_step(moved, moved_optimizer, criterion, x, labels)
            moved.to("gpu")
        else:
            train_step(moved, moved_optimizer, criterion, minicnn.to_device(x, "gpu"), minicnn.to_device(labels, "gpu"))

    assert_optimizer_state_on_gpu(moved_optimizer, gpu, what="state after model.to('gpu')")
    moved_state = moved.state_dict()
    for key, value in reference.state_dict().items():
        assert_gpu_matches(moved_state[key], value, gpu, what=f"{name}: {key}")


def test_optimizer_state_dict_loads_onto_the_gpu(gpu):
    """A CPU checkpoint (weights + optimizer state) resumes on the GPU."""
    reference = two_conv_three_fc(seed=7)
    reference_optimizer = optim.Adam(reference.parameters(), lr=1e-3)
    criterion = minicnn.SoftmaxCrossEntropy()
    x, labels = batch(seed=30)
    train_step(reference, reference_optimizer, criterion, x, labels)
    weights = {k: v.copy() for k, v in reference.state_dict().items()}
    optimizer_state = {k: np.array(v, copy=True) for k, v in reference_optimizer.state_dict().items()}

    resumed = two_conv_three_fc(seed=8).to("gpu")
    resumed.load_state_dict(weights)
    resumed_optimizer = optim.Adam(resumed.parameters(), lr=1e-3)
    resumed_optimizer.load_state_dict(optimizer_state)
    assert_optimizer_state_on_gpu(resumed_optimizer, gpu, what="state loaded from a CPU checkpoint")

    x, labels = batch(seed=31)
    train_step(reference, reference_optimizer, criterion, x, labels)
    train_step(resumed, resumed_optimizer, criterion, minicnn.to_device(x, "gpu"), minicnn.to_device(labels, "gpu"))
    resumed_state = resumed.state_dict()
    for key, value in reference.state_dict().items():
        assert_gpu_matches(resumed_state[key], value, gpu, what=key)


def test_to_device_moves_data_both_ways(gpu):
    x = shuffled_linspace((2, 3), seed=0)
    on = minicnn.to_device(x, "gpu")
    assert isinstance(on, gpu.ndarray)
    assert minicnn.to_device(on, "gpu") is on            # already there: no copy
    back = minicnn.to_device(on, "cpu")
    assert type(back) is np.ndarray
    np.testing.assert_array_equal(back, x)
    np.testing.assert_array_equal(minicnn.as_numpy(on), x)
    minicnn.synchronize()


# -- no GPU needed ---------------------------------------------------------------------------

def test_gpu_status_is_a_bool_and_a_reason():
    usable, reason = gpu_status()
    assert isinstance(usable, bool)
    assert isinstance(reason, str) and reason
    assert minicnn.gpu_available() is usable
    assert gpu_status() == (usable, reason)      # cached, stable


def test_to_device_gpu_without_a_gpu_raises_a_clear_error():
    usable, reason = gpu_status()
    if usable:
        pytest.skip("a GPU is available: nothing to refuse")
    x = np.ones(3, np.float32)
    with pytest.raises(RuntimeError) as error:
        to_device(x, "gpu")
    message = str(error.value)
    assert "gpu" in message
    assert reason in message                      # e.g. "CuPy is not installed (pip install ...)"
    with pytest.raises(RuntimeError, match="gpu"):
        minicnn.Linear(2, 2).to("gpu")


def test_to_device_unknown_device_raises_value_error():
    with pytest.raises(ValueError, match=r"unknown device 'tpu'"):
        to_device(np.ones(3, np.float32), "tpu")


def test_to_device_cpu_is_a_no_op_for_host_arrays():
    x = np.ones(3, np.float32)
    assert to_device(x, "cpu") is x
    minicnn.synchronize()                         # a no-op without a GPU, never an error
