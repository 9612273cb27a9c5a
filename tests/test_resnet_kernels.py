"""The Numba kernels of the ops residual networks add (issue 20).

Every op, forward and backward, in float32 and float64 on odd shapes, against references
written here with plain NumPy slicing and float64 sums; each array input in both of the numba
backend's layouts, NCHW and a channels-last view (``channels_last``), and in mixed layouts for
the two-operand ops. Outputs must keep the input's dtype and the layout of their first input.
"""
from __future__ import annotations

import numpy as np
import pytest

from cnn.backends import get_backend
from cnn.context import Workspace

NAIVE = get_backend("naive")
BACKENDS = ["numba", "numba_parallel"]
DTYPES = [pytest.param(np.float64, 1e-12, id="float64"),
          pytest.param(np.float32, 1e-5, id="float32")]
LAYOUTS = ["nchw", "channels-last"]


def channels_last(a):
    """``a (N, C, H, W)`` as an (N, C, H, W) view of a channels-last buffer."""
    return np.ascontiguousarray(a.transpose(0, 2, 3, 1)).transpose(0, 3, 1, 2)


def laid_out(a, layout):
    return channels_last(a) if layout == "channels-last" else np.ascontiguousarray(a)


def is_channels_last(a):
    return not a.flags.c_contiguous and a.transpose(0, 2, 3, 1).flags.c_contiguous


def assert_close(got, want, dtype, tol):
    """Shape and dtype, then values relative to the reference's magnitude."""
    assert got.shape == want.shape, (got.shape, want.shape)
    assert got.dtype == dtype, got.dtype
    np.testing.assert_allclose(got, want, rtol=tol, atol=tol * max(1.0, np.abs(want).max()))


def normal(rng, shape, dtype):
    return rng.standard_normal(shape).astype(dtype)


# ---- the block's sum ---------------------------------------------------------------------------
SHAPES = [pytest.param((3, 5, 7, 6), id="4d-odd"), pytest.param((2, 17, 3, 5), id="4d-17ch"),
          pytest.param((5, 11), id="2d")]


def operands(shape, dtype, seed):
    """Two operands whose sum is exactly zero at some entries (the ReLU's kink)."""
    rng = np.random.default_rng(seed)
    a, b = normal(rng, shape, dtype), normal(rng, shape, dtype)
    b.reshape(-1)[::7] = -a.reshape(-1)[::7]
    return a, b


def layouts_of(shape):
    return [(la, lb) for la in LAYOUTS for lb in LAYOUTS] if len(shape) == 4 else [("nchw",) * 2]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype, tol", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("relu", [True, False], ids=["relu", "linear"])
def test_residual_add(backend, dtype, tol, shape, relu):
    """``max(main + shortcut, 0)`` (or the plain sum) and its backward ``dout * (sum > 0)``
    (``dout`` itself without the ReLU), each operand and ``dout`` in either layout."""
    be = get_backend(backend)
    a, b = operands(shape, dtype, 1)
    total = a.astype(np.float64) + b
    assert (total == 0).any()
    want = np.maximum(total, 0) if relu else total
    dout = normal(np.random.default_rng(2), shape, dtype)
    want_d = np.where(total > 0, dout, 0) if relu else dout
    for la, lb in layouts_of(shape):
        main = laid_out(a, la) if len(shape) == 4 else a
        out, cache = be.residual_add_forward(main, laid_out(b, lb) if len(shape) == 4 else b,
                                             relu)
        assert_close(out, want, dtype, tol)
        if len(shape) == 4:
            assert is_channels_last(out) == (la == "channels-last"), (la, lb)
        for ld in layouts_of(shape)[0:: 2 if len(shape) == 4 else 1]:
            d = laid_out(dout, ld[0]) if len(shape) == 4 else dout
            got = be.residual_add_backward(d, cache)
            assert_close(got, want_d, dtype, tol)
            if not relu:
                assert got is d  # the sum passes its gradient on as it is


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype, tol", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_residual_grad_sum(backend, dtype, tol, shape):
    be = get_backend(backend)
    a, b = operands(shape, dtype, 3)
    for la, lb in layouts_of(shape):
        args = (laid_out(a, la), laid_out(b, lb)) if len(shape) == 4 else (a, b)
        dx = be.residual_grad_sum(*args)
        assert_close(dx, a.astype(np.float64) + b, dtype, tol)
        if len(shape) == 4:
            assert is_channels_last(dx) == (la == "channels-last")


