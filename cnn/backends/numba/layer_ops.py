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
loop that vectorises (see below). Batch norm's cache holds its input ``x`` (the previous op's
output, which stays as it is until the backward, as every cache's arrays do) with the mean
and ``1/sqrt(var + eps)``, not ``xhat``: the backward recomputes ``xhat = (x - mean) *
inv_std`` as it reads ``x``, with the forward's operations in the forward's dtype, so the same
bits, and the forward writes one activation-sized array instead of two (a pass less, and one
buffer less per batch norm layer).

Batch norm sees ``x`` as ``(N, C, L)`` (``L = H*W``, or 1 after a dense layer), or a
channels-last ``x`` as ``(N, L, C)``, with a kernel of each per pass; per-channel sums
accumulate in float64 whatever the dtype, so long float32 sums lose nothing to order. Fused
with the ReLU after it, the normalisation writes the ReLU's output and the backward passes
apply the ReLU's mask as they read ``dout``: one pass less each way.
``numba_parallel`` uses these same sequential kernels (these ops are memory-bound passes; the
parallel kernels are for the convolutions).
"""
from __future__ import annotations

import math

import numpy as np
from numba import njit

from .. import rng
from .layout import channels_last, like

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


# ---- batch normalisation ----------------------------------------------------------------------
# x is seen as (N, C, L) (L = H*W, or 1 after a dense layer). The per-channel sums accumulate, for
# every position j of a channel, over the examples: part[c, j] += x3[i, c, j]. That inner loop has
# no loop-carried dependency (a running scalar sum would serialise on the adder's latency, and IEEE
# semantics forbid LLVM to reassociate it), so it vectorises along the contiguous axis; the L
# partial sums of a channel are added at the end. After a dense layer (L = 1) the loop runs along
# the channels instead, which are contiguous then.
#
# A channels-last x is seen as (N, L/R, R*C): rows of R pixels (R = gcd(L, 8)), whose R*C values
# are contiguous. Its kernels run the same loops along those rows, with the per-channel vectors
# tiled R times (``tab[t]`` is channel t % C): a row of 16 channels alone is too short for the
# vectorised loop to pay for its set-up. Their partial sums part[j, t] are the (L, C) partial sums
# part[pixel, c] of the NCHW kernels, reshaped, added in the same order: both layouts give the
# same bits.
#
# With ``relu`` (a BatchNorm and a ReLU fused, see fusion.BATCHNORM_RELU) the normalisation
# writes max(y, 0), and the backward recomputes the ReLU's mask as ``xhat * gamma + beta > 0``
# from the xhat it recomputes from x (see above): the forward's own y, bit for bit (the same
# operations in the same dtype), from the x the backward reads anyway.
@njit(**_JIT)
def _zero(part):
    for c in range(part.shape[0]):
        for j in range(part.shape[1]):
            part[c, j] = 0.0


@njit(**_JIT)
def _finish(part, last, out):
    """``out[c]``: the sum of channel ``c``'s partial sums, position by position; ``part``
    is ``(C, L)``, or ``(L/R, R*C)`` channels-last (``last``), i.e. ``(L, C)``."""
    if last:
        rows = part.reshape(-1, out.shape[0])
        for j in range(1, rows.shape[0]):
            for c in range(rows.shape[1]):
                rows[0, c] += rows[j, c]
        for c in range(rows.shape[1]):
            out[c] = rows[0, c]
        return
    for c in range(part.shape[0]):
        acc = 0.0
        for j in range(part.shape[1]):
            acc += part[c, j]
        out[c] = acc


@njit(**_JIT)
def _xhat(x, mean, inv_std):
    """The normalised value of ``x``: the forward and both backward passes compute it so."""
    return (x - mean) * inv_std


@njit(**_JIT)
def _normalized(x, mean, inv_std, gamma, beta, relu, zero):
    """``y = xhat * gamma + beta`` of one value, then ``max(y, 0)`` when ``relu``."""
    y = _xhat(x, mean, inv_std) * gamma + beta
    return y if (y > zero or not relu) else zero


@njit(**_JIT)
def _grad_in(g, h, gamma, beta, relu, zero):
    """The gradient ``g`` of the normalised value ``xhat * gamma + beta``: itself, or 0 where
    the fused ReLU cut it."""
    return g if (not relu or h * gamma + beta > zero) else zero


@njit(**_JIT)
def channel_sums(x3, last, part, out):
    """``out[c] = sum x3[:, c, :]`` (float64 partial sums ``part (C, L)``, see above); ``x3``
    channels-last ``(N, L/R, R*C)`` when ``last``."""
    n, rows, length = x3.shape
    _zero(part)
    for i in range(n):
        for c in range(rows):
            for j in range(length):
                part[c, j] += x3[i, c, j]
    _finish(part, last, out)


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
    _finish(part, False, out)


@njit(**_JIT)
def channel_sq_dev_sums_nhwc(x3, mean_t, part, out):
    """:func:`channel_sq_dev_sums` of channels-last ``x3 (N, L/R, R*C)``, ``mean_t`` tiled."""
    n, rows, width = x3.shape
    _zero(part)
    for i in range(n):
        for j in range(rows):
            for t in range(width):
                d = x3[i, j, t] - mean_t[t]
                part[j, t] += d * d
    _finish(part, True, out)


@njit(**_JIT)
def batchnorm_normalize(x3, mean, inv_std, gamma, beta, relu, out3):
    """``out = xhat * gamma + beta`` per channel, ``xhat = (x - mean) * inv_std`` (then
    ``max(out, 0)`` when ``relu``)."""
    n, c_count, length = x3.shape
    zero = out3.dtype.type(0)
    for i in range(n):
        for c in range(c_count):
            m, s, g, b = mean[c], inv_std[c], gamma[c], beta[c]
            for j in range(length):
                out3[i, c, j] = _normalized(x3[i, c, j], m, s, g, b, relu, zero)


@njit(**_JIT)
def batchnorm_normalize_nhwc(x3, mean, inv_std, gamma, beta, relu, out3):
    """:func:`batchnorm_normalize` of channels-last ``x3 (N, L/R, R*C)``, the per-channel
    vectors tiled."""
    n, rows, width = x3.shape
    zero = out3.dtype.type(0)
    for i in range(n):
        for j in range(rows):
            for t in range(width):
                out3[i, j, t] = _normalized(x3[i, j, t], mean[t], inv_std[t], gamma[t], beta[t],
                                            relu, zero)


@njit(**_JIT)
def batchnorm_backward_sums(dout3, x3, mean, inv_std, gamma, beta, relu, part_a, part_b, s_dy,
                            s_dyx):
    """``s_dy[c] = sum dout``, ``s_dyx[c] = sum dout * xhat`` (float64 partial sums; ``xhat``
    recomputed from ``x3``), ``dout`` masked by the fused ReLU when ``relu``."""
    n, c_count, length = dout3.shape
    zero = dout3.dtype.type(0)
    _zero(part_a)
    _zero(part_b)
    for i in range(n):
        for c in range(c_count):
            m, s, ga, be = mean[c], inv_std[c], gamma[c], beta[c]
            for j in range(length):
                h = _xhat(x3[i, c, j], m, s)
                g = _grad_in(dout3[i, c, j], h, ga, be, relu, zero)
                part_a[c, j] += g
                part_b[c, j] += g * h
    _finish(part_a, False, s_dy)
    _finish(part_b, False, s_dyx)


@njit(**_JIT)
def batchnorm_backward_sums_nhwc(dout3, x3, mean, inv_std, gamma, beta, relu, part_a, part_b,
                                 s_dy, s_dyx):
    """:func:`batchnorm_backward_sums` of channels-last ``(N, L/R, R*C)`` arrays, the
    per-channel vectors tiled."""
    n, rows, width = dout3.shape
    zero = dout3.dtype.type(0)
    _zero(part_a)
    _zero(part_b)
    for i in range(n):
        for j in range(rows):
            for t in range(width):
                h = _xhat(x3[i, j, t], mean[t], inv_std[t])
                g = _grad_in(dout3[i, j, t], h, gamma[t], beta[t], relu, zero)
                part_a[j, t] += g
                part_b[j, t] += g * h
    _finish(part_a, True, s_dy)
    _finish(part_b, True, s_dyx)


@njit(**_JIT)
def batchnorm_backward_dx(dout3, x3, mean, inv_std, k, s_dy, s_dyx, scale, gamma, beta, relu,
                          dx3):
    """``dx = k * (dout - (s_dy + xhat * s_dyx) * scale)`` per channel, ``k = gamma*inv_std``
    (``xhat`` recomputed from ``x3``), ``dout`` masked by the fused ReLU when ``relu``."""
    n, c_count, length = dout3.shape
    zero = dout3.dtype.type(0)
    for i in range(n):
        for c in range(c_count):
            m, s, kc, a, b = mean[c], inv_std[c], k[c], s_dy[c], s_dyx[c]
            ga, be = gamma[c], beta[c]
            for j in range(length):
                h = _xhat(x3[i, c, j], m, s)
                g = _grad_in(dout3[i, c, j], h, ga, be, relu, zero)
                dx3[i, c, j] = kc * (g - (a + h * b) * scale)


@njit(**_JIT)
def batchnorm_backward_dx_nhwc(dout3, x3, mean, inv_std, k, s_dy, s_dyx, scale, gamma, beta,
                               relu, dx3):
    """:func:`batchnorm_backward_dx` of channels-last ``(N, L/R, R*C)`` arrays, the
    per-channel vectors tiled."""
    n, rows, width = dout3.shape
    zero = dout3.dtype.type(0)
    for i in range(n):
        for j in range(rows):
            for t in range(width):
                h = _xhat(x3[i, j, t], mean[t], inv_std[t])
                g = _grad_in(dout3[i, j, t], h, gamma[t], beta[t], relu, zero)
                dx3[i, j, t] = k[t] * (g - (s_dy[t] + h * s_dyx[t]) * scale)


def _ncl(x):
    """``x (N, C, ...)`` as a C-contiguous ``(N, C, L)`` array (a view when it already is)."""
    x = np.ascontiguousarray(x)
    return x.reshape(x.shape[0], x.shape[1], -1)


#: the most pixels per row of the channels-last batch-norm kernels (see above)
_ROW_PIXELS = 8


def _bn_view(x):
    """``(x3, channels_last)``: ``x (N, C, ...)`` as the 3-D array the batch-norm kernels walk:
    the channels-last buffer of a channels-last view as ``(N, L/R, R*C)`` rows (see above),
    else :func:`_ncl`."""
    xs = channels_last(x)
    if xs is None:
        return _ncl(x), False
    n, h, w, c = xs.shape
    r = math.gcd(h * w, _ROW_PIXELS)
    return xs.reshape(n, h * w // r, r * c), True


#: the kernels per layout: NCHW (False) and channels-last (True)
_SQ_DEV_SUMS = {False: channel_sq_dev_sums, True: channel_sq_dev_sums_nhwc}
_NORMALIZE = {False: batchnorm_normalize, True: batchnorm_normalize_nhwc}
_BACKWARD_SUMS = {False: batchnorm_backward_sums, True: batchnorm_backward_sums_nhwc}
_BACKWARD_DX = {False: batchnorm_backward_dx, True: batchnorm_backward_dx_nhwc}


class NumbaLayerOps:
    """The kernels above behind the op contract (a mixin of ``NumbaBackend``, which supplies
    ``_launch`` and ``_nchw``); sigmoid, tanh, binary cross-entropy and the weight penalties
    are the NumPy ones. Outputs and caches come from ``self.scratch`` (the workspace when the
    layer passes one).

    Batch norm keeps the layout of its input: a channels-last ``x`` (a conv layer's output on
    the BLAS path) gives a channels-last output and ``xhat``, and its backward a channels-last
    ``dx``, so no conversion runs between a conv, its batch norm and the ReLU after it. The
    ``batchnorm_relu_*`` ops are the fused BatchNorm and ReLU of
    :data:`~cnn.backends.fusion.BATCHNORM_RELU`, with the signatures of the ``batchnorm_*``
    ops they replace."""

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

    def _bn_operand(self, a, last, ws):
        """``a`` (``dout``) as :func:`_bn_view` gives it, in the layout of the forward's cache
        (``last``: channels-last); converted into a workspace buffer when it is the other."""
        a3, a_last = _bn_view(a)
        if a_last == last:
            return a3
        if not last:
            return _ncl(self._nchw(a, ws))
        n, c, h, w = a.shape
        conv = self.scratch(ws, "dout_nhwc", (n, h, w, c), a.dtype)
        np.copyto(conv, a.transpose(0, 2, 3, 1))
        return _bn_view(conv.transpose(0, 3, 1, 2))[0]

    def _per_channel(self, ws, name, x3, last, *vectors):
        """The per-channel vectors ``(C,)`` as the kernels of ``x3``'s layout take them: as
        they are (NCHW), or each tiled along a row of ``x3`` (channels-last, see above), in
        the workspace buffer ``name``."""
        if not last:
            return [np.ascontiguousarray(v) for v in vectors]
        c = vectors[0].shape[0]
        tiles = self.scratch(ws, name, (len(vectors), x3.shape[2]), x3.dtype)
        for tile, v in zip(tiles, vectors):
            np.copyto(tile.reshape(-1, c), v)
        return list(tiles)

    def batchnorm_sums(self, x, ws=None):
        x3, last = _bn_view(x)
        out = self.scratch(ws, "sums", (x.shape[1],), x.dtype)
        self._launch(channel_sums, x3, last, self._partials(ws, "sum_parts", x3), out)
        return out

    def batchnorm_sq_dev_sums(self, x, sums, inv_count, ws=None):
        mean = self.scratch(ws, "mean", (x.shape[1],), x.dtype)
        np.multiply(sums, inv_count, out=mean)
        out = self.scratch(ws, "sq_sums", (x.shape[1],), x.dtype)
        x3, last = _bn_view(x)
        self._launch(_SQ_DEV_SUMS[last], x3, *self._per_channel(ws, "mean_t", x3, last, mean),
                     self._partials(ws, "sum_parts", x3), out)
        return out

    def batchnorm_train_forward(self, x, sums, sq_sums, inv_count, gamma, beta, eps, ws=None):
        return self._normalize(x, sums, sq_sums, inv_count, gamma, beta, eps, False, ws)

    def batchnorm_infer_forward(self, x, running_mean, running_var, gamma, beta, eps, ws=None):
        return self._normalize(x, running_mean, running_var, 1.0, gamma, beta, eps, False, ws)

    def batchnorm_relu_train_forward(self, x, sums, sq_sums, inv_count, gamma, beta, eps,
                                     ws=None):
        """:meth:`batchnorm_train_forward`, then the ReLU, in one pass."""
        return self._normalize(x, sums, sq_sums, inv_count, gamma, beta, eps, True, ws)

    def batchnorm_relu_infer_forward(self, x, running_mean, running_var, gamma, beta, eps,
                                     ws=None):
        """:meth:`batchnorm_infer_forward`, then the ReLU, in one pass."""
        return self._normalize(x, running_mean, running_var, 1.0, gamma, beta, eps, True, ws)

    def _normalize(self, x, first, second, factor, gamma, beta, eps, relu, ws):
        """The normalisation with ``mean = first * factor``, ``var = second * factor`` (the
        batch's sums and ``1/L``, or the running statistics and 1), then the ReLU when
        ``relu``. The cache holds ``x``, as it is and as the kernels walk it (:func:`_bn_view`),
        its layout, the mean and ``1/sqrt(var + eps)`` (``xhat`` is recomputed from them), and this
        step's ``gamma`` and ``beta`` (the fused ReLU's mask is recomputed from them)."""
        c, dt = x.shape[1], x.dtype
        x3, last = _bn_view(x)
        mean = self.scratch(ws, "batch_mean", (c,), dt)
        np.multiply(first, factor, out=mean)
        inv_std = self.scratch(ws, "inv_std", (c,), dt)
        np.multiply(second, factor, out=inv_std)
        np.add(inv_std, dt.type(eps), out=inv_std)
        np.sqrt(inv_std, out=inv_std)
        np.divide(1, inv_std, out=inv_std)
        params = self.scratch(ws, "gamma_beta", (2, c), dt)
        np.copyto(params[0], gamma)
        np.copyto(params[1], beta)
        out = like(self, ws, "out", x)
        self._launch(_NORMALIZE[last], x3,
                     *self._per_channel(ws, "norm_t", x3, last, mean, inv_std, *params),
                     relu, _bn_view(out)[0])
        return out, (x, x3, last, mean, inv_std, params)

    def batchnorm_backward_sums(self, dout, cache, ws=None):
        return self._backward_sums(dout, cache, False, ws)

    def batchnorm_relu_backward_sums(self, dout, cache, ws=None):
        """:meth:`batchnorm_backward_sums` of the gradient the fused ReLU lets through."""
        return self._backward_sums(dout, cache, True, ws)

    def _backward_sums(self, dout, cache, relu, ws):
        _, x3, last, mean, inv_std, params = cache
        dout3 = self._bn_operand(dout, last, ws)
        s_dy = self.scratch(ws, "dbeta", (dout.shape[1],), dout.dtype)
        s_dyx = self.scratch(ws, "dgamma", (dout.shape[1],), dout.dtype)
        self._launch(_BACKWARD_SUMS[last], dout3, x3,
                     *self._per_channel(ws, "dsum_t", x3, last, mean, inv_std, *params), relu,
                     self._partials(ws, "dsum_parts", dout3),
                     self._partials(ws, "dsum_parts_x", dout3), s_dy, s_dyx)
        return s_dy, s_dyx

    def batchnorm_backward_dx(self, dout, cache, sum_dy, sum_dy_xhat, scale, ws=None):
        return self._backward_dx(dout, cache, sum_dy, sum_dy_xhat, scale, False, ws)

    def batchnorm_relu_backward_dx(self, dout, cache, sum_dy, sum_dy_xhat, scale, ws=None):
        """:meth:`batchnorm_backward_dx` of the gradient the fused ReLU lets through (the sums
        are those of :meth:`batchnorm_relu_backward_sums`)."""
        return self._backward_dx(dout, cache, sum_dy, sum_dy_xhat, scale, True, ws)

    def _backward_dx(self, dout, cache, sum_dy, sum_dy_xhat, scale, relu, ws):
        x, x3, last, mean, inv_std, params = cache
        dout3 = self._bn_operand(dout, last, ws)
        k = self.scratch(ws, "k", inv_std.shape, dout.dtype)
        np.multiply(params[0], inv_std, out=k)
        if not scale:  # constant statistics: the sums do not matter
            sum_dy = sum_dy_xhat = k
        dx = like(self, ws, "dx", x)
        vectors = self._per_channel(ws, "dx_t", x3, last, mean, inv_std, k, sum_dy, sum_dy_xhat,
                                    *params)
        self._launch(_BACKWARD_DX[last], dout3, x3, *vectors[:5], dout.dtype.type(scale),
                     *vectors[5:], relu, _bn_view(dx)[0])
        return dx
