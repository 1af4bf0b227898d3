"""minicnn/fast.py against the readable layer code it replaces on the CPU.

The fast paths are the same algorithms run over batch chunks in threads, with
reusable buffers. Outputs, input gradients, max-pool and ReLU results must be the
same numbers; the conv weight gradient is a sum over chunks (another summation
order), so it is compared to float rounding. Any thread count gives bit-identical
results.
"""
import threading

import numpy as np
import pytest

import minicnn as mc
from minicnn import fast


@pytest.fixture(autouse=True)
def small_chunks(monkeypatch):
    """Chunks of a quarter batch even for these tiny images (real layers get >= 1024 GEMM
    columns per chunk), and threads even for these small batches, so that every test here runs
    several chunks in several threads."""
    monkeypatch.setattr(fast, "MIN_COLUMNS", 1)
    monkeypatch.setattr(fast, "MIN_BATCH_FOR_THREADS", 1)
    monkeypatch.setattr(fast, "MIN_BYTES_FOR_THREADS", 0)


@pytest.fixture
def threads():
    """Set the pool size for one test and restore the default afterwards."""
    yield fast.set_num_threads
    fast.set_num_threads(None)


def forward_backward(layer, x, grad_out):
    """(out, grad_x, [param grads]) of one forward + backward from fresh gradients."""
    for param in layer.parameters():
        param.grad = None
    out = layer(x)
    grad_x = layer.backward(grad_out)
    return out, grad_x, [param.grad for param in layer.parameters()]


def both_ways(make_layer, x, grad_out):
    """The same layer (same weights) run by the readable code and by the fast path."""
    with fast.disabled():
        readable = forward_backward(make_layer(), x, grad_out)
    return readable, forward_backward(make_layer(), x, grad_out)


CONVS = [  # (in, out, kernel, stride, padding, input shape)
    (3, 5, 3, 1, 1, (7, 3, 9, 8)),
    (2, 4, (3, 2), (2, 1), (1, 0), (5, 2, 11, 7)),
    (1, 6, 5, 2, 2, (9, 1, 16, 16)),
    (4, 3, 1, 2, 0, (3, 4, 6, 5)),
    (2, 3, 4, 3, 1, (1, 2, 10, 9)),
    (1, 3, 3, 2, 1, (3, 1, 9, 7)),        # stride phases of odd sizes
    (1, 4, (5, 3), (3, 2), (2, 0), (2, 1, 13, 12)),
]


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("spec", CONVS)
def test_conv_matches_readable(spec, dtype):
    c_in, c_out, kernel, stride, padding, shape = spec
    rng = np.random.default_rng(0)
    x = rng.standard_normal(shape).astype(dtype)

    def make():
        return mc.Conv2d(c_in, c_out, kernel, stride, padding, rng=np.random.default_rng(1), dtype=dtype)

    out_shape = make()(x).shape
    grad_out = rng.standard_normal(out_shape).astype(dtype)
    (out_r, gx_r, (gw_r, gb_r)), (out_f, gx_f, (gw_f, gb_f)) = both_ways(make, x, grad_out)
    # The fast path may hand BLAS differently shaped GEMMs (stride phases, chunks), and some CPUs'
    # OpenBLAS kernels then sum in another order: equal to rounding, not always bit for bit.
    tolerance = 1e-5 if dtype == np.float32 else 1e-12
    np.testing.assert_allclose(out_f, out_r, rtol=tolerance, atol=tolerance)
    np.testing.assert_allclose(gx_f, gx_r, rtol=tolerance, atol=tolerance)
    np.testing.assert_array_equal(gb_f, gb_r)
    np.testing.assert_allclose(gw_f, gw_r, rtol=tolerance, atol=tolerance)    # sums over chunks: another order


@pytest.mark.parametrize("spec", [(5, 2, 2, (3, 1, 16, 16)), (3, 2, 1, (2, 3, 9, 7)), ((5, 3), (3, 2), (2, 0), (2, 2, 13, 12)),
                                  (4, 3, 1, (1, 2, 10, 9)), (7, 2, 3, (2, 1, 15, 14))])
