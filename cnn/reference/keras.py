"""The Keras reference: the same spec built in Keras (TensorFlow backend), weight transfer in
both directions, the one Keras set-up (threads, build, compile) and epoch timer every Keras
user here shares, and :func:`fit_keras`, which trains that Keras copy and reports a History with
the columns of :func:`cnn.train.fit`, so every path can be checked and timed against Keras from
identical weights (the equivalence tests and notebooks, the study's ``keras`` path and the
benchmarks' Keras contenders all start from here).

Layout differences handled here (ours -> Keras):

- images ``(N, C, H, W)`` -> ``(N, H, W, C)`` (TensorFlow's CPU convolutions are channels-last);
- conv kernels ``(F, C, KH, KW)`` -> ``(KH, KW, C, F)``;
- dense weights fed by a ``flatten`` of a ``(C, H, W)`` map (directly or through elementwise
  layers such as ``relu``, ``sigmoid``, ``tanh``, ``dropout``, or a batch norm of the flat
  vector): our rows run in ``C, H, W`` order, Keras's in ``H, W, C`` order, so those rows are
  permuted, and so are the per-feature vectors (``gamma``, ``beta``, running statistics) of a
  batch norm between them; other weights are equal. A ``flatten`` of a map whose output is
  *not* consumed by a dense layer (it gives the logits) cannot be fixed by permuting weights,
  so Keras gets a ``Permute`` to channels-first before its ``Flatten`` instead.

Sigmoid, tanh, dropout and batch norm map to ``Activation("sigmoid")``, ``Activation("tanh")``,
``Dropout(rate)`` and ``BatchNormalization(axis=-1, momentum, epsilon)`` (per channel of a
channels-last map, or per feature of a flat vector; weights ``[gamma, beta, moving_mean,
moving_variance]``: our parameters and our buffers); ``kernel_regularizer`` to
``keras.regularizers.L1L2``, whose penalties Keras adds to the loss as we do; the loss to
``SparseCategoricalCrossentropy`` or ``BinaryCrossentropy``, both from logits. Keras's dropout
draws its masks from its own generator, so training passes with dropout agree with ours only
at ``rate=0``; inference passes always do.

Padding ``'same'`` is TensorFlow's split (the odd pixel bottom/right), which our Conv2D
computes too; an explicit ``padding=p`` is a ``ZeroPadding2D`` before a ``'valid'`` conv;
pooling has no padding in either. Every Keras layer is built in the model's dtype (float32 or
float64), and so is the loss, so float64 models are float64 end to end.

Residual networks (issue 20) use Keras's functional API: a residual block is its main branch
and its shortcut applied to one tensor, ``Add`` and a ``ReLU``; option A's shortcut is a
``Lambda`` (``x[:, ::s, ::s, :]``, then zero channels padded on both sides);
``globalavgpool2d`` is ``GlobalAveragePooling2D``; ``use_bias=False`` is Keras's own option.
Our layer names have ``/`` between a block's name and its layers', which Keras names refuse:
Keras gets ``__`` instead (:func:`keras_name`). A flatten inside a block is not converted.
``weight_decay_mode="coupled"`` (:mod:`cnn.optim`), which Keras's optimizers lack, becomes an
L2 penalty ``weight_decay / 2 * sum w**2`` on every trainable weight of the Keras model (see
:func:`compile_keras_model`); Keras then reports it in its loss, which ours leaves out.

Layers are converted by exact class: a layer type Keras has no counterpart for here (including
a subclass of one of ours, whose maths may differ) raises ``NotImplementedError`` naming it.

Threads: TensorFlow fixes its thread pools when it first runs anything, once per process.
:func:`configure_threads` must therefore run before any TensorFlow work; asking for other
settings afterwards raises ``RuntimeError`` (run Keras configurations with different thread
counts in separate processes). TensorFlow is imported on first use only.
"""
from __future__ import annotations

import time

import numpy as np

from ..checks import check_choice, check_int
from ..layers import (BatchNorm, Conv2D, Dense, Dropout, Flatten, GlobalAvgPool2D, Layer,
                      MaxPool2D, ReLU, Residual, ShortcutPad, Sigmoid, Tanh)

#: batch size of the per-epoch validation evaluation (that of ``Sequential.evaluate``)
EVAL_BATCH = 256
#: our layer classes that have a Keras counterpart here (matched by exact class)
SUPPORTED_LAYERS: tuple[type[Layer], ...] = (Conv2D, MaxPool2D, ReLU, Flatten, Dense, Sigmoid,
                                              Tanh, Dropout, BatchNorm, GlobalAvgPool2D,
                                              Residual, ShortcutPad)
#: layers that act on each element alone (no parameters): they keep a flat vector's order
ELEMENTWISE_LAYERS = (ReLU, Sigmoid, Tanh, Dropout)


