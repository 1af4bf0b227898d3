"""Parameter, Module and Sequential: the bookkeeping every layer shares.

The contract, the same as PyTorch's:

* ``out = module(x)`` (or ``module.forward(x)``) computes the output and keeps
  what the backward pass needs.
* ``grad_x = module.backward(grad_out)`` returns dLoss/dx and **accumulates**
  dLoss/dparam into every ``param.grad`` (``grad += ...``; a ``None`` grad is
  simply set). So a training step is always::

      optimizer.zero_grad()          # grads -> None
      loss = criterion(model(x), y)
      model.backward(criterion.backward())
      optimizer.step()

* Each forward's saved state is used by exactly one backward and then freed;
  calling ``backward`` without a fresh ``forward`` raises a RuntimeError.
* Under ``with minicnn.no_grad():`` (grad_mode.py) a forward saves nothing, and a
  ``backward`` after it raises a RuntimeError.
"""
from __future__ import annotations

from collections import OrderedDict

from . import fast
from .backend import as_numpy, get_array_module, to_device
from .grad_mode import is_grad_enabled

# What a forward run under minicnn.no_grad() leaves in place of saved state.
NOTHING_SAVED_UNDER_NO_GRAD = ("no_grad",)


class Parameter:
    """A trainable array ``data`` and its gradient ``grad`` (None until backward)."""

    def __init__(self, data):
        self.data = data
        self.grad = None

    @property
    def shape(self):
        return self.data.shape

    def accumulate_grad(self, grad) -> None:
        """grad += new contribution (the first contribution is stored as it is)."""
        if grad.shape != self.data.shape:
            raise ValueError(f"gradient shape {grad.shape} does not match parameter shape {self.data.shape}")
        if self.grad is None:
            self.grad = grad
        else:
            self.grad += grad

    def __repr__(self):
        return f"Parameter(shape={tuple(self.data.shape)}, dtype={self.data.dtype})"


