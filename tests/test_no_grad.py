"""minicnn.no_grad(): inference that keeps nothing for backward."""
import numpy as np
import pytest

import minicnn as mc
from minicnn import fast
from minicnn.models import resnet18
from minicnn.module import NOTHING_SAVED_UNDER_NO_GRAD


def tiny_cnn():
    rng = np.random.default_rng(0)
    return mc.Sequential(mc.Conv2d(1, 4, 3, padding=1, rng=rng), mc.BatchNorm2d(4), mc.ReLU(), mc.MaxPool2d(2),
                         mc.Conv2d(4, 6, 3, rng=rng), mc.ReLU(), mc.MaxPool2d(3, 2, 1), mc.Flatten(),
                         mc.Dropout(0.5, rng=np.random.default_rng(1)), mc.Linear(6 * 3 * 3, 5, rng=rng),
                         mc.ReLU(inplace=True), mc.Linear(5, 2, rng=rng))


def holds_arrays(model) -> list[str]:
    """Names of the modules that still keep something from their last forward."""
    return [name or type(module).__name__ for name, module in model.named_modules()
            if getattr(module, "_saved", None) is not None and module._saved is not NOTHING_SAVED_UNDER_NO_GRAD]


MODELS = {"cnn": (tiny_cnn, (5, 1, 16, 16)),
          "resnet18": (lambda: resnet18(num_classes=3, rng=np.random.default_rng(0)), (2, 3, 32, 32))}


@pytest.mark.parametrize("use_fast", [True, False])
@pytest.mark.parametrize("name", list(MODELS))
def test_no_grad_forward_saves_nothing_and_gives_the_same_output(name, use_fast):
    make, shape = MODELS[name]
    model = make().eval()
    x = np.random.default_rng(2).standard_normal(shape).astype(np.float32)
    switch = fast.disabled() if not use_fast else _nothing()
    with switch:
        expected = model(x)
        assert holds_arrays(model)                       # a normal forward keeps its activations
        model.release_saved()
        with mc.no_grad():
            out = model(x)
    np.testing.assert_array_equal(out, expected)
    assert holds_arrays(model) == []


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def test_backward_after_a_no_grad_forward_is_a_clear_error():
    model = tiny_cnn()
    x = np.random.default_rng(0).standard_normal((3, 1, 16, 16)).astype(np.float32)
    model(x)                                             # a training forward first: its state must not be used
    with mc.no_grad():
        logits = model(x)
    with pytest.raises(RuntimeError, match=r"under minicnn.no_grad\(\)"):
        model.backward(np.ones_like(logits))


def test_a_layer_called_directly_under_no_grad_also_refuses_backward():
    conv = mc.Conv2d(1, 2, 3, rng=np.random.default_rng(0))
    x = np.ones((1, 1, 5, 5), np.float32)
    with mc.no_grad():
        out = conv.forward(x)
    with pytest.raises(RuntimeError, match="no_grad"):
        conv.backward(np.ones_like(out))


def test_mode_nests_restores_and_decorates():
    assert mc.is_grad_enabled()
    with mc.no_grad():
        assert not mc.is_grad_enabled()
        with mc.no_grad():
            assert not mc.is_grad_enabled()
        assert not mc.is_grad_enabled()
    assert mc.is_grad_enabled()

    @mc.no_grad()
    def inside():
        return mc.is_grad_enabled()

    assert inside() is False and mc.is_grad_enabled()
    with pytest.raises(ValueError):
        with mc.no_grad():
            raise ValueError("boom")
    assert mc.is_grad_enabled()


def test_training_works_again_after_no_grad():
    model = tiny_cnn()
    x = np.random.default_rng(0).standard_normal((4, 1, 16, 16)).astype(np.float32)
    with mc.no_grad():
        model(x)
    out = model(x)
    grad_x = model.backward(np.ones_like(out))
    assert grad_x.shape == x.shape and model[0].weight.grad is not None