def test_residual_ops_refuse_mismatched_operands():
    be = get_backend("numba")
    a = np.zeros((2, 3, 4, 4))
    with pytest.raises(ValueError, match=r"shortcut.shape=\(2, 4, 4, 4\)"):
        be.residual_add_forward(a, np.zeros((2, 4, 4, 4)), True)
    with pytest.raises(ValueError, match="float32"):
        be.residual_grad_sum(a, a.astype(np.float32))
    with pytest.raises(ValueError, match=r"main.shape=\(3, 4, 4\)"):
        be.residual_add_forward(a[0], a[0], False)


# ---- option A's shortcut -----------------------------------------------------------------------
PAD_CASES = [  # (N, C, H, W), stride, channels before, channels after
    pytest.param((2, 3, 7, 5), 2, 2, 1, id="s2-odd-asymmetric"),
    pytest.param((3, 16, 8, 8), 2, 8, 8, id="s2-resnet"),
    pytest.param((2, 4, 6, 7), 1, 0, 3, id="s1-after-only"),
    pytest.param((1, 5, 7, 7), 3, 4, 0, id="s3-before-only"),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype, tol", DTYPES)
@pytest.mark.parametrize("shape, stride, before, after", PAD_CASES)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_shortcut_pad(backend, dtype, tol, shape, stride, before, after, layout):
    """Forward: ``F.pad(x[:, :, ::s, ::s], (0, 0, 0, 0, before, after))``; backward: the
    channels ``before:before + C`` of ``dout`` at the kept pixels, zero at the skipped ones
    (overwriting whatever the workspace buffer held); ``dout`` in either layout."""
    be = get_backend(backend)
    rng = np.random.default_rng(sum(shape) + stride)
    x = normal(rng, shape, dtype)
    n, c, h, w = shape
    want = np.zeros((n, before + c + after, -(-h // stride), -(-w // stride)), dtype)
    want[:, before:before + c] = x[:, :, ::stride, ::stride]
    dout = normal(rng, want.shape, dtype)
    want_dx = np.zeros(shape, dtype)
    want_dx[:, :, ::stride, ::stride] = dout[:, before:before + c]
    ws = Workspace(be)
    for step in range(2):  # the second time, into buffers that hold the first step's values
        out, cache = be.shortcut_pad_forward(laid_out(x, layout), stride, before, after, ws=ws)
        assert_close(out, want, dtype, tol)
        assert is_channels_last(out) == (layout == "channels-last")
        for ld in LAYOUTS:
            dx = be.shortcut_pad_backward(laid_out(dout, ld), cache, ws=ws)
            assert_close(dx, want_dx, dtype, tol)
            assert is_channels_last(dx) == (layout == "channels-last")
        x, dout = x[::-1].copy(), dout[::-1].copy()
        want, want_dx = want[::-1].copy(), want_dx[::-1].copy()


def test_shortcut_pad_refuses_bad_arguments():
    be = get_backend("numba")
    x = np.zeros((1, 2, 4, 4))
    with pytest.raises(ValueError, match="stride=0"):
        be.shortcut_pad_forward(x, 0, 1, 1)
    with pytest.raises(ValueError, match="channels_after=-1"):
        be.shortcut_pad_forward(x, 2, 1, -1)
    with pytest.raises(ValueError, match=r"x.shape=\(2, 4, 4\)"):
        be.shortcut_pad_forward(x[0], 2, 1, 1)


# ---- global average pooling --------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype, tol", DTYPES)
@pytest.mark.parametrize("shape", [(3, 5, 7, 6), (2, 17, 8, 8), (4, 3, 1, 1)],
                         ids=["odd", "17ch", "1x1"])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_globalavgpool2d(backend, dtype, tol, shape, layout):
    """The mean of each channel's image (a float64 sum over the pixels divided by H*W), and
    the backward ``dout / (H*W)`` spread over the image, in the input's layout."""
    be = get_backend(backend)
    rng = np.random.default_rng(sum(shape))
    x = (normal(rng, shape, dtype) + 3).astype(dtype)  # a mean far from 0: relative error
    n, c, h, w = shape
    want = x.astype(np.float64).reshape(n, c, h * w).sum(axis=2) / (h * w)
    dout = normal(rng, (n, c), dtype)
    want_dx = np.repeat(dout.astype(np.float64) / (h * w), h * w).reshape(shape)
    out, cache = be.globalavgpool2d_forward(laid_out(x, layout))
    assert_close(out, want, dtype, tol)
    dx = be.globalavgpool2d_backward(dout, cache)
    assert_close(dx, want_dx, dtype, tol)
    assert is_channels_last(dx) == is_channels_last(laid_out(x, layout))
