"""``with minicnn.no_grad():`` -- forward passes that will never run backward.

A training forward keeps what its backward needs (im2col buffers, ReLU masks,
max-pool winners). Inference needs none of it. Inside ``no_grad()``:

* ``Module.save_for_backward`` keeps nothing; the layer only records that its
  forward ran without gradients, so a ``backward()`` afterwards raises a
  RuntimeError that says so (instead of silently using stale state);
* layers skip work done only for backward (ReLU's mask, max-pool's argmax);
* every intermediate activation is freed as soon as the next layer has read it,
  because nothing else holds a reference to it.

The outputs are the same numbers as a normal forward. As in PyTorch, the mode is
per thread and nests; it also works as a decorator::

    model.eval()
    with minicnn.no_grad():
        logits = model(x)

    @minicnn.no_grad()
    def predict(model, x): ...
"""
from __future__ import annotations

import functools
import threading

_state = threading.local()


def is_grad_enabled() -> bool:
    """False inside ``no_grad()`` (in this thread), True otherwise."""
    return getattr(_state, "enabled", True)


class no_grad:
    """Context manager (and decorator): forward passes inside keep nothing for backward."""

    def __enter__(self):
        self._previous = is_grad_enabled()
        _state.enabled = False
        return self

    def __exit__(self, *exc):
        _state.enabled = self._previous
        return False

    def __call__(self, function):
        @functools.wraps(function)
        def without_grad(*args, **kwargs):
            with no_grad():
                return function(*args, **kwargs)
        return without_grad
