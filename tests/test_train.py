"""The fit loop: learning on a synthetic set, history, reproducibility, SGD steps against the
formula worked out in the test, data order, BLAS pinning, argument checks, callbacks, and what
the model holds when a step fails."""
from __future__ import annotations

import re

import numpy as np
import pytest
from threadpoolctl import threadpool_info

import cnn.parallel.base as parallel_base
from cnn.backends.numpy import NumpyBackend
from cnn.data import load_dataset, make_blobs_images
from cnn.layers import layers_from_spec
from cnn.model import Sequential
from cnn.parallel import SequentialStrategy
from cnn.train import Callback, History, fit

TINY_SPEC = [
    {"type": "conv2d", "filters": 3, "kernel_size": 3, "activation": "relu"},
    {"type": "maxpool2d", "pool_size": 2},
    {"type": "flatten"},
    {"type": "dense", "units": 4},
]


class CopyingBackend(NumpyBackend):
    """The NumPy ops, but ``asarray`` copies, as a device backend does: fit then trains its own
    parameter arrays and must copy them back into the model at the end."""

    name = "numpy-copying"

    def asarray(self, x):
        return np.array(x, copy=True, order="C")


BACKENDS = [pytest.param("numpy", id="numpy"), pytest.param(CopyingBackend(), id="copying")]


def tiny_model(dtype=np.float64, seed=0):
    return Sequential(layers_from_spec(TINY_SPEC), (1, 6, 6), dtype=dtype, seed=seed)


def tiny_data(n=24, dtype=np.float64, seed=0):
    x, y = make_blobs_images(n, classes=4, size=6, seed=seed, dtype=dtype)
    return x, y


# ---- learning ----------------------------------------------------------------------------------
# A conv layer and a linear read-out. (mnist_small's max pooling also learns the blobs, but
# slowly and noisily: the class signal is spread thinly over the pixels.)
BLOBS_SPEC = [{"type": "conv2d", "filters": 8, "kernel_size": 3, "activation": "relu"},
              {"type": "flatten"},
              {"type": "dense", "units": 10}]


@pytest.fixture(scope="module")
def blobs_run():
    data = load_dataset("blobs", limit=1000, test_limit=300, seed=0)
    model = Sequential.from_spec(BLOBS_SPEC, input_shape=data.input_shape, seed=0)
    hist = model.fit(data.x_train, data.y_train, epochs=3, batch_size=32,
                     optimizer={"type": "sgd", "lr": 0.1}, seed=0,
                     validation_data=(data.x_test, data.y_test), verbose=0)
    return data, model, hist


def test_fit_learns_blobs(blobs_run):
    data, model, hist = blobs_run
    assert data.input_shape == (1, 8, 8)
    assert hist.epochs == 3
    assert hist.history["val_accuracy"][-1] > 0.9
    assert model.evaluate(data.x_test, data.y_test)["accuracy"] > 0.9
    assert hist.history["loss"][-1] < hist.history["loss"][0]
    # chance level is 0.1 and the untrained loss about ln 10
    assert hist.history["loss"][0] < np.log(10)


DOCUMENTED_KEYS = ["loss", "accuracy", "val_loss", "val_accuracy", "lr", "time", "compute_time",
                   "comm_time", "data_time", "transfer_time", "eval_time", "images_per_sec"]


