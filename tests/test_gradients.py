"""Analytic gradients against central finite differences, in float64.

Relative error per entry: ``|a - b| / max(|a| + |b|, TINY)``; every checked entry must be below
``1e-6``. Checked: each op's backward (conv in several stride/padding settings, max pooling,
ReLU, dense, softmax cross-entropy) and the whole model's gradient (every parameter, or a
seeded random subset of the entries of big tensors, and the input gradient) for both presets at
tiny scale and for a model with stride-2 'same' convolutions and overlapping pooling.

ReLU and max pooling have kinks. A finite difference across a kink is meaningless, so the inputs
are chosen with a margin: op tests construct inputs whose values stay far from 0 and whose
pooling windows have no near-ties; model tests search seeds until every ReLU input is at least
``MARGIN`` away from 0 and every pooling window's maximum beats its runner-up by ``MARGIN``
(asserted), with ``MARGIN`` a hundred times the largest change a perturbation can cause.
"""
from __future__ import annotations


import numpy as np
import pytest

from cnn.backends import get_backend
from cnn.context import StepContext
from cnn.layers import Conv2D, Dense, Flatten, MaxPool2D, ReLU, layers_from_spec
from cnn.model import Sequential
from cnn.plan import layer_params
from cnn.presets import PRESETS

NP = get_backend("numpy")
TOL = 1e-6
TINY = 1e-300


def rel_err(a, b):
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return np.abs(a - b) / np.maximum(np.abs(a) + np.abs(b), TINY)


def assert_grad_close(analytic, numeric, what):
    assert analytic.shape == numeric.shape, what
    err = rel_err(analytic, numeric)
    worst = int(np.argmax(err))
    assert err.max() < TOL, (f"{what}: max rel err {err.max():.3g} at flat index {worst}: "
                             f"analytic {analytic.flat[worst]!r} vs numeric {numeric.flat[worst]!r}")


def numeric_grad(f, arr, eps, indices=None):
    """Central differences of the scalar ``f()`` w.r.t. entries of ``arr`` (perturbed in place
    and restored). ``indices``: flat indices to check (default all). Returns their values."""
    flat = arr.reshape(-1)
    assert np.shares_memory(flat, arr)
    indices = range(flat.size) if indices is None else indices
    out = []
    for i in indices:
        old = flat[i]
        flat[i] = old + eps
        fp = f()
        flat[i] = old - eps
        fm = f()
        flat[i] = old
        out.append((fp - fm) / (2 * eps))
    return np.array(out)


def pick(size, limit, rng):
    """All flat indices when ``size <= limit``, else a seeded random subset of ``limit``."""
    return np.arange(size) if size <= limit else np.sort(rng.choice(size, limit, replace=False))


# ---- ops ----------------------------------------------------------------------------------------
# The conv and dense ops are linear in each argument, so a central difference has no truncation
# error and a large step keeps rounding error small; relu and max pooling are piecewise linear and
# their inputs keep a margin of at least 1e-2 >> EPS_LINEAR from every kink.
EPS_LINEAR = 1e-3


def _conv_check(n, c, h, w, f, k, stride, padding, seed):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, c, h, w))
    wt = rng.standard_normal((f, c, k, k))
    b = rng.standard_normal(f)
    out, cache = NP.conv2d_forward(x, wt, b, stride, padding)
    r = rng.standard_normal(out.shape)  # the loss sum(out * r) has d loss / d out = r

    def loss():
        return float(np.sum(NP.conv2d_forward(x, wt, b, stride, padding)[0] * r))

    dx, dw, db = NP.conv2d_backward(r, cache)
    assert dx.shape == x.shape and dw.shape == wt.shape and db.shape == b.shape
    assert_grad_close(dx.ravel(), numeric_grad(loss, x, EPS_LINEAR), "conv dx")
    assert_grad_close(dw.ravel(), numeric_grad(loss, wt, EPS_LINEAR), "conv dw")
    assert_grad_close(db.ravel(), numeric_grad(loss, b, EPS_LINEAR), "conv db")


