"""Plain-loop versions of the ops: the test reference for every fast backend.

Written for clarity, not speed: each output element is computed from its definition with
explicit loops, so an indexing mistake in im2col, in a Numba kernel or in a CUDA kernel shows
up as a mismatch against these. Only the tests and tiny sanity runs use this backend.
"""
from __future__ import annotations

import math

import numpy as np

from . import rng
from .base import Padding
from .numpy import NumpyBackend


def _pad(x: np.ndarray, padding: Padding) -> np.ndarray:
    """``x (N, C, H, W)`` with ``padding`` zeros around each image: ``(N, C, H + top +
    bottom, W + left + right)``."""
    (top, bottom), (left, right) = padding
    return np.pad(x, ((0, 0), (0, 0), (top, bottom), (left, right)))


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

    # ---- more activations (plain loops over the flat elements) -------------------------------
    def sigmoid_forward(self, x, ws=None):
        out = np.empty_like(x)
        src, dst = x.reshape(-1), out.reshape(-1)
        for k in range(src.size):
            v = float(src[k])
            if v >= 0:
                dst[k] = 1.0 / (1.0 + math.exp(-v))
            else:
                e = math.exp(v)
                dst[k] = e / (1.0 + e)
        return out, out

    def sigmoid_backward(self, dout, cache, ws=None):
        dx = np.empty_like(dout)
        g, s, d = dout.reshape(-1), cache.reshape(-1), dx.reshape(-1)
        for k in range(g.size):
            d[k] = float(g[k]) * float(s[k]) * (1.0 - float(s[k]))
        return dx

    def tanh_forward(self, x, ws=None):
        out = np.empty_like(x)
        src, dst = x.reshape(-1), out.reshape(-1)
        for k in range(src.size):
            dst[k] = math.tanh(float(src[k]))
        return out, out

    def tanh_backward(self, dout, cache, ws=None):
        dx = np.empty_like(dout)
        g, t, d = dout.reshape(-1), cache.reshape(-1), dx.reshape(-1)
        for k in range(g.size):
            d[k] = float(g[k]) * (1.0 - float(t[k]) ** 2)
        return dx

    # ---- dropout: the mask from Python integers, one unit at a time --------------------------
    def dropout_forward(self, x, rate, key, offset, ws=None):
        keep = rng.keep_mask_reference(key, rate, offset, x.shape)
        scale = x.dtype.type(1.0 / (1.0 - rate))
        out = np.zeros_like(x)
        mult = np.zeros_like(x)
        src, kp, dst, m = x.reshape(-1), keep.reshape(-1), out.reshape(-1), mult.reshape(-1)
        for k in range(src.size):
            if kp[k]:
                dst[k] = src[k] * scale
                m[k] = scale
        return out, mult

    def dropout_backward(self, dout, cache, ws=None):
        dx = np.zeros_like(dout)
        g, m, d = dout.reshape(-1), cache.reshape(-1), dx.reshape(-1)
        for k in range(g.size):
            d[k] = g[k] * m[k]
        return dx

    # ---- batch normalisation: per channel, loops over (example, position) ---------------------
    @staticmethod
    def _channel_values(x, c):
        """The values of channel ``c`` of ``x (N, C, ...)`` in a flat list of floats."""
        return [float(v) for v in x[:, c].reshape(-1)]

    def batchnorm_sums(self, x, ws=None):
        out = np.zeros(x.shape[1], dtype=x.dtype)
        for c in range(x.shape[1]):
            out[c] = math.fsum(self._channel_values(x, c))
        return out

    def batchnorm_sq_dev_sums(self, x, sums, inv_count, ws=None):
        out = np.zeros(x.shape[1], dtype=x.dtype)
        for c in range(x.shape[1]):
            mean = float(sums[c]) * inv_count
            out[c] = math.fsum((v - mean) ** 2 for v in self._channel_values(x, c))
        return out

    @staticmethod
    def _channel_index(x, c):
        """Every index of ``x (N, C, ...)`` in channel ``c``."""
        rest = x.shape[:1] + x.shape[2:]
        return [(idx[0], c) + idx[1:] for idx in np.ndindex(*rest)]

    def _bn_loops(self, x, mean, var, gamma, beta, eps):
        out = np.empty_like(x)
        xhat = np.empty_like(x)
        inv_std = np.empty(x.shape[1], dtype=x.dtype)
        for c in range(x.shape[1]):
            inv_std[c] = 1.0 / math.sqrt(float(var[c]) + eps)
            for idx in self._channel_index(x, c):
                h = (float(x[idx]) - float(mean[c])) * float(inv_std[c])
                xhat[idx] = h
                out[idx] = float(gamma[c]) * h + float(beta[c])
        return out, (xhat, inv_std, gamma)

    def batchnorm_train_forward(self, x, sums, sq_sums, inv_count, gamma, beta, eps, ws=None):
        mean = [float(s) * inv_count for s in sums]
        var = [float(q) * inv_count for q in sq_sums]
        return self._bn_loops(x, mean, var, gamma, beta, eps)

    def batchnorm_infer_forward(self, x, running_mean, running_var, gamma, beta, eps, ws=None):
        return self._bn_loops(x, running_mean, running_var, gamma, beta, eps)

    def batchnorm_running_update(self, running_mean, running_var, sums, sq_sums, inv_count,
                                 momentum, ws=None):
        new_mean, new_var = np.empty_like(running_mean), np.empty_like(running_var)
        for c in range(running_mean.size):
            new_mean[c] = momentum * float(running_mean[c]) + (1 - momentum) * float(sums[c]) * inv_count
            new_var[c] = momentum * float(running_var[c]) + (1 - momentum) * float(sq_sums[c]) * inv_count
        return new_mean, new_var

    def batchnorm_backward_sums(self, dout, cache, ws=None):
        xhat = cache[0]
        c_count = dout.shape[1]
        s1, s2 = np.zeros(c_count, dtype=dout.dtype), np.zeros(c_count, dtype=dout.dtype)
        for c in range(c_count):
            g, h = self._channel_values(dout, c), self._channel_values(xhat, c)
            s1[c] = math.fsum(g)
            s2[c] = math.fsum(a * b for a, b in zip(g, h))
        return s1, s2

    def batchnorm_backward_dx(self, dout, cache, sum_dy, sum_dy_xhat, scale, ws=None):
        xhat, inv_std, gamma = cache
        dx = np.empty_like(dout)
        for c in range(dout.shape[1]):
            k = float(gamma[c]) * float(inv_std[c])
            s1 = float(sum_dy[c]) if scale else 0.0
            s2 = float(sum_dy_xhat[c]) if scale else 0.0
            for idx in self._channel_index(dout, c):
                dx[idx] = k * (float(dout[idx]) - scale * (s1 + float(xhat[idx]) * s2))
        return dx

    # ---- global average pooling, residual blocks ----------------------------------------------
    def globalavgpool2d_forward(self, x, ws=None):
        n, c, h, w = x.shape
        out = np.zeros((n, c), dtype=x.dtype)
        for ni in range(n):
            for ci in range(c):
                out[ni, ci] = math.fsum(float(v) for v in x[ni, ci].reshape(-1)) / (h * w)
        return out, x.shape

    def globalavgpool2d_backward(self, dout, cache, ws=None):
        n, c, h, w = cache
        dx = np.zeros(cache, dtype=dout.dtype)
        for ni in range(n):
            for ci in range(c):
                for i in range(h):
                    for j in range(w):
                        dx[ni, ci, i, j] = dout[ni, ci] / (h * w)
        return dx

    def residual_add_forward(self, main, shortcut, relu, ws=None):
        out = np.zeros(main.shape, dtype=main.dtype)
        a, b, o = main.reshape(-1), shortcut.reshape(-1), out.reshape(-1)
        for k in range(o.size):
            s = a[k] + b[k]
            o[k] = s if (s > 0 or not relu) else 0
        return out, (out, relu)

    def residual_add_backward(self, dout, cache, ws=None):
        out, relu = cache
        d = np.zeros_like(dout)
        src, g, dd = out.reshape(-1), dout.reshape(-1), d.reshape(-1)
        for k in range(src.size):
            if not relu or src[k] > 0:
                dd[k] = g[k]
        return d

    def residual_grad_sum(self, dx_main, dx_shortcut, ws=None):
        dx = np.zeros(dx_main.shape, dtype=dx_main.dtype)
        a, b, d = dx_main.reshape(-1), dx_shortcut.reshape(-1), dx.reshape(-1)
        for k in range(d.size):
            d[k] = a[k] + b[k]
        return dx

    def shortcut_pad_forward(self, x, stride, channels_before, channels_after, ws=None):
        n, c, h, w = x.shape
        ho, wo = -(-h // stride), -(-w // stride)
        out = np.zeros((n, channels_before + c + channels_after, ho, wo), dtype=x.dtype)
        for ni in range(n):
            for ci in range(c):
                for i in range(ho):
                    for j in range(wo):
                        out[ni, channels_before + ci, i, j] = x[ni, ci, i * stride, j * stride]
        return out, (x.shape, stride, channels_before)

    def shortcut_pad_backward(self, dout, cache, ws=None):
        (n, c, h, w), stride, before = cache
        dx = np.zeros((n, c, h, w), dtype=dout.dtype)
        for ni in range(n):
            for ci in range(c):
                for i in range(dout.shape[2]):
                    for j in range(dout.shape[3]):
                        dx[ni, ci, i * stride, j * stride] = dout[ni, before + ci, i, j]
        return dx

    # ---- binary cross-entropy, row by row ------------------------------------------------------
    def binary_cross_entropy(self, logits, labels, ws=None):
        n = logits.shape[0]
        dlogits = np.zeros_like(logits)
        total, correct = 0.0, 0
        for i in range(n):
            z, y = float(logits[i, 0]), int(labels[i])
            total += max(z, 0.0) - z * y + math.log1p(math.exp(-abs(z)))
            p = 1.0 / (1.0 + math.exp(-z)) if z >= 0 else math.exp(z) / (1.0 + math.exp(z))
            dlogits[i, 0] = (p - y) / n
            correct += int((z > 0) == (y == 1))
        return np.asarray(total / n, dtype=logits.dtype), dlogits, np.asarray(correct)

    # ---- weight penalties ----------------------------------------------------------------------
    def weight_penalty(self, w, l1, l2, loss, ws=None):
        vals = [float(v) for v in w.reshape(-1)]
        penalty = l1 * math.fsum(abs(v) for v in vals) + l2 * math.fsum(v * v for v in vals)
        return np.asarray(float(loss) + penalty, dtype=loss.dtype)

    def weight_penalty_grad(self, grad, w, l1, l2, ws=None):
        g, src = grad.reshape(-1), w.reshape(-1)
        for k in range(src.size):
            v = float(src[k])
            sign = 1.0 if v > 0 else (-1.0 if v < 0 else 0.0)
            g[k] = float(g[k]) + l1 * sign + 2 * l2 * v
        return grad
