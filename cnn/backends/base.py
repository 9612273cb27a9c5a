"""The backend contract: the primitive ops every backend implements with one signature each.

A *backend* decides where the arithmetic runs (NumPy/BLAS, Numba CPU kernels, CUDA kernels).
Layers, the model, the loss and the optimizer call only these methods, so the layer math and
the training loop are written once (see docs/architecture.md; docs/op-contract.md summarises
this module). Arrays passed to and returned by a backend are that backend's arrays
(``numpy.ndarray`` on the CPU backends, device arrays on CUDA); use ``asarray``/``to_host`` to
cross the boundary.

Layouts (all backends, all paths):

- images: ``(N, C, H, W)``, float32 or float64 (ops keep the input dtype). Inputs from data
  are C-contiguous; an op may return a strided view instead (the numba backend hands
  channels-last buffers from layer to layer as ``(N, C, H, W)`` views), so every op accepts
  any strides on its array inputs, and a caller that needs contiguous memory copies;
- conv weights: ``(F, C, KH, KW)``, conv bias ``(F,)``;
- dense weights: ``(D, M)`` (inputs x outputs), dense bias ``(M,)``;
- labels: ``(N,)`` integer class indices in ``[0, K)``.

Every forward returns ``(out, cache)`` and its backward takes ``(dout, cache)``, as in cs231n;
a cache is opaque to callers and belongs to one call, so several threads may run the same ops
on shared weights at once.

Workspaces: no allocation in the hot path
-----------------------------------------
Every op except the optimizer primitives (``axpby``, ``axpby_square``, ``axpby_ratio``, which
work in place and allocate nothing per call) takes a keyword ``ws=None``: the calling layer's
:class:`cnn.context.Workspace` scope (``ctx.scope(layer.name)``; the loss gets
``ctx.scope("__loss__")``). With ``ws=None`` (tests, evaluation, prediction) an op allocates its
outputs afresh, as a plain function would, and its results may be kept as long as the caller
likes. With a workspace, an op takes every array it returns, every array its cache holds and
every temporary it needs from ``self.scratch(ws, name, shape, dtype)`` (``ws.buffer``), so from
the second training step on, a step allocates nothing: the buffers are per (layer, worker,
batch shape) and reused, on the host for the CPU backends and in device memory for CUDA.

The rules an op follows with a workspace (a new op, e.g. a new layer's, follows them too):

- names are unique within the layer's scope, and a forward and its backward use different
  names (``"out"``, ``"cols"`` in the forward; ``"dx"``, ``"dw"``, ``"db"`` in the backward):
  the forward's outputs and cache must survive the backward, and the backward's ``dx`` is the
  previous layer's ``dout``;
- buffers come uninitialised: an op that accumulates fills with zeros first (``ws.zeros``);
- what an op returns is valid until the same op runs again on the same workspace, i.e. until
  the next training step of that worker: a caller that keeps a result longer copies it (the
  strategies read the loss and the gradients within the step, and keep only host scalars);
- an input is never written (``dout`` may be the next layer's buffer; ``x`` the batch).

Backends whose ops have nothing to reuse (``naive``) accept ``ws`` and ignore it.
"""
from __future__ import annotations

from typing import Any, Tuple

from .registry import BackendInfo, backend_info

Padding = Tuple[Tuple[int, int], Tuple[int, int]]  # ((top, bottom), (left, right)), in pixels


