"""The NumPy backend: im2col with stride tricks and BLAS matrix products.

This is the sequential baseline of the study and the reference the other backends are tested
against (together with the naive loops in :mod:`cnn.backends.naive`). No op loops in Python
over pixels or examples; the only Python loops run over the ``KH * KW`` kernel offsets. With a
workspace (``ws``, see :mod:`cnn.backends.base`) every output, cache and temporary lands in a
reused buffer (``out=`` arguments throughout), so a training step allocates nothing large.
"""
from __future__ import annotations

import threading

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from ..base import Backend
from .layer_ops import NumpyLayerOps

#: bytes of per-image temporaries per chunk of images in the conv backward: half of a 1 MiB L2
_CHUNK_BYTES = 1 << 19


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


class NumpyBackend(NumpyLayerOps, Backend):
    """im2col + BLAS; the ops of sigmoid/tanh/dropout/batch norm/BCE/penalties come from
    :class:`~cnn.backends.numpy.layer_ops.NumpyLayerOps`."""

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
    def _padded(self, x, padding, ws):
        """``x`` zero-padded by ``padding`` (``x`` itself without padding)."""
        (top, bottom), (left, right) = padding
        if top == bottom == left == right == 0:
            return x
        n, c, h, w = x.shape
        xp = self.scratch(ws, "xp", (n, c, h + top + bottom, w + left + right), x.dtype)
        xp.fill(0)
        xp[:, :, top:top + h, left:left + w] = x
        return xp

    def conv2d_forward(self, x, w, b, stride, padding, ws=None):
        n, c, _, _ = x.shape
        f, _, kh, kw = w.shape
        xp = self._padded(x, padding, ws)
        win = _windows(xp, kh, kw, stride)
        ho, wo = win.shape[2], win.shape[3]
        k = c * kh * kw
        # cols (N, C*KH*KW, Ho*Wo): one copy; the per-image products then land in NCHW order
        # directly, so the output needs no transpose.
        cols = self.scratch(ws, "cols", (n, k, ho * wo), x.dtype)
        np.copyto(cols.reshape(n, c, kh, kw, ho, wo), win.transpose(0, 1, 4, 5, 2, 3))
        out = self.scratch(ws, "out", (n, f, ho * wo), x.dtype)
        np.matmul(w.reshape(f, k), cols, out=out)
        out += b[None, :, None]
        return out.reshape(n, f, ho, wo), (x.shape, xp.shape, w, cols, stride, padding)

    def conv2d_backward(self, dout, cache, need_dx=True, ws=None):
        x_shape, xp_shape, w, cols, stride, padding = cache
        n, f, ho, wo = dout.shape
        _, c, kh, kw = w.shape
        k = c * kh * kw
        p = ho * wo
        dt = dout.dtype
        d2 = dout.reshape(n, f, p)
        db = self.scratch(ws, "db", (f,), dt)
        np.sum(d2, axis=(0, 2), out=db)
        (top, bottom), (left, right) = padding
        padded = top or bottom or left or right
        if need_dx:
            dxp = self.scratch(ws, "dxp" if padded else "dx", xp_shape, dt)
            dxp.fill(0)
        # Chunks of nb images whose per-image weight gradients (F, K) and patch gradients
        # (K, P) fit in about _CHUNK_BYTES, so that their sums read them back from cache: one
        # pass over the whole batch writes (N, F, K) values, far more than a cache holds at
        # training batch sizes, and its sum then reads them back from memory.
        nb = max(1, min(n, _CHUNK_BYTES // ((f * k + k * p) * dt.itemsize)))
        dw3 = self.scratch(ws, "dw_per_image", (nb, f, k), dt)
        dw = self.scratch(ws, "dw", (f, k), dt)
        part = self.scratch(ws, "dw_part", (f, k), dt)
        if need_dx:
            dcols = self.scratch(ws, "dcols", (nb, k, p), dt)
            wt = w.reshape(f, k).T
        span_h, span_w = stride * (ho - 1) + 1, stride * (wo - 1) + 1
        for c0 in range(0, n, nb):
            c1 = min(c0 + nb, n)
            m = c1 - c0
            # dw[f, k] = sum_n sum_p d2[n, f, p] * cols[n, k, p]: one product per image, with
            # cols passed transposed to BLAS
            np.matmul(d2[c0:c1], cols[c0:c1].transpose(0, 2, 1), out=dw3[:m])
            np.sum(dw3[:m], axis=0, out=dw if c0 == 0 else part)
            if c0 > 0:
                dw += part
            if need_dx:
                np.matmul(wt, d2[c0:c1], out=dcols[:m])
                dc = dcols[:m].reshape(m, c, kh, kw, ho, wo)
                dxc = dxp[c0:c1]
                for i in range(kh):
                    for j in range(kw):
                        dxc[:, :, i:i + span_h:stride, j:j + span_w:stride] += dc[:, :, i, j]
        dw = dw.reshape(w.shape)
        if not need_dx:
            return None, dw, db
        if not padded:
            return dxp, dw, db
        dx = self.scratch(ws, "dx", x_shape, dt)
        np.copyto(dx, dxp[:, :, top:top + x_shape[2], left:left + x_shape[3]])
        return dx, dw, db

    # ---- pooling ---------------------------------------------------------------------------
    def maxpool2d_forward(self, x, pool, stride, ws=None):
        # The max over a window is the elementwise max of pool*pool strided views of x (one
        # per window offset): no window array is materialised. The forward also records, per
        # window, which offset held the first maximum (a one-byte index, strict ">" over the
        # offsets in row-major order), so the backward is one select per offset: recovering
        # it there by comparing every offset's values with the maximum costs several passes
        # more.
        views = list(_window_offsets(x, pool, stride))
        out = self.scratch(ws, "out", views[0].shape, x.dtype)
        np.copyto(out, views[0])
        idx = self.scratch(ws, "argmax", out.shape, np.uint8 if pool * pool <= 256 else np.int32)
        idx.fill(0)
        better = self.scratch(ws, "better", out.shape, np.bool_)
        step = self.scratch(ws, "idx_step", out.shape, idx.dtype)
        for k, view in enumerate(views[1:], 1):
            np.greater(view, out, out=better)
            np.maximum(out, view, out=out)
            # idx = k where better: idx += better * (k - idx), exact in modular integer
            # arithmetic (np.copyto(idx, k, where=better), a masked copy, is far slower)
            np.subtract(idx.dtype.type(k), idx, out=step)
            np.multiply(step, better, out=step)
            np.add(idx, step, out=idx)
        return out, (x.shape, idx, pool, stride)

    def maxpool2d_backward(self, dout, cache, ws=None):
        x_shape, idx, pool, stride = cache
        n, c, h, w = x_shape
        ho, wo = idx.shape[2], idx.shape[3]
        dx = self.scratch(ws, "dx", x_shape, dout.dtype)
        # windows that tile the image write every element of dx exactly once
        tiled = stride == pool and h == ho * pool and w == wo * pool
        if not tiled:
            dx.fill(0)
        hit = self.scratch(ws, "hit", idx.shape, np.bool_)
        part = None if stride == pool else self.scratch(ws, "part", idx.shape, dout.dtype)
        for k, dx_view in enumerate(_window_offsets(dx, pool, stride)):
            np.equal(idx, k, out=hit)
            if part is None:  # windows do not overlap: each dx element is written once
                np.multiply(dout, hit, out=dx_view)
            else:
                np.multiply(dout, hit, out=part)
                dx_view += part
        return dx

    # ---- activations -----------------------------------------------------------------------
    def relu_forward(self, x, ws=None):
        out = self.scratch(ws, "out", x.shape, x.dtype)
        np.maximum(x, 0, out=out)
        return out, out

    def relu_backward(self, dout, cache, ws=None):
        # cache is the output: out > 0 exactly where x > 0. Multiplying by the mask is a
        # SIMD pass, where np.where(mask, dout, 0) is a slower select.
        mask = self.scratch(ws, "mask", cache.shape, np.bool_)
        np.greater(cache, 0, out=mask)
        dx = self.scratch(ws, "dx", dout.shape, dout.dtype)
        np.multiply(dout, mask, out=dx)
        return dx

    # ---- dense -----------------------------------------------------------------------------
    def dense_forward(self, x, w, b, ws=None):
        out = self.scratch(ws, "out", (x.shape[0], w.shape[1]), x.dtype)
        np.matmul(x, w, out=out)
        out += b
        return out, (x, w)

    def dense_backward(self, dout, cache, need_dx=True, ws=None):
        x, w = cache
        dw = self.scratch(ws, "dw", w.shape, dout.dtype)
        np.matmul(x.T, dout, out=dw)
        db = self.scratch(ws, "db", (dout.shape[1],), dout.dtype)
        np.sum(dout, axis=0, out=db)
        if not need_dx:
            return None, dw, db
        dx = self.scratch(ws, "dx", x.shape, dout.dtype)
        np.matmul(dout, w.T, out=dx)
        return dx, dw, db

    # ---- loss ------------------------------------------------------------------------------
    def softmax_cross_entropy(self, logits, labels, ws=None):
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
        # the (N, K) float64 temporaries are small (K classes); the gradient goes to the
        # workspace, as the next op (the last dense backward) expects
        out = self.scratch(ws, "dlogits", logits.shape, logits.dtype)
        np.copyto(out, dlogits, casting="same_kind")
        return np.asarray(loss, dtype=logits.dtype), out, np.asarray(correct)

    # ---- optimizer primitives (see the contract in base.py) -------------------------------
    # Python-float scalars are "weak" in NumPy 2: float32 arrays compute in float32. The one
    # temporary a primitive needs is a per-thread scratch buffer, grown to the largest operand
    # seen and then reused, so updates allocate nothing per step (sync threads update their
    # slices concurrently, each with its own buffer).
    def _opt_scratch(self, like: np.ndarray) -> np.ndarray:
        local = _OPT_SCRATCH.__dict__
        key = like.dtype.str
        buf = local.get(key)
        if buf is None or buf.size < like.size:
            buf = local[key] = np.empty(max(like.size, 1024), dtype=like.dtype)
        return buf[:like.size].reshape(like.shape)

    def axpby(self, y, a, x, b):
        a, b = float(a), float(b)
        if b == 0.0:
            if a != 1.0:
                np.multiply(y, a, out=y)
            return
        t = None
        if b not in (1.0, -1.0) or (a != 1.0 and np.may_share_memory(x, y)):
            t = self._opt_scratch(y)
            np.multiply(x, b, out=t)  # before y is scaled: x may be y
        if a != 1.0:
            np.multiply(y, a, out=y)
        if t is not None:
            np.add(y, t, out=y)
        elif b == 1.0:
            np.add(y, x, out=y)
        else:
            np.subtract(y, x, out=y)

    def axpby_square(self, y, a, x, b):
        a, b = float(a), float(b)
        t = self._opt_scratch(y)
        np.multiply(x, x, out=t)
        np.multiply(t, b, out=t)
        if a != 1.0:
            np.multiply(y, a, out=y)
        np.add(y, t, out=y)

    def axpby_ratio(self, y, a, b, num, den, eps, eps_inside, center=None):
        a, b, eps = float(a), float(b), float(eps)
        d = self._opt_scratch(y)
        if center is not None:
            np.multiply(center, center, out=d)
            np.subtract(den, d, out=d)
        else:
            np.copyto(d, den)
        if eps_inside:
            np.add(d, eps, out=d)
            np.sqrt(d, out=d)
        else:
            np.sqrt(d, out=d)
            np.add(d, eps, out=d)
        np.divide(num, d, out=d)
        np.multiply(d, b, out=d)
        if a != 1.0:
            np.multiply(y, a, out=y)
        np.add(y, d, out=y)


#: per-thread scratch buffers of the optimizer primitives (``{dtype.str: 1-D array}``)
_OPT_SCRATCH = threading.local()