def test_history_has_every_documented_key(blobs_run):
    data, model, hist = blobs_run
    for key in DOCUMENTED_KEYS + ["compile_time"]:
        assert f"``{key}``" in fit.__doc__, f"{key} is no longer documented in fit"
    # and nothing documented is missing from this list
    returns = fit.__doc__.split("Returns:")[1]
    assert set(re.findall(r"``(\w+)``", returns)) - {"info"} == set(DOCUMENTED_KEYS) | {
        "compile_time", "wall_time"}
    assert isinstance(hist, History)
    for key in DOCUMENTED_KEYS:
        assert len(hist.history[key]) == 3, key
    assert hist.history["epoch"] == [1, 2, 3]
    for key in ["time", "compute_time", "comm_time", "data_time", "transfer_time", "eval_time"]:
        assert all(t >= 0 for t in hist.history[key]), key
    assert hist.history["comm_time"] == [0.0] * 3  # one worker: nothing to communicate
    for i in range(3):
        parts = sum(hist.history[k][i]
                    for k in ["compute_time", "comm_time", "data_time", "transfer_time"])
        assert parts <= hist.history["time"][i] * 1.0001 + 1e-6
        np.testing.assert_allclose(hist.history["images_per_sec"][i],
                                   1000 / hist.history["time"][i], rtol=1e-9)
        assert 0 <= hist.history["accuracy"][i] <= 1 and 0 <= hist.history["val_accuracy"][i] <= 1
    assert hist.info["compile_time"] >= 0
    # the whole call: every epoch, every evaluation and the compile inside it
    assert hist.info["wall_time"] >= (sum(hist.history["time"]) + sum(hist.history["eval_time"])
                                      + hist.info["compile_time"])
    assert hist.info["batch_size"] == 32 and hist.info["strategy"] == "sequential"
    # the last epoch's validation numbers describe the returned model
    final = model.evaluate(data.x_test, data.y_test)
    np.testing.assert_allclose(hist.history["val_loss"][-1], final["loss"], rtol=1e-6)
    assert hist.history["val_accuracy"][-1] == final["accuracy"]
    frame = hist.to_frame()
    assert frame.shape[0] == 3 and set(DOCUMENTED_KEYS) <= set(frame.columns)


def _timing_rows(table: str) -> dict[str, tuple[float, str]]:
    rows = {}
    for line in table.splitlines()[2:]:
        phase, seconds, share = line.split()[:3]
        rows[phase] = (float(seconds), share)
    return rows


def test_timing_table_gives_each_phase_its_seconds_and_share():
    """Hand-made numbers: each phase's sum over the epochs, its share of the wall time, and
    the wall time the phases leave as ``other``."""
    hist = History(history={"epoch": [1, 2], "data_time": [0.5, 0.5],
                            "compute_time": [2.5, 3.5], "comm_time": [1.0, 1.0],
                            "transfer_time": [0.0, 0.5], "eval_time": [0.25, 0.25]},
                   info={"compile_time": 2.0, "wall_time": 20.0})
    table = hist.timing_table()
    assert "2 epoch(s)" in table and "20.00 s" in table
    assert _timing_rows(table) == {
        "data": (1.0, "5.0%"), "compute": (6.0, "30.0%"), "communication": (2.0, "10.0%"),
        "transfer": (0.5, "2.5%"), "evaluation": (0.5, "2.5%"), "compile": (2.0, "10.0%"),
        "other": (8.0, "40.0%")}
    # a trainer without a column (PyTorch's one worker has no comm_time) counts 0 for it
    del hist.history["comm_time"]
    assert _timing_rows(hist.timing_table())["communication"] == (0.0, "0.0%")


def test_timing_table_of_a_fit_adds_up_to_its_wall_time(blobs_run):
    _, _, hist = blobs_run
    rows = _timing_rows(hist.timing_table())
    h = hist.history
    for phase, column in (("data", "data_time"), ("compute", "compute_time"),
                          ("evaluation", "eval_time")):
        assert rows[phase][0] == pytest.approx(sum(h[column]), abs=0.005 + 1e-9)
    assert sum(seconds for seconds, _ in rows.values()) == pytest.approx(
        hist.info["wall_time"], abs=0.04)  # seven figures rounded to 0.01 s


def test_history_loss_is_mean_over_examples():
    """A single full-batch epoch: the recorded loss and accuracy are those of the initial
    weights on the whole set, computed here by hand from the logits."""
    x, y = tiny_data(12)
    model = tiny_model()
    logits, _ = model.forward(x)
    lse = np.log(np.exp(logits - logits.max(1, keepdims=True)).sum(1)) + logits.max(1)
    hist = model.fit(x, y, epochs=1, batch_size=12, shuffle=False, verbose=0)
    np.testing.assert_allclose(hist.history["loss"][0], np.mean(lse - logits[np.arange(12), y]),
                               rtol=1e-12)
    assert hist.history["accuracy"][0] == np.mean(logits.argmax(1) == y)


# ---- reproducibility ---------------------------------------------------------------------------
def _fit_weights(model_seed, fit_seed, dtype=np.float32):
    x, y = tiny_data(40, dtype=dtype)
    model = tiny_model(dtype=dtype, seed=model_seed)
    model.fit(x, y, epochs=2, batch_size=8, optimizer={"lr": 0.05, "momentum": 0.9},
              seed=fit_seed, verbose=0)
    return model.get_weights()


