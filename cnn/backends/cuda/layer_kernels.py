"""Numba CUDA kernels for sigmoid, tanh, dropout, batch normalisation, residual blocks, global
average pooling, binary cross-entropy and weight penalties (the ops
:class:`~cnn.backends.cuda.layer_ops.CudaLayerOps` launches).

Conventions of :mod:`cnn.backends.cuda.kernels`: each kernel stands next to its threads-per-block
constant and its grid arithmetic; kernels are dtype-generic, with constants made by
``arr.dtype.type(...)`` and scalars passed in the array's dtype, so a float32 kernel does no
float64 arithmetic (``tests/test_cuda_ptx.py`` checks the PTX); reductions are shared-memory
trees inside one block, so no two threads ``+=`` the same address and the order is fixed;
every ``cuda.syncthreads()`` is reached by all threads of the block.

- Elementwise kernels (activations, dropout, batch-norm normalisation and its input gradient,
  the penalty gradient): one thread per element, ``elementwise_grid(L)`` blocks of
  ``ELEMENTWISE_THREADS``; consecutive threads touch consecutive addresses.
- Per-channel sums of batch norm: one block per channel, whose threads stride over the
  channel's ``N*L`` values (consecutive threads read consecutive positions of one image row),
  then a tree.
- Batch-level scalars (binary cross-entropy, the weight penalty): one block, like
  ``softmax_xent_kernel``.
- Residual blocks: the sum (with its ReLU) is elementwise on flat arrays; option A's shortcut
  and its backward run one thread per element of the array they write, so every element is
  written once, zeros included. Global average pooling: one block per image plane, a tree like
  batch norm's sums; its backward is elementwise.

Dropout computes its mask from a counter-based hash (:mod:`cnn.backends.rng`): 64-bit integer
arithmetic, a few dozen instructions per element, no state, the same bits as NumPy and Numba.
"""
from __future__ import annotations

import math
import warnings

import numpy as np
from numba import config, cuda, int32, uint64

from .. import rng
from .kernels import ELEMENTWISE_THREADS, elementwise_grid, split_index  # noqa: F401 (re-exported)

if config.ENABLE_CUDASIM:
    # the hash wraps modulo 2**64 by design; the simulator runs kernels on NumPy scalars, which
    # warn at every wrap (from each simulated thread, so np.errstate cannot silence them)
    warnings.filterwarnings("ignore", message="overflow encountered", category=RuntimeWarning,
                            module=__name__)

_GOLDEN = np.uint64(rng.GOLDEN)
_MIX1 = np.uint64(rng.MIX1)
_MIX2 = np.uint64(rng.MIX2)
_S27, _S30, _S31, _S32 = np.uint64(27), np.uint64(30), np.uint64(31), np.uint64(32)


@cuda.jit(device=True, inline="always")
def _mix64(z):
    """The SplitMix64 finaliser (inlined at the IR level, see the note in cuda/kernels.py)."""
    z = (z ^ (z >> _S30)) * _MIX1
    z = (z ^ (z >> _S27)) * _MIX2
    return z ^ (z >> _S31)


# ---- activations (flat arrays (L,)) ------------------------------------------------------------
@cuda.jit
def sigmoid_forward_kernel(x, out):
    """``out = 1 / (1 + exp(-x))``, ``exp`` of ``-|x|`` only (no overflow)."""
    i = cuda.grid(1)
    if i < x.shape[0]:
        one = x.dtype.type(1)
        v = x[i]
        if v >= x.dtype.type(0):
            out[i] = one / (one + math.exp(-v))
        else:
            e = math.exp(v)
            out[i] = e / (one + e)


@cuda.jit
def sigmoid_backward_kernel(dout, out, dx):
    """``dx = dout * out * (1 - out)``."""
    i = cuda.grid(1)
    if i < dout.shape[0]:
        s = out[i]
        dx[i] = dout[i] * (s * (dout.dtype.type(1) - s))


