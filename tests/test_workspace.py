"""The workspace contract of the ops (``ws=``, see :mod:`cnn.backends.base`): with a workspace a
training step computes exactly what it computes without one, and from the second step on it
allocates no new buffers (the same arrays are reused) and, on the NumPy backend, next to no
memory at all. Plus the ``numba`` backend's BLAS path over several chunks against the naive
loops."""
from __future__ import annotations

import tracemalloc

import numpy as np
import pytest

from cnn.backends import get_backend
from cnn.backends.numba import backend as numba_backend
from cnn.context import StepContext, Workspace
from cnn.model import Sequential
from cnn.layers import layers_from_spec

SPEC = [  # every op of the contract, padding and the BLAS path of the numba backend included
    {"type": "conv2d", "filters": 16, "kernel_size": 3, "padding": "same", "activation": "relu"},
    {"type": "maxpool2d", "pool_size": 2},
    {"type": "conv2d", "filters": 4, "kernel_size": 3, "activation": "relu"},
    {"type": "flatten"},
    {"type": "dense", "units": 8, "activation": "relu"},
    {"type": "dense", "units": 3},
]
CPU_BACKENDS = ["numpy", "naive", "numba", "numba_parallel"]


def _model(dtype):
    return Sequential(layers_from_spec(SPEC), (2, 8, 8), dtype=dtype, seed=1)


def _data(n, dtype, seed=0):
    rng = np.random.default_rng(seed)
    return rng.standard_normal((n, 2, 8, 8)).astype(dtype), rng.integers(0, 3, n)


def traced_peak(call) -> int:
    """Peak bytes NumPy and Python allocate during ``call()`` (tracemalloc)."""
    tracemalloc.start()
    try:
        call()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def _copy(result):
    loss, correct, grads = result
    return float(loss), int(correct), {k: np.array(v, copy=True) for k, v in grads.items()}


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_workspace_gives_the_same_step(backend, dtype):
    be = get_backend(backend)
    model = _model(dtype)
    ctx = StepContext(training=True, workspace=Workspace(be))
    for step, n in enumerate((6, 6, 4, 6)):  # a smaller last batch gets buffers of its own
        x, y = _data(n, dtype, seed=step)
        ref = _copy(model.loss_and_grads(x, y, backend=be, ctx=StepContext(training=True)))
        got = _copy(model.loss_and_grads(x, y, backend=be, ctx=ctx))
        assert got[0] == ref[0] and got[1] == ref[1]
        for k in ref[2]:
            np.testing.assert_array_equal(got[2][k], ref[2][k], err_msg=f"{backend} {k}")


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_second_step_allocates_no_buffers(backend):
    be = get_backend(backend)
    model = _model(np.float32)
    ws = Workspace(be)
    ctx = StepContext(training=True, workspace=ws)
    x, y = _data(6, np.float32)
    model.loss_and_grads(x, y, backend=be, ctx=ctx)
    first = {k: id(v) for k, v in ws._store.items()}
    assert backend == "naive" or len(first) > 0
    model.loss_and_grads(x, y, backend=be, ctx=ctx)
    assert {k: id(v) for k, v in ws._store.items()} == first


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_a_smaller_batch_takes_the_first_rows_of_the_larger_ones_buffers(backend):
    """The last, smaller batch of an epoch (or a smaller shard) allocates nothing: its
    buffers are the first rows of those of the full batch, and its step computes what a step
    without a workspace computes (test_workspace_gives_the_same_step checks the values); a
    larger batch after a smaller one gets buffers of its own."""
    be = get_backend(backend)
    model = _model(np.float32)
    ws = Workspace(be)
    ctx = StepContext(training=True, workspace=ws)
    model.loss_and_grads(*_data(6, np.float32), backend=be, ctx=ctx)
    full = {k: id(v) for k, v in ws._store.items()}
    model.loss_and_grads(*_data(4, np.float32, seed=1), backend=be, ctx=ctx)
    assert {k: id(v) for k, v in ws._store.items()} == full
    model.loss_and_grads(*_data(8, np.float32, seed=2), backend=be, ctx=ctx)
    assert backend == "naive" or len(ws._store) > len(full)
    rows = Workspace(be).scope("layer")
    big = rows.buffer("out", (6, 3, 2), np.float32)
    small = rows.buffer("out", (4, 3, 2), np.float32)
    assert small.shape == (4, 3, 2) and np.shares_memory(small, big)
    assert small.flags.c_contiguous
    assert not np.shares_memory(rows.buffer("out", (4, 3, 5), np.float32), big)
    assert not np.shares_memory(rows.buffer("out", (4, 3, 2), np.float64), big)


