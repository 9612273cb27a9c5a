"""Residual networks in the spec (issue 20): residual blocks (identity, option A ``pad`` and
option B layer shortcuts, nesting), ``globalavgpool2d``, ``use_bias=False``, explicit conv
padding, the frameworks' default initialisers, the ResNet presets; their names, shapes, errors,
summary and files; and their gradients against central finite differences in float64 and the
naive loops, on the NumPy and Numba backends, with workspaces.

References are independent of the code under test: finite differences of the loss, the naive
backend's loops, parameter counts worked out from the paper's architecture, PyTorch's own
initialisers. The Keras and PyTorch models built from the same spec are in
tests/test_resnet_references.py.
"""
from __future__ import annotations

import math

import numpy as np
import pytest

from cnn.backends import get_backend
from cnn.backends.numpy import NumpyBackend
from cnn.context import StepContext, Workspace
from cnn.layers import Conv2D, Dense, GlobalAvgPool2D, Residual, ResidualOp, ShortcutPad
from cnn.model import Sequential, build_model
from cnn.plan import FusedOp, LayerOp, backward_ops
from cnn.presets import get_preset
from parallel_helpers import RESNET_SPEC, blobs, build
from test_layer_ops import assert_fd, numeric_grad
from test_workspace import traced_peak


def conv(filters, stride=1, **kw):
    return {"type": "conv2d", "filters": filters, "kernel_size": 3, "stride": stride,
            "padding": 1, "use_bias": False, **kw}


BN = {"type": "batchnorm", "momentum": 0.9, "epsilon": 1e-5}


def block(filters, stride=1, shortcut="identity", **kw):
    return {"type": "residual", "layers": [conv(filters, stride), BN, {"type": "relu"},
                                           conv(filters), BN],
            "shortcut": shortcut, "activation": "relu", **kw}


# ---- the spec -----------------------------------------------------------------------------------
def test_blocks_name_their_layers_and_round_trip_through_the_spec():
    model = build("resnet")
    names = [layer.name for layer in model.leaves]
    assert names[:4] == ["conv2d", "batchnorm", "relu", "residual/conv2d"]
    assert "residual/residual/conv2d" in names  # a block inside a block
    assert "residual_1/shortcut" in names  # option A
    assert ["residual_2/shortcut/conv2d", "residual_2/shortcut/batchnorm"] == names[-4:-2]
    assert list(model.params)[:4] == ["conv2d.w", "batchnorm.gamma", "batchnorm.beta",
                                      "residual/conv2d.w"]
    assert "residual/residual/conv2d.b" in model.params  # the inner conv keeps its bias
    assert "residual_2/shortcut/batchnorm.running_var" in model.buffers
    assert model.leaves[names.index("residual/residual/conv2d")] is model.layers[3].main[3].main[0]
    again = Sequential.from_spec(model.spec(), dtype=np.float64, seed=3)
    assert again.spec() == model.spec()
    for k, v in model.get_weights().items():
        np.testing.assert_array_equal(again.get_weights()[k], v, err_msg=k)
    top = model.spec()["layers"][5]
    assert top["shortcut"][0]["name"] == "conv2d" and top["layers"][0]["name"] == "conv2d"


def test_named_blocks_and_layers_keep_their_names():
    model = Sequential.from_spec([conv(2), {**block(2), "name": "stage1_block1"},
                                  {"type": "residual", "name": "b", "layers": [
                                      {**conv(2), "name": "first"}, BN]},
                                  {"type": "globalavgpool2d"}, {"type": "dense", "units": 3}],
                                 input_shape=(2, 4, 4))
    assert "stage1_block1/conv2d_1.w" in model.params and "b/first.w" in model.params
    assert model.spec()["layers"][2]["layers"][0]["name"] == "first"


