"""Named reference architectures. The CLI, the benchmark and the study accept these names.

Each preset is a plain spec (so the Keras reference builds the same network) plus the
optimizer and batch size the study trains it with by default.
"""
from __future__ import annotations

from .datafile import is_dataset_file, stored_input_shape

PRESETS: dict[str, dict] = {
    # The small MNIST network: one conv layer of 8 3x3 filters, pooling and a softmax layer.
    "mnist_small": {
        "input_shape": [1, 28, 28],
        "layers": [
            {"type": "conv2d", "filters": 8, "kernel_size": 3, "activation": "relu"},
            {"type": "maxpool2d", "pool_size": 2},
            {"type": "flatten"},
            {"type": "dense", "units": 10},
        ],
        "optimizer": {"type": "sgd", "lr": 0.1, "momentum": 0.0},
        "batch_size": 32,
    },
    # XOR (two-pixel images, cnn.data.make_xor): the classic feed-forward network with one
    # hidden layer; a network without one cannot separate XOR.
    "xor_mlp": {
        "input_shape": [1, 1, 2],
        "layers": [
            {"type": "flatten"},
            {"type": "dense", "units": 16, "activation": "relu"},
            {"type": "dense", "units": 2},
        ],
        "optimizer": {"type": "adam", "lr": 0.02},
        "batch_size": 16,
    },
    # The feed-forward MNIST network of the source projects: 784 -> 128 (relu) -> 10.
    "mnist_mlp": {
        "input_shape": [1, 28, 28],
        "layers": [
            {"type": "flatten"},
            {"type": "dense", "units": 128, "activation": "relu"},
            {"type": "dense", "units": 10},
        ],
        "optimizer": {"type": "sgd", "lr": 0.1, "momentum": 0.0},
        "batch_size": 32,
    },
    # The CNN of TensorFlow's "Convolutional Neural Network" tutorial for CIFAR-10.
    "cifar_tutorial": {
        "input_shape": [3, 32, 32],
        "layers": [
            {"type": "conv2d", "filters": 32, "kernel_size": 3, "activation": "relu"},
            {"type": "maxpool2d", "pool_size": 2},
            {"type": "conv2d", "filters": 64, "kernel_size": 3, "activation": "relu"},
            {"type": "maxpool2d", "pool_size": 2},
            {"type": "conv2d", "filters": 64, "kernel_size": 3, "activation": "relu"},
            {"type": "flatten"},
            {"type": "dense", "units": 64, "activation": "relu"},
            {"type": "dense", "units": 10},
        ],
        "optimizer": {"type": "sgd", "lr": 0.01, "momentum": 0.9},
        "batch_size": 32,
    },
}


#: the preset ``python -m cnn train --dataset NAME`` trains when no --model is given: one that
#: fits the data set's input (XOR's two-pixel images need a feed-forward network)
DATASET_MODELS = {"cifar10": "cifar_tutorial", "xor": "xor_mlp"}


def default_model(dataset: str) -> str:
    """The default preset for ``dataset`` (``mnist_small`` for MNIST-shaped and blob images).
    For a data set file the shape ``(C, H, W)`` of its images decides (read from the file's
    header): ``cifar_tutorial`` for ``(3, 32, 32)``, ``xor_mlp`` for images too small for
    ``mnist_small``'s 3x3 convolution and 2x2 pooling (feature vectors ``(1, 1, D)`` among
    them), ``mnist_small`` otherwise."""
    if not is_dataset_file(dataset):
        return DATASET_MODELS.get(dataset, "mnist_small")
    input_shape = stored_input_shape(dataset)
    if tuple(input_shape) == (3, 32, 32):
        return "cifar_tutorial"
    return "xor_mlp" if min(input_shape[1:]) < 4 else "mnist_small"


def preset_names() -> list[str]:
    return sorted(PRESETS)


def get_preset(name: str) -> dict:
    if name not in PRESETS:
        raise ValueError(f"unknown model preset {name!r}; choose one of {preset_names()}")
    return PRESETS[name]


def with_filters(spec: dict, filters: int | None) -> dict:
    """A copy of ``spec`` whose first conv layer has ``filters`` filters (the study's
    "number of conv filters" axis); ``None`` leaves it unchanged."""
    if filters is None:
        return spec
    layers = [dict(layer) for layer in spec["layers"]]
    first_conv = next(i for i, layer in enumerate(layers) if layer["type"] == "conv2d")
    layers[first_conv]["filters"] = int(filters)
    return {**spec, "layers": layers}


def for_data(spec: dict, model, dataset: str, classes: int) -> dict:
    """The spec to train on ``dataset``: a preset (``model`` names one) trained on a data set
    file gets an output layer of the file's ``classes`` (:func:`with_classes`); any other spec
    is the user's own and is kept as it is."""
    if is_dataset_file(dataset) and isinstance(model, str) and model in PRESETS:
        return with_classes(spec, classes)
    return spec


def with_classes(spec: dict, classes: int) -> dict:
    """A copy of ``spec`` whose output layer (its last layer, when a dense one) has ``classes``
    units: a preset sized to a data set's classes. Other specs are returned as they are."""
    layers = [dict(layer) for layer in spec["layers"]]
    if not layers or str(layers[-1].get("type", "")).lower() != "dense":
        return spec
    layers[-1]["units"] = int(classes)
    return {**spec, "layers": layers}
