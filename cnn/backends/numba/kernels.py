"""Numba CPU kernels behind :mod:`cnn.backends.numba.backend`.

Every kernel is ``@njit(nogil=True, cache=True, fastmath=False)``: it releases the GIL, so the
data-parallel thread strategy runs one kernel per thread truly in parallel, and keeps IEEE
semantics (no reassociation, no FMA contraction: allowing contraction alone, ``fastmath=
{"contract"}``, makes the GEMM faster but changes its rounding). Kernels write into arrays the
caller allocates. The public kernels come in two families with identical signatures:

- ``conv2d_forward``, ``maxpool2d_forward``, ``relu_forward``, ...: sequential, one core;
- ``conv2d_forward_par``, ...: ``parallel=True``, ``prange`` over chunks of images (conv),
  image planes (pooling) or elements (ReLU); each body is one call of the sequential kernel
  (or its per-plane helper), so both families compute the same thing.

Convolution is im2col + GEMM, chunk by chunk: a chunk of ``nb`` images is unrolled into
``cols (C*KH*KW, nb*Ho*Wo)`` (zero padding handled by index ranges, never materialised) and
multiplied by the weights with :func:`gemm`, a register-blocked GEMM whose inner loop runs
along the long ``nb*Ho*Wo`` axis. A direct loop nest (4 filters per pass, inner loop along an
output row, same index tricks) was slower on every reference layer, and far slower on the
deeper CIFAR layers, whose output rows are too short to vectorise well. Chunks keep the
working set in cache and are ``prange``'s unit of work. In the backward pass the bias
gradient rides along in the weight-gradient GEMM as an extra row of ones in ``cols``.

Why the index code looks the way it does:

- inner loops run along the last, contiguous axis and update several output rows from values
  held in registers, so LLVM's loop vectoriser turns them into AVX loads/stores;
- Numba emits negative-index wraparound code for *signed* indices unless LLVM can prove them
  non-negative (it can for ``range(n)`` counters, not for ``base + j``); that code defeats the
  vectoriser ("unsafe indirect dependence"). Hot copy loops therefore index with ``np.uint64``
  values, for which Numba emits no wraparound, and im2col vectorises. Never mix ``uint64`` and
  ``int64`` in one expression: Numba would promote the result to float64.

Arrays must be C-contiguous, integers are Python ints (int64): that keeps the number of
compiled specialisations at one per kernel and dtype (float32, float64).
"""
from __future__ import annotations

import numpy as np
from numba import njit, prange

_JIT = dict(nogil=True, cache=True, fastmath=False)
_PJIT = dict(_JIT, parallel=True)

#: partial sums per dot product in :func:`gemm_nt`: two AVX registers of float32
_LANES = 16
#: weight gradients of layers with at most this many filters use :func:`gemm_nt`, wider ones
#: :func:`gemm`: on the reference layers the dot-product form wins while the filters are too
#: few to fill :func:`gemm`'s vectorised rows, and loses once they are many
_NT_MAX_FILTERS = 32


# ---- GEMM ------------------------------------------------------------------------------------
@njit(**_JIT)
def gemm(a, b, c):
    """``c += a @ b`` for C-contiguous ``a (M, K)``, ``b (K, N)``, ``c (M, N)``.

    4 x 4 register block: the 16 entries ``a[i:i+4, k:k+4]`` stay in registers while the inner
    loop streams 4 rows of ``b`` and 4 rows of ``c`` along N. Each ``c`` element loaded and
    stored absorbs 4 multiply-adds, and the loop over the contiguous N axis vectorises.
    """
    md, kd = a.shape
    nd = b.shape[1]
    k4 = kd - kd % 4
    i = 0
    while i + 4 <= md:
        for k in range(0, k4, 4):
            a00, a01, a02, a03 = a[i, k], a[i, k + 1], a[i, k + 2], a[i, k + 3]
            a10, a11, a12, a13 = a[i + 1, k], a[i + 1, k + 1], a[i + 1, k + 2], a[i + 1, k + 3]
            a20, a21, a22, a23 = a[i + 2, k], a[i + 2, k + 1], a[i + 2, k + 2], a[i + 2, k + 3]
            a30, a31, a32, a33 = a[i + 3, k], a[i + 3, k + 1], a[i + 3, k + 2], a[i + 3, k + 3]
            for j in range(nd):
                b0, b1, b2, b3 = b[k, j], b[k + 1, j], b[k + 2, j], b[k + 3, j]
                c[i, j] += a00 * b0 + a01 * b1 + a02 * b2 + a03 * b3
                c[i + 1, j] += a10 * b0 + a11 * b1 + a12 * b2 + a13 * b3
                c[i + 2, j] += a20 * b0 + a21 * b1 + a22 * b2 + a23 * b3
                c[i + 3, j] += a30 * b0 + a31 * b1 + a32 * b2 + a33 * b3
        for k in range(k4, kd):
            a0, a1, a2, a3 = a[i, k], a[i + 1, k], a[i + 2, k], a[i + 3, k]
            for j in range(nd):
                bv = b[k, j]
                c[i, j] += a0 * bv
                c[i + 1, j] += a1 * bv
                c[i + 2, j] += a2 * bv
                c[i + 3, j] += a3 * bv
        i += 4
    while i < md:  # the last M % 4 rows, one at a time
        for k in range(0, k4, 4):
            a0, a1, a2, a3 = a[i, k], a[i, k + 1], a[i, k + 2], a[i, k + 3]
            for j in range(nd):
                c[i, j] += a0 * b[k, j] + a1 * b[k + 1, j] + a2 * b[k + 2, j] + a3 * b[k + 3, j]
        for k in range(k4, kd):
            a0 = a[i, k]
            for j in range(nd):
                c[i, j] += a0 * b[k, j]
        i += 1


