"""Winograd's F(m x m, 3 x 3) on the ``numba`` backend (:mod:`cnn.backends.numba.winograd`)
against the naive loops of the reference backend, and the backend's choice of algorithm.

Every case runs forward, ``dx``, ``dw`` and ``db`` (and without ``dx``) against the naive conv
in float64 on the same inputs, on random shapes: odd and even sizes, non-square images,
'valid', 'same' and asymmetric padding, several channel and filter counts, batches over
several chunks with a shorter last one, both tile sizes, inputs NCHW and channels-last, the
output gradient in both layouts, and fused with ReLU and max pooling. Then the transforms
against their definition, the backend's choice of algorithm, a model's step (with a workspace,
no buffer or array allocated after the first; float64 against the NumPy backend). Two threads
at once, and ``nogil``: ``test_concurrent_threads_match_single_threaded`` and
``test_kernels_release_the_gil`` in test_numba_backend.py.

Tolerance, relative to the largest value of the reference, as in test_numba_backend.py:
float64 1e-12 (the bound every path is held to; Winograd's float64 errors are orders of
magnitude below it). float32: ``WINOGRAD_FLOAT32_TOL`` = 2e-5, twice the direct algorithm's
1e-5: F(4x4, 3x3) multiplies by up to 8 in its data transforms and by 1/24 in its filter
transform, and its float32 rounding errors are several times the direct conv's.
"""
from __future__ import annotations

import tracemalloc

import numpy as np
import pytest

from cnn.backends import get_backend
from cnn.backends.numba import backend as numba_backend
from cnn.backends.numba import winograd as WG
from cnn.backends.numba.backend import NumbaBackend, NumbaParallelBackend
from cnn.context import Workspace

NAIVE = get_backend("naive")
WINOGRAD_FLOAT32_TOL = 2e-5
DTYPES = [pytest.param(np.float64, 1e-12, id="float64"),
          pytest.param(np.float32, WINOGRAD_FLOAT32_TOL, id="float32")]
VALID, SAME = ((0, 0), (0, 0)), ((1, 1), (1, 1))


def normal(rng, shape, dtype):
    """Standard normal values representable in ``dtype``, as float64."""
    return rng.standard_normal(shape).astype(dtype).astype(np.float64)


def channels_last(a):
    """``a (N, C, H, W)`` as an (N, C, H, W) view of a channels-last buffer."""
    return np.ascontiguousarray(a.transpose(0, 2, 3, 1)).transpose(0, 3, 1, 2)


def assert_close(got, ref, dtype, tol, what=""):
    assert got.shape == ref.shape, what
    assert got.dtype == dtype, what
    np.testing.assert_allclose(got, ref, rtol=tol, atol=tol * max(1.0, np.abs(ref).max()),
                               err_msg=what)


def winograd(tile):
    """A numba backend that runs F(tile x tile, 3 x 3) on every 3 x 3 stride-1 conv."""
    be = NumbaBackend(conv_algorithm="winograd")
    be.winograd_tile = lambda c, f, kh, kw, stride, ho, wo: tile if (kh, kw, stride) == (
        3, 3, 1) else 0
    return be


# ---- the transforms -----------------------------------------------------------------------------
@pytest.mark.parametrize("m", WG.TILES)
def test_matrices_compute_the_1d_correlation(m):
    """F(m, 3) in 1-D: ``A^T [(G g) * (B^T d)]`` is the correlation of ``a = m + 2`` inputs
    with a 3-tap filter, exactly (float64, small integers)."""
    bt, g, at = WG.transform_matrices(m)
    rng = np.random.default_rng(m)
    for _ in range(5):
        d = rng.integers(-9, 10, m + 2).astype(np.float64)
        taps = rng.integers(-9, 10, 3).astype(np.float64)
        ref = np.array([d[i:i + 3] @ taps for i in range(m)])
        np.testing.assert_allclose(at @ ((g @ taps) * (bt @ d)), ref, rtol=0, atol=1e-12)