def test_the_pad_shortcut_infers_stride_and_zero_channels():
    model = Sequential.from_spec([conv(4), block(8, 2, "pad"), block(13, 2, "pad"),
                                  {"type": "globalavgpool2d"}, {"type": "dense", "units": 2}],
                                 input_shape=(3, 7, 7))
    pads = [layer for layer in model.leaves if isinstance(layer, ShortcutPad)]
    assert [(p.stride, p.channels_before, p.channels_after) for p in pads] == [(2, 2, 2),
                                                                               (2, 2, 3)]
    assert [p.output_shape for p in pads] == [(8, 4, 4), (13, 2, 2)]  # ceil(7 / 2), ceil(4 / 2)


@pytest.mark.parametrize("layers, match", [
    ([conv(4), block(8, 2)], r"residual 'residual': its main branch maps \(4, 8, 8\) to "
                             r"\(8, 4, 4\) and its shortcut \(identity\) to \(4, 8, 8\).*'pad'"),
    ([conv(8), block(4, 1, "pad")], r"cannot map its input \(8, 8, 8\) to .*\(4, 8, 8\)"),
    ([conv(4), {"type": "residual", "layers": [
        {"type": "conv2d", "filters": 8, "kernel_size": 2}], "shortcut": "pad"}],
     r"cannot map its input \(4, 8, 8\) to the main branch's output \(8, 7, 7\)"),
    ([conv(4), block(8, 2, [{"type": "conv2d", "filters": 8, "kernel_size": 1}])],
     r"its shortcut \(layers\) to \(8, 8, 8\)"),
    ([conv(4), block(4, 1, "projection")], r"shortcut must be one of \['identity', 'pad'\]"),
    ([conv(4), block(4, 1, [])], "non-empty list of layers. Received shortcut=\\[\\]"),
    ([conv(4), {**block(4), "activation": "tanh"}], "activation must be one of"),
    ([conv(4), {"type": "residual", "layers": []}], "layers must be a non-empty list"),
    ([conv(4), {"type": "residual", "layers": [{"type": "bogus"}]}],
     "Residual: layers: layer 0: unknown layer type 'bogus'"),
    ([conv(4), {"type": "residual", "layers": [{**conv(4), "name": "a/b"}]}],
     "Received name='a/b'"),
    ([conv(4), {"type": "residual", "layers": [{**conv(4), "name": "c"}, {**conv(4), "name": "c"}]}],
     "two layers are named 'residual/c'"),
    # a main layer called "shortcut" and option B's shortcut layers would share names
    ([conv(4), {"type": "residual", "name": "b", "layers": [
        {"type": "residual", "name": "shortcut", "layers": [conv(4)]}], "shortcut": [conv(4)]}],
     "two layers are named 'b/shortcut/conv2d'"),
    ([{"type": "flatten"}, {"type": "residual", "layers": [{"type": "dense", "units": 192}],
                            "shortcut": "pad"}], r"expects \(C, H, W\) inputs"),
    ([conv(4), {"type": "globalavgpool2d"}, {"type": "globalavgpool2d"}],
     r"globalavgpool2d 'globalavgpool2d_1' expects \(C, H, W\)"),
    ([{**conv(4), "padding": -1}], "padding must be a non-negative integer. Received padding=-1"),
    ([{**conv(4), "padding": [1, 2, 3]}], r"Received padding=\[1, 2, 3\]"),
    ([{**conv(4), "use_bias": 0}], "use_bias must be True or False. Received use_bias=0"),
    ([{**conv(4), "kernel_initializer": "lecun"}], "unknown kernel_initializer 'lecun'"),
])
def test_bad_blocks_are_refused_naming_what_does_not_fit(layers, match):
    with pytest.raises(ValueError, match=match):
        Sequential.from_spec(layers + [{"type": "flatten"}, {"type": "dense", "units": 2}],
                             input_shape=(3, 8, 8))


def test_a_dense_residual_block_on_flat_inputs():
    model = Sequential.from_spec([{"type": "dense", "units": 5},
                                  {"type": "residual", "layers": [
                                      {"type": "dense", "units": 5, "activation": "tanh"}]},
                                  {"type": "dense", "units": 3}], input_shape=(4,),
                                 dtype=np.float64)
    x = np.random.default_rng(0).standard_normal((3, 4))
    h = x @ model.params["dense.w"] + model.params["dense.b"]
    h = h + np.tanh(h @ model.params["residual/dense.w"] + model.params["residual/dense.b"])
    np.testing.assert_allclose(model.predict_logits(x),
                               h @ model.params["dense_1.w"] + model.params["dense_1.b"],
                               rtol=1e-13)


