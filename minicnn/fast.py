"""Fast CPU paths: the layers' own algorithms, run over batch chunks in a small thread pool.

The layer files hold the readable version of each computation (one xp path that
also runs on CuPy). For NumPy arrays they call the functions here instead, which
compute the same thing in a way that suits a CPU with a few cores (every array
here is a host NumPy array, see use_fast_path: the `# host-ok` marks say so):

* **Batch chunks.** The batch is cut into chunks of a few images. Each chunk's
  im2col buffer, pooling temporaries and gradient pieces are a few MiB, so they
  stay in the CPU caches between being written and being read (the whole-batch
  im2col of a 224x224 LeNet conv is 440 MB, which goes out to DRAM and back).
* **Threads.** The chunks are spread over a small pool of threads. NumPy releases
  the GIL inside copies and ufunc loops, so im2col, col2im and the pooling passes,
  single-threaded in NumPy, use every core. During those sections BLAS is held to
  one thread (``threadpoolctl``), so threads x BLAS threads never exceed the cores.
  Batches below MIN_BATCH_FOR_THREADS, and convs whose batch holds less than
  MIN_BYTES_FOR_THREADS of im2col, skip the pool (GIL hand-offs cost more there).
* **Reused buffers.** The chunk buffers (im2col columns, padded chunks, pooling
  temporaries) are kept per thread from one layer and one step to the next: no
  fresh allocation, no page faults. ``Module.release_saved()`` drops them.
* **Nothing col-sized is kept for backward.** Conv2d saves its input x and
  backward redoes im2col chunk by chunk (cheap, cache-resident) instead of
  keeping the whole col matrix: the largest array of a conv net.

Determinism. Every chunk is computed by one thread, chunk boundaries depend on the
batch and layer sizes only (never on the thread count), and per-chunk results that
must be summed (the conv weight and bias gradients) are added in chunk order. So
any thread count gives bit-identical results (BLAS's own threads are another matter:
``one_blas_thread()``). Against the readable version: the
forward outputs, max-pool, col2im and all input gradients are the same numbers
(the same operations on each element, in the same order); the conv weight and bias
gradients are sums over the batch taken chunk by chunk, which rounds differently
in the last bits (relative 1e-7 in float32), as any change of summation order does.

Threads: ``MINICNN_NUM_THREADS`` if set, otherwise the number of threads NumPy's
BLAS uses (threadpoolctl), otherwise the usable CPU count. ``MINICNN_FAST=0``
(or ``with fast.disabled():``) runs the readable versions everywhere.
"""
from __future__ import annotations

import contextlib
import math
import os
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np

# A chunk's im2col buffer holds about this many bytes (at least one image, and at most a
# quarter of the batch so that 2-4 threads all get work). Chosen so a chunk and its GEMM
# output stay in the L2/L3 caches of one core.
CHUNK_BYTES = 2 ** 21
MIN_COLUMNS = 1024
# Batches smaller than this run their chunks one after the other in the calling thread, BLAS
# keeping its own threads for the GEMMs. Measured on 2 cores (benchmarks/RESULTS.md, issue 14):
# at batch 12 the pool made the `default` net's train step 20% slower and LeNet's 30% slower,
# at batch 65 it made them 1.3x and 1.1x faster. Small chunks hand the GIL between the threads
# at every NumPy call, and a thread waiting for it is not working. Changes no result: chunk
# boundaries never depend on the threads.
MIN_BATCH_FOR_THREADS = 32
# The same for convs whose whole batch holds less than this many bytes of im2col columns: the
# `default` net's convs at batch 65 (the larger im2col, conv2's, is 38 MB) ran faster in the
# calling thread with BLAS's 2 threads than in the pool (train step 80 -> 65 ms), LeNet's at batch
# 65 (315-436 MB) 1.1-2x slower (benchmarks/RESULTS.md, issue 14 round 4). Max-pool, ReLU and
# BatchNorm (no BLAS, few NumPy calls per chunk) keep the pool from MIN_BATCH_FOR_THREADS on:
# at batch 65 that made the `default` step another 10% faster.
MIN_BYTES_FOR_THREADS = 48 * 2 ** 20
# Chunk size when running in the calling thread: no need to split the batch for the threads, and
# larger chunks mean fewer NumPy calls and larger GEMMs for BLAS's threads; 4 MiB chunks stay in
# the L3 cache (the `default` net at batch 12: 16 MiB chunks as fast, at batch 65 1.3x slower).
ONE_THREAD_CHUNK_BYTES = 2 ** 22

_settings = {"enabled": os.environ.get("MINICNN_FAST", "1") != "0", "threads": None}
_pool: dict = {"executor": None, "workers": 0}
_local = threading.local()


# -- switches ----------------------------------------------------------------------------------

def use_fast_path(*arrays) -> bool:
    """True when the fast paths are on and every array is a plain host NumPy array."""
    return _settings["enabled"] and all(type(a) is np.ndarray for a in arrays)


class disabled:
    """``with fast.disabled():`` runs the readable layer code (tests compare the two)."""

    def __enter__(self):
        self._previous = _settings["enabled"]
        _settings["enabled"] = False

    def __exit__(self, *exc):
        _settings["enabled"] = self._previous
        return False


