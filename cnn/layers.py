"""Layers: shapes, initialisation, and forward/backward expressed through backend ops.

A layer holds configuration only; parameters live in a dict the model owns, and every forward
returns a cache that belongs to that call. So one layer object can be driven by several
threads at once (data-parallel strategies) and by any backend (NumPy, Numba, CUDA).

Shapes exclude the batch axis: an image input is ``(C, H, W)``, a flat one ``(D,)``.
"""
from __future__ import annotations

import math
from typing import Any, Callable, ClassVar

import numpy as np

from .backends.base import Backend
from .context import StepContext

Params = dict[str, Any]


def _positive_int(name: str, value: Any, layer: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{layer}: {name} must be a positive integer. Received {name}={value!r}")
    return int(value)


def _pair(name: str, value: Any, layer: str) -> tuple[int, int]:
    if isinstance(value, (list, tuple)):
        if len(value) != 2:
            raise ValueError(f"{layer}: {name} must be an int or a pair. Received {name}={value!r}")
        return _positive_int(name, value[0], layer), _positive_int(name, value[1], layer)
    v = _positive_int(name, value, layer)
    return v, v


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


def _initializer(name: Any, layer: str) -> str:
    if name not in INITIALIZERS:
        raise ValueError(f"{layer}: unknown kernel_initializer {name!r}; "
                         f"choose one of {sorted(INITIALIZERS)}")
    return name


class Layer:
    """Base class. Subclasses set ``type`` and override what they need."""

    type: ClassVar[str] = "layer"
    #: parameter names in a fixed order (e.g. ``("w", "b")``)
    param_names: ClassVar[tuple[str, ...]] = ()

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

    def forward(self, params: Params, x, backend: Backend, ctx: StepContext):
        """``x (N, *input_shape)`` -> ``(out (N, *output_shape), cache)``. ``ctx`` says whether
        this is a training pass, and holds this worker's workspace: pass ``ws=ctx.scope(
        self.name)`` to every backend op (see "Workspaces" in :mod:`cnn.backends.base`)."""
        raise NotImplementedError

    def backward(self, params: Params, dout, cache, backend: Backend, ctx: StepContext,
                 need_dx: bool = True):
        """``dout (N, *output_shape)`` -> ``(dx or None, grads)`` with ``grads`` keyed like params."""
        raise NotImplementedError

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
                 kernel_initializer="glorot_uniform", name=None):
        super().__init__(name)
        self.filters = _positive_int("filters", filters, "Conv2D")
        self.kernel_size = _pair("kernel_size", kernel_size, "Conv2D")
        self.stride = _positive_int("stride", stride, "Conv2D")
        if padding not in ("valid", "same"):
            raise ValueError(f"Conv2D: padding must be 'valid' or 'same'. Received padding={padding!r}")
        self.padding = padding
        self.kernel_initializer = _initializer(kernel_initializer, "Conv2D")
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

    def config(self):
        return {**super().config(), "filters": self.filters, "kernel_size": list(self.kernel_size),
                "stride": self.stride, "padding": self.padding,
                "kernel_initializer": self.kernel_initializer}


class MaxPool2D(Layer):
    """Max pooling over ``pool x pool`` windows, no padding; ``stride`` defaults to ``pool``.

    ``(N, C, H, W) -> (N, C, (H - pool) // stride + 1, (W - pool) // stride + 1)``.
    """

    type = "maxpool2d"

    def __init__(self, pool_size=2, stride=None, name=None):
        super().__init__(name)
        self.pool_size = _positive_int("pool_size", pool_size, "MaxPool2D")
        self.stride = self.pool_size if stride is None else _positive_int("stride", stride, "MaxPool2D")

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

    def __init__(self, units, kernel_initializer="glorot_uniform", name=None):
        super().__init__(name)
        self.units = _positive_int("units", units, "Dense")
        self.kernel_initializer = _initializer(kernel_initializer, "Dense")

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

    def config(self):
        return {**super().config(), "units": self.units,
                "kernel_initializer": self.kernel_initializer}


#: spec ``type`` -> class; Keras class names are accepted as aliases
LAYER_TYPES: dict[str, type[Layer]] = {
    "conv2d": Conv2D, "maxpool2d": MaxPool2D, "maxpooling2d": MaxPool2D,
    "relu": ReLU, "flatten": Flatten, "dense": Dense,
}
#: ``activation=`` shorthands on conv2d/dense entries, expanded into their own layer
ACTIVATIONS: dict[str, type[Layer]] = {"relu": ReLU}


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
            raise ValueError(f"layer {i} ({kind}): unknown option in {entry!r}: {err}") from None
        if activation not in (None, "linear"):
            if activation not in ACTIVATIONS:
                raise ValueError(f"layer {i}: unknown activation {activation!r}; "
                                 f"choose one of {sorted(ACTIVATIONS)} or 'linear'")
            layers.append(ACTIVATIONS[activation]())
    return layers