def test_summary_shows_the_blocks_and_their_layers():
    text = build("resnet").summary()
    lines = text.splitlines()
    row = next(line for line in lines if line.startswith("residual_2 "))
    assert row.split()[1:] == ["residual", "(8,", "2,", "2)", "512", "32"]
    inner = next(line for line in lines if line.strip().startswith("residual/residual/conv2d"))
    assert inner.startswith("    residual/residual/conv2d") and inner.split()[-2:] == ["148", "0"]
    assert any(line.startswith("  residual_1/shortcut ") and "shortcut_pad" in line
               for line in lines)
    assert "total parameters: 1,590" in text
    assert "buffers (non-trained): 80 in 14 arrays (running_mean x7, running_var x7)" in text


def test_weights_files_keep_the_block_keys(tmp_path):
    model = build("resnet")
    for i, v in enumerate({**model.params, **model.buffers}.values()):
        v[...] = np.random.default_rng(i).uniform(0.5, 1.5, v.shape)
    path = model.save_weights(tmp_path / "w")
    with np.load(path) as f:
        assert "residual_2/shortcut/batchnorm.running_var" in f.files
    other = build("resnet", seed=9)
    other.load_weights(path)
    for k, v in model.get_weights().items():
        np.testing.assert_array_equal(other.get_weights()[k], v, err_msg=k)


# ---- new options ----------------------------------------------------------------------------------
def test_use_bias_false_has_no_bias_and_is_not_fused():
    """No ``b`` parameter; on Numba a conv without bias before ReLU and pooling runs as an op of
    its own (the fused conv op adds a bias) and gives the loop reference's loss and gradients."""
    spec = [{"type": "conv2d", "filters": 16, "kernel_size": 3, "use_bias": False,
             "activation": "relu"}, {"type": "maxpool2d"}, {"type": "flatten"},
            {"type": "dense", "units": 3, "use_bias": False}]
    model = Sequential.from_spec(spec, input_shape=(2, 6, 6), dtype=np.float64, seed=1)
    assert list(model.params) == ["conv2d.w", "dense.w"]
    ops = model.plan("numba")
    assert [[layer.name for layer in op.layers] for op in ops] == [
        ["conv2d"], ["relu", "maxpool2d"], ["flatten"], ["dense"]]  # the ReLU and pooling fuse
    assert type(ops[0]) is LayerOp
    with_bias = Sequential.from_spec([{k: v for k, v in e.items() if k != "use_bias"}
                                      for e in spec], input_shape=(2, 6, 6))
    assert type(with_bias.plan("numba")[0]) is FusedOp
    rng = np.random.default_rng(2)
    x, y = rng.standard_normal((4, 2, 6, 6)), rng.integers(0, 3, 4)
    ctx = StepContext(training=True, workspace=Workspace(get_backend("numba")))
    ref = model.loss_and_grads(x, y, backend="naive")
    for _ in range(2):  # the zero bias comes from the workspace, reused
        loss, _, grads = model.loss_and_grads(x, y, backend="numba", ctx=ctx)
        assert float(loss) == pytest.approx(float(ref[0]), rel=1e-13)
        assert grads.keys() == ref[2].keys()
        for k in grads:
            np.testing.assert_allclose(grads[k], ref[2][k], rtol=1e-11, atol=1e-13)


def test_explicit_padding_is_symmetric_where_same_is_not():
    """A strided 3x3 conv: ``padding=1`` pads top and bottom (PyTorch, the ResNet paper's
    Torch code), ``'same'`` only the bottom (TensorFlow); both give 4x4 from 8x8."""
    ours = Conv2D(2, 3, stride=2, padding=1)
    same = Conv2D(2, 3, stride=2, padding="same")
    assert ours.build((1, 8, 8)) == same.build((1, 8, 8)) == (2, 4, 4)
    assert ours.pads == ((1, 1), (1, 1)) and same.pads == ((0, 1), (0, 1))
    pair = Conv2D(2, 3, padding=[0, 2])
    assert pair.build((1, 5, 5)) == (2, 3, 7) and pair.config()["padding"] == [0, 2]