@pytest.mark.parametrize("k, stride, padding", [
    (1, 1, ((0, 0), (0, 0))),
    (2, 2, ((0, 0), (0, 0))),
    (3, 1, ((1, 1), (1, 1))),
    (3, 2, ((0, 1), (1, 0))),
    (5, 2, ((1, 2), (1, 2))),   # 'same' for H=W=8, k=5, s=2
    (3, 2, ((0, 1), (1, 1))),   # 'same' for H=8, W=7, k=3, s=2
])
def test_conv_backward_vs_finite_differences(k, stride, padding):
    _conv_check(2, 2, 8, 7, 3, k, stride, padding, seed=k + 10 * stride)


def test_dense_backward_vs_finite_differences():
    rng = np.random.default_rng(1)
    x, w, b = rng.standard_normal((3, 5)), rng.standard_normal((5, 4)), rng.standard_normal(4)
    out, cache = NP.dense_forward(x, w, b)
    r = rng.standard_normal(out.shape)

    def loss():
        return float(np.sum(NP.dense_forward(x, w, b)[0] * r))

    dx, dw, db = NP.dense_backward(r, cache)
    assert dx.shape == x.shape and dw.shape == w.shape and db.shape == b.shape
    assert_grad_close(dx.ravel(), numeric_grad(loss, x, EPS_LINEAR), "dense dx")
    assert_grad_close(dw.ravel(), numeric_grad(loss, w, EPS_LINEAR), "dense dw")
    assert_grad_close(db.ravel(), numeric_grad(loss, b, EPS_LINEAR), "dense db")


def _distinct_values(shape, rng, spacing=0.02):
    """Random order of values spaced ``spacing`` apart: no window has a near-tie."""
    size = int(np.prod(shape))
    return (rng.permutation(size) * spacing - size * spacing / 2).reshape(shape)


@pytest.mark.parametrize("shape, pool, stride", [
    ((2, 2, 6, 6), 2, 2), ((1, 2, 7, 9), 3, 2), ((2, 1, 5, 6), 2, 1), ((1, 2, 7, 5), 2, 2),
])
def test_maxpool_backward_vs_finite_differences(shape, pool, stride):
    rng = np.random.default_rng(pool + stride)
    x = _distinct_values(shape, rng)
    out, cache = NP.maxpool2d_forward(x, pool, stride)
    r = rng.standard_normal(out.shape)

    def loss():
        return float(np.sum(NP.maxpool2d_forward(x, pool, stride)[0] * r))

    dx = NP.maxpool2d_backward(r, cache)
    assert dx.shape == x.shape
    assert_grad_close(dx.ravel(), numeric_grad(loss, x, EPS_LINEAR), "maxpool dx")


def test_relu_backward_vs_finite_differences():
    rng = np.random.default_rng(2)
    u = rng.standard_normal((2, 3, 4, 5))
    x = np.sign(u) * (0.01 + np.abs(u))   # |x| >= 0.01: no entry within EPS_LINEAR of the kink
    out, cache = NP.relu_forward(x)
    r = rng.standard_normal(out.shape)

    def loss():
        return float(np.sum(NP.relu_forward(x)[0] * r))

    dx = NP.relu_backward(r, cache)
    assert dx.shape == x.shape
    assert_grad_close(dx.ravel(), numeric_grad(loss, x, EPS_LINEAR), "relu dx")


@pytest.mark.parametrize("n", [1, 4])
def test_softmax_cross_entropy_vs_finite_differences(n):
    # logits of order 1: with much larger ones some probabilities fall below what a finite
    # difference can resolve (e.g. 1e-21 against a rounding error of 1e-11)
    rng = np.random.default_rng(3)
    logits = rng.standard_normal((n, 6))
    labels = np.array([0, 5, 2, 2])[:n]

    def loss():
        return float(NP.softmax_cross_entropy(logits, labels)[0])

    _, dlogits, _ = NP.softmax_cross_entropy(logits, labels)
    assert dlogits.shape == logits.shape
    assert_grad_close(dlogits.ravel(), numeric_grad(loss, logits, 1e-5), "dlogits")


