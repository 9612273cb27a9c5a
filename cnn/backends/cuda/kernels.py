"""Numba CUDA kernels for every op of the backend contract (see :mod:`cnn.backends.base`).

Each kernel stands next to its threads-per-block constant and the grid arithmetic that launches
it; :mod:`cnn.backends.cuda.backend` only allocates outputs and launches. All kernels are
dtype-generic (float32 or float64, compiled lazily per signature): accumulators and constants
are created with ``arr.dtype.type(...)`` so float32 kernels never promote to float64, which
runs 1/32 to 1/64 as fast on consumer GPUs.

Design, for a real GPU (the CUDA simulator runs the same code, just slowly):

- Convolution is an *implicit GEMM*: the im2col matrix is never written to memory; every
  element of a ``TILE x TILE`` shared-memory tile is gathered from the image (zero in the
  padding), then the tile product runs out of shared memory. One thread per output element.
  Forward, backward-to-input and backward-to-weight are three such GEMMs (see each kernel).
- Dense layers use one tiled matrix-product kernel with transpose flags.
- Reductions (the dense bias gradient, the split-K partial sums, the loss) are shared-memory
  tree reductions inside a block, or a GEMM's own reduction (the conv bias gradient), so no
  two threads ever ``+=`` the same address.
- Tiles are loaded with bounds-checked zero fill and every ``cuda.syncthreads()`` is reached
  by all threads of the block (no early returns before a barrier).
- Consecutive ``threadIdx.x`` touch consecutive addresses of the array's contiguous axis
  (coalesced loads and stores); tiles that are stored transposed are padded by one column
  (``TILE_PAD``) so that the transposed writes do not all fall into the same bank.
"""
from __future__ import annotations

import math

from numba import cuda, int32