def test_frameworks_default_initialisers():
    """``keras_default`` is glorot_uniform (the same draws); ``torch_default`` is PyTorch's
    ``Conv2d``/``Linear`` initialisation, ``U(-1/sqrt(fan_in), 1/sqrt(fan_in))`` for the
    kernel and the bias alike (compared with PyTorch's own draws); ``he_normal`` is an
    untruncated normal of variance 2 / fan_in (PyTorch's kaiming_normal_; Keras truncates)."""
    def init(cls, initializer, shape, **kw):
        layer = cls(kernel_initializer=initializer, **kw)
        layer.build(shape)
        return layer.init_params(np.random.default_rng(0), np.float64)

    glorot = init(Conv2D, "glorot_uniform", (8, 9, 9), filters=16)
    keras = init(Conv2D, "keras_default", (8, 9, 9), filters=16)
    np.testing.assert_array_equal(glorot["w"], keras["w"])
    assert not keras["b"].any()

    torch = pytest.importorskip("torch")
    for cls, kw, shape, reference in [
            (Conv2D, {"filters": 256}, (64, 9, 9), lambda: torch.nn.Conv2d(64, 256, 3)),
            (Dense, {"units": 512}, (300,), lambda: torch.nn.Linear(300, 512))]:
        ours = init(cls, "torch_default", shape, **kw)
        theirs = reference()
        # PyTorch's bound, read off its 150k-value kernel, holds for its bias too
        bound = float(theirs.weight.detach().abs().max())
        for name, tensor in (("w", theirs.weight), ("b", theirs.bias)):
            mine, ref = ours[name].ravel(), tensor.detach().numpy().ravel().astype(np.float64)
            assert np.abs(mine).max() <= bound * 1.001 and np.abs(ref).max() <= bound
            assert np.abs(mine).max() > 0.98 * bound
            assert np.std(mine) == pytest.approx(np.std(ref), rel=0.15), (cls, name)

    he = init(Conv2D, "he_normal", (32, 9, 9), filters=64)["w"]
    sigma = math.sqrt(2 / (32 * 9))
    assert np.std(he) == pytest.approx(sigma, rel=0.02)
    assert np.abs(he).max() > 3 * sigma  # no truncation at 2 sigma


def test_globalavgpool2d_layer():
    layer = GlobalAvgPool2D()
    assert layer.build((5, 3, 4)) == (5,)
    x = np.random.default_rng(0).standard_normal((2, 5, 3, 4))
    out, _ = layer.forward({}, x, get_backend("numpy"), StepContext())
    np.testing.assert_allclose(out, x.mean(axis=(2, 3)), rtol=1e-15)


# ---- presets ------------------------------------------------------------------------------------
def resnet_parameters(n):
    """Parameters of the paper's CIFAR ResNet with 6 n + 2 layers, counted from its
    description: convs without bias, batch norm (gamma, beta) after each, one dense layer."""
    total = 3 * 16 * 9 + 2 * 16  # the first conv and its batch norm
    channels = 16
    for filters in (16, 32, 64):
        for _ in range(n):
            total += channels * filters * 9 + filters * filters * 9 + 4 * filters
            channels = filters
    return total + 64 * 10 + 10


@pytest.mark.parametrize("name, n, weighted", [("cifar_resnet20", 3, 20),
                                               ("cifar_resnet56", 9, 56)])
