"""Sequential: building from specs (presets, files), validation messages, output shapes,
initialisation, dtype, persistence, predict/evaluate against hand loops, and bad inputs."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest

from cnn.backends import get_backend
from cnn.context import StepContext
from cnn.layers import Conv2D, Dense, Flatten, MaxPool2D, ReLU, layers_from_spec
from cnn.model import Sequential, build_model
from cnn.presets import PRESETS, with_filters

NAIVE = get_backend("naive")

SMALL_SPEC = [
    {"type": "conv2d", "filters": 3, "kernel_size": 3, "activation": "relu"},
    {"type": "maxpool2d", "pool_size": 2},
    {"type": "flatten"},
    {"type": "dense", "units": 4},
]


def small_model(dtype=np.float32, seed=0, input_shape=(1, 8, 8)):
    return Sequential(layers_from_spec(SMALL_SPEC), input_shape, dtype=dtype, seed=seed)


# ---- presets -----------------------------------------------------------------------------------
def test_mnist_small_preset():
    model = build_model("mnist_small")
    assert model.input_shape == (1, 28, 28)
    assert [l.type for l in model.layers] == ["conv2d", "relu", "maxpool2d", "flatten", "dense"]
    assert [l.output_shape for l in model.layers] == [(8, 26, 26), (8, 26, 26), (8, 13, 13),
                                                      (1352,), (10,)]
    assert model.num_classes == 10
    # 8*(1*3*3) + 8 conv, 1352*10 + 10 dense
    assert model.num_params == 80 + 13530
    assert model.params["conv2d.w"].shape == (8, 1, 3, 3)
    assert model.params["dense.w"].shape == (1352, 10)
    assert model.dtype == np.float32


def test_cifar_tutorial_preset():
    model = build_model("cifar_tutorial")
    assert model.input_shape == (3, 32, 32)
    shapes = [l.output_shape for l in model.layers if not isinstance(l, ReLU)]
    assert shapes == [(32, 30, 30), (32, 15, 15), (64, 13, 13), (64, 6, 6), (64, 4, 4),
                      (1024,), (64,), (10,)]
    # the parameter count of TensorFlow's CNN tutorial model
    assert model.num_params == 122_570
    assert sum(isinstance(l, ReLU) for l in model.layers) == 4


def test_with_filters_changes_only_first_conv():
    spec = with_filters(PRESETS["cifar_tutorial"], 16)
    convs = [l for l in spec["layers"] if l["type"] == "conv2d"]
    assert [c["filters"] for c in convs] == [16, 64, 64]
    assert PRESETS["cifar_tutorial"]["layers"][0]["filters"] == 32  # the preset is untouched
    assert with_filters(PRESETS["mnist_small"], None) is PRESETS["mnist_small"]


# ---- spec parsing -----------------------------------------------------------------------------
def test_activation_shorthand_expands_to_relu_layer():
    layers = layers_from_spec([{"type": "conv2d", "filters": 2, "activation": "relu"},
                               {"type": "flatten"},
                               {"type": "dense", "units": 3, "activation": "linear"},
                               {"type": "dense", "units": 2, "activation": None}])
    assert [type(l) for l in layers] == [Conv2D, ReLU, Flatten, Dense, Dense]


def test_keras_aliases_and_case():
    layers = layers_from_spec([{"type": "Conv2D", "filters": 2}, {"type": "MaxPooling2D"},
                               {"type": "Flatten"}, {"type": "Dense", "units": 2}])
    assert [type(l) for l in layers] == [Conv2D, MaxPool2D, Flatten, Dense]


@pytest.mark.parametrize("spec, match", [
    ([{"type": "convolution", "filters": 8}], "convolution"),
    ([{"type": "conv2d", "filtres": 8}], "filtres"),
    ([{"type": "conv2d", "filters": 0}], "filters=0"),
    ([{"type": "conv2d", "filters": -3}], "filters=-3"),
    ([{"type": "conv2d", "filters": 2.5}], "filters=2.5"),
    ([{"type": "conv2d", "filters": 4, "padding": "full"}], "'full'"),
    ([{"type": "conv2d", "filters": 4, "stride": 0}], "stride=0"),
    ([{"type": "conv2d", "filters": 4, "kernel_size": [3, 0]}], "kernel_size=0"),
    ([{"type": "conv2d", "filters": 4, "kernel_initializer": "zeros"}], "'zeros'"),
    ([{"type": "conv2d", "filters": 4, "activation": "swish"}], "'swish'"),
    ([{"type": "maxpool2d", "pool_size": 0}], "pool_size=0"),
    ([{"type": "dense", "units": 0}], "units=0"),
    ([{"filters": 8}], "type"),
    ([], "non-empty"),
])
def test_bad_specs_raise_valueerror_naming_the_problem(spec, match):
    with pytest.raises(ValueError, match=match):
        layers_from_spec(spec)


def test_kernel_bigger_than_input_raises():
    with pytest.raises(ValueError, match=r"kernel \(5, 5\) is larger than its input \(1, 4, 4\)"):
        Sequential(layers_from_spec([{"type": "conv2d", "filters": 2, "kernel_size": 5},
                                     {"type": "flatten"}, {"type": "dense", "units": 2}]), (1, 4, 4))
    # after pooling the map is 2x2: the second 3x3 conv no longer fits
    with pytest.raises(ValueError, match="larger than its input"):
        Sequential(layers_from_spec([{"type": "maxpool2d", "pool_size": 2},
                                     {"type": "conv2d", "filters": 2, "kernel_size": 3},
                                     {"type": "flatten"}, {"type": "dense", "units": 2}]), (1, 4, 4))
    with pytest.raises(ValueError, match="pool_size 3 is larger"):
        Sequential(layers_from_spec([{"type": "maxpool2d", "pool_size": 3},
                                     {"type": "flatten"}, {"type": "dense", "units": 2}]), (1, 2, 2))


def test_structural_errors():
    with pytest.raises(ValueError, match="flat logits"):
        Sequential(layers_from_spec([{"type": "conv2d", "filters": 2}]), (1, 5, 5))
    with pytest.raises(ValueError, match=r"\(2, 3, 3\)"):   # dense needs a flatten before it
        Sequential(layers_from_spec([{"type": "conv2d", "filters": 2}, {"type": "dense", "units": 2}]),
                   (1, 5, 5))
    with pytest.raises(ValueError, match="'twin'"):
        Sequential([Flatten(name="twin"), Dense(2, name="twin")], (1, 2, 2))
    with pytest.raises(ValueError, match="input_shape"):
        Sequential.from_spec([{"type": "flatten"}, {"type": "dense", "units": 2}])
    with pytest.raises(ValueError, match="'no_such_model'"):
        build_model("no_such_model")


# ---- output shapes ---------------------------------------------------------------------------
@pytest.mark.parametrize("h, w", [(5, 5), (8, 7), (9, 6)])
@pytest.mark.parametrize("k", [1, 2, 3, 5])
@pytest.mark.parametrize("stride", [1, 2, 3])
def test_same_conv_output_shape_is_ceil(h, w, k, stride):
    layer = Conv2D(2, kernel_size=k, stride=stride, padding="same")
    assert layer.build((3, h, w)) == (2, math.ceil(h / stride), math.ceil(w / stride))
    params = layer.init_params(np.random.default_rng(0), np.float64)
    x = np.random.default_rng(1).standard_normal((2, 3, h, w))
    out, _ = layer.forward(params, x, get_backend("numpy"), StepContext())
    assert out.shape == (2, 2, math.ceil(h / stride), math.ceil(w / stride))


@pytest.mark.parametrize("h, w, k, stride", [(5, 5, 3, 1), (8, 7, 3, 2), (9, 6, 2, 3), (7, 7, 5, 2)])
def test_valid_conv_and_pool_output_shapes(h, w, k, stride):
    conv = Conv2D(4, kernel_size=k, stride=stride)
    assert conv.build((2, h, w)) == (4, (h - k) // stride + 1, (w - k) // stride + 1)
    pool = MaxPool2D(pool_size=2, stride=stride)
    assert pool.build((2, h, w)) == (2, (h - 2) // stride + 1, (w - 2) // stride + 1)
    assert MaxPool2D(3).stride == 3


def test_model_with_stride2_same_forward_shapes():
    spec = [{"type": "conv2d", "filters": 4, "kernel_size": 3, "stride": 2, "padding": "same",
             "activation": "relu"},
            {"type": "conv2d", "filters": 5, "kernel_size": 2, "stride": 2, "padding": "same"},
            {"type": "flatten"}, {"type": "dense", "units": 3}]
    model = Sequential.from_spec(spec, (2, 11, 6))
    assert model.layers[0].output_shape == (4, 6, 3)          # ceil(11/2), ceil(6/2)
    assert model.layers[2].output_shape == (5, 3, 2)          # ceil(6/2), ceil(3/2)
    assert model.layers[3].output_shape == (30,)
    x = np.zeros((4, 2, 11, 6), dtype=np.float32)
    logits, caches = model.forward(x)
    assert logits.shape == (4, 3) and len(caches) == len(model.layers)


# ---- initialisation ----------------------------------------------------------------------------
def test_seeded_init_reproducible_and_seed_dependent():
    a, b, c = small_model(seed=3), small_model(seed=3), small_model(seed=4)
    assert sorted(a.params) == ["conv2d.b", "conv2d.w", "dense.b", "dense.w"]
    for k in a.params:
        assert a.params[k].shape == c.params[k].shape
        np.testing.assert_array_equal(a.params[k], b.params[k])
    assert not np.array_equal(a.params["conv2d.w"], c.params["conv2d.w"])
    assert not np.array_equal(a.params["dense.w"], c.params["dense.w"])
    np.testing.assert_array_equal(a.params["conv2d.b"], 0.0)   # biases start at zero
    np.testing.assert_array_equal(a.params["dense.b"], 0.0)


INIT_CASES = [  # (initializer, variance from fan_in, fan_out, uniform limit or None)
    ("glorot_uniform", lambda fi, fo: 2.0 / (fi + fo), lambda fi, fo: math.sqrt(6.0 / (fi + fo))),
    ("glorot_normal", lambda fi, fo: 2.0 / (fi + fo), None),
    ("he_uniform", lambda fi, fo: 2.0 / fi, lambda fi, fo: math.sqrt(6.0 / fi)),
    ("he_normal", lambda fi, fo: 2.0 / fi, None),
]


@pytest.mark.parametrize("init, variance, limit", INIT_CASES, ids=[c[0] for c in INIT_CASES])
def test_init_statistics_conv(init, variance, limit):
    layer = Conv2D(64, kernel_size=5, kernel_initializer=init)
    layer.build((32, 10, 10))
    w = layer.init_params(np.random.default_rng(0), np.float64)["w"]
    assert w.shape == (64, 32, 5, 5)
    fan_in, fan_out = 32 * 25, 64 * 25
    # 51,200 samples: the sample variance is within ~1% (3 sigma) of the true one
    np.testing.assert_allclose(w.var(), variance(fan_in, fan_out), rtol=0.03)
    assert abs(w.mean()) < 0.03 * math.sqrt(variance(fan_in, fan_out))
    if limit is not None:
        assert np.abs(w).max() <= limit(fan_in, fan_out)
        assert np.abs(w).max() > 0.99 * limit(fan_in, fan_out)


@pytest.mark.parametrize("init, variance, limit", INIT_CASES, ids=[c[0] for c in INIT_CASES])
def test_init_statistics_dense(init, variance, limit):
    layer = Dense(300, kernel_initializer=init)
    layer.build((200,))
    params = layer.init_params(np.random.default_rng(1), np.float32)
    w = params["w"]
    assert w.shape == (200, 300) and w.dtype == np.float32
    np.testing.assert_allclose(w.astype(np.float64).var(), variance(200, 300), rtol=0.03)
    np.testing.assert_array_equal(params["b"], np.zeros(300, dtype=np.float32))


# ---- dtype -------------------------------------------------------------------------------------
def test_float64_on_request():
    model = small_model(dtype=np.float64)
    assert model.dtype == np.float64
    assert all(p.dtype == np.float64 for p in model.params.values())
    x = np.random.default_rng(0).standard_normal((2, 1, 8, 8))
    logits, _ = model.forward(x)
    assert logits.dtype == np.float64
    loss, correct, grads = model.loss_and_grads(x, np.array([0, 1]))
    assert loss.dtype == np.float64
    assert all(g.dtype == np.float64 for g in grads.values())
    assert all(p.dtype == np.float32 for p in small_model().params.values())


def test_float64_init_is_float32_init_rounded():
    a, b = small_model(np.float32, seed=5), small_model(np.float64, seed=5)
    for k in a.params:
        np.testing.assert_array_equal(a.params[k], b.params[k].astype(np.float32))


@pytest.mark.parametrize("dtype", [np.int32, np.float16, "uint8"])
def test_bad_model_dtype(dtype):
    with pytest.raises(TypeError, match=f"dtype={np.dtype(dtype)}"):
        small_model(dtype=dtype)


# ---- persistence -------------------------------------------------------------------------------
def test_save_load_round_trip(tmp_path):
    a = small_model(seed=1)
    path = a.save_weights(tmp_path / "sub" / "w.npz")
    assert path == tmp_path / "sub" / "w.npz" and path.is_file()
    assert not list((tmp_path / "sub").glob("*.tmp*"))   # the temporary file was renamed
    b = small_model(seed=2)
    assert not np.array_equal(a.params["dense.w"], b.params["dense.w"])
    b.load_weights(path)
    for k in a.params:
        assert b.params[k].dtype == np.float32
        np.testing.assert_array_equal(b.params[k], a.params[k])
    # the file carries the spec that rebuilds the architecture
    with np.load(path) as data:
        spec = json.loads(str(data["__spec__"]))
    assert spec == a.spec()


def test_save_adds_npz_suffix(tmp_path):
    path = small_model().save_weights(tmp_path / "weights")
    assert path.name == "weights.npz" and path.is_file()


def test_load_mismatching_file_raises(tmp_path):
    path = small_model().save_weights(tmp_path / "w.npz")
    other = Sequential(layers_from_spec([{"type": "conv2d", "filters": 5, "kernel_size": 3},
                                         {"type": "flatten"}, {"type": "dense", "units": 4}]),
                       (1, 8, 8))
    with pytest.raises(ValueError, match="conv2d.w"):      # same keys, other shapes
        other.load_weights(path)
    deeper = Sequential(layers_from_spec(SMALL_SPEC + [{"type": "dense", "units": 2}]), (1, 8, 8))
    with pytest.raises(ValueError, match="dense_1"):       # a parameter the file lacks
        deeper.load_weights(path)
    # a file that matches in its first layers but not later must not half-load
    wider = Sequential(layers_from_spec(SMALL_SPEC[:-1] + [{"type": "dense", "units": 5}]),
                       (1, 8, 8), seed=8)
    before = wider.get_weights()
    with pytest.raises(ValueError, match="dense.w"):
        wider.load_weights(path)
    for k, v in before.items():
        np.testing.assert_array_equal(wider.params[k], v, err_msg=f"{k} changed by a failed load")
    with pytest.raises(FileNotFoundError, match="nope.npz"):
        small_model().load_weights(tmp_path / "nope.npz")


def test_set_weights_is_a_copy():
    model = small_model()
    w = model.get_weights()
    w["dense.w"][...] = 7.0
    assert not np.any(model.params["dense.w"] == 7.0)


def test_spec_round_trip():
    a = build_model("mnist_small", seed=4)
    b = Sequential.from_spec(json.loads(json.dumps(a.spec())), seed=4)
    assert [l.config() for l in b.layers] == [l.config() for l in a.layers]
    for k in a.params:
        np.testing.assert_array_equal(a.params[k], b.params[k])


def test_from_json_and_yaml_files(tmp_path):
    import yaml  # a dependency in requirements.txt
    spec = {"input_shape": [1, 8, 8], "layers": SMALL_SPEC}
    (tmp_path / "m.json").write_text(json.dumps(spec))
    (tmp_path / "m.yaml").write_text(yaml.safe_dump(spec))
    ref = small_model(seed=9)
    for name in ("m.json", "m.yaml"):
        model = Sequential.from_spec(str(tmp_path / name), seed=9)
        assert model.input_shape == (1, 8, 8)
        assert [l.config() for l in model.layers] == [l.config() for l in ref.layers]
        for k in ref.params:
            np.testing.assert_array_equal(model.params[k], ref.params[k])
    # a YAML file written by hand, with the input shape overridden by the caller
    (tmp_path / "hand.yml").write_text(
        "layers:\n"
        "  - {type: conv2d, filters: 2, kernel_size: 3, activation: relu}\n"
        "  - type: flatten\n"
        "  - {type: dense, units: 3}\n")
    model = Sequential.from_spec(tmp_path / "hand.yml", input_shape=(1, 5, 5))
    assert [l.type for l in model.layers] == ["conv2d", "relu", "flatten", "dense"]
    assert model.layers[-1].output_shape == (3,)
    with pytest.raises(FileNotFoundError, match="missing.json"):
        Sequential.from_spec(str(tmp_path / "missing.json"))


# ---- predict / evaluate against hand loops ----------------------------------------------------
def _hand_logits(model, x):
    """Logits one example at a time through the naive loop backend."""
    return np.concatenate([model.forward(x[i:i + 1], backend=NAIVE)[0] for i in range(len(x))])


def test_predict_probabilities():
    model = small_model(dtype=np.float64, seed=2)
    x = np.random.default_rng(0).standard_normal((7, 1, 8, 8))
    p = model.predict(x, batch_size=3)
    assert p.shape == (7, 4) and p.dtype == np.float64
    assert np.all(p >= 0)
    np.testing.assert_allclose(p.sum(axis=1), 1.0, rtol=0, atol=1e-12)
    logits = _hand_logits(model, x)
    e = np.exp(logits - logits.max(axis=1, keepdims=True))
    np.testing.assert_allclose(p, e / e.sum(axis=1, keepdims=True), rtol=1e-10, atol=1e-14)
    np.testing.assert_allclose(model.predict_logits(x, batch_size=2), logits, rtol=1e-10, atol=1e-12)


def test_evaluate_against_hand_loop():
    model = small_model(dtype=np.float64, seed=6)
    rng = np.random.default_rng(1)
    x = rng.standard_normal((10, 1, 8, 8))
    y = rng.integers(0, 4, 10)
    res = model.evaluate(x, y, batch_size=4)   # batches of 4, 4, 2: a weighted mean
    assert set(res) == {"loss", "accuracy"}
    logits = _hand_logits(model, x)
    losses, right = [], 0
    for row, label in zip(logits, y):
        m = max(row)
        losses.append(m + math.log(sum(math.exp(v - m) for v in row)) - row[label])
        right += int(np.argmax(row) == label)
    np.testing.assert_allclose(res["loss"], sum(losses) / len(losses), rtol=1e-10)
    assert res["accuracy"] == right / 10


# ---- bad inputs --------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def model32():
    return small_model()


@pytest.mark.parametrize("call", ["predict", "predict_logits", "evaluate"])
@pytest.mark.parametrize("batch_size", [0, -1, 2.0, True])
def test_a_bad_batch_size_is_refused_by_name(model32, call, batch_size):
    args = (_x(), np.zeros(2, np.int64)) if call == "evaluate" else (_x(),)
    owner = "evaluate" if call == "evaluate" else "predict"
    with pytest.raises(ValueError, match=rf"Sequential\.{owner}: batch_size must be a positive "
                                         rf"integer\. Received batch_size={batch_size!r}"):
        getattr(model32, call)(*args, batch_size=batch_size)


def _x(n=2, shape=(1, 8, 8), dtype=np.float32):
    return np.zeros((n, *shape), dtype=dtype)


@pytest.mark.parametrize("call", ["predict", "evaluate", "loss"])
def test_wrong_input_shape(model32, call):
    x = _x(shape=(1, 9, 8))
    with pytest.raises(ValueError, match=r"Received shape \(2, 1, 9, 8\)"):
        _run(model32, call, x, np.array([0, 1]))
    with pytest.raises(ValueError, match=r"Received shape \(2, 64\)"):
        _run(model32, call, np.zeros((2, 64), np.float32), np.array([0, 1]))
    with pytest.raises(ValueError, match=r"Received shape \(1, 8, 8\)"):  # batch axis missing
        _run(model32, call, np.zeros((1, 8, 8), np.float32), np.array([0]))


def _run(model, call, x, y):
    if call == "predict":
        return model.predict(x)
    if call == "evaluate":
        return model.evaluate(x, y)
    model.check_inputs(x, y)


@pytest.mark.parametrize("call", ["predict", "evaluate", "loss"])
@pytest.mark.parametrize("dtype", [np.float64, np.uint8, np.int64])
def test_wrong_input_dtype(model32, call, dtype):
    with pytest.raises(TypeError, match=np.dtype(dtype).name):
        _run(model32, call, _x(dtype=dtype), np.array([0, 1]))


def test_float32_input_into_float64_model():
    with pytest.raises(TypeError, match="float32"):
        small_model(dtype=np.float64).predict(_x())


def test_non_array_input(model32):
    with pytest.raises(TypeError, match="list"):
        model32.predict([[0.0] * 64])


@pytest.mark.parametrize("labels, match", [
    ([0, 10], r"label 10\b"), ([-1, 0], "label -1"), ([4, 1], r"label 4\b"),
])
def test_labels_out_of_range(model32, labels, match):
    with pytest.raises(ValueError, match=match):
        model32.evaluate(_x(), np.array(labels))


@pytest.mark.parametrize("labels, match", [
    (np.array([0.0, 1.0]), "float64"), (np.array([0.5, 1.0], np.float32), "float32"),
    (np.array([True, False]), "bool"), (np.array(["a", "b"]), "U1"),
])
def test_non_integer_labels(model32, labels, match):
    with pytest.raises(TypeError, match=match):
        model32.evaluate(_x(), labels)


def test_label_shape_mismatch(model32):
    with pytest.raises(ValueError, match=r"Received shape \(3,\)"):
        model32.evaluate(_x(), np.array([0, 1, 2]))
    with pytest.raises(ValueError, match=r"Received shape \(2, 1\)"):
        model32.evaluate(_x(), np.array([[0], [1]]))


@pytest.mark.parametrize("call", ["predict", "evaluate"])
def test_empty_batch(model32, call):
    with pytest.raises(ValueError, match="N=0"):
        _run(model32, call, _x(n=0), np.zeros(0, dtype=np.int64))


def test_fused_layer_runs_on_a_fusing_backend():
    """On a backend that fuses (numba), a Conv2D, ReLU, MaxPool2D run is one
    ``conv2d_relu_maxpool2d_*`` op and a ReLU, MaxPool2D pair (not after a conv) one
    ``maxpool2d_relu_*`` op; other layers run alone. The loss and gradients equal the
    layer-by-layer pass of the NumPy backend (which fuses nothing)."""
    from collections import Counter

    from cnn.backends.numba import NumbaBackend

    calls = Counter()
    counted = ["conv2d_forward", "relu_forward", "maxpool2d_forward", "maxpool2d_relu_forward",
               "maxpool2d_relu_backward", "conv2d_relu_maxpool2d_forward",
               "conv2d_relu_maxpool2d_backward"]

    def counting(name):
        def op(self, *a, **k):
            calls[name] += 1
            return getattr(NumbaBackend, name)(self, *a, **k)
        return op

    Counting = type("Counting", (NumbaBackend,), {n: counting(n) for n in counted})
    spec = [{"type": "conv2d", "filters": 16, "kernel_size": 3, "activation": "relu"},
            {"type": "maxpool2d", "pool_size": 2},                      # conv, ReLU, pool
            {"type": "conv2d", "filters": 16, "kernel_size": 3, "activation": "relu"},
            {"type": "maxpool2d", "pool_size": 2, "stride": 1},         # conv, ReLU, pool
            {"type": "conv2d", "filters": 4, "kernel_size": 2, "activation": "relu"},
            {"type": "relu"}, {"type": "maxpool2d", "pool_size": 1},   # conv; ReLU; ReLU, pool
            {"type": "flatten"}, {"type": "dense", "units": 5, "activation": "relu"},
            {"type": "dense", "units": 3}]
    model = Sequential.from_spec(spec, input_shape=(2, 14, 13), dtype=np.float64, seed=4)
    rng = np.random.default_rng(2)
    x, y = rng.standard_normal((5, 2, 14, 13)), rng.integers(0, 3, 5)
    loss, correct, grads = model.loss_and_grads(x, y, backend=Counting())
    assert calls == {"conv2d_relu_maxpool2d_forward": 2, "conv2d_relu_maxpool2d_backward": 2,
                     "conv2d_forward": 1, "relu_forward": 2, "maxpool2d_relu_forward": 1,
                     "maxpool2d_relu_backward": 1}
    ref_loss, ref_correct, ref_grads = model.loss_and_grads(x, y, backend="numpy")
    assert float(loss) == pytest.approx(float(ref_loss), rel=1e-13)
    assert int(correct) == int(ref_correct)
    assert grads.keys() == ref_grads.keys()
    for k, g in ref_grads.items():
        np.testing.assert_allclose(grads[k], g, rtol=1e-10, atol=1e-13)
