"""The training-mode and buffers contract (issue 12): layers see a training flag through the
context; batch norm's running statistics are buffers, kept apart from the parameters (never
seen by the optimizer) but saved, loaded, shown and committed by the strategy after each step;
a pass nobody commits (the JIT warm-up) changes nothing; the loss and the regularisers come
from the spec; bad values are refused naming them."""
from __future__ import annotations

import json

import numpy as np
import pytest

from cnn.backends import get_backend
from cnn.context import StepContext
from cnn.layers import BatchNorm, Dense, Dropout, layers_from_spec
from cnn.model import Sequential, build_model
from cnn.train import _warm_up

SPEC = {"input_shape": [2, 4, 4], "layers": [
    {"type": "conv2d", "filters": 3, "kernel_size": 3, "kernel_regularizer": {"l2": 0.01}},
    {"type": "batchnorm", "momentum": 0.8}, {"type": "relu"}, {"type": "flatten"},
    {"type": "dropout", "rate": 0.25},
    {"type": "dense", "units": 5, "activation": "tanh"}, {"type": "batchnorm"},
    {"type": "dense", "units": 3}]}


def data(n=12, shape=(2, 4, 4), classes=3, seed=0, dtype=np.float64):
    r = np.random.default_rng(seed)
    return r.standard_normal((n, *shape)).astype(dtype), r.integers(0, classes, n)


# ---- params and buffers are kept apart ---------------------------------------------------------
def test_buffers_are_apart_from_params():
    model = build_model(SPEC, seed=0)
    assert set(model.buffers) == {"batchnorm.running_mean", "batchnorm.running_var",
                                  "batchnorm_1.running_mean", "batchnorm_1.running_var"}
    assert not set(model.buffers) & set(model.params)
    assert {"batchnorm.gamma", "batchnorm.beta"} <= set(model.params)
    np.testing.assert_array_equal(model.buffers["batchnorm.running_mean"], np.zeros(3))
    np.testing.assert_array_equal(model.buffers["batchnorm_1.running_var"], np.ones(5))
    assert model.num_buffer_values == 16


def test_summary_shows_buffers_and_loss():
    text = build_model(SPEC, seed=0).summary()
    row = next(line for line in text.splitlines() if line.startswith("batchnorm_1 "))
    assert row.split()[-2:] == ["10", "10"]  # gamma+beta, running mean+var of 5 units
    assert "buffers (non-trained): 16" in text and "batchnorm.running_var" in text
    assert "loss: softmax_cross_entropy" in text


def test_save_and_load_carry_the_buffers(tmp_path):
    model = build_model(SPEC, seed=0)
    for i, v in enumerate(model.buffers.values()):
        v[...] = np.arange(v.size) + 10 * i
    path = model.save_weights(tmp_path / "w.npz")
    with np.load(path) as f:
        spec = json.loads(str(f["__spec__"]))
        assert set(f.files) == {"__spec__", *model.params, *model.buffers}
    other = build_model(spec, seed=1)
    assert other.spec() == model.spec()
    other.load_weights(path)
    for k in model.buffers:
        np.testing.assert_array_equal(other.buffers[k], model.buffers[k])
    for k in model.params:
        np.testing.assert_array_equal(other.params[k], model.params[k])


def test_get_weights_includes_buffers_and_set_weights_accepts_params_alone():
    model = build_model(SPEC, seed=0)
    w = model.get_weights()
    assert set(w) == set(model.params) | set(model.buffers)
    other = build_model(SPEC, seed=5)
    other.buffers["batchnorm.running_mean"][...] = 7
    other.set_weights(model.params)  # parameters only: buffers keep their values
    np.testing.assert_array_equal(other.buffers["batchnorm.running_mean"], 7)
    other.set_weights(w)
    np.testing.assert_array_equal(other.buffers["batchnorm.running_mean"], 0)
    with pytest.raises(ValueError, match="running_mean"):
        other.set_weights({**w, "batchnorm.running_mean": np.zeros(4)})


