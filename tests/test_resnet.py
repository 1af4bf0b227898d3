"""ResNet-18: BasicBlock gradients, torchvision-compatible names, parity with a torch ResNet-18
loaded from a torch.save file read WITHOUT torch, the transfer-learning helpers and the leak guard."""
import copy
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

import minicnn as mc
from minicnn.gradcheck import check_module
from minicnn.layers import BasicBlock, make_downsample
from minicnn.module import NOTHING_SAVED_UNDER_NO_GRAD
from minicnn.models import (backbone_parameters, head_parameters, load_pretrained, replace_fc, resnet18,
                            to_grayscale_conv1)
from fake_device import on_fake_device, to_fake_device

REPO_ROOT = Path(__file__).resolve().parents[1]
RTOL = 1e-6


def randomise_batchnorm(module, rng):
    """BatchNorm weights, biases and running statistics away from their trivial defaults."""
    for layer in module.modules():
        if isinstance(layer, mc.BatchNorm2d):
            c = layer.num_features
            layer.weight.data = rng.uniform(0.5, 1.5, c).astype(layer.weight.data.dtype)
            layer.bias.data = rng.normal(0, 0.2, c).astype(layer.bias.data.dtype)
            layer.running_mean = rng.normal(0, 0.2, c).astype(layer.running_mean.dtype)
            layer.running_var = rng.uniform(0.5, 1.5, c).astype(layer.running_var.dtype)
    return module


# -- BasicBlock ----------------------------------------------------------------------------------

def identity_block(rng):
    return randomise_batchnorm(BasicBlock(3, 3, rng=rng), rng)                    # stride 1, x + F(x)


def downsample_block(rng):
    block = BasicBlock(2, 3, stride=2, downsample=make_downsample(2, 3, 2, rng=rng), rng=rng)
    return randomise_batchnorm(block, rng)


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("make, in_channels, hw", [(identity_block, 3, (4, 4)), (downsample_block, 2, (5, 5))],
                         ids=["identity", "downsample"])
def test_basic_block_gradients(make, in_channels, hw, train):
    rng = np.random.default_rng(0)
    block = make(rng).train(train)
    errors = check_module(block, rng.standard_normal((2, in_channels, *hw)))
    expected = {"input", "conv1.weight", "bn1.weight", "bn1.bias", "conv2.weight", "bn2.weight", "bn2.bias"}
    if block.downsample is not None:
        expected |= {"downsample.0.weight", "downsample.1.weight", "downsample.1.bias"}
    assert set(errors) == expected
    assert max(errors.values()) <= RTOL


def test_basic_block_shapes_and_state_dict_names():
    block = downsample_block(np.random.default_rng(0))
    out = block(np.zeros((2, 2, 7, 6), dtype=np.float32))
    assert out.shape == (2, 3, 4, 3) and out.dtype == np.float32
    assert {"conv1.weight", "bn1.running_mean", "downsample.0.weight", "downsample.1.running_var",
            "downsample.1.num_batches_tracked"} <= set(block.state_dict())


def test_basic_block_without_downsample_rejects_a_shape_change():
    block = BasicBlock(2, 3, rng=np.random.default_rng(0))
    with pytest.raises(ValueError, match="needs a downsample"):
        block(np.zeros((1, 2, 4, 4), dtype=np.float32))


def test_basic_block_backward_does_not_modify_grad_output():
    rng = np.random.default_rng(1)
    block = identity_block(rng)
    out = block(rng.standard_normal((2, 3, 4, 4)).astype(np.float32))
    grad = rng.standard_normal(out.shape).astype(np.float32)
    before = grad.copy()
    block.backward(grad)
    np.testing.assert_array_equal(grad, before)


# -- ResNet-18 structure ---------------------------------------------------------------------------

def test_resnet18_parameter_count_names_and_shapes():
    model = resnet18(rng=np.random.default_rng(0))
    state = model.state_dict()
    assert sum(p.data.size for p in model.parameters()) == 11_689_512          # torchvision's count
    assert len(state) == 122                                                    # 62 params + 60 BN buffers
    assert state["conv1.weight"].shape == (64, 3, 7, 7)
    assert state["layer2.0.downsample.0.weight"].shape == (128, 64, 1, 1)
    assert state["layer4.1.bn2.running_var"].shape == (512,)
    assert state["fc.weight"].shape == (1000, 512)
    assert "layer1.0.downsample.0.weight" not in state                         # layer1 keeps shape: identity
    # torchvision's init: conv ~ N(0, 2 / fan_out), fan_out = 64 * 7 * 7 for conv1
    assert abs(state["conv1.weight"].std() - np.sqrt(2 / (64 * 49))) < 0.1 * np.sqrt(2 / (64 * 49))


