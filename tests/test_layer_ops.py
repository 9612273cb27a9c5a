"""The ops of sigmoid, tanh, dropout, batch norm, binary cross-entropy and weight penalties:
NumPy and Numba against the plain loops of the naive backend, and every backward (op, layer,
loss, whole model) against central finite differences in float64.

Finite differences: relative error ``|a - n| / max(|a| + |n|, FLOOR * scale)`` below 1e-6
per entry (``scale``: the largest gradient of the array, or of the whole model in the model
tests), the floor keeping entries that are zero in theory (the bias of a conv layer followed by
batch norm) from dividing rounding noise by nothing. Every function checked here is smooth
(no relu or max pooling in these models), so no kink margins are needed.
"""
from __future__ import annotations

import numpy as np
import pytest

from cnn.backends import get_backend, rng
from cnn.context import StepContext
from cnn.layers import BatchNorm, Dense, Dropout, Flatten, Sigmoid, Tanh
from cnn.model import Sequential, build_model
from cnn.plan import layer_params

NAIVE = get_backend("naive")
FAST = ["numpy", "numba"]
TOL = {np.float32: 2e-6, np.float64: 1e-13}
FD_TOL = 1e-6
FLOOR = 1e-3
EPS = 1e-5


def close(got, want, dtype, what):
    got, want = np.asarray(got), np.asarray(want)
    assert got.shape == want.shape and got.dtype == np.dtype(dtype), \
        f"{what}: {got.shape} {got.dtype} vs {want.shape} {np.dtype(dtype)}"
    scale = max(float(np.max(np.abs(want))), 1e-30)
    err = float(np.max(np.abs(got.astype(np.float64) - want))) / scale
    assert err < TOL[dtype], f"{what}: relative error {err:.3g} ({np.dtype(dtype)})"


def numeric_grad(f, arr, eps=EPS):
    flat = arr.reshape(-1)
    assert np.shares_memory(flat, arr)
    out = np.empty(flat.size)
    for i in range(flat.size):
        old = flat[i]
        flat[i] = old + eps
        fp = f()
        flat[i] = old - eps
        fm = f()
        flat[i] = old
        out[i] = (fp - fm) / (2 * eps)
    return out.reshape(arr.shape)


def assert_fd(analytic, numeric, what, scale=None):
    """``scale``: the gradients' magnitude the floor is relative to (default this array's)."""
    analytic, numeric = np.asarray(analytic, np.float64), np.asarray(numeric, np.float64)
    assert analytic.shape == numeric.shape, what
    if scale is None:
        scale = float(np.abs(numeric).max())
    floor = FLOOR * max(scale, 1e-12)
    err = np.abs(analytic - numeric) / np.maximum(np.abs(analytic) + np.abs(numeric), floor)
    worst = int(np.argmax(err))
    assert err.max() < FD_TOL, (f"{what}: rel err {err.max():.3g} at {worst}: analytic "
                                f"{analytic.flat[worst]!r} vs numeric {numeric.flat[worst]!r}")


# ---- ops against the naive loops ------------------------------------------------------------
@pytest.mark.parametrize("backend", FAST)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("op", ["sigmoid", "tanh"])
def test_activation_ops_vs_naive(backend, dtype, op):
    be = get_backend(backend)
    x = (np.random.default_rng(1).standard_normal((3, 2, 4, 5)) * 4).astype(dtype)
    x[0, 0, 0, :4] = [0.0, 60.0, -800.0, 800.0]  # exp(800) overflows even float64
    dout = np.random.default_rng(2).standard_normal(x.shape).astype(dtype)
    out, cache = getattr(be, f"{op}_forward")(x)
    r_out, r_cache = getattr(NAIVE, f"{op}_forward")(x)
    assert np.isfinite(out).all()
    close(out, r_out, dtype, f"{op} out")
    close(getattr(be, f"{op}_backward")(dout, cache),
          getattr(NAIVE, f"{op}_backward")(dout, r_cache), dtype, f"{op} dx")