def ceil_div(a: int, b: int) -> int:
    return -(-a // b)


# ---- shared tiling constants ------------------------------------------------------------------
TILE = 16  # GEMM tile edge: a block of TILE x TILE threads computes a TILE x TILE output tile
TILE_PAD = TILE + 1  # row length of a shared tile: transposed stores hit distinct banks
GEMM_THREADS = (TILE, TILE)  # (x: output columns, y: output rows); 256 threads per block


def gemm_grid(rows: int, cols: int, splits: int = 1) -> tuple[int, int, int]:
    """Blocks for a ``rows x cols`` GEMM output: x walks columns (coalesced stores), y rows,
    z the split-K slices (only the weight gradient uses more than one)."""
    return ceil_div(cols, TILE), ceil_div(rows, TILE), splits


ELEMENTWISE_THREADS = 256  # 8 warps: enough in flight per block, any SM fits several blocks


def elementwise_grid(size: int) -> int:
    """One thread per element of a flat array of ``size`` elements."""
    return ceil_div(size, ELEMENTWISE_THREADS)


# ---- memory ------------------------------------------------------------------------------------
@cuda.jit
def fill_zero_kernel(a):
    """``a[:] = 0`` for a flat array ``a (L,)``. Launch: ``elementwise_grid(L)`` blocks of
    ``ELEMENTWISE_THREADS``."""
    i = cuda.grid(1)
    if i < a.shape[0]:
        a[i] = a.dtype.type(0)


# ---- convolution -------------------------------------------------------------------------------
# The implicit GEMMs walk a reduction index k that stands for a multi-index, (c, u, v) or
# (f, u, v) or (n, i, j). Decoding k with / and % in every tile step would cost several 64-bit
# integer divisions (tens of instructions each) per 16 multiply-adds, so each thread decodes
# its first k once and then steps the multi-index by TILE in mixed radix: no division in the
# loop. The helpers are inlined at the Numba IR level (inline="always"): a separately compiled
# device function would ask the current GPU for its compute capability, which makes
# compile_ptx fail on a machine without one (see cnn.bench.ptx).
@cuda.jit(device=True, inline="always")
def split_index(k, nb, nc):
    """k -> (a, b, c) with ``k = (a * nb + b) * nc + c``, ``b < nb``, ``c < nc``."""
    return k // (nb * nc), (k // nc) % nb, k % nc


@cuda.jit(device=True, inline="always")
def _step(a, b, c, da, db, dc, nb, nc):
    """``(a, b, c) + (da, db, dc)`` in the mixed radix ``(., nb, nc)``; needs ``db < nb`` and
    ``dc < nc``, as ``split_index`` of the step guarantees, so each digit carries at most once."""
    c += dc
    if c >= nc:
        c -= nc
        b += 1
    b += db
    if b >= nb:
        b -= nb
        a += 1
    return a + da, b, c


@cuda.jit(device=True, inline="always")
def _tap(a, stride, size):
    """``a / stride`` when that is an integer in ``[0, size)``, else -1: the output row (or
    column) whose window puts kernel tap ``a = h + pad - u`` on input row h. Stride 1, the
    common case, takes a warp-uniform branch that skips the division."""
    if a < 0:
        return -1
    q = a
    if stride != 1:
        q = a // stride
        if q * stride != a:
            return -1
    return q if q < size else -1


@cuda.jit
def conv2d_forward_kernel(x, w, b, stride, pad_top, pad_left, out):
    """Convolution forward (cross-correlation):
    ``out[n, f, i, j] = b[f] + sum_{c,u,v} w[f, c, u, v] * x[n, c, i*s+u-top, j*s+v-left]``.

    x ``(N, C, H, W)``, w ``(F, C, KH, KW)``, b ``(F,)``, out ``(N, F, Ho, Wo)``.
    Implicit GEMM ``out (F) x (N*Ho*Wo) = W (F) x (C*KH*KW) @ cols (C*KH*KW) x (N*Ho*Wo)``,
    reduction index ``k = (c, u, v)``, output column ``p = (n, i, j)``.
    Launch: ``gemm_grid(F, N*Ho*Wo)`` blocks of ``GEMM_THREADS``.
    """
    w_tile = cuda.shared.array((TILE, TILE_PAD), dtype=x.dtype)
    x_tile = cuda.shared.array((TILE, TILE_PAD), dtype=x.dtype)
    zero = x.dtype.type(0)
    n_img, n_ch, height, width = x.shape
    n_filt, _, kh, kw = w.shape
    _, _, ho, wo = out.shape
    k_total = n_ch * kh * kw
    n_cols = n_img * ho * wo
    tx = cuda.threadIdx.x
    ty = cuda.threadIdx.y
    f = cuda.blockIdx.y * TILE + ty
    p = cuda.blockIdx.x * TILE + tx
    n, i, j = split_index(p, ho, wo)  # this thread's output pixel, also the column it gathers
    dc, du, dv = split_index(TILE, kh, kw)
    wc, wu, wv = split_index(tx, kh, kw)  # W tile: k = k0 + tx (contiguous in w)
    xc, xu, xv = split_index(ty, kh, kw)  # x tile: k = k0 + ty
    acc = zero
    for k0 in range(0, k_total, TILE):
        if f < n_filt and wc < n_ch:
            w_tile[ty, tx] = w[f, wc, wu, wv]
        else:
            w_tile[ty, tx] = zero
        h_in = i * stride + xu - pad_top
        w_in = j * stride + xv - pad_left
        if p < n_cols and xc < n_ch and 0 <= h_in < height and 0 <= w_in < width:
            x_tile[ty, tx] = x[n, xc, h_in, w_in]  # consecutive tx: consecutive j
        else:
            x_tile[ty, tx] = zero  # outside the image: the zero padding
        cuda.syncthreads()
        for q in range(TILE):
            acc += w_tile[ty, q] * x_tile[q, tx]
        cuda.syncthreads()
        wc, wu, wv = _step(wc, wu, wv, dc, du, dv, kh, kw)
        xc, xu, xv = _step(xc, xu, xv, dc, du, dv, kh, kw)
    if f < n_filt and p < n_cols:
        out[n, f, i, j] = acc + b[f]


@cuda.jit
def conv2d_backward_input_kernel(dout, w, stride, pad_top, pad_left, dx):
    """Convolution gradient to the input:
    ``dx[n, c, h, x] = sum_{f,u,v} w[f, c, u, v] * dout[n, f, (h+top-u)/s, (x+left-v)/s]``
    over the terms whose output position is an integer inside ``(Ho, Wo)``.

    dout ``(N, F, Ho, Wo)``, w ``(F, C, KH, KW)``, dx ``(N, C, H, W)``.
    Implicit GEMM ``dx (C) x (N*H*W) = W^T (C) x (F*KH*KW) @ G (F*KH*KW) x (N*H*W)``, where G
    gathers dout (zero where no output window used that input pixel). A gather, not a
    scatter: each dx element is owned by one thread, so overlapping windows cannot race.
    Launch: ``gemm_grid(C, N*H*W)`` blocks of ``GEMM_THREADS``.
    """
    w_tile = cuda.shared.array((TILE, TILE_PAD), dtype=dout.dtype)
    g_tile = cuda.shared.array((TILE, TILE_PAD), dtype=dout.dtype)
    zero = dout.dtype.type(0)
    n_img, n_ch, height, width = dx.shape
    n_filt, _, kh, kw = w.shape
    _, _, ho, wo = dout.shape
    k_total = n_filt * kh * kw
    n_cols = n_img * height * width
    tx = cuda.threadIdx.x
    ty = cuda.threadIdx.y
    c = cuda.blockIdx.y * TILE + ty
    p = cuda.blockIdx.x * TILE + tx
    n, h, x_pos = split_index(p, height, width)
    df, du, dv = split_index(TILE, kh, kw)
    wf, wu, wv = split_index(tx, kh, kw)  # W^T tile: k = k0 + tx (contiguous along v)
    gf, gu, gv = split_index(ty, kh, kw)  # G tile: k = k0 + ty
    acc = zero
    for k0 in range(0, k_total, TILE):
        if c < n_ch and wf < n_filt:
            w_tile[ty, tx] = w[wf, c, wu, wv]
        else:
            w_tile[ty, tx] = zero
        i = _tap(h + pad_top - gu, stride, ho)
        j = _tap(x_pos + pad_left - gv, stride, wo)
        if p < n_cols and gf < n_filt and i >= 0 and j >= 0:
            g_tile[ty, tx] = dout[n, gf, i, j]
        else:
            g_tile[ty, tx] = zero
        cuda.syncthreads()
        for q in range(TILE):
            acc += w_tile[ty, q] * g_tile[q, tx]
        cuda.syncthreads()
        wf, wu, wv = _step(wf, wu, wv, df, du, dv, kh, kw)
        gf, gu, gv = _step(gf, gu, gv, df, du, dv, kh, kw)
    if c < n_ch and p < n_cols:
        dx[n, c, h, x_pos] = acc


# Split-K for the weight gradient: its output (F x C*KH*KW) is small while its reduction
# (N*Ho*Wo) is long, so without splitting only a handful of blocks would run on a GPU with
# 80-132 SMs. Each z-slice of the grid reduces one chunk of the reduction into its own partial
# slab; ``column_sums_kernel`` then adds the slabs (deterministic, no atomics).
DW_TARGET_BLOCKS = 512  # about 4 blocks per SM on the largest GPUs
DW_MIN_CHUNK = 8 * TILE  # each slice runs at least 8 tile steps, so the slab traffic stays small


def conv2d_dw_splits(n_filt: int, n_cols: int, k_total: int) -> tuple[int, int]:
    """``(splits, chunk)`` for a weight gradient GEMM of ``n_filt x n_cols`` outputs (the
    ``C*KH*KW`` weights plus the bias column) reduced over ``k_total = N*Ho*Wo`` terms: slice
    z reduces ``[z*chunk, min((z+1)*chunk, k_total))``."""
    tiles = ceil_div(n_filt, TILE) * ceil_div(n_cols, TILE)
    splits = min(ceil_div(DW_TARGET_BLOCKS, tiles), ceil_div(k_total, DW_MIN_CHUNK))
    chunk = ceil_div(ceil_div(k_total, splits), TILE) * TILE
    return ceil_div(k_total, chunk), chunk


@cuda.jit
def conv2d_backward_weight_kernel(x, dout, stride, pad_top, pad_left, chunk, dw_part, db_part):
    """Weight and bias gradients of slice z of the reduction over ``(n, i, j)``:
    ``dw_part[z, f, c, u, v] = sum dout[n, f, i, j] * x[n, c, i*s + u - top, j*s + v - left]``,
    ``db_part[z, f] = sum dout[n, f, i, j]``.

    x ``(N, C, H, W)``, dout ``(N, F, Ho, Wo)``, dw_part ``(S, F, C, KH, KW)``, db_part
    ``(S, F)`` with ``(S, chunk) = conv2d_dw_splits(F, C*KH*KW + 1, N*Ho*Wo)``; with
    ``S == 1`` they may be views of dw and db themselves.
    Implicit GEMM ``[dW | db] (F) x (C*KH*KW + 1) = D (F) x (N*Ho*Wo) @ [cols^T | 1]``: the
    bias gradient is the product with a column of ones appended to cols^T (Caffe's "bias
    multiplier"), so it costs one more output column instead of another pass over dout.
    Launch: ``gemm_grid(F, C*KH*KW + 1, S)`` blocks of ``GEMM_THREADS``.
    """
    d_tile = cuda.shared.array((TILE, TILE_PAD), dtype=x.dtype)
    x_tile = cuda.shared.array((TILE, TILE_PAD), dtype=x.dtype)
    zero = x.dtype.type(0)
    n_img, n_ch, height, width = x.shape
    _, n_filt, ho, wo = dout.shape
    _, _, _, kh, kw = dw_part.shape
    k_cols = n_ch * kh * kw  # output columns C*KH*KW are weights; column k_cols is the bias
    k_total = n_img * ho * wo
    tx = cuda.threadIdx.x
    ty = cuda.threadIdx.y
    row0 = cuda.blockIdx.y * TILE
    col0 = cuda.blockIdx.x * TILE
    z = cuda.blockIdx.z
    # The cols^T tile is loaded transposed (thread (ty, tx) fetches column col0 + ty at
    # reduction index k0 + tx) so that consecutive tx read consecutive output pixels j, which
    # are consecutive (stride s) addresses of x. That column's (c, u, v) is fixed per thread.
    load_col = col0 + ty
    c_ld, u_ld, v_ld = split_index(load_col, kh, kw)
    k_end = min((z + 1) * chunk, k_total)
    dn, di, dj = split_index(TILE, ho, wo)
    n, i, j = split_index(z * chunk + tx, ho, wo)  # both tiles: reduction index k = k0 + tx
    acc = zero
    for k0 in range(z * chunk, k_end, TILE):
        k = k0 + tx
        # D tile: row row0 + ty, reduction index k (contiguous in dout).
        if row0 + ty < n_filt and k < k_end:
            d_tile[ty, tx] = dout[n, row0 + ty, i, j]
        else:
            d_tile[ty, tx] = zero
        h_in = i * stride + u_ld - pad_top
        w_in = j * stride + v_ld - pad_left
        if load_col < k_cols and k < k_end and 0 <= h_in < height and 0 <= w_in < width:
            x_tile[tx, ty] = x[n, c_ld, h_in, w_in]
        elif load_col == k_cols and k < k_end:
            x_tile[tx, ty] = x.dtype.type(1)  # the bias column
        else:
            x_tile[tx, ty] = zero  # zero padding, or past the end of this slice
        cuda.syncthreads()
        for q in range(TILE):
            acc += d_tile[ty, q] * x_tile[q, tx]
        cuda.syncthreads()
        n, i, j = _step(n, i, j, dn, di, dj, ho, wo)
    f = row0 + ty
    col = col0 + tx
    if f < n_filt:
        if col < k_cols:
            c, u, v = split_index(col, kh, kw)
            dw_part[z, f, c, u, v] = acc
        elif col == k_cols:
            db_part[z, f] = acc


COLUMN_SUM_COLS = 32  # threadIdx.x: one warp spans 32 consecutive columns (coalesced rows)
COLUMN_SUM_ROWS = 8  # threadIdx.y: row phases a column is split into; a power of two
COLUMN_SUM_THREADS = (COLUMN_SUM_COLS, COLUMN_SUM_ROWS)


def column_sum_grid(cols: int) -> int:
    return ceil_div(cols, COLUMN_SUM_COLS)


@cuda.jit
def column_sums_kernel(a, out):
    """``out[l] = sum_r a[r, l]`` for ``a (R, L)``: the dense bias gradient, and the sum of
    the conv weight-gradient split-K slabs.

    Thread (x, y) adds rows ``y, y + 8, ...`` of column ``x``; the 8 partial sums of a column
    meet in a shared-memory tree. Launch: ``column_sum_grid(L)`` blocks of
    ``COLUMN_SUM_THREADS``.
    """
    part = cuda.shared.array((COLUMN_SUM_ROWS, COLUMN_SUM_COLS), dtype=a.dtype)
    n_rows, n_cols = a.shape
    tx = cuda.threadIdx.x
    ty = cuda.threadIdx.y
    col = cuda.blockIdx.x * COLUMN_SUM_COLS + tx
    acc = a.dtype.type(0)
    if col < n_cols:
        for r in range(ty, n_rows, COLUMN_SUM_ROWS):
            acc += a[r, col]
    part[ty, tx] = acc
    cuda.syncthreads()
    half = COLUMN_SUM_ROWS // 2
    while half > 0:
        if ty < half:
            part[ty, tx] += part[ty + half, tx]
        cuda.syncthreads()
        half //= 2
    if ty == 0 and col < n_cols:
        out[col] = part[0, tx]


# ---- pooling -----------------------------------------------------------------------------------
# The pooling kernels see images as planes: (N, C, H, W) viewed as (N*C, H, W), a free
# reshape that saves a division per thread and the 4-D address arithmetic.
@cuda.jit
def maxpool2d_forward_kernel(x, pool, stride, out, argmax):
    """``out[p, i, j] = max`` of the ``pool x pool`` window at ``(i*s, j*s)`` of plane p.

    x ``(N*C, H, W)``, out ``(N*C, Ho, Wo)``, argmax ``(N*C, Ho, Wo)`` int32: the winner's
    row-major offset ``u * pool + v`` inside its window (strict ``>``: the first maximum wins
    ties, as the contract says). One thread per output element, flat index over out.
    Launch: ``elementwise_grid(N*C*Ho*Wo)`` blocks of ``ELEMENTWISE_THREADS``.
    """
    idx = cuda.grid(1)
    planes, ho, wo = out.shape
    if idx < planes * ho * wo:
        pl, i, j = split_index(idx, ho, wo)
        h0 = i * stride
        w0 = j * stride
        best = x[pl, h0, w0]
        arg = 0
        for u in range(pool):
            for v in range(pool):
                val = x[pl, h0 + u, w0 + v]
                if val > best:
                    best = val
                    arg = u * pool + v
        out[pl, i, j] = best
        argmax[pl, i, j] = arg


@cuda.jit
def maxpool2d_backward_kernel(dout, argmax, pool, stride, dx):
    """``dx[p, h, w] = sum`` of ``dout`` over the windows of plane p whose argmax is (h, w).

    dout, argmax ``(N*C, Ho, Wo)``, dx ``(N*C, H, W)``. One thread per *input* element
    gathers from the (at most ``ceil(pool/s)^2``) windows that contain it, so overlapping
    windows never make two threads write one address.
    Launch: ``elementwise_grid(N*C*H*W)`` blocks of ``ELEMENTWISE_THREADS``.
    """
    idx = cuda.grid(1)
    planes, height, width = dx.shape
    _, ho, wo = dout.shape
    if idx < planes * height * width:
        pl, h, w = split_index(idx, height, width)
        # windows i with i*s <= h <= i*s + pool - 1, clipped to the output
        i_lo = max(h - pool + stride, 0) // stride
        i_hi = min(h // stride, ho - 1)
        j_lo = max(w - pool + stride, 0) // stride
        j_hi = min(w // stride, wo - 1)
        acc = dout.dtype.type(0)
        # while, not range(): LLVM unrolls range() loops with runtime bounds, which costs
        # registers per thread here, and with them occupancy (see results/gpu_kernels.csv).
        i = i_lo
        while i <= i_hi:
            j = j_lo
            while j <= j_hi:
                if argmax[pl, i, j] == (h - i * stride) * pool + (w - j * stride):
                    acc += dout[pl, i, j]
                j += 1
            i += 1
        dx[pl, h, w] = acc


# ---- activations -------------------------------------------------------------------------------
@cuda.jit
def relu_forward_kernel(x, out):
    """``out = max(x, 0)`` on flat arrays ``(L,)``.
    Launch: ``elementwise_grid(L)`` blocks of ``ELEMENTWISE_THREADS``."""
    i = cuda.grid(1)
    if i < x.shape[0]:
        zero = x.dtype.type(0)  # typed: comparing with a literal 0 would convert to float64
        v = x[i]
        out[i] = v if v > zero else zero


@cuda.jit
def relu_backward_kernel(dout, out, dx):
    """``dx = dout * (out > 0)`` on flat arrays ``(L,)``; ``out`` is the forward output, which
    is positive exactly where the input was. Launch: ``elementwise_grid(L)`` blocks of
    ``ELEMENTWISE_THREADS``."""
    i = cuda.grid(1)
    if i < dout.shape[0]:
        zero = dout.dtype.type(0)
        dx[i] = dout[i] if out[i] > zero else zero


# ---- dense -------------------------------------------------------------------------------------
@cuda.jit
def matmul_kernel(a, b, bias, trans_a, trans_b, c):
    """``c = op(a) @ op(b) (+ bias[None, :])`` with ``op(a) (M, K)``, ``op(b) (K, N)``,
    ``c (M, N)``; ``op`` transposes when its flag is set; an empty ``bias (0,)`` means none.

    Dense forward is ``x @ w + b``, backward ``dout @ w.T`` and ``x.T @ dout``. Tiles of a
    transposed operand are loaded transposed, so consecutive tx always read along the
    operand's contiguous axis. Launch: ``gemm_grid(M, N)`` blocks of ``GEMM_THREADS``.
    """
    a_tile = cuda.shared.array((TILE, TILE_PAD), dtype=c.dtype)
    b_tile = cuda.shared.array((TILE, TILE_PAD), dtype=c.dtype)
    zero = c.dtype.type(0)
    m, n = c.shape
    k_total = a.shape[0] if trans_a else a.shape[1]
    tx = cuda.threadIdx.x
    ty = cuda.threadIdx.y
    row0 = cuda.blockIdx.y * TILE
    col0 = cuda.blockIdx.x * TILE
    acc = zero
    for k0 in range(0, k_total, TILE):
        # a_tile[r, q] = op(a)[row0 + r, k0 + q]
        if trans_a:
            if row0 + tx < m and k0 + ty < k_total:
                a_tile[tx, ty] = a[k0 + ty, row0 + tx]
            else:
                a_tile[tx, ty] = zero
        else:
            if row0 + ty < m and k0 + tx < k_total:
                a_tile[ty, tx] = a[row0 + ty, k0 + tx]
            else:
                a_tile[ty, tx] = zero
        # b_tile[q, s] = op(b)[k0 + q, col0 + s]
        if trans_b:
            if col0 + ty < n and k0 + tx < k_total:
                b_tile[tx, ty] = b[col0 + ty, k0 + tx]
            else:
                b_tile[tx, ty] = zero
        else:
            if k0 + ty < k_total and col0 + tx < n:
                b_tile[ty, tx] = b[k0 + ty, col0 + tx]
            else:
                b_tile[ty, tx] = zero
        cuda.syncthreads()
        for q in range(TILE):
            acc += a_tile[ty, q] * b_tile[q, tx]
        cuda.syncthreads()
    row = row0 + ty
    col = col0 + tx
    if row < m and col < n:
        if bias.shape[0] > 0:
            acc += bias[col]
        c[row, col] = acc


# ---- loss --------------------------------------------------------------------------------------
XENT_THREADS = 256  # a single block: a batch's rows are few and cheap (K ~ 10 classes each)


@cuda.jit
def softmax_xent_kernel(logits, labels, inv_n, dlogits, loss, correct):
    """Softmax cross-entropy and its gradient in one pass, with the batch sums on the device.

    logits ``(N, K)``, labels ``(N,)`` ints, ``inv_n = 1/N`` in the logits' dtype; writes
    ``dlogits (N, K) = (softmax - onehot) / N``, ``loss (1,) = mean(logsumexp - logit[label])``
    and ``correct (1,)`` int32 ``= #rows whose first argmax is the label``. Each thread takes
    rows ``t, t + XENT_THREADS, ...``; per-thread sums meet in a shared-memory tree, so the
    scalars need neither atomics nor a prior zero fill, and the sum order is fixed.
    Launch: 1 block of ``XENT_THREADS``.
    """
    loss_part = cuda.shared.array(XENT_THREADS, dtype=logits.dtype)
    hit_part = cuda.shared.array(XENT_THREADS, dtype=int32)
    dt = logits.dtype.type
    n, k = logits.shape
    t = cuda.threadIdx.x
    row_loss = dt(0)
    hits = int32(0)
    for r in range(t, n, XENT_THREADS):
        top = logits[r, 0]
        best = 0
        for q in range(1, k):
            if logits[r, q] > top:
                top = logits[r, q]
                best = q
        total = dt(0)
        for q in range(k):
            total += math.exp(logits[r, q] - top)
        lse = top + math.log(total)  # log-sum-exp shifted by the row max: no overflow
        y = labels[r]
        row_loss += lse - logits[r, y]
        for q in range(k):
            prob = math.exp(logits[r, q] - lse)
            dlogits[r, q] = (prob - dt(1) if q == y else prob) * inv_n
        if best == y:
            hits += int32(1)
    loss_part[t] = row_loss
    hit_part[t] = hits
    cuda.syncthreads()
    half = XENT_THREADS // 2
    while half > 0:
        if t < half:
            loss_part[t] += loss_part[t + half]
            hit_part[t] += hit_part[t + half]
        cuda.syncthreads()
        half //= 2
    if t == 0:
        loss[0] = loss_part[0] * inv_n
        correct[0] = hit_part[0]


# ---- optimizer primitives ----------------------------------------------------------------------
# The three element-wise updates every optimizer of cnn.optim is written with (see the contract
# in cnn/backends/base.py). Flat arrays ``(L,)``; the scalars arrive in the arrays' dtype as
# kernel parameters (a schedule changes the learning rate every step without recompiling).
# Launch: ``elementwise_grid(L)`` blocks of ``ELEMENTWISE_THREADS``, one thread per element.
@cuda.jit
def axpby_kernel(y, a, x, b):
    """In place ``y = a * y + b * x``."""
    i = cuda.grid(1)
    if i < y.shape[0]:
        y[i] = a * y[i] + b * x[i]


@cuda.jit
def axpby_square_kernel(y, a, x, b):
    """In place ``y = a * y + b * x * x``."""
    i = cuda.grid(1)
    if i < y.shape[0]:
        xi = x[i]
        y[i] = a * y[i] + b * (xi * xi)


@cuda.jit
def axpby_ratio_kernel(y, a, b, num, den, eps, eps_inside, center, centered):
    """In place ``y = a * y + b * num / d``, ``d = sqrt(den - center**2) + eps`` or, with
    ``eps_inside``, ``sqrt(den - center**2 + eps)``; ``center`` is read only when
    ``centered`` (otherwise any array of the dtype, e.g. empty)."""
    i = cuda.grid(1)
    if i < y.shape[0]:
        d = den[i]
        if centered:
            c = center[i]
            d -= c * c
        if eps_inside:
            d = math.sqrt(d + eps)
        else:
            d = math.sqrt(d) + eps
        y[i] = a * y[i] + b * (num[i] / d)