def test_spec_round_trip_keeps_every_option():
    model = build_model({"loss": "bce", "input_shape": [3], "layers": [
        {"type": "dense", "units": 4, "kernel_regularizer": "l1"},
        {"type": "BatchNormalization", "momentum": 0.9, "epsilon": 1e-5},
        {"type": "dropout", "rate": 0.1}, {"type": "sigmoid"},
        {"type": "dense", "units": 1, "kernel_regularizer": {"l2": 0.5}}]})
    spec = model.spec()
    assert spec["loss"] == "binary_cross_entropy"
    assert spec["layers"][0]["kernel_regularizer"] == {"l1": 0.01, "l2": 0.0}
    assert spec["layers"][1]["momentum"] == 0.9 and spec["layers"][1]["epsilon"] == 1e-5
    assert spec["layers"][2]["rate"] == 0.1
    assert build_model(json.loads(json.dumps(spec))).spec() == spec


# ---- training mode: what a pass reads and leaves ---------------------------------------------
def test_training_pass_leaves_new_statistics_and_writes_no_buffer():
    """Batch norm first: its input is the data, so the expected statistics are NumPy's."""
    model = Sequential([BatchNorm(momentum=0.7), *layers_from_spec([{"type": "flatten"},
                                                                    {"type": "dense", "units": 2}])],
                       (2, 3, 3), dtype=np.float64)
    x, y = data(8, (2, 3, 3), 2)
    before = {k: v.copy() for k, v in model.buffers.items()}
    ctx = StepContext(training=True)
    model.loss_and_grads(x, y, ctx=ctx)
    for k, v in model.buffers.items():
        np.testing.assert_array_equal(v, before[k])  # nothing written
    mean, var = x.mean(axis=(0, 2, 3)), x.var(axis=(0, 2, 3))
    np.testing.assert_allclose(ctx.updates["batchnorm.running_mean"], 0.3 * mean, rtol=1e-13)
    np.testing.assert_allclose(ctx.updates["batchnorm.running_var"], 0.7 + 0.3 * var, rtol=1e-13)
    ctx.commit(model.buffers)
    np.testing.assert_allclose(model.buffers["batchnorm.running_mean"], 0.3 * mean, rtol=1e-13)
    assert not ctx.updates


def test_inference_pass_uses_running_statistics_and_skips_dropout():
    model = Sequential([BatchNorm(epsilon=0.01), Dropout(0.9), *layers_from_spec(
        [{"type": "flatten"}, {"type": "dense", "units": 2}])], (3,), dtype=np.float64)
    model.buffers["batchnorm.running_mean"][...] = [1.0, -2.0, 0.5]
    model.buffers["batchnorm.running_var"][...] = [4.0, 0.25, 1.0]
    model.params["batchnorm.gamma"][...] = [2.0, 1.0, -1.0]
    model.params["batchnorm.beta"][...] = [0.0, 1.0, 3.0]
    x, _ = data(4, (3,))
    h = (x - [1.0, -2.0, 0.5]) / np.sqrt(np.array([4.0, 0.25, 1.0]) + 0.01) * [2, 1, -1] + [0, 1, 3]
    want = h @ model.params["dense.w"] + model.params["dense.b"]
    np.testing.assert_allclose(model.predict_logits(x), want, rtol=1e-13)
    ctx = StepContext()
    model.forward(x, ctx=ctx)
    assert not ctx.updates


def test_dropout_training_pass_is_inverted_dropout():
    layer = Dropout(0.25, name="dropout")
    x = np.ones((200, 50))
    out, _ = layer.forward({}, x, get_backend("numpy"), StepContext(training=True, seed=1))
    assert set(np.unique(out)) == {0.0, 1 / 0.75}
    assert abs((out == 0).mean() - 0.25) < 0.01
    same, _ = Dropout(0.0).forward({}, x, get_backend("numpy"), StepContext(training=True))
    assert same is x


def test_fit_commits_running_statistics_like_the_definition():
    """Two sequential steps on two fixed batches: running = m * running + (1 - m) * batch."""
    m = 0.6
    model = Sequential([BatchNorm(momentum=m), *layers_from_spec([{"type": "flatten"},
                                                                  {"type": "dense", "units": 2}])],
                       (2, 2, 2), dtype=np.float64)
    x, y = data(10, (2, 2, 2), 2)
    model.fit(x, y, epochs=1, batch_size=5, shuffle=False, verbose=0)
    mean, var = np.zeros(2), np.ones(2)
    for b in (x[:5], x[5:]):
        mean = m * mean + (1 - m) * b.mean(axis=(0, 2, 3))
        var = m * var + (1 - m) * b.var(axis=(0, 2, 3))
    np.testing.assert_allclose(model.buffers["batchnorm.running_mean"], mean, rtol=1e-13)
    np.testing.assert_allclose(model.buffers["batchnorm.running_var"], var, rtol=1e-13)


