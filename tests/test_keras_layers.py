"""The layers and loss of issue 12 against Keras, from transferred weights: sigmoid, tanh,
dropout (in inference mode, and at rate 0 in training mode: Keras draws its own masks), batch
norm in both modes (normalisation, gradients and the new moving statistics), L1/L2 kernel
regularisers (in the loss and the gradients), binary cross-entropy from logits.

Tolerances as in tests/test_keras_reference.py: ``assert_allclose(a, ref, rtol=rel,
atol=rel * max|ref|)``; float32: logits and loss 1e-5, gradients 1e-4, weights after SGD steps
1e-5; float64 1e-10 (regulariser factors exact in float32, which Keras stores them in).
"""
from __future__ import annotations

import numpy as np
import pytest

from cnn.backends import get_backend
from cnn.context import StepContext
from cnn.reference.keras import (build_keras_model, compile_keras_model, configure_threads,
                                 fit_keras, get_keras_weights, keras_labels,
                                 keras_loss_and_grads, keras_to_ours, ours_to_keras,
                                 to_keras_images)
from cnn.model import build_model
from cnn.optim import SGD
from cnn.train import fit

tf = pytest.importorskip("tensorflow")
configure_threads(1)

TOL = {np.float32: {"logits": 1e-5, "loss": 1e-5, "grads": 1e-4, "weights": 1e-5},
       np.float64: {"logits": 1e-10, "loss": 1e-10, "grads": 1e-10, "weights": 1e-10}}


def spec(rate: float, loss: str = "softmax_cross_entropy") -> dict:
    """Every new layer: batch norm per channel of a conv map and per feature of a flattened
    map feeding a dense layer (the H, W, C permutation), dropout before and after it, sigmoid
    and tanh, L1, L2 and L1+L2 penalties (factors exact in float32)."""
    return {"loss": loss, "input_shape": [2, 6, 5], "layers": [
        {"type": "conv2d", "filters": 3, "kernel_size": 3, "padding": "same",
         "kernel_regularizer": {"l2": 2 ** -6}},
        {"type": "batchnorm", "momentum": 0.75, "epsilon": 2 ** -8}, {"type": "tanh"},
        {"type": "maxpool2d", "pool_size": 2},
        {"type": "flatten"}, {"type": "dropout", "rate": rate},
        {"type": "batchnorm"}, {"type": "sigmoid"},
        {"type": "dense", "units": 5, "activation": "tanh",
         "kernel_regularizer": {"l1": 2 ** -7, "l2": 2 ** -5}},
        {"type": "dropout", "rate": rate},
        {"type": "dense", "units": 1 if loss == "binary_cross_entropy" else 4,
         "kernel_regularizer": {"l1": 2 ** -8}}]}


def assert_close(actual, ref, rel, what=""):
    ref = np.asarray(ref)
    np.testing.assert_allclose(actual, ref, rtol=rel, atol=rel * float(np.abs(ref).max()),
                               err_msg=what)


def make(rate, loss, dtype, seed=0):
    model = build_model(spec(rate, loss), dtype=dtype, seed=seed)
    r = np.random.default_rng(seed + 100)
    for k, v in model.buffers.items():  # non-trivial running statistics and affine parameters
        v[...] = r.uniform(0.5, 2, v.shape) if k.endswith("var") else r.standard_normal(v.shape)
    for k in model.params:
        if k.endswith((".gamma", ".beta")):
            model.params[k][...] = r.uniform(0.5, 1.5, model.params[k].shape)
    x = r.standard_normal((6, *model.input_shape)).astype(dtype)
    y = r.integers(0, model.num_classes, 6)
    return model, x, y


CASES = [(0.5, "softmax_cross_entropy", np.float32), (0.5, "binary_cross_entropy", np.float64),
         (0.0, "softmax_cross_entropy", np.float64), (0.0, "binary_cross_entropy", np.float32)]
IDS = [f"rate{r}-{loss.split('_')[0]}-{np.dtype(d)}" for r, loss, d in CASES]


@pytest.mark.parametrize("rate, loss, dtype", CASES, ids=IDS)
def test_inference_mode_matches_keras(rate, loss, dtype):
    """Dropout is the identity and batch norm uses the running statistics: logits, loss (with
    the penalties) and every gradient equal Keras's with ``training=False``."""
    model, x, y = make(rate, loss, dtype)
    kmodel = build_keras_model(model)
    tol = TOL[dtype]
    logits = model.predict_logits(x)
    assert_close(kmodel(to_keras_images(x), training=False).numpy(), logits, tol["logits"],
                 "logits")
    ours_loss, _, grads = model.loss_and_grads(x, y)
    kloss, _, kgrads = keras_loss_and_grads(kmodel, model, x, y, training=False)
    assert_close(kloss, float(ours_loss), tol["loss"], "loss with penalties")
    assert kgrads.keys() == grads.keys()
    for k in grads:
        assert_close(kgrads[k], grads[k], tol["grads"], f"gradient of {k}")
    assert model.evaluate(x, y)["loss"] == pytest.approx(kloss, rel=tol["loss"])


@pytest.mark.parametrize("loss, dtype", [("softmax_cross_entropy", np.float64),
                                         ("binary_cross_entropy", np.float32)])