def test_resnet_presets_are_the_papers_networks(name, n, weighted):
    model = build_model(name)
    print(f"{name}: {model.num_params:,} parameters")
    assert model.num_params == resnet_parameters(n)
    if name == "cifar_resnet20":
        assert model.num_params == 269_722  # "0.27M" in the paper's table 6
    convs = [layer for layer in model.leaves if isinstance(layer, Conv2D)]
    dense = [layer for layer in model.leaves if isinstance(layer, Dense)]
    assert len(convs) + len(dense) == weighted and len(dense) == 1
    assert not any(c.use_bias for c in convs) and dense[0].use_bias
    kinds = [layer.type for layer in model.leaves]
    assert all(kinds[i + 1] == "batchnorm" for i, k in enumerate(kinds) if k == "conv2d")
    blocks = [layer for layer in model.layers if isinstance(layer, Residual)]
    assert len(blocks) == 3 * n and all(b.activation == "relu" for b in blocks)
    assert [b.shortcut for b in blocks].count("pad") == 2
    assert [b.output_shape for b in blocks[::n]] == [(16, 32, 32), (32, 16, 16), (64, 8, 8)]
    assert blocks[n].name == "stage2_block1" and blocks[n].main[0].stride == 2
    assert all(c.pads == ((1, 1), (1, 1)) for c in convs)
    preset = get_preset(name)
    assert preset["batch_size"] == 128
    assert preset["optimizer"] == {"type": "sgd", "lr": 0.1, "momentum": 0.9,
                                   "weight_decay": 1e-4, "weight_decay_mode": "coupled"}
    assert {(b.momentum, b.epsilon) for b in model.leaves if b.type == "batchnorm"} == {(0.9, 1e-5)}


# ---- gradients against finite differences ---------------------------------------------------------
class KinkMargin(NumpyBackend):
    """The NumPy backend, recording the smallest |input| of every ReLU (after a block's sum
    too): a finite difference across the kink at 0 would be meaningless."""

    name = "numpy_kinks"

    def __init__(self):
        self.margin = np.inf

    def relu_forward(self, x, ws=None):
        self.margin = min(self.margin, float(np.abs(x).min()))
        return super().relu_forward(x, ws)

    def residual_add_forward(self, main, shortcut, relu, ws=None):
        if relu:
            self.margin = min(self.margin, float(np.abs(main + shortcut).min()))
        return super().residual_add_forward(main, shortcut, relu, ws)


#: the distance every ReLU input keeps from 0: far more than a step of the differences moves it
MARGIN = 1e-3
BLOCKS = {
    "identity": [conv(3), BN, {"type": "relu"}, block(3)],
    "pad": [conv(2), BN, block(4, 2, "pad")],
    "option_b": [conv(2, use_bias=True), block(4, 2, [conv(4, 2), BN])],
    "nested_linear": [conv(3), {"type": "residual", "layers": [
        conv(3), BN, {"type": "residual", "layers": [conv(3)], "activation": "relu"}, conv(3)]}],
}


@pytest.mark.parametrize("name", list(BLOCKS))
@pytest.mark.parametrize("training", [True, False])
def test_block_gradients_vs_finite_differences(name, training):
    """Every parameter's gradient and the input's, through a whole block (batch norm inside,
    in training mode through the batch statistics), against central differences."""
    model = Sequential.from_spec(BLOCKS[name] + [{"type": "globalavgpool2d"},
                                                 {"type": "dense", "units": 3}],
                                 input_shape=(2, 5, 5), dtype=np.float64, seed=4)
    r = np.random.default_rng(14)
    for k, v in model.buffers.items():
        v[...] = r.uniform(0.5, 1.5, v.shape) if k.endswith("var") else r.standard_normal(v.shape)
    be = KinkMargin()
    for seed in range(100):  # inputs whose every ReLU input keeps a margin from the kink
        r = np.random.default_rng(seed)
        x, y = r.standard_normal((4, 2, 5, 5)), r.integers(0, 3, 4)
        be.margin = np.inf
        _, _, grads = model.loss_and_grads(x, y, backend=be, ctx=StepContext(training=training))
        if be.margin > MARGIN:
            break
    assert be.margin > MARGIN, be.margin

    def loss():
        return float(model.loss_and_grads(x, y, backend=be,
                                          ctx=StepContext(training=training))[0])
    assert set(grads) == set(model.params)
    scale = max(float(np.abs(g).max()) for g in grads.values())
    for key, p in model.params.items():
        assert_fd(grads[key], numeric_grad(loss, p), f"{name} {key}", scale)
    # the input's gradient: the chain of backwards carried below the first layer
    ctx = StepContext(training=training)
    logits, caches = model.forward(x, backend=be, ctx=ctx)
    _, dlogits, _ = model.loss(logits, y, be)
    dx, _ = backward_ops(model.plan(be), {**model.params, **model.buffers}, dlogits, caches,
                         ctx, need_dx=True)
    assert_fd(dx, numeric_grad(loss, x), f"{name} input gradient", scale)