@pytest.mark.parametrize("backend", ["numba", "numpy"])
def test_jit_warm_up_leaves_buffers_and_weights_unchanged(backend):
    be = get_backend(backend)
    model = build_model(SPEC, dtype=np.float64, seed=2)
    x, y = data(6)
    before = model.get_weights()
    params = {k: be.asarray(v) for k, v in model.params.items()}
    _warm_up(model, x, y, params, be)
    for k, v in model.get_weights().items():
        np.testing.assert_array_equal(v, before[k], err_msg=k)


def test_fit_on_a_jit_backend_equals_the_numpy_path():
    """The warm-up pass of a JIT backend (numba) commits nothing: the fitted weights and
    statistics equal those of the NumPy path, which has no warm-up."""
    x, y = data(16)
    got = {}
    for backend in ("numpy", "numba"):
        model = build_model(SPEC, dtype=np.float64, seed=2, backend=backend)
        model.fit(x, y, epochs=2, batch_size=4, seed=3, verbose=0)
        got[backend] = model.get_weights()
    for k in got["numpy"]:
        np.testing.assert_allclose(got["numba"][k], got["numpy"][k], rtol=1e-9, atol=1e-12,
                                   err_msg=k)


def test_evaluate_reports_the_loss_with_the_penalties():
    model = build_model({"input_shape": [3], "layers": [
        {"type": "dense", "units": 4, "kernel_regularizer": {"l1": 0.1, "l2": 0.2}},
        {"type": "dense", "units": 2, "kernel_regularizer": {"l2": 0.3}}]}, dtype=np.float64)
    x, y = data(5, (3,), 2)
    w1, w2 = model.params["dense.w"], model.params["dense_1.w"]
    penalty = 0.1 * np.abs(w1).sum() + 0.2 * (w1 ** 2).sum() + 0.3 * (w2 ** 2).sum()
    logits = (x @ w1 + model.params["dense.b"]) @ w2 + model.params["dense_1.b"]
    z = logits - logits.max(axis=1, keepdims=True)
    data_loss = np.mean(np.log(np.exp(z).sum(axis=1)) - z[np.arange(5), y])
    assert abs(model.evaluate(x, y)["loss"] - (data_loss + penalty)) < 1e-12
    loss, _, grads = model.loss_and_grads(x, y)
    assert abs(float(loss) - (data_loss + penalty)) < 1e-12


# ---- binary cross-entropy models -----------------------------------------------------------------
BCE_SPEC = {"loss": "binary_cross_entropy", "input_shape": [2], "layers": [
    {"type": "dense", "units": 8, "activation": "tanh"}, {"type": "dense", "units": 1}]}


def test_bce_model_labels_predictions_and_learning():
    model = build_model(BCE_SPEC, seed=0, dtype=np.float64)
    assert model.num_classes == 2
    r = np.random.default_rng(0)
    x = r.standard_normal((200, 2))
    y = (x[:, 0] + 2 * x[:, 1] > 0).astype(np.int64)
    with pytest.raises(ValueError, match="Received label 2"):
        model.check_inputs(x[:3], np.array([0, 1, 2]))
    p = model.predict(x[:4])
    assert p.shape == (4, 2)
    np.testing.assert_allclose(p.sum(axis=1), 1, rtol=1e-12)
    z = model.predict_logits(x[:4])[:, 0]
    np.testing.assert_allclose(p[:, 1], 1 / (1 + np.exp(-z)), rtol=1e-12)
    model.fit(x, y, epochs=20, batch_size=20, optimizer={"type": "sgd", "lr": 0.5}, verbose=0)
    assert model.evaluate(x, y)["accuracy"] > 0.95


