"""Naive loop implementations: slow, obviously right, used to check the fast paths."""
import numpy as np


def conv2d_naive(x, weight, bias, stride, padding):
    """Direct sum: out[n, f, i, j] = b[f] + sum_{c,ky,kx} w[f,c,ky,kx] * x_pad[n, c, i*sy+ky, j*sx+kx]."""
    (sy, sx), (py, px) = stride, padding
    n, c, h, w = x.shape
    f, _, kh, kw = weight.shape
    x_pad = np.pad(x, ((0, 0), (0, 0), (py, py), (px, px)))
    oh, ow = (h + 2 * py - kh) // sy + 1, (w + 2 * px - kw) // sx + 1
    out = np.zeros((n, f, oh, ow))
    for b in range(n):
        for k in range(f):
            for i in range(oh):
                for j in range(ow):
                    patch = x_pad[b, :, i * sy:i * sy + kh, j * sx:j * sx + kw]
                    out[b, k, i, j] = np.sum(patch * weight[k]) + (bias[k] if bias is not None else 0.0)
    return out


def maxpool2d_naive(x, kernel, stride, padding=(0, 0)):
    """Returns (out, grad_input_of_sum(out * upstream)) by explicit loops over every window."""
    (kh, kw), (sy, sx), (py, px) = kernel, stride, padding
    n, c, h, w = x.shape
    x_pad = np.pad(x, ((0, 0), (0, 0), (py, py), (px, px)), constant_values=-np.inf)
    oh, ow = (h + 2 * py - kh) // sy + 1, (w + 2 * px - kw) // sx + 1
    out = np.zeros((n, c, oh, ow))
    winner = np.zeros((n, c, oh, ow, 2), dtype=int)
    for b in range(n):
        for ch in range(c):
            for i in range(oh):
                for j in range(ow):
                    window = x_pad[b, ch, i * sy:i * sy + kh, j * sx:j * sx + kw]
                    ky, kx = np.unravel_index(np.argmax(window), window.shape)
                    out[b, ch, i, j] = window[ky, kx]
                    winner[b, ch, i, j] = (i * sy + ky - py, j * sx + kx - px)
    return out, winner


def maxpool2d_naive_backward(grad_out, winner, x_shape):
    grad_x = np.zeros(x_shape)
    n, c, oh, ow = grad_out.shape
    for b in range(n):
        for ch in range(c):
            for i in range(oh):
                for j in range(ow):
                    y, x = winner[b, ch, i, j]
                    grad_x[b, ch, y, x] += grad_out[b, ch, i, j]
    return grad_x