def test_training_mode_matches_keras_at_rate_0(loss, dtype):
    """Batch norm on the batch statistics: logits, loss, gradients through the statistics, and
    the new moving statistics (Keras updates its variables in the training call)."""
    model, x, y = make(0.0, loss, dtype, seed=1)
    kmodel = build_keras_model(model)
    tol = TOL[dtype]
    ctx = StepContext(training=True)
    ours_loss, _, grads = model.loss_and_grads(x, y, ctx=ctx)
    kloss, klogits, kgrads = keras_loss_and_grads(kmodel, model, x, y, training=True)
    logits, _ = model.forward(x, ctx=StepContext(training=True))
    assert_close(klogits, logits, tol["logits"], "training logits")
    assert_close(kloss, float(ours_loss), tol["loss"], "training loss")
    for k in grads:
        if k == "conv2d.b":  # before batch norm: zero in theory, rounding noise in both
            assert np.abs(grads[k]).max() < 1e-5 and np.abs(kgrads[k]).max() < 1e-5
            continue
        assert_close(kgrads[k], grads[k], tol["grads"], f"training gradient of {k}")
    after = get_keras_weights(kmodel, model)  # Keras's moving statistics after its call
    for k, v in ctx.updates.items():
        assert_close(after[k], v, tol["weights"], f"new {k}")


def test_weight_and_buffer_round_trips_are_exact():
    model, _, _ = make(0.3, "softmax_cross_entropy", np.float32)
    kmodel = build_keras_model(model)
    back = get_keras_weights(kmodel, model)
    assert back.keys() == {**model.params, **model.buffers}.keys()
    for k, v in {**model.params, **model.buffers}.items():
        assert np.array_equal(back[k], v), k
    # the flattened-map batch norm's vectors are permuted to H, W, C: not the identity
    src = model.layers[3].output_shape
    ours = model.params["batchnorm_1.gamma"]
    theirs = ours_to_keras(model)["batchnorm_1"][0]
    assert theirs.shape == ours.shape and not np.array_equal(theirs, ours)
    np.testing.assert_array_equal(theirs.reshape(src[1], src[2], src[0]),
                                  ours.reshape(src).transpose(1, 2, 0))
    assert keras_to_ours(model, ours_to_keras(model)).keys() == back.keys()
    grads_only = ours_to_keras(model, {k: v for k, v in model.params.items()})
    assert len(grads_only["batchnorm"]) == 2  # gradients carry no buffers


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_sgd_steps_with_batchnorm_and_penalties_leave_equal_weights_and_statistics(dtype):
    """Three momentum-SGD steps: Keras's ``train_on_batch`` against our pass + update +
    commit. Weights, gradients through the batch statistics, penalties and moving statistics
    all feed the next step."""
    model, _, _ = make(0.0, "softmax_cross_entropy", dtype, seed=2)
    kmodel = build_keras_model(model)
    opt = SGD(lr=0.1, momentum=0.875)
    compile_keras_model(kmodel, model, opt)
    be = get_backend("numpy")
    state = opt.init_state(model.params, be)
    r = np.random.default_rng(3)
    for _ in range(3):
        x = r.standard_normal((8, *model.input_shape)).astype(dtype)
        y = r.integers(0, 4, 8)
        kmodel.train_on_batch(to_keras_images(x), keras_labels(model, y))
        ctx = StepContext(training=True)
        _, _, grads = model.loss_and_grads(x, y, ctx=ctx)
        opt.update(model.params, grads, state, be)
        ctx.commit(model.buffers)
    after = get_keras_weights(kmodel, model)
    for k, v in {**model.params, **model.buffers}.items():
        if k == "conv2d.b":  # before batch norm its gradient is rounding noise: ~0 in both
            assert np.abs(after[k] - v).max() < TOL[dtype]["weights"], k
            continue
        assert_close(after[k], v, TOL[dtype]["weights"], f"{k} after 3 steps")


def test_fit_keras_with_binary_cross_entropy_follows_fit():
    """fit and fit_keras on a BCE model with batch norm and a penalty (no dropout: Keras's masks
    are its own): same batches, same losses and accuracies, same final weights."""
    r = np.random.default_rng(4)
    x = r.standard_normal((96, 2, 6, 5)).astype(np.float32)
    y = (x[:, 0].mean(axis=(1, 2)) > 0).astype(np.int64)
    kw = dict(epochs=2, batch_size=32, optimizer={"type": "sgd", "lr": 0.1}, seed=5, verbose=0,
              validation_data=(x[:40], y[:40]))
    ours = build_model(spec(0.0, "binary_cross_entropy"), seed=6)
    theirs = build_model(spec(0.0, "binary_cross_entropy"), seed=6)
    h_ours = fit(ours, x, y, **kw)
    h_keras = fit_keras(theirs, x, y, threads=1, **kw)
    for key in ("loss", "accuracy", "val_loss", "val_accuracy"):
        np.testing.assert_allclose(h_keras.history[key], h_ours.history[key], rtol=1e-4,
                                   err_msg=key)
    for k, v in {**ours.params, **ours.buffers}.items():
        source = theirs.params if k in theirs.params else theirs.buffers
        if k == "conv2d.b":  # before batch norm: rounding noise in both
            assert np.abs(source[k] - v).max() < 1e-6, k
            continue
        assert_close(source[k], v, 1e-4, f"{k} after 2 epochs")