@cuda.jit
def tanh_forward_kernel(x, out):
    i = cuda.grid(1)
    if i < x.shape[0]:
        out[i] = math.tanh(x[i])


@cuda.jit
def tanh_backward_kernel(dout, out, dx):
    """``dx = dout * (1 - out**2)``."""
    i = cuda.grid(1)
    if i < dout.shape[0]:
        t = out[i]
        dx[i] = dout[i] * (dout.dtype.type(1) - t * t)


# ---- dropout -----------------------------------------------------------------------------------
@cuda.jit
def dropout_forward_kernel(x2, key, thresh, offset, scale, out2, mask2):
    """x2 ``(N, D)``: unit ``j`` of row ``i`` is kept (``out = x * scale``, ``mask = 1``) when
    ``mix64(mix64(key + (offset+i+1)*G) + (j+1)*G) >> 32 >= thresh``, else zeroed.
    Launch: ``elementwise_grid(N*D)`` blocks of ``ELEMENTWISE_THREADS``."""
    idx = cuda.grid(1)
    n, d = x2.shape
    if idx < n * d:
        i = idx // d
        j = idx - i * d
        row = _mix64(key + uint64(offset + i + 1) * _GOLDEN)
        bits = _mix64(row + uint64(j + 1) * _GOLDEN)
        if (bits >> _S32) >= thresh:
            out2[i, j] = x2[i, j] * scale
            mask2[i, j] = 1
        else:
            out2[i, j] = x2.dtype.type(0)
            mask2[i, j] = 0


@cuda.jit
def dropout_backward_kernel(dout, mask, scale, dx):
    """``dx = dout * scale`` where the unit was kept, else 0 (flat arrays)."""
    i = cuda.grid(1)
    if i < dout.shape[0]:
        dx[i] = dout[i] * scale if mask[i] else dout.dtype.type(0)


@cuda.jit(device=True, inline="always")
def _block_sum(part, t, value):
    """The sum of every thread's ``value`` into ``part[0]``: ``part`` is the block's shared
    array, one slot per thread (a power of two), ``t`` the thread's index; half the threads add
    the other half's slots until one is left. Every thread of the block calls it (it holds the
    barriers)."""
    part[t] = value
    cuda.syncthreads()
    half = part.shape[0] // 2
    while half > 0:
        if t < half:
            part[t] += part[t + half]
        cuda.syncthreads()
        half //= 2


# ---- batch normalisation (x as (N, C, L)) --------------------------------------------------------
CHANNEL_THREADS = 256  # threads of the one block that reduces one channel; a power of two


def channel_grid(channels: int) -> int:
    """One block per channel."""
    return channels


@cuda.jit
def channel_sums_kernel(x3, out):
    """``out[c] = sum x3[:, c, :]``. Launch: ``channel_grid(C)`` blocks of ``CHANNEL_THREADS``."""
    part = cuda.shared.array(CHANNEL_THREADS, dtype=x3.dtype)
    c = cuda.blockIdx.x
    t = cuda.threadIdx.x
    n, _, length = x3.shape
    acc = x3.dtype.type(0)
    for e in range(t, n * length, CHANNEL_THREADS):
        i = e // length
        acc += x3[i, c, e - i * length]
    _block_sum(part, t, acc)
    if t == 0:
        out[c] = part[0]


@cuda.jit
def channel_sq_dev_sums_kernel(x3, sums, factor, out):
    """``out[c] = sum (x3[:, c, :] - sums[c] * factor)**2``.
    Launch: ``channel_grid(C)`` blocks of ``CHANNEL_THREADS``."""
    part = cuda.shared.array(CHANNEL_THREADS, dtype=x3.dtype)
    c = cuda.blockIdx.x
    t = cuda.threadIdx.x
    n, _, length = x3.shape
    mean = sums[c] * factor
    acc = x3.dtype.type(0)
    for e in range(t, n * length, CHANNEL_THREADS):
        i = e // length
        d = x3[i, c, e - i * length] - mean
        acc += d * d
    _block_sum(part, t, acc)
    if t == 0:
        out[c] = part[0]


