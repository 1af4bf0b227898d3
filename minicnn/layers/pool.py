"""Max pooling."""
from __future__ import annotations

from .. import cuda_kernels, fast
from ..backend import get_array_module
from ..grad_mode import is_grad_enabled
from ..im2col import output_size, pad2d, pair
from ..module import Module


class MaxPool2d(Module):
    """out[n, c, i, j] = max_{ky, kx} x_pad[n, c, i*sy + ky, j*sx + kx]   (padding is -inf)

    Shapes: x (N, C, H, W) -> out (N, C, OH, OW), OH = (H + 2*py - kh) // sy + 1.
    stride defaults to kernel_size. Windows may overlap (stride < kernel).

    The max is taken over the kh*kw strided slices of the input, one slice per
    kernel offset, remembering which offset won. Ties go to the first offset in
    row-major order, as in PyTorch.

    ``forward_after_relu(x)`` computes maxpool(relu(x)) as relu(maxpool(x)): the
    same numbers (max is monotone, so the largest of relu(x_i) is relu of the
    largest x_i), with the ReLU on the 4x smaller output. Sequential uses it for a
    ReLU directly followed by a MaxPool2d.
    """

    def __init__(self, kernel_size, stride=None, padding=0):
        self.kernel_size = pair(kernel_size, "kernel_size")
        self.stride = pair(stride if stride is not None else kernel_size, "stride")
        self.padding = pair(padding, "padding")
        kh, kw = self.kernel_size
        if min(self.kernel_size) < 1 or min(self.stride) < 1:
            raise ValueError(f"MaxPool2d: kernel_size and stride must be >= 1, got {self.kernel_size}, {self.stride}")
        if self.padding[0] > kh // 2 or self.padding[1] > kw // 2:
            raise ValueError(f"MaxPool2d: padding {self.padding} must be at most half the kernel {self.kernel_size}")

    def extra_repr(self):
        return f"kernel_size={self.kernel_size}, stride={self.stride}, padding={self.padding}"

    def _windows(self, array, out_hw):
        """Yield (offset index, strided view) for every kernel offset (ky, kx)."""
        (kh, kw), (sy, sx), (oh, ow) = self.kernel_size, self.stride, out_hw
        for ky in range(kh):
            for kx in range(kw):
                yield ky * kw + kx, array[:, :, ky:ky + sy * oh:sy, kx:kx + sx * ow:sx]

    def forward(self, x):
        return self._forward(x, relu=False)

    def forward_after_relu(self, x):
        """maxpool(relu(x)) without computing relu(x): relu(maxpool(x)), the same numbers.

        Backward: an output <= 0 came from a window whose inputs are all <= 0, where
        ReLU's gradient is 0; such outputs get the offset "no winner" in argmax, so no
        gradient flows back through them. The others pass theirs to the winning input,
        which is > 0 and so has ReLU gradient 1: exactly ReLU's and max-pool's backward
        applied one after the other.
        """
        return self._forward(x, relu=True)

    def _forward(self, x, relu: bool):
        if getattr(x, "ndim", None) != 4:
            raise ValueError(f"MaxPool2d: expected input of shape (N, C, H, W), got shape {getattr(x, 'shape', type(x))}")
        xp = get_array_module(x)
        out_hw = output_size("MaxPool2d", x.shape[2:], self.kernel_size, self.stride, self.padding)
        kh, kw = self.kernel_size
        no_winner = kh * kw                                           # not an offset: "no gradient here"
        if fast.use_fast_path(x):                                     # the same, in batch chunks (minicnn/fast.py)
            out, argmax = fast.maxpool_forward(self, x, out_hw, keep_argmax=is_grad_enabled(), relu=relu,
                                               no_winner=no_winner)
            self.save_for_backward(argmax, x.shape, out_hw)
            return out
        if cuda_kernels.enabled(x):                                   # CuPy: the same in one launch
            out, argmax = cuda_kernels.maxpool_forward(x, self.kernel_size, self.stride, self.padding, out_hw,
                                                       relu, no_winner)
            self.save_for_backward(argmax, x.shape, out_hw)
            return out
        x_padded = pad2d(x, self.padding, value=-xp.inf)

        windows = self._windows(x_padded, out_hw)
        _, first = next(windows)
        out = first.copy()                                            # (N, C, OH, OW) running max
        if not is_grad_enabled():                                     # inference: the max alone, no argmax
            for _, view in windows:
                xp.maximum(out, view, out=out)
            self.save_for_backward()                                  # records "forward ran under no_grad"
            return xp.maximum(out, 0, out=out) if relu else out
        argmax = xp.zeros(out.shape, dtype=xp.uint8 if kh * kw < 256 else xp.int32)  # winning offset per output
        better = xp.empty(out.shape, dtype=bool)
        # A window view has rows of only OW values at a stride, and NumPy's loops over
        # such views cost ~10x those over contiguous memory. So each window is copied
        # once into a contiguous buffer, and the three updates below run on that.
        window = xp.empty_like(out)
        for offset, view in windows:                                  # in place (one uint8 temporary)
            window[...] = view
            xp.greater(window, out, out=better)
            # argmax = where(better, offset, argmax), as arithmetic: offsets come in
            # increasing order, so argmax < offset and the where is a max. (NumPy's masked
            # copy, copyto(where=better), is ~20x slower on a random mask.)
            xp.maximum(argmax, better * argmax.dtype.type(offset), out=argmax)
            xp.maximum(out, window, out=out)
        if relu:                                                      # no_winner > every offset: again a max
            xp.maximum(argmax, (out <= 0) * argmax.dtype.type(no_winner), out=argmax)
            xp.maximum(out, 0, out=out)
        self.save_for_backward(argmax, x.shape, out_hw)
        return out

    # Backward: the max passes its gradient to the one input that won, so for
    # each kernel offset, grad_x[window] += grad_out where that offset won.
    # Overlapping windows add up (+=, never =).
    def backward(self, grad_output):
        argmax, x_shape, out_hw = self.saved_for_backward()
        if fast.use_fast_path(grad_output, argmax):
            return fast.maxpool_backward(self, argmax, x_shape, grad_output)
        if cuda_kernels.enabled(grad_output, argmax):
            return cuda_kernels.maxpool_backward(grad_output, argmax, x_shape, self.kernel_size, self.stride,
                                                 self.padding)
        xp = get_array_module(grad_output)
        (py, px), (n, c, h, w) = self.padding, x_shape
        grad_padded = xp.zeros((n, c, h + 2 * py, w + 2 * px), dtype=grad_output.dtype)
        overlapping = any(s < k for s, k in zip(self.stride, self.kernel_size))
        for offset, window in self._windows(grad_padded, out_hw):
            if overlapping:
                window += grad_output * (argmax == offset)            # (a multiply: see ReLU.backward)
            else:  # every input pixel is in at most one window: write instead of add
                xp.multiply(grad_output, argmax == offset, out=window)
        return grad_padded[:, :, py:py + h, px:px + w]


