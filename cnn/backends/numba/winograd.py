"""Winograd minimal filtering F(m x m, 3 x 3) for the Numba backend's channels-last conv path
(3 x 3 kernels, stride 1): forward, input gradient and weight gradient, each conv op one
compiled ``nogil`` chunk loop whose GEMMs call NumPy's BLAS (:func:`~.blas.gemm`).

The algorithm (Lavin and Gray, "Fast Algorithms for Convolutional Neural Networks", CVPR
2016): the output is cut into ``m x m`` tiles; tile ``t`` needs the ``a x a`` input patch
``d`` at its corner (``a = m + 2``, neighbouring patches overlap by 2). With the transform
matrices of :func:`transform_matrices` (``B^T (a, a)``, ``G (a, 3)``, ``A^T (m, a)``)::

    U[f, c] = G g[f, c] G^T            the filters, once per step      (a, a) each
    V[t, c] = B^T d[t, c] B            each input patch                (a, a) each
    M[t, f] = sum_c V[t, c] * U[f, c]  elementwise in the (a, a) domain
    y[t, f] = A^T M[t, f] A            the output tile                 (m, m)

The sum over channels is, for each of the ``a*a`` transform-domain elements ``e``, one GEMM
``M_e (T, F) = V_e (T, C) @ U_e^T (C, F)`` over the tiles ``T`` of a chunk of images:
``a*a`` GEMMs of ``T*C*F`` multiply-adds where the direct conv does ``9*m*m`` per tile and
channel pair, 16 against 36 for ``m = 2`` (2.25x fewer), 36 against 144 for ``m = 4`` (4x),
less what tiles hanging over the output's edge waste (:func:`multiplications`). The
transforms are sums of the data times small integers; their cost is passes over the data.

The gradients run the same computation backwards (its adjoint: the exact gradients of the
same convolution, in the same tiles)::

    dM[t, f] = A dy[t, f] A^T              (dy zero past the output's edge)
    dU_e (F, C) = sum over chunks of dM_e^T @ V_e      dg[f, c] = G^T dU[f, c] G
    dV_e (T, C) = dM_e @ U_e                dx = B dV[t, c] B^T at each patch, overlaps added

Layout: the images are channels-last ``(N, H, W, C)``, as on the backend's channels-last
path, and the output tiles go into the channels-last rows that a fused conv's pooling reads.
Each 1-D transform is one pass over long contiguous runs (see "the data transforms" below),
the tiles of a chunk zero padded to whole tiles. The transformed patches ``V (a*a, T, C)``
and products ``M (a*a, T, F)`` are those of one chunk of images (the backend sizes it to stay
in cache), and the backward transforms the chunk's input again rather than keep ``V`` for
the whole batch.

Precision: ``B^T`` and ``A^T`` hold small integers, so the data transforms round only in
their sums, but their entries up to 8 (``m = 4``) make the transformed values larger than
the data and their rounding errors larger than the direct conv's; the filter transforms
(``G`` holds 1/6 and 1/24 for ``m = 4``) compute in float64. tests/test_winograd.py bounds
the errors, and ``python -m cnn.bench.conv_algorithms`` prints them for each layer of a
network, beside the direct algorithm's.
"""
from __future__ import annotations

import functools

import numpy as np
from numba import njit

from . import kernels as K
from .blas import gemm

_JIT = dict(nogil=True, cache=True, fastmath=False)

#: the output tile sizes implemented: F(2x2, 3x3) and F(4x4, 3x3)
TILES = (2, 4)


@functools.lru_cache(maxsize=None)
def transform_matrices(m: int, dtype=np.float64):
    """``(B^T (a, a), G (a, 3), A^T (m, a))`` of F(m x m, 3 x 3), ``a = m + 2``, in ``dtype``
    (read-only arrays, made once): Lavin and Gray's, with interpolation points 0, 1, -1
    (``m = 2``) and 0, 1, -1, 2, -2 (``m = 4``), and the point at infinity."""
    if m == 2:
        bt = [[1, 0, -1, 0], [0, 1, 1, 0], [0, -1, 1, 0], [0, 1, 0, -1]]
        g = [[1, 0, 0], [.5, .5, .5], [.5, -.5, .5], [0, 0, 1]]
        at = [[1, 1, 1, 0], [0, 1, -1, -1]]
    elif m == 4:
        bt = [[4, 0, -5, 0, 1, 0], [0, -4, -4, 1, 1, 0], [0, 4, -4, -1, 1, 0],
              [0, -2, -1, 2, 1, 0], [0, 2, -1, -2, 1, 0], [0, 4, 0, -5, 0, 1]]
        g = [[1 / 4, 0, 0], [-1 / 6, -1 / 6, -1 / 6], [-1 / 6, 1 / 6, -1 / 6],
             [1 / 24, 1 / 12, 1 / 6], [1 / 24, -1 / 12, 1 / 6], [0, 0, 1]]
        at = [[1, 1, 1, 1, 1, 0], [0, 1, -1, 2, -2, 0], [0, 1, 1, 4, 4, 0],
              [0, 1, -1, 8, -8, 1]]
    else:
        raise ValueError(f"Winograd tile size must be one of {TILES}. Received m={m!r}")
    out = tuple(np.array(a, dtype=dtype) for a in (bt, g, at))
    for a in out:
        a.flags.writeable = False
    return out