@pytest.mark.parametrize("m", WG.TILES)
@pytest.mark.parametrize("name", ["bt", "b", "at", "a"])
def test_1d_kernels_apply_their_matrix(m, name):
    """The straight-line kernels ``_bt<m>``, ``_b<m>`` (B = (B^T)^T), ``_at<m>``, ``_a<m>``
    apply the matrix of :func:`transform_matrices` (or its transpose) to runs of values held
    at strided offsets."""
    bt, _, at = WG.transform_matrices(m)
    matrix = {"bt": bt, "b": bt.T, "at": at, "a": at.T}[name]
    kernel = getattr(WG, f"_{name}{m}")
    rows_out, rows_in = matrix.shape
    run, ss, ds = 5, 7, 6  # runs of 5 values, 7 apart in src and 6 apart in dst
    rng = np.random.default_rng(rows_in)
    src = rng.standard_normal(3 + rows_in * ss)
    dst = np.full(2 + rows_out * ds, np.nan)
    kernel(src, np.uint64(3), np.uint64(ss), dst, np.uint64(2), np.uint64(ds), np.uint64(run))
    x = np.stack([src[3 + k * ss:3 + k * ss + run] for k in range(rows_in)])
    got = np.stack([dst[2 + k * ds:2 + k * ds + run] for k in range(rows_out)])
    np.testing.assert_allclose(got, matrix @ x, rtol=1e-14, atol=1e-14)


# ---- the conv against the naive loops -----------------------------------------------------------
CONV_CASES = [  # (N, C, H, W), F, padding
    pytest.param((3, 5, 9, 8), 7, VALID, id="valid-odd-even"),
    pytest.param((2, 17, 7, 6), 16, SAME, id="same"),
    pytest.param((2, 3, 10, 11), 4, ((1, 0), (0, 1)), id="asymmetric"),
    pytest.param((2, 32, 15, 15), 64, VALID, id="cifar-conv2"),
    pytest.param((3, 64, 6, 6), 33, VALID, id="cifar-conv3-33filters"),
    pytest.param((2, 16, 4, 5), 16, VALID, id="one-tile-row"),
    pytest.param((1, 2, 3, 3), 3, VALID, id="one-pixel"),
]
_REF = {}


def conv_case(shape, f, padding, dtype):
    """Inputs in ``dtype`` and the naive float64 results (once per case and dtype)."""
    key = (shape, f, padding, dtype)
    if key not in _REF:
        rng = np.random.default_rng(sum(shape) + 7 * f)
        x, w, b = (normal(rng, s, dtype) for s in (shape, (f, shape[1], 3, 3), f))
        out, cache = NAIVE.conv2d_forward(x, w, b, 1, padding)
        dout = normal(rng, out.shape, dtype)
        _REF[key] = (x, w, b, dout, out, NAIVE.conv2d_backward(dout, cache))
    x, w, b, dout, out, grads = _REF[key]
    return [a.astype(dtype) for a in (x, w, b, dout)], out, grads


@pytest.mark.parametrize("tile", WG.TILES)
@pytest.mark.parametrize("dtype, tol", DTYPES)
@pytest.mark.parametrize("shape, f, padding", CONV_CASES)
@pytest.mark.parametrize("layout", ["nchw", "channels-last"])
def test_conv2d(tile, dtype, tol, shape, f, padding, layout):
    be = winograd(tile)
    (x, w, b, dout), out_ref, (dx_ref, dw_ref, db_ref) = conv_case(shape, f, padding, dtype)
    lay = channels_last if layout == "channels-last" else (lambda a: a)
    out, cache = be.conv2d_forward(lay(x), w, b, 1, padding)
    assert cache[-1] == "winograd" and cache[4] == tile
    assert out.transpose(0, 2, 3, 1).flags.c_contiguous  # channels-last, for the next layer
    assert_close(out, out_ref, dtype, tol, "out")
    for d in (dout, channels_last(dout)):
        dx, dw, db = be.conv2d_backward(d, cache)
        for got, ref, what in ((dx, dx_ref, "dx"), (dw, dw_ref, "dw"), (db, db_ref, "db")):
            assert_close(got, ref, dtype, tol, what)
    none, dw2, db2 = be.conv2d_backward(dout, cache, need_dx=False)
    assert none is None
    np.testing.assert_array_equal(dw2, dw)
    np.testing.assert_array_equal(db2, db)


