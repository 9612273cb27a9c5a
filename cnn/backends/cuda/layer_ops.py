"""The CUDA backend's sigmoid, tanh, dropout, batch-norm, residual-block, global-pooling, binary
cross-entropy and penalty ops (a mixin of :class:`~cnn.backends.cuda.backend.CudaBackend`):
allocate outputs on the device and launch the kernels of :mod:`cnn.backends.cuda.layer_kernels`.
No op copies to or from the host; scalars are passed in the arrays' dtype, so float32 models
compute in float32.
"""
from __future__ import annotations

import numpy as np
from numba import cuda

from ...checks import check_int
from .. import rng
from . import layer_kernels as K
from .kernels import relu_backward_kernel


def _flat(a):
    return a.reshape(a.size)


def _ncl(x):
    """``x (N, C, ...)`` as a ``(N, C, L)`` view (device arrays are C-contiguous)."""
    return x.reshape(x.shape[0], x.shape[1], x.size // (x.shape[0] * x.shape[1]))


def _check_operands(op: str, a, b, names: tuple[str, str]) -> None:
    """Refuse operands of an elementwise op that differ in shape or dtype (a kernel would read
    past the shorter one)."""
    if a.shape != b.shape or a.dtype != b.dtype:
        raise ValueError(f"{op}: {names[0]} and {names[1]} differ: {names[0]}.shape={a.shape} "
                         f"{a.dtype}, {names[1]}.shape={b.shape} {b.dtype}")


def _check_shortcut(x, stride, before, after) -> tuple[int, int, int, int]:
    """``x.shape`` once ``x`` and the arguments of option A's shortcut are valid."""
    if x.ndim != 4:
        raise ValueError(f"shortcut_pad_forward expects x (N, C, H, W); received "
                         f"x.shape={x.shape}")
    check_int("shortcut_pad_forward", "stride", stride)
    check_int("shortcut_pad_forward", "channels_before", before, low=0)
    check_int("shortcut_pad_forward", "channels_after", after, low=0)
    return x.shape


class CudaLayerOps:
    """The ops of sigmoid, tanh, dropout, batch norm, residual blocks, global average pooling,
    binary cross-entropy and the weight penalties, as CUDA kernels; outputs, caches and
    temporaries are workspace buffers in device memory when the layer passes ``ws``."""

    def _elementwise(self, kernel, name, ws, *arrays):
        a0 = arrays[0]
        out = self.scratch(ws, name, a0.shape, a0.dtype)
        kernel[K.elementwise_grid(a0.size), K.ELEMENTWISE_THREADS](*[_flat(a) for a in arrays],
                                                                   _flat(out))
        return out

    # ---- activations -----------------------------------------------------------------------
    def sigmoid_forward(self, x, ws=None):
        out = self._elementwise(K.sigmoid_forward_kernel, "out", ws, x)
        return out, out

    def sigmoid_backward(self, dout, cache, ws=None):
        return self._elementwise(K.sigmoid_backward_kernel, "dx", ws, dout, cache)

    def tanh_forward(self, x, ws=None):
        out = self._elementwise(K.tanh_forward_kernel, "out", ws, x)
        return out, out

    def tanh_backward(self, dout, cache, ws=None):
        return self._elementwise(K.tanh_backward_kernel, "dx", ws, dout, cache)

    # ---- dropout ---------------------------------------------------------------------------
    def dropout_forward(self, x, rate, key, offset, ws=None):
        n = x.shape[0]
        x2 = x.reshape(n, x.size // n)
        out = self.scratch(ws, "out", x.shape, x.dtype)
        mask = self.scratch(ws, "mask", x.shape, np.uint8)
        scale = x.dtype.type(1.0 / (1.0 - rate))
        K.dropout_forward_kernel[K.elementwise_grid(x.size), K.ELEMENTWISE_THREADS](
            x2, np.uint64(key & rng.MASK64), np.uint64(rng.threshold(rate)), int(offset), scale,
            out.reshape(x2.shape), mask.reshape(x2.shape))
        return out, (mask, scale)

    def dropout_backward(self, dout, cache, ws=None):
        mask, scale = cache
        dx = self.scratch(ws, "dx", dout.shape, dout.dtype)
        K.dropout_backward_kernel[K.elementwise_grid(dout.size), K.ELEMENTWISE_THREADS](
            _flat(dout), _flat(mask), scale, _flat(dx))
        return dx

    # ---- batch normalisation -----------------------------------------------------------------
    def batchnorm_sums(self, x, ws=None):
        out = self.scratch(ws, "sums", (x.shape[1],), x.dtype)
        K.channel_sums_kernel[K.channel_grid(x.shape[1]), K.CHANNEL_THREADS](_ncl(x), out)
        return out

    def batchnorm_sq_dev_sums(self, x, sums, inv_count, ws=None):
        out = self.scratch(ws, "sq_sums", (x.shape[1],), x.dtype)
        K.channel_sq_dev_sums_kernel[K.channel_grid(x.shape[1]), K.CHANNEL_THREADS](
            _ncl(x), self.asarray(sums), x.dtype.type(inv_count), out)
        return out

    def _normalize(self, x, first, second, factor, gamma, beta, eps, ws):
        dt = x.dtype.type
        out = self.scratch(ws, "out", x.shape, x.dtype)
        xhat = self.scratch(ws, "xhat", x.shape, x.dtype)
        inv_std = self.scratch(ws, "inv_std", (x.shape[1],), x.dtype)
        x3 = _ncl(x)
        K.batchnorm_normalize_kernel[K.elementwise_grid(x.size), K.ELEMENTWISE_THREADS](
            x3, self.asarray(first), self.asarray(second), dt(factor), dt(eps), gamma, beta,
            out.reshape(x3.shape), xhat.reshape(x3.shape), inv_std)
        return out, (xhat, inv_std, gamma)

    def batchnorm_train_forward(self, x, sums, sq_sums, inv_count, gamma, beta, eps, ws=None):
        return self._normalize(x, sums, sq_sums, inv_count, gamma, beta, eps, ws)

    def batchnorm_infer_forward(self, x, running_mean, running_var, gamma, beta, eps, ws=None):
        return self._normalize(x, running_mean, running_var, 1.0, gamma, beta, eps, ws)

    def batchnorm_running_update(self, running_mean, running_var, sums, sq_sums, inv_count,
                                 momentum, ws=None):
        # new device arrays even with a workspace: they become the buffers (see base.py)
        dt = running_mean.dtype.type
        new_mean = cuda.device_array(running_mean.shape, running_mean.dtype)
        new_var = cuda.device_array(running_var.shape, running_var.dtype)
        K.batchnorm_running_kernel[K.elementwise_grid(running_mean.size), K.ELEMENTWISE_THREADS](
            running_mean, running_var, self.asarray(sums), self.asarray(sq_sums), dt(inv_count),
            dt(momentum), dt(1 - momentum), new_mean, new_var)
        return new_mean, new_var

    def batchnorm_backward_sums(self, dout, cache, ws=None):
        xhat = cache[0]
        c = dout.shape[1]
        s_dy = self.scratch(ws, "dbeta", (c,), dout.dtype)
        s_dyx = self.scratch(ws, "dgamma", (c,), dout.dtype)
        dout3 = _ncl(dout)
        K.batchnorm_backward_sums_kernel[K.channel_grid(c), K.CHANNEL_THREADS](
            dout3, xhat.reshape(dout3.shape), s_dy, s_dyx)
        return s_dy, s_dyx

    def batchnorm_backward_dx(self, dout, cache, sum_dy, sum_dy_xhat, scale, ws=None):
        xhat, inv_std, gamma = cache
        dx = self.scratch(ws, "dx", dout.shape, dout.dtype)
        dout3 = _ncl(dout)
        K.batchnorm_backward_dx_kernel[K.elementwise_grid(dout.size), K.ELEMENTWISE_THREADS](
            dout3, xhat.reshape(dout3.shape), gamma, inv_std, self.asarray(sum_dy),
            self.asarray(sum_dy_xhat), dout.dtype.type(scale), dx.reshape(dout3.shape))
        return dx

    # ---- residual blocks ---------------------------------------------------------------------
    def residual_add_forward(self, main, shortcut, relu, ws=None):
        _check_operands("residual_add_forward", main, shortcut, ("main", "shortcut"))
        out = self.scratch(ws, "out", main.shape, main.dtype)
        K.residual_add_kernel[K.elementwise_grid(out.size), K.ELEMENTWISE_THREADS](
            _flat(main), _flat(shortcut), bool(relu), _flat(out))
        return out, (out if relu else None)

    def residual_add_backward(self, dout, cache, ws=None):
        if cache is None:  # no ReLU: the sum hands its gradient to both operands as it is
            return dout
        _check_operands("residual_add_backward", cache, dout, ("out", "dout"))
        d = self.scratch(ws, "dsum", dout.shape, dout.dtype)
        relu_backward_kernel[K.elementwise_grid(d.size), K.ELEMENTWISE_THREADS](
            _flat(dout), _flat(cache), _flat(d))
        return d

    def residual_grad_sum(self, dx_main, dx_shortcut, ws=None):
        _check_operands("residual_grad_sum", dx_main, dx_shortcut, ("dx_main", "dx_shortcut"))
        dx = self.scratch(ws, "dx", dx_main.shape, dx_main.dtype)
        K.residual_add_kernel[K.elementwise_grid(dx.size), K.ELEMENTWISE_THREADS](
            _flat(dx_main), _flat(dx_shortcut), False, _flat(dx))
        return dx

    def shortcut_pad_forward(self, x, stride, channels_before, channels_after, ws=None):
        n, c, h, w = _check_shortcut(x, stride, channels_before, channels_after)
        out = self.scratch(ws, "out", (n, channels_before + c + channels_after,
                                       (h - 1) // stride + 1, (w - 1) // stride + 1), x.dtype)
        K.shortcut_pad_kernel[K.elementwise_grid(out.size), K.ELEMENTWISE_THREADS](
            x, int(stride), int(channels_before), out)
        return out, (x.shape, int(stride), int(channels_before))

    def shortcut_pad_backward(self, dout, cache, ws=None):
        shape, stride, before = cache
        dx = self.scratch(ws, "dx", shape, dout.dtype)
        K.shortcut_unpad_kernel[K.elementwise_grid(dx.size), K.ELEMENTWISE_THREADS](
            dout, stride, before, dx)
        return dx

    # ---- global average pooling -------------------------------------------------------------
    def globalavgpool2d_forward(self, x, ws=None):
        if x.ndim != 4:
            raise ValueError(f"globalavgpool2d_forward expects x (N, C, H, W); received "
                             f"x.shape={x.shape}")
        n, c, h, w = x.shape
        out = self.scratch(ws, "out", (n, c), x.dtype)
        K.plane_means_kernel[K.plane_grid(n * c), K.PLANE_THREADS](x.reshape(n * c, h * w),
                                                                   out.reshape(n * c))
        return out, x.shape

    def globalavgpool2d_backward(self, dout, cache, ws=None):
        n, c, h, w = cache
        dx = self.scratch(ws, "dx", cache, dout.dtype)
        K.spread_means_kernel[K.elementwise_grid(dx.size), K.ELEMENTWISE_THREADS](
            dout.reshape(n * c), dx.reshape(n * c, h * w))
        return dx

    # ---- binary cross-entropy ----------------------------------------------------------------
    def binary_cross_entropy(self, logits, labels, ws=None):
        n = logits.shape[0]
        dlogits = self.scratch(ws, "dlogits", logits.shape, logits.dtype)
        loss = self.scratch(ws, "loss", (1,), logits.dtype)
        correct = self.scratch(ws, "correct", (1,), np.int32)
        K.bce_kernel[1, K.BCE_THREADS](logits, labels, logits.dtype.type(1.0 / n), dlogits,
                                       loss, correct)
        return loss.reshape(()), dlogits, correct.reshape(())

    # ---- weight penalties --------------------------------------------------------------------
    def weight_penalty(self, w, l1, l2, loss, ws=None):
        dt = w.dtype.type
        out = self.scratch(ws, "penalised_loss", (1,), loss.dtype)
        K.weight_penalty_kernel[1, K.PENALTY_THREADS](_flat(w), dt(l1), dt(l2), loss.reshape(1),
                                                      out)
        return out.reshape(())

    def weight_penalty_grad(self, grad, w, l1, l2, ws=None):
        dt = w.dtype.type
        K.weight_penalty_grad_kernel[K.elementwise_grid(w.size), K.ELEMENTWISE_THREADS](
            _flat(grad), _flat(w), dt(l1), dt(2 * l2))
        return grad
