"""NumPy versions of the ops behind sigmoid, tanh, dropout, batch normalisation, binary
cross-entropy, weight penalties, global average pooling and residual blocks (see
:mod:`cnn.backends.base` for the contract).

They live in a mixin of their own, beside :class:`~cnn.backends.numpy.backend.NumpyBackend`'s
conv/pool/dense ops, which ``NumpyBackend`` inherits: the Numba backend overrides some of them
with kernels (:mod:`cnn.backends.numba.layer_ops`), the naive backend with plain loops.

Batch normalisation normalises over every axis but the channel axis 1: ``(N, C)`` after a
dense layer, ``(N, C, H, W)`` after a convolution (per channel, over ``N*H*W`` values). Its
training forward is split into ops around the two cross-shard sums the layer needs (see
:class:`cnn.layers.BatchNorm`); all ops keep the input dtype.
"""
from __future__ import annotations

import numpy as np

from .. import rng


def _channel_axes(x) -> tuple[int, ...]:
    """Every axis but the channel axis 1."""
    return (0,) + tuple(range(2, x.ndim))


def _per_channel(v, x):
    """A ``(C,)`` vector shaped to broadcast along axis 1 of ``x``."""
    return v.reshape((1, -1) + (1,) * (x.ndim - 2))


def stable_sigmoid(z: np.ndarray) -> np.ndarray:
    """``1 / (1 + exp(-z))`` without overflow: ``exp`` only ever sees ``-|z|``."""
    e = np.exp(-np.abs(z))
    return np.where(z >= 0, 1 / (1 + e), e / (1 + e))