@pytest.mark.parametrize("tile", WG.TILES)
@pytest.mark.parametrize("dtype, tol", DTYPES)
@pytest.mark.parametrize("padding", [VALID, SAME], ids=["valid", "same"])
def test_conv2d_over_several_chunks(monkeypatch, tile, dtype, tol, padding):
    """Chunks of 2 images and a shorter last one (7 images), with and without a workspace."""
    be = winograd(tile)
    rng = np.random.default_rng(tile)
    n, c, h, wd, f = 7, 17, 9, 8, 18
    x, w, b = (normal(rng, s, dtype) for s in ((n, c, h, wd), (f, c, 3, 3), f))
    out_ref, cache_ref = NAIVE.conv2d_forward(x, w, b, 1, padding)
    dout = normal(rng, out_ref.shape, dtype)
    grads_ref = NAIVE.conv2d_backward(dout, cache_ref)
    ho, wo = out_ref.shape[2:]
    a = tile + 2
    th, tw = WG.tile_grid(ho, wo, tile)
    per_image = ((th * tile + 2) * a * tw * c + a * a * th * tw * (c + f) + ho * wo * f) \
        * np.dtype(dtype).itemsize
    monkeypatch.setattr(numba_backend, "_WINOGRAD_CHUNK_BYTES", 2 * per_image)
    assert be._winograd_buffers(None, n, c, f, ho, wo, tile, dtype)[0] == 2
    for ws in (None, Workspace(be)):
        out, cache = be.conv2d_forward(*(v.astype(dtype) for v in (x, w, b)), 1, padding, ws=ws)
        grads = be.conv2d_backward(dout.astype(dtype), cache, ws=ws)
        for got, ref in zip((out, *grads), (out_ref, *grads_ref)):
            assert_close(got, ref, dtype, tol)


FUSED_CASES = [  # (N, C, H, W), F, padding, pool, pool stride
    pytest.param((7, 17, 20, 19), 16, VALID, 2, 2, id="2/2-odd"),
    pytest.param((5, 17, 12, 11), 18, SAME, 2, 1, id="same-2/1"),
    pytest.param((3, 32, 15, 15), 64, VALID, 2, 2, id="cifar-conv2"),
    pytest.param((4, 3, 9, 10), 16, SAME, 3, 2, id="rgb-3/2"),
]


@pytest.mark.parametrize("tile", WG.TILES)
@pytest.mark.parametrize("dtype, tol", DTYPES)
@pytest.mark.parametrize("shape, f, padding, pool, pool_stride", FUSED_CASES)
def test_fused_conv_relu_maxpool(tile, dtype, tol, shape, f, padding, pool, pool_stride):
    """``conv2d_relu_maxpool2d_*`` on the Winograd path against the naive ReLU and pooling of
    the plain Winograd conv's output (itself checked against the naive conv here and in
    :func:`test_conv2d`), then the naive backward of pooling, ReLU and conv; ``dout`` in both
    layouts, and without ``dx``. The pooling takes the values the algorithm computed, as the
    fused op does: in a window whose two largest values differ by less than the rounding,
    the naive conv's values could pick the other one."""
    be = winograd(tile)
    rng = np.random.default_rng(sum(shape) + f + pool)
    args = [normal(rng, s, dtype).astype(dtype) for s in (shape, (f, shape[1], 3, 3), f)]
    h, _ = be.conv2d_forward(*args, 1, padding)
    h_ref, conv_cache = NAIVE.conv2d_forward(*(a.astype(np.float64) for a in args), 1, padding)
    assert_close(h, h_ref, dtype, tol, "conv")
    r, relu_cache = NAIVE.relu_forward(h.astype(np.float64))
    out_ref, pool_cache = NAIVE.maxpool2d_forward(r, pool, pool_stride)
    dout = normal(rng, out_ref.shape, dtype)
    dh = NAIVE.relu_backward(NAIVE.maxpool2d_backward(dout, pool_cache), relu_cache)
    dx_ref, dw_ref, db_ref = NAIVE.conv2d_backward(dh, conv_cache)
    assert (out_ref == 0).any() and (out_ref > 0).any()  # the ReLU cut some windows

    out, cache = be.conv2d_relu_maxpool2d_forward(*args, 1, padding, pool, pool_stride)
    assert cache[0][-1] == "winograd"
    np.testing.assert_array_equal(out, out_ref.astype(dtype))
    for d in (dout.astype(dtype), channels_last(dout.astype(dtype))):
        dx, dw, db = be.conv2d_relu_maxpool2d_backward(d, cache)
        for got, ref in ((dx, dx_ref), (dw, dw_ref), (db, db_ref)):
            assert_close(got, ref, dtype, tol)
    dx, dw, _ = be.conv2d_relu_maxpool2d_backward(dout.astype(dtype), cache, need_dx=False)
    assert dx is None
    assert_close(dw, dw_ref, dtype, tol)