def test_numpy_step_allocates_next_to_nothing():
    """tracemalloc sees NumPy's allocations: after the first step, a step of a conv net on the
    NumPy backend allocates (at its peak) a small fraction of the workspace it reuses."""
    be = get_backend("numpy")
    model = _model(np.float32)
    ws = Workspace(be)
    ctx = StepContext(training=True, workspace=ws)
    x, y = _data(64, np.float32)
    model.loss_and_grads(x, y, backend=be, ctx=ctx)
    peak = traced_peak(lambda: model.loss_and_grads(x, y, backend=be, ctx=ctx))
    # what remains is of constant size (NumPy's ufunc iterator buffers, the loss's (N, K)
    # float64 temporaries): about 70 kB here, against 2 MB of reused buffers
    assert ws.nbytes > 1_000_000
    assert peak < 0.05 * ws.nbytes, (peak, ws.nbytes)


@pytest.mark.parametrize("dtype, tol", [(np.float64, 1e-12), (np.float32, 1e-5)])
@pytest.mark.parametrize("padding, stride", [(((0, 0), (0, 0)), 1), (((1, 2), (0, 1)), 2)])
@pytest.mark.parametrize("c", [3, numba_backend._NHWC_MIN_CHANNELS + 1],
                         ids=["channels-first", "channels-last"])
def test_numba_blas_path_over_several_chunks(monkeypatch, dtype, tol, padding, stride, c):
    """The BLAS path (im2col/col2im in Numba, GEMMs in BLAS; patches channels-first for few
    input channels, channels-last for many) with chunks of 2 images and a shorter last chunk,
    against the naive loops."""
    be = get_backend("numba")
    monkeypatch.setattr(be, "conv_algorithm", "direct")  # Winograd: tests/test_winograd.py
    naive = get_backend("naive")
    rng = np.random.default_rng(3)
    n, h, w, f, k = 7, 9, 8, 17, 3
    assert be._use_blas(f, c * k * k)
    x = rng.standard_normal((n, c, h, w)).astype(dtype)
    wt = rng.standard_normal((f, c, k, k)).astype(dtype)
    b = rng.standard_normal(f).astype(dtype)
    out_ref, cache_ref = naive.conv2d_forward(x.astype(np.float64), wt.astype(np.float64),
                                              b.astype(np.float64), stride, padding)
    dout = rng.standard_normal(out_ref.shape).astype(dtype)
    dx_ref, dw_ref, db_ref = naive.conv2d_backward(dout.astype(np.float64), cache_ref)
    ho, wo = out_ref.shape[2:]
    per_image = (c * k * k + f) * ho * wo * np.dtype(dtype).itemsize
    monkeypatch.setattr(numba_backend, "_CHUNK_BYTES", 2 * per_image)
    monkeypatch.setattr(numba_backend, "_NHWC_CHUNK_BYTES", 2 * per_image)
    assert be._blas_chunk(n, ho * wo, c * k * k, f, np.dtype(dtype).itemsize) == 2
    for ws in (None, Workspace(be)):
        out, cache = be.conv2d_forward(x, wt, b, stride, padding, ws=ws)
        dx, dw, db = be.conv2d_backward(dout, cache, ws=ws)
        for got, ref in ((out, out_ref), (dx, dx_ref), (dw, dw_ref), (db, db_ref)):
            assert got.dtype == dtype and got.shape == ref.shape
            np.testing.assert_allclose(got, ref, rtol=tol, atol=tol * np.abs(ref).max())
