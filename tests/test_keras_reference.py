"""The Keras reference against our NumPy path, from identical weights and inputs.

Tolerances: ``assert_close(a, ref, rel)`` is ``assert_allclose(a, ref, rtol=rel,
atol=rel * max|ref|)``, i.e. every entry within ``rel`` relatively, or within ``rel`` of the
array's scale for entries near zero (where a pure relative test is meaningless). float32:
logits and loss 1e-5, gradients 1e-4, weights after SGD steps 1e-5; float64: 1e-10 throughout.
The weight-transfer round trips are exact.
"""
from __future__ import annotations

import numpy as np
import pytest

from cnn import layers as layers_mod
from cnn.backends import get_backend
from cnn.data import load_dataset
from cnn.reference.compare import diff_table, relative_difference
from cnn.reference.keras import (SUPPORTED_LAYERS, build_keras_model, compile_keras_model,
                                 configure_threads, fit_keras, from_keras_images,
                                 get_keras_weights, keras_loss_and_grads, keras_to_ours,
                                 ours_to_keras, thread_settings, to_keras_images)
from cnn.layers import Dense, Flatten, Layer
from cnn.model import Sequential, build_model
from cnn.optim import SGD
from cnn.train import fit

tf = pytest.importorskip("tensorflow")
# TensorFlow fixes its thread pools at its first op, once per process: pin them at collection,
# before any test runs TensorFlow, so fit_keras(threads=1) below finds them already in force.
configure_threads(1)

TOL = {np.float32: {"logits": 1e-5, "loss": 1e-5, "grads": 1e-4, "weights": 1e-5},
       np.float64: {"logits": 1e-10, "loss": 1e-10, "grads": 1e-10, "weights": 1e-10}}

# Every layer type and option: conv 'same' with stride 2 on even sizes (TF's asymmetric split,
# the odd pixel bottom/right), a non-square kernel with 'same', overlapping pooling (stride !=
# pool), relu, flatten of a (C, H, W) map feeding a dense layer through a relu, dense layers.
ALL_LAYERS = {"input_shape": [3, 12, 10], "layers": [
    {"type": "conv2d", "filters": 4, "kernel_size": 3, "stride": 2, "padding": "same",
     "activation": "relu"},
    {"type": "maxpool2d", "pool_size": 3, "stride": 1},
    {"type": "conv2d", "filters": 5, "kernel_size": [2, 3], "padding": "same"},
    {"type": "maxpool2d", "pool_size": 2, "stride": 1},
    {"type": "relu"},
    {"type": "conv2d", "filters": 3, "kernel_size": 2, "stride": 2, "padding": "valid"},
    {"type": "flatten"}, {"type": "relu"},
    {"type": "dense", "units": 7, "activation": "relu"},
    {"type": "dense", "units": 4}]}
# a flatten whose (C, H, W) order is the output itself (no dense absorbs it)
FLATTEN_LOGITS = {"input_shape": [2, 6, 6], "layers": [
    {"type": "conv2d", "filters": 3, "kernel_size": 3, "stride": 3, "padding": "same"},
    {"type": "flatten"}]}
# a stride-2 'same' conv on an even size whose padding is split (0, 1)
SAME_STRIDE2 = {"input_shape": [1, 8, 8], "layers": [
    {"type": "conv2d", "filters": 2, "kernel_size": 3, "stride": 2, "padding": "same"},
    {"type": "flatten"}, {"type": "dense", "units": 3}]}
FLAT_INPUT = {"input_shape": [6], "layers": [
    {"type": "dense", "units": 5, "activation": "relu"}, {"type": "dense", "units": 3}]}
BLOBS = {"input_shape": [1, 8, 8], "layers": [
    {"type": "conv2d", "filters": 8, "kernel_size": 3, "padding": "same", "activation": "relu"},
    {"type": "maxpool2d", "pool_size": 2}, {"type": "flatten"}, {"type": "dense", "units": 10}]}


def assert_close(actual, ref, rel, what=""):
    ref = np.asarray(ref)
    np.testing.assert_allclose(actual, ref, rtol=rel, atol=rel * float(np.abs(ref).max()),
                               err_msg=what)


def batch(model, n, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, *model.input_shape)).astype(model.dtype)
    return x, rng.integers(0, model.num_classes, n)


