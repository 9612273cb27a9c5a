"""Layers: shapes, initialisation, and forward/backward expressed through backend ops.

A layer holds configuration only; parameters (trained) and buffers (non-trained state, such as
batch norm's running statistics) live in dicts the model owns, and every forward returns a
cache that belongs to that call. So one layer object can be driven by several threads at once
(data-parallel strategies) and by any backend (NumPy, Numba, CUDA).

A forward never writes a buffer: a training pass puts the new values in ``ctx.updates`` under
``"<layer name>.<buffer name>"`` and the strategy commits them after the step (see
:mod:`cnn.context`). Randomness (dropout masks) is a pure function of ``(ctx.seed, layer name,
ctx.step, ctx.offset + i)`` (see :mod:`cnn.backends.rng`).

Shapes exclude the batch axis: an image input is ``(C, H, W)``, a flat one ``(D,)``.
"""
from __future__ import annotations

import math
from typing import Any, Callable, ClassVar

import numpy as np

from .backends import rng as counter_rng
from .backends.base import Backend
from .checks import check_bool, check_choice, check_int, check_known, check_number, check_pair
from .context import StepContext
from .plan import LayerOp, backward_ops, forward_ops, plan_layers

Params = dict[str, Any]


# ---- initialisers: (shape, fan_in, fan_out, rng, dtype) -> array ------------------------------
def _glorot_uniform(shape, fan_in, fan_out, rng, dtype):
    limit = math.sqrt(6.0 / (fan_in + fan_out))
    return rng.uniform(-limit, limit, size=shape).astype(dtype)


def _glorot_normal(shape, fan_in, fan_out, rng, dtype):
    return (rng.standard_normal(shape) * math.sqrt(2.0 / (fan_in + fan_out))).astype(dtype)


def _he_uniform(shape, fan_in, fan_out, rng, dtype):
    limit = math.sqrt(6.0 / fan_in)
    return rng.uniform(-limit, limit, size=shape).astype(dtype)


def _he_normal(shape, fan_in, fan_out, rng, dtype):
    # a plain normal, as PyTorch's kaiming_normal_ (fan_in mode); Keras's he_normal draws a
    # normal truncated at two standard deviations, rescaled to the same variance 2 / fan_in
    return (rng.standard_normal(shape) * math.sqrt(2.0 / fan_in)).astype(dtype)


def _torch_default(shape, fan_in, fan_out, rng, dtype):
    # PyTorch's Conv2d and Linear: kaiming_uniform_(a=sqrt(5)), i.e. U(-b, b) with
    # b = sqrt(2 / (1 + a**2)) * sqrt(3 / fan_in) = 1 / sqrt(fan_in); their bias likewise
    limit = 1.0 / math.sqrt(fan_in)
    return rng.uniform(-limit, limit, size=shape).astype(dtype)


#: ``kernel_initializer`` -> ``(shape, fan_in, fan_out, rng, dtype) -> array``; the frameworks'
#: defaults by their names: ``keras_default`` is Keras's glorot_uniform, ``torch_default``
#: PyTorch's (which draws the bias too, see :data:`BIAS_INITIALIZERS`)
INITIALIZERS: dict[str, Callable] = {
    "glorot_uniform": _glorot_uniform,
    "glorot_normal": _glorot_normal,
    "he_uniform": _he_uniform,
    "he_normal": _he_normal,
    "keras_default": _glorot_uniform,
    "torch_default": _torch_default,
}
#: kernel initialisers that draw the bias as well, after the kernel (PyTorch's default); with
#: every other one the bias starts at zero, as in Keras
BIAS_INITIALIZERS: dict[str, Callable] = {"torch_default": _torch_default}


def _kernel_and_bias(layer, shape, units: int, fan_in: int, fan_out: int, rng, dtype) -> Params:
    """The initial ``w`` of ``shape`` (``layer.kernel_initializer``) and, when the layer has
    one, its bias of ``units`` values (zeros, or drawn after ``w`` for the initialisers of
    :data:`BIAS_INITIALIZERS`)."""
    params = {"w": INITIALIZERS[layer.kernel_initializer](shape, fan_in, fan_out, rng, dtype)}
    if layer.use_bias:
        draw = BIAS_INITIALIZERS.get(layer.kernel_initializer)
        params["b"] = (np.zeros(units, dtype=dtype) if draw is None
                       else draw((units,), fan_in, fan_out, rng, dtype))
    return params


def _bias(layer, params: Params, units: int, backend: Backend, ws, dtype):
    """The bias the layer's ops add: its own, or for a layer without one (``use_bias=False``)
    zeros from its workspace (adding zeros is exact, and the ops of every backend take a
    bias; the gradient they return for it is dropped)."""
    if layer.use_bias:
        return params["b"]
    zeros = backend.scratch(ws, "zero_bias", (units,), dtype)
    backend.fill_zero(zeros)
    return zeros


#: Keras's string shorthands for kernel regularisers, with Keras's default factors
REGULARIZER_SHORTHANDS = {"l1": {"l1": 0.01, "l2": 0.0}, "l2": {"l1": 0.0, "l2": 0.01}}