def tile_grid(ho: int, wo: int, m: int) -> tuple[int, int]:
    """``(tiles down, tiles across)`` covering an ``Ho x Wo`` output with ``m x m`` tiles."""
    return -(-ho // m), -(-wo // m)


def multiplications(ho: int, wo: int, m: int) -> float:
    """The GEMM multiply-adds of F(m x m, 3 x 3) per ``C x F`` channel pair of one image,
    relative to the direct conv's: ``tiles * (m + 2)**2 / (9 * Ho * Wo)``."""
    th, tw = tile_grid(ho, wo, m)
    return th * tw * (m + 2) ** 2 / (9 * ho * wo)


# ---- the filter transforms (once per step, float64 sums) ----------------------------------------
#: filter pairs ``(f, c)`` per block of the filter transforms: the block's float64 scratch
#: (:func:`filter_scratch_shape`) stays in L1
FILTER_BLOCK = 128


def filter_scratch_shape(m: int) -> tuple[int, int]:
    """The shape of the float64 scratch of :func:`filter_transform` and its adjoint."""
    return 9 + 3 * (m + 2), FILTER_BLOCK


# The filters are walked in blocks of FILTER_BLOCK pairs (f, c), s = f*C + c, each block's nine
# taps first copied into rows of the scratch (float64), so that both products with G run along
# those rows, contiguous, as the data transforms do along theirs. U is laid out (a*a, F, C):
# its rows are the same pairs in the same order.
@njit(**_JIT)
def filter_transform(w, g, u, scratch):
    """``u (a*a, F, C)``: ``u[i*a + j, f, c] = (G w[f, c] G^T)[i, j]`` for ``w (F, C, 3, 3)``,
    ``g = G (a, 3)`` float64, computed in float64; ``scratch`` float64 of
    :func:`filter_scratch_shape`."""
    a = g.shape[0]
    pairs = w.shape[0] * w.shape[1]
    w2, u2 = w.reshape(pairs, 9), u.reshape(a * a, pairs)
    block = scratch.shape[1]
    taps, t = scratch[:9], scratch[9:]
    for s0 in range(0, pairs, block):
        n = min(block, pairs - s0)
        # slices: an s0 + s index gets Numba's wraparound check, which stops the vectoriser
        wb = w2[s0:s0 + n]
        for s in range(n):
            for k in range(9):
                taps[k, s] = wb[s, k]
        # t[i*3 + q] = sum_p G[i, p] * tap (p, q)
        for i in range(a):
            g0, g1, g2 = g[i, 0], g[i, 1], g[i, 2]
            for q in range(3):
                row, x0, x1, x2 = t[i * 3 + q], taps[q], taps[3 + q], taps[6 + q]
                for s in range(n):
                    row[s] = g0 * x0[s] + g1 * x1[s] + g2 * x2[s]
        # u[i*a + j] = sum_q G[j, q] * t[i*3 + q]
        for i in range(a):
            x0, x1, x2 = t[i * 3], t[i * 3 + 1], t[i * 3 + 2]
            for j in range(a):
                g0, g1, g2 = g[j, 0], g[j, 1], g[j, 2]
                row = u2[i * a + j, s0:s0 + n]
                for s in range(n):
                    row[s] = g0 * x0[s] + g1 * x1[s] + g2 * x2[s]


@njit(**_JIT)
def filter_transform_adjoint(du, g, dw, scratch):
    """``dw (F, C, 3, 3)``: ``dw[f, c] = G^T du[:, f, c] G`` with ``du (a*a, F, C)`` read as
    ``(a, a)`` blocks (the adjoint of :func:`filter_transform`), in float64."""
    a = g.shape[0]
    pairs = dw.shape[0] * dw.shape[1]
    dw2, du2 = dw.reshape(pairs, 9), du.reshape(a * a, pairs)
    block = scratch.shape[1]
    taps, t = scratch[:9], scratch[9:]
    for s0 in range(0, pairs, block):
        n = min(block, pairs - s0)
        # t[i*3 + q] = sum_j G[j, q] * du[i*a + j], the three q at once
        for s in range(t.shape[0]):
            for r in range(n):
                t[s, r] = 0.0
        for i in range(a):
            t0, t1, t2 = t[i * 3], t[i * 3 + 1], t[i * 3 + 2]
            for j in range(a):
                g0, g1, g2, src = g[j, 0], g[j, 1], g[j, 2], du2[i * a + j, s0:s0 + n]
                for s in range(n):
                    x = np.float64(src[s])
                    t0[s] += g0 * x
                    t1[s] += g1 * x
                    t2[s] += g2 * x
        # tap (p, q) = sum_i G[i, p] * t[i*3 + q], the three p at once
        for s in range(9):
            for r in range(n):
                taps[s, r] = 0.0
        for i in range(a):
            g0, g1, g2 = g[i, 0], g[i, 1], g[i, 2]
            for q in range(3):
                src, d0, d1, d2 = t[i * 3 + q], taps[q], taps[3 + q], taps[6 + q]
                for s in range(n):
                    x = src[s]
                    d0[s] += g0 * x
                    d1[s] += g1 * x
                    d2[s] += g2 * x
        dwb = dw2[s0:s0 + n]
        for s in range(n):
            for k in range(9):
                dwb[s, k] = taps[k, s]


# ---- the 1-D transforms, along runs -------------------------------------------------------------
# ``_bt<m>`` applies B^T to ``a`` runs of ``src`` (at ``s0``, ``s0 + ss``, ...), writing ``a``
# runs of ``dst`` (at ``d0``, ``d0 + ds``, ...), each ``run`` values long; ``_b<m>`` applies B
# (the input transform's adjoint), ``_at<m>`` A^T (``a`` runs in, ``m`` out) and ``_a<m>`` A
# (``m`` in, ``a`` out). Each is one pass that holds a column of the transform in registers,
# its arithmetic written out with the common terms shared: the matrices of
# :func:`transform_matrices`, which the tests check them against. Offsets are uint64 (see
# "Why the index code looks the way it does" in kernels.py: an int64 among them would make the
# offset a float64).
@njit(**_JIT)
def _four(base, step):
    """Four offsets ``step`` apart, from ``base``."""
    return base, base + step, base + step + step, base + step + step + step


@njit(**_JIT)
def _six(base, step):
    """Six offsets ``step`` apart, from ``base``."""
    third = base + step + step + step
    return base, base + step, base + step + step, third, third + step, third + step + step


@njit(**_JIT)
def _bt2(src, s0, ss, dst, d0, ds, run):
    s0, s1, s2, s3 = _four(s0, ss)
    d0, d1, d2, d3 = _four(d0, ds)
    for s in range(run):
        x0, x1, x2, x3 = src[s0 + s], src[s1 + s], src[s2 + s], src[s3 + s]
        dst[d0 + s] = x0 - x2
        dst[d1 + s] = x1 + x2
        dst[d2 + s] = x2 - x1
        dst[d3 + s] = x1 - x3


@njit(**_JIT)
def _b2(src, s0, ss, dst, d0, ds, run):
    s0, s1, s2, s3 = _four(s0, ss)
    d0, d1, d2, d3 = _four(d0, ds)
    for s in range(run):
        x0, x1, x2, x3 = src[s0 + s], src[s1 + s], src[s2 + s], src[s3 + s]
        dst[d0 + s] = x0
        dst[d1 + s] = x1 - x2 + x3
        dst[d2 + s] = x1 + x2 - x0
        dst[d3 + s] = -x3


@njit(**_JIT)
def _at2(src, s0, ss, dst, d0, ds, run):
    s0, s1, s2, s3 = _four(s0, ss)
    d1 = d0 + ds
    for s in range(run):
        x0, x1, x2, x3 = src[s0 + s], src[s1 + s], src[s2 + s], src[s3 + s]
        dst[d0 + s] = x0 + x1 + x2
        dst[d1 + s] = x1 - x2 - x3


@njit(**_JIT)
def _a2(src, s0, ss, dst, d0, ds, run):
    s1 = s0 + ss
    d0, d1, d2, d3 = _four(d0, ds)
    for s in range(run):
        g0, g1 = src[s0 + s], src[s1 + s]
        dst[d0 + s] = g0
        dst[d1 + s] = g0 + g1
        dst[d2 + s] = g0 - g1
        dst[d3 + s] = -g1


@njit(**_JIT)
def _bt4(src, s0, ss, dst, d0, ds, run):
    s0, s1, s2, s3, s4, s5 = _six(s0, ss)
    d0, d1, d2, d3, d4, d5 = _six(d0, ds)
    two, four, five = dst.dtype.type(2), dst.dtype.type(4), dst.dtype.type(5)
    for s in range(run):
        x0, x1, x2 = src[s0 + s], src[s1 + s], src[s2 + s]
        x3, x4, x5 = src[s3 + s], src[s4 + s], src[s5 + s]
        p = x4 - four * x2  # rows 1 and 2: p -+ (4 x1 - x3)
        q = four * x1 - x3
        r = x4 - x2  # rows 3 and 4: r -+ 2 (x1 - x3)
        t = two * (x1 - x3)
        dst[d0 + s] = four * x0 - five * x2 + x4
        dst[d1 + s] = p - q
        dst[d2 + s] = p + q
        dst[d3 + s] = r - t
        dst[d4 + s] = r + t
        dst[d5 + s] = four * x1 - five * x3 + x5


@njit(**_JIT)
def _b4(src, s0, ss, dst, d0, ds, run):
    s0, s1, s2, s3, s4, s5 = _six(s0, ss)
    d0, d1, d2, d3, d4, d5 = _six(d0, ds)
    two, four, five = dst.dtype.type(2), dst.dtype.type(4), dst.dtype.type(5)
    for s in range(run):
        x0, x1, x2 = src[s0 + s], src[s1 + s], src[s2 + s]
        x3, x4, x5 = src[s3 + s], src[s4 + s], src[s5 + s]
        m12, p12 = x2 - x1, x1 + x2
        m34, p34 = x4 - x3, x3 + x4
        dst[d0 + s] = four * x0
        dst[d1 + s] = four * (m12 + x5) + two * m34
        dst[d2 + s] = -five * x0 - four * p12 - p34
        dst[d3 + s] = -m12 - two * m34 - five * x5
        dst[d4 + s] = x0 + p12 + p34
        dst[d5 + s] = x5


@njit(**_JIT)
def _at4(src, s0, ss, dst, d0, ds, run):
    s0, s1, s2, s3, s4, s5 = _six(s0, ss)
    d0, d1, d2, d3 = _four(d0, ds)
    two, four, eight = dst.dtype.type(2), dst.dtype.type(4), dst.dtype.type(8)
    for s in range(run):
        x0, x1, x2 = src[s0 + s], src[s1 + s], src[s2 + s]
        x3, x4, x5 = src[s3 + s], src[s4 + s], src[s5 + s]
        p12, m12 = x1 + x2, x1 - x2
        p34, m34 = x3 + x4, x3 - x4
        dst[d0 + s] = x0 + p12 + p34
        dst[d1 + s] = m12 + two * m34
        dst[d2 + s] = p12 + four * p34
        dst[d3 + s] = m12 + eight * m34 + x5


@njit(**_JIT)
def _a4(src, s0, ss, dst, d0, ds, run):
    s0, s1, s2, s3 = _four(s0, ss)
    d0, d1, d2, d3, d4, d5 = _six(d0, ds)
    two, four, eight = dst.dtype.type(2), dst.dtype.type(4), dst.dtype.type(8)
    for s in range(run):
        g0, g1, g2, g3 = src[s0 + s], src[s1 + s], src[s2 + s], src[s3 + s]
        e, o = g0 + g2, g1 + g3  # even and odd terms at the points 1 and -1 ...
        e2, o2 = g0 + four * g2, two * g1 + eight * g3  # ... and 2 and -2
        dst[d0 + s] = g0
        dst[d1 + s] = e + o
        dst[d2 + s] = e - o
        dst[d3 + s] = e2 + o2
        dst[d4 + s] = e2 - o2
        dst[d5 + s] = g3


#: which 1-D transform :func:`_apply` applies
_BT, _B, _AT, _A = 0, 1, 2, 3


@njit(**_JIT)
def _apply(which, m, src, s0, ss, dst, d0, ds, run):
    """The 1-D transform ``which`` (``_BT``, ``_B``, ``_AT`` or ``_A``) of F(m x m, 3 x 3)
    along runs, as described above."""
    if m == 2:
        if which == _BT:
            _bt2(src, s0, ss, dst, d0, ds, run)
        elif which == _B:
            _b2(src, s0, ss, dst, d0, ds, run)
        elif which == _AT:
            _at2(src, s0, ss, dst, d0, ds, run)
        else:
            _a2(src, s0, ss, dst, d0, ds, run)
    elif which == _BT:
        _bt4(src, s0, ss, dst, d0, ds, run)
    elif which == _B:
        _b4(src, s0, ss, dst, d0, ds, run)
    elif which == _AT:
        _at4(src, s0, ss, dst, d0, ds, run)
    else:
        _a4(src, s0, ss, dst, d0, ds, run)


# ---- the data transforms, a tile row at a time --------------------------------------------------
# Every pass runs along the ``Tw`` tiles of a tile row side by side, channels innermost: a run
# of ``Tw*C`` values. One pixel's channels alone (32 on CIFAR's second conv) would be shorter
# than one iteration of the loops LLVM vectorises (4 x 16 floats) and be left to a scalar or
# half-width epilogue. For that the input chunk is copied *phase-split*: ``xq[n, y, q, tx]``
# holds pixel ``(y, tx*m + q)`` of the padded image, pixel ``q`` of every patch across a row
# side by side (the copy repeats the 2 columns that neighbouring patches share), and the
# output tiles are assembled the same way before they are copied into the output. The arrays
# are walked flat: a view per row would cost Numba a reference count update each. Every array
# is C-contiguous.
@njit(**_JIT)
def split_input(x, xs, c0, c1, top, left, xq):
    """``xq (nb, Th*m + 2, a, Tw, C)``: ``xq[n - c0, y, q, tx]`` = pixel ``(y, tx*m + q)`` of
    image ``n`` zero padded by ``top``/``left`` (zeros past the image), for ``c0 <= n < c1``;
    from the channels-last ``xs (N, H, W, C)`` when it is not empty, else from ``x (N, C, H,
    W)``."""
    hp, a, tw, c_dim = xq.shape[1], xq.shape[2], xq.shape[3], xq.shape[4]
    m = a - 2
    channels_last = xs.shape[0] > 0
    h = xs.shape[1] if channels_last else x.shape[2]
    w = xs.shape[2] if channels_last else x.shape[3]
    q1, s1 = xq.reshape(-1), xs.reshape(-1)
    uc = np.uint64(c_dim)
    zero = xq.dtype.type(0)
    for n in range(c0, c1):
        for y in range(hp):
            yy = y - top
            for q in range(a):
                for tx in range(tw):
                    xx = tx * m + q - left
                    dst = np.uint64(((((n - c0) * hp + y) * a + q) * tw + tx) * c_dim)
                    if yy < 0 or yy >= h or xx < 0 or xx >= w:
                        for s in range(uc):
                            q1[dst + s] = zero
                    elif channels_last:
                        src = np.uint64(((n * h + yy) * w + xx) * c_dim)
                        for s in range(uc):
                            q1[dst + s] = s1[src + s]
                    else:
                        for c in range(c_dim):
                            q1[dst + np.uint64(c)] = x[n, c, yy, xx]


@njit(**_JIT)
def merge_input(dxq, c0, top, left, dx):
    """Adjoint of :func:`split_input` (channels-last): ``dx[c0 + n] (H, W, C)`` = each pixel's
    copies in ``dxq (nb, Th*m + 2, a, Tw, C)`` added up (one or two patches across hold it),
    the padding dropped; ``dx (N, H, W, C)``."""
    nb, hp, a, tw, c_dim = dxq.shape
    m = a - 2
    h, w = dx.shape[1], dx.shape[2]
    q1, d1 = dxq.reshape(-1), dx.reshape(-1)
    uc = np.uint64(c_dim)
    for n in range(nb):
        for yy in range(h):
            y = yy + top
            for xx in range(w):
                xp = xx + left
                dst = np.uint64((((c0 + n) * h + yy) * w + xx) * c_dim)
                tx = min(xp // m, tw - 1)  # the last patch holding the pixel
                src = np.uint64((((n * hp + y) * a + xp - tx * m) * tw + tx) * c_dim)
                for s in range(uc):
                    d1[dst + s] = q1[src + s]
                tx -= 1
                while tx >= 0 and xp - tx * m < a:
                    src = np.uint64((((n * hp + y) * a + xp - tx * m) * tw + tx) * c_dim)
                    for s in range(uc):
                        d1[dst + s] += q1[src + s]
                    tx -= 1


@njit(**_JIT)
def input_transform(xq, v, ycol):
    """``v (a*a, nb*Th*Tw, C)``: ``V = B^T d B`` of every patch ``d`` of the phase-split chunk
    ``xq (nb, Th*m + 2, a, Tw, C)`` (:func:`split_input`); tile ``t = (n*Th + ty)*Tw + tx``.
    ``ycol`` scratch, ``a*(Th*m + 2)`` runs of ``Tw*C`` values (or more)."""
    nb, hp, a, tw, c_dim = xq.shape
    m = a - 2
    th = (hp - 2) // m
    tiles = v.shape[1]
    q1, v1, y1 = xq.reshape(-1), v.reshape(-1), ycol.reshape(-1)
    run = np.uint64(tw * c_dim)
    uhp, uc = np.uint64(hp), np.uint64(c_dim)
    element = np.uint64(a * tiles * c_dim)  # from one element of v to the next i
    for n in range(nb):
        # across: ycol[:, y] = B^T applied over q to xq[n, y, q], every tile of the row at once
        for y in range(hp):
            src, dst = np.uint64((n * hp + y) * a) * run, np.uint64(y) * run
            _apply(_BT, m, q1, src, run, y1, dst, uhp * run, run)
        # down: v[i*a + j, tile row ty] = B^T applied over r to ycol[j, ty*m + r]
        for ty in range(th):
            t0 = (n * th + ty) * tw
            for j in range(a):
                src, dst = np.uint64(j * hp + ty * m) * run, np.uint64(j * tiles + t0) * uc
                _apply(_BT, m, y1, src, run, v1, dst, element, run)


@njit(**_JIT)
def input_transform_adjoint(dv, dxq, ycol):
    """Adjoint of :func:`input_transform`: ``dxq (nb, Th*m + 2, a, Tw, C)`` gets ``B dV[t]
    B^T`` of every tile, phase-split like :func:`split_input`'s output (the patches that
    overlap down are added up here, those across by :func:`merge_input`). ``dv (a*a,
    nb*Th*Tw, C)``; ``ycol`` scratch, ``a*(Th*m + 2 + a)`` runs of ``Tw*C`` values (or more):
    the transform of the columns, and that of one tile row before its rows are added in."""
    nb, hp, a, tw, c_dim = dxq.shape
    m = a - 2
    th = (hp - 2) // m
    tiles = dv.shape[1]
    q1, v1, y1 = dxq.reshape(-1), dv.reshape(-1), ycol.reshape(-1)
    run = np.uint64(tw * c_dim)
    uhp, uc = np.uint64(hp), np.uint64(c_dim)
    element = np.uint64(a * tiles * c_dim)  # from one element of dv to the next i
    rows = np.uint64(a * hp) * run  # where the tile row's patches go before they are added
    zero = dv.dtype.type(0)
    for n in range(nb):
        for s in range(np.uint64(a * hp) * run):
            y1[s] = zero
        # down: ycol[j, ty*m + r] += B applied over i to dv[i*a + j, tile row ty]
        for ty in range(th):
            t0 = (n * th + ty) * tw
            for j in range(a):
                src, dst = np.uint64(j * tiles + t0) * uc, rows + np.uint64(j * a) * run
                _apply(_B, m, v1, src, element, y1, dst, run, run)
            for j in range(a):
                for r in range(a):
                    dst = np.uint64(j * hp + ty * m + r) * run
                    src = rows + np.uint64(j * a + r) * run
                    for s in range(run):
                        y1[dst + s] += y1[src + s]
        # across: dxq[n, y, :] = B applied over j to ycol[:, y]
        for y in range(hp):
            src, dst = np.uint64(y) * run, np.uint64((n * hp + y) * a) * run
            _apply(_B, m, y1, src, uhp * run, q1, dst, run, run)


@njit(**_JIT)
def output_transform(mm, bias, out, z, yq):
    """``out (nb, Ho, Wo, F)``: ``y = A^T M[t] A + bias`` of every tile, the part inside the
    output. ``mm (a*a, nb*Th*Tw, F)``; ``z (a, m, Tw*F)`` and ``yq (m, m, Tw*F)`` scratch for
    one tile row (``yq[r, q, tx]``: pixel ``(r, q)`` of tile ``tx``)."""
    nb, ho, wo, f_dim = out.shape
    a, m = z.shape[0], z.shape[1]
    th, tw = -(-ho // m), -(-wo // m)
    tiles = mm.shape[1]
    m1, o1, z1, y1 = mm.reshape(-1), out.reshape(-1), z.reshape(-1), yq.reshape(-1)
    uf, run = np.uint64(f_dim), np.uint64(tw * f_dim)
    um = np.uint64(m)
    element = np.uint64(a * tiles * f_dim)  # from one element of the products to the next i
    for n in range(nb):
        for ty in range(th):
            t0 = (n * th + ty) * tw
            # down: z[j, r] = A^T applied over i to M[i*a + j, tile row ty]
            for j in range(a):
                src, dst = np.uint64(j * tiles + t0) * uf, np.uint64(j * m) * run
                _apply(_AT, m, m1, src, element, z1, dst, run, run)
            # across: yq[r, q] = A^T applied over j to z[j, r]
            for r in range(m):
                src, dst = np.uint64(r) * run, np.uint64(r * m) * run
                _apply(_AT, m, z1, src, um * run, y1, dst, run, run)
            # the tiles' pixels inside the output, plus the bias
            for r in range(min(m, ho - ty * m)):
                for tx in range(tw):
                    for q in range(min(m, wo - tx * m)):
                        dst = np.uint64(((n * ho + ty * m + r) * wo + tx * m + q) * f_dim)
                        src = np.uint64(((r * m + q) * tw + tx) * f_dim)
                        for s in range(uf):
                            o1[dst + s] = y1[src + s] + bias[s]


@njit(**_JIT)
def output_transform_adjoint(dy, dm, db, z, yq):
    """Adjoint of :func:`output_transform`: ``dm (a*a, nb*Th*Tw, F)`` gets ``A dy[t] A^T`` of
    every tile of ``dy (nb, Ho, Wo, F)`` (zero past the output's edge), and ``db (F,)``
    (float64) adds the sum of ``dy`` over the pixels (the bias gradient). ``z (a, m, Tw*F)``
    and ``yq (m, m, Tw*F)`` scratch, as in :func:`output_transform`."""
    nb, ho, wo, f_dim = dy.shape
    a, m = z.shape[0], z.shape[1]
    th, tw = -(-ho // m), -(-wo // m)
    tiles = dm.shape[1]
    g1, m1, z1, y1 = dy.reshape(-1), dm.reshape(-1), z.reshape(-1), yq.reshape(-1)
    uf, run = np.uint64(f_dim), np.uint64(tw * f_dim)
    um = np.uint64(m)
    element = np.uint64(a * tiles * f_dim)  # from one element of the products to the next i
    zero = dy.dtype.type(0)
    for p in range(nb * ho * wo):
        src = np.uint64(p * f_dim)
        for s in range(uf):
            db[s] += g1[src + s]
    for n in range(nb):
        for ty in range(th):
            t0 = (n * th + ty) * tw
            # yq[r, q, tx] = pixel (ty*m + r, tx*m + q) of dy, zero past the edge
            for r in range(m):
                for tx in range(tw):
                    for q in range(m):
                        dst = np.uint64(((r * m + q) * tw + tx) * f_dim)
                        if ty * m + r < ho and tx * m + q < wo:
                            src = np.uint64(((n * ho + ty * m + r) * wo + tx * m + q) * f_dim)
                            for s in range(uf):
                                y1[dst + s] = g1[src + s]
                        else:
                            for s in range(uf):
                                y1[dst + s] = zero
            # across: z[j, r] = A applied over q to yq[r, q]
            for r in range(m):
                src, dst = np.uint64(r * m) * run, np.uint64(r) * run
                _apply(_A, m, y1, src, run, z1, dst, um * run, run)
            # down: dm[i*a + j, tile row ty] = A applied over r to z[j, r]
            for j in range(a):
                src, dst = np.uint64(j * m) * run, np.uint64(j * tiles + t0) * uf
                _apply(_A, m, z1, src, run, m1, dst, element, run)


# ---- the chunk loops ----------------------------------------------------------------------------
@njit(**_JIT)
def _chunk_view(buf, tiles):
    """The first ``a*a*tiles*K`` values of the buffer ``buf (a*a, nb*Th*Tw, K)`` as a
    C-contiguous ``(a*a, tiles, K)`` array: a shorter last chunk packs its tiles the same
    way as a full one (strided views would keep the transforms from vectorising)."""
    e, k = buf.shape[0], buf.shape[2]
    return buf.reshape(-1)[:e * tiles * k].reshape(e, tiles, k)


@njit(**_JIT)
def forward(x, xs, u, bias, top, left, xq, ycol, v, mm, z, yq, out,
            pool, pool_stride, chunk, arg, pooled):
    """The forward, chunk by chunk: the chunk phase-split into ``xq (nb, Th*m + 2, a, Tw, C)``
    (input as in :func:`split_input`), transformed into ``v (a*a, nb*Th*Tw, C)``, one GEMM
    per element ``mm[e] = v[e] @ u[e]^T`` (``u (a*a, F, C)`` from :func:`filter_transform`),
    and the output tiles. ``pool == 0``: ``out (N, Ho, Wo, F)`` gets the conv output; else
    ``chunk (nb, Ho, Wo, F)`` holds the chunk's, which ReLU and max pooling (as
    :func:`~.conv.nhwc_forward` does) put into ``pooled (N, Hp, Wp, F)`` and ``arg``.
    ``ycol``, ``z``, ``yq``: the transforms' scratch."""
    n = max(x.shape[0], xs.shape[0])
    nb, hp, a, tw = xq.shape[:4]
    tiles = (hp - 2) // (a - 2) * tw
    for c0 in range(0, n, nb):
        c1 = min(c0 + nb, n)
        k = c1 - c0
        split_input(x, xs, c0, c1, top, left, xq)
        vq, mq = _chunk_view(v, k * tiles), _chunk_view(mm, k * tiles)
        input_transform(xq[:k], vq, ycol)
        for e in range(a * a):
            gemm(vq[e], u[e].T, mq[e], 0.0)
        if pool == 0:
            output_transform(mq, bias, out[c0:c1], z, yq)
        else:
            output_transform(mq, bias, chunk[:k], z, yq)
            K.maxpool_nhwc_forward(chunk[:k], pool, pool_stride, True, pooled[c0:c1],
                                   arg[c0:c1])


@njit(**_JIT)
def backward(x, xs, u, top, left, xq, ycol, v, mm, z, yq, dout, pooled_dout, arg,
             pool, pool_stride, dchunk, need_dx, du, db, dx):
    """The gradients, chunk by chunk: the conv output's gradient (``dout (N, Ho, Wo, F)``, or
    unpooled into ``dchunk (nb, Ho, Wo, F)`` from ``pooled_dout (N, Hp, Wp, F)`` and the
    forward's ``arg``; ``dout`` then empty) transformed into ``mm``, the chunk's input
    transformed again into ``v``, and ``du[e] (F, C) += mm[e]^T @ v[e]`` over the chunks;
    ``db (F,)`` float64 (zeroed here) the bias gradient. With ``need_dx``: ``v[e] = mm[e] @
    u[e]`` (``v`` is done with), transformed back into ``xq`` and added up into ``dx (N, H,
    W, C)``. Buffers as in :func:`forward`."""
    n = max(x.shape[0], xs.shape[0])
    nb, hp, a, tw = xq.shape[:4]
    tiles = (hp - 2) // (a - 2) * tw
    pooled = pooled_dout.shape[0] > 0
    for s in range(db.shape[0]):
        db[s] = 0.0
    for c0 in range(0, n, nb):
        c1 = min(c0 + nb, n)
        k = c1 - c0
        vq, mq = _chunk_view(v, k * tiles), _chunk_view(mm, k * tiles)
        if pooled:
            dq = dchunk[:k]
            K.maxpool_nhwc_backward(pooled_dout[c0:c1], arg[c0:c1], pool, pool_stride, dq)
        else:
            dq = dout[c0:c1]
        output_transform_adjoint(dq, mq, db, z, yq)
        split_input(x, xs, c0, c1, top, left, xq)
        input_transform(xq[:k], vq, ycol)
        for e in range(a * a):
            gemm(mq[e].T, vq[e], du[e], 0.0 if c0 == 0 else 1.0)
        if need_dx:
            for e in range(a * a):
                gemm(mq[e], u[e], vq[e], 0.0)
            input_transform_adjoint(vq, xq[:k], ycol)
            merge_input(xq[:k], c0, top, left, dx)