class Module:
    """Base class of layers and models.

    Sub-modules and Parameters assigned as attributes are found automatically,
    in assignment order, which gives PyTorch-style names (``conv1.weight``).
    Non-trainable state that must be saved (BatchNorm's running statistics) is
    declared with ``register_buffer``.
    """

    training = True

    def __call__(self, *args, **kwargs):
        if not is_grad_enabled():
            self._saved = NOTHING_SAVED_UNDER_NO_GRAD   # also for layers that skip save_for_backward there
        return self.forward(*args, **kwargs)

    def forward(self, x):
        raise NotImplementedError(f"{type(self).__name__} has no forward()")

    def backward(self, grad_output):
        raise NotImplementedError(f"{type(self).__name__} has no backward()")

    # -- saved state for backward ------------------------------------------------
    def save_for_backward(self, *values) -> None:
        """Keep ``values`` for the next backward (under ``minicnn.no_grad()``: keep nothing)."""
        self._saved = values if is_grad_enabled() else NOTHING_SAVED_UNDER_NO_GRAD

    def saved_for_backward(self):
        """The values saved by the last forward; they are released here."""
        saved = getattr(self, "_saved", None)
        if saved is None:
            raise RuntimeError(
                f"{type(self).__name__}.backward() called before forward() "
                "(or twice for one forward): run forward first")
        self._saved = None
        if saved is NOTHING_SAVED_UNDER_NO_GRAD:
            raise RuntimeError(
                f"{type(self).__name__}.backward() called after a forward run under minicnn.no_grad(), "
                "which keeps nothing for backward: run the forward again outside no_grad()")
        return saved

    def release_saved(self) -> "Module":
        """Drop what the last forward saved for backward, here and in every child.

        For forward passes that will have no backward (a frozen backbone, inference):
        the activations are freed at once instead of at the next forward. Also frees
        the work buffers the fast CPU paths reuse between steps (minicnn/fast.py).
        """
        for module in self.modules():
            module._saved = None
        fast.release_buffers()                      # and the fast paths' reusable work buffers
        return self

    # -- traversal ---------------------------------------------------------------
    def named_children(self):
        for name, value in vars(self).items():
            if isinstance(value, Module):
                yield name, value

    def children(self):
        return [module for _, module in self.named_children()]

    def named_modules(self, prefix: str = ""):
        yield prefix, self
        for name, child in self.named_children():
            yield from child.named_modules(f"{prefix}.{name}" if prefix else name)

    def modules(self):
        return [module for _, module in self.named_modules()]

    def named_parameters(self, prefix: str = ""):
        for name, value in vars(self).items():
            full_name = f"{prefix}.{name}" if prefix else name
            if isinstance(value, Parameter):
                yield full_name, value
            elif isinstance(value, Module):
                yield from value.named_parameters(full_name)

    def parameters(self):
        return [param for _, param in self.named_parameters()]

    def register_buffer(self, name: str, array) -> None:
        """Saved in state_dict and moved by .to(), but not trained."""
        if not hasattr(self, "_buffer_names"):
            self._buffer_names = []
        if name not in self._buffer_names:
            self._buffer_names.append(name)
        setattr(self, name, array)

    def named_buffers(self, prefix: str = ""):
        for name in getattr(self, "_buffer_names", []):
            yield (f"{prefix}.{name}" if prefix else name), getattr(self, name)
        for name, child in self.named_children():
            yield from child.named_buffers(f"{prefix}.{name}" if prefix else name)

    # -- modes and gradients -------------------------------------------------------
    def train(self, mode: bool = True):
        for module in self.modules():
            module.training = mode
        return self

    def eval(self):
        return self.train(False)

    def zero_grad(self) -> None:
        for param in self.parameters():
            param.grad = None

    # -- devices -------------------------------------------------------------------
    def map_arrays(self, fn):
        """Replace every parameter and buffer array ``a`` by ``fn(a)`` (grads are dropped)."""
        for module in self.modules():
            for name, value in list(vars(module).items()):
                if isinstance(value, Parameter):
                    value.data = fn(value.data)
                    value.grad = None
            for name in getattr(module, "_buffer_names", []):
                setattr(module, name, fn(getattr(module, name)))
            module._saved = None
        return self

    def to(self, device: str):
        """Move parameters and buffers to 'cpu' or 'gpu'. Optimizer state follows on its next step."""
        return self.map_arrays(lambda array: to_device(array, device))

    # -- state ---------------------------------------------------------------------
    def state_dict(self) -> "OrderedDict[str, object]":
        """Parameter and buffer arrays by PyTorch-style name (``0.weight``, ``conv1.bias``)."""
        state = OrderedDict((name, param.data) for name, param in self.named_parameters())
        state.update(self.named_buffers())
        return state

    def load_state_dict(self, state_dict, strict: bool = True) -> None:
        """Copy arrays into this module, on its device and dtype, checking names and shapes."""
        own = self.state_dict()
        missing = [key for key in own if key not in state_dict]
        unexpected = [key for key in state_dict if key not in own]
        if strict and (missing or unexpected):
            raise KeyError(f"{type(self).__name__}.load_state_dict: missing keys {missing}, unexpected keys {unexpected}")
        params = dict(self.named_parameters())
        for key, current in own.items():
            if key not in state_dict:
                continue
            new = state_dict[key]
            if tuple(new.shape) != tuple(current.shape):
                raise ValueError(f"{type(self).__name__}.load_state_dict: '{key}' has shape {tuple(new.shape)}, "
                                 f"expected {tuple(current.shape)}")
            xp = get_array_module(current)  # keep this module's device and dtype
            value = xp.array(as_numpy(new), dtype=current.dtype)
            if key in params:
                params[key].data = value
                params[key].grad = None
            else:
                owner, _, attr = key.rpartition(".")
                module = self._submodule(owner)
                setattr(module, attr, value)

    def _submodule(self, dotted: str) -> "Module":
        module = self
        for part in filter(None, dotted.split(".")):
            module = getattr(module, part)
        return module

    # -- display ---------------------------------------------------------------------
    def extra_repr(self) -> str:
        return ""

    def __repr__(self):
        children = list(self.named_children())
        if not children:
            return f"{type(self).__name__}({self.extra_repr()})"
        lines = [f"{type(self).__name__}("]
        for name, child in children:
            lines += [f"  ({name}): " + repr(child).replace("\n", "\n  ")]
        return "\n".join(lines + [")"])


class Sequential(Module):
    """Layers applied in order; backward runs them in reverse.

    Layers are named "0", "1", ... so state_dict keys match ``torch.nn.Sequential``.
    """

    def __init__(self, *layers: Module):
        for index, layer in enumerate(layers):
            if not isinstance(layer, Module):
                raise TypeError(f"Sequential: item {index} is {type(layer).__name__}, not a Module")
            setattr(self, str(index), layer)

    def __iter__(self):
        return iter(self.children())

    def __len__(self):
        return len(self.children())

    def __getitem__(self, index):
        return self.children()[index]

    def forward(self, x):
        return forward_in_order(self.children(), x)

    def backward(self, grad_output):
        for layer in reversed(self.children()):
            grad_output = layer.backward(grad_output)
        return grad_output


def forward_in_order(layers, x):
    """x through each layer in turn, with one fusion: a ReLU directly followed by a
    MaxPool2d runs as ``pool.forward_after_relu(x)``, i.e. relu(maxpool(x)), the same
    numbers as maxpool(relu(x)) with the ReLU on the pooled (4x smaller) output and
    no ReLU mask kept; the ReLU's backward then passes gradients straight through."""
    index = 0
    while index < len(layers):
        layer = layers[index]
        following = layers[index + 1] if index + 1 < len(layers) else None
        if hasattr(layer, "fused_into_maxpool") and hasattr(following, "forward_after_relu"):
            layer.fused_into_maxpool()
            x = following.forward_after_relu(x)
            index += 2
        else:
            x = layer(x)
            index += 1
    return x