def _regularizer(value: Any, layer: str) -> tuple[float, float] | None:
    """``kernel_regularizer`` -> ``(l1, l2)`` or None. Accepts None, ``"l1"``/``"l2"`` (factor
    0.01, as Keras) or a dict ``{"l1": a, "l2": b}`` (either key may be left out)."""
    if value is None:
        return None
    spec = None
    if isinstance(value, str) and value.lower() in REGULARIZER_SHORTHANDS:
        spec = REGULARIZER_SHORTHANDS[value.lower()]
    elif isinstance(value, dict) and value and set(value) <= {"l1", "l2"}:
        spec = value
    if spec is None:
        raise ValueError(f"{layer}: kernel_regularizer must be None, 'l1', 'l2' or a dict like "
                         f"{{'l1': 0.0, 'l2': 1e-4}}. Received kernel_regularizer={value!r}")
    l1 = check_number(layer, "kernel_regularizer l1", spec.get("l1", 0.0), low=0.0)
    l2 = check_number(layer, "kernel_regularizer l2", spec.get("l2", 0.0), low=0.0)
    return (l1, l2) if (l1 or l2) else None


class Layer:
    """Base class. Subclasses set ``type`` and override what they need."""

    type: ClassVar[str] = "layer"
    #: parameter names in a fixed order (e.g. ``("w", "b")``)
    param_names: ClassVar[tuple[str, ...]] = ()
    #: buffer names (non-trained state the model keeps, saves and averages; e.g. batch norm's
    #: ``("running_mean", "running_var")``)
    buffer_names: ClassVar[tuple[str, ...]] = ()

    def __init__(self, name: str | None = None):
        self.name = name
        self.input_shape: tuple[int, ...] | None = None
        self.output_shape: tuple[int, ...] | None = None

    def build(self, input_shape: tuple[int, ...]) -> tuple[int, ...]:
        """Record the per-example input shape, check it, return the output shape."""
        self.input_shape = tuple(input_shape)
        self.output_shape = self._output_shape(self.input_shape)
        return self.output_shape

    def _output_shape(self, input_shape):
        return input_shape

    def init_params(self, rng: np.random.Generator, dtype) -> Params:
        return {}

    def init_buffers(self, dtype) -> Params:
        """Initial values of the buffers, keyed like ``buffer_names``."""
        return {}

    def penalties(self) -> list[tuple[str, float, float]]:
        """``(param name, l1, l2)`` for each regularised parameter: the model adds
        ``l1 * sum|p| + l2 * sum p**2`` to the loss and its gradient to the parameter's (see
        :meth:`cnn.model.Sequential.backward`)."""
        return []

    def forward(self, params: Params, x, backend: Backend, ctx: StepContext):
        """``x (N, *input_shape)`` -> ``(out (N, *output_shape), cache)``. ``params`` holds the
        layer's parameters and, read-only, its buffers. ``ctx`` says whether this is a training
        pass, and holds this worker's workspace: pass ``ws=ctx.scope(self.name)`` to every
        backend op (see "Workspaces" in :mod:`cnn.backends.base`)."""
        raise NotImplementedError

    def backward(self, params: Params, dout, cache, backend: Backend, ctx: StepContext,
                 need_dx: bool = True):
        """``dout (N, *output_shape)`` -> ``(dx or None, grads)`` with ``grads`` keyed like params."""
        raise NotImplementedError

    def sublayers(self) -> tuple["Layer", ...]:
        """The layers this one holds (a residual block's branches, in order); none for a
        plain layer."""
        return ()

    def leaves(self) -> tuple["Layer", ...]:
        """The plain layers this one is made of, in order: itself, or for a layer that holds
        layers (a residual block) theirs. Parameters and buffers belong to leaves: the model
        keys them ``"<leaf name>.<name>"``."""
        subs = self.sublayers()
        if not subs:
            return (self,)
        return tuple(leaf for layer in subs for leaf in layer.leaves())

    def plan_op(self, backend: Backend) -> LayerOp:
        """This layer as an op of a plan on ``backend`` (see :mod:`cnn.plan`), when no fusion
        of the backend takes it into a run: its own :meth:`forward` and :meth:`backward`. A
        layer that holds layers of its own returns an op that walks their plans."""
        return LayerOp(self, backend)

    def config(self) -> dict:
        """The spec entry that rebuilds this layer."""
        return {"type": self.type, "name": self.name}

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.config().items() if k != "type")
        return f"{type(self).__name__}({args})"


def _expect_rank(layer: Layer, input_shape, rank: int, what: str) -> None:
    if len(input_shape) != rank:
        raise ValueError(f"{layer.type} {layer.name!r} expects {what} inputs; "
                         f"received per-example shape {tuple(input_shape)}")


