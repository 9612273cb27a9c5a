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
from .checks import check_choice, check_int, check_number, check_pair
from .context import StepContext
from .plan import LayerOp

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
    return (rng.standard_normal(shape) * math.sqrt(2.0 / fan_in)).astype(dtype)


INITIALIZERS: dict[str, Callable] = {
    "glorot_uniform": _glorot_uniform,
    "glorot_normal": _glorot_normal,
    "he_uniform": _he_uniform,
    "he_normal": _he_normal,
}


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
    so Keras models with the same weights give the same outputs.
    """

    type = "conv2d"
    param_names = ("w", "b")

    def __init__(self, filters, kernel_size=3, stride=1, padding="valid",
                 kernel_initializer="glorot_uniform", kernel_regularizer=None, name=None):
        super().__init__(name)
        self.filters = check_int("Conv2D", "filters", filters)
        self.kernel_regularizer = _regularizer(kernel_regularizer, "Conv2D")
        self.kernel_size = check_pair("Conv2D", "kernel_size", kernel_size)
        self.stride = check_int("Conv2D", "stride", stride)
        self.padding = check_choice("Conv2D", "padding", padding, ("valid", "same"))
        self.kernel_initializer = check_choice("Conv2D", "kernel_initializer", kernel_initializer,
                                               sorted(INITIALIZERS))
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
        else:
            if h < kh or w < kw:
                raise ValueError(f"Conv2D {self.name!r}: kernel {self.kernel_size} is larger than "
                                 f"its input {tuple(input_shape)} with padding='valid'")
            ho, wo = (h - kh) // s + 1, (w - kw) // s + 1
        return (self.filters, ho, wo)

    def init_params(self, rng, dtype):
        c = self.input_shape[0]
        kh, kw = self.kernel_size
        fan_in, fan_out = c * kh * kw, self.filters * kh * kw
        w = INITIALIZERS[self.kernel_initializer]((self.filters, c, kh, kw), fan_in, fan_out, rng, dtype)
        return {"w": w, "b": np.zeros(self.filters, dtype=dtype)}

    def forward(self, params, x, backend, ctx):
        return backend.conv2d_forward(x, params["w"], params["b"], self.stride, self.pads,
                                      ws=ctx.scope(self.name))

    def backward(self, params, dout, cache, backend, ctx, need_dx=True):
        dx, dw, db = backend.conv2d_backward(dout, cache, need_dx=need_dx, ws=ctx.scope(self.name))
        return dx, {"w": dw, "b": db}

    def penalties(self):
        return _kernel_penalties(self)

    def config(self):
        return {**super().config(), "filters": self.filters, "kernel_size": list(self.kernel_size),
                "stride": self.stride, "padding": self.padding,
                "kernel_initializer": self.kernel_initializer, **_regularizer_config(self)}


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
    """Fully connected: ``(N, D) @ w (D, units) + b -> (N, units)``."""

    type = "dense"
    param_names = ("w", "b")

    def __init__(self, units, kernel_initializer="glorot_uniform", kernel_regularizer=None,
                 name=None):
        super().__init__(name)
        self.units = check_int("Dense", "units", units)
        self.kernel_initializer = check_choice("Dense", "kernel_initializer", kernel_initializer,
                                               sorted(INITIALIZERS))
        self.kernel_regularizer = _regularizer(kernel_regularizer, "Dense")

    def _output_shape(self, input_shape):
        _expect_rank(self, input_shape, 1, "flat (D,)")
        return (self.units,)

    def init_params(self, rng, dtype):
        d = self.input_shape[0]
        w = INITIALIZERS[self.kernel_initializer]((d, self.units), d, self.units, rng, dtype)
        return {"w": w, "b": np.zeros(self.units, dtype=dtype)}

    def forward(self, params, x, backend, ctx):
        return backend.dense_forward(x, params["w"], params["b"], ws=ctx.scope(self.name))

    def backward(self, params, dout, cache, backend, ctx, need_dx=True):
        dx, dw, db = backend.dense_backward(dout, cache, need_dx=need_dx,
                                            ws=ctx.scope(self.name))
        return dx, {"w": dw, "b": db}

    def penalties(self):
        return _kernel_penalties(self)

    def config(self):
        return {**super().config(), "units": self.units,
                "kernel_initializer": self.kernel_initializer, **_regularizer_config(self)}


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


#: spec ``type`` -> class; Keras class names are accepted as aliases
LAYER_TYPES: dict[str, type[Layer]] = {
    "conv2d": Conv2D, "maxpool2d": MaxPool2D, "maxpooling2d": MaxPool2D,
    "relu": ReLU, "flatten": Flatten, "dense": Dense,
    "sigmoid": Sigmoid, "tanh": Tanh, "dropout": Dropout,
    "batchnorm": BatchNorm, "batchnormalization": BatchNorm, "batch_normalization": BatchNorm,
}
#: ``activation=`` shorthands on conv2d/dense entries, expanded into their own layer
ACTIVATIONS: dict[str, type[Layer]] = {"relu": ReLU, "sigmoid": Sigmoid, "tanh": Tanh}


def layers_from_spec(spec: list[dict]) -> list[Layer]:
    """Build layers from a list of dicts such as ``{"type": "conv2d", "filters": 8}``.

    An ``activation`` key on a layer entry (``"relu"`` or ``None``/``"linear"``) appends that
    activation as a layer of its own. Unknown types or options raise ``ValueError`` naming them.
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
        activation = options.pop("activation", None)
        cls = LAYER_TYPES[kind]
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