def set_num_threads(threads: int | None) -> None:
    """Use ``threads`` threads from now on (None: back to MINICNN_NUM_THREADS / BLAS's count)."""
    if threads is not None and (not isinstance(threads, int) or threads < 1):
        raise ValueError(f"set_num_threads: expected a positive int or None, got {threads!r}")
    _settings["threads"] = threads


def num_threads() -> int:
    """The pool's thread count: set_num_threads(), MINICNN_NUM_THREADS, BLAS's threads, or the CPUs."""
    if _settings["threads"] is not None:
        return _settings["threads"]
    value = os.environ.get("MINICNN_NUM_THREADS")
    if value:
        if not value.isdigit() or int(value) < 1:
            raise ValueError(f"MINICNN_NUM_THREADS must be a positive integer, got {value!r}")
        return int(value)
    blas = _blas_threads()
    if blas:
        return blas
    return available_cores()


def available_cores() -> int:
    """The CPUs this process may run on (its affinity where the system tells it)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


_blas = {}


def _blas_controller():
    """threadpoolctl's view of the loaded BLAS (None without threadpoolctl)."""
    if "controller" not in _blas:
        try:
            from threadpoolctl import ThreadpoolController
            _blas["controller"] = ThreadpoolController().select(user_api="blas")
        except Exception:  # threadpoolctl is optional
            _blas["controller"] = None
    return _blas["controller"]


def _blas_threads() -> int | None:
    controller = _blas_controller()
    if controller is None or not controller.lib_controllers:
        return None
    return max(lib.num_threads for lib in controller.lib_controllers)


@contextlib.contextmanager
def one_blas_thread():
    """Within: BLAS held at one thread while the pool keeps its threads, so that results do not depend
    on the machine's cores. OpenBLAS sums some products in another order on one thread than on two
    (about 1e-7 apart after a few steps, and a training run amplifies that into other weights); the
    pool's chunks never depend on the thread count. Without threadpoolctl BLAS cannot be limited
    live, and this changes nothing (OPENBLAS_NUM_THREADS=1 set before Python starts gives the same
    weights)."""
    controller = _blas_controller()
    if controller is None or not controller.lib_controllers:
        yield
        return
    saved = _settings["threads"]
    _settings["threads"] = num_threads()            # the pool keeps the count BLAS gave it
    try:
        with controller.limit(limits=1):
            yield
    finally:
        _settings["threads"] = saved


# -- the pool ------------------------------------------------------------------------------------

def runs_threaded(batch: int, bytes_per_image: int | None = None) -> bool:
    """Whether a layer's chunks go to the pool: a batch of at least MIN_BATCH_FOR_THREADS whose
    images hold at least MIN_BYTES_FOR_THREADS together (``bytes_per_image``: of im2col columns,
    given by the convs; None: the batch alone decides, as for max-pool, ReLU, BatchNorm). Sizes
    only, never the thread count, so the chunks (images_per_chunk) stay thread-count free."""
    if batch < MIN_BATCH_FOR_THREADS:
        return False
    return bytes_per_image is None or batch * bytes_per_image >= MIN_BYTES_FOR_THREADS


def parallel_chunks(count: int, work, uses_blas: bool = False, batch: int | None = None,
                    bytes_per_image: int | None = None) -> None:
    """Call ``work(index)`` for every chunk index in range(count), spread over the threads.

    Thread ``slot`` (0 = the calling thread) takes indices slot, slot + T, ...
    With ``uses_blas`` the work calls BLAS, which is held to one thread meanwhile
    (without threadpoolctl to do that, the chunks run one after the other in this
    thread instead, BLAS keeping its own threads). Errors in any thread are
    re-raised here. A call from inside a chunk runs its chunks in that thread, and so does
    a call for a ``batch`` (of ``bytes_per_image``) that is not runs_threaded.
    """
    threads = min(num_threads(), count)
    if batch is not None and not runs_threaded(batch, bytes_per_image):
        threads = 1
    if getattr(_local, "inside", False):     # a nested call from a pool thread: no new tasks
        threads = 1
    if uses_blas and threads > 1 and _blas_controller() is None:
        threads = 1
    if threads <= 1:
        for index in range(count):
            work(index)
        return

    def run_slot(slot):
        _local.inside = True
        try:
            for index in range(slot, count, threads):
                work(index)
        finally:
            _local.inside = False

    executor = _executor(threads - 1)
    if uses_blas:
        with _blas_controller().limit(limits=1):
            _run(executor, run_slot, threads)
    else:
        _run(executor, run_slot, threads)


def _run(executor, run_slot, threads):
    futures = [executor.submit(run_slot, slot) for slot in range(1, threads)]
    try:
        run_slot(0)
    finally:
        for future in futures:
            future.result()


def _executor(workers: int) -> ThreadPoolExecutor:
    """The pool, grown to ``workers`` threads if needed (and made afresh in a forked child,
    which inherits the pool object but not its threads)."""
    if _pool["workers"] < workers or _pool.get("pid") != os.getpid():
        if _pool["executor"] is not None and _pool.get("pid") == os.getpid():
            _pool["executor"].shutdown(wait=True)
        _pool.update(executor=ThreadPoolExecutor(max_workers=workers, thread_name_prefix="minicnn"),
                     workers=workers, pid=os.getpid())
    return _pool["executor"]