def test_same_seed_bit_identical_different_seed_differs():
    a, b = _fit_weights(1, 7), _fit_weights(1, 7)
    for k in a:
        assert a[k].shape == b[k].shape
        np.testing.assert_array_equal(a[k], b[k])
    c = _fit_weights(1, 8)   # same initial weights, another data order
    assert any(not np.array_equal(a[k], c[k]) for k in a)
    d = _fit_weights(2, 7)   # other initial weights, same data order
    assert any(not np.array_equal(a[k], d[k]) for k in a)


# ---- SGD steps against the formula -----------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
def test_one_step_equals_hand_sgd_step(backend):
    x, y = tiny_data(10)
    model = tiny_model(seed=3)
    w0 = model.get_weights()
    loss, correct, grads = model.loss_and_grads(x, y)
    lr = 0.3
    expected = {k: w0[k] - lr * grads[k] for k in w0}
    hist = model.fit(x, y, epochs=1, batch_size=10, optimizer={"type": "sgd", "lr": lr},
                     shuffle=False, verbose=0, backend=backend)
    for k in w0:
        assert model.params[k].shape == w0[k].shape
        assert not np.array_equal(model.params[k], w0[k]), k
        np.testing.assert_allclose(model.params[k], expected[k], rtol=0, atol=1e-12, err_msg=k)
    np.testing.assert_allclose(hist.history["loss"][0], float(loss), rtol=1e-12)


def _hand_momentum_sgd(model, x, y, batch, steps, lr, m):
    """``v = m v - lr g; w += v`` written out, batches taken in order."""
    w = model.get_weights()
    v = {k: np.zeros_like(p) for k, p in w.items()}
    for s in range(steps):
        xb, yb = x[s * batch:(s + 1) * batch], y[s * batch:(s + 1) * batch]
        _, _, g = model.loss_and_grads(xb, yb, params=w)
        for k in w:
            v[k] = m * v[k] - lr * g[k]
            w[k] = w[k] + v[k]
    return w


@pytest.mark.parametrize("backend", BACKENDS)
def test_momentum_three_steps_equal_hand_formula(backend):
    x, y = tiny_data(15)
    model = tiny_model(seed=4)
    expected = _hand_momentum_sgd(model, x, y, batch=5, steps=3, lr=0.1, m=0.9)
    model.fit(x, y, epochs=1, batch_size=5, optimizer={"type": "sgd", "lr": 0.1, "momentum": 0.9},
              shuffle=False, verbose=0, backend=backend)
    for k in expected:
        np.testing.assert_allclose(model.params[k], expected[k], rtol=0, atol=1e-12, err_msg=k)


def test_momentum_velocity_carries_across_epochs():
    """Two epochs of one full batch each = two momentum steps on the same batch."""
    x, y = tiny_data(6)
    model = tiny_model(seed=5)
    xx, yy = np.concatenate([x, x]), np.concatenate([y, y])
    expected = _hand_momentum_sgd(model, xx, yy, batch=6, steps=2, lr=0.2, m=0.5)
    model.fit(x, y, epochs=2, batch_size=6, optimizer={"lr": 0.2, "momentum": 0.5},
              shuffle=False, verbose=0)
    for k in expected:
        np.testing.assert_allclose(model.params[k], expected[k], rtol=0, atol=1e-12, err_msg=k)


# ---- data order ---------------------------------------------------------------------------------
class Recording(SequentialStrategy):
    """The sequential strategy, remembering which examples each step saw (pixel 0 = index)."""

    def __init__(self):
        super().__init__(threads=1)
        self.batches = []

    def step(self, xb, yb):
        self.batches.append(np.asarray(xb[:, 0, 0, 0]).astype(int).tolist())
        return super().step(xb, yb)


def _indexed_data(n):
    x, y = tiny_data(n)
    x[:, 0, 0, 0] = np.arange(n)
    return x, y


def test_shuffle_false_keeps_order():
    x, y = _indexed_data(11)
    rec = Recording()
    fit(tiny_model(), x, y, epochs=2, batch_size=4, shuffle=False, strategy=rec, verbose=0)
    one_epoch = [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10]]   # the last batch is partial
    assert rec.batches == one_epoch + one_epoch