@cuda.jit
def batchnorm_normalize_kernel(x3, sums, sq_sums, factor, eps, gamma, beta, out3, xhat3, inv_std):
    """``mean = sums * factor``, ``var = sq_sums * factor`` per channel (training: the batch's
    sums and ``1/L``; inference: the running statistics and 1); ``xhat = (x - mean) /
    sqrt(var + eps)``, ``out = xhat * gamma + beta``; ``inv_std[c]`` is written by the thread
    of element ``(0, c, 0)``. Launch: ``elementwise_grid(N*C*L)`` blocks of
    ``ELEMENTWISE_THREADS``."""
    idx = cuda.grid(1)
    n, c_count, length = x3.shape
    if idx < n * c_count * length:
        plane = idx // length
        j = idx - plane * length
        i = plane // c_count
        c = plane - i * c_count
        s = x3.dtype.type(1) / math.sqrt(sq_sums[c] * factor + eps)
        h = (x3[i, c, j] - sums[c] * factor) * s
        xhat3[i, c, j] = h
        out3[i, c, j] = h * gamma[c] + beta[c]
        if i == 0 and j == 0:
            inv_std[c] = s


@cuda.jit
def batchnorm_running_kernel(running_mean, running_var, sums, sq_sums, factor, keep, take,
                             new_mean, new_var):
    """``new = running * keep + (sums * factor) * take`` for the mean and the variance
    (``keep = momentum``, ``take = 1 - momentum``). Launch: ``elementwise_grid(C)`` blocks of
    ``ELEMENTWISE_THREADS``."""
    c = cuda.grid(1)
    if c < running_mean.shape[0]:
        new_mean[c] = running_mean[c] * keep + (sums[c] * factor) * take
        new_var[c] = running_var[c] * keep + (sq_sums[c] * factor) * take


@cuda.jit
def batchnorm_backward_sums_kernel(dout3, xhat3, s_dy, s_dyx):
    """``s_dy[c] = sum dout``, ``s_dyx[c] = sum dout * xhat`` over channel ``c``.
    Launch: ``channel_grid(C)`` blocks of ``CHANNEL_THREADS``."""
    part_a = cuda.shared.array(CHANNEL_THREADS, dtype=dout3.dtype)
    part_b = cuda.shared.array(CHANNEL_THREADS, dtype=dout3.dtype)
    c = cuda.blockIdx.x
    t = cuda.threadIdx.x
    n, _, length = dout3.shape
    a = dout3.dtype.type(0)
    b = dout3.dtype.type(0)
    for e in range(t, n * length, CHANNEL_THREADS):
        i = e // length
        j = e - i * length
        g = dout3[i, c, j]
        a += g
        b += g * xhat3[i, c, j]
    part_a[t] = a
    part_b[t] = b
    cuda.syncthreads()
    half = CHANNEL_THREADS // 2
    while half > 0:
        if t < half:
            part_a[t] += part_a[t + half]
            part_b[t] += part_b[t + half]
        cuda.syncthreads()
        half //= 2
    if t == 0:
        s_dy[c] = part_a[0]
        s_dyx[c] = part_b[0]


@cuda.jit
def batchnorm_backward_dx_kernel(dout3, xhat3, gamma, inv_std, s_dy, s_dyx, scale, dx3):
    """``dx = gamma * inv_std * (dout - (s_dy + xhat * s_dyx) * scale)`` per channel.
    Launch: ``elementwise_grid(N*C*L)`` blocks of ``ELEMENTWISE_THREADS``."""
    idx = cuda.grid(1)
    n, c_count, length = dout3.shape
    if idx < n * c_count * length:
        plane = idx // length
        j = idx - plane * length
        i = plane // c_count
        c = plane - i * c_count
        corr = (s_dy[c] + xhat3[i, c, j] * s_dyx[c]) * scale
        dx3[i, c, j] = (gamma[c] * inv_std[c]) * (dout3[i, c, j] - corr)


