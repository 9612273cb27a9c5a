"""The plan (cnn/plan.py): a backend's fusions decide which runs of layers execute as one op, the
model walks the ops. Checked by the backend ops one CIFAR training step calls on Numba (fused,
and with the fusions switched off: the layer list), by a fusion that refuses a configuration,
and by a block layer whose branch is planned, and fused, like the model's own list."""
from __future__ import annotations

import pickle
import threading

import numpy as np
import pytest

from cnn.backends import get_backend
from cnn.backends.base import Backend
from cnn.backends.fusion import ReluMaxPool
from cnn.backends.numba import NumbaBackend
from cnn.context import StepContext, Workspace
from cnn.layers import Layer
from cnn.model import Sequential, build_model
from cnn.plan import FusedOp, LayerOp, plan_layers
from cnn.presets import get_preset

#: the ops of the contract a pass may call (not memory, loss or optimizer ops)
LAYER_OPS = [name for name in vars(Backend) if name.endswith(("_forward", "_backward"))]


def recording(base: type, **attrs):
    """An instance of a subclass of ``base`` that records ``(op, workspace scope, need_dx)``
    for each call of a layer op; ``attrs`` override class attributes (``fusions``)."""
    calls = []

    def wrap(name):
        def op(self, *args, **kwargs):
            ws = kwargs.get("ws")
            calls.append((name, None if ws is None else ws.prefix, kwargs.get("need_dx")))
            return getattr(base, name)(self, *args, **kwargs)
        return op

    cls = type(f"Recording{base.__name__}", (base,),
               {**{n: wrap(n) for n in LAYER_OPS}, **attrs})
    return cls(), calls


def cifar_step(backend, on_grads=None):
    """One training step of the CIFAR preset (float64, kernel penalties on every conv) on
    ``backend``, with a workspace as training uses."""
    spec = get_preset("cifar_tutorial")
    layers = [{**entry, "kernel_regularizer": {"l1": 1e-3, "l2": 1e-2}}
              if entry["type"] == "conv2d" else entry for entry in spec["layers"]]
    model = build_model({**spec, "layers": layers}, dtype=np.float64, seed=3)
    rng = np.random.default_rng(5)
    x, y = rng.standard_normal((4, 3, 32, 32)), rng.integers(0, 10, 4)
    ctx = StepContext(training=True, workspace=Workspace(backend))
    return model.loss_and_grads(x, y, backend=backend, ctx=ctx, on_grads=on_grads,
                                loss_scale=0.5)


def test_cifar_step_on_numba_calls_the_fused_ops_with_the_layers_workspaces():
    """A Conv2D, ReLU, MaxPool2D run is one ``conv2d_relu_maxpool2d_*`` call in the conv's
    workspace scope, the first layer's backward skips ``dx``; without the fusions every layer
    calls its own op. Both give the same loss and gradients (penalties included), and
    ``on_grads`` gets each layer's gradients once, last layer first, either way."""
    fused_be, fused = recording(NumbaBackend)
    fused_order = []
    loss, _, grads = cifar_step(fused_be, lambda g: fused_order.append(sorted(g)))
    assert fused == [
        ("conv2d_relu_maxpool2d_forward", "conv2d/", None),
        ("conv2d_relu_maxpool2d_forward", "conv2d_1/", None),
        ("conv2d_forward", "conv2d_2/", None), ("relu_forward", "relu_2/", None),
        ("dense_forward", "dense/", None), ("relu_forward", "relu_3/", None),
        ("dense_forward", "dense_1/", None),
        ("dense_backward", "dense_1/", True), ("relu_backward", "relu_3/", None),
        ("dense_backward", "dense/", True), ("relu_backward", "relu_2/", None),
        ("conv2d_backward", "conv2d_2/", True),
        ("conv2d_relu_maxpool2d_backward", "conv2d_1/", True),
        ("conv2d_relu_maxpool2d_backward", "conv2d/", False)]

    layer_be, by_layer = recording(NumbaBackend, fusions=())
    layer_order = []
    ref_loss, _, ref_grads = cifar_step(layer_be, lambda g: layer_order.append(sorted(g)))
    forward = [(op, scope) for op, scope, _ in by_layer if op.endswith("_forward")]
    assert forward == [("conv2d_forward", "conv2d/"), ("relu_forward", "relu/"),
                       ("maxpool2d_forward", "maxpool2d/"), ("conv2d_forward", "conv2d_1/"),
                       ("relu_forward", "relu_1/"), ("maxpool2d_forward", "maxpool2d_1/"),
                       ("conv2d_forward", "conv2d_2/"), ("relu_forward", "relu_2/"),
                       ("dense_forward", "dense/"), ("relu_forward", "relu_3/"),
                       ("dense_forward", "dense_1/")]
    assert by_layer[-1] == ("conv2d_backward", "conv2d/", False)

    assert float(loss) == pytest.approx(float(ref_loss), rel=1e-13)
    assert grads.keys() == ref_grads.keys()
    for key, g in ref_grads.items():
        np.testing.assert_allclose(grads[key], g, rtol=1e-10, atol=1e-13, err_msg=key)
    expected = [[f"{layer}.b", f"{layer}.w"]
                for layer in ("dense_1", "dense", "conv2d_2", "conv2d_1", "conv2d")]
    assert fused_order == layer_order == expected


