"""Numba CPU kernels for dropout and batch normalisation, and the mixin that gives them to
:class:`~cnn.backends.numba.backend.NumbaBackend`.

Kernels are ``@njit(nogil=True, cache=True, fastmath=False)`` like those of
:mod:`cnn.backends.numba.kernels`: they release the GIL (so the threads strategy runs one per
core), keep IEEE semantics, write into arrays the caller allocates, and compile once per dtype.
Where a kernel does not pay, the NumPy op is inherited: sigmoid and tanh (NumPy's ufuncs run
SIMD ``exp``/``tanh``, which Numba's scalar libm calls do not, so a Numba loop is many times
slower), binary cross-entropy on ``(N, 1)`` logits, and the weight penalties (one BLAS dot or
one ufunc pass each).

What the kernels gain over NumPy is fusion and no temporaries: dropout hashes each unit's
coordinates in registers (:mod:`cnn.backends.rng`) instead of building uint64 temporaries as
large as the activation; batch norm's normalisation and its input gradient are one pass each
instead of four, and its per-channel sums keep one float64 partial sum per position, a
loop that vectorises (see below).

Batch norm sees ``x`` as ``(N, C, L)`` (``L = H*W``, or 1 after a dense layer); per-channel
sums accumulate in float64 whatever the dtype, so long float32 sums lose nothing to order.
``numba_parallel`` uses these same sequential kernels (these ops are memory-bound passes; the
parallel kernels are for the convolutions).
"""
from __future__ import annotations

import numpy as np
from numba import njit

from .. import rng

_JIT = dict(nogil=True, cache=True, fastmath=False)

# uint64 constants: mixing them with int64 values would make Numba compute in float64
_GOLDEN = np.uint64(rng.GOLDEN)
_MIX1 = np.uint64(rng.MIX1)
_MIX2 = np.uint64(rng.MIX2)
_S27, _S30, _S31, _S32 = np.uint64(27), np.uint64(30), np.uint64(31), np.uint64(32)


@njit(**_JIT)
def mix64(z):
    """The SplitMix64 finaliser on a uint64 (wrapping arithmetic)."""
    z = (z ^ (z >> _S30)) * _MIX1
    z = (z ^ (z >> _S27)) * _MIX2
    return z ^ (z >> _S31)


# ---- dropout (x as (N, D): one row per example) -----------------------------------------------
@njit(**_JIT)
def dropout_forward(x2, key, thresh, offset, scale, out2, mask2):
    """``out2 = x2 * scale`` where a unit is kept, else 0; ``mask2`` (uint8) records the kept
    units. Unit ``j`` of row ``i`` is kept when ``mix64(mix64(key + (offset+i+1)*G) +
    (j+1)*G) >> 32 >= thresh`` (see :mod:`cnn.backends.rng`)."""
    n, d = x2.shape
    for i in range(n):
        row = mix64(key + np.uint64(offset + i + 1) * _GOLDEN)
        for j in range(d):
            bits = mix64(row + np.uint64(j + 1) * _GOLDEN)
            if (bits >> _S32) >= thresh:
                out2[i, j] = x2[i, j] * scale
                mask2[i, j] = 1
            else:
                out2[i, j] = 0
                mask2[i, j] = 0


@njit(**_JIT)
def dropout_backward(dout1, mask1, scale, dx1):
    for i in range(dout1.size):
        dx1[i] = dout1[i] * scale if mask1[i] else 0


# ---- batch normalisation (x as (N, C, L)) -------------------------------------------------------
# The per-channel sums accumulate, for every position j of a channel, over the examples:
# part[c, j] += x3[i, c, j]. That inner loop has no loop-carried dependency (a running scalar sum
# would serialise on the adder's latency, and IEEE semantics forbid LLVM to reassociate it), so it
# vectorises along the contiguous axis; the L partial sums of a channel are added at the end.
# After a dense layer (L = 1) the loop runs along the channels instead, which are contiguous then.
@njit(**_JIT)
def _zero(part):
    for c in range(part.shape[0]):
        for j in range(part.shape[1]):
            part[c, j] = 0.0