# ---- residual blocks ---------------------------------------------------------------------------
@cuda.jit
def residual_add_kernel(a, b, relu, out):
    """``out = a + b``, then ``max(out, 0)`` when ``relu``, on flat arrays ``(L,)``: a block's
    sum with its ReLU, and (``relu`` False) the sum of its branches' input gradients. The sum's
    backward is :func:`~cnn.backends.cuda.kernels.relu_backward_kernel` on its output.
    Launch: ``elementwise_grid(L)`` blocks of ``ELEMENTWISE_THREADS``."""
    i = cuda.grid(1)
    if i < out.shape[0]:
        zero = out.dtype.type(0)
        s = a[i] + b[i]
        out[i] = s if (s > zero or not relu) else zero


@cuda.jit
def shortcut_pad_kernel(x, stride, before, out):
    """Option A's shortcut: ``out[n, before + c, i, j] = x[n, c, i * stride, j * stride]`` for
    ``x (N, C, H, W)``, zeros in the other channels of ``out (N, C', Ho, Wo)``. One thread per
    output element. Launch: ``elementwise_grid(N*C'*Ho*Wo)`` blocks of
    ``ELEMENTWISE_THREADS``."""
    idx = cuda.grid(1)
    n_img, c_out, ho, wo = out.shape
    if idx < n_img * c_out * ho * wo:
        plane, i, j = split_index(idx, ho, wo)
        n = plane // c_out
        k = plane - n * c_out
        c = k - before
        if c >= 0 and c < x.shape[1]:
            out[n, k, i, j] = x[n, c, i * stride, j * stride]
        else:
            out[n, k, i, j] = out.dtype.type(0)


@cuda.jit
def shortcut_unpad_kernel(dout, stride, before, dx):
    """The adjoint of :func:`shortcut_pad_kernel`: ``dx[n, c, y, x] = dout[n, before + c, y /
    stride, x / stride]`` where ``stride`` divides ``y`` and ``x``, else 0. One thread per
    element of ``dx (N, C, H, W)``. Launch: ``elementwise_grid(N*C*H*W)`` blocks of
    ``ELEMENTWISE_THREADS``."""
    idx = cuda.grid(1)
    n_img, c_in, height, width = dx.shape
    if idx < n_img * c_in * height * width:
        plane, y, xc = split_index(idx, height, width)
        n = plane // c_in
        c = plane - n * c_in
        i = y // stride
        j = xc // stride
        if y == i * stride and xc == j * stride:
            dx[n, c, y, xc] = dout[n, before + c, i, j]
        else:
            dx[n, c, y, xc] = dx.dtype.type(0)


# ---- global average pooling (images as planes (N*C, H*W)) ----------------------------------------
#: threads of the block that averages one plane: a power of two; two warps, as the planes ResNet
#: pools hold 8 x 8 values
PLANE_THREADS = 64


def plane_grid(planes: int) -> int:
    """One block per plane."""
    return planes


@cuda.jit
def plane_means_kernel(x2, out):
    """``out[p] = sum x2[p, :] / L`` for ``x2 (N*C, L)``: threads stride over the plane (the
    consecutive values of one plane), then a tree. Launch: ``plane_grid(N*C)`` blocks of
    ``PLANE_THREADS``."""
    part = cuda.shared.array(PLANE_THREADS, dtype=x2.dtype)
    p = cuda.blockIdx.x
    t = cuda.threadIdx.x
    length = x2.shape[1]
    acc = x2.dtype.type(0)
    for j in range(t, length, PLANE_THREADS):
        acc += x2[p, j]
    _block_sum(part, t, acc)
    if t == 0:
        out[p] = part[0] / x2.dtype.type(length)


@cuda.jit
def spread_means_kernel(dout, dx2):
    """The adjoint of :func:`plane_means_kernel`: ``dx2[p, j] = dout[p] / L`` for ``dx2 (N*C,
    L)``. Launch: ``elementwise_grid(N*C*L)`` blocks of ``ELEMENTWISE_THREADS``."""
    idx = cuda.grid(1)
    planes, length = dx2.shape
    if idx < planes * length:
        p = idx // length
        dx2[p, idx - p * length] = dout[p] / dx2.dtype.type(length)


