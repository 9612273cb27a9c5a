"""Named reference architectures. The CLI, the benchmark and the study accept these names.

Each preset is a plain spec (so the Keras reference builds the same network) plus the
optimizer and batch size the study trains it with by default.
"""
from __future__ import annotations

from .datafile import is_dataset_file, stored_input_shape


def cifar_resnet(blocks_per_stage: int) -> dict:
    """The CIFAR-10 residual network of He et al. (CVPR 2016, section 4.2) with ``6 n + 2``
    weighted layers for ``n = blocks_per_stage`` (ResNet-20: 3, ResNet-56: 9): a 3x3 conv of
    16 filters, three stages of ``n`` blocks of two 3x3 convs with 16, 32 and 64 filters (the
    first block of stages 2 and 3 halves the image with stride 2, its shortcut is option A:
    subsampling and zero channels), global average pooling and one dense layer. Batch norm
    after every conv, convs without bias; ReLU after each block's sum.

    Where the paper leaves a choice open, its reference Torch implementation
    (facebook/fb.resnet.torch) decides: explicit padding 1 on every side of the 3x3 convs
    (``'same'`` would pad a strided conv's bottom only, as TensorFlow does), batch norm with
    Torch's momentum 0.1 (ours 0.9, Keras's convention) and epsilon 1e-5; the optimizer is the
    paper's: SGD with momentum 0.9, learning rate 0.1, batch 128 and weight decay 1e-4 added to
    the gradient of every parameter (``weight_decay_mode="coupled"``, Torch's and PyTorch's L2
    decay). See docs/resnet.md for each difference between the paper, Keras and PyTorch."""
    def conv(filters: int, stride: int = 1) -> dict:
        return {"type": "conv2d", "filters": filters, "kernel_size": 3, "stride": stride,
                "padding": 1, "use_bias": False, "kernel_initializer": "he_normal"}

    batchnorm = {"type": "batchnorm", "momentum": 0.9, "epsilon": 1e-5}
    layers = [conv(16), batchnorm, {"type": "relu"}]
    for stage, filters in enumerate((16, 32, 64), 1):
        for block in range(1, blocks_per_stage + 1):
            stride = 2 if stage > 1 and block == 1 else 1
            layers.append({"type": "residual", "name": f"stage{stage}_block{block}",
                           "layers": [conv(filters, stride), batchnorm, {"type": "relu"},
                                      conv(filters), batchnorm],
                           "shortcut": "pad" if stride > 1 else "identity",
                           "activation": "relu"})
    layers += [{"type": "globalavgpool2d"},
               {"type": "dense", "units": 10, "kernel_initializer": "he_normal"}]
    return {"input_shape": [3, 32, 32], "layers": layers,
            "optimizer": {"type": "sgd", "lr": 0.1, "momentum": 0.9, "weight_decay": 1e-4,
                          "weight_decay_mode": "coupled"},
            "batch_size": 128}


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
    # ResNet-20 and ResNet-56 for CIFAR-10, as in the paper (see cifar_resnet): 0.27M and
    # 0.85M parameters
    "cifar_resnet20": cifar_resnet(3),
    "cifar_resnet56": cifar_resnet(9),
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