def test_im2col_by_stride_phases_is_the_strided_gather(spec):
    """Strided convs gather im2col through the input's stride phases (fast._im2col_by_phases):
    the same matrix as the readable im2col, for odd sizes, paddings and a second call on a
    smaller chunk (the phase buffer's zero border is reused)."""
    from minicnn.im2col import im2col, output_size
    kernel, stride, padding, shape = spec
    conv = mc.Conv2d(shape[1], 2, kernel, stride, padding)
    x = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    for part in (x, x[:1]):
        out_hw = output_size("Conv2d", part.shape[2:], conv.kernel_size, conv.stride, conv.padding)
        want = im2col(part, conv.kernel_size, conv.stride, conv.padding, out_hw).reshape(-1, len(part) * out_hw[0] * out_hw[1])
        np.testing.assert_array_equal(fast._im2col_chunk(conv, part, out_hw), want)


def test_conv_without_input_gradient():
    x = np.random.default_rng(0).standard_normal((6, 2, 8, 8)).astype(np.float32)
    conv = mc.Conv2d(2, 3, 3, padding=1, rng=np.random.default_rng(1))
    conv.needs_input_grad = False
    assert conv.backward(np.ones(conv(x).shape, np.float32)) is None
    assert conv.weight.grad.shape == (3, 2, 3, 3)


POOLS = [  # (kernel, stride, padding, input shape)
    (2, None, 0, (7, 3, 8, 9)),
    (3, 2, 1, (5, 2, 11, 10)),          # overlapping windows and padding (ResNet's stem pool)
    (3, 1, 1, (3, 2, 5, 6)),
    ((2, 3), (2, 1), 0, (6, 2, 7, 7)),
    (4, None, 0, (5, 3, 17, 16)),        # windows that tile the image (fast._maxpool_tiles), a row left over
    ((3, 2), None, 0, (4, 2, 9, 11)),
]


def tie_free(shape, rng):
    """Distinct values (a shuffled linspace), so the max and its gradient are well defined."""
    return rng.permutation(np.linspace(-1, 1, int(np.prod(shape)))).reshape(shape).astype(np.float32)


@pytest.mark.parametrize("spec", POOLS)
def test_maxpool_matches_readable(spec):
    kernel, stride, padding, shape = spec
    rng = np.random.default_rng(0)
    x = tie_free(shape, rng)
    grad_out = rng.standard_normal(mc.MaxPool2d(kernel, stride, padding)(x).shape).astype(np.float32)
    readable, fast_result = both_ways(lambda: mc.MaxPool2d(kernel, stride, padding), x, grad_out)
    for a, b in zip(readable[:2], fast_result[:2]):
        np.testing.assert_array_equal(b, a)


@pytest.mark.parametrize("use_fast", [False, True])
@pytest.mark.parametrize("spec", POOLS)
def test_relu_fused_into_maxpool_is_relu_then_maxpool(spec, use_fast):
    """Sequential(ReLU, MaxPool2d) runs as relu(maxpool(x)): the same output and gradient
    as the two layers one after the other, ties at zero included."""
    kernel, stride, padding, shape = spec
    rng = np.random.default_rng(0)
    x = np.round(rng.standard_normal(shape), 1).astype(np.float32)   # many ties, many zeros
    x[0, 0] = -np.abs(x[0, 0])                                        # a channel with no positive value
    fused = mc.Sequential(mc.ReLU(), mc.MaxPool2d(kernel, stride, padding))
    relu, pool = mc.ReLU(), mc.MaxPool2d(kernel, stride, padding)
    with (fast.disabled() if not use_fast else _nothing()):
        out = fused(x)
        expected = pool(relu(x))
        grad_out = rng.standard_normal(out.shape).astype(np.float32)
        np.testing.assert_array_equal(out, expected)
        np.testing.assert_array_equal(fused.backward(grad_out), relu.backward(pool.backward(grad_out)))
    assert fused[0]._saved is None and fused[1]._saved is None


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


@pytest.mark.parametrize("inplace", [False, True])
def test_relu_matches_readable(inplace):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((8, 4, 96, 96)).astype(np.float32)        # > fast.SMALL_BYTES: threaded
    grad_out = rng.standard_normal(x.shape).astype(np.float32)
    with fast.disabled():
        readable = forward_backward(mc.ReLU(inplace=inplace), x.copy(), grad_out)
    fast_result = forward_backward(mc.ReLU(inplace=inplace), x.copy(), grad_out)
    np.testing.assert_array_equal(fast_result[0], readable[0])
    np.testing.assert_array_equal(fast_result[1], readable[1])