def test_a_narrow_resnet10_has_every_channel_count_scaled_and_correct_gradients():
    rng = np.random.default_rng(0)
    model = randomise_batchnorm(mc.models.ResNet((1, 1, 1, 1), num_classes=2, in_channels=1, width=2, rng=rng), rng)
    state = model.state_dict()
    assert state["conv1.weight"].shape == (2, 1, 7, 7) and state["fc.weight"].shape == (2, 16)
    assert state["layer4.0.downsample.0.weight"].shape == (16, 8, 1, 1) and "layer1.1.conv1.weight" not in state
    model.conv1.needs_input_grad = True
    # 24 px: 12 after conv1, 6 after the max-pool, then 3, 2 and 1 (odd maps exercise the padding); batch 4:
    # layer4's BatchNorm averages 4 values of a 1x1 map. Checked in training mode only: the wiring (stem,
    # blocks, pooling, fc) is the same in both modes, and BasicBlock and BatchNorm2d are checked in both.
    errors = check_module(model.train(), rng.standard_normal((4, 1, 24, 24)))
    assert len(errors) == 1 + len(list(model.parameters())) and max(errors.values()) <= RTOL


def test_helpers_features_replace_fc_and_parameter_groups():
    rng = np.random.default_rng(0)
    model = randomise_batchnorm(resnet18(num_classes=10, rng=rng), rng).eval()
    x = rng.standard_normal((2, 3, 32, 32)).astype(np.float32)
    features = model.features(x, keep_for_backward=False)
    assert features.shape == (2, 512)
    assert all(getattr(module, "_saved", None) is None or module._saved is NOTHING_SAVED_UNDER_NO_GRAD
               for module in model.modules())                  # nothing kept for backward
    np.testing.assert_allclose(model(x), model.fc(features), rtol=1e-6)

    fc = replace_fc(model, 2, rng=rng)
    assert model.fc is fc and model(x).shape == (2, 2)
    assert [id(p) for p in head_parameters(model)] == [id(fc.weight), id(fc.bias)]
    backbone = backbone_parameters(model)
    assert len(backbone) + 2 == len(model.parameters()) and id(fc.weight) not in map(id, backbone)
    assert model.state_dict()["fc.weight"].shape == (2, 512)


def test_to_grayscale_conv1_equals_the_image_repeated_three_times():
    rng = np.random.default_rng(0)
    model = randomise_batchnorm(resnet18(num_classes=4, rng=rng), rng).eval()
    gray = rng.standard_normal((2, 1, 32, 32)).astype(np.float32)
    expected = model(np.repeat(gray, 3, axis=1))
    conv = to_grayscale_conv1(model)
    assert model.conv1 is conv and conv.weight.shape == (64, 1, 7, 7) and model.in_channels == 1
    np.testing.assert_allclose(model(gray), expected, rtol=1e-4, atol=1e-4 * np.abs(expected).max())
    # trains: backward runs and conv1 gets a gradient
    model.train()
    model.backward(np.ones_like(model(gray)))
    assert model.conv1.weight.grad.shape == (64, 1, 7, 7)


def test_load_pretrained_fills_missing_num_batches_tracked(tmp_path):
    source = resnet18(rng=np.random.default_rng(1))
    state = {k: v for k, v in source.state_dict().items() if not k.endswith("num_batches_tracked")}
    mc.serialization.save(tmp_path / "r18.npz", state)
    model = load_pretrained(resnet18(rng=np.random.default_rng(2)), tmp_path / "r18.npz")
    np.testing.assert_array_equal(model.layer3[1].conv2.weight.data, source.layer3[1].conv2.weight.data)
    assert model.bn1.num_batches_tracked.dtype == np.int64


# -- leak guard ----------------------------------------------------------------------------------

