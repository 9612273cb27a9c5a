"""The Numba backends (``numba`` and ``numba_parallel``) against the naive loop reference.

Every op, forward and backward, on random shapes that reach every code path of the kernels:
stride 2, symmetric and asymmetric padding, kernel sizes 1, 3 and 5, non-square images,
overlapping pooling windows, several images per im2col chunk (and several chunks), filter
counts on both sides of the small-filter GEMM switch, GEMM remainders. The reference runs in
float64 on the same inputs; results must agree to ~1e-12 (float64) or ~1e-5 (float32) relative
to the output's magnitude, and keep the input dtype. Then: ``need_dx=False``, thread safety of
concurrent calls, the threading layer, ``warmup``. The first run of this file compiles every
kernel twice (two dtypes) for both backends, about 45 s of CPU; later runs load the cache.
"""
from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import numba
import numpy as np
import pytest

from cnn.backends import get_backend
from cnn.backends.numba import dense as D
from cnn.backends.numba import kernels as K
from cnn.backends.numba import winograd as WG
from cnn.backends.numba.backend import _CHUNK_COLUMNS, NumbaBackend

NAIVE = get_backend("naive")
BACKENDS = ["numba", "numba_parallel"]


@pytest.fixture(autouse=True)
def direct_algorithm(monkeypatch):
    """The cases here test the direct algorithm's paths (im2col, GEMM, col2im, and the layouts
    and fusions around them), which ``numba`` runs on the 3 x 3 layers only when asked to;
    tests/test_winograd.py tests its Winograd path."""
    monkeypatch.setattr(get_backend("numba"), "conv_algorithm", "direct")
DTYPES = [pytest.param(np.float64, 1e-12, id="float64"),
          pytest.param(np.float32, 1e-5, id="float32")]


def normal(rng, shape, dtype):
    """Standard normal values representable in ``dtype``, as float64: the reference then sees
    exactly the inputs the backend sees."""
    return rng.standard_normal(shape).astype(dtype).astype(np.float64)


def assert_close(got, ref, dtype, tol):
    """Shape and dtype first; then values, relative to the magnitude of the reference (sums
    in a different order differ by rounding proportional to it, not to each element)."""
    assert got.shape == ref.shape
    assert got.dtype == dtype
    np.testing.assert_allclose(got, ref, rtol=tol, atol=tol * max(1.0, np.abs(ref).max()))


# ---- convolution -------------------------------------------------------------------------------
CONV_CASES = [  # (N, C, H, W), F, K, stride, padding
    pytest.param((2, 3, 7, 9), 4, 3, 1, ((0, 0), (0, 0)), id="3x3-valid-nonsquare"),
    pytest.param((3, 2, 8, 7), 5, 5, 2, ((1, 1), (1, 1)), id="5x5-s2-pad1"),
    pytest.param((2, 3, 6, 5), 6, 1, 1, ((0, 1), (0, 1)), id="1x1-asym"),
    pytest.param((3, 2, 9, 8), 33, 3, 2, ((0, 1), (0, 1)), id="3x3-s2-asym-33filters"),
    pytest.param((2, 1, 5, 5), 2, 5, 1, ((2, 2), (2, 2)), id="5x5-same"),
    # small outputs: several images per chunk, and more than one chunk (see _CHUNK_COLUMNS)
    pytest.param((50, 3, 5, 6), 34, 3, 1, ((0, 0), (0, 0)), id="chunks-34filters"),
    pytest.param((45, 2, 4, 5), 3, 3, 1, ((1, 1), (1, 1)), id="chunks-3filters"),
]
_REF = {}


def conv_case(shape, f, k, stride, padding, dtype):
    """Inputs in ``dtype`` and the naive float64 results (computed once per case and dtype)."""
    key = (shape, f, k, stride, padding, dtype)
    if key not in _REF:
        rng = np.random.default_rng(sum(shape) + 7 * f + k)
        x = normal(rng, shape, dtype)
        w = normal(rng, (f, shape[1], k, k), dtype)
        b = normal(rng, f, dtype)
        out, cache = NAIVE.conv2d_forward(x, w, b, stride, padding)
        dout = normal(rng, out.shape, dtype)
        _REF[key] = (x, w, b, dout, out, NAIVE.conv2d_backward(dout, cache))
    x, w, b, dout, out, grads = _REF[key]
    return [a.astype(dtype) for a in (x, w, b, dout)], out, grads


