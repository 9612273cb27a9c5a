"""Callbacks beside the fit loop (cnn.callbacks): early stopping and checkpoints against Keras's
callbacks and against the weights each epoch really had, step hooks (evaluation every k steps,
stopping mid-epoch, their time kept out of the epoch's), the validation split, live curves."""
from __future__ import annotations

import time

import numpy as np
import pytest

from cnn import build_model
from cnn.callbacks import Callback, EarlyStopping, LiveCurves, ModelCheckpoint
from cnn.data import load_dataset, stratified_split
from cnn.model import read_weights
from cnn.train import fit

SPEC = {"input_shape": [1, 8, 8], "layers": [
    {"type": "conv2d", "filters": 4, "kernel_size": 3, "activation": "relu"},
    {"type": "flatten"}, {"type": "dense", "units": 10}]}


@pytest.fixture(scope="module")
def blobs():
    return load_dataset("blobs", limit=300, test_limit=60, seed=2)


class Probe(Callback):
    """Records the model's weights and the logs at the end of every epoch."""

    def __init__(self):
        self.weights, self.logs = [], []

    def on_epoch_end(self, epoch, logs):
        self.weights.append(self.run.model.get_weights())
        self.logs.append(dict(logs))


class Scripted(Callback):
    """Overwrites val_loss with a scripted sequence (so the decisions are known)."""

    def __init__(self, values):
        self.values = list(values)

    def on_epoch_end(self, epoch, logs):
        logs["val_loss"] = self.values[epoch - 1]


VAL = [1.0, 0.8, 0.85, 0.7, 0.75, 0.76, 0.9, 0.6, 0.95, 0.99]


def keras_early_stopping(values, **kwargs):
    """(stopped epoch, best epoch), 1-based, of Keras's EarlyStopping told ``values``."""
    keras = pytest.importorskip("keras")
    cb = keras.callbacks.EarlyStopping(monitor="val_loss", **kwargs)

    class M:
        stop_training = False

        def get_weights(self):
            return []
    model = M()
    cb.set_model(model)
    cb.on_train_begin()
    for epoch, v in enumerate(values):
        cb.on_epoch_end(epoch, {"val_loss": v})
        if model.stop_training:
            return epoch + 1, cb.best_epoch + 1
    return 0, cb.best_epoch + 1


@pytest.mark.parametrize("kwargs", [{"patience": 0}, {"patience": 1}, {"patience": 2},
                                    {"patience": 1, "min_delta": 0.08},
                                    {"patience": 1, "baseline": 0.75},
                                    {"patience": 1, "start_from_epoch": 3}])
def test_early_stopping_decides_as_keras_and_restores_the_best_epoch(blobs, kwargs):
    probe = Probe()
    es = EarlyStopping(restore_best_weights=True, **kwargs)
    model = build_model(SPEC, seed=0)
    h = fit(model, blobs.x_train, blobs.y_train, epochs=len(VAL), batch_size=32, verbose=0,
            validation_split=0.2, callbacks=[Scripted(VAL), probe, es],
            optimizer={"type": "sgd", "lr": 0.05})
    stopped, best = keras_early_stopping(VAL, **kwargs)
    assert es.stopped_epoch == stopped
    assert h.epochs == (stopped or len(VAL))
    assert es.best_epoch == best
    for k, v in probe.weights[best - 1].items():  # the best epoch's weights, restored
        np.testing.assert_array_equal(model.params[k], v)
    assert h.info["early_stopping"]["best_epoch"] == best


def test_checkpoint_writes_the_best_weights(blobs, tmp_path):
    probe = Probe()
    ck = ModelCheckpoint(tmp_path / "best.npz")
    every = ModelCheckpoint(tmp_path / "e{epoch}-{val_loss:.2f}.npz", save_best_only=False)
    fit(build_model(SPEC, seed=0), blobs.x_train, blobs.y_train, epochs=len(VAL), batch_size=32,
        verbose=0, validation_split=0.2, callbacks=[Scripted(VAL), probe, ck, every])
    assert ck.best_epoch == 8 and ck.best == 0.6
    saved = read_weights(tmp_path / "best.npz")
    for k, v in probe.weights[7].items():
        np.testing.assert_array_equal(saved[k], v)
    assert [p.name for p in ck.saved] == ["best.npz"] * 4  # epochs 1, 2, 4 and 8 improved
    assert sorted(p.name for p in every.saved)[0] == "e1-1.00.npz" and len(every.saved) == 10


def test_monitored_metric_needs_validation_before_training(blobs):
    model = build_model(SPEC, seed=0)
    w0 = model.get_weights()
    for cb in (EarlyStopping(), ModelCheckpoint("x.npz")):
        with pytest.raises(ValueError, match="'val_loss'.*validation_split"):
            fit(model, blobs.x_train, blobs.y_train, verbose=0, callbacks=[cb])
    for k, v in w0.items():
        np.testing.assert_array_equal(model.params[k], v)
    # a training metric needs no validation data
    fit(model, blobs.x_train[:64], blobs.y_train[:64], verbose=0,
        callbacks=[EarlyStopping(monitor="loss")])


