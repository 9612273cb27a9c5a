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


def _window_offsets(x: np.ndarray, pool: int, stride: int):
    """For each offset ``(i, j)`` of a ``pool x pool`` window, in row-major order, the strided
    view ``(N, C, Ho, Wo)`` of ``x`` holding that element of every window."""
    ho = (x.shape[2] - pool) // stride + 1
    wo = (x.shape[3] - pool) // stride + 1
    span_h, span_w = stride * (ho - 1) + 1, stride * (wo - 1) + 1
    for i in range(pool):
        for j in range(pool):
            yield x[:, :, i:i + span_h:stride, j:j + span_w:stride]


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

    def empty(self, shape, dtype):
        return np.empty(shape, dtype=dtype)

    def fill_zero(self, x):
        x.fill(0)

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
        # dw[f, k] = sum_n sum_p d2[n, f, p] * cols[n, k, p]: one product per image, with cols
        # passed transposed to BLAS, is cheaper than tensordot's copy of the whole of cols
        dw = np.matmul(d2, cols.transpose(0, 2, 1)).sum(axis=0).reshape(w.shape)
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
        # The max over a window is the elementwise max of pool*pool strided views of x (one
        # per window offset): no window array is materialised, no argmax over a copy.
        out = None
        for view in _window_offsets(x, pool, stride):
            out = view.copy() if out is None else np.maximum(out, view, out=out)
        return out, (x, out, pool, stride)

    def maxpool2d_backward(self, dout, cache):
        x, out, pool, stride = cache
        dx = np.zeros_like(x)
        # Visit the offsets in row-major order; an offset receives the gradient where it holds
        # the maximum and no earlier offset did (first maximum wins, as the contract says).
        taken = np.zeros(out.shape, dtype=bool)
        for view, dx_view in zip(_window_offsets(x, pool, stride),
                                 _window_offsets(dx, pool, stride)):
            wins = view == out
            wins &= ~taken
            taken |= wins
            if stride == pool:  # windows do not overlap: each dx element is written once
                np.multiply(dout, wins, out=dx_view)
            else:
                dx_view += np.where(wins, dout, 0)
        return dx

    # ---- activations -----------------------------------------------------------------------
    def relu_forward(self, x):
        out = np.maximum(x, 0)
        return out, out

    def relu_backward(self, dout, cache):
        # cache is the output: out > 0 exactly where x > 0. Multiplying by the mask is ~6x
        # faster than np.where(mask, dout, 0) on (128, 32, 30, 30).
        return dout * (cache > 0)

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
        # in float64: for float32 logits near the type's limit the shift logits - max would
        # overflow (e.g. 3e38 - (-3e38)) although the loss and gradient are representable
        z = logits.astype(np.float64)
        shifted = z - z.max(axis=1, keepdims=True)
        log_probs = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
        rows = np.arange(n)
        loss = -log_probs[rows, labels].mean()
        dlogits = np.exp(log_probs)
        dlogits[rows, labels] -= 1
        dlogits /= n
        correct = np.count_nonzero(logits.argmax(axis=1) == labels)
        return (np.asarray(loss, dtype=logits.dtype), dlogits.astype(logits.dtype, copy=False),
                np.asarray(correct))

    # ---- optimizer -------------------------------------------------------------------------
    def sgd_update(self, param, grad, velocity, lr, momentum):
        if momentum:
            velocity *= momentum
            velocity -= lr * grad
            param += velocity
        else:
            param -= lr * grad