# ---- threads -------------------------------------------------------------------------------
def configure_threads(threads: int | None) -> None:
    """Pin TensorFlow's intra- and inter-op pools to ``threads`` (``None``: leave them alone).

    Call it before TensorFlow runs anything (building a Keras model counts): TensorFlow reads
    these settings once per process. Calling it again with the settings already in force is a
    no-op; asking for different ones after TensorFlow has started raises ``RuntimeError``.
    """
    threads = check_int(None, "threads", threads, optional=True)
    if threads is None:
        return
    import tensorflow as tf
    cfg = tf.config.threading
    try:
        cfg.set_intra_op_parallelism_threads(threads)
        cfg.set_inter_op_parallelism_threads(threads)
    except RuntimeError as err:
        raise RuntimeError(
            f"cannot pin TensorFlow to threads={threads}: TensorFlow already started in this "
            f"process with intra_op={cfg.get_intra_op_parallelism_threads()}, inter_op="
            f"{cfg.get_inter_op_parallelism_threads()} (0 = TensorFlow's default, all cores), "
            f"and its thread pools cannot change after that. Call configure_threads (or "
            f"fit_keras) before any TensorFlow work, and run Keras configurations with "
            f"different thread counts in separate processes. ({err})") from None


def thread_settings() -> dict[str, int]:
    """TensorFlow's current intra/inter-op pool sizes (0 means its default: all cores)."""
    import tensorflow as tf
    return {"intra_op": tf.config.threading.get_intra_op_parallelism_threads(),
            "inter_op": tf.config.threading.get_inter_op_parallelism_threads()}


# ---- architecture ----------------------------------------------------------------------------
def _is_passthrough(layer: Layer) -> bool:
    """Layers that leave the order of a flat vector alone: elementwise ones, a flatten of an
    already flat input, and a batch norm of a flat vector (per feature: its vectors are
    permuted with the features, see :func:`ours_to_keras`)."""
    t = type(layer)
    return (t in ELEMENTWISE_LAYERS or (t in (Flatten, BatchNorm) and len(layer.input_shape) == 1))


def _flatten_feeding(model, index: int) -> int | None:
    """Index of the ``flatten`` of a ``(C, H, W)`` map whose output reaches layer ``index``
    through pass-through layers only, else ``None``."""
    j = index - 1
    while j >= 0 and _is_passthrough(model.layers[j]):
        j -= 1
    if j >= 0 and type(model.layers[j]) is Flatten and len(model.layers[j].input_shape) == 3:
        return j
    return None


def _flatten_consumer(model, index: int) -> Layer | None:
    """The first layer after ``index`` that is not a pass-through (``None``: the output)."""
    for layer in model.layers[index + 1:]:
        if not _is_passthrough(layer):
            return layer
    return None


def _flatten_source_shape(model, index: int):
    """The ``(C, H, W)`` shape whose flattening feeds layer ``index`` (a dense layer, or a
    batch norm of a flat vector) in Keras's ``H, W, C`` order, if any: a flatten whose output
    reaches a dense layer (Keras gets no ``Permute`` before it, see :func:`_keras_layers`)."""
    j = _flatten_feeding(model, index)
    if j is None or type(_flatten_consumer(model, j)) is not Dense:
        return None
    return model.layers[j].input_shape


def _to_hwc(v: np.ndarray, src) -> np.ndarray:
    """A per-feature vector of a flattened ``(C, H, W)`` map, ours (C, H, W order) -> Keras's."""
    c, h, w = src
    return np.ascontiguousarray(v.reshape(c, h, w).transpose(1, 2, 0).reshape(-1))


def _to_chw(v: np.ndarray, src) -> np.ndarray:
    c, h, w = src
    return np.ascontiguousarray(v.reshape(h, w, c).transpose(2, 0, 1).reshape(-1))


def check_keras_compatible(model) -> None:
    """Raise ``NotImplementedError`` naming every layer the Keras reference cannot build."""
    bad = [layer for _, layer in model.walk() if type(layer) not in SUPPORTED_LAYERS]
    if bad:
        names = ", ".join(f"{layer.name!r} (type {layer.type!r}, class {type(layer).__name__})"
                          for layer in bad)
        supported = ", ".join(cls.type for cls in SUPPORTED_LAYERS)
        raise NotImplementedError(
            f"the Keras reference cannot express layer {names}: it builds only the layer types "
            f"{supported} (exact classes; a subclass may compute something else). Add a "
            f"converter to cnn/reference/keras.py to compare this layer with Keras.")
    for depth, layer in model.walk():
        if type(layer) is Flatten and (depth > 0 or len(layer.input_shape) not in (1, 3)):
            where = "inside a residual block" if depth else f"of a rank-{len(layer.input_shape)} input"
            raise NotImplementedError(f"flatten {layer.name!r} {where} has no Keras equivalent "
                                      "here")


def keras_name(name: str) -> str:
    """The Keras name of our layer ``name``: ``/`` (between a block's name and its layers'),
    which Keras refuses, becomes ``__``."""
    return name.replace("/", "__")