# ---- layouts (NumPy only) --------------------------------------------------------------------
def test_flatten_order_is_absorbed_by_the_dense_rows():
    """Our flatten of (C, H, W) times our dense rows == Keras's flatten of (H, W, C) times the
    transferred rows: the permutation is the right one, not merely an invertible one."""
    model = build_model(SAME_STRIDE2, seed=1)
    rng = np.random.default_rng(0)
    fmap = rng.standard_normal((5, *model.layers[0].output_shape)).astype(np.float32)
    ours = fmap.reshape(5, -1) @ model.params["dense.w"]
    kernel = ours_to_keras(model)["dense"][0]
    theirs = to_keras_images(fmap).reshape(5, -1) @ kernel
    np.testing.assert_allclose(theirs, ours, rtol=1e-6, atol=1e-6)
    assert np.array_equal(from_keras_images(to_keras_images(fmap)), fmap)


@pytest.mark.parametrize("spec", [ALL_LAYERS, "mnist_small", "cifar_tutorial", FLAT_INPUT])
def test_layout_conversions_are_inverse(spec):
    model = build_model(spec, seed=2)
    back = keras_to_ours(model, ours_to_keras(model))
    assert back.keys() == model.params.keys()
    for k, v in model.params.items():
        assert back[k].dtype == v.dtype and np.array_equal(back[k], v), k


def test_comparison_helpers():
    ref = np.array([[1.0, -4.0], [2.0, 0.0]])
    assert relative_difference(ref, ref) == 0.0
    assert relative_difference(ref + 0.01, ref) == pytest.approx(0.01 / 4)
    assert relative_difference(np.zeros(3), np.zeros(3)) == 0.0
    table = diff_table({"a": ref + 0.02, "b": np.ones(2)}, {"a": ref, "b": np.ones(2)})
    assert list(table.index) == ["a", "b"]
    assert table.loc["a", "rel_diff"] == pytest.approx(0.005)
    assert table.loc["b", "max_abs_diff"] == 0.0
    with pytest.raises(ValueError, match="keys differ"):
        diff_table({"a": ref}, {"b": ref})


# ---- unsupported specs -----------------------------------------------------------------------
class Scale(Layer):
    """A layer type only our package knows."""

    type = "scale"

    def forward(self, params, x, backend):
        return x * 2, None

    def backward(self, params, dout, cache, backend, need_dx=True):
        return dout * 2, {}


class MyDense(Dense):
    """A subclass of a supported layer: its maths may differ, so it is not converted."""


def test_layer_keras_cannot_express_raises_naming_it(monkeypatch):
    monkeypatch.setitem(layers_mod.LAYER_TYPES, "scale", Scale)
    model = build_model({"input_shape": [1, 4, 4], "layers": [
        {"type": "flatten"}, {"type": "scale", "name": "doubler"}, {"type": "dense", "units": 2}]})
    with pytest.raises(NotImplementedError, match=r"'doubler' \(type 'scale', class Scale\)"):
        build_keras_model(model)
    x, y = batch(model, 4)
    with pytest.raises(NotImplementedError, match="cannot express"):
        fit_keras(model, x, y)
    sub = Sequential([Flatten(), MyDense(2)], (1, 4, 4))
    with pytest.raises(NotImplementedError, match="class MyDense"):
        build_keras_model(sub)
    assert Scale not in SUPPORTED_LAYERS


# ---- forward, loss, gradients ----------------------------------------------------------------
CASES = {"all_layers-float32": (ALL_LAYERS, np.float32), "all_layers-float64": (ALL_LAYERS, np.float64),
         "flatten_logits": (FLATTEN_LOGITS, np.float32), "same_stride2": (SAME_STRIDE2, np.float32),
         "flat_input-float64": (FLAT_INPUT, np.float64), "mnist_small": ("mnist_small", np.float32),
         "cifar_tutorial": ("cifar_tutorial", np.float32)}