def test_basic_block_stays_on_the_device():
    rng = np.random.default_rng(3)
    host = downsample_block(rng)
    device = downsample_block(np.random.default_rng(3)).map_arrays(to_fake_device)
    x = np.random.default_rng(4).standard_normal((2, 2, 6, 6)).astype(np.float32)
    upstream = np.random.default_rng(5).standard_normal((2, 3, 3, 3)).astype(np.float32)

    out_host, out_device = host(x), device(to_fake_device(x))
    grad_host, grad_device = host.backward(upstream), device.backward(to_fake_device(upstream))
    assert on_fake_device(out_device) and on_fake_device(grad_device)
    for name, param in device.named_parameters():
        assert on_fake_device(param.grad), f"{name}.grad left the device"
    for name, buffer in device.named_buffers():
        assert on_fake_device(buffer), f"{name} left the device"
    np.testing.assert_allclose(out_device.view(np.ndarray), out_host, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(grad_device.view(np.ndarray), grad_host, rtol=1e-5, atol=1e-6)


def test_resnet18_helpers_stay_on_the_device():
    model = resnet18(num_classes=3, rng=np.random.default_rng(0)).map_arrays(to_fake_device)
    to_grayscale_conv1(model)
    replace_fc(model, 2, rng=np.random.default_rng(1))
    x = to_fake_device(np.random.default_rng(2).standard_normal((2, 1, 32, 32)).astype(np.float32))
    out = model(x)
    assert out.shape == (2, 2) and on_fake_device(out)
    assert model.backward(to_fake_device(np.ones((2, 2), dtype=np.float32))) is None   # conv1 needs no input grad
    assert all(on_fake_device(p.data) and on_fake_device(p.grad) for p in model.parameters())


# -- parity with a torch ResNet-18 -----------------------------------------------------------------

def torch_resnet18(torch, num_classes=1000):
    """torchvision.models.resnet18 in plain torch.nn (benchmarks/torch_resnet.py: the benchmarks' twin;
    torchvision is not a dependency), with random non-trivial BatchNorm statistics."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "torch_resnet.py"
    spec = importlib.util.spec_from_file_location("torch_resnet", path)
    torch_resnet = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(torch_resnet)
    nn = torch.nn
    torch.manual_seed(0)
    model = torch_resnet.torch_resnet18(num_classes)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.weight.uniform_(0.5, 1.5)
                module.bias.normal_(0, 0.2)
                module.running_mean.normal_(0, 0.2)
                module.running_var.uniform_(0.5, 1.5)
                module.num_batches_tracked.fill_(int(torch.randint(0, 1000, ())))
    return model


LOAD_WITHOUT_TORCH = textwrap.dedent("""
    import sys
    sys.modules["torch"] = None          # any `import torch` from here on raises ImportError
    import minicnn
    state = minicnn.serialization.load_torch_state_dict(sys.argv[1])
    assert sys.modules["torch"] is None
    minicnn.serialization.save(sys.argv[2], state)
""")


@pytest.fixture(scope="module")
def torch_reference(tmp_path_factory):
    """(torch, torch model, state_dict read from its torch.save file by minicnn in a torch-less process)."""
    torch = pytest.importorskip("torch")
    torch.set_num_threads(1)
    model = torch_resnet18(torch)
    folder = tmp_path_factory.mktemp("r18")
    torch.save(model.state_dict(), folder / "r18.pth")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")])))
    result = subprocess.run([sys.executable, "-c", LOAD_WITHOUT_TORCH, str(folder / "r18.pth"), str(folder / "r18.npz")],
                            cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    state, _ = mc.serialization.load(folder / "r18.npz")
    return torch, model, state


def test_torch_checkpoint_loads_exactly_without_torch(torch_reference):
    torch, model, state = torch_reference
    expected = model.state_dict()
    assert list(state) == list(expected)
    for key, tensor in expected.items():
        assert state[key].dtype == tensor.numpy().dtype, key
        np.testing.assert_array_equal(state[key], tensor.numpy(), err_msg=key)
    assert state["bn1.num_batches_tracked"].dtype == np.int64
    assert set(state) == set(resnet18(rng=np.random.default_rng(0)).state_dict())   # names match torchvision's


def max_relative_difference(actual, expected):
    """max|a - b| / max|b|: the worst difference against the tensor's own scale."""
    expected = expected.detach().numpy() if hasattr(expected, "detach") else np.asarray(expected)
    assert actual.shape == expected.shape
    return float(np.abs(actual - expected).max() / max(np.abs(expected).max(), 1e-30))


@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
def test_resnet18_matches_torch_forward_and_backward(torch_reference, train):
    torch, torch_model, state = torch_reference
    torch_model = copy.deepcopy(torch_model).train(train)
    model = resnet18(rng=np.random.default_rng(0))
    model.load_state_dict(state)
    model.conv1.needs_input_grad = True
    model.train(train)

    rng = np.random.default_rng(1)
    x = rng.standard_normal((2, 3, 64, 64)).astype(np.float32)
    x_t = torch.from_numpy(x.copy()).requires_grad_(True)
    logits, logits_t = model(x), torch_model(x_t)
    upstream = rng.standard_normal(logits.shape).astype(np.float32)
    grad_x = model.backward(upstream)
    logits_t.backward(torch.from_numpy(upstream))

    differences = {"logits": max_relative_difference(logits, logits_t),
                   "grad input": max_relative_difference(grad_x, x_t.grad)}
    params = dict(model.named_parameters())
    for name, param_t in torch_model.named_parameters():
        differences[f"grad {name}"] = max_relative_difference(params[name].grad, param_t.grad)
    buffers = dict(model.named_buffers())
    for name, buffer_t in torch_model.named_buffers():
        if name.endswith("num_batches_tracked"):
            assert int(buffers[name]) == int(buffer_t), name
        else:
            differences[name] = max_relative_difference(buffers[name], buffer_t)
    assert logits.dtype == np.float32 and grad_x.dtype == np.float32
    worst = max(differences, key=differences.get)
    print(f"\n{'train' if train else 'eval'}: worst {worst} {differences[worst]:.2e}; logits {differences['logits']:.2e}, "
          f"grad input {differences['grad input']:.2e}, conv1 {differences['grad conv1.weight']:.2e}, "
          f"downsample {differences['grad layer2.0.downsample.0.weight']:.2e}, fc {differences['grad fc.weight']:.2e}")
    assert differences[worst] <= 1e-4, f"{worst}: {differences[worst]:.2e}"
