"""NumPy versions of the ops behind sigmoid, tanh, dropout, batch normalisation, binary
cross-entropy and weight penalties (see :mod:`cnn.backends.base` for the contract).

They live in a mixin of their own, beside :class:`~cnn.backends.numpy_backend.NumpyBackend`'s
conv/pool/dense ops, which ``NumpyBackend`` inherits: the Numba backend overrides some of them
with kernels (:mod:`cnn.backends.numba_layer_ops`), the naive backend with plain loops.

Batch normalisation normalises over every axis but the channel axis 1: ``(N, C)`` after a
dense layer, ``(N, C, H, W)`` after a convolution (per channel, over ``N*H*W`` values). Its
training forward is split into ops around the two cross-shard sums the layer needs (see
:class:`cnn.layers.BatchNorm`); all ops keep the input dtype.
"""
from __future__ import annotations

import numpy as np

from . import rng


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
    """The ops of the layers added for issue 12, vectorised in NumPy."""

    # ---- activations -----------------------------------------------------------------------
    def sigmoid_forward(self, x):
        out = stable_sigmoid(x).astype(x.dtype, copy=False)
        return out, out

    def sigmoid_backward(self, dout, cache):
        return dout * (cache * (1 - cache))

    def tanh_forward(self, x):
        out = np.tanh(x)
        return out, out

    def tanh_backward(self, dout, cache):
        return dout * (1 - cache * cache)

    # ---- dropout ---------------------------------------------------------------------------
    def dropout_forward(self, x, rate, key, offset):
        mult = rng.keep_mask(key, rate, offset, x.shape).astype(x.dtype)
        mult *= x.dtype.type(1.0 / (1.0 - rate))
        return x * mult, mult

    def dropout_backward(self, dout, cache):
        return dout * cache

    # ---- batch normalisation -----------------------------------------------------------------
    def batchnorm_sums(self, x):
        return x.sum(axis=_channel_axes(x))

    def batchnorm_sq_dev_sums(self, x, sums, inv_count):
        d = x - _per_channel(sums * inv_count, x)
        np.multiply(d, d, out=d)
        return d.sum(axis=_channel_axes(x))

    def _normalize(self, x, mean, var, gamma, beta, eps):
        inv_std = 1 / np.sqrt(var + eps)
        xhat = (x - _per_channel(mean, x)) * _per_channel(inv_std, x)
        out = xhat * _per_channel(gamma, x) + _per_channel(beta, x)
        return out, (xhat, inv_std, gamma)

    def batchnorm_train_forward(self, x, sums, sq_sums, inv_count, gamma, beta, eps):
        return self._normalize(x, sums * inv_count, sq_sums * inv_count, gamma, beta, eps)

    def batchnorm_infer_forward(self, x, running_mean, running_var, gamma, beta, eps):
        return self._normalize(x, running_mean, running_var, gamma, beta, eps)

    def batchnorm_running_update(self, running_mean, running_var, sums, sq_sums, inv_count,
                                 momentum):
        keep, take = running_mean.dtype.type(momentum), running_mean.dtype.type(1 - momentum)
        return (running_mean * keep + (sums * inv_count) * take,
                running_var * keep + (sq_sums * inv_count) * take)

    def batchnorm_backward_sums(self, dout, cache):
        xhat = cache[0]
        axes = _channel_axes(dout)
        return dout.sum(axis=axes), (dout * xhat).sum(axis=axes)

    def batchnorm_backward_dx(self, dout, cache, sum_dy, sum_dy_xhat, scale):
        xhat, inv_std, gamma = cache
        k = _per_channel(gamma * inv_std, dout)
        if scale == 0:
            return dout * k
        corr = _per_channel(sum_dy, dout) + xhat * _per_channel(sum_dy_xhat, dout)
        corr *= dout.dtype.type(scale)
        return k * (dout - corr)

    # ---- binary cross-entropy ----------------------------------------------------------------
    def binary_cross_entropy(self, logits, labels):
        n = logits.shape[0]
        z = logits.reshape(n).astype(np.float64)
        y = np.asarray(labels).astype(np.float64)
        # max(z, 0) - z*y + log(1 + exp(-|z|)): finite for any z (TensorFlow's formulation)
        loss = (np.maximum(z, 0) - z * y + np.log1p(np.exp(-np.abs(z)))).mean()
        dlogits = ((stable_sigmoid(z) - y) / n).astype(logits.dtype).reshape(logits.shape)
        correct = np.count_nonzero((z > 0) == (y > 0.5))
        return np.asarray(loss, dtype=logits.dtype), dlogits, np.asarray(correct)

    # ---- weight penalties --------------------------------------------------------------------
    def weight_penalty(self, w, l1, l2, loss):
        total = loss.dtype.type(0)
        if l1:
            total += w.dtype.type(l1) * np.abs(w).sum()
        if l2:
            total += w.dtype.type(l2) * np.vdot(w, w)
        return np.asarray(loss + total, dtype=loss.dtype)

    def weight_penalty_grad(self, grad, w, l1, l2):
        if l1:
            grad += w.dtype.type(l1) * np.sign(w)
        if l2:
            grad += w.dtype.type(2 * l2) * w
        return grad