@njit(**_JIT)
def _finish(part, out):
    for c in range(part.shape[0]):
        acc = 0.0
        for j in range(part.shape[1]):
            acc += part[c, j]
        out[c] = acc


@njit(**_JIT)
def channel_sums(x3, part, out):
    """``out[c] = sum x3[:, c, :]`` (float64 partial sums ``part (C, L)``, see above)."""
    n, c_count, length = x3.shape
    _zero(part)
    for i in range(n):
        for c in range(c_count):
            for j in range(length):
                part[c, j] += x3[i, c, j]
    _finish(part, out)


@njit(**_JIT)
def channel_sq_dev_sums(x3, mean, part, out):
    """``out[c] = sum (x3[:, c, :] - mean[c])**2`` (float64 partial sums ``part (C, L)``)."""
    n, c_count, length = x3.shape
    _zero(part)
    for i in range(n):
        for c in range(c_count):
            m = mean[c]
            for j in range(length):
                d = x3[i, c, j] - m
                part[c, j] += d * d
    _finish(part, out)


@njit(**_JIT)
def batchnorm_normalize(x3, mean, inv_std, gamma, beta, out3, xhat3):
    """``xhat = (x - mean) * inv_std``, ``out = xhat * gamma + beta`` per channel."""
    n, c_count, length = x3.shape
    for i in range(n):
        for c in range(c_count):
            m, s, g, b = mean[c], inv_std[c], gamma[c], beta[c]
            for j in range(length):
                h = (x3[i, c, j] - m) * s
                xhat3[i, c, j] = h
                out3[i, c, j] = h * g + b


@njit(**_JIT)
def batchnorm_backward_sums(dout3, xhat3, part_a, part_b, s_dy, s_dyx):
    """``s_dy[c] = sum dout``, ``s_dyx[c] = sum dout * xhat`` (float64 partial sums)."""
    n, c_count, length = dout3.shape
    _zero(part_a)
    _zero(part_b)
    for i in range(n):
        for c in range(c_count):
            for j in range(length):
                g = dout3[i, c, j]
                part_a[c, j] += g
                part_b[c, j] += g * xhat3[i, c, j]
    _finish(part_a, s_dy)
    _finish(part_b, s_dyx)


@njit(**_JIT)
def batchnorm_backward_dx(dout3, xhat3, k, s_dy, s_dyx, scale, dx3):
    """``dx = k * (dout - (s_dy + xhat * s_dyx) * scale)`` per channel, ``k = gamma*inv_std``."""
    n, c_count, length = dout3.shape
    for i in range(n):
        for c in range(c_count):
            kc, a, b = k[c], s_dy[c], s_dyx[c]
            for j in range(length):
                dx3[i, c, j] = kc * (dout3[i, c, j] - (a + xhat3[i, c, j] * b) * scale)


def _ncl(x):
    """``x (N, C, ...)`` as a C-contiguous ``(N, C, L)`` array (a view when it already is)."""
    x = np.ascontiguousarray(x)
    return x.reshape(x.shape[0], x.shape[1], -1)


