"""The ops of residual networks (global average pooling, a residual block's sum with its ReLU,
the sum of the branches' input gradients, option A's shortcut) on the NumPy and Numba backends
against the naive loops, values worked out by hand (which pin the loops themselves), and
central finite differences in float64; with a workspace, the same results in reused buffers and
the inputs left unwritten.

Tolerances: float64 1e-12 (the implementations sum in different orders), float32 1e-5, both
relative to the array's scale; finite differences as in tests/test_gradients.py.
"""
from __future__ import annotations

import numpy as np
import pytest

from cnn.backends import get_backend
from cnn.context import Workspace
from test_gradients import assert_grad_close, numeric_grad

NAIVE = get_backend("naive")
BACKENDS = ["numpy", "numba"]
TOL = {np.float64: 1e-12, np.float32: 1e-5}


def close(got, ref, dtype, what=""):
    ref = np.asarray(ref)
    assert got.shape == ref.shape and got.dtype == dtype, what
    tol = TOL[dtype]
    np.testing.assert_allclose(got, ref, rtol=tol, atol=tol * max(float(np.abs(ref).max()), 1e-300),
                               err_msg=what)


def channels_last(a):
    """``a (N, C, H, W)`` as the Numba backend hands activations over: an ``(N, C, H, W)`` view
    of a channels-last buffer."""
    return np.ascontiguousarray(a.transpose(0, 2, 3, 1)).transpose(0, 3, 1, 2)


def inputs(shape, dtype, seed):
    return np.random.default_rng(seed).standard_normal(shape).astype(dtype)


LAYOUTS = [np.ascontiguousarray, channels_last]


# ---- against the naive loops -------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("layout", LAYOUTS, ids=["nchw", "channels-last"])
@pytest.mark.parametrize("shape", [(3, 4, 5, 7), (2, 1, 1, 1), (1, 6, 8, 8)])
def test_globalavgpool2d_vs_naive(backend, dtype, layout, shape):
    be = get_backend(backend)
    x = layout(inputs(shape, dtype, 1))
    dout = inputs(shape[:2], dtype, 2)
    ref, cache = NAIVE.globalavgpool2d_forward(x.astype(np.float64))
    ref_dx = NAIVE.globalavgpool2d_backward(dout.astype(np.float64), cache)
    for ws in (None, Workspace(be)):
        out, c = be.globalavgpool2d_forward(x, ws=ws)
        close(out, ref, dtype, "out")
        close(be.globalavgpool2d_backward(dout, c, ws=ws), ref_dx, dtype, "dx")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("relu", [True, False])
@pytest.mark.parametrize("shape, layouts", [((3, 4, 5, 6), (np.ascontiguousarray, channels_last)),
                                            ((3, 4, 5, 6), (channels_last, channels_last)),
                                            ((5, 7), (np.ascontiguousarray,) * 2)])
def test_residual_add_and_grad_sum_vs_naive(backend, dtype, relu, shape, layouts):
    be = get_backend(backend)
    main, shortcut = (lay(inputs(shape, dtype, s)) for lay, s in zip(layouts, (3, 4)))
    kink = (0,) * (main.ndim - 1) + (slice(0, 2),)
    main[kink] = -shortcut[kink]  # two sums exactly zero: the ReLU's kink
    dout = inputs(shape, dtype, 5)
    ref, cache = NAIVE.residual_add_forward(main.astype(np.float64),
                                            shortcut.astype(np.float64), relu)
    ref_d = NAIVE.residual_add_backward(dout.astype(np.float64), cache)
    other = layouts[1](inputs(shape, dtype, 6))
    ref_sum = NAIVE.residual_grad_sum(dout.astype(np.float64), other.astype(np.float64))
    for ws in (None, Workspace(be)):
        out, c = be.residual_add_forward(main, shortcut, relu, ws=ws)
        close(out, ref, dtype, "sum")
        close(be.residual_add_backward(dout, c, ws=ws), ref_d, dtype, "d")
        close(be.residual_grad_sum(dout, other, ws=ws), ref_sum, dtype, "dx")


PAD_CASES = [((2, 3, 8, 8), 2, 2, 1), ((2, 4, 7, 5), 2, 2, 2), ((1, 2, 6, 6), 3, 0, 1),
             ((2, 3, 5, 5), 1, 1, 2), ((3, 2, 4, 4), 1, 0, 0)]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("layout", LAYOUTS, ids=["nchw", "channels-last"])
@pytest.mark.parametrize("shape, stride, before, after", PAD_CASES)
def test_shortcut_pad_vs_naive(backend, dtype, layout, shape, stride, before, after):
    be = get_backend(backend)
    x = layout(inputs(shape, dtype, 7))
    ref, cache = NAIVE.shortcut_pad_forward(x.astype(np.float64), stride, before, after)
    dout = layout(inputs(ref.shape, dtype, 8))
    ref_dx = NAIVE.shortcut_pad_backward(dout.astype(np.float64), cache)
    ws = Workspace(be)
    for _ in range(2):  # the second time in reused (dirty) buffers
        out, c = be.shortcut_pad_forward(x, stride, before, after, ws=ws)
        close(out, ref, dtype, "out")
        close(be.shortcut_pad_backward(dout, c, ws=ws), ref_dx, dtype, "dx")
        for buf in ws._store.values():
            buf.fill(np.nan)