def images_per_chunk(batch: int, bytes_per_image: int, columns_per_image: int = 0, threaded: bool | None = None) -> int:
    """Chunk size: ~CHUNK_BYTES per chunk, >= 1 image, <= a quarter of the batch (work for
    every thread) -- but a conv chunk has at least MIN_COLUMNS GEMM columns: deep layers with
    small images (ResNet's 7x7 and 14x14 stages) then run as one GEMM, with BLAS's own threads,
    rather than as many small pieces whose weight gradients must be added up. A layer that
    does not run threaded (``threaded``, by default runs_threaded(batch): the batch alone decides,
    as for every layer but the convs, which pass their im2col rule) runs in the calling thread
    and gets chunks of ONE_THREAD_CHUNK_BYTES instead, with no quarter-batch cap: fewer, larger
    NumPy and BLAS calls. Depends on the sizes only (never on the thread count), which keeps
    results thread-count free."""
    if threaded is None:
        threaded = runs_threaded(batch)
    if not threaded:
        chunk = max(1, ONE_THREAD_CHUNK_BYTES // max(1, bytes_per_image))
        return max(1, min(chunk, batch))
    by_bytes = max(1, CHUNK_BYTES // max(1, bytes_per_image))
    chunk = min(by_bytes, math.ceil(batch / 4))
    if columns_per_image:
        chunk = max(chunk, math.ceil(MIN_COLUMNS / columns_per_image))
    return max(1, min(chunk, batch))


# Reusable work buffers: per thread, one per (name, dtype), as large as the largest request so
# far. Shared by all layers (they run one after the other), so a ResNet-18 holds a few chunk-sized
# buffers per thread rather than a set per layer. Keyed by thread, so two models run from two
# Python threads at once never share one.
_buffers: dict = {}


def scratch(name: str, shape, dtype) -> np.ndarray:
    """A reusable uninitialised buffer of ``shape`` for the calling thread (a view of its start)."""
    buffers = _buffers.setdefault(threading.get_ident(), {})
    key = (name, np.dtype(dtype).str)
    size = math.prod(shape)
    flat = buffers.get(key)
    if flat is None or flat.size < size:
        buffers[key] = flat = np.empty(size, dtype)  # host-ok
    return flat[:size].reshape(shape)


def release_buffers() -> None:
    """Free every thread's work buffers (Module.release_saved() calls this)."""
    _buffers.clear()


def _padded(name, x, padding, fill):
    """x (b, C, H, W) copied into the middle of a reusable (b, C, H + 2py, W + 2px) buffer
    with a border of ``fill``; x itself when there is no padding.

    The buffer is kept per thread for its shape and fill (not shared with other sizes like
    ``scratch``), so its border is written once, when it is made: each call copies x only."""
    py, px = padding
    if py == 0 and px == 0:
        return x
    b, c, h, w = x.shape
    buffers = _buffers.setdefault(threading.get_ident(), {})
    key = ("padded", name, c, h, w, py, px, fill, x.dtype.str)
    buffer = buffers.get(key)
    if buffer is None or len(buffer) < b:
        buffers[key] = buffer = np.full((b, c, h + 2 * py, w + 2 * px), fill, dtype=x.dtype)  # host-ok
    buffer = buffer[:b]
    buffer[:, :, py:py + h, px:px + w] = x
    return buffer


# -- convolution ---------------------------------------------------------------------------------

def _im2col_chunk(layer, x, out_hw):
    """im2col.im2col for a chunk x (b, C, H, W) into a reusable buffer: (C*kh*kw, b*OH*OW).

    One strided copy (all kernel offsets as one 6-D view of the padded chunk) rather than one
    per offset: fewer calls, so that threads rarely wait for each other's Python (the GIL)."""
    (kh, kw), (sy, sx), (oh, ow) = layer.kernel_size, layer.stride, out_hw
    b, c = x.shape[:2]
    col = scratch("col", (c, kh, kw, b, oh, ow), x.dtype)
    if (sy > 1 or sx > 1) and kh > sy and kw > sx:
        _im2col_by_phases(layer, x, col)
        return col.reshape(c * kh * kw, b * oh * ow)
    x_padded = _padded("x", x, layer.padding, 0)
    stride_b, stride_c, stride_y, stride_x = x_padded.strides
    windows = np.lib.stride_tricks.as_strided(                 # [c, ky, kx, n, i, j] = x_pad[n, c, ky + sy*i, kx + sx*j]
        x_padded, col.shape, (stride_c, stride_y, stride_x, stride_b, sy * stride_y, sx * stride_x), writeable=False)
    np.copyto(col, windows)
    return col.reshape(c * kh * kw, b * oh * ow)


def _im2col_by_phases(layer, x, col):
    """im2col of a strided conv (stride s > 1) into col (C, kh, kw, b, OH, OW), through the
    "space-to-depth" split of the padded chunk into its sy*sx stride phases:

        phase[ry, rx, c, n, I, J] = x_pad[n, c, sy*I + ry, sx*J + rx]

    Kernel tap ky = sy*qy + ry of output row i reads x_pad row sy*i + ky = sy*(i + qy) + ry,
    i.e. row i + qy of phase ry: in a phase, every tap is a shifted block with contiguous rows.
    The readable version's strided gather (every sx-th value of a row, ~5x slower per byte than
    a contiguous copy) becomes one strided pass over the input (the split, which is also the
    padding copy) and sy*sx copies of contiguous rows (one per phase, all its taps at once).
    The same values land in the same places: a copy, so the same numbers."""
    (kh, kw), (sy, sx), (py, px) = layer.kernel_size, layer.stride, layer.padding
    phases = _phases(x, (sy, sx), (py, px))
    c, _, _, b, oh, ow = col.shape
    for ry in range(sy):
        for rx in range(sx):
            source = phases[ry, rx]                                           # (C, b, PH, PW)
            stride_c, stride_b, stride_y, stride_x = source.strides
            target = col[:, ry::sy, rx::sx]                                   # (C, taps qy, taps qx, b, OH, OW)
            taps = np.lib.stride_tricks.as_strided(       # [c, qy, qx, n, i, j] = phase[c, n, i + qy, j + qx]
                source, target.shape, (stride_c, stride_y, stride_x, stride_b, stride_y, stride_x), writeable=False)
            np.copyto(target, taps)


def _phases(x, stride, padding):
    """The stride phases of x (b, C, H, W) zero-padded: a reusable (sy, sx, C, b, PH, PW) buffer,
    phase[ry, rx, c, n, I, J] = x_pad[n, c, sy*I + ry, sx*J + rx] (PH = ceil((H + 2py) / sy)).

    Like _padded, the buffer is kept per thread for its shape, its zero border written once:
    each call copies x's values only (one strided copy per phase)."""
    (sy, sx), (py, px) = stride, padding
    b, c, h, w = x.shape
    ph, pw = -(-(h + 2 * py) // sy), -(-(w + 2 * px) // sx)
    buffers = _buffers.setdefault(threading.get_ident(), {})
    key = ("phases", c, h, w, sy, sx, py, px, x.dtype.str)
    buffer = buffers.get(key)
    if buffer is None or buffer.shape[3] < b:
        buffers[key] = buffer = np.zeros((sy, sx, c, b, ph, pw), dtype=x.dtype)  # host-ok
    buffer = buffer[:, :, :, :b]
    for ry in range(sy):
        i0, i1, y0 = _inside(ry, py, sy, ph, h)                               # phase rows inside the image
        for rx in range(sx):
            j0, j1, x0 = _inside(rx, px, sx, pw, w)
            if i1 > i0 and j1 > j0:
                buffer[ry, rx, :, :, i0:i1, j0:j1] = \
                    x[:, :, y0:y0 + sy * (i1 - i0 - 1) + 1:sy, x0:x0 + sx * (j1 - j0 - 1) + 1:sx].transpose(1, 0, 2, 3)
    return buffer


def _col2im_chunk(layer, col, grad_x):
    """im2col.col2im for a chunk: col (C, kh, kw, b, OH, OW) added into grad_x (b, C, H, W).

    Straight into grad_x (no padded buffer to copy out of): each offset adds only the part
    of its window inside the image (the part in the padding is dropped, as col2im's final
    crop does). Every pixel gets the same additions in the same order, from 0."""
    c, kh, kw, b, oh, ow = col.shape
    (sy, sx), (py, px) = layer.stride, layer.padding
    h, w = grad_x.shape[2:]
    grad_x.fill(0)
    for ky in range(kh):
        i0, i1, y0 = _inside(ky, py, sy, oh, h)
        for kx in range(kw):
            j0, j1, x0 = _inside(kx, px, sx, ow, w)
            if i1 > i0 and j1 > j0:
                grad_x[:, :, y0:y0 + sy * (i1 - i0 - 1) + 1:sy, x0:x0 + sx * (j1 - j0 - 1) + 1:sx] += \
                    col[:, ky, kx, :, i0:i1, j0:j1].transpose(1, 0, 2, 3)


def _inside(k, pad, stride, out, size):
    """Outputs i0 <= i < i1 whose tap k lands inside the image (at y = i*stride + k - pad),
    and y0, the image row of output i0."""
    i0 = max(0, -((k - pad) // stride))                                    # ceil((pad - k) / stride)
    i1 = min(out, (size - 1 - k + pad) // stride + 1)
    return i0, i1, i0 * stride + k - pad


def conv2d_forward(layer, x, out_hw):
    """Conv2d.forward for NumPy x (N, C, H, W) -> (N, F, OH, OW), chunk by chunk.

    Per chunk: col = im2col(x[chunk]); out[:, chunk] = W @ col + b, the GEMM writing
    straight into its columns of the (F, N, OH, OW) result (as the readable version,
    which returns the same transposed view).
    """
    n, c = x.shape[:2]
    f, (kh, kw), (oh, ow) = layer.out_channels, layer.kernel_size, out_hw
    weight = layer.weight.data.reshape(f, -1)                                # (F, K)
    bias = None if layer.bias is None else layer.bias.data[:, None]
    out = np.empty((f, n, oh, ow), dtype=x.dtype)  # host-ok
    col_bytes = c * kh * kw * oh * ow * x.itemsize                           # im2col bytes per image
    chunk = images_per_chunk(n, col_bytes, oh * ow, threaded=runs_threaded(n, col_bytes))

    def work(index):
        start, stop = index * chunk, min(n, (index + 1) * chunk)
        col = _im2col_chunk(layer, x[start:stop], out_hw)             # (K, b*OH*OW)
        rows = out[:, start:stop].reshape(f, -1)                             # a view: (F, b*OH*OW)
        np.matmul(weight, col, out=rows)  # host-ok
        if bias is not None:
            rows += bias

    parallel_chunks(math.ceil(n / chunk), work, uses_blas=True, batch=n, bytes_per_image=col_bytes)
    return out.transpose(1, 0, 2, 3)


def conv2d_backward(layer, x, grad_output):
    """Conv2d.backward for NumPy arrays, chunk by chunk; returns grad_x (or None) and
    accumulates the weight and bias gradients.

    G = grad_out as (F, N*OH*OW), as in the readable version (the bias gradient is its
    row sums, computed the same way, so it is the same numbers). Per chunk:
    col = im2col(x[chunk]) again (cheaper than keeping the whole col), dW_chunk = G @ col.T,
    dcol = W.T @ G written over col, grad_x[chunk] = col2im(dcol). The dW_chunk are added
    in chunk order.
    """
    n, c = x.shape[:2]
    f, (kh, kw) = layer.out_channels, layer.kernel_size
    oh, ow = grad_output.shape[2:]
    weight = layer.weight.data.reshape(f, -1)                                # (F, K)
    col_bytes = c * kh * kw * oh * ow * x.itemsize                           # im2col bytes per image
    chunk = images_per_chunk(n, col_bytes, oh * ow, threaded=runs_threaded(n, col_bytes))
    count = math.ceil(n / chunk)
    grad_by_filter = _filters_first(grad_output, chunk, col_bytes)                     # (F, N, OH, OW) contiguous
    grad_weights = [None] * count
    grad_x = np.empty(x.shape, dtype=x.dtype) if layer.needs_input_grad else None  # host-ok
    large = f * weight.shape[1] >= 2 ** 18                                   # see Conv2d.backward

    def work(index):
        start, stop = index * chunk, min(n, (index + 1) * chunk)
        col = _im2col_chunk(layer, x[start:stop], (oh, ow))           # (K, b*OH*OW)
        grad = grad_by_filter[:, start:stop].reshape(f, -1)                  # a view: (F, b*OH*OW)
        grad_weights[index] = grad @ col.T if large else (col @ grad.T).T
        if grad_x is not None:
            np.matmul(weight.T, grad, out=col)                               # dL/dcol over col  # host-ok
            _col2im_chunk(layer, col.reshape(c, kh, kw, stop - start, oh, ow), grad_x[start:stop])

    parallel_chunks(count, work, uses_blas=True, batch=n, bytes_per_image=col_bytes)
    layer.weight.accumulate_grad(_sum_in_order(grad_weights).reshape(layer.weight.data.shape))
    if layer.bias is not None:
        layer.bias.accumulate_grad(grad_by_filter.reshape(f, -1).sum(axis=1))
    return grad_x


def _filters_first(grad_output, chunk, bytes_per_image):
    """grad_output (N, F, OH, OW) as a C-contiguous (F, N, OH, OW) array (copied in chunks)."""
    by_filter = grad_output.transpose(1, 0, 2, 3)
    if by_filter.flags.c_contiguous:                                         # it came from the fast forward
        return by_filter
    out = np.empty(by_filter.shape, dtype=grad_output.dtype)  # host-ok
    n = grad_output.shape[0]

    def work(index):
        part = slice(index * chunk, (index + 1) * chunk)
        out[:, part] = by_filter[:, part]

    parallel_chunks(math.ceil(n / chunk), work, batch=n, bytes_per_image=bytes_per_image)
    return out


def _sum_in_order(parts):
    """parts[0] + parts[1] + ... in this order, as a C-contiguous array."""
    total = parts[0] if parts[0].flags.c_contiguous else np.ascontiguousarray(parts[0])
    for part in parts[1:]:
        total += part
    return total


# -- max pooling ---------------------------------------------------------------------------------

def maxpool_forward(layer, x, out_hw, *, keep_argmax: bool, relu: bool, no_winner: int):
    """MaxPool2d.forward for NumPy x (N, C, H, W) -> (out (N, C, OH, OW), argmax or None).

    The readable loop, run per chunk with the chunk's temporaries in reusable buffers; pools
    whose windows tile the image (stride = kernel, no padding: covidct's 2x2 and 4x4 pools) run
    ``_maxpool_tiles`` instead under no_grad, and with argmax from TILES_MIN_WINDOW offsets up
    (the 4x4): it reads the input row by row (contiguously).
    ``relu``: also apply ReLU to the output and mark outputs <= 0 with ``no_winner``
    in argmax (see MaxPool2d.forward_after_relu).
    """
    n, c = x.shape[:2]
    (kh, kw), (sy, sx), (oh, ow) = layer.kernel_size, layer.stride, out_hw
    out = np.empty((n, c, oh, ow), dtype=x.dtype)  # host-ok
    argmax_dtype = np.uint8 if kh * kw < 256 else np.int32
    argmax = _like_layout(x, out.shape, argmax_dtype) if keep_argmax else None
    chunk = images_per_chunk(n, x[0].size * x.itemsize)
    # Tiling windows are read row by row (_maxpool_tiles) under no_grad, and with argmax when
    # they have at least TILES_MIN_WINDOW offsets (for 2x2, its tie-aware second pass costs more
    # than the readable loop's four strided window copies).
    tiles = _tiles(layer) and (argmax is None or kh * kw >= TILES_MIN_WINDOW)

    def work(index):
        start, stop = index * chunk, min(n, (index + 1) * chunk)
        best = out[start:stop]
        if tiles:
            _maxpool_tiles(x[start:stop], best, None if argmax is None else argmax[start:stop], (kh, kw))
        else:
            _maxpool_windows(layer, x[start:stop], best, None if argmax is None else argmax[start:stop], out_hw)
        if relu:
            if argmax is not None:
                better = scratch("better", best.shape, bool)
                candidate = scratch("candidate", best.shape, argmax_dtype)
                np.less_equal(best, 0, out=better)
                np.multiply(better, argmax_dtype(no_winner), out=candidate)
                np.maximum(argmax[start:stop], candidate, out=argmax[start:stop])  # host-ok
            np.maximum(best, 0, out=best)  # host-ok

    parallel_chunks(math.ceil(n / chunk), work, batch=n)
    return out, argmax


def _tiles(layer) -> bool:
    """True when the pool's windows tile the image: stride = kernel and no padding."""
    return tuple(layer.stride) == tuple(layer.kernel_size) and tuple(layer.padding) == (0, 0)


def _maxpool_windows(layer, x, best, winner, out_hw):
    """The readable loop over the kh*kw window offsets, for a chunk x into best (and winner)."""
    (kh, kw), (sy, sx), (oh, ow) = layer.kernel_size, layer.stride, out_hw
    x_padded = _padded("x_padded", x, layer.padding, -np.inf)
    views = [x_padded[:, :, ky:ky + sy * oh:sy, kx:kx + sx * ow:sx] for ky in range(kh) for kx in range(kw)]
    best[...] = views[0]
    if winner is None:                                   # no_grad: the running max only
        for view in views[1:]:
            np.maximum(best, view, out=best)  # host-ok
        return
    winner.fill(0)
    shape, argmax_dtype = best.shape, winner.dtype.type
    window = scratch("window", shape, x.dtype)
    better = scratch("better", shape, bool)
    candidate = scratch("candidate", shape, winner.dtype)
    for offset, view in enumerate(views[1:], start=1):
        window[...] = view
        np.greater(window, best, out=better)
        np.multiply(better, argmax_dtype(offset), out=candidate)
        np.maximum(winner, candidate, out=winner)  # host-ok
        np.maximum(best, window, out=best)  # host-ok


def _maxpool_tiles(x, best, winner, kernel):
    """Max-pool of a chunk x (b, C, H, W) whose kh x kw windows tile it (stride = kernel, no
    padding), into best (b, C, OH, OW) and, unless None, the winning offsets into winner.

    The readable loop reads kh*kw strided window views (every kw-th value of a row), which NumPy
    loops over ~10x slower than contiguous memory. Here the rows are read whole instead:

    1. down the rows: ``col[.., i, j*kw + kx]`` = the max over ky of x[.., i*kh + ky, j*kw + kx]
       (kh - 1 maxima of contiguous rows), and ``row_offset`` = ky*kw of the first ky that
       reaches it (strict >, so the first wins, as in the readable loop);
    2. across the kw columns of each window (arrays the size of the output): the largest
       column max, ties going to the smaller offset ky*kw + kx.

    That is the readable result: the max, and the first offset in row-major order that holds
    it (each column brings its first ky holding its max; of the columns holding the window's
    max, the smallest offset is the first in row-major order).
    """
    kh, kw = kernel
    b, c = x.shape[:2]
    oh, ow = best.shape[2:]
    stride_b, stride_c, stride_y, stride_x = x.strides
    rows = np.lib.stride_tricks.as_strided(                  # rows[ky][.., i, :] = x[.., i*kh + ky, :ow*kw]
        x, (kh, b, c, oh, ow * kw), (stride_y, stride_b, stride_c, kh * stride_y, stride_x), writeable=False)
    col = scratch("pool_col", (b, c, oh, ow * kw), x.dtype)
    if winner is None:                                       # no_grad: the maxima alone
        if kh == 1:
            np.copyto(col, rows[0])
        else:
            np.maximum(rows[0], rows[1], out=col)  # host-ok
        for ky in range(2, kh):
            np.maximum(col, rows[ky], out=col)  # host-ok
        columns = col.reshape(b, c, oh, ow, kw)
        if kw == 1:
            best[...] = columns[..., 0]
        else:
            np.maximum(columns[..., 0], columns[..., 1], out=best)  # host-ok
        for kx in range(2, kw):
            np.maximum(best, columns[..., kx], out=best)  # host-ok
        return

    offset_dtype = winner.dtype
    row_offset = scratch("pool_row_offset", col.shape, offset_dtype)
    better = scratch("pool_better", col.shape, bool)
    candidate = scratch("pool_candidate", col.shape, offset_dtype)
    np.copyto(col, rows[0])
    row_offset.fill(0)
    for ky in range(1, kh):
        np.greater(rows[ky], col, out=better)
        np.multiply(better, offset_dtype.type(ky * kw), out=candidate)
        np.maximum(row_offset, candidate, out=row_offset)  # host-ok
        np.maximum(col, rows[ky], out=col)  # host-ok

    columns, offsets = col.reshape(b, c, oh, ow, kw), row_offset.reshape(b, c, oh, ow, kw)
    best[...] = columns[..., 0]
    winner[...] = offsets[..., 0]
    shape = best.shape
    value = scratch("pool_value", shape, x.dtype)
    offset = scratch("pool_offset", shape, offset_dtype)
    take = scratch("pool_take", shape, bool)
    tie = scratch("pool_tie", shape, bool)
    earlier = scratch("pool_earlier", shape, bool)
    for kx in range(1, kw):
        np.copyto(value, columns[..., kx])
        np.add(offsets[..., kx], offset_dtype.type(kx), out=offset)
        np.greater(value, best, out=take)
        np.equal(value, best, out=tie)                       # a tie: the smaller offset wins
        np.less(offset, winner, out=earlier)
        np.logical_and(tie, earlier, out=tie)
        np.logical_or(take, tie, out=take)
        # winner = where(take, offset, winner), as winner + take * (offset - winner) (wrapping
        # unsigned arithmetic, exact): NumPy's masked copy is far slower on a random mask.
        np.subtract(offset, winner, out=offset)
        np.multiply(offset, take, out=offset)
        np.add(winner, offset, out=winner)
        np.maximum(best, value, out=best)  # host-ok


def maxpool_backward(layer, argmax, x_shape, grad_output):
    """MaxPool2d.backward for NumPy arrays: grad_x (N, C, H, W), chunk by chunk."""
    n, c, h, w = x_shape
    (kh, kw), (sy, sx), (py, px) = layer.kernel_size, layer.stride, layer.padding
    oh, ow = grad_output.shape[2:]
    grad_x = _like_layout(argmax, x_shape, grad_output.dtype)            # laid out as x was
    overlapping = sy < kh or sx < kw
    covers_all = not overlapping and sy * oh == h + 2 * py and sx * ow == w + 2 * px
    chunk = images_per_chunk(n, c * h * w * grad_output.itemsize)
    scatter = _tiles(layer) and kh * kw >= SCATTER_MIN_WINDOW

    def work(index):
        start, stop = index * chunk, min(n, (index + 1) * chunk)
        b = stop - start
        grad, winner = grad_output[start:stop], argmax[start:stop]
        if scatter:
            _maxpool_scatter(grad, winner, grad_x, start, stop, (kh, kw))
            return
        target = (grad_x[start:stop] if py == 0 and px == 0
                  else scratch("grad_padded", (b, c, h + 2 * py, w + 2 * px), grad_output.dtype))
        if not covers_all:
            target.fill(0)
        won = scratch("won", winner.shape, bool)
        share = scratch("share", winner.shape, grad_output.dtype)
        for ky in range(kh):
            for kx in range(kw):
                window = target[:, :, ky:ky + sy * oh:sy, kx:kx + sx * ow:sx]
                np.equal(winner, ky * kw + kx, out=won)
                if overlapping:
                    np.multiply(grad, won, out=share)
                    window += share
                else:
                    np.multiply(grad, won, out=window)
        if py or px:
            grad_x[start:stop] = target[:, :, py:py + h, px:px + w]

    parallel_chunks(math.ceil(n / chunk), work, batch=n)
    return grad_x


# Tiling pools with at least this many offsets per window scatter their gradient (see
# _maxpool_scatter), and keep their argmax with _maxpool_tiles; smaller ones (2x2) use the
# readable loop's strided window views, faster there (measured on the `default` net's pools).
SCATTER_MIN_WINDOW = TILES_MIN_WINDOW = 9


def _maxpool_scatter(grad, winner, grad_x, start, stop, kernel):
    """Max-pool backward for pools whose windows tile the input: grad_x[start:stop] = 0, then
    each output's gradient written to its window's winning input, by index (one scatter).

    The readable version writes grad * (winner == offset) through each of the kh*kw window
    views: kh*kw passes over the whole input gradient. Here: one fill, then one write per
    output. An output without winner (no_winner, after a fused ReLU) writes grad * 0 to its
    window's first input, as the readable version writes it there too. Windows do not overlap,
    so every index is written at most once: no order to keep. The same numbers for finite
    gradients: where the readable version writes grad * 0 to a losing input, which is -0.0 for
    a negative grad (or NaN for an infinite one), the fill leaves +0.0."""
    kh, kw = kernel
    target = grad_x[start:stop]
    target.fill(0)
    memory = grad_x.transpose(1, 0, 2, 3) if not grad_x.flags.c_contiguous else grad_x
    flat = memory.reshape(-1)                                   # a view (grad_x is laid out either way)
    item = grad_x.itemsize
    stride_b, stride_c, stride_y, stride_x = (s // item for s in grad_x.strides)
    key = ("pool_scatter_base", grad_x.strides, target.shape, start, kernel)
    buffers = _buffers.setdefault(threading.get_ident(), {})
    base = buffers.get(key)                                     # each window's first input, kept per shape
    if base is None:
        b, c, oh, ow = winner.shape
        buffers[key] = base = (start * stride_b + np.arange(b, dtype=np.intp)[:, None, None, None] * stride_b  # host-ok
                               + np.arange(c, dtype=np.intp)[None, :, None, None] * stride_c  # host-ok
                               + np.arange(oh, dtype=np.intp)[None, None, :, None] * (kh * stride_y)  # host-ok
                               + np.arange(ow, dtype=np.intp)[None, None, None, :] * (kw * stride_x))  # host-ok
    table = np.zeros(kh * kw + 1, dtype=np.intp)                # offset -> its input's distance from the first  # host-ok
    table[:kh * kw] = (np.arange(kh)[:, None] * stride_y + np.arange(kw)[None, :] * stride_x).ravel()  # host-ok
    index = scratch("pool_index", winner.shape, np.intp)
    np.take(table, winner, out=index)
    index += base
    share = scratch("share", winner.shape, grad.dtype)
    won = scratch("won", winner.shape, bool)
    np.less(winner, kh * kw, out=won)
    np.multiply(grad, won, out=share)
    flat[index] = share


def _channels_first(array) -> bool:
    """True for an (N, C, H, W) view of a C-contiguous (C, N, H, W) array: a fast conv's output."""
    return not array.flags.c_contiguous and array.transpose(1, 0, 2, 3).flags.c_contiguous


def _like_layout(array, shape, dtype):
    """A new (N, C, H, W) array of ``shape``, laid out (C, N, H, W) in memory if ``array`` is.

    Max-pool's argmax and input gradient follow the layout of its input: after a conv, the
    gradient then reaches the conv's backward already in the (F, N, OH, OW) order its GEMMs
    read (fast._filters_first finds nothing to copy)."""
    if _channels_first(array):
        n, c, h, w = shape
        return np.empty((c, n, h, w), dtype=dtype).transpose(1, 0, 2, 3)  # host-ok
    return np.empty(shape, dtype=dtype)  # host-ok


# -- elementwise -----------------------------------------------------------------------------------

# Below this size an elementwise pass runs as one call: a thread hand-off costs more.
SMALL_BYTES = 2 ** 20


def relu_forward(x, *, inplace: bool, keep_mask: bool):
    """ReLU.forward for NumPy x: (max(x, 0), the mask out > 0 or None), split over axis 0."""
    out = x if inplace else np.empty_like(x)
    mask = np.empty_like(x, dtype=bool) if keep_mask else None

    def part(where):
        np.maximum(x[where], 0, out=out[where])  # host-ok
        if mask is not None:
            np.greater(out[where], 0, out=mask[where])

    if x.ndim == 0 or x.nbytes < SMALL_BYTES:
        part(...)
    else:
        chunk = images_per_chunk(len(x), x[0].nbytes)
        parallel_chunks(math.ceil(len(x) / chunk), lambda index: part(slice(index * chunk, (index + 1) * chunk)),
                        batch=len(x))
    return out, mask


def multiply(a, b):
    """a * b for NumPy arrays of the same shape (ReLU's backward), split over axis 0."""
    out = np.empty(np.broadcast_shapes(a.shape, b.shape), dtype=np.result_type(a, b))  # host-ok
    if out.ndim == 0 or out.nbytes < SMALL_BYTES or a.shape != b.shape:
        np.multiply(a, b, out=out)
        return out
    chunk = images_per_chunk(len(out), out[0].nbytes)

    def work(index):
        part = slice(index * chunk, (index + 1) * chunk)
        np.multiply(a[part], b[part], out=out[part])

    parallel_chunks(math.ceil(len(out) / chunk), work, batch=len(out))
    return out


def _split_first_axis(out, work_on):
    """Call work_on(part) for slices of axis 0 of ``out``: one call for a small array,
    batch chunks in the pool otherwise. Elementwise work only (no sums across the split)."""
    if out.ndim == 0 or out.nbytes < SMALL_BYTES:
        work_on(slice(None))
        return
    chunk = images_per_chunk(len(out), out[0].nbytes)
    parallel_chunks(math.ceil(len(out) / chunk),
                    lambda index: work_on(slice(index * chunk, (index + 1) * chunk)), batch=len(out))


def scale_shift(x, scale, shift, in_place: bool):
    """x * scale + shift per channel, for NumPy x (N, C, H, W) and (C,) scale and shift:
    BatchNorm2d.forward's last two passes (out = x * scale; out += shift), laid out like x.
    ``in_place``: write over x (when nothing else needs it)."""
    out = x if in_place else np.empty_like(x)
    scale, shift = scale[:, None, None], shift[:, None, None]

    def work_on(part):
        np.multiply(x[part], scale, out=out[part])
        out[part] += shift

    _split_first_axis(out, work_on)
    return out


def batchnorm_backward_elementwise(grad_output, x_centered, scale, k, c):
    """BatchNorm2d.backward's elementwise passes, per (C,) constants (training mode; k = c = None
    in eval mode): grad_x = grad_out * scale;  grad_x -= x_centered * k;  grad_x -= c."""
    grad_x = np.empty_like(grad_output)
    scale = scale[:, None, None]
    if k is not None:
        k, c = k[:, None, None], c[:, None, None]

    def work_on(part):
        np.multiply(grad_output[part], scale, out=grad_x[part])
        if k is not None:
            grad_x[part] -= x_centered[part] * k
            grad_x[part] -= c

    _split_first_axis(grad_x, work_on)
    return grad_x