# ---- binary cross-entropy ----------------------------------------------------------------------
BCE_THREADS = 256  # a single block, as softmax_xent_kernel


@cuda.jit
def bce_kernel(logits, labels, inv_n, dlogits, loss, correct):
    """Binary cross-entropy from logits ``(N, 1)`` and labels ``(N,)`` in {0, 1}:
    ``loss (1,) = mean(max(z, 0) - z*y + log(1 + exp(-|z|)))``, ``dlogits = (sigmoid(z) - y)
    / N``, ``correct (1,)`` int32 ``= #rows with (z > 0) == y``. Threads take rows
    ``t, t + BCE_THREADS, ...``; sums meet in a shared-memory tree. Launch: 1 block of
    ``BCE_THREADS``."""
    loss_part = cuda.shared.array(BCE_THREADS, dtype=logits.dtype)
    hit_part = cuda.shared.array(BCE_THREADS, dtype=int32)
    dt = logits.dtype.type
    zero, one = dt(0), dt(1)
    n = logits.shape[0]
    t = cuda.threadIdx.x
    acc = zero
    hits = int32(0)
    for r in range(t, n, BCE_THREADS):
        z = logits[r, 0]
        y = dt(labels[r])
        e = math.exp(-abs(z))
        acc += (z if z > zero else zero) - z * y + math.log1p(e)
        p = one / (one + e) if z >= zero else e / (one + e)
        dlogits[r, 0] = (p - y) * inv_n
        if (z > zero) == (labels[r] == 1):
            hits += int32(1)
    loss_part[t] = acc
    hit_part[t] = hits
    cuda.syncthreads()
    half = BCE_THREADS // 2
    while half > 0:
        if t < half:
            loss_part[t] += loss_part[t + half]
            hit_part[t] += hit_part[t + half]
        cuda.syncthreads()
        half //= 2
    if t == 0:
        loss[0] = loss_part[0] * inv_n
        correct[0] = hit_part[0]


# ---- weight penalties --------------------------------------------------------------------------
PENALTY_THREADS = 256  # a single block: one pass over a weight tensor per step


@cuda.jit
def weight_penalty_kernel(w, l1, l2, loss_in, loss_out):
    """``loss_out[0] = loss_in[0] + l1 * sum |w| + l2 * sum w**2`` for flat ``w (L,)``.
    Launch: 1 block of ``PENALTY_THREADS``."""
    abs_part = cuda.shared.array(PENALTY_THREADS, dtype=w.dtype)
    sq_part = cuda.shared.array(PENALTY_THREADS, dtype=w.dtype)
    t = cuda.threadIdx.x
    a = w.dtype.type(0)
    b = w.dtype.type(0)
    for k in range(t, w.shape[0], PENALTY_THREADS):
        v = w[k]
        a += abs(v)
        b += v * v
    abs_part[t] = a
    sq_part[t] = b
    cuda.syncthreads()
    half = PENALTY_THREADS // 2
    while half > 0:
        if t < half:
            abs_part[t] += abs_part[t + half]
            sq_part[t] += sq_part[t + half]
        cuda.syncthreads()
        half //= 2
    if t == 0:
        loss_out[0] = loss_in[0] + (l1 * abs_part[0] + l2 * sq_part[0])


@cuda.jit
def weight_penalty_grad_kernel(grad, w, l1, two_l2):
    """In place ``grad += l1 * sign(w) + two_l2 * w`` on flat arrays (sign(0) = 0).
    Launch: ``elementwise_grid(L)`` blocks of ``ELEMENTWISE_THREADS``."""
    i = cuda.grid(1)
    if i < grad.shape[0]:
        zero = w.dtype.type(0)
        v = w[i]
        sign = w.dtype.type(1) if v > zero else (w.dtype.type(-1) if v < zero else zero)
        grad[i] += l1 * sign + two_l2 * v
