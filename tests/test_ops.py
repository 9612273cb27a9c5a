"""The NumPy backend's ops against independent references: the naive loop versions (random
shapes), values computed by hand (tiny cases, which also pin the naive reference itself), and the
SGD formula written out step by step.

Every test asserts shapes (and dtypes) first, then values with explicit tolerances.
"""
from __future__ import annotations

import itertools

import numpy as np
import pytest

from cnn.backends import get_backend
from cnn.layers import Conv2D

NP = get_backend("numpy")
NAIVE = get_backend("naive")

# float64 comparisons: the two implementations sum in different orders
RTOL, ATOL = 1e-12, 1e-12


def conv_out_size(size, k, stride, before, after):
    return (size + before + after - k) // stride + 1


def same_padding(c, h, w, k, stride):
    """The padding a 'same' Conv2D layer computes for this input (built like in a model)."""
    layer = Conv2D(2, kernel_size=k, stride=stride, padding="same")
    layer.build((c, h, w))
    return layer.pads


# ---- convolution against the naive loops -----------------------------------------------------
SHAPES = [  # (N, C, H, W, F): square and non-square, single and several channels
    (2, 3, 7, 7, 4),
    (1, 2, 6, 9, 3),
    (3, 1, 5, 8, 2),
]
KERNELS = [1, 2, 3, 5]
STRIDES = [1, 2]
PADDINGS = ["valid", "symmetric", "asymmetric", "same"]


def _padding(mode, c, h, w, k, stride):
    if mode == "valid":
        return ((0, 0), (0, 0))
    if mode == "symmetric":
        return ((1, 1), (1, 1))
    if mode == "asymmetric":
        return ((0, 1), (1, 0))
    return same_padding(c, h, w, k, stride)


CONV_CASES = [
    pytest.param(shape, k, s, mode, id=f"{'x'.join(map(str, shape))}-k{k}-s{s}-{mode}")
    for shape, k, s, mode in itertools.product(SHAPES, KERNELS, STRIDES, PADDINGS)
]


def _conv_inputs(shape, k, seed, dtype=np.float64):
    n, c, h, w, f = shape
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, c, h, w)).astype(dtype)
    wt = rng.standard_normal((f, c, k, k)).astype(dtype)
    b = rng.standard_normal(f).astype(dtype)
    return x, wt, b