def _keras_leaf(layer, keras, dtype: str) -> list:
    """The Keras layers computing our plain ``layer`` (not a flatten or a block)."""
    kw = {"name": keras_name(layer.name), "dtype": dtype}
    t = type(layer)
    if t in (Conv2D, Dense) and layer.kernel_regularizer is not None:
        l1, l2 = layer.kernel_regularizer
        kw["kernel_regularizer"] = keras.regularizers.L1L2(l1=l1, l2=l2)
    if t is Conv2D:
        out, padding = [], layer.padding
        if padding not in ("valid", "same"):
            (top, bottom), (left, right) = layer.pads
            out.append(keras.layers.ZeroPadding2D(((top, bottom), (left, right)),
                                                  name=f"{kw['name']}.pad", dtype=dtype))
            padding = "valid"
        return out + [keras.layers.Conv2D(layer.filters, layer.kernel_size, strides=layer.stride,
                                          padding=padding, use_bias=layer.use_bias, **kw)]
    if t in (Sigmoid, Tanh):
        return [keras.layers.Activation(t.type, **kw)]
    if t is Dropout:
        return [keras.layers.Dropout(layer.rate, **kw)]
    if t is BatchNorm:
        return [keras.layers.BatchNormalization(axis=-1, momentum=layer.momentum,
                                                epsilon=layer.epsilon, **kw)]
    if t is MaxPool2D:
        return [keras.layers.MaxPooling2D(layer.pool_size, strides=layer.stride,
                                          padding="valid", **kw)]
    if t is ReLU:
        return [keras.layers.ReLU(**kw)]
    if t is Dense:
        return [keras.layers.Dense(layer.units, use_bias=layer.use_bias, **kw)]
    if t is GlobalAvgPool2D:
        return [keras.layers.GlobalAveragePooling2D(**kw)]
    if t is ShortcutPad:
        s, before, after = layer.stride, layer.channels_before, layer.channels_after

        def pad(x):  # channels-last: subsample the image, zero channels on both sides
            return keras.ops.pad(x[:, ::s, ::s, :], [[0, 0], [0, 0], [0, 0], [before, after]])

        c, h, w = layer.output_shape
        return [keras.layers.Lambda(pad, output_shape=(h, w, c), **kw)]
    raise AssertionError("unreachable: check_keras_compatible lets only supported layers by")


def _apply_keras(layer, x, keras, dtype: str):
    """``x`` through our ``layer`` (a plain layer, or a residual block and its branches)."""
    if type(layer) is not Residual:
        for klayer in _keras_leaf(layer, keras, dtype):
            x = klayer(x)
        return x
    main = short = x
    for sub in layer.main:
        main = _apply_keras(sub, main, keras, dtype)
    for sub in layer.shortcut_layers:
        short = _apply_keras(sub, short, keras, dtype)
    name = keras_name(layer.name)  # ".": apart from the names of the block's own layers
    out = keras.layers.Add(name=f"{name}.sum", dtype=dtype)([main, short])
    if layer.activation == "relu":
        out = keras.layers.ReLU(name=f"{name}.sum_relu", dtype=dtype)(out)
    return out


def _keras_layers(model, index: int, keras) -> list:
    """The Keras layers of our plain layer ``model.layers[index]``: a flatten reads its
    neighbours (see the module docstring), any other layer converts alone."""
    layer = model.layers[index]
    if type(layer) is not Flatten:
        return _keras_leaf(layer, keras, str(model.dtype))
    shape = layer.input_shape
    out = []
    if (len(shape) == 3 and shape[0] > 1 and shape[1] * shape[2] > 1
            and type(_flatten_consumer(model, index)) is not Dense):
        # its output order is observable (no dense layer's rows absorb it): flatten
        # channels-first, as ours does
        out.append(keras.layers.Permute((3, 1, 2), name=f"{layer.name}_to_chw",
                                        dtype=str(model.dtype)))
    return out + [keras.layers.Flatten(name=layer.name, dtype=str(model.dtype))]


def build_keras_model(model):
    """A Keras model with the architecture of our ``model`` and its current weights.

    It takes channels-last images (see :func:`to_keras_images`) and gives the same logits.
    Raises ``NotImplementedError`` for a layer it cannot express (before importing Keras).
    """
    check_keras_compatible(model)
    import keras
    shape = model.input_shape
    if len(shape) == 3:
        c, h, w = shape
        shape = (h, w, c)
    inputs = keras.Input(shape=shape, dtype=str(model.dtype), name="images")
    x = inputs
    for i, layer in enumerate(model.layers):
        if type(layer) is Residual:
            x = _apply_keras(layer, x, keras, str(model.dtype))
            continue
        for klayer in _keras_layers(model, i, keras):
            x = klayer(x)
    kmodel = keras.Model(inputs, x, name="reference")
    set_keras_weights(kmodel, model)
    return kmodel


def to_keras_images(x: np.ndarray) -> np.ndarray:
    """``(N, C, H, W)`` -> ``(N, H, W, C)`` (a contiguous copy); flat ``(N, D)`` is unchanged."""
    x = np.asarray(x)
    if x.ndim == 2:
        return x
    return np.ascontiguousarray(x.transpose(0, 2, 3, 1))


def from_keras_images(x: np.ndarray) -> np.ndarray:
    """``(N, H, W, C)`` -> ``(N, C, H, W)``: the inverse of :func:`to_keras_images`."""
    x = np.asarray(x)
    if x.ndim == 2:
        return x
    return np.ascontiguousarray(x.transpose(0, 3, 1, 2))


# ---- weights (and gradients: they share the layout) -----------------------------------------
def _weighted_layers(model):
    """``(layer, source)`` for every layer with parameters, residual blocks' included, in
    order: ``source`` the ``(C, H, W)`` shape whose flattening feeds it in Keras's order (see
    :func:`_flatten_source_shape`; never inside a block, which holds no flatten), else None."""
    for i, layer in enumerate(model.layers):
        for leaf in layer.leaves():
            if leaf.param_names:
                yield leaf, (_flatten_source_shape(model, i) if leaf is layer else None)