def test_plans_are_built_once_per_backend():
    model = build_model("cifar_tutorial")
    numba = get_backend("numba")
    assert model.plan(numba) is model.plan("numba")
    assert [type(op) for op in model.plan(numba)] == [FusedOp, FusedOp] + [LayerOp] * 6
    assert [type(op) for op in model.plan("numpy")] == [LayerOp] * len(model.layers)


def test_a_fusion_that_refuses_a_configuration_leaves_the_layers_alone():
    """A fusion's ``matches`` sees the layers' configuration: one that takes only 2 x 2
    pooling leaves a ReLU before a 3 x 3 pooling to run as two ops."""
    class TwoByTwoOnly(ReluMaxPool):
        def matches(self, layers):
            return super().matches(layers) and layers[1].pool_size == 2

    be = type("Picky", (NumbaBackend,), {"fusions": (TwoByTwoOnly(),)})()
    model = Sequential.from_spec([{"type": "relu"}, {"type": "maxpool2d", "pool_size": 3},
                                  {"type": "relu"}, {"type": "maxpool2d", "pool_size": 2},
                                  {"type": "flatten"}, {"type": "dense", "units": 2}],
                                 input_shape=(1, 12, 12))
    assert [[layer.name for layer in op.layers] for op in model.plan(be)] == [
        ["relu"], ["maxpool2d"], ["relu_1", "maxpool2d_1"], ["flatten"], ["dense"]]


def test_a_model_planned_on_an_unpicklable_backend_still_pickles():
    """Plans hold their backend; a model sent to another process leaves them behind (and
    plans again there)."""
    be = type("Locked", (NumbaBackend,), {})()
    be.lock = threading.Lock()
    model = build_model("mnist_small")
    model.plan(be)
    copy = pickle.loads(pickle.dumps(model))
    x = np.random.default_rng(0).standard_normal((2, 1, 28, 28)).astype(np.float32)
    np.testing.assert_array_equal(copy.forward(x, backend=be)[0], model.forward(x, backend=be)[0])


# ---- a layer holding layers of its own --------------------------------------------------------
class _ResidualOp:
    """``main(x) + x``, the branch run by its own plan."""

    def __init__(self, block, ops):
        self.layers, self.ops = (block,), ops

    def forward(self, params, x, ctx):
        h, caches = x, []
        for op in self.ops:
            h, cache = op.forward(params, h, ctx)
            caches.append(cache)
        return h + x, caches

    def backward(self, params, dout, caches, ctx, need_dx):
        d, grads = dout, {}
        for op, cache in zip(self.ops[::-1], caches[::-1]):
            d, op_grads = op.backward(params, d, cache, ctx, need_dx=True)
            grads.update(op_grads)
        return d + dout, grads


class _Residual(Layer):
    """A bare residual block (identity shortcut) for this test: its layers are named
    ``<block>.<layer>``, so their parameters' keys in the model are those their ops return."""

    type = "residual"

    def __init__(self, main, name=None):
        super().__init__(name)
        self.main = main

    def build(self, input_shape):
        shape = input_shape
        for i, layer in enumerate(self.main):
            layer.name = f"{self.name}.{layer.type}_{i}"
            shape = layer.build(shape)
        assert shape == tuple(input_shape)
        self.param_names = tuple(f"{layer.name.split('.', 1)[1]}.{p}"
                                 for layer in self.main for p in layer.param_names)
        return super().build(input_shape)

    def init_params(self, rng, dtype):
        return {f"{layer.name.split('.', 1)[1]}.{p}": v for layer in self.main
                for p, v in layer.init_params(rng, dtype).items()}

    def plan_op(self, backend):
        return _ResidualOp(self, plan_layers(self.main, backend))


def test_a_block_plans_its_branch_and_the_backend_fuses_inside_it():
    """The plan recurses through ``Layer.plan_op``: a Conv2D, ReLU, MaxPool2D run inside a
    block's branch is one fused op on Numba, and the block's loss and gradients equal the
    layer-by-layer pass of the NumPy backend, with no change to the model."""
    from cnn.layers import layers_from_spec

    def model():
        main = layers_from_spec([{"type": "conv2d", "filters": 16, "kernel_size": 3,
                                  "padding": "same", "activation": "relu"},
                                 {"type": "maxpool2d", "pool_size": 1}])
        head = layers_from_spec([{"type": "conv2d", "filters": 16, "kernel_size": 3,
                                  "padding": "same"}])
        tail = layers_from_spec([{"type": "flatten"}, {"type": "dense", "units": 3}])
        return Sequential(head + [_Residual(main, name="block")] + tail, (2, 6, 6),
                          dtype=np.float64, seed=1)

    be, calls = recording(NumbaBackend)
    fused_model = model()
    block_op = fused_model.plan(be)[1]
    assert [type(op) for op in block_op.ops] == [FusedOp]
    rng = np.random.default_rng(4)
    x, y = rng.standard_normal((3, 2, 6, 6)), rng.integers(0, 3, 3)
    loss, _, grads = fused_model.loss_and_grads(x, y, backend=be)
    assert ("conv2d_relu_maxpool2d_forward", None, None) in calls
    ref_loss, _, ref_grads = model().loss_and_grads(x, y, backend="numpy")
    assert float(loss) == pytest.approx(float(ref_loss), rel=1e-13)
    assert grads.keys() == ref_grads.keys() == fused_model.params.keys()
    for key, g in ref_grads.items():
        np.testing.assert_allclose(grads[key], g, rtol=1e-10, atol=1e-13, err_msg=key)