@pytest.mark.parametrize("training", [True, False])
def test_batchnorm_matches_readable(training):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((8, 4, 96, 96)).astype(np.float32)        # > fast.SMALL_BYTES: threaded
    grad_out = rng.standard_normal(x.shape).astype(np.float32)

    def make():
        layer = mc.BatchNorm2d(4)
        layer.weight.data = np.array([0.5, 1.5, -1.0, 2.0], np.float32)
        layer.running_mean = np.array([0.1, -0.2, 0.3, 0.0], np.float32)
        return layer.train(training)

    readable, fast_result = both_ways(make, x, grad_out)
    for a, b in zip(readable[:2] + tuple(readable[2]), fast_result[:2] + tuple(fast_result[2])):
        np.testing.assert_array_equal(b, a)


def small_cnn():
    rng = np.random.default_rng(3)
    return mc.Sequential(mc.Conv2d(2, 4, 3, padding=1, rng=rng), mc.ReLU(), mc.MaxPool2d(2),
                         mc.Conv2d(4, 6, 3, stride=2, rng=rng), mc.BatchNorm2d(6), mc.ReLU(inplace=True),
                         mc.MaxPool2d(3, 1, 1), mc.Flatten(), mc.Linear(6 * 3 * 3, 3, rng=rng))


def test_any_thread_count_gives_identical_results(threads):
    """Chunks never depend on the thread count, and chunk sums are added in order: bit-identical."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((11, 2, 14, 14)).astype(np.float32)
    grad_out = rng.standard_normal((11, 3)).astype(np.float32)
    results = []
    for count in (1, 2, 3):
        threads(count)
        results.append(forward_backward(small_cnn(), x, grad_out))
    for other in results[1:]:
        np.testing.assert_array_equal(other[0], results[0][0])
        np.testing.assert_array_equal(other[1], results[0][1])
        for a, b in zip(other[2], results[0][2]):
            np.testing.assert_array_equal(a, b)


def test_buffers_are_reused_and_released():
    model = small_cnn()
    x = np.random.default_rng(0).standard_normal((8, 2, 14, 14)).astype(np.float32)
    model(x)
    first = {key: buffer.ctypes.data for key, buffer in fast._buffers[threading.get_ident()].items()}
    assert ("col", np.dtype(np.float32).str) in first
    model(x)
    assert {key: buffer.ctypes.data for key, buffer in fast._buffers[threading.get_ident()].items()} == first
    model.release_saved()
    assert fast._buffers == {}


def test_thread_count_setting(monkeypatch, threads):
    monkeypatch.setenv("MINICNN_NUM_THREADS", "3")
    assert fast.num_threads() == 3
    threads(2)
    assert fast.num_threads() == 2
    threads(None)
    monkeypatch.setenv("MINICNN_NUM_THREADS", "two")
    with pytest.raises(ValueError, match="MINICNN_NUM_THREADS must be a positive integer"):
        fast.num_threads()
    with pytest.raises(ValueError, match="positive int"):
        fast.set_num_threads(0)


def test_errors_in_threads_reach_the_caller(threads):
    threads(2)

    def work(index):
        if index == 3:
            raise KeyError("chunk 3")

    with pytest.raises(KeyError, match="chunk 3"):
        fast.parallel_chunks(4, work)


def test_only_host_numpy_takes_the_fast_path():
    assert fast.use_fast_path(np.zeros(3))
    assert not fast.use_fast_path(np.zeros(3), np.zeros(2).view(np.ma.MaskedArray))
    with fast.disabled():
        assert not fast.use_fast_path(np.zeros(3))
    assert fast.use_fast_path(np.zeros(3))


def test_a_forked_child_gets_its_own_pool(threads):
    """A child forked after the pool started has none of its threads: it must make new ones."""
    import multiprocessing
    threads(2)
    fast.parallel_chunks(4, lambda index: None)             # the parent's pool exists now
    context = multiprocessing.get_context("fork")
    with context.Pool(1) as pool:
        assert pool.apply_async(_sum_in_chunks_in_a_child).get(timeout=60) == sum(range(8))


def _sum_in_chunks_in_a_child():
    fast.set_num_threads(2)
    parts = [0] * 8
    fast.parallel_chunks(8, lambda index: parts.__setitem__(index, index))
    return sum(parts)


def test_strided_inputs_and_a_kernel_with_more_than_255_offsets():
    """A non-contiguous input (every other image, a transposed layout) and a 16x16 max-pool
    (256 offsets: int32 winners) give the readable results too."""
    rng = np.random.default_rng(0)
    x = tie_free((10, 2, 33, 32), rng)[::2]                          # a strided view
    pool_x = tie_free((2, 5, 32, 32), rng).transpose(1, 0, 2, 3)    # (5, 2, 32, 32), channel-first memory

    def conv():
        return mc.Conv2d(2, 3, 3, padding=1, rng=np.random.default_rng(1))

    grad = rng.standard_normal((5, 3, 33, 32)).astype(np.float32)
    (out_r, gx_r, _), (out_f, gx_f, _) = both_ways(conv, x, grad)
    np.testing.assert_array_equal(out_f, out_r)
    np.testing.assert_array_equal(gx_f, gx_r)
    grad = rng.standard_normal((5, 2, 2, 2)).astype(np.float32)
    fused_r, fused_f = both_ways(lambda: mc.Sequential(mc.ReLU(), mc.MaxPool2d(16)), pool_x, grad)
    np.testing.assert_array_equal(fused_f[0], fused_r[0])
    np.testing.assert_array_equal(fused_f[1], fused_r[1])


@pytest.mark.parametrize("relu", [False, True])
@pytest.mark.parametrize("kernel", [2, 4, (3, 2), (1, 3)])
def test_tiling_pools_break_ties_like_readable(kernel, relu):
    """Pools whose windows tile the image read it row by row (fast._maxpool_tiles) and scatter
    their gradient (fast._maxpool_scatter): with many ties (a later column's earlier row against
    an earlier column's later row), channel-first input and under no_grad, the readable
    winners, outputs and gradients."""
    rng = np.random.default_rng(0)
    x = np.round(rng.standard_normal((6, 3, 12, 12)), 0).astype(np.float32)     # values -3..3: ties everywhere
    x[0, 0, 0, :2], x[0, 0, 1, :2] = (1, 5), (5, 1)                           # (0, 1) and (1, 0) tie at the max
    x[1, 1] = 0                                                               # a whole channel of equal values
    channel_first = np.ascontiguousarray(x.transpose(1, 0, 2, 3)).transpose(1, 0, 2, 3)

    def make():
        return mc.Sequential(mc.ReLU(), mc.MaxPool2d(kernel)) if relu else mc.MaxPool2d(kernel)

    for inputs in (x, channel_first):
        grad_out = rng.standard_normal(make()(inputs).shape).astype(np.float32)
        readable, fast_result = both_ways(make, inputs, grad_out)
        np.testing.assert_array_equal(fast_result[0], readable[0])
        np.testing.assert_array_equal(fast_result[1], readable[1])
        pool = make()
        with mc.no_grad():
            np.testing.assert_array_equal(pool(inputs), readable[0])
    with fast.disabled():
        readable_pool = mc.MaxPool2d(kernel)
        readable_pool(x)
        readable_winners = readable_pool._saved[0]
    fast_pool = mc.MaxPool2d(kernel)
    fast_pool(x)
    np.testing.assert_array_equal(fast_pool._saved[0], readable_winners)


def test_small_batches_run_as_larger_chunks(monkeypatch):
    """Below MIN_BATCH_FOR_THREADS (or MIN_BYTES_FOR_THREADS) a batch runs in the calling thread
    in chunks of ONE_THREAD_CHUNK_BYTES (here the whole batch): the same outputs and input
    gradients as quarter-batch chunks in threads."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((6, 1, 20, 20)).astype(np.float32)

    def make():
        layers = np.random.default_rng(1)
        return mc.Sequential(mc.Conv2d(1, 4, 5, 2, 2, rng=layers), mc.ReLU(), mc.MaxPool2d(2),
                             mc.Conv2d(4, 3, 3, 1, 1, rng=layers), mc.ReLU(), mc.MaxPool2d(5))

    grad_out = rng.standard_normal(make()(x).shape).astype(np.float32)
    threaded = forward_backward(make(), x, grad_out)
    monkeypatch.setattr(fast, "MIN_BATCH_FOR_THREADS", 32)
    assert fast.images_per_chunk(6, 1000, 100) == 6
    one_chunk = forward_backward(make(), x, grad_out)
    monkeypatch.setattr(fast, "MIN_BATCH_FOR_THREADS", 1)
    monkeypatch.setattr(fast, "MIN_BYTES_FOR_THREADS", 2 ** 30)
    assert not fast.runs_threaded(6, 1000) and fast.runs_threaded(6)
    np.testing.assert_array_equal(forward_backward(make(), x, grad_out)[1], one_chunk[1])
    np.testing.assert_allclose(one_chunk[0], threaded[0], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(one_chunk[1], threaded[1], rtol=1e-5, atol=1e-6)
    for a, b in zip(one_chunk[2], threaded[2]):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_conv_relu_pool_conv_stack_matches_readable():
    """conv -> ReLU -> max-pool -> conv, as in covidct's nets: the pool's gradient comes out laid
    out like the fast conv's output (F, N, OH, OW), and the stack gives the readable numbers."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((6, 1, 20, 20)).astype(np.float32)

    def make():
        layers = np.random.default_rng(1)
        return mc.Sequential(mc.Conv2d(1, 4, 5, 2, 2, rng=layers), mc.ReLU(), mc.MaxPool2d(2),
                             mc.Conv2d(4, 3, 3, 1, 1, rng=layers), mc.ReLU(), mc.MaxPool2d(2, padding=1))

    grad_out = rng.standard_normal(make()(x).shape).astype(np.float32)
    (out_r, gx_r, grads_r), (out_f, gx_f, grads_f) = both_ways(make, x, grad_out)
    # BLAS may round a GEMM over a chunk's columns differently from one over the whole batch
    # (its edge kernels), so through two convs the numbers agree to float rounding.
    np.testing.assert_allclose(out_f, out_r, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(gx_f, gx_r, rtol=1e-5, atol=1e-6)
    for fast_grad, readable_grad in zip(grads_f, grads_r):
        np.testing.assert_allclose(fast_grad, readable_grad, rtol=1e-5, atol=1e-6)

    model = make()
    pool = model[2]
    hidden = pool.forward_after_relu(model[0](x))
    grad = pool.backward(np.ones(hidden.shape, np.float32))
    assert grad.transpose(1, 0, 2, 3).flags.c_contiguous and not grad.flags.c_contiguous


def test_padded_buffers_keep_their_border_per_fill():
    """Conv (border 0) and max-pool (border -inf) chunks of the same shape get separate padded
    buffers, whose borders stay right however the two alternate."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((4, 2, 6, 6)).astype(np.float32)
    conv = mc.Conv2d(2, 2, 3, padding=1, rng=np.random.default_rng(1))
    pool = mc.MaxPool2d(3, stride=1, padding=1)
    with fast.disabled():
        want_conv, want_pool = conv(x), pool(-np.abs(x))
    for _ in range(2):
        np.testing.assert_array_equal(conv(x), want_conv)
        np.testing.assert_array_equal(pool(-np.abs(x)), want_pool)


def test_small_batches_run_in_the_calling_thread(monkeypatch, threads):
    monkeypatch.setattr(fast, "MIN_BATCH_FOR_THREADS", 32)
    threads(2)
    seen = set()
    fast.parallel_chunks(4, lambda index: seen.add(threading.get_ident()), batch=12)
    assert seen == {threading.get_ident()}
    seen.clear()
    fast.parallel_chunks(4, lambda index: seen.add(threading.get_ident()), batch=32)
    assert len(seen) == 2
    monkeypatch.setattr(fast, "MIN_BYTES_FOR_THREADS", 1000)
    seen.clear()
    fast.parallel_chunks(4, lambda index: seen.add(threading.get_ident()), batch=32, bytes_per_image=31)
    assert seen == {threading.get_ident()}
    fast.parallel_chunks(4, lambda index: seen.add(threading.get_ident()), batch=32, bytes_per_image=32)
    assert len(seen) == 2


def test_one_blas_thread_holds_blas_and_keeps_the_pool():
    threadpoolctl = pytest.importorskip("threadpoolctl")     # in the test extra

    def blas_threads():
        return max(info["num_threads"] for info in threadpoolctl.threadpool_info() if info["user_api"] == "blas")

    before, pool = blas_threads(), fast.num_threads()
    with fast.one_blas_thread():
        assert blas_threads() == 1
        assert fast.num_threads() == pool                    # the pool keeps the count BLAS gave it
    assert blas_threads() == before and fast.num_threads() == pool
