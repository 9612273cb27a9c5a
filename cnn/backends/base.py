"""The backend contract: the primitive ops every backend implements with one signature each.

A *backend* decides where the arithmetic runs (NumPy/BLAS, Numba CPU kernels, CUDA kernels).
Layers, the model, the loss and the optimizer call only these methods, so the layer math and
the training loop are written once (see DESIGN.md). Arrays passed to and returned by a backend
are that backend's arrays (``numpy.ndarray`` on the CPU backends, device arrays on CUDA); use
``asarray``/``to_host`` to cross the boundary.

Layouts (all backends, all paths):

- images: ``(N, C, H, W)``, C-contiguous, float32 or float64 (ops keep the input dtype);
- conv weights: ``(F, C, KH, KW)``, conv bias ``(F,)``;
- dense weights: ``(D, M)`` (inputs x outputs), dense bias ``(M,)``;
- labels: ``(N,)`` integer class indices in ``[0, K)``.

Every forward returns ``(out, cache)`` and its backward takes ``(dout, cache)``, as in cs231n;
a cache is opaque to callers and belongs to one call, so several threads may run the same ops
on shared weights at once.
"""
from __future__ import annotations

from typing import Any, Tuple

Padding = Tuple[Tuple[int, int], Tuple[int, int]]  # ((top, bottom), (left, right)), in pixels


class Backend:
    """Abstract base: the op signatures. Subclasses override every method."""

    #: registry name, e.g. ``"numpy"``
    name: str = "abstract"
    #: True when ops run on an accelerator and arrays live in device memory
    on_device: bool = False
    #: True when ops compile on first use (Numba, CUDA): fit then times a warm-up step as
    #: JIT compile time, outside the epochs
    jit: bool = False

    # ---- memory ---------------------------------------------------------------------------
    def asarray(self, x: Any) -> Any:
        """Host array -> this backend's array (a copy on the device for CUDA)."""
        raise NotImplementedError

    def to_host(self, x: Any) -> Any:
        """This backend's array -> ``numpy.ndarray``."""
        raise NotImplementedError

    def zeros_like(self, x: Any) -> Any:
        """Zero-filled array with the shape and dtype of ``x`` on this backend."""
        raise NotImplementedError

    def empty(self, shape: tuple[int, ...], dtype) -> Any:
        """An uninitialised C-contiguous array of ``shape`` and ``dtype`` on this backend (the
        allocator of :class:`cnn.context.Workspace`)."""
        raise NotImplementedError

    def fill_zero(self, x: Any) -> None:
        """In place: ``x[...] = 0``."""
        raise NotImplementedError

    def synchronize(self) -> None:
        """Wait until queued work is done (device backends); timing calls it. No-op on CPU."""

    # ---- convolution -----------------------------------------------------------------------
    def conv2d_forward(self, x, w, b, stride: int, padding: Padding):
        """Cross-correlation ``out[n, f] = sum_c x_pad[n, c] * w[f, c] + b[f]``.

        x ``(N, C, H, W)``, w ``(F, C, KH, KW)``, b ``(F,)``; ``padding`` is explicit zero
        padding ``((top, bottom), (left, right))``. Returns ``out`` of shape ``(N, F, Ho, Wo)``
        with ``Ho = (H + top + bottom - KH) // stride + 1`` (``Wo`` likewise), and a cache.
        """
        raise NotImplementedError

    def conv2d_backward(self, dout, cache, need_dx: bool = True):
        """``dout (N, F, Ho, Wo)`` -> ``(dx (N, C, H, W), dw (F, C, KH, KW), db (F,))``.

        With ``need_dx=False`` (the first layer, whose input is data) ``dx`` is ``None`` and
        not computed."""
        raise NotImplementedError

    # ---- pooling ---------------------------------------------------------------------------
    def maxpool2d_forward(self, x, pool: int, stride: int):
        """Max over ``pool x pool`` windows, no padding: ``(N, C, H, W) -> (N, C, Ho, Wo)``
        with ``Ho = (H - pool) // stride + 1``. Ties: the first maximum in row-major window
        order receives the gradient."""
        raise NotImplementedError

    def maxpool2d_backward(self, dout, cache):
        """``dout (N, C, Ho, Wo)`` -> ``dx (N, C, H, W)`` (overlapping windows accumulate)."""
        raise NotImplementedError

    # ---- activations -----------------------------------------------------------------------
    def relu_forward(self, x):
        """``max(x, 0)`` elementwise, any shape."""
        raise NotImplementedError

    def relu_backward(self, dout, cache):
        """``dout * (x > 0)``: the derivative at 0 is taken as 0 (as TensorFlow does)."""
        raise NotImplementedError

    # ---- dense -----------------------------------------------------------------------------
    def dense_forward(self, x, w, b):
        """``x (N, D) @ w (D, M) + b (M,)`` -> ``(N, M)``."""
        raise NotImplementedError

    def dense_backward(self, dout, cache, need_dx: bool = True):
        """``dout (N, M)`` -> ``(dx (N, D), dw (D, M), db (M,))``; ``dx`` is ``None`` when
        ``need_dx`` is False."""
        raise NotImplementedError

    # ---- loss ------------------------------------------------------------------------------
    def softmax_cross_entropy(self, logits, labels):
        """Mean softmax cross-entropy over the batch, from log-sum-exp (no overflow).

        logits ``(N, K)``, labels ``(N,)`` ints. Returns ``(loss, dlogits, correct)``: the
        mean loss (a 0-d array on the backend, float), its gradient ``(softmax - onehot) / N``
        of shape ``(N, K)``, and the number of rows whose argmax equals the label (a 0-d
        integer array on the backend). Callers read the scalars with ``to_host``.
        """
        raise NotImplementedError

    # ---- optimizer -------------------------------------------------------------------------
    def sgd_update(self, param, grad, velocity, lr: float, momentum: float) -> None:
        """In place: ``velocity = momentum * velocity - lr * grad; param += velocity``.

        This is Keras's SGD formulation; with ``momentum == 0`` it is ``param -= lr * grad``
        and ``velocity`` may be ``None``.
        """
        raise NotImplementedError