class NumpyLayerOps:
    """The ops of sigmoid, tanh, dropout, batch norm, binary cross-entropy, the weight
    penalties, global average pooling and residual blocks, vectorised in NumPy. With a workspace every output, cache and temporary of size
    ``N*...`` comes from ``self.scratch`` (see "Workspaces" in :mod:`cnn.backends.base`);
    per-channel vectors and the loss scalars are tiny."""

    # ---- activations -----------------------------------------------------------------------
    def sigmoid_forward(self, x, ws=None):
        # exp(min(x, 0)) / (1 + exp(-|x|)): 1 / (1 + e^-x) for x >= 0 and e^x / (1 + e^x) for
        # x < 0, without a select (a masked copy is far slower than these SIMD passes) and
        # with exp of non-positive numbers only (no overflow, full relative precision)
        num = self.scratch(ws, "numerator", x.shape, x.dtype)
        den = self.scratch(ws, "denominator", x.shape, x.dtype)
        np.minimum(x, 0, out=num)
        np.exp(num, out=num)
        np.abs(x, out=den)
        np.negative(den, out=den)
        np.exp(den, out=den)
        den += 1
        out = self.scratch(ws, "out", x.shape, x.dtype)
        np.divide(num, den, out=out)
        return out, out

    def sigmoid_backward(self, dout, cache, ws=None):
        dx = self.scratch(ws, "dx", dout.shape, dout.dtype)
        np.subtract(1, cache, out=dx)
        dx *= cache
        dx *= dout
        return dx

    def tanh_forward(self, x, ws=None):
        out = self.scratch(ws, "out", x.shape, x.dtype)
        np.tanh(x, out=out)
        return out, out

    def tanh_backward(self, dout, cache, ws=None):
        dx = self.scratch(ws, "dx", dout.shape, dout.dtype)
        np.multiply(cache, cache, out=dx)
        np.subtract(1, dx, out=dx)
        dx *= dout
        return dx

    # ---- dropout ---------------------------------------------------------------------------
    def dropout_forward(self, x, rate, key, offset, ws=None):
        n = x.shape[0]
        d = x.size // n if n else 0
        keep = self.scratch(ws, "keep", (n, d), np.bool_)
        work = [self.scratch(ws, name, shape, np.uint64) for name, shape in
                (("hash", (n, d)), ("hash_tmp", (n, d)), ("rows", (n,)), ("cols", (d,)))]
        rng.keep_mask_into(keep, key, rate, offset, *work)
        mult = self.scratch(ws, "mult", x.shape, x.dtype)
        np.multiply(keep.reshape(x.shape), x.dtype.type(1.0 / (1.0 - rate)), out=mult)
        out = self.scratch(ws, "out", x.shape, x.dtype)
        np.multiply(x, mult, out=out)
        return out, mult

    def dropout_backward(self, dout, cache, ws=None):
        dx = self.scratch(ws, "dx", dout.shape, dout.dtype)
        np.multiply(dout, cache, out=dx)
        return dx

    # ---- batch normalisation -----------------------------------------------------------------
    def batchnorm_sums(self, x, ws=None):
        out = self.scratch(ws, "sums", (x.shape[1],), x.dtype)
        return np.sum(x, axis=_channel_axes(x), out=out)

    def batchnorm_sq_dev_sums(self, x, sums, inv_count, ws=None):
        mean = self.scratch(ws, "mean", (x.shape[1],), x.dtype)
        np.multiply(sums, inv_count, out=mean)
        d = self.scratch(ws, "deviation", x.shape, x.dtype)
        np.subtract(x, _per_channel(mean, x), out=d)
        np.multiply(d, d, out=d)
        out = self.scratch(ws, "sq_sums", (x.shape[1],), x.dtype)
        return np.sum(d, axis=_channel_axes(x), out=out)

    def _normalize(self, x, mean, var, gamma, beta, eps, ws):
        c = x.shape[1]
        inv_std = self.scratch(ws, "inv_std", (c,), x.dtype)
        np.add(var, x.dtype.type(eps), out=inv_std)
        np.sqrt(inv_std, out=inv_std)
        np.divide(1, inv_std, out=inv_std)
        xhat = self.scratch(ws, "xhat", x.shape, x.dtype)
        np.subtract(x, _per_channel(mean, x), out=xhat)
        xhat *= _per_channel(inv_std, x)
        out = self.scratch(ws, "out", x.shape, x.dtype)
        np.multiply(xhat, _per_channel(gamma, x), out=out)
        out += _per_channel(beta, x)
        return out, (xhat, inv_std, gamma)

    def batchnorm_train_forward(self, x, sums, sq_sums, inv_count, gamma, beta, eps, ws=None):
        c = x.shape[1]
        mean = self.scratch(ws, "batch_mean", (c,), x.dtype)
        var = self.scratch(ws, "batch_var", (c,), x.dtype)
        np.multiply(sums, inv_count, out=mean)
        np.multiply(sq_sums, inv_count, out=var)
        return self._normalize(x, mean, var, gamma, beta, eps, ws)

    def batchnorm_infer_forward(self, x, running_mean, running_var, gamma, beta, eps, ws=None):
        return self._normalize(x, running_mean, running_var, gamma, beta, eps, ws)

    def batchnorm_running_update(self, running_mean, running_var, sums, sq_sums, inv_count,
                                 momentum, ws=None):
        # new arrays even with a workspace: they outlive the step (they become the buffers)
        keep, take = running_mean.dtype.type(momentum), running_mean.dtype.type(1 - momentum)
        return (running_mean * keep + (sums * inv_count) * take,
                running_var * keep + (sq_sums * inv_count) * take)

    def batchnorm_backward_sums(self, dout, cache, ws=None):
        xhat = cache[0]
        axes = _channel_axes(dout)
        c = dout.shape[1]
        s_dy = np.sum(dout, axis=axes, out=self.scratch(ws, "dbeta", (c,), dout.dtype))
        prod = self.scratch(ws, "dout_xhat", dout.shape, dout.dtype)
        np.multiply(dout, xhat, out=prod)
        s_dyx = np.sum(prod, axis=axes, out=self.scratch(ws, "dgamma", (c,), dout.dtype))
        return s_dy, s_dyx

    def batchnorm_backward_dx(self, dout, cache, sum_dy, sum_dy_xhat, scale, ws=None):
        xhat, inv_std, gamma = cache
        k = self.scratch(ws, "k", inv_std.shape, dout.dtype)
        np.multiply(gamma, inv_std, out=k)
        dx = self.scratch(ws, "dx", dout.shape, dout.dtype)
        if scale == 0:
            return np.multiply(dout, _per_channel(k, dout), out=dx)
        # dx = k * (dout - (sum_dy + xhat * sum_dy_xhat) * scale)
        np.multiply(xhat, _per_channel(sum_dy_xhat, dout), out=dx)
        dx += _per_channel(sum_dy, dout)
        dx *= dout.dtype.type(scale)
        np.subtract(dout, dx, out=dx)
        dx *= _per_channel(k, dout)
        return dx

    # ---- global average pooling -------------------------------------------------------------
    def globalavgpool2d_forward(self, x, ws=None):
        out = self.scratch(ws, "out", x.shape[:2], x.dtype)
        np.mean(x, axis=(2, 3), out=out)
        return out, x.shape

    def globalavgpool2d_backward(self, dout, cache, ws=None):
        n, c, h, w = cache
        dx = self.scratch(ws, "dx", cache, dout.dtype)
        # broadcast over each image: one pass writing dx, no (N, C, H, W) temporary
        np.divide(dout.reshape(n, c, 1, 1), dout.dtype.type(h * w), out=dx)
        return dx

    # ---- residual blocks -----------------------------------------------------------------------
    def residual_add_forward(self, main, shortcut, relu, ws=None):
        out = self.scratch(ws, "out", main.shape, main.dtype)
        np.add(main, shortcut, out=out)
        if relu:
            np.maximum(out, 0, out=out)
        return out, (out if relu else None)

    def residual_add_backward(self, dout, cache, ws=None):
        if cache is None:  # no ReLU: the sum passes its gradient on to both operands
            return dout
        # as relu_backward: out > 0 exactly where the sum is, and a mask multiply is one pass
        mask = self.scratch(ws, "dsum_mask", cache.shape, np.bool_)
        np.greater(cache, 0, out=mask)
        d = self.scratch(ws, "dsum", dout.shape, dout.dtype)
        np.multiply(dout, mask, out=d)
        return d

    def residual_grad_sum(self, dx_main, dx_shortcut, ws=None):
        dx = self.scratch(ws, "dx", dx_main.shape, dx_main.dtype)
        return np.add(dx_main, dx_shortcut, out=dx)

    def shortcut_pad_forward(self, x, stride, channels_before, channels_after, ws=None):
        n, c, h, w = x.shape
        ho, wo = (h - 1) // stride + 1, (w - 1) // stride + 1
        out = self.scratch(ws, "out", (n, channels_before + c + channels_after, ho, wo), x.dtype)
        out[:, :channels_before].fill(0)  # the zero channels; the others are all overwritten
        out[:, channels_before + c:].fill(0)
        np.copyto(out[:, channels_before:channels_before + c], x[:, :, ::stride, ::stride])
        return out, (x.shape, stride, channels_before)

    def shortcut_pad_backward(self, dout, cache, ws=None):
        shape, stride, before = cache
        dx = self.scratch(ws, "dx", shape, dout.dtype)
        if stride > 1:  # the pixels the subsampling skipped get no gradient
            dx.fill(0)
        np.copyto(dx[:, :, ::stride, ::stride], dout[:, before:before + shape[1]])
        return dx

    # ---- binary cross-entropy ----------------------------------------------------------------
    def binary_cross_entropy(self, logits, labels, ws=None):
        n = logits.shape[0]
        z = logits.reshape(n).astype(np.float64)  # (N,) temporaries: small
        y = np.asarray(labels).astype(np.float64)
        # max(z, 0) - z*y + log(1 + exp(-|z|)): finite for any z (TensorFlow's formulation)
        loss = (np.maximum(z, 0) - z * y + np.log1p(np.exp(-np.abs(z)))).mean()
        dlogits = self.scratch(ws, "dlogits", logits.shape, logits.dtype)
        np.copyto(dlogits, ((stable_sigmoid(z) - y) / n).reshape(logits.shape), casting="same_kind")
        correct = np.count_nonzero((z > 0) == (y > 0.5))
        return np.asarray(loss, dtype=logits.dtype), dlogits, np.asarray(correct)

    # ---- weight penalties --------------------------------------------------------------------
    def weight_penalty(self, w, l1, l2, loss, ws=None):
        total = loss.dtype.type(0)
        if l1:
            total += w.dtype.type(l1) * np.abs(w).sum()  # one pass over the weights, no batch axis
        if l2:
            total += w.dtype.type(l2) * np.vdot(w, w)
        return np.asarray(loss + total, dtype=loss.dtype)

    def weight_penalty_grad(self, grad, w, l1, l2, ws=None):
        tmp = self.scratch(ws, "penalty_grad", w.shape, w.dtype)
        if l1:
            np.sign(w, out=tmp)
            tmp *= w.dtype.type(l1)
            grad += tmp
        if l2:
            np.multiply(w, w.dtype.type(2 * l2), out=tmp)
            grad += tmp
        return grad