class Backend:
    """Abstract base: the op signatures. Subclasses override every method."""

    #: registry name, e.g. ``"numpy"``
    name: str = "abstract"

    # ---- facts, read from the backend's record in cnn.backends.registry ----------------------
    @property
    def info(self) -> BackendInfo:
        """This backend's record (a CPU backend that compiles nothing when it has none)."""
        return backend_info(self.name)

    @property
    def on_device(self) -> bool:
        """Ops run on an accelerator and arrays live in device memory."""
        return self.info.on_device

    @property
    def jit(self) -> bool:
        """Ops compile on first use (Numba, CUDA): fit then times a warm-up step as JIT
        compile time, outside the epochs."""
        return self.info.jit

    @property
    def parallel_ops(self) -> bool:
        """Each op runs on the backend's own thread pool: one calling thread only."""
        return self.info.parallel_ops

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

    def scratch(self, ws, name: str, shape: tuple[int, ...], dtype) -> Any:
        """An uninitialised array for an op's output, cache or temporary: the workspace's
        persistent buffer ``name`` when the caller passed a workspace ``ws``, else a fresh
        :meth:`empty` array (see "Workspaces" in the module docstring)."""
        if ws is None:
            return self.empty(tuple(shape), dtype)
        return ws.buffer(name, shape, dtype)

    def synchronize(self) -> None:
        """Wait until queued work is done (device backends); timing calls it. No-op on CPU."""

    # ---- convolution -----------------------------------------------------------------------
    def conv2d_forward(self, x, w, b, stride: int, padding: Padding, ws=None):
        """Cross-correlation ``out[n, f] = sum_c x_pad[n, c] * w[f, c] + b[f]``.

        x ``(N, C, H, W)``, w ``(F, C, KH, KW)``, b ``(F,)``; ``padding`` is explicit zero
        padding ``((top, bottom), (left, right))``. Returns ``out`` of shape ``(N, F, Ho, Wo)``
        with ``Ho = (H + top + bottom - KH) // stride + 1`` (``Wo`` likewise), and a cache.
        """
        raise NotImplementedError

    def conv2d_backward(self, dout, cache, need_dx: bool = True, ws=None):
        """``dout (N, F, Ho, Wo)`` -> ``(dx (N, C, H, W), dw (F, C, KH, KW), db (F,))``.

        With ``need_dx=False`` (the first layer, whose input is data) ``dx`` is ``None`` and
        not computed."""
        raise NotImplementedError

    # ---- pooling ---------------------------------------------------------------------------
    def maxpool2d_forward(self, x, pool: int, stride: int, ws=None):
        """Max over ``pool x pool`` windows, no padding: ``(N, C, H, W) -> (N, C, Ho, Wo)``
        with ``Ho = (H - pool) // stride + 1``. Ties: the first maximum in row-major window
        order receives the gradient."""
        raise NotImplementedError

    def maxpool2d_backward(self, dout, cache, ws=None):
        """``dout (N, C, Ho, Wo)`` -> ``dx (N, C, H, W)`` (overlapping windows accumulate)."""
        raise NotImplementedError

    # ---- activations -----------------------------------------------------------------------
    def relu_forward(self, x, ws=None):
        """``max(x, 0)`` elementwise, any shape."""
        raise NotImplementedError

    def relu_backward(self, dout, cache, ws=None):
        """``dout * (x > 0)``: the derivative at 0 is taken as 0 (as TensorFlow does)."""
        raise NotImplementedError

    # ---- fused runs of layers (optional) ------------------------------------------------------
    #: the runs of layers this backend executes as one op, as :class:`cnn.backends.fusion.Fusion`
    #: objects, tried in this order at each layer (see :func:`cnn.plan.plan_layers`); a backend that
    #: lists one implements the fused ops it calls (below)
    fusions: tuple = ()

    def maxpool2d_relu_forward(self, x, pool: int, stride: int, ws=None):
        """``maxpool(relu(x))``, computed as ``relu(maxpool(x))``: shapes as
        :meth:`maxpool2d_forward`. Called by :data:`~cnn.backends.fusion.RELU_MAXPOOL`."""
        raise NotImplementedError

    def maxpool2d_relu_backward(self, dout, cache, ws=None):
        """The backward of :meth:`maxpool2d_relu_forward`: ``dout`` at each window's first
        maximum where the pooled value is positive, zero elsewhere."""
        raise NotImplementedError

    def conv2d_relu_maxpool2d_forward(self, x, w, b, stride: int, padding: Padding, pool: int,
                                      pool_stride: int, ws=None):
        """``maxpool(relu(conv2d(x)))``: arguments as :meth:`conv2d_forward` and
        :meth:`maxpool2d_forward`; returns the pooled ``(N, F, Hp, Wp)`` output and a cache.
        Called by :data:`~cnn.backends.fusion.CONV_RELU_MAXPOOL`."""
        raise NotImplementedError

    def conv2d_relu_maxpool2d_backward(self, dout, cache, need_dx: bool = True, ws=None):
        """``dout (N, F, Hp, Wp)`` -> ``(dx, dw, db)`` as :meth:`conv2d_backward`."""
        raise NotImplementedError

    # ---- global average pooling -----------------------------------------------------------
    def globalavgpool2d_forward(self, x, ws=None):
        """The mean of each channel's image: ``x (N, C, H, W)`` -> ``out (N, C)`` with
        ``out[n, c] = sum_{h, w} x[n, c, h, w] / (H * W)``. Returns ``(out, cache)``."""
        raise NotImplementedError

    def globalavgpool2d_backward(self, dout, cache, ws=None):
        """``dout (N, C)`` -> ``dx (N, C, H, W)`` with ``dx[n, c, h, w] = dout[n, c] / (H * W)``."""
        raise NotImplementedError

    # ---- residual blocks -------------------------------------------------------------------
    # A residual block (:class:`cnn.layers.Residual`) computes ``act(main(x) + shortcut(x))``:
    # its branches are layers (each with its own ops and workspace scope), and these ops are
    # the block's own: the sum (with the ReLU after it), the sum of the branches' input
    # gradients, and the parameter-free shortcut of option A (He et al. 2016, section 4.2),
    # which runs as a layer of the shortcut branch. The sum ops share the block's scope
    # (``ctx.scope(block.name)``), so their buffer names differ from each other's: on the NumPy
    # backend ``"out"`` (forward), ``"dsum"`` (its backward), ``"dx"`` (the gradient sum).
    def residual_add_forward(self, main, shortcut, relu: bool, ws=None):
        """``out = main + shortcut``, then ``max(out, 0)`` when ``relu``: the two branches'
        outputs, of one shape (``(N, C, H, W)`` or ``(N, D)``; strides may differ), -> ``out``
        of that shape. Returns ``(out, cache)``."""
        raise NotImplementedError

    def residual_add_backward(self, dout, cache, ws=None):
        """``dout`` (the shape of ``out``) -> the gradient of the loss with respect to the sum's
        operands, one array for both: ``dout * (out > 0)`` when the forward applied the ReLU
        (the derivative at 0 taken as 0, as :meth:`relu_backward`), else ``dout`` itself (which
        may then be returned as it is: the callers never write it)."""
        raise NotImplementedError

    def residual_grad_sum(self, dx_main, dx_shortcut, ws=None):
        """The block's input gradient ``dx = dx_main + dx_shortcut``: the two branches'
        gradients with respect to the block's input, of one shape (``(N, C, H, W)`` or
        ``(N, D)``; strides may differ), -> ``dx`` of that shape."""
        raise NotImplementedError

    def shortcut_pad_forward(self, x, stride: int, channels_before: int, channels_after: int,
                             ws=None):
        """Option A's shortcut: ``x (N, C, H, W)`` subsampled by ``stride`` and zero-padded on
        the channel axis -> ``out (N, channels_before + C + channels_after, Ho, Wo)`` with
        ``Ho = (H - 1) // stride + 1`` (``Wo`` likewise), ``out[n, channels_before + c, i, j] =
        x[n, c, i * stride, j * stride]`` and zeros in the first ``channels_before`` and the
        last ``channels_after`` channels (PyTorch: ``F.pad(x[:, :, ::s, ::s], (0, 0, 0, 0,
        before, after))``). Returns ``(out, cache)``."""
        raise NotImplementedError

    def shortcut_pad_backward(self, dout, cache, ws=None):
        """``dout (N, C', Ho, Wo)`` -> ``dx (N, C, H, W)``: ``dx[n, c, i * stride, j * stride]
        = dout[n, channels_before + c, i, j]``, zero at the pixels the subsampling skips."""
        raise NotImplementedError

    # ---- dense -----------------------------------------------------------------------------
    def dense_forward(self, x, w, b, ws=None):
        """``x (N, D) @ w (D, M) + b (M,)`` -> ``(N, M)``."""
        raise NotImplementedError

    def dense_backward(self, dout, cache, need_dx: bool = True, ws=None):
        """``dout (N, M)`` -> ``(dx (N, D), dw (D, M), db (M,))``; ``dx`` is ``None`` when
        ``need_dx`` is False."""
        raise NotImplementedError

    # ---- loss ------------------------------------------------------------------------------
    def softmax_cross_entropy(self, logits, labels, ws=None):
        """Mean softmax cross-entropy over the batch, from log-sum-exp (no overflow).

        logits ``(N, K)``, labels ``(N,)`` ints. Returns ``(loss, dlogits, correct)``: the
        mean loss (a 0-d array on the backend, float), its gradient ``(softmax - onehot) / N``
        of shape ``(N, K)``, and the number of rows whose argmax equals the label (a 0-d
        integer array on the backend). Callers read the scalars with ``to_host``.
        """
        raise NotImplementedError

    # ---- more activations ------------------------------------------------------------------
    def sigmoid_forward(self, x, ws=None):
        """``1 / (1 + exp(-x))`` elementwise, any shape, without overflow for any ``x``.
        Returns ``(out, cache)``."""
        raise NotImplementedError

    def sigmoid_backward(self, dout, cache, ws=None):
        """``dout * out * (1 - out)``."""
        raise NotImplementedError

    def tanh_forward(self, x, ws=None):
        """``tanh(x)`` elementwise, any shape. Returns ``(out, cache)``."""
        raise NotImplementedError

    def tanh_backward(self, dout, cache, ws=None):
        """``dout * (1 - out**2)``."""
        raise NotImplementedError

    # ---- dropout ---------------------------------------------------------------------------
    def dropout_forward(self, x, rate: float, key: int, offset: int, ws=None):
        """Inverted dropout of ``x (N, ...)``: unit ``j`` of example ``i`` is kept (and scaled
        by ``1 / (1 - rate)``) or zeroed as :mod:`cnn.backends.rng` decides from the 64-bit
        ``key`` (seed, layer, step), the global example index ``offset + i`` and ``j``, so
        every backend drops the same units. ``0 <= rate < 1``. Returns ``(out, cache)``."""
        raise NotImplementedError

    def dropout_backward(self, dout, cache, ws=None):
        """``dout`` times the forward's ``keep / (1 - rate)``."""
        raise NotImplementedError

    # ---- batch normalisation -----------------------------------------------------------------
    # x is (N, C) or (N, C, H, W); statistics are per channel (axis 1) over all other axes,
    # i.e. over L = N (or N*H*W) values each. Vectors below are (C,) in the dtype of x; the
    # scalars (inv_count, eps, momentum, scale) are Python floats.
    def batchnorm_sums(self, x, ws=None):
        """Per-channel sums of ``x``: ``(C,)``."""
        raise NotImplementedError

    def batchnorm_sq_dev_sums(self, x, sums, inv_count: float, ws=None):
        """Per-channel ``sum (x - mean)**2`` with ``mean = sums * inv_count``: ``(C,)``."""
        raise NotImplementedError

    def batchnorm_train_forward(self, x, sums, sq_sums, inv_count: float, gamma, beta,
                                eps: float, ws=None):
        """``gamma * (x - mean) / sqrt(var + eps) + beta`` with the batch statistics
        ``mean = sums * inv_count``, ``var = sq_sums * inv_count`` (biased, as Keras).
        Returns ``(out, cache)``."""
        raise NotImplementedError

    def batchnorm_infer_forward(self, x, running_mean, running_var, gamma, beta, eps: float,
                                ws=None):
        """The same normalisation with the running statistics. Returns ``(out, cache)``."""
        raise NotImplementedError

    def batchnorm_running_update(self, running_mean, running_var, sums, sq_sums,
                                 inv_count: float, momentum: float, ws=None):
        """New running statistics: ``momentum * running + (1 - momentum) * batch`` for the mean
        and the variance. Always **new arrays**, never workspace buffers, even with ``ws``:
        they outlive the step, as the buffers the strategy commits them to."""
        raise NotImplementedError

    def batchnorm_backward_sums(self, dout, cache, ws=None):
        """``(sum dout, sum dout * xhat)`` per channel, ``xhat`` the normalised input: the
        gradients of ``beta`` and ``gamma``."""
        raise NotImplementedError

    def batchnorm_backward_dx(self, dout, cache, sum_dy, sum_dy_xhat, scale: float, ws=None):
        """``dx = gamma / sqrt(var + eps) * (dout - scale * (sum_dy + xhat * sum_dy_xhat))``.

        With the batch's own sums and ``scale = 1 / L`` this is the gradient through the batch
        statistics; ``scale = 0`` (the sums are then ignored) is the gradient with constant
        statistics (an inference-mode pass). :class:`cnn.layers.BatchNorm` passes sums reduced
        over the shards of a global batch for synchronised batch norm."""
        raise NotImplementedError

    # ---- more losses -------------------------------------------------------------------------
    def binary_cross_entropy(self, logits, labels, ws=None):
        """Mean binary cross-entropy of ``sigmoid(logits)``, from the logits (finite for any
        magnitude: ``max(z, 0) - z*y + log(1 + exp(-|z|))``).

        logits ``(N, 1)``, labels ``(N,)`` ints in {0, 1}. Returns ``(loss, dlogits,
        correct)`` as :meth:`softmax_cross_entropy` does: ``dlogits = (sigmoid(z) - y) / N``
        and ``correct`` counts rows with ``(z > 0) == y``."""
        raise NotImplementedError

    # ---- weight penalties (kernel_regularizer) ---------------------------------------------
    def weight_penalty(self, w, l1: float, l2: float, loss, ws=None):
        """``loss + l1 * sum |w| + l2 * sum w**2`` as a new 0-d array (``loss`` is 0-d)."""
        raise NotImplementedError

    def weight_penalty_grad(self, grad, w, l1: float, l2: float, ws=None):
        """In place ``grad += l1 * sign(w) + 2 * l2 * w`` (sign(0) = 0); returns ``grad``."""
        raise NotImplementedError

    # ---- optimizer primitives ----------------------------------------------------------------
    # Every optimizer of :mod:`cnn.optim` is written once over these three element-wise
    # updates. All work in place on ``y``; ``x``, ``num``, ``den`` and ``center`` are read only
    # (``x`` may be ``y`` itself); arrays have one shape (any, or flat slices of flattened
    # arrays); the float scalars are applied in the arrays' dtype (float32 arrays compute in
    # float32) and are ordinary arguments, never compiled in (a schedule changes ``lr`` every
    # step).
    def axpby(self, y, a: float, x, b: float) -> None:
        """In place: ``y = a * y + b * x``."""
        raise NotImplementedError

    def axpby_square(self, y, a: float, x, b: float) -> None:
        """In place: ``y = a * y + b * x * x`` (a running mean of squares)."""
        raise NotImplementedError

    def axpby_ratio(self, y, a: float, b: float, num, den, eps: float, eps_inside: bool,
                    center=None) -> None:
        """In place: ``y = a * y + b * num / d`` with ``d = sqrt(den - center**2) + eps``, or
        ``d = sqrt(den - center**2 + eps)`` when ``eps_inside`` (``center`` None: 0)."""
        raise NotImplementedError