@pytest.mark.parametrize("shape, k, stride, mode", CONV_CASES)
def test_conv_forward_matches_naive(shape, k, stride, mode):
    n, c, h, w, f = shape
    pad = _padding(mode, c, h, w, k, stride)
    (top, bottom), (left, right) = pad
    if h + top + bottom < k or w + left + right < k:
        pytest.fail("test case chosen badly: kernel larger than the padded input")
    x, wt, b = _conv_inputs(shape, k, seed=k * 10 + stride)
    out, _ = NP.conv2d_forward(x, wt, b, stride, pad)
    ref, _ = NAIVE.conv2d_forward(x, wt, b, stride, pad)
    ho = conv_out_size(h, k, stride, top, bottom)
    wo = conv_out_size(w, k, stride, left, right)
    assert out.shape == ref.shape == (n, f, ho, wo)
    assert out.dtype == np.float64
    np.testing.assert_allclose(out, ref, rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("shape, k, stride, mode", CONV_CASES)
def test_conv_backward_matches_naive(shape, k, stride, mode):
    n, c, h, w, f = shape
    pad = _padding(mode, c, h, w, k, stride)
    x, wt, b = _conv_inputs(shape, k, seed=k * 10 + stride + 1)
    out, cache = NP.conv2d_forward(x, wt, b, stride, pad)
    _, ref_cache = NAIVE.conv2d_forward(x, wt, b, stride, pad)
    dout = np.random.default_rng(7).standard_normal(out.shape)
    dx, dw, db = NP.conv2d_backward(dout, cache)
    rdx, rdw, rdb = NAIVE.conv2d_backward(dout, ref_cache)
    assert dx.shape == rdx.shape == x.shape
    assert dw.shape == rdw.shape == wt.shape
    assert db.shape == rdb.shape == b.shape
    np.testing.assert_allclose(dx, rdx, rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(dw, rdw, rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(db, rdb, rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("h, w, k, stride, expected", [
    (7, 7, 3, 1, ((1, 1), (1, 1))),
    (6, 9, 2, 1, ((0, 1), (0, 1))),      # even kernel: the extra pixel goes bottom/right
    (8, 7, 3, 2, ((0, 1), (1, 1))),      # ceil(8/2)=4: total 1 -> (0, 1); ceil(7/2)=4: total 2
    (8, 8, 5, 2, ((1, 2), (1, 2))),      # total 3 -> (1, 2)
    (5, 5, 1, 2, ((0, 0), (0, 0))),
])
def test_same_padding_is_tensorflows(h, w, k, stride, expected):
    # TensorFlow: total = max((ceil(H/s) - 1) * s + K - H, 0), top = total // 2
    assert same_padding(1, h, w, k, stride) == expected


def test_conv_by_hand():
    x = np.arange(1.0, 10.0).reshape(1, 1, 3, 3)          # [[1,2,3],[4,5,6],[7,8,9]]
    w = np.array([[1.0, 2.0], [3.0, 4.0]]).reshape(1, 1, 2, 2)
    b = np.array([0.5])
    expected = np.array([[37.5, 47.5], [67.5, 77.5]]).reshape(1, 1, 2, 2)
    for be in (NP, NAIVE):
        out, cache = be.conv2d_forward(x, w, b, 1, ((0, 0), (0, 0)))
        assert out.shape == (1, 1, 2, 2)
        np.testing.assert_allclose(out, expected, rtol=0, atol=1e-12)
        dx, dw, db = be.conv2d_backward(np.ones((1, 1, 2, 2)), cache)
        assert dx.shape == (1, 1, 3, 3) and dw.shape == (1, 1, 2, 2) and db.shape == (1,)
        # dx[p, q] = sum of the kernel entries that touch (p, q); dw = sum of each window offset
        np.testing.assert_allclose(dx[0, 0], [[1, 3, 2], [4, 10, 6], [3, 7, 4]], rtol=0, atol=1e-12)
        np.testing.assert_allclose(dw[0, 0], [[12, 16], [24, 28]], rtol=0, atol=1e-12)
        np.testing.assert_allclose(db, [4.0], rtol=0, atol=1e-12)


def test_conv_asymmetric_padding_stride2_by_hand():
    # padded with one row on top and one column on the right:
    # [[0,0,0,0],[1,2,3,0],[4,5,6,0],[7,8,9,0]], 2x2 windows at stride 2
    x = np.arange(1.0, 10.0).reshape(1, 1, 3, 3)
    w = np.array([[1.0, 2.0], [3.0, 4.0]]).reshape(1, 1, 2, 2)
    b = np.array([0.5])
    expected = np.array([[11.5, 9.5], [67.5, 33.5]]).reshape(1, 1, 2, 2)
    for be in (NP, NAIVE):
        out, cache = be.conv2d_forward(x, w, b, 2, ((1, 0), (0, 1)))
        assert out.shape == (1, 1, 2, 2)
        np.testing.assert_allclose(out, expected, rtol=0, atol=1e-12)
        dx, _, _ = be.conv2d_backward(np.ones((1, 1, 2, 2)), cache)
        assert dx.shape == (1, 1, 3, 3)
        # each input pixel is in exactly one window; its gradient is the kernel entry over it
        np.testing.assert_allclose(dx[0, 0], [[3, 4, 3], [1, 2, 1], [3, 4, 3]], rtol=0, atol=1e-12)


def test_conv_stride_that_skips_pixels():
    # 6x6 input, 3x3 kernel, stride 2, valid: windows at 0 and 2 only, row/col 5 never used
    rng = np.random.default_rng(3)
    x = rng.standard_normal((2, 2, 6, 6))
    w = rng.standard_normal((3, 2, 3, 3))
    b = rng.standard_normal(3)
    out, cache = NP.conv2d_forward(x, w, b, 2, ((0, 0), (0, 0)))
    assert out.shape == (2, 3, 2, 2)
    dx, _, _ = NP.conv2d_backward(np.ones_like(out), cache)
    assert dx.shape == x.shape
    np.testing.assert_array_equal(dx[:, :, 5, :], 0)
    np.testing.assert_array_equal(dx[:, :, :, 5], 0)
    _, ref_cache = NAIVE.conv2d_forward(x, w, b, 2, ((0, 0), (0, 0)))
    np.testing.assert_allclose(dx, NAIVE.conv2d_backward(np.ones_like(out), ref_cache)[0],
                               rtol=RTOL, atol=ATOL)


# ---- max pooling -----------------------------------------------------------------------------
POOL_CASES = [  # (N, C, H, W, pool, stride)
    pytest.param((2, 3, 6, 6), 2, 2, id="p2s2"),
    pytest.param((2, 2, 7, 9), 3, 2, id="p3s2-overlapping"),
    pytest.param((1, 3, 5, 6), 2, 1, id="p2s1-overlapping"),
    pytest.param((2, 2, 7, 5), 2, 2, id="p2s2-odd-uncovered"),
    pytest.param((1, 2, 8, 7), 3, 3, id="p3s3-uncovered"),
    pytest.param((1, 2, 7, 7), 2, 3, id="p2s3-gaps"),
]


@pytest.mark.parametrize("xshape, pool, stride", POOL_CASES)
def test_maxpool_forward_backward_match_naive(xshape, pool, stride):
    rng = np.random.default_rng(pool * 10 + stride)
    x = rng.standard_normal(xshape)
    out, cache = NP.maxpool2d_forward(x, pool, stride)
    ref, ref_cache = NAIVE.maxpool2d_forward(x, pool, stride)
    n, c, h, w = xshape
    shape = (n, c, (h - pool) // stride + 1, (w - pool) // stride + 1)
    assert out.shape == ref.shape == shape
    np.testing.assert_array_equal(out, ref)  # a max selects, it does not round
    dout = rng.standard_normal(shape)
    dx = NP.maxpool2d_backward(dout, cache)
    rdx = NAIVE.maxpool2d_backward(dout, ref_cache)
    assert dx.shape == rdx.shape == xshape
    np.testing.assert_allclose(dx, rdx, rtol=RTOL, atol=ATOL)
    # the gradient is conserved: every dout value lands on exactly one input pixel
    np.testing.assert_allclose(dx.sum(axis=(2, 3)), dout.sum(axis=(2, 3)), rtol=1e-12, atol=1e-12)


def test_maxpool_by_hand_overlapping():
    x = np.array([[1.0, 5.0, 2.0], [4.0, 3.0, 9.0], [8.0, 0.0, 7.0]]).reshape(1, 1, 3, 3)
    for be in (NP, NAIVE):
        out, cache = be.maxpool2d_forward(x, 2, 1)
        assert out.shape == (1, 1, 2, 2)
        np.testing.assert_array_equal(out[0, 0], [[5, 9], [8, 9]])
        dx = be.maxpool2d_backward(np.ones((1, 1, 2, 2)), cache)
        assert dx.shape == (1, 1, 3, 3)
        # 9 is the max of two windows: its gradients accumulate
        np.testing.assert_array_equal(dx[0, 0], [[0, 1, 0], [0, 0, 2], [1, 0, 0]])


def test_maxpool_by_hand_uncovered_border():
    x = np.array([[1.0, 5.0, 2.0], [4.0, 3.0, 9.0], [8.0, 0.0, 7.0]]).reshape(1, 1, 3, 3)
    for be in (NP, NAIVE):
        out, cache = be.maxpool2d_forward(x, 2, 2)
        assert out.shape == (1, 1, 1, 1)
        assert out[0, 0, 0, 0] == 5.0   # 9 and 8 lie outside the only window
        dx = be.maxpool2d_backward(np.full((1, 1, 1, 1), 3.0), cache)
        np.testing.assert_array_equal(dx[0, 0], [[0, 3, 0], [0, 0, 0], [0, 0, 0]])


def test_maxpool_ties_go_to_first_in_row_major_order():
    x = np.array([[2.0, 1.0, 3.0, 3.0], [2.0, 2.0, 3.0, 3.0]]).reshape(1, 1, 2, 4)
    for be in (NP, NAIVE):
        out, cache = be.maxpool2d_forward(x, 2, 2)
        assert out.shape == (1, 1, 1, 2)
        np.testing.assert_array_equal(out[0, 0], [[2, 3]])
        dx = be.maxpool2d_backward(np.array([[[[1.0, 10.0]]]]), cache)
        np.testing.assert_array_equal(dx[0, 0], [[1, 0, 10, 0], [0, 0, 0, 0]])


# ---- relu ------------------------------------------------------------------------------------
def test_relu_by_hand_with_exact_zeros():
    x = np.array([[-1.5, 0.0, 2.0], [-0.0, 3.0, -1e-300]])
    dout = np.array([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    for be in (NP, NAIVE):
        out, cache = be.relu_forward(x)
        assert out.shape == x.shape
        np.testing.assert_array_equal(out, [[0, 0, 2], [0, 3, 0]])
        dx = be.relu_backward(dout, cache)
        assert dx.shape == x.shape
        # derivative 0 at exactly 0 (and at -0.0)
        np.testing.assert_array_equal(dx, [[0, 0, 3], [0, 5, 0]])


def test_relu_matches_naive_random_4d():
    rng = np.random.default_rng(11)
    x = rng.standard_normal((2, 3, 4, 5))
    x[0, 0, 0, :3] = 0.0
    out, cache = NP.relu_forward(x)
    ref, ref_cache = NAIVE.relu_forward(x)
    assert out.shape == ref.shape == x.shape
    np.testing.assert_array_equal(out, ref)
    np.testing.assert_array_equal(out, np.where(x > 0, x, 0.0))
    dout = rng.standard_normal(x.shape)
    dx = NP.relu_backward(dout, cache)
    assert dx.shape == x.shape
    np.testing.assert_array_equal(dx, NAIVE.relu_backward(dout, ref_cache))
    np.testing.assert_array_equal(dx[0, 0, 0, :3], 0.0)


# ---- dense -----------------------------------------------------------------------------------
def test_dense_by_hand():
    x = np.array([[1.0, 2.0]])
    w = np.array([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    b = np.array([0.1, 0.2, 0.3])
    for be in (NP, NAIVE):
        out, cache = be.dense_forward(x, w, b)
        assert out.shape == (1, 3)
        np.testing.assert_allclose(out, [[9.1, 12.2, 15.3]], rtol=1e-14, atol=0)
        dx, dw, db = be.dense_backward(np.array([[1.0, 0.0, -1.0]]), cache)
        assert dx.shape == (1, 2) and dw.shape == (2, 3) and db.shape == (3,)
        np.testing.assert_allclose(dx, [[-2.0, -2.0]], rtol=0, atol=1e-14)
        np.testing.assert_allclose(dw, [[1, 0, -1], [2, 0, -2]], rtol=0, atol=1e-14)
        np.testing.assert_allclose(db, [1, 0, -1], rtol=0, atol=1e-14)


@pytest.mark.parametrize("n, d, m", [(1, 1, 1), (4, 7, 3), (5, 12, 10)])
def test_dense_matches_naive(n, d, m):
    rng = np.random.default_rng(n * 100 + d)
    x, w, b = rng.standard_normal((n, d)), rng.standard_normal((d, m)), rng.standard_normal(m)
    out, cache = NP.dense_forward(x, w, b)
    ref, ref_cache = NAIVE.dense_forward(x, w, b)
    assert out.shape == ref.shape == (n, m)
    np.testing.assert_allclose(out, ref, rtol=RTOL, atol=ATOL)
    dout = rng.standard_normal((n, m))
    got, want = NP.dense_backward(dout, cache), NAIVE.dense_backward(dout, ref_cache)
    for g, r, shape in zip(got, want, [(n, d), (d, m), (m,)]):
        assert g.shape == r.shape == shape
        np.testing.assert_allclose(g, r, rtol=RTOL, atol=ATOL)


# ---- need_dx=False ---------------------------------------------------------------------------
@pytest.mark.parametrize("be", [NP, NAIVE], ids=["numpy", "naive"])
def test_need_dx_false_gives_none(be):
    rng = np.random.default_rng(5)
    x, w, b = rng.standard_normal((2, 2, 5, 5)), rng.standard_normal((3, 2, 3, 3)), rng.standard_normal(3)
    out, cache = be.conv2d_forward(x, w, b, 1, ((1, 1), (1, 1)))
    dout = rng.standard_normal(out.shape)
    dx, dw, db = be.conv2d_backward(dout, cache, need_dx=False)
    assert dx is None
    assert dw.shape == w.shape and db.shape == b.shape
    _, dw_full, db_full = be.conv2d_backward(dout, cache, need_dx=True)
    np.testing.assert_allclose(dw, dw_full, rtol=1e-14, atol=1e-14)
    np.testing.assert_allclose(db, db_full, rtol=1e-14, atol=1e-14)

    xd, wd, bd = rng.standard_normal((3, 4)), rng.standard_normal((4, 2)), rng.standard_normal(2)
    out, cache = be.dense_forward(xd, wd, bd)
    dx, dw, db = be.dense_backward(np.ones_like(out), cache, need_dx=False)
    assert dx is None
    assert dw.shape == wd.shape and db.shape == bd.shape


# ---- dtypes ----------------------------------------------------------------------------------
@pytest.mark.parametrize("be", [NP, NAIVE], ids=["numpy", "naive"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_every_op_keeps_dtype(be, dtype):
    rng = np.random.default_rng(2)
    x = rng.standard_normal((2, 2, 6, 5)).astype(dtype)
    w = rng.standard_normal((3, 2, 3, 3)).astype(dtype)
    b = rng.standard_normal(3).astype(dtype)

    out, cache = be.conv2d_forward(x, w, b, 2, ((0, 1), (1, 1)))
    assert out.dtype == dtype
    grads = be.conv2d_backward(np.ones_like(out), cache)
    assert [g.dtype for g in grads] == [dtype] * 3

    p, pcache = be.maxpool2d_forward(x, 2, 2)
    assert p.dtype == dtype
    assert be.maxpool2d_backward(np.ones_like(p), pcache).dtype == dtype

    r, rcache = be.relu_forward(x)
    assert r.dtype == dtype
    assert be.relu_backward(np.ones_like(r), rcache).dtype == dtype

    xd = x.reshape(2, -1)
    wd = rng.standard_normal((xd.shape[1], 4)).astype(dtype)
    bd = rng.standard_normal(4).astype(dtype)
    d, dcache = be.dense_forward(xd, wd, bd)
    assert d.dtype == dtype
    assert [g.dtype for g in be.dense_backward(np.ones_like(d), dcache)] == [dtype] * 3

    loss, dlogits, correct = be.softmax_cross_entropy(d, np.array([0, 3]))
    assert loss.dtype == dtype and dlogits.dtype == dtype
    assert np.issubdtype(np.asarray(correct).dtype, np.integer)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_float32_close_to_float64(dtype):
    """The float32 path computes the same numbers as float64, to float32 rounding."""
    rng = np.random.default_rng(4)
    x, w, b = rng.standard_normal((2, 3, 6, 6)), rng.standard_normal((4, 3, 3, 3)), rng.standard_normal(4)
    ref, _ = NAIVE.conv2d_forward(x, w, b, 1, ((1, 1), (1, 1)))
    out, _ = NP.conv2d_forward(x.astype(dtype), w.astype(dtype), b.astype(dtype), 1, ((1, 1), (1, 1)))
    assert out.shape == ref.shape and out.dtype == dtype
    tol = 1e-5 if dtype == np.float32 else 1e-12
    np.testing.assert_allclose(out, ref, rtol=tol, atol=tol)


# ---- SGD (cnn.optim over the backend's element-wise primitives) ------------------------------
def _sgd_steps(be, w, v, grads, lr, m):
    """``SGD(lr, momentum=m)`` applied to ``w`` (velocity ``v``) for each gradient."""
    from cnn.optim import SGD
    opt = SGD(lr=lr, momentum=m)
    slots = {"velocity": v} if m else {}
    for step, g in enumerate(grads, 1):
        opt.update_step(w, g, slots, lr, step, be)


GRADS = [np.array([0.5, -1.0, 2.0]), np.array([-0.25, 0.5, 1.0]), np.array([1.0, 0.0, -3.0])]


@pytest.mark.parametrize("be", [NP, NAIVE], ids=["numpy", "naive"])
def test_sgd_plain_three_steps_by_hand(be):
    w = np.array([1.0, -2.0, 0.5])
    _sgd_steps(be, w, None, GRADS, 0.1, 0.0)
    # w - 0.1 * (g1 + g2 + g3)
    expected = np.array([1.0 - 0.1 * (0.5 - 0.25 + 1.0),
                         -2.0 - 0.1 * (-1.0 + 0.5 + 0.0),
                         0.5 - 0.1 * (2.0 + 1.0 - 3.0)])
    assert w.shape == (3,)
    np.testing.assert_allclose(w, expected, rtol=0, atol=1e-15)
    np.testing.assert_allclose(w, [0.875, -1.95, 0.5], rtol=0, atol=1e-15)


@pytest.mark.parametrize("be", [NP, NAIVE], ids=["numpy", "naive"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_sgd_momentum_three_steps_by_hand(be, dtype):
    lr, m = 0.1, 0.9
    w = np.array([1.0, -2.0, 0.5], dtype=dtype)
    v = np.zeros(3, dtype=dtype)
    _sgd_steps(be, w, v, [g.astype(dtype) for g in GRADS], lr, m)
    assert w.dtype == dtype and v.dtype == dtype
    # v1 = -lr g1; v2 = m v1 - lr g2; v3 = m v2 - lr g3; w3 = w0 + v1 + v2 + v3
    g1, g2, g3 = GRADS
    v1 = -lr * g1
    v2 = m * v1 - lr * g2
    v3 = m * v2 - lr * g3
    tol = 1e-6 if dtype == np.float32 else 1e-15
    np.testing.assert_allclose(v, v3, rtol=0, atol=tol)
    np.testing.assert_allclose(w, np.array([1.0, -2.0, 0.5]) + v1 + v2 + v3, rtol=0, atol=tol)
    # the same numbers, worked out on paper for the first entry:
    # v1 = -0.05, v2 = -0.045 + 0.025 = -0.02, v3 = -0.018 - 0.1 = -0.118
    np.testing.assert_allclose(v[0], -0.118, rtol=0, atol=tol)
    np.testing.assert_allclose(w[0], 1.0 - 0.05 - 0.02 - 0.118, rtol=0, atol=tol)
