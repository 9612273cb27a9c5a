"""The Keras reference: the same spec built in Keras (TensorFlow backend), and weight transfer
in both directions, so every path can be checked against Keras from identical weights.

Layout differences handled here (ours -> Keras):

- images ``(N, C, H, W)`` -> ``(N, H, W, C)`` (TensorFlow's CPU convolutions are channels-last);
- conv kernels ``(F, C, KH, KW)`` -> ``(KH, KW, C, F)``;
- dense weights after a ``flatten`` of a ``(C, H, W)`` map: our rows run in ``C, H, W`` order,
  Keras's in ``H, W, C`` order, so those rows are permuted; other dense weights are equal.

TensorFlow is imported on first use only; ``configure_threads`` must run before the first op.
"""
from __future__ import annotations

import numpy as np

from .layers import Conv2D, Dense, Flatten, MaxPool2D, ReLU


def configure_threads(threads: int | None) -> None:
    """Pin TensorFlow's intra- and inter-op pools (call before TensorFlow runs anything)."""
    import tensorflow as tf
    if threads is not None:
        tf.config.threading.set_intra_op_parallelism_threads(threads)
        tf.config.threading.set_inter_op_parallelism_threads(threads)


def _keras_layer(layer, keras):
    if isinstance(layer, Conv2D):
        return keras.layers.Conv2D(layer.filters, layer.kernel_size, strides=layer.stride,
                                   padding=layer.padding, name=layer.name)
    if isinstance(layer, MaxPool2D):
        return keras.layers.MaxPooling2D(layer.pool_size, strides=layer.stride, name=layer.name)
    if isinstance(layer, ReLU):
        return keras.layers.ReLU(name=layer.name)
    if isinstance(layer, Flatten):
        return keras.layers.Flatten(name=layer.name)
    if isinstance(layer, Dense):
        return keras.layers.Dense(layer.units, name=layer.name)
    raise ValueError(f"layer {layer.name!r} of type {layer.type!r} has no Keras equivalent here")


def build_keras_model(model):
    """A Keras model with the architecture of our ``model`` and its current weights."""
    import keras
    c, h, w = model.input_shape
    inputs = keras.Input(shape=(h, w, c), dtype=str(model.dtype))
    x = inputs
    for layer in model.layers:
        x = _keras_layer(layer, keras)(x)
    kmodel = keras.Model(inputs, x, name="reference")
    set_keras_weights(kmodel, model)
    return kmodel


def to_keras_images(x: np.ndarray) -> np.ndarray:
    """``(N, C, H, W)`` -> ``(N, H, W, C)``."""
    return np.ascontiguousarray(x.transpose(0, 2, 3, 1))


def _flatten_source_shape(model, dense_index: int):
    """The ``(C, H, W)`` shape flattened right before layer ``dense_index``, if any."""
    prev = model.layers[dense_index - 1] if dense_index > 0 else None
    if isinstance(prev, Flatten) and len(prev.input_shape) == 3:
        return prev.input_shape
    return None


def ours_to_keras(model) -> dict[str, list[np.ndarray]]:
    """Our parameters in Keras layouts, keyed by layer name: ``[kernel, bias]``."""
    out = {}
    for i, layer in enumerate(model.layers):
        if not layer.param_names:
            continue
        w = model.params[f"{layer.name}.w"]
        b = model.params[f"{layer.name}.b"]
        if isinstance(layer, Conv2D):
            w = w.transpose(2, 3, 1, 0)
        elif isinstance(layer, Dense) and (src := _flatten_source_shape(model, i)) is not None:
            c, h, wd = src
            w = w.reshape(c, h, wd, -1).transpose(1, 2, 0, 3).reshape(c * h * wd, -1)
        out[layer.name] = [np.ascontiguousarray(w), b.copy()]
    return out


def keras_to_ours(model, keras_weights: dict[str, list[np.ndarray]]) -> dict[str, np.ndarray]:
    """Keras ``[kernel, bias]`` per layer name -> our flat parameter dict."""
    params = {}
    for i, layer in enumerate(model.layers):
        if not layer.param_names:
            continue
        w, b = (np.asarray(a) for a in keras_weights[layer.name])
        if isinstance(layer, Conv2D):
            w = w.transpose(3, 2, 0, 1)
        elif isinstance(layer, Dense) and (src := _flatten_source_shape(model, i)) is not None:
            c, h, wd = src
            w = w.reshape(h, wd, c, -1).transpose(2, 0, 1, 3).reshape(c * h * wd, -1)
        params[f"{layer.name}.w"] = np.ascontiguousarray(w, dtype=model.dtype)
        params[f"{layer.name}.b"] = b.astype(model.dtype)
    return params


def set_keras_weights(kmodel, model) -> None:
    """Copy our model's weights into the Keras model."""
    for name, weights in ours_to_keras(model).items():
        kmodel.get_layer(name).set_weights(weights)


def get_keras_weights(kmodel, model) -> dict[str, np.ndarray]:
    """The Keras model's weights in our layout (load with ``model.set_weights``)."""
    return keras_to_ours(model, {layer.name: layer.get_weights()
                                 for layer in model.layers if layer.param_names})