class NumbaLayerOps:
    """The kernels above behind the op contract (a mixin of ``NumbaBackend``, which supplies
    ``_launch``); sigmoid, tanh, binary cross-entropy and the weight penalties are the NumPy
    ones. Outputs and caches come from ``self.scratch`` (the workspace when the layer passes
    one)."""

    # ---- dropout ---------------------------------------------------------------------------
    def dropout_forward(self, x, rate, key, offset, ws=None):
        x = np.ascontiguousarray(x)
        x2 = x.reshape(x.shape[0], -1)
        out = self.scratch(ws, "out", x.shape, x.dtype)
        mask = self.scratch(ws, "mask", x.shape, np.uint8)
        scale = x.dtype.type(1.0 / (1.0 - rate))
        self._launch(dropout_forward, x2, np.uint64(key & rng.MASK64),
                     np.uint64(rng.threshold(rate)), int(offset), scale,
                     out.reshape(x2.shape), mask.reshape(x2.shape))
        return out, (mask, scale)

    def dropout_backward(self, dout, cache, ws=None):
        mask, scale = cache
        dout = np.ascontiguousarray(dout)
        dx = self.scratch(ws, "dx", dout.shape, dout.dtype)
        self._launch(dropout_backward, dout.reshape(-1), mask.reshape(-1), scale, dx.reshape(-1))
        return dx

    # ---- batch normalisation -----------------------------------------------------------------
    def _partials(self, ws, name, x3):
        return self.scratch(ws, name, x3.shape[1:], np.float64)

    def batchnorm_sums(self, x, ws=None):
        x3 = _ncl(x)
        out = self.scratch(ws, "sums", (x.shape[1],), x.dtype)
        self._launch(channel_sums, x3, self._partials(ws, "sum_parts", x3), out)
        return out

    def batchnorm_sq_dev_sums(self, x, sums, inv_count, ws=None):
        mean = self.scratch(ws, "mean", (x.shape[1],), x.dtype)
        np.multiply(sums, inv_count, out=mean)
        out = self.scratch(ws, "sq_sums", (x.shape[1],), x.dtype)
        x3 = _ncl(x)
        self._launch(channel_sq_dev_sums, x3, mean, self._partials(ws, "sum_parts", x3), out)
        return out

    def _normalize(self, x, mean, var, gamma, beta, eps, ws):
        x3 = _ncl(x)
        inv_std = self.scratch(ws, "inv_std", (x.shape[1],), x.dtype)
        np.add(var, x.dtype.type(eps), out=inv_std)
        np.sqrt(inv_std, out=inv_std)
        np.divide(1, inv_std, out=inv_std)
        out = self.scratch(ws, "out", x.shape, x.dtype)
        xhat = self.scratch(ws, "xhat", x.shape, x.dtype)
        self._launch(batchnorm_normalize, x3, np.ascontiguousarray(mean), inv_std,
                     np.ascontiguousarray(gamma), np.ascontiguousarray(beta),
                     out.reshape(x3.shape), xhat.reshape(x3.shape))
        return out, (xhat, inv_std, gamma)

    def batchnorm_backward_sums(self, dout, cache, ws=None):
        xhat = cache[0]
        dout3 = _ncl(dout)
        s_dy = self.scratch(ws, "dbeta", (dout.shape[1],), dout.dtype)
        s_dyx = self.scratch(ws, "dgamma", (dout.shape[1],), dout.dtype)
        self._launch(batchnorm_backward_sums, dout3, xhat.reshape(dout3.shape),
                     self._partials(ws, "dsum_parts", dout3), self._partials(ws, "dsum_parts_x", dout3),
                     s_dy, s_dyx)
        return s_dy, s_dyx

    def batchnorm_backward_dx(self, dout, cache, sum_dy, sum_dy_xhat, scale, ws=None):
        xhat, inv_std, gamma = cache
        dout3 = _ncl(dout)
        k = self.scratch(ws, "k", inv_std.shape, dout.dtype)
        np.multiply(gamma, inv_std, out=k)
        if not scale:  # constant statistics: the sums do not matter
            sum_dy = sum_dy_xhat = k
        dx = self.scratch(ws, "dx", dout.shape, dout.dtype)
        self._launch(batchnorm_backward_dx, dout3, xhat.reshape(dout3.shape), k,
                     np.ascontiguousarray(sum_dy), np.ascontiguousarray(sum_dy_xhat),
                     dout.dtype.type(scale), dx.reshape(dout3.shape))
        return dx