def test_cases_reach_the_paths_they_name():
    # the two chunk cases only test what their name says if the arithmetic holds
    for n, pixels in ((50, 3 * 4), (45, 4 * 5)):  # images, output pixels per image
        per_chunk = -(-_CHUNK_COLUMNS // pixels)
        assert 1 < per_chunk < n
    # ... and the filter counts fall on both sides of the GEMM switch
    assert 3 <= K._NT_MAX_FILTERS < 33


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype, tol", DTYPES)
@pytest.mark.parametrize("shape, f, k, stride, padding", CONV_CASES)
def test_conv2d(backend, dtype, tol, shape, f, k, stride, padding):
    be = get_backend(backend)
    (x, w, b, dout), out_ref, (dx_ref, dw_ref, db_ref) = conv_case(shape, f, k, stride, padding,
                                                                   dtype)
    out, cache = be.conv2d_forward(x, w, b, stride, padding)
    assert_close(out, out_ref, dtype, tol)
    dx, dw, db = be.conv2d_backward(dout, cache)
    assert_close(dx, dx_ref, dtype, tol)
    assert_close(dw, dw_ref, dtype, tol)
    assert_close(db, db_ref, dtype, tol)
    # need_dx=False: no dx, the same weight gradients
    none, dw2, db2 = be.conv2d_backward(dout, cache, need_dx=False)
    assert none is None
    np.testing.assert_array_equal(dw2, dw)
    np.testing.assert_array_equal(db2, db)


def test_conv2d_rejects_bad_arguments():
    be = get_backend("numba")
    x = np.zeros((1, 3, 5, 5))
    with pytest.raises(ValueError, match=r"w.shape=\(2, 4, 3, 3\)"):
        be.conv2d_forward(x, np.zeros((2, 4, 3, 3)), np.zeros(2), 1, ((0, 0), (0, 0)))
    with pytest.raises(ValueError, match="stride=0"):
        be.conv2d_forward(x, np.zeros((2, 3, 3, 3)), np.zeros(2), 0, ((0, 0), (0, 0)))
    with pytest.raises(ValueError, match="dtypes differ"):
        be.conv2d_forward(x, np.zeros((2, 3, 3, 3)), np.zeros(2, np.float32), 1,
                          ((0, 0), (0, 0)))


# ---- pooling -----------------------------------------------------------------------------------
POOL_CASES = [  # (N, C, H, W), pool, stride
    pytest.param((2, 3, 7, 9), 2, 2, id="2/2-odd-sizes"),
    pytest.param((2, 2, 9, 8), 3, 2, id="3/2-overlapping"),
    pytest.param((1, 3, 6, 5), 2, 1, id="2/1-overlapping"),
    pytest.param((2, 2, 9, 9), 3, 3, id="3/3"),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype, tol", DTYPES)
@pytest.mark.parametrize("shape, pool, stride", POOL_CASES)
@pytest.mark.parametrize("ties", [False, True], ids=["distinct", "ties"])
def test_maxpool2d(backend, dtype, tol, shape, pool, stride, ties):
    be = get_backend(backend)
    rng = np.random.default_rng(sum(shape) + pool)
    # with ties (small integers), the first maximum of each window must get the gradient
    x = rng.integers(0, 3, shape).astype(np.float64) if ties else normal(rng, shape, dtype)
    out_ref, cache_ref = NAIVE.maxpool2d_forward(x, pool, stride)
    dout = normal(rng, out_ref.shape, dtype)
    dx_ref = NAIVE.maxpool2d_backward(dout, cache_ref)

    out, cache = be.maxpool2d_forward(x.astype(dtype), pool, stride)
    assert_close(out, out_ref, dtype, tol)
    assert_close(be.maxpool2d_backward(dout.astype(dtype), cache), dx_ref, dtype, tol)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype, tol", DTYPES)
@pytest.mark.parametrize("shape, pool, stride", POOL_CASES)
@pytest.mark.parametrize("layout", ["nchw", "channels-last"])
def test_fused_relu_maxpool(backend, dtype, tol, shape, pool, stride, layout):
    """``maxpool2d_relu_forward/backward`` (the model's ReLU -> MaxPool2D pair as one op, the
    ReLU applied to the pooled values) against the naive ReLU then pooling, chained: on small
    integers, so that windows tie, hold only zeros and negatives, or a single zero."""
    be = get_backend(backend)
    rng = np.random.default_rng(sum(shape) + pool + 5)
    if layout == "channels-last":  # enough channels to vectorise the channels-last kernels
        shape = (shape[0], shape[1] + 17, shape[2], shape[3])
    x = rng.integers(-3, 2, shape).astype(np.float64)  # mostly <= 0: ReLU-cut windows
    h, relu_cache = NAIVE.relu_forward(x)
    out_ref, pool_cache = NAIVE.maxpool2d_forward(h, pool, stride)
    dout = normal(rng, out_ref.shape, dtype)
    dx_ref = NAIVE.relu_backward(NAIVE.maxpool2d_backward(dout, pool_cache), relu_cache)
    assert (out_ref == 0).any() and (out_ref > 0).any() and (dx_ref == 0).any()

    xin = x.astype(dtype)
    out, cache = be.maxpool2d_relu_forward(xin if layout == "nchw" else channels_last(xin),
                                           pool, stride)
    assert_close(out, out_ref, dtype, tol)
    for dout_in in (dout.astype(dtype), channels_last(dout.astype(dtype))):
        assert_close(be.maxpool2d_relu_backward(dout_in, cache), dx_ref, dtype, tol)


FUSED_CONV_CASES = [  # (N, C, H, W), F, K, stride, padding, pool, pool stride
    # few input channels: the per-image BLAS path; 5 images per chunk, so two chunks
    pytest.param((7, 2, 40, 39), 16, 3, 1, ((0, 0), (0, 0)), 2, 2, id="images-2/2-chunks"),
    pytest.param((7, 2, 23, 21), 16, 3, 2, ((1, 1), (0, 1)), 3, 2, id="images-s2-pad-3/2"),
    # many input channels: the channels-last path; 4 images per chunk
    pytest.param((7, 17, 20, 19), 16, 3, 1, ((0, 0), (0, 0)), 2, 2, id="nhwc-2/2-chunks"),
    pytest.param((5, 17, 12, 11), 18, 3, 1, ((1, 1), (1, 1)), 2, 1, id="nhwc-pad-2/1"),
    # few filters: the small-filter kernels, then the fused ReLU and pooling
    pytest.param((3, 2, 9, 8), 4, 3, 1, ((0, 0), (0, 0)), 2, 2, id="small-filters"),
]


def test_fused_conv_cases_reach_the_paths_they_name():
    """... and both BLAS paths hand the next layer a channels-last output (which a
    channels-last conv reads without converting it)."""
    be = get_backend("numba")
    for case in FUSED_CONV_CASES:
        shape, f, k, stride, padding, pool, pool_stride = case.values
        blas = be._use_blas(f, shape[1] * k * k)
        path = "small" if not blas else ("nhwc" if shape[1] >= 16 else "images")
        assert case.id.startswith(path), case.id
        x = np.zeros(shape, np.float32)
        w, b = np.zeros((f, shape[1], k, k), np.float32), np.zeros(f, np.float32)
        out, _ = be.conv2d_relu_maxpool2d_forward(x, w, b, stride, padding, pool, pool_stride)
        assert out.transpose(0, 2, 3, 1).flags.c_contiguous == blas, case.id


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype, tol", DTYPES)
@pytest.mark.parametrize("shape, f, k, stride, padding, pool, pool_stride", FUSED_CONV_CASES)
def test_fused_conv_relu_maxpool(backend, dtype, tol, shape, f, k, stride, padding, pool,
                                 pool_stride):
    """``conv2d_relu_maxpool2d_forward/backward`` (a Conv2D, ReLU, MaxPool2D run as one op,
    pooled chunk by chunk) against the naive conv, ReLU and pooling, chained; ``dout`` in
    both layouts, and without ``dx``."""
    be = get_backend(backend)
    rng = np.random.default_rng(sum(shape) + f + pool)
    x, w, b = (normal(rng, s, dtype) for s in (shape, (f, shape[1], k, k), f))
    h, conv_cache = NAIVE.conv2d_forward(x, w, b, stride, padding)
    r, relu_cache = NAIVE.relu_forward(h)
    out_ref, pool_cache = NAIVE.maxpool2d_forward(r, pool, pool_stride)
    dout = normal(rng, out_ref.shape, dtype)
    dh = NAIVE.relu_backward(NAIVE.maxpool2d_backward(dout, pool_cache), relu_cache)
    dx_ref, dw_ref, db_ref = NAIVE.conv2d_backward(dh, conv_cache)
    assert (out_ref == 0).any() and (out_ref > 0).any()  # the ReLU cut some windows

    args = [a.astype(dtype) for a in (x, w, b)]
    out, cache = be.conv2d_relu_maxpool2d_forward(*args, stride, padding, pool, pool_stride)
    assert_close(out, out_ref, dtype, tol)
    for d in (dout.astype(dtype), channels_last(dout.astype(dtype))):
        dx, dw, db = be.conv2d_relu_maxpool2d_backward(d, cache)
        for got, ref in ((dx, dx_ref), (dw, dw_ref), (db, db_ref)):
            assert_close(got, ref, dtype, tol)
    dx, dw, db = be.conv2d_relu_maxpool2d_backward(dout.astype(dtype), cache, need_dx=False)
    assert dx is None
    assert_close(dw, dw_ref, dtype, tol)


# ---- GEMM from Numba (NumPy's BLAS) -----------------------------------------------------------
def _operand(a, transposed):
    """``a`` itself, or the same values as the transposed view of a C-contiguous array."""
    return np.ascontiguousarray(a.T).T if transposed else a


@pytest.mark.parametrize("dtype, tol", DTYPES)
@pytest.mark.parametrize("trans_a", [False, True], ids=["a", "aT"])
@pytest.mark.parametrize("trans_b", [False, True], ids=["b", "bT"])
def test_gemm_from_numba(dtype, tol, trans_a, trans_b):
    """``numba_blas.gemm`` (the conv paths' GEMM) against NumPy's product in float64: both
    operands plain or transposed views, ``beta`` 0 (overwrite) and 1 (accumulate); and the
    loop nest that stands in when no BLAS is found, called through its C address."""
    from cnn.backends.numba import blas as numba_blas
    assert numba_blas.HAVE_BLAS, numba_blas.BLAS_SOURCE  # NumPy's wheels bundle OpenBLAS
    rng = np.random.default_rng(int(trans_a) + 2 * int(trans_b))
    a, b, c = (normal(rng, s, dtype) for s in ((7, 5), (5, 3), (7, 3)))
    ref = a @ b
    for beta in (0.0, 1.0):
        got = c.astype(dtype)
        numba_blas.gemm(_operand(a.astype(dtype), trans_a), _operand(b.astype(dtype), trans_b),
                        got, beta)
        assert_close(got, ref + beta * c, dtype, tol)
    loops = numba_blas._gemm_loops("s" if dtype == np.float32 else "d")
    a32, b32, got = a.astype(dtype), np.ascontiguousarray(b.T.astype(dtype)), c.astype(dtype)
    loops.ctypes(101, 112 if trans_a else 111, 112, 7, 3, 5, 2.0,
                 (np.ascontiguousarray(a32.T) if trans_a else a32).ctypes.data, 7 if trans_a
                 else 5, b32.ctypes.data, 5, 0.5, got.ctypes.data, 3)
    assert_close(got, 2 * ref + 0.5 * c, dtype, tol)


# ---- ReLU --------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype, tol", DTYPES)
@pytest.mark.parametrize("shape", [(2, 3, 5, 7), (6, 11)], ids=["4d", "2d"])
def test_relu(backend, dtype, tol, shape):
    be = get_backend(backend)
    rng = np.random.default_rng(len(shape))
    x = normal(rng, shape, dtype)
    x.flat[::5] = 0.0  # the derivative at exactly 0 is 0
    out_ref, cache_ref = NAIVE.relu_forward(x)
    dout = normal(rng, shape, dtype)
    dx_ref = NAIVE.relu_backward(dout, cache_ref)

    out, cache = be.relu_forward(x.astype(dtype))
    assert_close(out, out_ref, dtype, tol)
    assert_close(be.relu_backward(dout.astype(dtype), cache), dx_ref, dtype, tol)


# ---- dense -------------------------------------------------------------------------------------
DENSE_SHAPES = [(7, 13, 5),      # (N, D, F): below every BLAS block size
                (33, 1024, 64),  # cifar_tutorial's hidden layer, a shard of 33 images
                (2, 64, 10)]     # its classifier on a shard of 2


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype, tol", DTYPES)
@pytest.mark.parametrize("n, d, f", DENSE_SHAPES)
@pytest.mark.parametrize("layout", ["contiguous", "strided"])
def test_dense(backend, dtype, tol, n, d, f, layout):
    """The dense kernels (one nogil call each way) against the naive loops; ``strided``: the
    input and the output's gradient are transposed views, as a layer may be handed them."""
    be = get_backend(backend)
    rng = np.random.default_rng(3)
    x, w, b = (normal(rng, shape, dtype) for shape in ((n, d), (d, f), f))
    out_ref, cache_ref = NAIVE.dense_forward(x, w, b)
    dout = normal(rng, out_ref.shape, dtype)
    dx_ref, dw_ref, db_ref = NAIVE.dense_backward(dout, cache_ref)

    def given(a):
        a = a.astype(dtype)
        return np.ascontiguousarray(a.T).T if layout == "strided" else a

    out, cache = be.dense_forward(given(x), w.astype(dtype), b.astype(dtype))
    assert_close(out, out_ref, dtype, tol)
    for got, ref in zip(be.dense_backward(given(dout), cache), (dx_ref, dw_ref, db_ref)):
        assert_close(got, ref, dtype, tol)
    dx, dw, db = be.dense_backward(given(dout), cache, need_dx=False)
    assert dx is None
    assert_close(dw, dw_ref, dtype, tol)
    assert_close(db, db_ref, dtype, tol)


def test_dense_is_numpys_bit_for_bit():
    """Same BLAS, the bias gradient summed in NumPy's row order: the Numba dense op changes
    where the GIL is released, not a bit of the result."""
    rng = np.random.default_rng(5)
    x, w, b, dout = (rng.standard_normal(s).astype(np.float32)
                     for s in ((16, 1024), (1024, 64), 64, (16, 64)))
    numpy_be, numba_be = get_backend("numpy"), get_backend("numba")
    out_np, cache_np = numpy_be.dense_forward(x, w, b)
    out_nb, cache_nb = numba_be.dense_forward(x, w, b)
    np.testing.assert_array_equal(out_nb, out_np)
    for got, ref in zip(numba_be.dense_backward(dout, cache_nb),
                        numpy_be.dense_backward(dout, cache_np)):
        np.testing.assert_array_equal(got, ref)


def test_dense_of_other_dtypes_takes_numpys_op():
    """Mixed dtypes are not the kernels' (one BLAS type per call): NumPy's op runs them."""
    rng = np.random.default_rng(6)
    x = rng.standard_normal((3, 4))
    w = rng.standard_normal((4, 2)).astype(np.float32)
    b = np.zeros(2, np.float32)
    out, cache = get_backend("numba").dense_forward(x, w, b)
    np.testing.assert_allclose(out, x @ w.astype(np.float64) + b, rtol=1e-6)


# ---- threads -----------------------------------------------------------------------------------
def _kernels(module) -> list:
    return [getattr(module, name) for name in dir(module)
            if isinstance(getattr(module, name), numba.core.registry.CPUDispatcher)]


def test_kernels_release_the_gil():
    """... and so do the Winograd path's (tests/test_winograd.py)."""
    kernels = _kernels(K)
    assert len(kernels) >= 12
    winograd = _kernels(WG)
    assert len(winograd) >= 10
    dense = [D.dense_forward, D.dense_backward]
    for kernel in kernels + winograd + dense:
        assert kernel.targetoptions["nogil"] is True, kernel.__name__
        assert kernel.targetoptions.get("fastmath", False) is False, kernel.__name__


@pytest.mark.parametrize("backend", BACKENDS + ["winograd"])
def test_concurrent_threads_match_single_threaded(backend):
    """Two Python threads run conv forward and backward at the same time on different inputs
    (as the data-parallel strategy does with shards): results are exactly the sequential ones.
    ``winograd``: the numba backend's Winograd path (tests/test_winograd.py)."""
    be = (NumbaBackend(conv_algorithm="winograd") if backend == "winograd"
          else get_backend(backend))
    rng = np.random.default_rng(11)
    w = rng.standard_normal((16, 3, 3, 3)).astype(np.float32)
    b = rng.standard_normal(16).astype(np.float32)
    pad = ((1, 1), (1, 1))
    shards = [rng.standard_normal((16, 3, 20, 20)).astype(np.float32) for _ in range(2)]

    def step(x):
        out, cache = be.conv2d_forward(x, w, b, 1, pad)
        return (out, *be.conv2d_backward(out, cache))

    expected = [step(x) for x in shards]
    results = [[] for _ in shards]
    start = threading.Barrier(len(shards))

    def worker(i):
        start.wait()
        for _ in range(5):
            results[i].append(step(shards[i]))

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(len(shards))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for i, runs in enumerate(results):
        assert len(runs) == 5
        for run in runs:
            for got, ref in zip(run, expected[i]):
                np.testing.assert_array_equal(got, ref)


def test_threading_layer_is_threadsafe_when_available():
    be = get_backend("numba_parallel")
    be.relu_forward(np.ones(8))  # the layer is chosen at the first parallel launch
    layer = be.threading_layer
    assert layer == numba.threading_layer()
    assert layer in ("tbb", "omp", "workqueue")
    if os.environ.get("NUMBA_THREADING_LAYER"):  # the user's choice is respected
        return
    try:
        importlib.import_module("numba.np.ufunc.omppool")
    except ImportError:
        return
    assert layer != "workqueue"  # OpenMP loads here, so a thread-safe layer must be in use


@pytest.mark.parametrize("backend", BACKENDS)
def test_warmup_reports_seconds(backend):
    seconds = get_backend(backend).warmup(np.float32)
    assert isinstance(seconds, float) and seconds >= 0.0
    assert get_backend(backend).jit is True


# ---- channels-last views (the numba backend's BLAS path) ----------------------------------------
def channels_last(a):
    """``a (N, C, H, W)`` as an (N, C, H, W) view of a channels-last buffer: the layout the
    numba backend's BLAS path hands from layer to layer."""
    return np.ascontiguousarray(a.transpose(0, 2, 3, 1)).transpose(0, 3, 1, 2)


@pytest.mark.parametrize("dtype, tol", DTYPES)
@pytest.mark.parametrize("stride, padding", [(1, ((0, 0), (0, 0))), (2, ((1, 2), (0, 1))),
                                             (1, ((1, 1), (1, 1)))])
@pytest.mark.parametrize("dout_layout", ["nchw", "channels-last"])
def test_conv2d_on_channels_last_inputs(dtype, tol, stride, padding, dout_layout):
    """A conv whose input is a channels-last view (the output of a previous BLAS-path layer),
    many input channels, several chunks: forward and backward against the naive loops; ``dout``
    either layout. Outputs and ``dx`` come back as channels-last views."""
    be = get_backend("numba")
    rng = np.random.default_rng(11)
    x, w, b = (normal(rng, s, dtype) for s in ((40, 17, 7, 6), (16, 17, 3, 3), 16))
    out_ref, cache_ref = NAIVE.conv2d_forward(x, w, b, stride, padding)
    dout = normal(rng, out_ref.shape, dtype)
    dx_ref, dw_ref, db_ref = NAIVE.conv2d_backward(dout, cache_ref)
    out, cache = be.conv2d_forward(channels_last(x.astype(dtype)), w.astype(dtype),
                                   b.astype(dtype), stride, padding)
    assert not out.flags.c_contiguous  # channels-last, as the next layer wants it
    assert_close(out, out_ref, dtype, tol)
    d = dout.astype(dtype)
    dx, dw, db = be.conv2d_backward(channels_last(d) if dout_layout != "nchw" else d, cache)
    for got, ref in ((dx, dx_ref), (dw, dw_ref), (db, db_ref)):
        assert_close(got, ref, dtype, tol)


@pytest.mark.parametrize("dtype, tol", DTYPES)
@pytest.mark.parametrize("shape, pool, stride", POOL_CASES)
@pytest.mark.parametrize("ties", [False, True], ids=["distinct", "ties"])
@pytest.mark.parametrize("dout_layout", ["nchw", "channels-last"])
def test_maxpool2d_and_relu_on_channels_last_inputs(dtype, tol, shape, pool, stride, ties,
                                                    dout_layout):
    """Pooling and ReLU of channels-last views (the channels-last kernels; ties: the first
    maximum of each window gets the gradient) against the naive loops, ``dout`` either layout."""
    be = get_backend("numba")
    rng = np.random.default_rng(sum(shape) + pool + 3)
    shape = (shape[0], shape[1] + 17, shape[2], shape[3])  # enough channels to vectorise
    x = rng.integers(-1, 3, shape).astype(np.float64) if ties else normal(rng, shape, dtype)
    out_ref, cache_ref = NAIVE.maxpool2d_forward(x, pool, stride)
    dout = normal(rng, out_ref.shape, dtype)
    dx_ref = NAIVE.maxpool2d_backward(dout, cache_ref)
    relu_ref, relu_cache = NAIVE.relu_forward(x)
    drelu = normal(rng, shape, dtype)
    drelu_ref = NAIVE.relu_backward(drelu, relu_cache)

    lay = (lambda a: a) if dout_layout == "nchw" else channels_last
    xc = channels_last(x.astype(dtype))
    out, cache = be.maxpool2d_forward(xc, pool, stride)
    assert_close(out, out_ref, dtype, tol)
    assert_close(be.maxpool2d_backward(lay(dout.astype(dtype)), cache), dx_ref, dtype, tol)
    r, rc = be.relu_forward(xc)
    assert_close(r, relu_ref, dtype, tol)
    assert_close(be.relu_backward(lay(drelu.astype(dtype)), rc), drelu_ref, dtype, tol)
    # an NCHW consumer of a channels-last result (the per-image conv path's pooling, here)
    assert_close(be.maxpool2d_backward(channels_last(dout.astype(dtype)),
                                       be.maxpool2d_forward(x.astype(dtype), pool, stride)[1]),
                 dx_ref, dtype, tol)


def test_no_compilation_inside_any_epoch_with_a_cold_cache(tmp_path):
    """With an empty Numba cache, every kernel the epochs and evaluations of a fit use is
    compiled in its warm-up (timed as ``compile_time``), on every JIT path of the CPU: no
    compilation or cache load happens after the warm-up (tests/compile_checks.py records
    Numba's compiler-lock events). The first path compiles the ``numba`` kernels, the second
    finds them compiled, the third compiles the ``numba_parallel`` ones."""
    env = {**os.environ, "NUMBA_CACHE_DIR": str(tmp_path / "numba-cache")}
    here = Path(__file__).resolve().parent
    proc = subprocess.run([sys.executable, str(here / "compile_checks.py")], env=env,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    fits = [json.loads(line) for line in proc.stdout.splitlines()]
    assert [f["path"] for f in fits] == ["numba sync x2", "numba sequential x1",
                                         "numba_parallel sequential x1"]
    for fit in fits:
        assert fit["events_after_warm_up"] == 0, fit
    assert fits[0]["warm_up_events"] > 0 and fits[2]["warm_up_events"] > 0, fits  # cold
    assert fits[0]["compile_time"] > 0 and fits[2]["compile_time"] > 0