def test_shuffle_visits_every_example_once_per_epoch():
    x, y = _indexed_data(11)
    rec = Recording()
    fit(tiny_model(), x, y, epochs=3, batch_size=4, shuffle=True, seed=2, strategy=rec, verbose=0)
    assert [len(b) for b in rec.batches] == [4, 4, 3] * 3
    epochs = [sum(rec.batches[3 * e:3 * e + 3], []) for e in range(3)]
    for order in epochs:
        assert sorted(order) == list(range(11))
    assert epochs[0] != list(range(11)) and epochs[0] != epochs[1]
    rec2 = Recording()
    fit(tiny_model(), x, y, epochs=3, batch_size=4, shuffle=True, seed=2, strategy=rec2, verbose=0)
    assert rec2.batches == rec.batches


# ---- BLAS threads -------------------------------------------------------------------------------
class BlasProbe(Callback):
    def __init__(self):
        self.seen = []

    def on_epoch_end(self, epoch, logs):
        self.seen.append([lib["num_threads"] for lib in threadpool_info()
                          if lib["user_api"] == "blas"])


def _blas_threads():
    return [lib["num_threads"] for lib in threadpool_info() if lib["user_api"] == "blas"]


def test_blas_pinned_to_one_thread_during_fit():
    before = _blas_threads()
    assert before, "no BLAS library found by threadpoolctl"
    probe = BlasProbe()
    x, y = tiny_data(8)
    fit(tiny_model(), x, y, epochs=2, batch_size=4, callbacks=[probe], verbose=0)
    assert probe.seen == [[1] * len(before)] * 2
    assert _blas_threads() == before   # restored afterwards


def test_blas_threads_none_leaves_blas_alone():
    before = _blas_threads()
    probe = BlasProbe()
    x, y = tiny_data(8)
    fit(tiny_model(), x, y, epochs=1, batch_size=4, callbacks=[probe], blas_threads=None, verbose=0)
    assert probe.seen == [before]


# ---- bad arguments ------------------------------------------------------------------------------
@pytest.mark.parametrize("kwargs, match", [
    ({"epochs": 0}, "epochs=0"),
    ({"epochs": -2}, "epochs=-2"),
    ({"epochs": 1.5}, "epochs=1.5"),
    ({"batch_size": 0}, "batch_size=0"),
    ({"strategy": "bogus"}, "'bogus'"),
    ({"threads": 0}, "threads=0"),
    ({"threads": 2}, "threads=2"),          # the sequential strategy has one worker
    ({"backend": "bogus"}, "'bogus'"),
    ({"optimizer": {"type": "bogus"}}, "'bogus'"),
    ({"optimizer": {"lr": 0}}, "lr=0"),
    ({"optimizer": {"lr": 0.1, "momentum": 1.0}}, "momentum=1.0"),
])
def test_bad_arguments_raise_valueerror(kwargs, match):
    x, y = tiny_data(8)
    model = tiny_model()
    w0 = model.get_weights()
    with pytest.raises(ValueError, match=match):
        fit(model, x, y, verbose=0, **kwargs)
    for k in w0:
        np.testing.assert_array_equal(model.params[k], w0[k])


def test_bad_data_raises():
    x, y = tiny_data(8)
    model = tiny_model()
    with pytest.raises(TypeError, match="float32"):
        fit(model, x.astype(np.float32), y, verbose=0)
    with pytest.raises(ValueError, match="label 4"):
        fit(model, x, np.full(8, 4), verbose=0)
    with pytest.raises(ValueError, match="N=0"):
        fit(model, x[:0], y[:0], verbose=0)
    with pytest.raises(ValueError, match="label -1"):
        fit(model, x, y, validation_data=(x, np.full(8, -1)), verbose=0)


# ---- callbacks and progress ---------------------------------------------------------------------
class StopAt(Callback):
    def __init__(self, stop_epoch):
        self.stop_epoch, self.began, self.epochs = stop_epoch, 0, []

    def on_train_begin(self, history):
        self.began += 1

    def on_epoch_end(self, epoch, logs):
        self.epochs.append(epoch)
        return epoch == self.stop_epoch


def test_callback_returning_true_stops_after_that_epoch():
    x, y = tiny_data(8)
    stop, other = StopAt(2), StopAt(None)
    hist = fit(tiny_model(), x, y, epochs=5, batch_size=4, callbacks=[stop, other], verbose=0)
    assert hist.epochs == 2 and hist.history["epoch"] == [1, 2]
    assert stop.epochs == [1, 2] and other.epochs == [1, 2]   # every callback sees epoch 2
    assert stop.began == other.began == 1


