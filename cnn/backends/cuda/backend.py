"""The CUDA backend: every op of the contract as Numba CUDA kernels on device arrays.

Arrays in and out are Numba device arrays (C-contiguous, so the model's ``.reshape`` flatten
is a free view); caches hold device arrays only; no op copies to or from the host, so a whole
training step (forward, loss, backward, the optimizer's primitives) stays on the device and
only the two scalars ``loss`` and ``correct`` need ``to_host``. With a workspace (``ws``, see
:mod:`cnn.backends.base`; the workspace's allocator is :meth:`CudaBackend.empty`) every output,
cache and temporary is a device buffer allocated once per (layer, batch shape) and reused, so
a training step allocates no device memory after the first. The kernels and their launch
arithmetic live in :mod:`cnn.backends.cuda.kernels`. The backend fuses no layers (``fusions``
is empty): every layer is an op of its own.

Without a GPU, run under Numba's CUDA simulator by setting ``NUMBA_ENABLE_CUDASIM=1`` in the
environment before Numba is first imported (the simulator runs every GPU thread in Python:
tiny shapes only).
"""
from __future__ import annotations

import numpy as np
from numba import cuda

from ...errors import DeviceUnavailableError
from ..base import Backend
from . import kernels as K
from .layer_ops import CudaLayerOps


def _why_unavailable() -> str:
    """Why ``numba.cuda.is_available()`` is False: no driver (the reason Numba's driver gave
    when it failed to load), or a driver that found no GPU."""
    try:
        from numba.cuda.cudadrv.driver import driver
        reason = getattr(driver, "initialization_error", None)
    except Exception:  # noqa: BLE001 - only for the message; the answer stays "unusable"
        reason = None
    if reason:
        return "no CUDA driver (" + " ".join(str(reason).split()) + ")"
    return "the CUDA driver found no GPU"


def _is_device_array(x) -> bool:
    # Device arrays of both the driver and the simulator; numpy arrays lack this method.
    return hasattr(x, "copy_to_host")