@njit(**_JIT)
def gemm_nt(a, b, c):
    """``c += a @ b.T`` for C-contiguous ``a (M, Q)``, ``b (N, Q)``, ``c (M, N)``.

    For weight gradients with few filters (small N): both operands run along the long Q axis
    (images x output pixels), and :func:`gemm`'s inner loop along N would be one or two
    vectors long. Without fastmath LLVM may not reorder a sum, so each dot product is split by
    hand into ``_LANES`` interleaved partial sums held in a small array; the loop over the
    lanes then vectorises. A 2 x 4 block of outputs shares every loaded slice of ``a`` and
    ``b``, and each partial sum takes two products per load and store of the array, which
    halves the loads and stores of one product each.
    """
    m, q = a.shape
    n = b.shape[0]
    step = 2 * _LANES
    qm = q - q % step
    acc = np.empty((8, _LANES), dtype=c.dtype)
    for i in range(0, m, 2):
        for j in range(0, n, 4):
            acc[:] = 0
            mi, nj = min(2, m - i), min(4, n - j)
            if mi == 2 and nj == 4:
                for q0 in range(0, qm, step):
                    for ln in range(_LANES):
                        p, r = q0 + ln, q0 + _LANES + ln
                        a0, a1, a0r, a1r = a[i, p], a[i + 1, p], a[i, r], a[i + 1, r]
                        b0, b1, b2, b3 = b[j, p], b[j + 1, p], b[j + 2, p], b[j + 3, p]
                        b0r, b1r, b2r, b3r = b[j, r], b[j + 1, r], b[j + 2, r], b[j + 3, r]
                        acc[0, ln] += a0 * b0 + a0r * b0r
                        acc[1, ln] += a0 * b1 + a0r * b1r
                        acc[2, ln] += a0 * b2 + a0r * b2r
                        acc[3, ln] += a0 * b3 + a0r * b3r
                        acc[4, ln] += a1 * b0 + a1r * b0r
                        acc[5, ln] += a1 * b1 + a1r * b1r
                        acc[6, ln] += a1 * b2 + a1r * b2r
                        acc[7, ln] += a1 * b3 + a1r * b3r
            else:  # edge blocks, one output at a time
                for r in range(mi):
                    for s in range(nj):
                        for q0 in range(0, qm, _LANES):
                            for ln in range(_LANES):
                                acc[4 * r + s, ln] += a[i + r, q0 + ln] * b[j + s, q0 + ln]
            for r in range(mi):
                for s in range(nj):
                    total = acc[4 * r + s, 0]
                    for ln in range(1, _LANES):
                        total += acc[4 * r + s, ln]
                    for t in range(qm, q):
                        total += a[i + r, t] * b[j + s, t]
                    c[i + r, j + s] += total