def ours_to_keras(model, params: dict[str, np.ndarray] | None = None,
                  buffers: dict[str, np.ndarray] | None = None) -> dict[str, list[np.ndarray]]:
    """Our parameters (default the model's; or any dict with the same keys, e.g. gradients) in
    Keras layouts, keyed by layer name: ``[kernel, bias]``, or for batch norm ``[gamma, beta]``
    followed by ``[moving_mean, moving_variance]`` from ``buffers`` (default: the model's
    buffers when ``params`` is the model's too, else none: gradients have no buffers)."""
    if params is None:
        params = model.params
        buffers = model.buffers if buffers is None else buffers
    out = {}
    for layer, src in _weighted_layers(model):
        t = type(layer)
        if t is BatchNorm:
            names = list(layer.param_names) + (list(layer.buffer_names) if buffers else [])
            source = {**params, **(buffers or {})}
            vectors = [np.asarray(source[f"{layer.name}.{n}"]).copy() for n in names]
            if len(layer.input_shape) == 1 and src:
                vectors = [_to_hwc(v, src) for v in vectors]
            out[layer.name] = vectors
            continue
        w = np.asarray(params[f"{layer.name}.w"])
        if t is Conv2D:
            w = w.transpose(2, 3, 1, 0)
        elif t is Dense and src is not None:
            c, h, wd = src
            w = w.reshape(c, h, wd, -1).transpose(1, 2, 0, 3).reshape(c * h * wd, -1)
        out[layer.name] = [np.ascontiguousarray(w)] + (
            [np.asarray(params[f"{layer.name}.b"]).copy()] if layer.use_bias else [])
    return out


def keras_to_ours(model, keras_weights: dict[str, list[np.ndarray]]) -> dict[str, np.ndarray]:
    """Keras weights per layer name (weights or gradients) -> our flat dict, in the model's
    dtype: ``[kernel, bias]`` -> ``w``, ``b``; batch norm ``[gamma, beta(, moving_mean,
    moving_variance)]`` -> ``gamma``, ``beta`` (and the buffers ``running_mean``,
    ``running_var`` when given: :meth:`cnn.model.Sequential.set_weights` takes both)."""
    params = {}
    for layer, src in _weighted_layers(model):
        t = type(layer)
        if t is BatchNorm:
            vectors = [np.asarray(a) for a in keras_weights[layer.name]]
            if len(layer.input_shape) == 1 and src:
                vectors = [_to_chw(v, src) for v in vectors]
            names = list(layer.param_names) + list(layer.buffer_names)
            for name, v in zip(names, vectors):
                params[f"{layer.name}.{name}"] = np.array(v, dtype=model.dtype)
            continue
        w, *b = (np.asarray(a) for a in keras_weights[layer.name])
        if t is Conv2D:
            w = w.transpose(3, 2, 0, 1)
        elif t is Dense and src is not None:
            c, h, wd = src
            w = w.reshape(h, wd, c, -1).transpose(2, 0, 1, 3).reshape(c * h * wd, -1)
        params[f"{layer.name}.w"] = np.ascontiguousarray(w, dtype=model.dtype)
        if b:
            params[f"{layer.name}.b"] = np.array(b[0], dtype=model.dtype)
    return params


def set_keras_weights(kmodel, model, params: dict[str, np.ndarray] | None = None,
                      buffers: dict[str, np.ndarray] | None = None) -> None:
    """Copy our model's weights (or ``params``, with ``buffers`` or else the model's) into
    the Keras model."""
    buffers = model.buffers if buffers is None else buffers
    for name, weights in ours_to_keras(model, model.params if params is None else params,
                                       buffers).items():
        kmodel.get_layer(keras_name(name)).set_weights(weights)


def get_keras_weights(kmodel, model) -> dict[str, np.ndarray]:
    """The Keras model's weights in our layout, parameters and buffers (load with
    ``model.set_weights``)."""
    return keras_to_ours(model, {layer.name: kmodel.get_layer(keras_name(layer.name)).get_weights()
                                 for layer, _ in _weighted_layers(model)})


def keras_loss(model):
    """The loss our model trains with, in Keras, from logits and in the model's dtype: mean
    sparse softmax cross-entropy, or binary cross-entropy (labels as ``(N, 1)`` floats, see
    :func:`keras_labels`)."""
    import keras
    if model.loss.name == "binary_cross_entropy":
        return keras.losses.BinaryCrossentropy(from_logits=True, dtype=str(model.dtype))
    return keras.losses.SparseCategoricalCrossentropy(from_logits=True, dtype=str(model.dtype))


def keras_labels(model, y) -> np.ndarray:
    """Our integer labels ``(N,)`` as Keras's loss for ``model`` takes them: unchanged for
    softmax cross-entropy, ``(N, 1)`` in the model's dtype for binary cross-entropy."""
    y = np.asarray(y)
    if model.loss.name == "binary_cross_entropy":
        return y.reshape(-1, 1).astype(model.dtype)
    return y


