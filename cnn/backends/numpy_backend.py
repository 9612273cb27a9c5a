"""The NumPy backend: im2col with stride tricks and BLAS matrix products.

This is the sequential baseline of the study and the reference the other backends are tested
against (together with the naive loops in :mod:`cnn.backends.naive`). No op loops in Python
over pixels or examples; the only Python loops run over the ``KH * KW`` kernel offsets.
"""
from __future__ import annotations

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from .base import Backend, Padding


def _pad(x: np.ndarray, padding: Padding) -> np.ndarray:
    (top, bottom), (left, right) = padding
    if top == bottom == left == right == 0:
        return x
    return np.pad(x, ((0, 0), (0, 0), (top, bottom), (left, right)))


def _windows(x: np.ndarray, kh: int, kw: int, stride: int) -> np.ndarray:
    """Strided view ``(N, C, Ho, Wo, KH, KW)`` of ``x (N, C, H, W)``: no copy."""
    return sliding_window_view(x, (kh, kw), axis=(2, 3))[:, :, ::stride, ::stride]


class NumpyBackend(Backend):
    name = "numpy"

    # ---- memory ---------------------------------------------------------------------------
    def asarray(self, x):
        return np.ascontiguousarray(x)

    def to_host(self, x):
        return np.asarray(x)

    def zeros_like(self, x):
        return np.zeros_like(x)

    # ---- convolution -----------------------------------------------------------------------
    def conv2d_forward(self, x, w, b, stride, padding):
        n, c, _, _ = x.shape
        f, _, kh, kw = w.shape
        xp = _pad(x, padding)
        win = _windows(xp, kh, kw, stride)
        ho, wo = win.shape[2], win.shape[3]
        # cols (N, C*KH*KW, Ho*Wo): one copy; the per-image products then land in NCHW order
        # directly, so the output needs no transpose.
        cols = win.transpose(0, 1, 4, 5, 2, 3).reshape(n, c * kh * kw, ho * wo)
        out = np.matmul(w.reshape(f, -1), cols)
        out += b[None, :, None]
        return out.reshape(n, f, ho, wo), (x.shape, xp.shape, w, cols, stride, padding)

    def conv2d_backward(self, dout, cache, need_dx=True):
        x_shape, xp_shape, w, cols, stride, padding = cache
        n, f, ho, wo = dout.shape
        _, c, kh, kw = w.shape
        d2 = dout.reshape(n, f, ho * wo)
        db = d2.sum(axis=(0, 2))
        # dw[f, k] = sum_n sum_p d2[n, f, p] * cols[n, k, p], as one BLAS product
        dw = np.tensordot(d2, cols, axes=([0, 2], [0, 2])).reshape(w.shape)
        if not need_dx:
            return None, dw, db
        dcols = np.matmul(w.reshape(f, -1).T, d2).reshape(n, c, kh, kw, ho, wo)
        dxp = np.zeros(xp_shape, dtype=dout.dtype)
        span_h, span_w = stride * (ho - 1) + 1, stride * (wo - 1) + 1
        for i in range(kh):
            for j in range(kw):
                dxp[:, :, i:i + span_h:stride, j:j + span_w:stride] += dcols[:, :, i, j]
        (top, _), (left, _) = padding
        dx = dxp[:, :, top:top + x_shape[2], left:left + x_shape[3]]
        return np.ascontiguousarray(dx), dw, db

    # ---- pooling ---------------------------------------------------------------------------
    def maxpool2d_forward(self, x, pool, stride):
        n, c, _, _ = x.shape
        win = _windows(x, pool, pool, stride)
        ho, wo = win.shape[2], win.shape[3]
        flat = win.reshape(n, c, ho, wo, pool * pool)
        arg = flat.argmax(axis=-1)  # first maximum wins ties, as documented in the contract
        out = np.take_along_axis(flat, arg[..., None], axis=-1)[..., 0]
        return out, (x.shape, arg, pool, stride)

    def maxpool2d_backward(self, dout, cache):
        x_shape, arg, pool, stride = cache
        n, c, ho, wo = dout.shape
        if stride == pool:
            # Non-overlapping windows: scatter into (N, C, Ho, Wo, p*p) and fold back.
            tiles = np.zeros((n, c, ho, wo, pool * pool), dtype=dout.dtype)
            np.put_along_axis(tiles, arg[..., None], dout[..., None], axis=-1)
            tiles = tiles.reshape(n, c, ho, wo, pool, pool).transpose(0, 1, 2, 4, 3, 5)
            dx = np.zeros(x_shape, dtype=dout.dtype)
            dx[:, :, :ho * pool, :wo * pool] = tiles.reshape(n, c, ho * pool, wo * pool)
            return dx
        dx = np.zeros(x_shape, dtype=dout.dtype)
        span_h, span_w = stride * (ho - 1) + 1, stride * (wo - 1) + 1
        for k in range(pool * pool):
            i, j = divmod(k, pool)
            dx[:, :, i:i + span_h:stride, j:j + span_w:stride] += np.where(arg == k, dout, 0)
        return dx

    # ---- activations -----------------------------------------------------------------------
    def relu_forward(self, x):
        out = np.maximum(x, 0)
        return out, out

    def relu_backward(self, dout, cache):
        # cache is the output: out > 0 exactly where x > 0
        return np.where(cache > 0, dout, 0).astype(dout.dtype, copy=False)

    # ---- dense -----------------------------------------------------------------------------
    def dense_forward(self, x, w, b):
        out = x @ w
        out += b
        return out, (x, w)

    def dense_backward(self, dout, cache, need_dx=True):
        x, w = cache
        dx = dout @ w.T if need_dx else None
        return dx, x.T @ dout, dout.sum(axis=0)

    # ---- loss ------------------------------------------------------------------------------
    def softmax_cross_entropy(self, logits, labels):
        n = logits.shape[0]
        shifted = logits - logits.max(axis=1, keepdims=True)
        log_probs = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
        rows = np.arange(n)
        loss = -log_probs[rows, labels].mean()
        dlogits = np.exp(log_probs)
        dlogits[rows, labels] -= 1
        dlogits /= n
        correct = np.count_nonzero(logits.argmax(axis=1) == labels)
        return np.asarray(loss, dtype=logits.dtype), dlogits, np.asarray(correct)

    # ---- optimizer -------------------------------------------------------------------------
    def sgd_update(self, param, grad, velocity, lr, momentum):
        if momentum:
            velocity *= momentum
            velocity -= lr * grad
            param += velocity
        else:
            param -= lr * grad