# ---- by hand (pinning the naive loops) ------------------------------------------------------------
@pytest.mark.parametrize("be", ["naive", "numpy", "numba"])
def test_ops_by_hand(be):
    be = get_backend(be)
    x = np.arange(8, dtype=np.float64).reshape(1, 2, 2, 2)  # channel 0: 0..3, channel 1: 4..7
    out, cache = be.globalavgpool2d_forward(x)
    np.testing.assert_array_equal(out, [[1.5, 5.5]])
    np.testing.assert_array_equal(be.globalavgpool2d_backward(np.array([[4.0, -8.0]]), cache),
                                  [[[[1, 1], [1, 1]], [[-2, -2], [-2, -2]]]])

    main, shortcut = np.array([[1.0, -2.0, 3.0]]), np.array([[-1.0, 1.0, 0.5]])
    out, cache = be.residual_add_forward(main, shortcut, True)
    np.testing.assert_array_equal(out, [[0.0, 0.0, 3.5]])  # an exact zero sum: the kink
    np.testing.assert_array_equal(be.residual_add_backward(np.array([[5.0, 6.0, 7.0]]), cache),
                                  [[0.0, 0.0, 7.0]])
    out, cache = be.residual_add_forward(main, shortcut, False)
    np.testing.assert_array_equal(out, [[0.0, -1.0, 3.5]])
    np.testing.assert_array_equal(be.residual_add_backward(np.array([[5.0, 6.0, 7.0]]), cache),
                                  [[5.0, 6.0, 7.0]])
    np.testing.assert_array_equal(be.residual_grad_sum(main, shortcut), [[0.0, -1.0, 3.5]])

    x = np.arange(9, dtype=np.float64).reshape(1, 1, 3, 3)
    out, cache = be.shortcut_pad_forward(x, 2, 1, 2)  # pixels (0, 0), (0, 2), (2, 0), (2, 2)
    assert out.shape == (1, 4, 2, 2)
    np.testing.assert_array_equal(out[0, 1], [[0, 2], [6, 8]])
    np.testing.assert_array_equal(out[0, [0, 2, 3]], 0)
    dout = np.arange(16, dtype=np.float64).reshape(1, 4, 2, 2)
    np.testing.assert_array_equal(be.shortcut_pad_backward(dout, cache)[0, 0],
                                  [[4, 0, 5], [0, 0, 0], [6, 0, 7]])


# ---- finite differences -------------------------------------------------------------------------
def test_ops_backward_vs_finite_differences():
    """Each op's backward against differencing its forward, for the loss ``sum(out * r)``.
    The sum's inputs keep a margin of 1e-2 from the ReLU's kink (step 1e-4)."""
    be = get_backend("numpy")
    rng = np.random.default_rng(9)
    x = rng.standard_normal((2, 3, 4, 5))
    r = rng.standard_normal((2, 3))
    _, cache = be.globalavgpool2d_forward(x)
    num = numeric_grad(lambda: float(np.sum(be.globalavgpool2d_forward(x)[0] * r)), x, 1e-3)
    assert_grad_close(be.globalavgpool2d_backward(r, cache).ravel(), num, "gap dx")

    main, shortcut = rng.standard_normal((2, 3, 4, 4)), rng.standard_normal((2, 3, 4, 4))
    s = main + shortcut
    main[np.abs(s) < 1e-2] += 0.1  # away from the kink
    r = rng.standard_normal(main.shape)
    for relu in (True, False):
        _, cache = be.residual_add_forward(main, shortcut, relu)
        d = be.residual_add_backward(r, cache)
        for operand, name in ((main, "main"), (shortcut, "shortcut")):
            num = numeric_grad(lambda: float(np.sum(be.residual_add_forward(
                main, shortcut, relu)[0] * r)), operand, 1e-4)
            assert_grad_close(np.asarray(d).ravel(), num, f"add d{name} (relu={relu})")

    x = rng.standard_normal((2, 2, 5, 6))
    r = rng.standard_normal((2, 5, 3, 3))
    _, cache = be.shortcut_pad_forward(x, 2, 1, 2)
    num = numeric_grad(lambda: float(np.sum(be.shortcut_pad_forward(x, 2, 1, 2)[0] * r)), x, 1e-3)
    assert_grad_close(be.shortcut_pad_backward(r, cache).ravel(), num, "pad dx")


# ---- workspaces ---------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
def test_ops_reuse_their_buffers_and_leave_their_inputs_alone(backend):
    """The second call in one workspace allocates nothing; no op writes an input."""
    be = get_backend(backend)
    rng = np.random.default_rng(10)
    x = rng.standard_normal((3, 4, 6, 6))
    y = rng.standard_normal((3, 4, 6, 6))
    g = rng.standard_normal((3, 4))
    dpad = rng.standard_normal((3, 8, 3, 3))
    inputs_before = [a.copy() for a in (x, y, g, dpad)]
    ws = Workspace(be)

    def step():
        _, c = be.globalavgpool2d_forward(x, ws=ws.scope("gap"))
        be.globalavgpool2d_backward(g, c, ws=ws.scope("gap"))
        _, c = be.residual_add_forward(x, y, True, ws=ws.scope("block"))
        d = be.residual_add_backward(y, c, ws=ws.scope("block"))
        be.residual_grad_sum(d, x, ws=ws.scope("block"))
        _, c = be.shortcut_pad_forward(x, 2, 2, 2, ws=ws.scope("pad"))
        be.shortcut_pad_backward(dpad, c, ws=ws.scope("pad"))

    step()
    first = {k: id(v) for k, v in ws._store.items()}
    assert len(first) >= 6
    step()
    assert {k: id(v) for k, v in ws._store.items()} == first
    for a, before in zip((x, y, g, dpad), inputs_before):
        np.testing.assert_array_equal(a, before)