@pytest.mark.parametrize("backend", FAST)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_dropout_ops_vs_naive(backend, dtype):
    be = get_backend(backend)
    x = np.random.default_rng(3).standard_normal((4, 3, 5)).astype(dtype)
    dout = np.random.default_rng(4).standard_normal(x.shape).astype(dtype)
    key = rng.pass_key(2, "dropout", 6)
    out, cache = be.dropout_forward(x, 0.35, key, 9)
    r_out, r_cache = NAIVE.dropout_forward(x, 0.35, key, 9)
    # kept units are x * dtype(1 / (1 - rate)) on every backend: equal bits
    np.testing.assert_array_equal(out, r_out)
    np.testing.assert_array_equal(be.dropout_backward(dout, cache),
                                  NAIVE.dropout_backward(dout, r_cache))
    out0, _ = be.dropout_forward(x, 0.0, key, 0)
    np.testing.assert_array_equal(out0, x)


@pytest.mark.parametrize("backend", FAST)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape", [(4, 3, 5, 6), (7, 5)])
def test_batchnorm_ops_vs_naive(backend, dtype, shape):
    be = get_backend(backend)
    r = np.random.default_rng(5)
    x = (r.standard_normal(shape) * 3 + 2).astype(dtype)
    dout = r.standard_normal(shape).astype(dtype)
    c = shape[1]
    gamma, beta = r.standard_normal(c).astype(dtype), r.standard_normal(c).astype(dtype)
    rmean, rvar = r.standard_normal(c).astype(dtype), r.uniform(0.5, 2, c).astype(dtype)
    inv = 1.0 / (x.size // c)
    results = {}
    for name, b in (("fast", be), ("naive", NAIVE)):
        sums = b.batchnorm_sums(x)
        sq = b.batchnorm_sq_dev_sums(x, sums, inv)
        out, cache = b.batchnorm_train_forward(x, sums, sq, inv, gamma, beta, 1e-3)
        running = b.batchnorm_running_update(rmean, rvar, sums, sq, inv, 0.9)
        s1, s2 = b.batchnorm_backward_sums(dout, cache)
        dx = b.batchnorm_backward_dx(dout, cache, s1, s2, inv)
        i_out, i_cache = b.batchnorm_infer_forward(x, rmean, rvar, gamma, beta, 1e-3)
        i_dx = b.batchnorm_backward_dx(dout, i_cache, s1, s2, 0.0)
        results[name] = [sums, sq, out, *running, s1, s2, dx, i_out, i_dx]
    names = ["sums", "sq", "out", "running_mean", "running_var", "dbeta", "dgamma", "dx",
             "inference out", "inference dx"]
    for what, got, want in zip(names, results["fast"], results["naive"]):
        close(got, want, dtype, f"batchnorm {what}")


@pytest.mark.parametrize("backend", FAST)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_bce_and_penalty_ops_vs_naive(backend, dtype):
    be = get_backend(backend)
    r = np.random.default_rng(6)
    z = (r.standard_normal((9, 1)) * 3).astype(dtype)
    z[:3, 0] = [1e4, -1e4, 0.0]
    y = r.integers(0, 2, 9)
    loss, d, correct = be.binary_cross_entropy(z, y)
    r_loss, r_d, r_correct = NAIVE.binary_cross_entropy(z, y)
    assert np.isfinite(loss) and loss.shape == () and int(correct) == int(r_correct)
    close(loss, r_loss, dtype, "bce loss")
    close(d, r_d, dtype, "bce dlogits")
    w = r.standard_normal((3, 4)).astype(dtype)
    w[0, 0] = 0
    g = r.standard_normal(w.shape).astype(dtype)
    l0 = np.asarray(0.5, dtype)
    close(be.weight_penalty(w, 0.01, 0.02, l0), NAIVE.weight_penalty(w, 0.01, 0.02, l0), dtype,
          "penalty")
    close(be.weight_penalty_grad(g.copy(), w, 0.01, 0.02),
          NAIVE.weight_penalty_grad(g.copy(), w, 0.01, 0.02), dtype, "penalty grad")


def test_bce_is_the_definition():
    """log(1 + exp(-z)) for y = 1 and log(1 + exp(z)) for y = 0, averaged; the gradient is
    (sigmoid(z) - y) / N; a logit of 0 counts as class 0."""
    z = np.array([[2.0], [-1.0], [0.0], [3.0]])
    y = np.array([1, 1, 0, 0])
    want = np.mean([np.log1p(np.exp(-2.0)), np.log1p(np.exp(1.0)), np.log(2.0),
                    np.log1p(np.exp(3.0))])
    loss, d, correct = get_backend("numpy").binary_cross_entropy(z, y)
    assert abs(float(loss) - want) < 1e-15
    np.testing.assert_allclose(d[:, 0], (1 / (1 + np.exp(-z[:, 0])) - y) / 4, rtol=1e-14)
    assert int(correct) == 2


# ---- op gradients against finite differences ----------------------------------------------------
@pytest.mark.parametrize("op", ["sigmoid", "tanh"])
def test_activation_backward_vs_finite_differences(op):
    be = get_backend("numpy")
    x = np.random.default_rng(7).standard_normal((2, 3, 4)) * 2
    r = np.random.default_rng(8).standard_normal(x.shape)
    _, cache = getattr(be, f"{op}_forward")(x)
    dx = getattr(be, f"{op}_backward")(r, cache)
    assert_fd(dx, numeric_grad(lambda: float(np.sum(getattr(be, f"{op}_forward")(x)[0] * r)), x),
              f"{op} dx")


def test_dropout_backward_vs_finite_differences():
    be = get_backend("numpy")
    x = np.random.default_rng(9).standard_normal((3, 10))
    r = np.random.default_rng(10).standard_normal(x.shape)
    key = rng.pass_key(0, "dropout", 0)
    _, cache = be.dropout_forward(x, 0.5, key, 0)
    dx = be.dropout_backward(r, cache)
    num = numeric_grad(lambda: float(np.sum(be.dropout_forward(x, 0.5, key, 0)[0] * r)), x, 1e-3)
    assert_fd(dx, num, "dropout dx")


@pytest.mark.parametrize("shape", [(4, 3, 2, 3), (6, 4)])
@pytest.mark.parametrize("training", [True, False])
def test_batchnorm_layer_backward_vs_finite_differences(shape, training):
    """dx, dgamma, dbeta of the layer (in training mode through the batch statistics)."""
    be = get_backend("numpy")
    r = np.random.default_rng(11)
    layer = BatchNorm(momentum=0.9, name="bn")
    layer.build(shape[1:])
    c = shape[1]
    params = {"gamma": r.uniform(0.5, 2, c), "beta": r.standard_normal(c),
              "running_mean": r.standard_normal(c), "running_var": r.uniform(0.5, 2, c)}
    x = r.standard_normal(shape) * 2 + 1
    dout = r.standard_normal(shape)

    def loss():
        out, _ = layer.forward(params, x, be, StepContext(training=training))
        return float(np.sum(out * dout))

    ctx = StepContext(training=training)
    _, cache = layer.forward(params, x, be, ctx)
    dx, grads = layer.backward(params, dout, cache, be, ctx)
    assert_fd(dx, numeric_grad(loss, x), "batchnorm dx")
    assert_fd(grads["gamma"], numeric_grad(loss, params["gamma"]), "batchnorm dgamma")
    assert_fd(grads["beta"], numeric_grad(loss, params["beta"]), "batchnorm dbeta")


def test_bce_gradient_vs_finite_differences():
    be = get_backend("numpy")
    z = np.random.default_rng(12).standard_normal((6, 1)) * 3
    y = np.array([0, 1, 1, 0, 1, 0])
    _, d, _ = be.binary_cross_entropy(z, y)
    assert_fd(d, numeric_grad(lambda: float(be.binary_cross_entropy(z, y)[0]), z), "bce dlogits")


def test_penalty_gradient_vs_finite_differences():
    be = get_backend("numpy")
    w = np.random.default_rng(13).standard_normal((4, 5))  # no entry within EPS of the kink
    zero = np.asarray(0.0)
    g = be.weight_penalty_grad(np.zeros_like(w), w, 0.03, 0.2)
    assert_fd(g, numeric_grad(lambda: float(be.weight_penalty(w, 0.03, 0.2, zero)), w), "penalty")


# ---- whole models, training mode, against finite differences -------------------------------------
MODELS = {
    "conv_bn_dropout_tanh_softmax": {"input_shape": [2, 5, 5], "layers": [
        {"type": "conv2d", "filters": 3, "kernel_size": 3, "padding": "same",
         "kernel_regularizer": {"l2": 0.05}},
        {"type": "batchnorm"}, {"type": "tanh"},
        {"type": "conv2d", "filters": 2, "kernel_size": 2, "stride": 2},
        {"type": "flatten"}, {"type": "dropout", "rate": 0.4},
        {"type": "dense", "units": 6, "activation": "sigmoid", "kernel_regularizer": "l2"},
        {"type": "batchnorm", "momentum": 0.5}, {"type": "dropout", "rate": 0.2},
        {"type": "dense", "units": 3, "kernel_regularizer": {"l1": 0.01}}]},
    "mlp_bce": {"loss": "binary_cross_entropy", "input_shape": [4], "layers": [
        {"type": "dense", "units": 5, "activation": "tanh", "kernel_regularizer": {"l1": 0.02,
                                                                                  "l2": 0.1}},
        {"type": "batchnorm"}, {"type": "dropout", "rate": 0.5},
        {"type": "dense", "units": 3, "activation": "sigmoid"},
        {"type": "dense", "units": 1}]},
}


@pytest.mark.parametrize("name", list(MODELS))
@pytest.mark.parametrize("training", [True, False])
def test_model_gradients_vs_finite_differences(name, training):
    model = build_model(MODELS[name], dtype=np.float64, seed=4)
    r = np.random.default_rng(14)
    for k, v in model.buffers.items():  # non-trivial running statistics for inference mode
        v[...] = r.uniform(0.5, 1.5, v.shape) if k.endswith("var") else r.standard_normal(v.shape)
    x = r.standard_normal((7, *model.input_shape))
    y = r.integers(0, model.num_classes, 7)

    def ctx():  # a fixed position in training: the dropout masks are constants
        return StepContext(training=training, seed=3, step=5, offset=2)

    def loss():
        return float(model.loss_and_grads(x, y, ctx=ctx())[0])

    _, _, grads = model.loss_and_grads(x, y, ctx=ctx())
    assert set(grads) == set(model.params)
    # a conv bias followed by batch norm has a zero gradient in training mode: the floor is
    # relative to the model's gradients, not to that array's rounding noise
    scale = max(float(np.abs(g).max()) for g in grads.values())
    for key, p in model.params.items():
        assert_fd(grads[key], numeric_grad(loss, p), f"{name} {key} (training={training})",
                  scale)


@pytest.mark.parametrize("name", list(MODELS))
def test_model_input_gradient_vs_finite_differences(name):
    """The gradient the chain of layer backwards carries down to the input (every dx, with
    the same training context as the forward), against differencing the input."""
    np_be = get_backend("numpy")
    # the layers' backwards below run on NumPy: so does the forward that makes their caches
    model = build_model(MODELS[name], dtype=np.float64, seed=5, backend=np_be)
    r = np.random.default_rng(15)
    x = r.standard_normal((6, *model.input_shape))
    y = r.integers(0, model.num_classes, 6)

    def ctx():
        return StepContext(training=True, seed=8, step=1, offset=0)

    c = ctx()
    logits, caches = model.forward(x, ctx=c)
    _, dout, _ = model.loss(logits, y, np_be)
    for layer, cache in zip(model.layers[::-1], caches[::-1]):
        dout, _ = layer.backward(layer_params(layer, model.params, model.buffers), dout,
                                 cache, np_be, c, True)
    numeric = numeric_grad(lambda: float(model.loss_and_grads(x, y, ctx=ctx())[0]), x)
    assert_fd(dout, numeric, f"{name} input gradient")


def test_layers_keep_the_dtype():
    for dtype in (np.float32, np.float64):
        model = Sequential([Dense(4), BatchNorm(), Tanh(), Dropout(0.5), Sigmoid(), Flatten(),
                            Dense(2)], (3,), dtype=dtype)
        x = np.ones((2, 3), dtype)
        logits, _ = model.forward(x, ctx=StepContext(training=True))
        assert logits.dtype == dtype
        _, _, grads = model.loss_and_grads(x, np.array([0, 1]), ctx=StepContext(training=True))
        assert all(g.dtype == dtype for g in grads.values())