class CudaBackend(CudaLayerOps, Backend):
    """The memory, conv, pooling, ReLU, dense, softmax cross-entropy and optimizer ops below;
    sigmoid, tanh, dropout, batch norm, residual blocks, global average pooling, binary
    cross-entropy and weight penalties come from
    :class:`~cnn.backends.cuda.layer_ops.CudaLayerOps`."""

    name = "cuda"

    def __init__(self):
        if not cuda.is_available():
            raise DeviceUnavailableError(
                f"CudaBackend: no CUDA GPU is usable here: {_why_unavailable()}. To run the "
                f"CUDA kernels without a GPU, use Numba's CUDA simulator: set "
                f"NUMBA_ENABLE_CUDASIM=1 in the environment before Python imports numba.")
        # Empty device arrays that tell matmul_kernel "no bias", one per dtype.
        self._no_bias: dict[np.dtype, object] = {}

    # ---- memory ---------------------------------------------------------------------------
    def asarray(self, x):
        if _is_device_array(x):
            return x
        return cuda.to_device(np.ascontiguousarray(x))

    def to_host(self, x):
        """Device array -> ``numpy.ndarray``; the loss and correct scalars come back 0-d, so
        ``float(...)`` and ``int(...)`` work on them."""
        if _is_device_array(x):
            return x.copy_to_host()
        return np.asarray(x)

    def zeros_like(self, x):
        out = cuda.device_array(x.shape, dtype=x.dtype)
        self.fill_zero(out)
        return out

    def empty(self, shape, dtype):
        return cuda.device_array(shape, dtype=dtype)

    def fill_zero(self, x):
        K.fill_zero_kernel[K.elementwise_grid(x.size), K.ELEMENTWISE_THREADS](x.reshape(x.size))

    def synchronize(self):
        cuda.synchronize()

    # ---- convolution -----------------------------------------------------------------------
    def conv2d_forward(self, x, w, b, stride, padding, ws=None):
        n, c, h, wd = x.shape
        f, cw, kh, kw = w.shape
        (top, bottom), (left, right) = padding
        ho = (h + top + bottom - kh) // stride + 1
        wo = (wd + left + right - kw) // stride + 1
        if cw != c or ho < 1 or wo < 1:
            raise ValueError(f"conv2d_forward: x {x.shape} and w {w.shape} with stride {stride} "
                             f"and padding {padding} give no valid output")
        out = self.scratch(ws, "out", (n, f, ho, wo), x.dtype)
        K.conv2d_forward_kernel[K.gemm_grid(f, n * ho * wo), K.GEMM_THREADS](
            x, w, b, stride, top, left, out)
        return out, (x, w, stride, padding)

    def conv2d_backward(self, dout, cache, need_dx=True, ws=None):
        x, w, stride, padding = cache
        (top, _), (left, _) = padding
        n, f, ho, wo = dout.shape
        _, c, kh, kw = w.shape

        dw = self.scratch(ws, "dw", w.shape, dout.dtype)
        db = self.scratch(ws, "db", (f,), dout.dtype)
        k_cols = c * kh * kw
        splits, chunk = K.conv2d_dw_splits(f, k_cols + 1, n * ho * wo)
        # One slice writes dw and db directly; several write slabs that column_sums_kernel adds.
        if splits == 1:
            dw_part, db_part = dw.reshape(1, f, c, kh, kw), db.reshape(1, f)
        else:
            dw_part = self.scratch(ws, "dw_part", (splits, f, c, kh, kw), dout.dtype)
            db_part = self.scratch(ws, "db_part", (splits, f), dout.dtype)
        K.conv2d_backward_weight_kernel[K.gemm_grid(f, k_cols + 1, splits), K.GEMM_THREADS](
            x, dout, stride, top, left, chunk, dw_part, db_part)
        if splits > 1:
            K.column_sums_kernel[K.column_sum_grid(f * k_cols), K.COLUMN_SUM_THREADS](
                dw_part.reshape(splits, f * k_cols), dw.reshape(f * k_cols))
            K.column_sums_kernel[K.column_sum_grid(f), K.COLUMN_SUM_THREADS](db_part, db)

        if not need_dx:
            return None, dw, db
        dx = self.scratch(ws, "dx", x.shape, dout.dtype)
        K.conv2d_backward_input_kernel[K.gemm_grid(c, x.size // c), K.GEMM_THREADS](
            dout, w, stride, top, left, dx)
        return dx, dw, db

    # ---- pooling ---------------------------------------------------------------------------
    def maxpool2d_forward(self, x, pool, stride, ws=None):
        n, c, h, w = x.shape
        ho, wo = (h - pool) // stride + 1, (w - pool) // stride + 1
        if ho < 1 or wo < 1:
            raise ValueError(f"maxpool2d_forward: x {x.shape} is smaller than pool={pool}")
        out = self.scratch(ws, "out", (n, c, ho, wo), x.dtype)
        argmax = self.scratch(ws, "argmax", (n * c, ho, wo), np.int32)
        K.maxpool2d_forward_kernel[K.elementwise_grid(out.size), K.ELEMENTWISE_THREADS](
            x.reshape(n * c, h, w), pool, stride, out.reshape(n * c, ho, wo), argmax)
        return out, (x.shape, argmax, pool, stride)

    def maxpool2d_backward(self, dout, cache, ws=None):
        (n, c, h, w), argmax, pool, stride = cache
        dx = self.scratch(ws, "dx", (n, c, h, w), dout.dtype)
        K.maxpool2d_backward_kernel[K.elementwise_grid(dx.size), K.ELEMENTWISE_THREADS](
            dout.reshape(argmax.shape), argmax, pool, stride, dx.reshape(n * c, h, w))
        return dx

    # ---- activations -----------------------------------------------------------------------
    def relu_forward(self, x, ws=None):
        out = self.scratch(ws, "out", x.shape, x.dtype)
        K.relu_forward_kernel[K.elementwise_grid(x.size), K.ELEMENTWISE_THREADS](
            x.reshape(x.size), out.reshape(x.size))
        return out, out

    def relu_backward(self, dout, cache, ws=None):
        dx = self.scratch(ws, "dx", dout.shape, dout.dtype)
        K.relu_backward_kernel[K.elementwise_grid(dout.size), K.ELEMENTWISE_THREADS](
            dout.reshape(dout.size), cache.reshape(dout.size), dx.reshape(dout.size))
        return dx

    # ---- dense -----------------------------------------------------------------------------
    def _matmul(self, a, b, trans_a=False, trans_b=False, bias=None, ws=None, name="out"):
        """``op(a) @ op(b) (+ bias)`` into the workspace buffer ``name`` (a new device array
        without a workspace)."""
        m = a.shape[1] if trans_a else a.shape[0]
        n = b.shape[0] if trans_b else b.shape[1]
        ka = a.shape[0] if trans_a else a.shape[1]
        kb = b.shape[1] if trans_b else b.shape[0]
        if ka != kb:
            raise ValueError(f"matmul: inner dimensions differ, a {a.shape} (trans={trans_a}) "
                             f"and b {b.shape} (trans={trans_b})")
        if bias is None:
            if a.dtype not in self._no_bias:
                self._no_bias[a.dtype] = cuda.device_array(0, dtype=a.dtype)
            bias = self._no_bias[a.dtype]
        c = self.scratch(ws, name, (m, n), a.dtype)
        K.matmul_kernel[K.gemm_grid(m, n), K.GEMM_THREADS](a, b, bias, trans_a, trans_b, c)
        return c

    def dense_forward(self, x, w, b, ws=None):
        return self._matmul(x, w, bias=b, ws=ws), (x, w)

    def dense_backward(self, dout, cache, need_dx=True, ws=None):
        x, w = cache
        dw = self._matmul(x, dout, trans_a=True, ws=ws, name="dw")
        m = dout.shape[1]
        db = self.scratch(ws, "db", (m,), dout.dtype)
        K.column_sums_kernel[K.column_sum_grid(m), K.COLUMN_SUM_THREADS](dout, db)
        dx = self._matmul(dout, w, trans_b=True, ws=ws, name="dx") if need_dx else None
        return dx, dw, db

    # ---- loss ------------------------------------------------------------------------------
    def softmax_cross_entropy(self, logits, labels, ws=None):
        n = logits.shape[0]
        dlogits = self.scratch(ws, "dlogits", logits.shape, logits.dtype)
        loss = self.scratch(ws, "loss", (1,), logits.dtype)
        correct = self.scratch(ws, "correct", (1,), np.int32)
        K.softmax_xent_kernel[1, K.XENT_THREADS](
            logits, labels, logits.dtype.type(1.0 / n), dlogits, loss, correct)
        # 0-d views, as the contract asks: to_host then yields 0-d numpy arrays.
        return loss.reshape(()), dlogits, correct.reshape(())

    # ---- optimizer primitives (see the contract in base.py) -------------------------------
    def _flat_launch(self, kernel, y, *args):
        size = y.size
        kernel[K.elementwise_grid(size), K.ELEMENTWISE_THREADS](y.reshape(size), *args)

    def axpby(self, y, a, x, b):
        dt = y.dtype.type  # scalars in the array dtype keep float32 math in float32
        self._flat_launch(K.axpby_kernel, y, dt(a), x.reshape(x.size), dt(b))

    def axpby_square(self, y, a, x, b):
        dt = y.dtype.type
        self._flat_launch(K.axpby_square_kernel, y, dt(a), x.reshape(x.size), dt(b))

    def axpby_ratio(self, y, a, b, num, den, eps, eps_inside, center=None):
        dt = y.dtype.type
        if center is None:
            center = self._empty(y.dtype)
        self._flat_launch(K.axpby_ratio_kernel, y, dt(a), dt(b), num.reshape(num.size),
                          den.reshape(den.size), dt(eps), bool(eps_inside),
                          center.reshape(center.size), center.size > 0)

    def _empty(self, dtype):
        """An empty device array of ``dtype`` (placeholder for optional kernel arguments)."""
        if dtype not in self._no_bias:
            self._no_bias[dtype] = cuda.device_array(0, dtype=dtype)
        return self._no_bias[dtype]