@pytest.mark.parametrize("make, match", [
    (lambda: EarlyStopping(patience=-1), "patience=-1"),
    (lambda: EarlyStopping(patience=1.5), "patience=1.5"),
    (lambda: EarlyStopping(mode="lowest"), "mode='lowest'"),
    (lambda: EarlyStopping(monitor="f1"), "monitor='f1'"),
    (lambda: EarlyStopping(min_delta=float("nan")), "min_delta=nan"),
    (lambda: EarlyStopping(restore_best_weights="yes"), "restore_best_weights='yes'"),
    (lambda: ModelCheckpoint(""), "path=''"),
    (lambda: LiveCurves(every_steps=0), "every_steps=0"),
])
def test_bad_callback_arguments_name_the_value(make, match):
    with pytest.raises(ValueError, match=match):
        make()


# ---- the validation split ---------------------------------------------------------------------
def test_validation_split_is_carved_stratified_from_the_training_data(blobs):
    model = build_model(SPEC, seed=0)
    h = fit(model, blobs.x_train, blobs.y_train, epochs=1, batch_size=32, verbose=0,
            validation_split=0.2, seed=3)
    x_t, y_t, x_v, y_v = stratified_split(blobs.x_train, blobs.y_train, 0.2, 3)
    assert h.info["train_examples"] == len(y_t) == 240 and h.info["validation_examples"] == 60
    # stratified: every class contributes its share (within one example) to the 60
    assert np.all(np.abs(np.bincount(y_v, minlength=10) - 0.2 * np.bincount(blobs.y_train)) < 1)
    val = model.evaluate(x_v, y_v)
    assert h.history["val_loss"][0] == pytest.approx(val["loss"], rel=1e-6)
    assert h.history["val_accuracy"][0] == val["accuracy"]


@pytest.mark.parametrize("kwargs, match", [
    ({"validation_split": 1.0}, "validation_split=1.0"),
    ({"validation_split": -0.1}, "validation_split=-0.1"),
    ({"validation_split": "0.1"}, "validation_split='0.1'"),
    ({"validation_split": 0.1, "validation_data": "x"}, "not both"),
])
def test_bad_validation_split(blobs, kwargs, match):
    with pytest.raises(ValueError, match=match):
        fit(build_model(SPEC), blobs.x_train, blobs.y_train, verbose=0, **kwargs)


# ---- step hooks: time-to-accuracy -------------------------------------------------------------
class EvalEvery(Callback):
    """Evaluates every ``k`` steps on validation data; stops at the first step that reaches
    ``target`` (time-to-accuracy)."""

    def __init__(self, k, data, target, sleep=0.0):
        self.k, self.data, self.target, self.sleep = k, data, target, sleep
        self.seen, self.reached = [], None

    def on_step_end(self, step, logs):
        self.seen.append({k: v for k, v in logs.items() if not callable(v)})
        time.sleep(self.sleep)
        if step % self.k == 0:
            acc = logs["evaluate"](*self.data)["accuracy"]
            if acc >= self.target:
                self.reached = (step, logs["elapsed"], acc)
                return True
        return None


def test_step_hooks_evaluate_every_k_steps_and_stop_mid_epoch(blobs):
    x_t, y_t, x_v, y_v = stratified_split(blobs.x_train, blobs.y_train, 0.2, 0)
    hook = EvalEvery(3, (x_v, y_v), target=0.6)
    model = build_model(SPEC, seed=0)
    h = fit(model, x_t, y_t, epochs=20, batch_size=16, verbose=0, callbacks=[hook],
            optimizer={"type": "adam", "lr": 0.01})
    step, elapsed, acc = hook.reached
    assert step % 3 == 0 and acc >= 0.6
    assert len(hook.seen) == step and model.optimizer_state.step == step  # stopped right there
    assert [s["step"] for s in hook.seen] == list(range(1, step + 1))
    assert [s["global_step"] for s in hook.seen] == list(range(1, step + 1))
    assert hook.seen[-1]["examples"] == sum(s["examples"] - p["examples"] for s, p in
                                            zip(hook.seen[1:], hook.seen)) + hook.seen[0]["examples"]
    assert all(b["elapsed"] >= a["elapsed"] for a, b in zip(hook.seen, hook.seen[1:]))
    # the model returned is the one that reached the target
    assert model.evaluate(x_v, y_v)["accuracy"] == acc
    # the stopping epoch covers only the examples it trained on
    per_epoch = -(-len(y_t) // 16)
    assert h.epochs == -(-step // per_epoch) and h.history["examples"][-1] <= len(y_t)


def test_step_hook_time_is_not_training_time(blobs):
    hook = EvalEvery(10 ** 6, None, 1.0, sleep=0.02)
    h = fit(build_model(SPEC), blobs.x_train[:64], blobs.y_train[:64], epochs=1, batch_size=8,
            verbose=0, callbacks=[hook])
    assert h.history["callback_time"][0] >= 8 * 0.02 > h.history["time"][0]
    assert h.info["callback_time"] == pytest.approx(h.history["callback_time"][0])


# ---- live curves --------------------------------------------------------------------------------
def test_live_curves_write_a_png_outside_notebooks(blobs, tmp_path):
    curves = LiveCurves(tmp_path / "c.png", every_steps=5)
    assert curves.notebook is False
    fit(build_model(SPEC), blobs.x_train, blobs.y_train, epochs=2, batch_size=32, verbose=0,
        validation_split=0.2, callbacks=[curves])
    assert (tmp_path / "c.png").stat().st_size > 1000
    assert curves.epochs["epoch"] == [1, 2] and len(curves.epochs["val_loss"]) == 2
    assert len(curves.batches) == 2 * 8  # 240 examples, batches of 32
    labels = {line.get_label() for ax in curves.figure().axes for line in ax.lines}
    assert {"batch loss", "loss", "val loss", "accuracy", "val accuracy"} <= labels