@pytest.mark.parametrize("spec, dtype", list(CASES.values()), ids=list(CASES))
def test_logits_loss_and_gradients_match_keras(spec, dtype):
    model = build_model(spec, dtype=dtype, seed=3)
    kmodel = build_keras_model(model)
    assert {np.dtype(w.dtype) for w in kmodel.weights} == {np.dtype(dtype)}
    x, y = batch(model, 6, seed=4)
    tol = TOL[dtype]
    logits = model.predict_logits(x)
    klogits = kmodel(to_keras_images(x)).numpy()
    assert klogits.shape == logits.shape and klogits.dtype == logits.dtype
    assert_close(klogits, logits, tol["logits"], "logits")

    loss, _, grads = model.loss_and_grads(x, y)
    kloss, klogits_tape, kgrads = keras_loss_and_grads(kmodel, model, x, y)
    assert_close(klogits_tape, logits, tol["logits"], "logits under the tape")
    assert_close(kloss, float(loss), tol["loss"], "loss")
    assert kgrads.keys() == grads.keys()
    for k in grads:
        assert kgrads[k].shape == grads[k].shape
        assert_close(kgrads[k], grads[k], tol["grads"], f"gradient of {k}")


@pytest.mark.parametrize("spec", [ALL_LAYERS, "mnist_small"])
def test_weight_round_trips_are_exact(spec):
    model = build_model(spec, seed=5)
    kmodel = build_keras_model(model)
    back = get_keras_weights(kmodel, model)
    for k, v in model.params.items():
        assert np.array_equal(back[k], v), k
    # keras -> ours -> keras, from weights that never were ours
    rng = np.random.default_rng(6)
    fresh = [rng.standard_normal(w.shape).astype(np.float32) for w in kmodel.get_weights()]
    kmodel.set_weights(fresh)
    model.set_weights(get_keras_weights(kmodel, model))
    other = build_keras_model(model)
    for a, b in zip(other.get_weights(), fresh):
        assert np.array_equal(a, b)


# ---- SGD steps -------------------------------------------------------------------------------
@pytest.mark.parametrize("momentum, dtype", [(0.0, np.float32), (0.9, np.float32),
                                             (0.0, np.float64), (0.875, np.float64)])
def test_sgd_steps_leave_equal_weights(momentum, dtype):
    """Three steps on three batches, Keras's own ``train_on_batch`` against ours (with
    momentum, steps 2 and 3 use the velocity). In float64 the momentum is one float32 can hold
    exactly: Keras casts momentum through float32 (see ``keras_optimizer``)."""
    model = build_model(ALL_LAYERS, dtype=dtype, seed=7)
    kmodel = build_keras_model(model)
    opt = SGD(lr=0.1, momentum=momentum)
    compile_keras_model(kmodel, model, opt)
    be = get_backend("numpy")
    state = opt.init_state(model.params, be)
    for step in range(3):
        x, y = batch(model, 8, seed=10 + step)
        kmodel.train_on_batch(to_keras_images(x), y)
        _, _, grads = model.loss_and_grads(x, y)
        opt.update(model.params, grads, state, be)
    after = get_keras_weights(kmodel, model)
    for k, v in model.params.items():
        assert_close(after[k], v, TOL[dtype]["weights"], f"{k} after 3 steps")


# ---- fit_keras -------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def blobs():
    # 300 examples: batches of 32 leave a partial last batch (12)
    return load_dataset("blobs", limit=300, test_limit=100, seed=1)


@pytest.fixture(scope="module")
def trained_pair(blobs):
    kw = dict(epochs=4, batch_size=32, optimizer={"type": "sgd", "lr": 0.1, "momentum": 0.9},
              seed=11, validation_data=(blobs.x_test, blobs.y_test), verbose=0)
    ours, theirs = build_model(BLOBS, seed=8), build_model(BLOBS, seed=8)
    initial = theirs.get_weights()
    h_ours = fit(ours, blobs.x_train, blobs.y_train, **kw)
    h_keras = fit_keras(theirs, blobs.x_train, blobs.y_train, threads=1, **kw)
    return ours, theirs, h_ours, h_keras, initial


def test_fit_keras_learns(trained_pair):
    _, theirs, _, h, initial = trained_pair
    # chance is 10%; our path reaches val accuracy ~0.86 and loss 2.1 -> 0.16 here
    assert h.history["loss"][-1] < 0.25 * h.history["loss"][0]
    assert h.history["val_accuracy"][-1] > 0.75
    # the trained weights were copied back into our model
    assert not np.array_equal(theirs.params["dense.w"], initial["dense.w"])