# ---- whole models -------------------------------------------------------------------------------
EPS = 1e-5       # balances truncation (~EPS^2) and rounding (~1e-16 / EPS) for the smooth loss
MARGIN = 1e-3    # distance kept from every kink (ReLU at 0, pooling ties); >> any EPS-induced change
MAX_ENTRIES = 150  # per tensor; bigger tensors are checked on a seeded random subset


def tiny_spec(preset, conv_filters, dense_units):
    """The preset's layer list with fewer conv filters / dense units (same structure)."""
    convs, denses = iter(conv_filters), iter(dense_units)
    layers = []
    for entry in PRESETS[preset]["layers"]:
        entry = dict(entry)
        if entry["type"] == "conv2d":
            entry["filters"] = next(convs)
        elif entry["type"] == "dense" and entry.get("activation"):  # hidden dense, not logits
            entry["units"] = next(denses)
        layers.append(entry)
    return layers


def stride2_spec():
    return [
        {"type": "conv2d", "filters": 4, "kernel_size": 3, "stride": 2, "padding": "same",
         "activation": "relu", "kernel_initializer": "he_normal"},
        {"type": "maxpool2d", "pool_size": 3, "stride": 2},          # overlapping windows
        {"type": "conv2d", "filters": 3, "kernel_size": 2, "stride": 2, "padding": "same",
         "activation": "relu"},
        {"type": "flatten"},
        {"type": "dense", "units": 6, "activation": "relu"},
        {"type": "dense", "units": 4},
    ]


MODELS = {
    # mnist_small: conv 3x3 -> relu -> pool 2 -> flatten -> dense 10, on 10x10 images
    "mnist_small": (lambda: tiny_spec("mnist_small", [4], []), (1, 10, 10), 3),
    # cifar_tutorial's 3 conv + 2 pool + 2 dense stack; 18x18 is the smallest size whose last
    # conv still fits (18 -> 16 -> 8 -> 6 -> 3 -> 1)
    "cifar_tutorial": (lambda: tiny_spec("cifar_tutorial", [4, 5, 6], [8]), (3, 18, 18), 2),
    # stride-2 'same' convs with asymmetric padding on a non-square input: 9x8 -> 5x4 (pads
    # (1,1),(0,1)) -> pool 3/2 -> 2x1 -> 'same' k2 s2 -> 1x1
    "stride2_same": (stride2_spec, (2, 9, 8), 3),
}


def kink_margins(model, x):
    """Smallest |ReLU input| and smallest gap between a pooling window's max and runner-up
    (windows whose max is 0, i.e. all ReLU-dead, are ties that no perturbation breaks)."""
    relu_margin, pool_margin = np.inf, np.inf
    for layer in model.layers:
        if isinstance(layer, ReLU):
            relu_margin = min(relu_margin, float(np.abs(x).min()))
        if isinstance(layer, MaxPool2D):
            p, s = layer.pool_size, layer.stride
            win = np.lib.stride_tricks.sliding_window_view(x, (p, p), axis=(2, 3))[:, :, ::s, ::s]
            win = np.sort(win.reshape(*win.shape[:4], p * p), axis=-1)
            gap = win[..., -1] - win[..., -2]
            live = win[..., -1] != 0
            if live.any():
                pool_margin = min(pool_margin, float(gap[live].min()))
        x, _ = layer.forward(layer_params(layer, model.params), x, NP, StepContext())
    return relu_margin, pool_margin