class Conv2D(Layer):
    """2-D cross-correlation over ``(N, C, H, W)`` with ``filters`` output channels.

    ``padding='valid'``: ``Ho = (H - KH) // stride + 1``. ``padding='same'``: ``Ho = ceil(H /
    stride)``, with TensorFlow's split of the total padding (the extra pixel goes bottom/right),
    so Keras models with the same weights give the same outputs. ``padding=p`` (an int, or a
    pair ``[ph, pw]``): ``p`` zeros on every side, as PyTorch's ``Conv2d(padding=p)``, so
    ``Ho = (H + 2 p - KH) // stride + 1`` (a strided 3x3 conv with ``padding=1`` pads top and
    bottom alike, where ``'same'`` pads only the bottom).

    ``use_bias=False``: no bias parameter (a conv followed by batch norm, whose ``beta`` takes
    its place).
    """

    type = "conv2d"

    def __init__(self, filters, kernel_size=3, stride=1, padding="valid",
                 kernel_initializer="glorot_uniform", kernel_regularizer=None, use_bias=True,
                 name=None):
        super().__init__(name)
        self.filters = check_int("Conv2D", "filters", filters)
        self.kernel_regularizer = _regularizer(kernel_regularizer, "Conv2D")
        self.kernel_size = check_pair("Conv2D", "kernel_size", kernel_size)
        self.stride = check_int("Conv2D", "stride", stride)
        self.padding = _conv_padding(padding)
        self.kernel_initializer = check_known("Conv2D", "kernel_initializer",
                                              kernel_initializer, sorted(INITIALIZERS))
        self.use_bias = check_bool("Conv2D", "use_bias", use_bias)
        self.param_names = ("w", "b") if self.use_bias else ("w",)
        self.pads = ((0, 0), (0, 0))

    def _output_shape(self, input_shape):
        _expect_rank(self, input_shape, 3, "(C, H, W)")
        _, h, w = input_shape
        kh, kw = self.kernel_size
        s = self.stride
        if self.padding == "same":
            ho, wo = -(-h // s), -(-w // s)
            ph = max((ho - 1) * s + kh - h, 0)
            pw = max((wo - 1) * s + kw - w, 0)
            self.pads = ((ph // 2, ph - ph // 2), (pw // 2, pw - pw // 2))
            return (self.filters, ho, wo)
        ph, pw = (0, 0) if self.padding == "valid" else _padding_pair(self.padding)
        self.pads = ((ph, ph), (pw, pw))
        if h + 2 * ph < kh or w + 2 * pw < kw:
            raise ValueError(f"Conv2D {self.name!r}: kernel {self.kernel_size} is larger than "
                             f"its input {tuple(input_shape)} with padding={self.padding!r}")
        return (self.filters, (h + 2 * ph - kh) // s + 1, (w + 2 * pw - kw) // s + 1)

    def init_params(self, rng, dtype):
        c = self.input_shape[0]
        kh, kw = self.kernel_size
        return _kernel_and_bias(self, (self.filters, c, kh, kw), self.filters, c * kh * kw,
                                self.filters * kh * kw, rng, dtype)

    def forward(self, params, x, backend, ctx):
        ws = ctx.scope(self.name)
        return backend.conv2d_forward(x, params["w"], _bias(self, params, self.filters, backend,
                                                            ws, x.dtype),
                                      self.stride, self.pads, ws=ws)

    def backward(self, params, dout, cache, backend, ctx, need_dx=True):
        dx, dw, db = backend.conv2d_backward(dout, cache, need_dx=need_dx, ws=ctx.scope(self.name))
        return dx, ({"w": dw, "b": db} if self.use_bias else {"w": dw})

    def penalties(self):
        return _kernel_penalties(self)

    def config(self):
        return {**super().config(), "filters": self.filters, "kernel_size": list(self.kernel_size),
                "stride": self.stride, "padding": self.padding,
                "kernel_initializer": self.kernel_initializer, **_regularizer_config(self),
                **({} if self.use_bias else {"use_bias": False})}


def _conv_padding(value: Any):
    """``padding`` of a Conv2D: ``'valid'``, ``'same'``, a non-negative int or a pair of them
    (kept as a list)."""
    if isinstance(value, str) and value in ("valid", "same"):
        return value
    if isinstance(value, (list, tuple)) and len(value) == 2:
        return [check_int("Conv2D", "padding", v, low=0) for v in value]
    if not isinstance(value, (list, tuple, str)):
        return check_int("Conv2D", "padding", value, low=0)
    raise ValueError(f"Conv2D: padding must be 'valid', 'same', a non-negative integer or a "
                     f"pair of them. Received padding={value!r}")


def _padding_pair(padding) -> tuple[int, int]:
    return (padding, padding) if isinstance(padding, int) else tuple(padding)


def _kernel_penalties(layer):
    if layer.kernel_regularizer is None:
        return []
    return [("w", *layer.kernel_regularizer)]


def _regularizer_config(layer) -> dict:
    if layer.kernel_regularizer is None:
        return {}
    l1, l2 = layer.kernel_regularizer
    return {"kernel_regularizer": {"l1": l1, "l2": l2}}


class MaxPool2D(Layer):
    """Max pooling over ``pool x pool`` windows, no padding; ``stride`` defaults to ``pool``.

    ``(N, C, H, W) -> (N, C, (H - pool) // stride + 1, (W - pool) // stride + 1)``.
    """

    type = "maxpool2d"

    def __init__(self, pool_size=2, stride=None, name=None):
        super().__init__(name)
        self.pool_size = check_int("MaxPool2D", "pool_size", pool_size)
        self.stride = self.pool_size if stride is None else check_int("MaxPool2D", "stride", stride)

    def _output_shape(self, input_shape):
        _expect_rank(self, input_shape, 3, "(C, H, W)")
        c, h, w = input_shape
        p, s = self.pool_size, self.stride
        if h < p or w < p:
            raise ValueError(f"MaxPool2D {self.name!r}: pool_size {p} is larger than its input "
                             f"{tuple(input_shape)}")
        return (c, (h - p) // s + 1, (w - p) // s + 1)

    def forward(self, params, x, backend, ctx):
        return backend.maxpool2d_forward(x, self.pool_size, self.stride, ws=ctx.scope(self.name))

    def backward(self, params, dout, cache, backend, ctx, need_dx=True):
        return backend.maxpool2d_backward(dout, cache, ws=ctx.scope(self.name)), {}

    def config(self):
        return {**super().config(), "pool_size": self.pool_size, "stride": self.stride}


class ReLU(Layer):
    type = "relu"

    def forward(self, params, x, backend, ctx):
        return backend.relu_forward(x, ws=ctx.scope(self.name))

    def backward(self, params, dout, cache, backend, ctx, need_dx=True):
        return backend.relu_backward(dout, cache, ws=ctx.scope(self.name)), {}


class Flatten(Layer):
    """``(N, C, H, W) -> (N, C*H*W)`` in C order (channel-major; Keras flattens ``H, W, C``,
    which the weight transfer accounts for)."""

    type = "flatten"

    def _output_shape(self, input_shape):
        return (int(np.prod(input_shape)),)

    def forward(self, params, x, backend, ctx):
        return x.reshape(x.shape[0], -1), x.shape

    def backward(self, params, dout, cache, backend, ctx, need_dx=True):
        return dout.reshape(cache), {}


class Dense(Layer):
    """Fully connected: ``(N, D) @ w (D, units) + b -> (N, units)``; ``use_bias=False``: no
    ``b``."""

    type = "dense"

    def __init__(self, units, kernel_initializer="glorot_uniform", kernel_regularizer=None,
                 use_bias=True, name=None):
        super().__init__(name)
        self.units = check_int("Dense", "units", units)
        self.kernel_initializer = check_known("Dense", "kernel_initializer",
                                              kernel_initializer, sorted(INITIALIZERS))
        self.kernel_regularizer = _regularizer(kernel_regularizer, "Dense")
        self.use_bias = check_bool("Dense", "use_bias", use_bias)
        self.param_names = ("w", "b") if self.use_bias else ("w",)

    def _output_shape(self, input_shape):
        _expect_rank(self, input_shape, 1, "flat (D,)")
        return (self.units,)

    def init_params(self, rng, dtype):
        d = self.input_shape[0]
        return _kernel_and_bias(self, (d, self.units), self.units, d, self.units, rng, dtype)

    def forward(self, params, x, backend, ctx):
        ws = ctx.scope(self.name)
        return backend.dense_forward(x, params["w"], _bias(self, params, self.units, backend, ws,
                                                           x.dtype), ws=ws)

    def backward(self, params, dout, cache, backend, ctx, need_dx=True):
        dx, dw, db = backend.dense_backward(dout, cache, need_dx=need_dx,
                                            ws=ctx.scope(self.name))
        return dx, ({"w": dw, "b": db} if self.use_bias else {"w": dw})

    def penalties(self):
        return _kernel_penalties(self)

    def config(self):
        return {**super().config(), "units": self.units,
                "kernel_initializer": self.kernel_initializer, **_regularizer_config(self),
                **({} if self.use_bias else {"use_bias": False})}


class Sigmoid(Layer):
    """``1 / (1 + exp(-x))`` elementwise (overflow-free for any ``x``)."""

    type = "sigmoid"

    def forward(self, params, x, backend, ctx):
        return backend.sigmoid_forward(x, ws=ctx.scope(self.name))

    def backward(self, params, dout, cache, backend, ctx, need_dx=True):
        return backend.sigmoid_backward(dout, cache, ws=ctx.scope(self.name)), {}


class Tanh(Layer):
    """``tanh(x)`` elementwise."""

    type = "tanh"

    def forward(self, params, x, backend, ctx):
        return backend.tanh_forward(x, ws=ctx.scope(self.name))

    def backward(self, params, dout, cache, backend, ctx, need_dx=True):
        return backend.tanh_backward(dout, cache, ws=ctx.scope(self.name)), {}


class Dropout(Layer):
    """Inverted dropout (Srivastava et al. 2014, as Keras): in a training pass each unit is
    zeroed with probability ``rate`` and the kept ones are scaled by ``1 / (1 - rate)``; in
    inference it is the identity.

    The mask of unit ``j`` of example ``i`` of the shard is a hash of ``(ctx.seed, layer name,
    ctx.step, ctx.offset + i, j)`` (:mod:`cnn.backends.rng`), never a draw from a stateful
    generator: every backend, worker and rank computes the same mask for the same example of
    the same step, so ``sync`` with dropout is the sequential algorithm.
    """

    type = "dropout"

    def __init__(self, rate, name=None):
        super().__init__(name)
        self.rate = check_number("Dropout", "rate", rate, low=0.0, high=1.0, high_open=True)

    def forward(self, params, x, backend, ctx):
        if not ctx.training or self.rate == 0.0:
            return x, None
        key = counter_rng.pass_key(ctx.seed, self.name, ctx.step)
        return backend.dropout_forward(x, self.rate, key, ctx.offset, ws=ctx.scope(self.name))

    def backward(self, params, dout, cache, backend, ctx, need_dx=True):
        if cache is None:
            return dout, {}
        return backend.dropout_backward(dout, cache, ws=ctx.scope(self.name)), {}

    def config(self):
        return {**super().config(), "rate": self.rate}


class BatchNorm(Layer):
    """Batch normalisation (Ioffe & Szegedy 2015) with Keras's defaults and formulas.

    After a convolution, statistics are per channel over the batch and the image (``(C, H, W)``
    inputs); after a dense layer, per unit over the batch (``(D,)`` inputs). Parameters
    ``gamma`` (ones) and ``beta`` (zeros); buffers ``running_mean`` (zeros) and
    ``running_var`` (ones).

    - Training pass: ``y = gamma * (x - mean) / sqrt(var + epsilon) + beta`` with the mean and
      biased variance of the **global** batch: the per-channel sums of each shard are added
      over the shards with ``ctx.sum_over_shards`` (twice: the sums, then the squared
      deviations from the global mean), so ``sync`` over threads, processes or ranks
      normalises exactly as the sequential path does (synchronised batch norm). The backward
      pass sums ``dout`` and ``dout * xhat`` over the shards likewise; ``dout`` is then the
      gradient of the global batch's loss (the strategies scale each shard's loss by its
      share, ``loss_and_grads(loss_scale=n_i / N)``), so the sums are the sequential ones. The
      new running statistics, ``momentum * running + (1 - momentum) * batch``, go to
      ``ctx.updates``.
    - Inference pass: the running statistics, which are then constants.

    Args:
        momentum: in [0, 1); Keras's default 0.99 (1 would leave the running statistics at
            their initial values for ever, so inference would never normalise).
        epsilon: added to the variance, > 0; Keras's default 1e-3.
    """

    type = "batchnorm"
    param_names = ("gamma", "beta")
    buffer_names = ("running_mean", "running_var")

    def __init__(self, momentum=0.99, epsilon=1e-3, name=None):
        super().__init__(name)
        self.momentum = check_number("BatchNorm", "momentum", momentum, low=0.0, high=1.0,
                                     high_open=True)
        self.epsilon = check_number("BatchNorm", "epsilon", epsilon, low=0.0, low_open=True)

    def _output_shape(self, input_shape):
        if len(input_shape) not in (1, 3):
            raise ValueError(f"batchnorm {self.name!r} expects (C, H, W) or flat (D,) inputs; "
                             f"received per-example shape {tuple(input_shape)}")
        return input_shape

    def init_params(self, rng, dtype):
        c = self.input_shape[0]
        return {"gamma": np.ones(c, dtype=dtype), "beta": np.zeros(c, dtype=dtype)}

    def init_buffers(self, dtype):
        c = self.input_shape[0]
        return {"running_mean": np.zeros(c, dtype=dtype), "running_var": np.ones(c, dtype=dtype)}

    @staticmethod
    def _over_shards(ctx, backend, vector, count=None):
        """``vector`` (and ``count``) summed over the shards of the global batch. The reduce
        is a collective on host arrays: one array per call (``count`` rides at its end)."""
        host = np.asarray(backend.to_host(vector))
        if count is not None:
            host = np.append(host, host.dtype.type(count))
        total = ctx.sum_over_shards([host])[0]
        if count is not None:
            return backend.asarray(np.ascontiguousarray(total[:-1])), float(total[-1])
        return backend.asarray(np.ascontiguousarray(total)), None

    def forward(self, params, x, backend, ctx):
        gamma, beta = params["gamma"], params["beta"]
        ws = ctx.scope(self.name)
        if not ctx.training:
            out, cache = backend.batchnorm_infer_forward(
                x, params["running_mean"], params["running_var"], gamma, beta, self.epsilon,
                ws=ws)
            return out, (cache, 0, 0.0)
        local = x.size // x.shape[1]  # values per channel in this shard
        sums, count = backend.batchnorm_sums(x, ws=ws), float(local)
        if ctx.reduce is not None:
            sums, count = self._over_shards(ctx, backend, sums, local)
        inv_count = 1.0 / count
        sq = backend.batchnorm_sq_dev_sums(x, sums, inv_count, ws=ws)
        if ctx.reduce is not None:
            sq, _ = self._over_shards(ctx, backend, sq)
        out, cache = backend.batchnorm_train_forward(x, sums, sq, inv_count, gamma, beta,
                                                     self.epsilon, ws=ws)
        mean, var = backend.batchnorm_running_update(params["running_mean"], params["running_var"],
                                                     sums, sq, inv_count, self.momentum, ws=ws)
        ctx.updates[f"{self.name}.running_mean"] = mean
        ctx.updates[f"{self.name}.running_var"] = var
        return out, (cache, local, count)

    def backward(self, params, dout, cache, backend, ctx, need_dx=True):
        cache, local, count = cache
        ws = ctx.scope(self.name)
        dbeta, dgamma = backend.batchnorm_backward_sums(dout, cache, ws=ws)
        grads = {"gamma": dgamma, "beta": dbeta}
        if not need_dx:  # every shard skips alike (same model), so the collective stays matched
            return None, grads
        if local == 0:  # inference: the statistics are constants
            return backend.batchnorm_backward_dx(dout, cache, dbeta, dgamma, 0.0, ws=ws), grads
        s_dy, s_dyx = dbeta, dgamma
        if ctx.reduce is not None:
            # dout is the gradient of the global batch's loss (a data-parallel strategy scales
            # each shard's loss by its share, loss_and_grads(loss_scale=...)), so the sums over
            # all shards are the sequential pass's sums
            c = dbeta.shape[0]
            both = np.concatenate([np.asarray(backend.to_host(dbeta)),
                                   np.asarray(backend.to_host(dgamma))])
            total, _ = self._over_shards(ctx, backend, both)
            total = backend.to_host(total)
            s_dy = backend.asarray(np.ascontiguousarray(total[:c]))
            s_dyx = backend.asarray(np.ascontiguousarray(total[c:]))
        return backend.batchnorm_backward_dx(dout, cache, s_dy, s_dyx, 1.0 / count, ws=ws), grads

    def config(self):
        return {**super().config(), "momentum": self.momentum, "epsilon": self.epsilon}


class GlobalAvgPool2D(Layer):
    """The mean of each channel over the image: ``(N, C, H, W) -> (N, C)`` (Keras's
    ``GlobalAveragePooling2D``), the head of a residual network before its dense layer."""

    type = "globalavgpool2d"

    def _output_shape(self, input_shape):
        _expect_rank(self, input_shape, 3, "(C, H, W)")
        return (input_shape[0],)

    def forward(self, params, x, backend, ctx):
        return backend.globalavgpool2d_forward(x, ws=ctx.scope(self.name))

    def backward(self, params, dout, cache, backend, ctx, need_dx=True):
        return backend.globalavgpool2d_backward(dout, cache, ws=ctx.scope(self.name)), {}


# ---- residual blocks ----------------------------------------------------------------------------
#: what a residual block's ``shortcut`` may name besides a list of layers
SHORTCUTS = ("identity", "pad")


class ShortcutPad(Layer):
    """Option A's shortcut of a residual block (He et al. 2016, section 4.2): the input
    subsampled by the stride and zero-padded on the channel axis to the main branch's output
    (the zeros split between the first and the last channels, the odd one last, as in
    ``akamaster/pytorch_resnet_cifar10``): ``(C, H, W) -> (C', ceil(H / s), ceil(W / s))``. No
    parameters. A block builds it for ``"shortcut": "pad"`` and sets :attr:`target_shape`, the
    main branch's output shape, from which the stride and the padding follow."""

    type = "shortcut_pad"

    def __init__(self, name=None):
        super().__init__(name)
        self.target_shape: tuple[int, ...] | None = None
        self.stride, self.channels_before, self.channels_after = 1, 0, 0

    def _output_shape(self, input_shape):
        _expect_rank(self, input_shape, 3, "(C, H, W)")
        (c, h, w), (c2, h2, w2) = input_shape, self.target_shape
        stride = next((s for s in range(1, max(h, w) + 1)
                       if -(-h // s) == h2 and -(-w // s) == w2), None)
        if c2 < c or stride is None:
            raise ValueError(f"shortcut 'pad' {self.name!r} cannot map its input {input_shape} to "
                             f"the main branch's output {self.target_shape}: it subsamples by a "
                             f"stride s to (C, ceil(H / s), ceil(W / s)) and adds zero channels, "
                             f"never removes any; use a list of layers (a strided 1x1 conv) "
                             f"instead")
        self.stride = stride
        self.channels_before = (c2 - c) // 2
        self.channels_after = c2 - c - self.channels_before
        return tuple(self.target_shape)

    def forward(self, params, x, backend, ctx):
        return backend.shortcut_pad_forward(x, self.stride, self.channels_before,
                                            self.channels_after, ws=ctx.scope(self.name))

    def backward(self, params, dout, cache, backend, ctx, need_dx=True):
        return backend.shortcut_pad_backward(dout, cache, ws=ctx.scope(self.name)), {}


class Residual(Layer):
    """A residual block: ``act(main(x) + shortcut(x))`` (He et al. 2016).

    Args:
        layers: the main branch, a list of layer specs (or layers), any of them a block too.
        shortcut: ``"identity"`` (the input itself: the branch must keep its shape), ``"pad"``
            (option A: :class:`ShortcutPad`, the input subsampled and zero-padded to the
            branch's output; its stride and padding follow from the shapes) or a list of layers
            (option B: e.g. a strided 1x1 conv and batch norm). The two branches' outputs must
            have one shape.
        activation: ``"relu"`` after the sum, as in the paper, or None/``"linear"``.

    Its layers are named ``"<block>/<layer>"`` (``"stage2_block1/conv2d_1"``) and the
    shortcut's ``"<block>/shortcut/<layer>"`` (``"<block>/shortcut"`` for ``"pad"``), each
    numbered per type within its branch as the model numbers its own; their parameters and
    buffers are the model's ``"<layer>.<name>"`` (``"stage2_block1/conv2d_1.w"``). A block holds
    no parameter of its own, and runs as one op of the model's plan whose branches are planned
    like the model's list (:class:`ResidualOp`): the backend's fusions apply inside them. Its
    backward sums the two branches' input gradients.
    """

    type = "residual"

    def __init__(self, layers, shortcut="identity", activation=None, name=None):
        super().__init__(name)
        self.main = _branch("layers", layers)
        if isinstance(shortcut, str):
            self.shortcut = check_choice("Residual", "shortcut", shortcut, SHORTCUTS)
            self.shortcut_layers = [ShortcutPad()] if shortcut == "pad" else []
        elif isinstance(shortcut, (list, tuple)) and shortcut:
            self.shortcut = "layers"
            self.shortcut_layers = _branch("shortcut", shortcut)
        else:
            raise ValueError(f"Residual: shortcut must be one of {list(SHORTCUTS)} or a "
                             f"non-empty list of layers. Received shortcut={shortcut!r}")
        activation = None if activation == "linear" else activation
        self.activation = check_choice("Residual", "activation", activation, [None, "relu"])
        # the names given in the spec; build prefixes them with the block's own
        self._given = {"main": [layer.name for layer in self.main],
                       "shortcut": [layer.name for layer in self.shortcut_layers]}

    def sublayers(self):
        return tuple(self.main) + tuple(self.shortcut_layers)

    def build(self, input_shape):
        input_shape = tuple(input_shape)
        name_layers(self.main, f"{self.name}/", self._given["main"])
        shape = input_shape
        for layer in self.main:
            shape = layer.build(shape)
        if self.shortcut == "pad":
            pad = self.shortcut_layers[0]
            pad.name, pad.target_shape = f"{self.name}/shortcut", shape
        else:
            name_layers(self.shortcut_layers, f"{self.name}/shortcut/", self._given["shortcut"])
        short = input_shape
        for layer in self.shortcut_layers:
            short = layer.build(short)
        if short != shape:
            hint = ("; a shortcut 'pad' (option A) or a list of layers (option B, e.g. a strided "
                    "1x1 conv and batch norm) can change the shape" if self.shortcut == "identity"
                    else "")
            raise ValueError(f"residual {self.name!r}: its main branch maps {input_shape} to "
                             f"{shape} and its shortcut ({self.shortcut}) to {short}; the two "
                             f"must match to be added{hint}")
        self.input_shape, self.output_shape = input_shape, shape
        return shape

    def plan_op(self, backend):
        return ResidualOp(self, backend)

    def config(self):
        shortcut = ([_local_config(layer) for layer in self.shortcut_layers]
                    if self.shortcut == "layers" else self.shortcut)
        return {**super().config(), "layers": [_local_config(layer) for layer in self.main],
                "shortcut": shortcut, "activation": self.activation}


class ResidualOp:
    """A :class:`Residual` block as one op of a plan on ``backend``: each branch is a plan of
    its own (:func:`cnn.plan.plan_layers`), the sum and its ReLU the backend's
    ``residual_add_*`` ops in the block's workspace scope, and the backward sums the branches'
    input gradients (``residual_grad_sum``). The identity shortcut is the empty plan."""

    def __init__(self, block: Residual, backend: Backend):
        self.layers = (block,)
        self.backend = backend
        self.main = plan_layers(block.main, backend)
        self.shortcut = plan_layers(block.shortcut_layers, backend)

    def forward(self, params, x, ctx):
        block = self.layers[0]
        h, main_caches = forward_ops(self.main, params, x, ctx)
        s, shortcut_caches = forward_ops(self.shortcut, params, x, ctx)
        out, cache = self.backend.residual_add_forward(h, s, block.activation == "relu",
                                                       ws=ctx.scope(block.name))
        return out, (main_caches, shortcut_caches, cache)

    def backward(self, params, dout, cache, ctx, need_dx):
        main_caches, shortcut_caches, add_cache = cache
        ws = ctx.scope(self.layers[0].name)
        d = self.backend.residual_add_backward(dout, add_cache, ws=ws)
        dx_main, grads = backward_ops(self.main, params, d, main_caches, ctx, need_dx)
        dx_shortcut, shortcut_grads = backward_ops(self.shortcut, params, d, shortcut_caches, ctx,
                                                   need_dx)
        grads.update(shortcut_grads)
        if not need_dx:
            return None, grads
        return self.backend.residual_grad_sum(dx_main, dx_shortcut, ws=ws), grads

    def __repr__(self) -> str:
        return f"ResidualOp({self.layers[0].name}: main={self.main}, shortcut={self.shortcut})"


def _branch(what: str, spec) -> list[Layer]:
    """A block's branch: a non-empty list of layers, or of layer specs to build."""
    if isinstance(spec, (list, tuple)) and spec and all(isinstance(s, Layer) for s in spec):
        return list(spec)
    if not isinstance(spec, (list, tuple)) or not spec:
        raise ValueError(f"Residual: {what} must be a non-empty list of layers. "
                         f"Received {what}={spec!r}")
    try:
        return layers_from_spec(spec)
    except ValueError as err:
        raise ValueError(f"Residual: {what}: {err}") from None


def _local_config(layer: Layer) -> dict:
    """The spec entry of a block's layer, named as in its branch (without the block's name)."""
    return {**layer.config(), "name": layer.name.rsplit("/", 1)[-1]}


def name_layers(layers, prefix: str = "", given=None) -> None:
    """Name each of ``layers``: ``prefix`` + its given name (``given[i]``, default the layer's
    own), or for a layer without one its type numbered per type (``conv2d``, ``conv2d_1``, ...).
    Names are unique in the list, and a given name is a string without ``/`` (which separates a
    block's name from its layers')."""
    given = [layer.name for layer in layers] if given is None else given
    seen: dict[str, int] = {}
    names = set()
    for layer, name in zip(layers, given):
        if name is None:
            k = seen.get(layer.type, 0)
            seen[layer.type] = k + 1
            name = layer.type if k == 0 else f"{layer.type}_{k}"
        elif not isinstance(name, str) or "/" in name:
            raise ValueError(f"a layer's name is a string without '/' (which separates a "
                             f"residual block's name from its layers'). Received name={name!r}")
        if name in names:
            raise ValueError(f"two layers are named {prefix + name!r}; layer names must be unique")
        names.add(name)
        layer.name = prefix + name


#: spec ``type`` -> class; Keras class names are accepted as aliases
LAYER_TYPES: dict[str, type[Layer]] = {
    "conv2d": Conv2D, "maxpool2d": MaxPool2D, "maxpooling2d": MaxPool2D,
    "relu": ReLU, "flatten": Flatten, "dense": Dense,
    "sigmoid": Sigmoid, "tanh": Tanh, "dropout": Dropout,
    "batchnorm": BatchNorm, "batchnormalization": BatchNorm, "batch_normalization": BatchNorm,
    "globalavgpool2d": GlobalAvgPool2D, "globalaveragepooling2d": GlobalAvgPool2D,
    "residual": Residual,
}
#: ``activation=`` shorthands on conv2d/dense entries, expanded into their own layer
ACTIVATIONS: dict[str, type[Layer]] = {"relu": ReLU, "sigmoid": Sigmoid, "tanh": Tanh}


def layers_from_spec(spec: list[dict]) -> list[Layer]:
    """Build layers from a list of dicts such as ``{"type": "conv2d", "filters": 8}``.

    An ``activation`` key on a layer entry (``"relu"`` or ``None``/``"linear"``) appends that
    activation as a layer of its own (a residual block applies its own after its sum). Unknown
    types or options raise ``ValueError`` naming them.
    """
    if not isinstance(spec, (list, tuple)) or not spec:
        raise ValueError(f"a model spec is a non-empty list of layer dicts. Received {spec!r}")
    layers: list[Layer] = []
    for i, entry in enumerate(spec):
        if not isinstance(entry, dict) or "type" not in entry:
            raise ValueError(f"layer {i} of the spec must be a dict with a 'type'. Received {entry!r}")
        options = dict(entry)
        kind = str(options.pop("type")).lower()
        if kind not in LAYER_TYPES:
            raise ValueError(f"layer {i}: unknown layer type {entry['type']!r}; "
                             f"choose one of {sorted(set(LAYER_TYPES))}")
        cls = LAYER_TYPES[kind]
        # a block's activation follows its sum, inside the block; any other layer's is a layer
        # of its own after it
        activation = None if cls is Residual else options.pop("activation", None)
        try:
            layers.append(cls(**options))
        except TypeError as err:
            # an unknown keyword, or a required one (dropout's rate) left out
            raise ValueError(f"layer {i} ({kind}): unknown or missing option in {entry!r}: "
                             f"{err}") from None
        if activation not in (None, "linear"):
            if activation not in ACTIVATIONS:
                raise ValueError(f"layer {i}: unknown activation {activation!r}; "
                                 f"choose one of {sorted(ACTIVATIONS)} or 'linear'")
            layers.append(ACTIVATIONS[activation]())
    return layers