def test_fit_keras_history_has_fits_columns(trained_pair, blobs):
    _, _, h_ours, h, _ = trained_pair
    assert set(h.history) == set(h_ours.history)
    assert h.epochs == 4 and h.history["epoch"] == [1, 2, 3, 4]
    for key, values in h.history.items():
        assert len(values) == 4 and all(np.isfinite(values)), key
    for e in range(4):
        assert h.history["time"][e] == pytest.approx(h.history["data_time"][e]
                                                     + h.history["compute_time"][e])
        assert h.history["images_per_sec"][e] == pytest.approx(300 / h.history["time"][e])
        assert h.history["transfer_time"][e] == 0.0 and h.history["eval_time"][e] > 0
    # the tracing time is a difference of two timed warm-up rounds (clipped at 0): on a loaded
    # machine the second round can be the slower, so only its presence and sign are checked
    assert np.isfinite(h.info["compile_time"]) and h.info["compile_time"] >= 0
    assert h.info["tf_intra_op_threads"] == 1 and h.info["tf_inter_op_threads"] == 1
    assert h.info["strategy"] == "keras" and h.info["threads"] == 1
    assert len(h.info["fit_call_overhead"]) == 4
    # without validation data both leave out the validation columns alike
    m1, m2 = build_model(BLOBS, seed=9), build_model(BLOBS, seed=9)
    x, y = blobs.x_train[:64], blobs.y_train[:64]
    assert (set(fit_keras(m1, x, y, batch_size=32).history)
            == set(fit(m2, x, y, batch_size=32, verbose=0).history))


def test_fit_keras_follows_fits_batches_and_reaches_its_weights(trained_pair):
    """Same seed -> same epoch orders as cnn.train.fit, so four epochs of momentum SGD end at
    the same weights (float32 rounding only) and report the same losses."""
    ours, theirs, h_ours, h, _ = trained_pair
    for key in ("loss", "accuracy", "val_loss", "val_accuracy"):
        np.testing.assert_allclose(h.history[key], h_ours.history[key], rtol=1e-4, err_msg=key)
    for k, v in ours.params.items():
        assert_close(theirs.params[k], v, 1e-4, f"{k} after 4 epochs")


def test_fit_keras_runs_time_to_accuracy_as_fit_does(blobs):
    """The step hook: evaluations every 3 steps on the training clock (it leaves the
    evaluations out), and training stops at the first that reaches the target, leaving the
    weights it evaluated (our model, evaluating them itself, finds the same accuracy)."""
    from cnn.study.tta import TimeToAccuracy
    model = build_model(BLOBS, seed=8)
    tta = TimeToAccuracy(blobs.x_test, blobs.y_test, every=3, target=0.7)
    h = fit_keras(model, blobs.x_train, blobs.y_train, epochs=8, batch_size=32,
                  optimizer={"type": "sgd", "lr": 0.1, "momentum": 0.9}, seed=11, threads=1,
                  callbacks=[tta])
    assert tta.reached is not None and tta.reached is tta.trace[-1]
    steps = [entry[0] for entry in tta.trace]
    assert steps == list(range(3, 3 * len(steps) + 1, 3))
    # 300 examples a batch of 32: 10 steps an epoch, the last of 12 examples
    assert [entry[1] for entry in tta.trace] == [300 * (s // 10) + min(s % 10 * 32, 300)
                                                 for s in steps]
    clocks = [entry[2] for entry in tta.trace]
    assert all(0 < a < b for a, b in zip(clocks, clocks[1:]))
    assert clocks[-1] == pytest.approx(sum(h.history["time"]), rel=0.05)
    assert all(t > 0 for t in h.history["callback_time"])
    assert h.epochs == -(-steps[-1] // 10) and h.history["examples"][-1] == tta.trace[-1][1] \
        - 300 * (h.epochs - 1)
    assert abs(model.evaluate(blobs.x_test, blobs.y_test)["accuracy"] - tta.reached[3]) <= 0.011


def test_fit_keras_checks_its_arguments(blobs):
    model = build_model(BLOBS)
    with pytest.raises(ValueError, match="epochs"):
        fit_keras(model, blobs.x_train, blobs.y_train, epochs=0)
    with pytest.raises(TypeError, match="dtype"):
        fit_keras(model, blobs.x_train.astype(np.float64), blobs.y_train)


def test_threads_cannot_change_once_tensorflow_runs():
    (tf.constant(1.0) + 1).numpy()  # TensorFlow has started
    configure_threads(1)  # the settings in force: fine
    assert thread_settings() == {"intra_op": 1, "inter_op": 1}
    with pytest.raises(RuntimeError, match="separate processes"):
        configure_threads(2)
    with pytest.raises(ValueError, match="threads=0"):
        configure_threads(0)