# ---- bad values are refused, naming them ---------------------------------------------------------
@pytest.mark.parametrize("spec, match", [
    ([{"type": "dropout", "rate": 1.5}], r"Received rate=1\.5"),
    ([{"type": "dropout", "rate": 1.0}], r"Received rate=1\.0"),
    ([{"type": "dropout", "rate": -0.1}], r"Received rate=-0\.1"),
    ([{"type": "dropout", "rate": True}], "Received rate=True"),
    ([{"type": "dropout", "rate": "half"}], "Received rate='half'"),
    ([{"type": "dropout"}], "rate"),
    ([{"type": "batchnorm", "momentum": 1.5}], r"Received momentum=1\.5"),
    ([{"type": "batchnorm", "epsilon": 0}], "Received epsilon=0"),
    ([{"type": "batchnorm", "epsilon": float("nan")}], "Received epsilon=nan"),
    ([{"type": "dense", "units": 2, "kernel_regularizer": "l3"}], "kernel_regularizer='l3'"),
    ([{"type": "dense", "units": 2, "kernel_regularizer": {"l2": -1}}], "l2=-1"),
    ([{"type": "conv2d", "filters": 2, "kernel_regularizer": {"l4": 1}}], "l4"),
    ([{"type": "dense", "units": 2, "activation": "softplus"}], "'softplus'"),
])
def test_bad_layer_options_are_refused(spec, match):
    with pytest.raises(ValueError, match=match):
        layers_from_spec(spec)


def test_bad_losses_and_shapes_are_refused():
    with pytest.raises(ValueError, match="Received loss='mse'"):
        build_model({**BCE_SPEC, "loss": "mse"})
    with pytest.raises(ValueError, match="units=1"):
        build_model({**BCE_SPEC, "layers": [{"type": "dense", "units": 2}]})
    with pytest.raises(ValueError, match="binary_cross_entropy"):
        Sequential([Dense(1)], (3,))
    with pytest.raises(ValueError, match=r"batchnorm .* expects .* received per-example shape \(2, 3\)"):
        Sequential([BatchNorm(), Dense(2)], (2, 3))


# ---- the workspace contract (ws=) for the new layers ---------------------------------------------
WS_SPEC = {"input_shape": [2, 6, 6], "layers": [
    {"type": "conv2d", "filters": 4, "kernel_size": 3, "kernel_regularizer": {"l1": 0.01, "l2": 0.1}},
    {"type": "batchnorm"}, {"type": "sigmoid"}, {"type": "flatten"}, {"type": "dropout", "rate": 0.3},
    {"type": "dense", "units": 6, "activation": "tanh", "kernel_regularizer": "l2"},
    {"type": "batchnorm"}, {"type": "dense", "units": 3}]}


def _copy(result, updates):
    loss, correct, grads = result
    return (float(loss), int(correct), {k: np.array(v, copy=True) for k, v in grads.items()},
            {k: np.array(v, copy=True) for k, v in updates.items()})


@pytest.mark.parametrize("backend", ["numpy", "naive", "numba", "numba_parallel"])
def test_new_layers_follow_the_workspace_contract(backend):
    """With a workspace a step computes exactly what it computes without one, allocates no new
    buffer from the second step on, and the running statistics it leaves are not workspace
    memory (committed, they survive the next step)."""
    from cnn.context import Workspace
    be = get_backend(backend)
    model = build_model(WS_SPEC, dtype=np.float32, seed=1)
    ws = Workspace(be)
    ctx = StepContext(training=True, workspace=ws, seed=2, buffers=dict(model.buffers))
    ids = None
    for step, n in enumerate((5, 5, 3, 5)):
        x, y = data(n, (2, 6, 6), 3, seed=step, dtype=np.float32)
        ctx.step = step
        ref_ctx = StepContext(training=True, seed=2, step=step, buffers=dict(ctx.buffers))
        ref = _copy(model.loss_and_grads(x, y, backend=be, ctx=ref_ctx), ref_ctx.updates)
        got = _copy(model.loss_and_grads(x, y, backend=be, ctx=ctx), ctx.updates)
        assert got[:2] == ref[:2]
        for k in ref[2]:
            np.testing.assert_array_equal(got[2][k], ref[2][k], err_msg=k)
        for k in ref[3]:
            np.testing.assert_array_equal(got[3][k], ref[3][k], err_msg=k)
        committed = dict(ctx.updates)
        ctx.commit()
        if step == 1:
            ids = {k: id(v) for k, v in ws._store.items()}
        if step == 3:  # batch 5 again, after a batch of 3: the same buffers as step 1
            assert {k: id(v) for k, v in ws._store.items() if k in ids} == ids
        kept = {k: v.copy() for k, v in committed.items()}
        model.loss_and_grads(x, y, backend=be, ctx=StepContext(
            training=True, workspace=ws, seed=2, step=step, buffers=dict(ctx.buffers)))
        for k in kept:  # the next pass on the same workspace did not touch them
            np.testing.assert_array_equal(committed[k], kept[k], err_msg=k)