# ---- the backend's choice -----------------------------------------------------------------------
def test_auto_picks_winograd_where_it_pays():
    be = NumbaBackend(conv_algorithm="auto")
    # cifar_tutorial: the RGB layer stays direct, the next two run F(4x4, 3x3)
    assert be.winograd_tile(3, 32, 3, 3, 1, 30, 30) == 0
    assert be.winograd_tile(32, 64, 3, 3, 1, 13, 13) == 4
    assert be.winograd_tile(64, 64, 3, 3, 1, 4, 4) == 4
    assert be.winograd_tile(64, 64, 3, 3, 1, 2, 2) == 2  # F(2x2) wastes less of a 2 x 2 output
    assert be.winograd_tile(64, 64, 3, 3, 1, 1, 1) == 0  # one pixel: no saving
    assert be.winograd_tile(64, 64, 3, 3, 2, 8, 8) == 0  # stride 2
    assert be.winograd_tile(64, 64, 5, 5, 1, 8, 8) == 0  # 5 x 5
    assert be.winograd_tile(64, 8, 3, 3, 1, 8, 8) == 0  # too few filters for BLAS
    forced = NumbaBackend(conv_algorithm="winograd")
    assert forced.winograd_tile(3, 32, 3, 3, 1, 30, 30) == 4
    assert forced.winograd_tile(64, 64, 3, 3, 1, 1, 1) == 2
    assert forced.winograd_tile(64, 64, 3, 3, 2, 8, 8) == 0
    direct = NumbaBackend(conv_algorithm="direct")
    assert direct.winograd_tile(32, 64, 3, 3, 1, 13, 13) == 0
    assert NumbaParallelBackend().winograd_tile(32, 64, 3, 3, 1, 13, 13) == 0
    for m in WG.TILES:  # the rule's arithmetic: 16 tiles of 36 elements on 13 x 13
        assert WG.multiplications(13, 13, m) == (49 * 16 if m == 2 else 16 * 36) / (9 * 169)


def test_direct_stays_selectable(monkeypatch):
    """``conv_algorithm="direct"`` runs the direct paths (their caches say so), by argument or
    by the environment variable; a wrong value is refused naming it and where it came from."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 32, 15, 15)).astype(np.float32)
    w = rng.standard_normal((64, 32, 3, 3)).astype(np.float32)
    b = np.zeros(64, np.float32)
    assert NumbaBackend("direct").conv2d_forward(x, w, b, 1, VALID)[1][-1] == "nhwc"
    assert NumbaBackend("auto").conv2d_forward(x, w, b, 1, VALID)[1][-1] == "winograd"
    monkeypatch.setenv(numba_backend.CONV_ALGORITHM_ENV, "direct")
    assert NumbaBackend().conv_algorithm == "direct"
    assert NumbaBackend("winograd").conv_algorithm == "winograd"  # the argument wins
    monkeypatch.setenv(numba_backend.CONV_ALGORITHM_ENV, "fast")
    with pytest.raises(ValueError, match=r"CNN_NUMBA_CONV_ALGORITHM.*conv_algorithm='fast'"):
        NumbaBackend()
    with pytest.raises(ValueError, match=r"conv_algorithm=2"):
        NumbaBackend(conv_algorithm=2)
    monkeypatch.delenv(numba_backend.CONV_ALGORITHM_ENV)
    assert NumbaBackend().conv_algorithm == "auto"


# ---- workspaces ---------------------------------------------------------------------------------
def _step(be, x, w, b, ws):
    """A fused conv's forward and backward, as a training step runs it."""
    out, cache = be.conv2d_relu_maxpool2d_forward(x, w, b, 1, VALID, 2, 2, ws=ws)
    return (out, *be.conv2d_relu_maxpool2d_backward(out, cache, ws=ws))


