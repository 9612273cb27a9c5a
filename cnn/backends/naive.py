"""Plain-loop versions of the ops: the test reference for every fast backend.

Written for clarity, not speed: each output element is computed from its definition with
explicit loops, so an indexing mistake in im2col, in a Numba kernel or in a CUDA kernel shows
up as a mismatch against these. Only the tests and tiny sanity runs use this backend.
"""
from __future__ import annotations

import numpy as np

from .numpy_backend import NumpyBackend, _pad


class NaiveBackend(NumpyBackend):
    """Loop reference; memory, loss and optimizer ops are inherited from NumPy. Every op
    accepts a workspace (``ws``) and ignores it: the reference allocates its results."""

    name = "naive"

    def conv2d_forward(self, x, w, b, stride, padding, ws=None):
        n, c, h, wd = x.shape
        f, _, kh, kw = w.shape
        xp = _pad(x, padding)
        ho = (xp.shape[2] - kh) // stride + 1
        wo = (xp.shape[3] - kw) // stride + 1
        out = np.zeros((n, f, ho, wo), dtype=x.dtype)
        for ni in range(n):
            for fi in range(f):
                for i in range(ho):
                    for j in range(wo):
                        patch = xp[ni, :, i * stride:i * stride + kh, j * stride:j * stride + kw]
                        out[ni, fi, i, j] = np.sum(patch * w[fi]) + b[fi]
        return out, (x, w, stride, padding)

    def conv2d_backward(self, dout, cache, need_dx=True, ws=None):
        x, w, stride, padding = cache
        f, c, kh, kw = w.shape
        xp = _pad(x, padding)
        dxp = np.zeros_like(xp)
        dw = np.zeros_like(w)
        db = np.zeros(f, dtype=dout.dtype)
        n, _, ho, wo = dout.shape
        for ni in range(n):
            for fi in range(f):
                for i in range(ho):
                    for j in range(wo):
                        g = dout[ni, fi, i, j]
                        hs, ws = i * stride, j * stride
                        dw[fi] += g * xp[ni, :, hs:hs + kh, ws:ws + kw]
                        dxp[ni, :, hs:hs + kh, ws:ws + kw] += g * w[fi]
                        db[fi] += g
        (top, _), (left, _) = padding
        dx = dxp[:, :, top:top + x.shape[2], left:left + x.shape[3]].copy()
        return (dx if need_dx else None), dw, db

    def maxpool2d_forward(self, x, pool, stride, ws=None):
        n, c, h, w = x.shape
        ho, wo = (h - pool) // stride + 1, (w - pool) // stride + 1
        out = np.zeros((n, c, ho, wo), dtype=x.dtype)
        for ni in range(n):
            for ci in range(c):
                for i in range(ho):
                    for j in range(wo):
                        out[ni, ci, i, j] = x[ni, ci, i * stride:i * stride + pool,
                                              j * stride:j * stride + pool].max()
        return out, (x, pool, stride)

    def maxpool2d_backward(self, dout, cache, ws=None):
        x, pool, stride = cache
        dx = np.zeros_like(x)
        n, c, ho, wo = dout.shape
        for ni in range(n):
            for ci in range(c):
                for i in range(ho):
                    for j in range(wo):
                        win = x[ni, ci, i * stride:i * stride + pool, j * stride:j * stride + pool]
                        a, bb = np.unravel_index(np.argmax(win), win.shape)
                        dx[ni, ci, i * stride + a, j * stride + bb] += dout[ni, ci, i, j]
        return dx

    def relu_forward(self, x, ws=None):
        out = x.copy()
        flat = out.reshape(-1)
        for k in range(flat.size):
            if flat[k] < 0:
                flat[k] = 0
        return out, x

    def relu_backward(self, dout, cache, ws=None):
        dx = np.zeros_like(dout)
        src, g, d = cache.reshape(-1), dout.reshape(-1), dx.reshape(-1)
        for k in range(src.size):
            if src[k] > 0:
                d[k] = g[k]
        return dx

    def dense_forward(self, x, w, b, ws=None):
        n, d = x.shape
        m = w.shape[1]
        out = np.zeros((n, m), dtype=x.dtype)
        for ni in range(n):
            for mi in range(m):
                acc = b[mi]
                for di in range(d):
                    acc += x[ni, di] * w[di, mi]
                out[ni, mi] = acc
        return out, (x, w)

    def dense_backward(self, dout, cache, need_dx=True, ws=None):
        x, w = cache
        n, d = x.shape
        m = w.shape[1]
        dx, dw, db = np.zeros_like(x), np.zeros_like(w), np.zeros(m, dtype=dout.dtype)
        for ni in range(n):
            for mi in range(m):
                g = dout[ni, mi]
                db[mi] += g
                for di in range(d):
                    dw[di, mi] += x[ni, di] * g
                    dx[ni, di] += w[di, mi] * g
        return (dx if need_dx else None), dw, db

    def softmax_cross_entropy(self, logits, labels, ws=None):
        n, k = logits.shape
        loss = 0.0
        dlogits = np.zeros_like(logits)
        correct = 0
        for ni in range(n):
            row = logits[ni]
            m = max(row)
            lse = m + np.log(sum(np.exp(v - m) for v in row))
            loss += lse - row[labels[ni]]
            for ki in range(k):
                dlogits[ni, ki] = (np.exp(row[ki] - lse) - (ki == labels[ni])) / n
            correct += int(np.argmax(row) == labels[ni])
        return np.asarray(loss / n, dtype=logits.dtype), dlogits, np.asarray(correct)