class AdaptiveAvgPool2d(Module):
    """Global average pooling: out[n, c, 0, 0] = mean_{i, j} x[n, c, i, j].

    Shapes: x (N, C, H, W) -> out (N, C, 1, 1). Only output_size=1 (the global
    average, as used before a classifier head) is supported.
    """

    def __init__(self, output_size=1):
        if pair(output_size, "output_size") != (1, 1):
            raise ValueError(f"AdaptiveAvgPool2d: only output_size=1 is supported, got {output_size!r}")
        self.output_size = (1, 1)

    def extra_repr(self):
        return "output_size=1"

    def forward(self, x):
        if getattr(x, "ndim", None) != 4:
            raise ValueError(f"AdaptiveAvgPool2d: expected input of shape (N, C, H, W), got shape {getattr(x, 'shape', type(x))}")
        self.save_for_backward(x.shape)
        return x.mean(axis=(2, 3), keepdims=True)

    # Backward: every input pixel contributes 1/(H*W) to its channel's mean, so
    # grad_x[n, c, i, j] = grad_out[n, c, 0, 0] / (H*W), broadcast over (i, j).
    def backward(self, grad_output):
        (x_shape,) = self.saved_for_backward()
        xp = get_array_module(grad_output)
        h, w = x_shape[2:]
        return xp.broadcast_to(grad_output / (h * w), x_shape).copy()