def keras_loss_and_grads(kmodel, model, x, y, training: bool = True):
    """One forward and backward pass of the Keras model under ``tf.GradientTape``.

    ``x (N, C, H, W)`` in our layout, ``y (N,)``. Returns ``(loss, logits, grads)``: the mean
    loss with the regularisation penalties (float), the logits ``(N, K)`` and the gradient of
    every parameter converted to our layout and keys (comparable with
    ``model.loss_and_grads``). ``training``: Keras's training flag (batch norm on the batch
    statistics, which also updates the Keras model's moving statistics; dropout active).
    """
    import tensorflow as tf
    xk = tf.convert_to_tensor(to_keras_images(x))
    with tf.GradientTape() as tape:
        logits = kmodel(xk, training=training)
        loss = keras_loss(model)(tf.convert_to_tensor(keras_labels(model, y)), logits)
        if kmodel.losses:  # the kernel regularisers' penalties
            loss = loss + tf.add_n([tf.cast(p, loss.dtype) for p in kmodel.losses])
    names = [layer.name for layer, _ in _weighted_layers(model)]
    variables = [v for name in names for v in kmodel.get_layer(keras_name(name)).trainable_weights]
    grads = tape.gradient(loss, variables)
    by_layer, k = {}, 0
    for name in names:
        n = len(kmodel.get_layer(keras_name(name)).trainable_weights)
        by_layer[name] = [g.numpy() for g in grads[k:k + n]]
        k += n
    return float(loss.numpy()), logits.numpy(), keras_to_ours(model, by_layer)


def keras_optimizer(optimizer=None):
    """The Keras optimizer for our optimizer spec (:func:`cnn.optim.make_optimizer`): the
    Keras 3 optimizer with the same formulation, hyper-parameters and learning-rate schedule
    (``Optimizer.keras()`` in :mod:`cnn.optim`: SGD with momentum/Nesterov, RMSprop, Adam,
    AdamW, decoupled weight decay).

    float64 caveat: Keras's SGD casts ``momentum`` through a float32 constant (0.9 becomes
    0.89999998), so float64 models with momentum differ from ours by ~3e-8 relative per step
    unless ``momentum`` is exact in float32 (0.5, 0.875, ...). A constant learning rate is
    passed as a float64 callable so that it stays exact."""
    from ..optim import make_optimizer
    return make_optimizer(optimizer).keras()


def keras_accuracy(model):
    """The accuracy metric that counts as ours does: the argmax, or for binary cross-entropy a
    positive logit (``BinaryAccuracy`` with threshold 0 on the logits)."""
    import keras
    if model.loss.name == "binary_cross_entropy":
        return keras.metrics.BinaryAccuracy(name="accuracy", threshold=0.0)
    return keras.metrics.SparseCategoricalAccuracy(name="accuracy")


#: how :func:`fit_keras` runs the model (the study's ``engine`` of its ``keras`` path) ->
#: ``Model.compile``'s ``jit_compile``: ``graph`` is a ``tf.function`` without XLA (what Keras
#: picks by itself on a machine without an accelerator), ``xla`` compiles the step with XLA
ENGINES = {"graph": False, "xla": True}


def split_coupled_decay(optimizer=None):
    """``(opt, coupled)``: the optimizer Keras's own is made from (:func:`keras_optimizer`) and
    the coupled weight decay (``weight_decay_mode="coupled"``, 0.0 if none) that
    :func:`compile_keras_model` puts on the model instead, Keras's optimizers having none."""
    import copy

    from ..optim import make_optimizer
    opt = make_optimizer(optimizer)
    if not (opt.weight_decay and opt.weight_decay_mode == "coupled"):
        return opt, 0.0
    keras_opt = copy.copy(opt)
    keras_opt.weight_decay = 0.0
    return keras_opt, opt.weight_decay


def compile_keras_model(kmodel, model, optimizer=None, jit_compile: bool = False) -> None:
    """Compile with our loss, the optimizer spec, and training-batch accuracy. A coupled weight
    decay (``weight_decay_mode="coupled"``) becomes an L2 penalty on every trainable weight.

    Keras wraps the loss in a ``CompileLoss`` whose dtype is ``floatx()`` when ``compile``
    runs (float32), so a float64 model would get a float32 loss, which Keras then cannot add
    to the float64 penalties of its kernel regularisers ("Cannot convert a list containing a
    tensor of dtype float64 to float32"). ``floatx`` is therefore the model's dtype for the
    duration of the call (and restored after it): float64 models train on a float64 loss."""
    import keras

    opt, coupled = split_coupled_decay(optimizer)
    if coupled:
        # Keras's optimizers decay decoupled only: the coupled decay is the gradient of an L2
        # penalty weight_decay / 2 * sum w**2 on every trainable weight, added to the model
        for variable in kmodel.trainable_weights:
            base = variable.regularizer
            if isinstance(base, _CoupledDecay):  # compiled before: replace, never stack
                base = base.base
            variable.regularizer = _CoupledDecay(coupled, base)
    previous = keras.backend.floatx()
    keras.backend.set_floatx(str(model.dtype))
    try:
        kmodel.compile(optimizer=keras_optimizer(opt), loss=keras_loss(model),
                       metrics=[keras_accuracy(model)], jit_compile=bool(jit_compile))
    finally:
        keras.backend.set_floatx(previous)


class _CoupledDecay:
    """A Keras weight's regulariser ``weight_decay / 2 * sum w**2`` (its gradient
    ``weight_decay * w``: coupled weight decay), plus the weight's own regulariser ``base``
    (None: none), in the weight's dtype."""

    def __init__(self, weight_decay: float, base=None):
        self.weight_decay, self.base = float(weight_decay), base

    def __call__(self, w):
        from keras import ops
        penalty = ops.multiply(ops.cast(self.weight_decay / 2, w.dtype), ops.sum(ops.square(w)))
        return penalty if self.base is None else ops.add(penalty, self.base(w))