# ---- backends and workspaces -----------------------------------------------------------------------
@pytest.mark.parametrize("backend", ["numpy", "numba"])
@pytest.mark.parametrize("dtype, tol", [(np.float64, 1e-11), (np.float32, 2e-4)])
def test_resnet_step_equals_the_naive_loops(backend, dtype, tol):
    """A training step of the test ResNet (with a workspace, twice) against the loops."""
    model = build("resnet", dtype=dtype)
    x, y = blobs(6, dtype, channels=3)
    ref_model = build("resnet", dtype=np.float64)
    ref_loss, _, ref = ref_model.loss_and_grads(x.astype(np.float64), y, backend="naive",
                                                ctx=StepContext(training=True))
    # the inner conv's bias feeds batch norm: its exact gradient is 0, so the floor is the
    # model's gradient scale, not that array's rounding noise
    scale = max(float(np.abs(g).max()) for g in ref.values())
    ctx = StepContext(training=True, workspace=Workspace(get_backend(backend)))
    for _ in range(2):
        loss, _, grads = model.loss_and_grads(x, y, backend=backend, ctx=ctx)
        assert float(loss) == pytest.approx(float(ref_loss), rel=tol)
        for k, g in ref.items():
            assert grads[k].dtype == dtype
            np.testing.assert_allclose(grads[k], g, rtol=tol, atol=tol * scale, err_msg=k)
    assert {k for k in ctx.updates} == set(model.buffers)


def test_blocks_plan_their_branches():
    blocks = [op for op in build("resnet").plan("numba") if isinstance(op, ResidualOp)]
    assert [b.layers[0].name for b in blocks] == ["residual", "residual_1", "residual_2"]
    assert blocks[0].shortcut == ()
    assert [op.layers[0].name for op in blocks[0].main if isinstance(op, ResidualOp)] == [
        "residual/residual"]  # the block inside the block is planned as a block
    assert [op.layers[0].name for op in blocks[2].shortcut] == ["residual_2/shortcut/conv2d",
                                                                "residual_2/shortcut/batchnorm"]


@pytest.mark.parametrize("backend", ["numpy", "numba"])
def test_a_resnet_step_reuses_its_workspace(backend):
    be = get_backend(backend)
    model = build("resnet", dtype=np.float32)
    x, y = blobs(16, np.float32, channels=3)
    ws = Workspace(be)
    ctx = StepContext(training=True, workspace=ws)
    model.loss_and_grads(x, y, backend=be, ctx=ctx)
    first = {k: id(v) for k, v in ws._store.items()}
    model.loss_and_grads(x, y, backend=be, ctx=ctx)
    assert {k: id(v) for k, v in ws._store.items()} == first
    if backend == "numpy":  # and allocates next to nothing besides
        peak = traced_peak(lambda: model.loss_and_grads(x, y, backend=be, ctx=ctx))
        assert peak < 0.1 * ws.nbytes, (peak, ws.nbytes)


def test_prediction_keeps_no_caches():
    """A pass no backward follows drops each op's cache as the next op runs: the same logits,
    and a fraction of the memory of a pass that keeps every conv's columns and every
    activation until the end."""
    model = build_model("cifar_resnet20")
    x = np.random.default_rng(0).standard_normal((8, 3, 32, 32)).astype(np.float32)
    logits, caches = model.forward(x)
    keeping = traced_peak(lambda: model.forward(x))
    dropping = traced_peak(lambda: model.forward(x, keep_caches=False))
    lean, none = model.forward(x, keep_caches=False)
    assert none == [] and len(caches) == len(model.plan())
    np.testing.assert_array_equal(lean, logits)
    assert dropping < 0.5 * keeping, (dropping, keeping)