def build_checked_model(name):
    """A float64 model and batch with every kink at least MARGIN away (seed search)."""
    make_spec, input_shape, n = MODELS[name]
    for seed in range(200):
        model = Sequential(layers_from_spec(make_spec()), input_shape, dtype=np.float64, seed=seed)
        rng = np.random.default_rng(1000 + seed)
        for key in model.params:
            if key.endswith(".b"):  # biases start at 0; give them generic values
                model.params[key][...] = 0.1 * rng.standard_normal(model.params[key].shape)
        x = rng.standard_normal((n, *input_shape))
        y = rng.integers(0, model.num_classes, n)
        relu_margin, pool_margin = kink_margins(model, x)
        if relu_margin > MARGIN and pool_margin > MARGIN:
            return model, x, y
    pytest.fail(f"no seed in 0..199 keeps {name}'s kinks {MARGIN} away")


def loss_of(model, x, y):
    logits, _ = model.forward(x, backend=NP)
    return float(NP.softmax_cross_entropy(logits, y)[0])


def input_gradient(model, x, y):
    """d loss / d x by running every layer's backward with need_dx=True."""
    logits, caches = model.forward(x, backend=NP)
    _, dout, _ = NP.softmax_cross_entropy(logits, y)
    for layer, cache in zip(model.layers[::-1], caches[::-1]):
        dout, _ = layer.backward(layer_params(layer, model.params), dout, cache, NP,
                                 StepContext(), need_dx=True)
    return dout


@pytest.mark.parametrize("name", list(MODELS))
def test_model_parameter_gradients_vs_finite_differences(name):
    model, x, y = build_checked_model(name)
    loss, correct, grads = model.loss_and_grads(x, y, backend=NP)
    assert np.isfinite(float(loss))
    assert sorted(grads) == sorted(model.params)
    rng = np.random.default_rng(0)
    for key, p in model.params.items():
        assert grads[key].shape == p.shape, key
        assert grads[key].dtype == np.float64, key
        idx = pick(p.size, MAX_ENTRIES, rng)
        numeric = numeric_grad(lambda: loss_of(model, x, y), p, EPS, idx)
        assert_grad_close(grads[key].reshape(-1)[idx], numeric, f"{name} {key}")
    # the margins still hold after all the perturbations (they were undone exactly)
    relu_margin, pool_margin = kink_margins(model, x)
    assert relu_margin > MARGIN and pool_margin > MARGIN


@pytest.mark.parametrize("name", list(MODELS))
def test_model_input_gradient_vs_finite_differences(name):
    model, x, y = build_checked_model(name)
    dx = input_gradient(model, x, y)
    assert dx.shape == x.shape
    idx = pick(x.size, MAX_ENTRIES, np.random.default_rng(1))
    numeric = numeric_grad(lambda: loss_of(model, x, y), x, EPS, idx)
    assert_grad_close(dx.reshape(-1)[idx], numeric, f"{name} input")


def test_model_backward_equals_layerwise_chain():
    """Sequential.backward (first layer need_dx=False) gives the same parameter gradients as
    the full chain with every dx computed."""
    model, x, y = build_checked_model("stride2_same")
    _, _, grads = model.loss_and_grads(x, y, backend=NP)
    logits, caches = model.forward(x, backend=NP)
    _, dout, _ = NP.softmax_cross_entropy(logits, y)
    for layer, cache in zip(model.layers[::-1], caches[::-1]):
        dout, lg = layer.backward(layer_params(layer, model.params), dout, cache, NP,
                                  StepContext(), True)
        for p, g in lg.items():
            np.testing.assert_allclose(grads[f"{layer.name}.{p}"], g, rtol=1e-14, atol=1e-16)


def test_stride2_model_has_asymmetric_same_padding():
    """The stride-2 model really exercises asymmetric 'same' padding and overlapping pooling."""
    model, _, _ = build_checked_model("stride2_same")
    conv, pool, conv2 = model.layers[0], model.layers[2], model.layers[3]
    assert isinstance(conv, Conv2D) and isinstance(pool, MaxPool2D) and isinstance(conv2, Conv2D)
    assert conv.output_shape == (4, 5, 4)          # ceil(9/2), ceil(8/2)
    assert conv.pads == ((1, 1), (0, 1))
    assert pool.pool_size > pool.stride
    assert isinstance(model.layers[-1], Dense) and any(isinstance(l, Flatten) for l in model.layers)