# ---- the set-up every Keras user shares -----------------------------------------------------
def compiled_keras_model(model, optimizer=None, threads: int | None = 1,
                         jit_compile: bool = False):
    """The Keras copy of ``model``, ready to train: TensorFlow pinned to ``threads`` threads
    (:func:`configure_threads`), the architecture and current weights of ``model``
    (:func:`build_keras_model`), compiled with our loss and ``optimizer`` in the model's dtype
    (:func:`compile_keras_model`; ``jit_compile``: the step through XLA). :func:`fit_keras`
    and the benchmarks' Keras contenders all start from it."""
    configure_threads(threads)
    kmodel = build_keras_model(model)
    compile_keras_model(kmodel, model, optimizer, jit_compile)
    return kmodel


def epoch_timer():
    """A Keras callback that times each epoch of ``Model.fit`` from ``on_epoch_begin`` to
    ``on_epoch_end`` (seconds of ``time.perf_counter`` in its ``elapsed``): every step,
    including Keras's per-batch slicing in tf.data, which Keras does not let us separate, and
    none of ``fit``'s per-call set-up and tear-down (building the tf.data pipeline, callbacks)."""
    import keras

    class EpochTimer(keras.callbacks.Callback):
        def on_epoch_begin(self, epoch, logs=None):
            self.start = time.perf_counter()

        def on_epoch_end(self, epoch, logs=None):
            self.elapsed = time.perf_counter() - self.start

    return EpochTimer()


# ---- training --------------------------------------------------------------------------------
def _snapshot(kmodel) -> list[np.ndarray]:
    return [v.numpy() for v in kmodel.weights] + [v.numpy() for v in kmodel.optimizer.variables]


def _restore(kmodel, values: list[np.ndarray]) -> None:
    for v, value in zip(list(kmodel.weights) + list(kmodel.optimizer.variables), values):
        v.assign(value)


def _warm_up_size(n: int, batch_size: int) -> int:
    """Examples for a warm-up whose batches have the shapes of a full pass over ``n``: one full
    batch, plus a partial one when a pass ends with one (Keras traces full and partial batch
    shapes separately)."""
    return n if n <= batch_size else batch_size + n % batch_size


def _keras_warm_up(kmodel, xk, y, batch_size: int, val=None, val_batch_size: int = 256) -> float:
    """Seconds of tf.function tracing, measured as the extra time of the first of two identical
    warm-up rounds over the second. A round is a Keras ``fit`` on the first
    :func:`_warm_up_size` training examples with the run's batch size (and an ``evaluate`` on
    the validation set's first examples likewise), so it traces exactly the functions and
    batch shapes the timed epochs use, and no epoch pays for tracing.

    The warm-up trains the real model (tracing a throwaway copy would leave the real one
    untraced); its weights and optimizer state (velocities, iteration count) are restored bit
    for bit from a copy afterwards, so it changes nothing.
    """
    kmodel.optimizer.build(kmodel.trainable_variables)
    saved = _snapshot(kmodel)
    m = _warm_up_size(len(y), batch_size)
    xw, yw = xk[:m], y[:m]
    if val is not None:
        mv = _warm_up_size(len(val[1]), val_batch_size)
        xv, yv = val[0][:mv], val[1][:mv]
    times = []
    for _ in range(2):
        t = time.perf_counter()
        kmodel.fit(xw, yw, batch_size=batch_size, epochs=1, shuffle=False, verbose=0)
        if val is not None:
            kmodel.evaluate(xv, yv, batch_size=val_batch_size, verbose=0)
        times.append(time.perf_counter() - t)
    _restore(kmodel, saved)
    return max(times[0] - times[1], 0.0)


def _step_hooks(hooks, kmodel, model, n: int, batch_size: int):
    """A Keras callback that calls our callbacks' ``on_step_end`` after every training batch,
    with :func:`cnn.train.fit`'s step logs: ``elapsed`` is the training clock (the epochs' data
    time and the time inside ``fit``'s epochs, less the hooks' own time), and ``evaluate`` the
    Keras model's loss and accuracy on data in our layout, computed from its logits (so that
    the running training metrics of the epoch are left alone). A hook returning True stops
    training after that batch."""
    import keras

    from ..backends import get_backend
    host = get_backend("numpy")
    converted: dict = {}

    def evaluate(xv, yv):
        if id(xv) not in converted:  # the same validation set at every evaluation
            converted.clear()
            converted[id(xv)] = to_keras_images(xv)
        xk, total, correct = converted[id(xv)], 0.0, 0
        for i in range(0, len(xk), EVAL_BATCH):
            logits = np.asarray(kmodel.predict_on_batch(xk[i:i + EVAL_BATCH]))
            loss, _, right = model.loss(logits, np.asarray(yv[i:i + EVAL_BATCH]), host)
            total += float(loss) * len(logits)
            correct += int(right)
        return {"loss": total / len(xk), "accuracy": correct / len(xk)}

    class StepHooks(keras.callbacks.Callback):
        def __init__(self):
            super().__init__()
            self.step = self.examples = self.epoch = 0
            self.elapsed = self.data_time = self.callback_time = 0.0  # see on_epoch_begin
            self.stopped = False

        def on_epoch_begin(self, epoch, logs=None):
            self.start, self.callback_time, self.done = time.perf_counter(), 0.0, 0

        def on_train_batch_end(self, batch, logs=None):
            t = time.perf_counter()
            size = min(batch_size, n - batch * batch_size)
            self.step += 1
            self.examples += size
            self.done += size
            slog = {"epoch": self.epoch, "step": self.step, "batch": batch + 1,
                    "examples": self.examples, "loss": float((logs or {}).get("loss", np.nan)),
                    "elapsed": self.elapsed + self.data_time + t - self.start
                    - self.callback_time,
                    "params": lambda: {v.path: v for v in kmodel.weights},
                    "evaluate": evaluate}
            if any([cb.on_step_end(self.step, slog) for cb in hooks]):
                self.model.stop_training = self.stopped = True
            self.callback_time += time.perf_counter() - t

    return StepHooks()