def test_progress_and_verbose_output(capsys):
    x, y = tiny_data(10)
    calls = []
    fit(tiny_model(), x, y, epochs=2, batch_size=4, verbose=1,
        progress=lambda e, done, n: calls.append((e, done, n)))
    assert calls == [(1, 4, 10), (1, 8, 10), (1, 10, 10), (2, 4, 10), (2, 8, 10), (2, 10, 10)]
    out = capsys.readouterr().out
    assert "epoch 1/2" in out and "epoch 2/2" in out


# ---- failures inside a step ---------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
def test_exception_in_step_keeps_last_completed_step(monkeypatch, backend):
    x, y = tiny_data(20)
    model = tiny_model(seed=6)
    expected = _hand_momentum_sgd(model, x, y, batch=5, steps=2, lr=0.1, m=0.9)
    real_step = parallel_base.SequentialStrategy.step
    calls = []

    def failing_step(self, xb, yb):
        calls.append(len(yb))
        if len(calls) == 3:
            raise RuntimeError("boom in step 3")
        return real_step(self, xb, yb)

    monkeypatch.setattr(parallel_base.SequentialStrategy, "step", failing_step)
    with pytest.raises(RuntimeError, match="boom in step 3"):
        model.fit(x, y, epochs=1, batch_size=5, optimizer={"lr": 0.1, "momentum": 0.9},
                  shuffle=False, verbose=0, backend=backend)
    assert len(calls) == 3
    for k in expected:
        np.testing.assert_allclose(model.params[k], expected[k], rtol=0, atol=1e-12, err_msg=k)


@pytest.mark.parametrize("backend", BACKENDS)
def test_exception_in_backward_keeps_last_completed_step(monkeypatch, backend):
    """A failure in the middle of a step's computation (after the forward pass, before the
    update) leaves the weights of the steps before it."""
    x, y = tiny_data(20)
    model = tiny_model(seed=7)
    expected = _hand_momentum_sgd(model, x, y, batch=5, steps=2, lr=0.1, m=0.0)
    real = NumpyBackend.dense_backward
    calls = []

    def failing_dense_backward(self, dout, cache, need_dx=True, ws=None):
        calls.append(1)
        if len(calls) == 3:
            raise FloatingPointError("boom in backward 3")
        return real(self, dout, cache, need_dx, ws=ws)

    monkeypatch.setattr(NumpyBackend, "dense_backward", failing_dense_backward)
    with pytest.raises(FloatingPointError, match="boom in backward 3"):
        model.fit(x, y, epochs=1, batch_size=5, optimizer={"lr": 0.1}, shuffle=False, verbose=0,
                  backend=backend)
    for k in expected:
        np.testing.assert_allclose(model.params[k], expected[k], rtol=0, atol=1e-12, err_msg=k)


# ---- fast by default: backend="auto" -----------------------------------------------------------
def test_auto_is_numba_where_it_imports_else_numpy(monkeypatch):
    import cnn.backends as backends
    from cnn.backends.registry import BACKENDS as RECORDS, BackendInfo
    assert backends.resolve_backend("numpy") == "numpy"  # a named backend is itself
    assert backends.resolve_backend("auto") == "numba"  # installed in the test environment
    assert backends.get_backend("auto") is backends.get_backend("numba")
    # Numba missing (its module does not import): auto falls back to NumPy
    monkeypatch.setitem(RECORDS, "numba", BackendInfo("cnn.no_such_module", "NumbaBackend"))
    monkeypatch.delitem(backends._INSTANCES, "numba", raising=False)
    assert backends.resolve_backend("auto") == "numpy"
    assert backends.get_backend("auto") is backends.get_backend("numpy")


def test_fit_defaults_to_auto_prints_and_records_the_backend(capsys):
    x, y = tiny_data(8)
    model = tiny_model()
    assert model.backend == "auto"
    hist = fit(model, x, y, epochs=1, batch_size=4, verbose=1)
    assert hist.info["backend"] == "numba" and hist.info["backend_requested"] == "auto"
    out = capsys.readouterr().out
    assert out.splitlines()[0] == ("training on backend numba (auto: the fastest CPU backend "
                                   "installed)")
    # a backend named by the caller is the one used, and said so
    hist = fit(tiny_model(), x, y, epochs=1, batch_size=4, verbose=1, backend="numpy")
    assert hist.info["backend"] == hist.info["backend_requested"] == "numpy"
    assert capsys.readouterr().out.splitlines()[0] == "training on backend numpy"