# ---- im2col / col2im ---------------------------------------------------------------------------
@njit(**_JIT)
def _valid_cols(off, stride, w, wo):
    """``[j_lo, j_hi)``: output columns ``j < wo`` with ``0 <= j*stride + off < w``."""
    j_lo = (stride - 1 - off) // stride if off < 0 else 0
    j_hi = min(wo, (w - 1 - off) // stride + 1) if w - 1 - off >= 0 else 0
    return j_lo, max(j_lo, j_hi)


@njit(**_JIT)
def _im2col(x, n0, n1, kh, kw, stride, top, left, ho, wo, cols):
    """Unroll the zero-padded patches of images ``n0:n1`` of ``x (N, C, H, W)`` into ``cols``.

    ``cols[(c*KH + di)*KW + dj, (n - n0)*Ho*Wo + i*Wo + j] = x_pad[n, c, i*stride + di,
    j*stride + dj]`` for rows ``< C*KH*KW`` (further rows of ``cols`` are left alone). Padding
    is an index range: the padded image is never built.
    """
    c_dim, h, w = x.shape[1], x.shape[2], x.shape[3]
    p = ho * wo
    ustride = np.uint64(stride)
    for c in range(c_dim):
        for di in range(kh):
            for dj in range(kw):
                r = (c * kh + di) * kw + dj
                off = dj - left
                j_lo, j_hi = _valid_cols(off, stride, w, wo)
                for n in range(n0, n1):
                    for i in range(ho):
                        q0 = (n - n0) * p + i * wo
                        y = i * stride + di - top
                        lo, hi = (j_lo, j_hi) if 0 <= y < h else (0, 0)
                        for j in range(lo):
                            cols[r, q0 + j] = 0
                        uq, ux = np.uint64(q0 + lo), np.uint64(lo * stride + off)
                        for j in range(np.uint64(hi - lo)):
                            cols[r, uq + j] = x[n, c, y, ux + j * ustride]
                        for j in range(hi, wo):
                            cols[r, q0 + j] = 0


@njit(**_JIT)
def _col2im(dcols, n0, n1, kh, kw, stride, top, left, ho, wo, dx):
    """Adjoint of :func:`_im2col`: add ``dcols`` back into ``dx[n0:n1]`` (padding dropped)."""
    c_dim, h, w = dx.shape[1], dx.shape[2], dx.shape[3]
    p = ho * wo
    ustride = np.uint64(stride)
    for c in range(c_dim):
        for di in range(kh):
            for dj in range(kw):
                r = (c * kh + di) * kw + dj
                off = dj - left
                j_lo, j_hi = _valid_cols(off, stride, w, wo)
                for n in range(n0, n1):
                    for i in range(ho):
                        y = i * stride + di - top
                        if y < 0 or y >= h:
                            continue
                        uq = np.uint64((n - n0) * p + i * wo + j_lo)
                        ux = np.uint64(j_lo * stride + off)
                        for j in range(np.uint64(j_hi - j_lo)):
                            dx[n, c, y, ux + j * ustride] += dcols[r, uq + j]


@njit(**_JIT)
def _gather_chunk(a3, n0, n1, out):
    """``out (R, nb*P) = a3[n0:n1] (nb, R, P)`` with the images side by side along columns."""
    rows, p = a3.shape[1], a3.shape[2]
    for n in range(n0, n1):
        uq = np.uint64((n - n0) * p)
        for r in range(rows):
            for s in range(np.uint64(p)):
                out[r, uq + s] = a3[n, r, s]


@njit(**_JIT)
def im2col(x, n0, n1, kh, kw, stride, top, left, ho, wo, cols):
    """:func:`_im2col` as a public kernel: the BLAS path of the ``numba`` backend calls it from
    Python, chunk by chunk, with ``cols (C*KH*KW, nb*Ho*Wo)`` from the layer's workspace."""
    _im2col(x, n0, n1, kh, kw, stride, top, left, ho, wo, cols)


@njit(**_JIT)
def col2im(dcols, n0, n1, kh, kw, stride, top, left, ho, wo, dx):
    """``dx[n0:n1] = col2im(dcols)``: zeros, then :func:`_col2im` (padding dropped)."""
    for n in range(n0, n1):
        for c in range(dx.shape[1]):
            for y in range(dx.shape[2]):
                for xc in range(dx.shape[3]):
                    dx[n, c, y, xc] = 0
    _col2im(dcols, n0, n1, kh, kw, stride, top, left, ho, wo, dx)


@njit(**_JIT)
def im2col_images(x, n0, n1, kh, kw, stride, top, left, ho, wo, cols3):
    """Per-image patches: ``cols3[n] (C*KH*KW + 1, Ho*Wo)`` for ``n0 <= n < n1`` as in
    :func:`_im2col`, the last row ones (the bias column of the weights meets it in the
    forward GEMM, and the bias gradient comes out of the weight-gradient GEMM)."""
    last = cols3.shape[1] - 1
    one = cols3.dtype.type(1)
    for n in range(n0, n1):
        _im2col(x, n, n + 1, kh, kw, stride, top, left, ho, wo, cols3[n])
        for s in range(cols3.shape[2]):
            cols3[n, last, s] = one


@njit(**_JIT)
def col2im_images(dcols3, n0, n1, kh, kw, stride, top, left, ho, wo, dx):
    """Adjoint of :func:`im2col_images` (without the ones row) for images ``n0:n1``:
    ``dx[n] = col2im(dcols3[n - n0])``, zeros first."""
    for n in range(n0, n1):
        for c in range(dx.shape[1]):
            for y in range(dx.shape[2]):
                for xc in range(dx.shape[3]):
                    dx[n, c, y, xc] = 0
        _col2im(dcols3[n - n0], n, n + 1, kh, kw, stride, top, left, ho, wo, dx)


@njit(**_JIT)
def nhwc_to_nchw(src, dst):
    """``dst (N, C, H, W)`` = the channels-last ``src (N, H, W, C)``."""
    nimg, h, w, c_dim = src.shape
    for m in range(nimg):
        for c in range(c_dim):
            for y in range(h):
                for xc in range(w):
                    dst[m, c, y, xc] = src[m, y, xc, c]


# ---- channels-last layout (the BLAS path) ------------------------------------------------------
# Conv layers on the BLAS path keep their activations channels-last, (N, H, W, C) buffers that
# the backend hands out as (N, C, H, W) views (see "Layout" in numba/backend.py). A patch row is
# then KH runs of KW*C contiguous values (96 or 192 floats on CIFAR conv2/conv3, 9 on conv1)
# instead of C*KH*KW*Ho runs of Wo values, the GEMM ``patches @ w`` writes its result straight
# into the next layer's (N*Ho*Wo, F) channels-last buffer, and no transpose or scatter pass
# runs between layers. Pooling and ReLU run along the contiguous channel axis.
@njit(**_JIT)
def nchw_to_nhwc_pad(x, n0, n1, top, left, xt):
    """``xt (nb, Hp, Wp, C)``: images ``n0:n1`` of ``x (N, C, H, W)`` channels-last, zero
    padded by ``top``/``left`` (bottom/right: whatever ``Hp``/``Wp`` leave)."""
    c_dim, h, w = x.shape[1], x.shape[2], x.shape[3]
    hp, wp = xt.shape[1], xt.shape[2]
    zero = xt.dtype.type(0)
    uc = np.uint64(c_dim)
    # the channel loop innermost: contiguous writes, reads from the C planes of one image
    # (L1-resident on the layers this serves), faster than the planes outermost, whose
    # writes stride by C
    for n in range(n0, n1):
        m = n - n0
        for y in range(hp):
            for xc in range(wp):
                if y < top or y >= top + h or xc < left or xc >= left + w:
                    for c in range(uc):
                        xt[m, y, xc, c] = zero
                else:
                    for c in range(uc):
                        xt[m, y, xc, c] = x[n, c, y - top, xc - left]


@njit(**_JIT)
def nhwc_pad(xs, n0, n1, top, left, xt):
    """``xt (nb, Hp, Wp, C)``: images ``n0:n1`` of the channels-last ``xs (N, H, W, C)``, zero
    padded by ``top``/``left`` (bottom/right: whatever ``Hp``/``Wp`` leave)."""
    h, w, c_dim = xs.shape[1], xs.shape[2], xs.shape[3]
    hp, wp = xt.shape[1], xt.shape[2]
    zero = xt.dtype.type(0)
    uc = np.uint64(c_dim)
    for n in range(n0, n1):
        m = n - n0
        for y in range(hp):
            for xc in range(wp):
                if y < top or y >= top + h or xc < left or xc >= left + w:
                    for c in range(uc):
                        xt[m, y, xc, c] = zero
                else:
                    for c in range(uc):
                        xt[m, y, xc, c] = xs[n, y - top, xc - left, c]


@njit(**_JIT)
def im2col_nhwc(xt, kh, kw, stride, ho, wo, cols):
    """``cols (nb*Ho*Wo, KH*KW*C + 1)``: row ``(m*Ho + i)*Wo + j`` holds the patch of output
    pixel ``(i, j)`` of image ``m`` of ``xt (nb, Hp, Wp, C)`` (already padded), in ``(di, dj,
    c)`` order, then a one (it meets the bias row of the weights in the forward GEMM and gives
    the bias gradient in the weight-gradient GEMM). For each ``di`` the ``KW*C`` values are one
    contiguous run of ``xt``, whatever the stride."""
    nb, hp, wp, c_dim = xt.shape
    run = kw * c_dim
    kc = kh * run
    one = cols.dtype.type(1)
    x3 = xt.reshape(nb, hp, wp * c_dim)
    urun = np.uint64(run)
    for m in range(nb):
        for i in range(ho):
            for j in range(wo):
                row = (m * ho + i) * wo + j
                x0 = np.uint64(j * stride * c_dim)
                for di in range(kh):
                    y = i * stride + di
                    base = np.uint64(di * run)
                    for t in range(urun):
                        cols[row, base + t] = x3[m, y, x0 + t]
                cols[row, kc] = one


@njit(**_JIT)
def col2im_nhwc(dcols, kh, kw, stride, ho, wo, dxt):
    """Adjoint of :func:`im2col_nhwc` (without the ones column): ``dxt (nb, Hp, Wp, C)`` is
    zeroed, then every patch row of ``dcols (nb*Ho*Wo, KH*KW*C)`` is added back at its
    pixels."""
    nb, hp, wp, c_dim = dxt.shape
    d3 = dxt.reshape(nb, hp, wp * c_dim)
    zero = dxt.dtype.type(0)
    for m in range(nb):
        for y in range(hp):
            for t in range(np.uint64(wp * c_dim)):
                d3[m, y, t] = zero
    run = kw * c_dim
    urun = np.uint64(run)
    for m in range(nb):
        for i in range(ho):
            for j in range(wo):
                row = (m * ho + i) * wo + j
                x0 = np.uint64(j * stride * c_dim)
                for di in range(kh):
                    y = i * stride + di
                    base = np.uint64(di * run)
                    for t in range(urun):
                        d3[m, y, x0 + t] += dcols[row, base + t]


@njit(**_JIT)
def nhwc_crop(dxt, top, left, dx):
    """``dx (nb, H, W, C)`` = the un-padded part of ``dxt (nb, Hp, Wp, C)``."""
    nb, h, w, c_dim = dx.shape
    uc = np.uint64(c_dim)
    for m in range(nb):
        for y in range(h):
            for xc in range(w):
                for c in range(uc):
                    dx[m, y, xc, c] = dxt[m, y + top, xc + left, c]


@njit(**_JIT)
def maxpool_nhwc_forward(x4, pool, stride, relu, out4, arg4):
    """Max pooling of the channels-last ``x4 (N, H, W, C)`` into ``out4 (N, Ho, Wo, C)``;
    ``arg4`` (same shape, an integer type holding ``pool*pool``) gets the row-major index
    ``a*pool + b`` of each maximum within its window, the first one on ties (strict ``>``).
    With ``relu``, ``out4`` is ``max(pool(x), 0)`` (= the pool of ``max(x, 0)``), and a window
    whose maximum is not positive gets the index ``pool*pool``, which no window offset matches,
    so :func:`maxpool_nhwc_backward` gives it no gradient: the ReLU's backward, for free.

    The loops over the channels hold no dependence between iterations, so they vectorise:
    2 x 2 windows (the common case) keep the running maximum in registers, with selects; other
    sizes update ``out4``/``arg4`` in memory, one window offset after the other."""
    nimg = x4.shape[0]
    ho, wo, c_dim = out4.shape[1], out4.shape[2], out4.shape[3]
    uc = np.uint64(c_dim)
    one, two, three = arg4.dtype.type(1), arg4.dtype.type(2), arg4.dtype.type(3)
    zero = arg4.dtype.type(0)
    none = arg4.dtype.type(pool * pool)  # "no gradient": the ReLU cut this window
    fzero = out4.dtype.type(0)
    for m in range(nimg):
        for i in range(ho):
            for j in range(wo):
                y0, x0 = i * stride, j * stride
                if pool == 2:
                    for c in range(uc):
                        best, idx = x4[m, y0, x0, c], zero
                        v = x4[m, y0, x0 + 1, c]
                        better = v > best
                        best, idx = (v if better else best), (one if better else idx)
                        v = x4[m, y0 + 1, x0, c]
                        better = v > best
                        best, idx = (v if better else best), (two if better else idx)
                        v = x4[m, y0 + 1, x0 + 1, c]
                        better = v > best
                        best, idx = (v if better else best), (three if better else idx)
                        if relu:
                            kept = best > fzero
                            best, idx = (best if kept else fzero), (idx if kept else none)
                        out4[m, i, j, c] = best
                        arg4[m, i, j, c] = idx
                    continue
                for c in range(uc):
                    out4[m, i, j, c] = x4[m, y0, x0, c]
                    arg4[m, i, j, c] = zero
                for k in range(1, pool * pool):
                    a = k // pool
                    b = k - a * pool
                    kk = arg4.dtype.type(k)
                    for c in range(uc):
                        v = x4[m, y0 + a, x0 + b, c]
                        o = out4[m, i, j, c]
                        better = v > o
                        out4[m, i, j, c] = v if better else o
                        arg4[m, i, j, c] = kk if better else arg4[m, i, j, c]
                if relu:
                    for c in range(uc):
                        kept = out4[m, i, j, c] > fzero
                        out4[m, i, j, c] = out4[m, i, j, c] if kept else fzero
                        arg4[m, i, j, c] = arg4[m, i, j, c] if kept else none


@njit(**_JIT)
def maxpool_nhwc_backward(dout4, arg4, pool, stride, dx4):
    """``dx4 (N, H, W, C)`` (overwritten) from ``dout4 (N, Ho, Wo, C)`` and the window indices
    of :func:`maxpool_nhwc_forward`. Non-overlapping windows (``stride == pool``) write each
    covered pixel once (the gradient or a zero) and zero the uncovered border; otherwise zeros
    first, then overlapping windows accumulate."""
    nimg, h, w, c_dim = dx4.shape
    ho, wo = dout4.shape[1], dout4.shape[2]
    zero = dx4.dtype.type(0)
    uc = np.uint64(c_dim)
    if stride == pool:
        for m in range(nimg):
            for i in range(ho):
                for a in range(pool):
                    y = i * pool + a
                    for j in range(wo):
                        for b in range(pool):
                            xc = j * pool + b
                            k = a * pool + b
                            for c in range(uc):
                                g = dout4[m, i, j, c]
                                dx4[m, y, xc, c] = g if arg4[m, i, j, c] == k else zero
                    for xc in range(wo * pool, w):
                        for c in range(uc):
                            dx4[m, y, xc, c] = zero
            for y in range(ho * pool, h):
                for xc in range(w):
                    for c in range(uc):
                        dx4[m, y, xc, c] = zero
        return
    for m in range(nimg):
        for y in range(h):
            for xc in range(w):
                for c in range(uc):
                    dx4[m, y, xc, c] = zero
    for m in range(nimg):
        for i in range(ho):
            for j in range(wo):
                for k in range(pool * pool):
                    a = k // pool
                    y, xc = i * stride + a, j * stride + k - a * pool
                    for c in range(uc):
                        g = dout4[m, i, j, c]
                        dx4[m, y, xc, c] += g if arg4[m, i, j, c] == k else zero


@njit(**_JIT)
def _transpose(a):
    """C-contiguous copy of ``a.T``."""
    rows, cols = a.shape
    out = np.empty((cols, rows), dtype=a.dtype)
    for r in range(rows):
        for c in range(cols):
            out[c, r] = a[r, c]
    return out


# ---- convolution -------------------------------------------------------------------------------
@njit(**_JIT)
def conv2d_forward(x, w2, b, kh, kw, stride, top, left, ho, wo, n0, n1, nb, out3):
    """Cross-correlation plus bias of images ``n0:n1`` of ``x (N, C, H, W)``, ``nb`` at a
    time, into ``out3 (N, F, Ho*Wo)``.

    ``w2 (F, C*KH*KW)`` are the flattened ``(F, C, KH, KW)`` weights, ``b (F,)`` the bias.
    Zero padding: ``top``/``left`` here, bottom/right implied by ``Ho, Wo``.
    """
    f_dim, k_dim = w2.shape
    p = ho * wo
    for c0 in range(n0, n1, nb):
        c1 = min(c0 + nb, n1)
        q = (c1 - c0) * p
        cols = np.empty((k_dim, q), dtype=x.dtype)
        _im2col(x, c0, c1, kh, kw, stride, top, left, ho, wo, cols)
        # one image: accumulate straight into its output; several: into a (F, nb*P) buffer
        acc = out3[c0] if c1 - c0 == 1 else np.empty((f_dim, q), dtype=x.dtype)
        for f in range(f_dim):
            for s in range(q):
                acc[f, s] = b[f]
        gemm(w2, cols, acc)
        if c1 - c0 > 1:
            for n in range(c0, c1):
                uq = np.uint64((n - c0) * p)
                for f in range(f_dim):
                    for s in range(np.uint64(p)):
                        out3[n, f, s] = acc[f, uq + s]


@njit(**_PJIT)
def conv2d_forward_par(x, w2, b, kh, kw, stride, top, left, ho, wo, n0, n1, nb, out3):
    """:func:`conv2d_forward` with the chunks of ``nb`` images shared out among threads."""
    for t in prange((n1 - n0 + nb - 1) // nb):
        c0 = n0 + t * nb
        conv2d_forward(x, w2, b, kh, kw, stride, top, left, ho, wo, c0, min(c0 + nb, n1), nb,
                       out3)


@njit(**_JIT)
def conv2d_backward(x, w_t, dout3, kh, kw, stride, top, left, ho, wo, n0, n1, nb, parts, dx):
    """Gradients of :func:`conv2d_forward` for images ``n0:n1``, ``nb`` at a time.

    ``dout3 (N, F, Ho*Wo)``; ``w_t (C*KH*KW, F)`` is the transposed ``w2``. The ``k``-th chunk
    adds ``[patches; ones] @ dout^T`` into ``parts[k % G]`` of ``parts (G, C*KH*KW + 1, F)``:
    rows ``< C*KH*KW`` accumulate ``dw^T``, the last row ``db`` (the ones row of the patches
    folds the bias gradient into the same GEMM). When ``dx (N, C, H, W)`` has rows (it has
    none for ``need_dx=False``), ``dx[n0:n1]`` is overwritten with ``col2im(w_t @ dout)``.
    """
    k_dim, f_dim = w_t.shape
    g = parts.shape[0]
    for k, c0 in enumerate(range(n0, n1, nb)):
        c1 = min(c0 + nb, n1)
        q = (c1 - c0) * ho * wo
        cols = np.empty((k_dim + 1, q), dtype=x.dtype)
        _im2col(x, c0, c1, kh, kw, stride, top, left, ho, wo, cols)
        for s in range(q):
            cols[k_dim, s] = 1
        if c1 - c0 == 1:
            d = dout3[c0]
        else:
            d = np.empty((f_dim, q), dtype=x.dtype)  # (F, nb*P)
            _gather_chunk(dout3, c0, c1, d)
        if f_dim <= _NT_MAX_FILTERS:
            gemm_nt(cols, d, parts[k % g])
        else:
            gemm(cols, _transpose(d), parts[k % g])
        if dx.shape[0] > 0:
            dcols = np.zeros((k_dim, q), dtype=x.dtype)
            gemm(w_t, d, dcols)
            dx[c0:c1] = 0
            _col2im(dcols, c0, c1, kh, kw, stride, top, left, ho, wo, dx)


@njit(**_PJIT)
def conv2d_backward_par(x, w_t, dout3, kh, kw, stride, top, left, ho, wo, n0, n1, nb, parts,
                        dx):
    """:func:`conv2d_backward` with the chunks shared out among threads; pass one part per
    chunk, so that no two threads add into the same weight gradient."""
    for t in prange((n1 - n0 + nb - 1) // nb):
        c0 = n0 + t * nb
        conv2d_backward(x, w_t, dout3, kh, kw, stride, top, left, ho, wo, c0,
                        min(c0 + nb, n1), nb, parts[t:t + 1], dx)


# ---- max pooling -------------------------------------------------------------------------------
# 2 x 2 windows with stride 2 on (N*C, H, W) planes, the first layer's pooling: each window's
# index within it (``2*a + b``, 4 when a fused ReLU cut it) in one byte, as in the channels-last
# kernels, so both loops run along a row with unit-stride loads the compiler vectorises; the
# general kernels below keep a flat in-plane index, which costs a scatter in the backward.
@njit(**_JIT)
def _maxpool2x2_plane(x2, relu, out2, arg2):
    """``out2 (Ho, Wo)``, ``arg2`` (uint8) from the 2 x 2 windows of ``x2 (H, W)``; ``relu``:
    ``out2 = max(maxima, 0)``, index 4 where that cut the window."""
    ho, wo = out2.shape
    zero = out2.dtype.type(0)
    one, two, three, none = np.uint8(1), np.uint8(2), np.uint8(3), np.uint8(4)
    idx0 = np.uint8(0)
    uwo, u2 = np.uint64(wo), np.uint64(2)
    for i in range(ho):
        r0, r1 = x2[2 * i], x2[2 * i + 1]
        o, a = out2[i], arg2[i]
        for j in range(uwo):
            best, idx = r0[u2 * j], idx0
            v = r0[u2 * j + np.uint64(1)]
            better = v > best
            best, idx = (v if better else best), (one if better else idx)
            v = r1[u2 * j]
            better = v > best
            best, idx = (v if better else best), (two if better else idx)
            v = r1[u2 * j + np.uint64(1)]
            better = v > best
            best, idx = (v if better else best), (three if better else idx)
            if relu:
                kept = best > zero
                best, idx = (best if kept else zero), (idx if kept else none)
            o[j] = best
            a[j] = idx


@njit(**_JIT)
def _maxpool2x2_plane_backward(dout2, arg2, dx2):
    """``dx2 (H, W)`` (overwritten): ``dout2 (Ho, Wo)`` at each window's recorded maximum,
    zeros elsewhere (and on an odd last row or column, which no window covers)."""
    ho, wo = dout2.shape
    h, w = dx2.shape
    zero = dx2.dtype.type(0)
    uwo, u2, u1 = np.uint64(wo), np.uint64(2), np.uint64(1)
    for i in range(ho):
        g_row, a_row = dout2[i], arg2[i]
        for a in range(2):
            row = dx2[2 * i + a]
            k0, k1 = np.uint8(2 * a), np.uint8(2 * a + 1)
            for j in range(uwo):
                g, k = g_row[j], a_row[j]
                row[u2 * j] = g if k == k0 else zero
                row[u2 * j + u1] = g if k == k1 else zero
            for xc in range(2 * wo, w):
                row[xc] = zero
    for y in range(2 * ho, h):
        for xc in range(w):
            dx2[y, xc] = zero


@njit(**_JIT)
def maxpool2x2_forward(x3, relu, out3, arg3):
    """2 x 2, stride-2 max pooling of the planes ``x3 (N*C, H, W)`` into ``out3 (N*C, H//2,
    W//2)``; ``arg3`` (uint8, same shape) gets the index ``2*a + b`` of each maximum within its
    window, the first one on ties; ``relu``: fused ReLU, index 4 where it cut the window."""
    for m in range(x3.shape[0]):
        _maxpool2x2_plane(x3[m], relu, out3[m], arg3[m])


@njit(**_PJIT)
def maxpool2x2_forward_par(x3, relu, out3, arg3):
    """:func:`maxpool2x2_forward` with planes shared out among threads."""
    for m in prange(x3.shape[0]):
        _maxpool2x2_plane(x3[m], relu, out3[m], arg3[m])


@njit(**_JIT)
def maxpool2x2_backward(dout3, arg3, dx3):
    """``dx3 (N*C, H, W)`` (overwritten) from ``dout3 (N*C, H//2, W//2)`` and the indices of
    :func:`maxpool2x2_forward`."""
    for m in range(dout3.shape[0]):
        _maxpool2x2_plane_backward(dout3[m], arg3[m], dx3[m])


@njit(**_PJIT)
def maxpool2x2_backward_par(dout3, arg3, dx3):
    """:func:`maxpool2x2_backward` with planes shared out among threads."""
    for m in prange(dout3.shape[0]):
        _maxpool2x2_plane_backward(dout3[m], arg3[m], dx3[m])


@njit(**_JIT)
def _argmax_step(x2, y, xc, uw, best, idx):
    """One step of a running argmax over ``x2[y, xc]`` (flat index ``y*W + xc``, ``uw = W``);
    strict ``>`` keeps the first maximum on ties."""
    v = x2[y, xc]
    better = v > best
    return (v if better else best), (y * uw + xc if better else idx)


@njit(**_JIT)
def _maxpool_plane(x2, pool, stride, relu, out2, arg2):
    """Maxima of the windows of one plane ``x2 (H, W)`` into ``out2 (Ho, Wo)``; ``arg2`` gets
    the flat ``y*W + x`` index of each maximum, the first one in row-major window order.
    With ``relu``, ``out2 = max(maxima, 0)`` and a window whose maximum is not positive gets
    the index ``-1 - (y*W + x)``, which :func:`_maxpool_plane_backward` reads as "no gradient"
    (the ReLU's backward, fused).

    The running maximum is updated with selects, not branches: on real data the comparisons
    are unpredictable, and branchy versions were slower. 2 x 2 windows, the common case, are
    unrolled, which beats the loops over so short a window.
    """
    w = x2.shape[1]
    ho, wo = out2.shape
    fzero = out2.dtype.type(0)
    uw, upool, one = np.uint64(w), np.uint64(pool), np.uint64(1)
    for i in range(ho):
        y0 = np.uint64(i * stride)
        for j in range(wo):
            x0 = np.uint64(j * stride)
            best, idx = x2[y0, x0], y0 * uw + x0
            if pool == 2:
                best, idx = _argmax_step(x2, y0, x0 + one, uw, best, idx)
                best, idx = _argmax_step(x2, y0 + one, x0, uw, best, idx)
                best, idx = _argmax_step(x2, y0 + one, x0 + one, uw, best, idx)
            else:
                for y in range(y0, y0 + upool):
                    for xc in range(x0, x0 + upool):
                        best, idx = _argmax_step(x2, y, xc, uw, best, idx)
            if relu and not best > fzero:
                out2[i, j] = fzero
                arg2[i, j] = np.int32(-1) - np.int32(idx)
            else:
                out2[i, j] = best
                arg2[i, j] = np.int32(idx)


@njit(**_JIT)
def _maxpool_plane_backward(dout2, arg2, dx1):
    """``dx1 (H*W,)``: zeros plus ``dout2 (Ho, Wo)`` added at the argmax positions ``arg2``
    (a negative entry ``-1 - s``: the fused ReLU cut the window at ``s``; it adds nothing)."""
    for s in range(dx1.size):
        dx1[s] = 0
    zero = dx1.dtype.type(0)
    ho, wo = dout2.shape
    for i in range(ho):
        for j in range(wo):
            a = arg2[i, j]
            kept = a >= 0
            dx1[a if kept else -1 - a] += dout2[i, j] if kept else zero


@njit(**_JIT)
def maxpool2d_forward(x3, pool, stride, relu, out3, arg3):
    """Max pooling of ``x3 (N*C, H, W)`` (images flattened into planes) into ``out3 (N*C, Ho,
    Wo)``, ``Ho = (H - pool) // stride + 1``; ``arg3`` (int32, same shape) gets the flat
    in-plane index of each maximum. ``relu``: fused ReLU, see :func:`_maxpool_plane`."""
    for m in range(x3.shape[0]):
        _maxpool_plane(x3[m], pool, stride, relu, out3[m], arg3[m])


@njit(**_PJIT)
def maxpool2d_forward_par(x3, pool, stride, relu, out3, arg3):
    """:func:`maxpool2d_forward` with planes shared out among threads."""
    for m in prange(x3.shape[0]):
        _maxpool_plane(x3[m], pool, stride, relu, out3[m], arg3[m])


@njit(**_JIT)
def maxpool2d_backward(dout3, arg3, dx2):
    """``dout3 (N*C, Ho, Wo)`` -> ``dx2 (N*C, H*W)`` (overwritten); overlapping windows
    accumulate."""
    for m in range(dout3.shape[0]):
        _maxpool_plane_backward(dout3[m], arg3[m], dx2[m])


@njit(**_PJIT)
def maxpool2d_backward_par(dout3, arg3, dx2):
    """:func:`maxpool2d_backward` with planes shared out among threads."""
    for m in prange(dout3.shape[0]):
        _maxpool_plane_backward(dout3[m], arg3[m], dx2[m])


# ---- ReLU (on flat views) ----------------------------------------------------------------------
# The zero is typed like the data: with a plain ``0`` (an int) in the select, LLVM does not
# vectorise the loop.
@njit(**_JIT)
def relu_forward(x1, out1):
    """``out1 = max(x1, 0)`` for flat arrays (NaN gives 0)."""
    zero = x1.dtype.type(0)
    for i in range(x1.size):
        v = x1[i]
        out1[i] = v if v > zero else zero


@njit(**_PJIT)
def relu_forward_par(x1, out1):
    """:func:`relu_forward` over threads."""
    zero = x1.dtype.type(0)
    for i in prange(x1.size):
        v = x1[i]
        out1[i] = v if v > zero else zero


@njit(**_JIT)
def relu_backward(dout1, out1, dx1):
    """``dx1 = dout1 * (out1 > 0)`` for flat arrays; ``out1`` is the forward output, which is
    positive exactly where the input was."""
    zero = dout1.dtype.type(0)
    for i in range(dout1.size):
        dx1[i] = dout1[i] if out1[i] > zero else zero


@njit(**_PJIT)
def relu_backward_par(dout1, out1, dx1):
    """:func:`relu_backward` over threads."""
    zero = dout1.dtype.type(0)
    for i in prange(dout1.size):
        dx1[i] = dout1[i] if out1[i] > zero else zero


# ---- optimizer updates and the loss (one pass, without the GIL) ---------------------------------
# NumPy's versions of these are several passes of small ufunc calls that hold the GIL between
# them: a few hundred microseconds per step that the data-parallel threads would otherwise take
# turns at. The arithmetic is NumPy's, operation for operation (no FMA: ``fastmath=False``), so
# the results are bit for bit those of :class:`~cnn.backends.numpy.backend.NumpyBackend`.
@njit(**_JIT)
def axpby(y1, a, x1, b):
    """``y1 = a * y1 + b * x1`` for flat arrays (``a``, ``b`` of their dtype); ``x1`` may be
    ``y1``."""
    for i in range(y1.size):
        y1[i] = y1[i] * a + x1[i] * b


@njit(**_JIT)
def softmax_cross_entropy(logits, labels, dlogits):
    """Mean softmax cross-entropy of ``logits (N, K)`` against integer ``labels (N,)``, in
    float64 (a shift by the row maximum keeps ``exp`` finite for any finite logits); its
    gradient ``(softmax - onehot) / N`` goes into ``dlogits (N, K)``. Returns ``(loss,
    correct)``: the float64 mean loss and the number of rows whose first maximal logit is the
    label. A label outside ``[0, K)`` returns ``(nan, -1)`` (the caller raises)."""
    n, k = logits.shape
    total = 0.0
    correct = 0
    for i in range(n):
        label = labels[i]
        if label < 0 or label >= k:
            return np.nan, -1
        best = 0
        for j in range(1, k):
            if logits[i, j] > logits[i, best]:
                best = j
        top = np.float64(logits[i, best])  # widening keeps the order: the row's maximum
        if best == label:
            correct += 1
        s = 0.0
        for j in range(k):
            s += np.exp(np.float64(logits[i, j]) - top)
        log_s = np.log(s)
        for j in range(k):
            p = np.exp((np.float64(logits[i, j]) - top) - log_s)
            dlogits[i, j] = ((p - 1.0) if j == label else p) / n
        total += (np.float64(logits[i, label]) - top) - log_s
    return -total / n, correct