def fit_keras(model, x, y, *, epochs: int = 1, batch_size: int = 32, optimizer=None,
              seed: int = 0, validation_data: tuple | None = None, threads: int | None = 1,
              verbose: int = 0, callbacks=(), augment=None, normalize: bool = False,
              engine: str = "graph"):
    """Train the Keras copy of ``model`` (same initial weights) and copy the result back.

    The Keras path of the study: same arguments and the same History columns as
    :func:`cnn.train.fit`, so the study runner treats it like our paths.

    Args:
        model: our model; its weights are the starting point, and the trained weights are
            copied back into it at the end (also when training is interrupted).
        x, y: training images ``(N, C, H, W)`` and labels, in our layout.
        epochs, batch_size: as in :func:`cnn.train.fit`; the last batch of an epoch may be
            smaller, as there.
        optimizer: our optimizer spec (:func:`cnn.optim.make_optimizer`): any optimizer with
            a Keras counterpart (:func:`keras_optimizer`), with its schedule.
        seed: the epoch orders come from ``numpy.random.default_rng(seed)`` exactly as in
            :func:`cnn.train.fit`, so Keras sees the same batches in the same order as our
            sequential path (Keras's own shuffling is off).
        validation_data: ``(x_val, y_val)``, evaluated with ``Model.evaluate`` after each
            epoch, outside the timed epoch.
        threads: TensorFlow intra- and inter-op threads (see :func:`configure_threads`: it must
            run before TensorFlow has done any work in this process; ``None`` leaves TF alone).
            tf.data, which slices the batches inside ``fit``, keeps its own small pool.
        verbose: 1 prints one line per epoch.
        callbacks: our callbacks' step hook (``Callback.on_step_end``, with the logs of
            :func:`cnn.train.fit`'s step hook: time-to-accuracy evaluates in it; their time is
            not training time), called after every training batch; one returning True stops
            training after that batch. Keras's own callbacks are not taken.
        augment, normalize: as in :func:`cnn.train.fit`: Keras trains on the very batches our
            input pipeline makes (:func:`cnn.augment.epoch_batches`, the same crops and flips
            of the same examples), and the model keeps the normalisation for ``evaluate``
            and ``predict``; the validation data is normalised alike.
        engine: how Keras runs the step, a key of :data:`ENGINES`: ``graph`` (a
            ``tf.function``, no XLA) or ``xla`` (``jit_compile=True``; its compilation falls
            in the warm-up, ``compile_time``); recorded in ``info["engine"]``.

    Returns:
        a :class:`cnn.train.History` with, per epoch, the keys of :func:`cnn.train.fit`:

        - ``loss``, ``accuracy``: Keras's running means over the epoch's training batches
          (weighted by batch size, as ours);
        - ``compute_time``: the epoch as timed by :func:`epoch_timer` inside ``fit``;
        - ``data_time``: our shuffle and gather of the epoch's examples (the order is ours, see
          ``seed``), with their augmentation if any, timed as :func:`cnn.train.fit` times its
          own (which does it in its prefetching thread);
        - ``time`` = ``data_time + compute_time``, the epoch's training wall time (as in
          :func:`cnn.train.fit`); ``images_per_sec`` = examples / ``time``. Each epoch is one
          ``Model.fit(epochs=1)`` call (so that the order can be ours); Keras's set-up and
          tear-down around the epoch inside that call (building the tf.data pipeline,
          callbacks), which a single multi-epoch ``fit`` would pay once, is not charged to
          the epoch: it is listed per epoch in ``info["fit_call_overhead"]``;
        - ``transfer_time``: 0.0 (the CPU path has no host-device copies);
        - ``lr``: the learning rate of the epoch's last step;
        - ``eval_time``, ``val_loss``, ``val_accuracy`` when ``validation_data`` is given.

        ``info`` holds ``compile_time`` (see :func:`_keras_warm_up`: tf.function tracing, done
        before the first epoch on the real model so no epoch pays it), ``wall_time`` (the
        seconds of the call from TensorFlow's import on),
        ``params_transfer_time`` (building and compiling the Keras model, our weights copied
        in), the layout conversion time of the inputs,
        the configuration, and the TensorFlow/Keras versions and thread settings.
    """
    from ..augment import InputPipeline, checked_augmentation, epoch_batches
    from ..normalize import normalized, training_normalization
    from ..optim import make_optimizer
    from ..train import History
    epochs = check_int(None, "epochs", epochs)
    batch_size = check_int(None, "batch_size", batch_size)
    check_choice(None, "engine", engine, tuple(ENGINES))
    model.check_inputs(x, y)
    if validation_data is not None:
        model.check_inputs(*validation_data)
    augmentation = checked_augmentation(augment, model.input_shape)
    check_keras_compatible(model)
    opt = make_optimizer(optimizer)
    if opt.schedule is not None:  # horizons in epochs or left to the end of the fit, as fit
        spe = -(-len(x) // batch_size)
        opt = opt.with_schedule(opt.schedule.resolve(spe, epochs * spe))
    configure_threads(threads)  # before the clock starts: its first call imports TensorFlow
    import keras
    import tensorflow as tf
    started = time.perf_counter()

    n = len(x)
    y = keras_labels(model, y)
    model.normalization = training_normalization(x, normalize, model.normalization,
                                                 model.input_shape)
    pipeline = InputPipeline(augmentation, model.normalization, seed)
    t = time.perf_counter()
    kmodel = compiled_keras_model(model, opt, threads, ENGINES[engine])
    params_time = time.perf_counter() - t
    t = time.perf_counter()
    # normalised once; with augmentation these are only the warm-up's images, the epochs'
    # are made anew (each epoch's crops differ)
    xk = to_keras_images(normalized(x, model.normalization))
    val = None
    if validation_data is not None:
        val = (to_keras_images(normalized(validation_data[0], model.normalization)),
               keras_labels(model, validation_data[1]))
    layout_time = time.perf_counter() - t
    history = History(info={"backend": "keras", "strategy": "keras", "threads": threads,
                            "engine": engine,
                            "batch_size": batch_size, "epochs": epochs, "seed": seed,
                            "optimizer": opt.config(), "train_examples": n,
                            "dtype": str(model.dtype), "params_transfer_time": params_time,
                            "augment": None if augmentation is None else augmentation.config(),
                            "normalization": (None if model.normalization is None
                                              else model.normalization.config()),
                            "layout_time": layout_time, "keras_version": keras.__version__,
                            "tensorflow_version": tf.__version__, "fit_call_overhead": [], **{
                                f"tf_{k}_threads": v for k, v in thread_settings().items()}})
    from ..callbacks import Callback
    hooks = [cb for cb in callbacks if type(cb).on_step_end is not Callback.on_step_end]
    try:
        history.info["compile_time"] = _keras_warm_up(kmodel, xk, y, batch_size, val, EVAL_BATCH)
        timer = epoch_timer()
        stepper = _step_hooks(hooks, kmodel, model, n, batch_size) if hooks else None
        rng = np.random.default_rng(seed)
        for epoch in range(1, epochs + 1):
            t0 = time.perf_counter()
            order = rng.permutation(n)  # the same draw as cnn.train.fit's
            xe = (xk[order] if augmentation is None else
                  to_keras_images(epoch_batches(pipeline, x, order, epoch, batch_size)))
            ye = y[order]
            t1 = time.perf_counter()
            if stepper is not None:
                stepper.epoch, stepper.data_time = epoch, t1 - t0
            klogs = kmodel.fit(xe, ye, batch_size=batch_size, epochs=1, shuffle=False,
                               verbose=0, callbacks=[timer] + ([stepper] if stepper else [])
                               ).history
            t2 = time.perf_counter()
            compute, data = timer.elapsed, t1 - t0
            if stepper is not None:  # the hooks ran inside the timed epoch: not training
                compute -= stepper.callback_time
            history.info["fit_call_overhead"].append(t2 - t1 - timer.elapsed)
            steps_done = int(kmodel.optimizer.iterations.numpy())
            logs = {"epoch": epoch, "loss": float(klogs["loss"][0]),
                    "accuracy": float(klogs["accuracy"][0]),
                    "lr": opt.learning_rate(max(steps_done - 1, 0)), "time": data + compute,
                    "compute_time": compute, "comm_time": 0.0, "data_time": data,
                    "transfer_time": 0.0,
                    "images_per_sec": n / (data + compute)}
            if stepper is not None:
                stepper.elapsed += data + compute
                logs["callback_time"], logs["examples"] = stepper.callback_time, stepper.done
                logs["images_per_sec"] = stepper.done / (data + compute)
            if val is not None:
                t = time.perf_counter()
                res = kmodel.evaluate(*val, batch_size=EVAL_BATCH, verbose=0, return_dict=True)
                logs["eval_time"] = time.perf_counter() - t
                logs["val_loss"], logs["val_accuracy"] = float(res["loss"]), float(res["accuracy"])
            history.append(logs)
            if verbose:
                print(history.epoch_line(epochs), flush=True)
            if stepper is not None and stepper.stopped:
                break
    finally:
        model.set_weights(get_keras_weights(kmodel, model))
    history.info["wall_time"] = time.perf_counter() - started
    return history


__all__ = ["SUPPORTED_LAYERS", "build_keras_model", "check_keras_compatible",
           "compile_keras_model", "compiled_keras_model", "configure_threads", "epoch_timer",
           "fit_keras", "from_keras_images", "get_keras_weights", "keras_accuracy",
           "keras_labels", "keras_loss", "keras_loss_and_grads", "keras_name", "keras_optimizer",
           "keras_to_ours", "ours_to_keras", "set_keras_weights", "thread_settings",
           "to_keras_images"]