def test_second_step_allocates_nothing():
    """After the first step, the same workspace buffers, and (tracemalloc sees the Numba
    runtime's allocations, which go through Python's allocator) no array allocated."""
    be = winograd(4)
    rng = np.random.default_rng(1)
    x = channels_last(rng.standard_normal((16, 32, 15, 15)).astype(np.float32))
    w = rng.standard_normal((64, 32, 3, 3)).astype(np.float32)
    b = rng.standard_normal(64).astype(np.float32)
    ws = Workspace(be)
    _step(be, x, w, b, ws)
    first = {k: id(v) for k, v in ws._store.items()}
    assert any(k[0].endswith("wino_v") for k in first)
    tracemalloc.start()
    try:
        _step(be, x, w, b, ws)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert {k: id(v) for k, v in ws._store.items()} == first
    # what remains is Python objects (views, tuples), against megabytes of reused buffers
    assert ws.nbytes > 1_000_000
    assert peak < 20_000, peak


def test_model_step_with_and_without_workspace():
    """A training step of a small model whose second conv runs Winograd (auto): with a
    workspace it computes exactly what it computes without one, from the second step on with
    the same buffers; its float64 gradients are the NumPy backend's to 1e-12."""
    from cnn.context import StepContext
    from cnn.layers import layers_from_spec
    from cnn.model import Sequential
    spec = [{"type": "conv2d", "filters": 16, "kernel_size": 3, "padding": "same",
             "activation": "relu"},
            {"type": "conv2d", "filters": 16, "kernel_size": 3, "activation": "relu"},
            {"type": "maxpool2d", "pool_size": 2},
            {"type": "conv2d", "filters": 16, "kernel_size": 3, "padding": "same"},
            {"type": "flatten"},
            {"type": "dense", "units": 3}]
    be = NumbaBackend(conv_algorithm="auto")
    rng = np.random.default_rng(0)
    for dtype in (np.float64, np.float32):
        model = Sequential(layers_from_spec(spec), (16, 10, 10), dtype=dtype, seed=1)
        x = rng.standard_normal((6, 16, 10, 10)).astype(dtype)
        y = rng.integers(0, 3, 6)
        plan = model.plan(be)
        h = x
        tiles = []
        for op in plan:  # which algorithm each conv runs
            layer = op.layers[0]
            h, cache = op.forward({**model.params}, h, StepContext(training=True))
            if layer.type == "conv2d":
                conv_cache = cache if isinstance(cache[-1], str) else cache[0]
                tiles.append(conv_cache[4] if conv_cache[-1] == "winograd" else 0)
        assert tiles == [4, 4, 4]
        ws = Workspace(be)
        ctx = StepContext(training=True, workspace=ws)
        _, _, ref = model.loss_and_grads(x, y, backend=be, ctx=StepContext(training=True))
        ref = {k: np.array(v) for k, v in ref.items()}
        model.loss_and_grads(x, y, backend=be, ctx=ctx)
        first = {k: id(v) for k, v in ws._store.items()}
        _, _, got = model.loss_and_grads(x, y, backend=be, ctx=ctx)
        assert {k: id(v) for k, v in ws._store.items()} == first
        for k in ref:
            np.testing.assert_array_equal(got[k], ref[k], err_msg=k)
        if dtype == np.float64:
            _, _, numpy_grads = model.loss_and_grads(x, y, backend="numpy")
            for k in ref:
                np.testing.assert_allclose(ref[k], numpy_grads[k], rtol=1e-12,
                                           atol=1e-12 * np.abs(numpy_grads[k]).max(),
                                           err_msg=k)

