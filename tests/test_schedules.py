"""Learning-rate schedules (cnn.schedules) against their formulas and Keras's schedules and
ReduceLROnPlateau callback; their resolution by fit; the rate every step is trained with."""
from __future__ import annotations

import math

import numpy as np
import pytest

from cnn import build_model
from cnn.callbacks import Callback
from cnn.schedules import (Constant, CosineDecay, CosineRestarts, Cyclic, LinearWarmup,
                           ReduceLROnPlateau, StepDecay, make_schedule, schedule_names)
from cnn.train import fit

STEPS = range(0, 60)


def keras_values(schedule, steps=STEPS):
    keras = pytest.importorskip("keras")
    k = schedule.keras()
    assert isinstance(k, keras.optimizers.schedules.LearningRateSchedule)
    return np.array([float(k(s)) for s in steps])


def values(schedule, steps=STEPS):
    return np.array([schedule(s) for s in steps])


# ---- formulas -----------------------------------------------------------------------------------
def test_step_decay_formula_and_keras():
    s = StepDecay(0.1, step_size=7, factor=0.5)
    np.testing.assert_allclose(values(s), [0.1 * 0.5 ** (t // 7) for t in STEPS], rtol=1e-15)
    assert s(0) == 0.1 and s(6) == 0.1 and s(7) == 0.05 and s(14) == 0.025
    np.testing.assert_allclose(values(s), keras_values(s), rtol=1e-6)


def test_cosine_formula_and_keras():
    s = CosineDecay(0.1, decay_steps=40, alpha=0.05)
    want = [0.1 * (0.95 * 0.5 * (1 + math.cos(math.pi * min(t, 40) / 40)) + 0.05) for t in STEPS]
    np.testing.assert_allclose(values(s), want, rtol=1e-15)
    assert s(0) == pytest.approx(0.1) and s(20) == pytest.approx(0.1 * (0.95 / 2 + 0.05))
    assert s(40) == s(59) == pytest.approx(0.005)
    np.testing.assert_allclose(values(s), keras_values(s), rtol=1e-6)


@pytest.mark.parametrize("t_mul, m_mul", [(1.0, 1.0), (2.0, 1.0), (2.0, 0.5), (1.5, 0.8)])
def test_cosine_restarts_formula_and_keras(t_mul, m_mul):
    s = CosineRestarts(0.1, first_decay_steps=6, t_mul=t_mul, m_mul=m_mul, alpha=0.1)
    # by hand: periods of 6, 6 t_mul, 6 t_mul^2 ... steps, the i-th starting at m_mul^i
    start, length, i, want = 0.0, 6.0, 0, []
    for t in STEPS:
        while t >= start + length:
            start, length, i = start + length, length * t_mul, i + 1
        f = (t - start) / length
        want.append(0.1 * (0.9 * m_mul ** i * 0.5 * (1 + math.cos(math.pi * f)) + 0.1))
    np.testing.assert_allclose(values(s), want, rtol=1e-14)
    assert s(6) == pytest.approx(0.1 * (0.9 * m_mul + 0.1))  # a warm restart
    # Keras computes the period in float32 via a logarithm: it can land on the wrong side of
    # a restart exactly at a period boundary; compare away from boundaries
    boundaries, b, length = set(), 0.0, 6.0
    while b < 100:
        boundaries |= {round(b)}
        b, length = b + length, length * t_mul
    steps = [t for t in STEPS if t not in boundaries]
    np.testing.assert_allclose(values(s, steps), keras_values(s, steps), rtol=2e-5)


def test_cyclic_triangular_by_hand():
    s = Cyclic(0.01, max_lr=0.05, step_size=4)
    # up 4 steps from 0.01 to 0.05, down 4 steps, repeat
    want = [0.01, 0.02, 0.03, 0.04, 0.05, 0.04, 0.03, 0.02, 0.01, 0.02, 0.03]
    np.testing.assert_allclose(values(s, range(11)), want, rtol=1e-12)
    s2 = Cyclic(0.01, max_lr=0.05, step_size=4, mode="triangular2")
    assert s2(4) == pytest.approx(0.05) and s2(12) == pytest.approx(0.03)  # half the amplitude
    s3 = Cyclic(0.01, max_lr=0.05, step_size=4, mode="exp_range", gamma=0.9)
    assert s3(4) == pytest.approx(0.01 + 0.04 * 0.9 ** 4)


def test_linear_warmup_then_cosine_equals_keras():
    s = make_schedule({"type": "cosine", "decay_steps": 30, "alpha": 0.0, "warmup_steps": 10,
                       "warmup_start_lr": 0.001}, 0.1)
    assert isinstance(s, LinearWarmup)
    np.testing.assert_allclose(values(s, range(11)),
                               [0.001 + 0.099 * t / 10 for t in range(10)] + [0.1], rtol=1e-12)
    assert s(25) == pytest.approx(0.1 * 0.5 * (1 + math.cos(math.pi * 15 / 30)))
    np.testing.assert_allclose(values(s), keras_values(s), rtol=1e-5)


def test_warmup_alone_is_constant_afterwards():
    s = make_schedule({"type": "warmup", "warmup_steps": 4}, 0.2)
    np.testing.assert_allclose(values(s, range(7)), [0, 0.05, 0.1, 0.15, 0.2, 0.2, 0.2])
    np.testing.assert_allclose(values(s), keras_values(s), rtol=1e-6, atol=1e-9)


def test_constant():
    assert values(Constant(0.3), range(3)).tolist() == [0.3] * 3


# ---- reduce on plateau --------------------------------------------------------------------------
VAL_LOSS = [1.0, 0.8, 0.79995, 0.81, 0.8, 0.7, 0.71, 0.72, 0.73, 0.69, 0.7, 0.71, 0.75, 0.8]


@pytest.mark.parametrize("kwargs", [{"patience": 2}, {"patience": 1, "cooldown": 2},
                                    {"patience": 0, "min_lr": 0.002, "factor": 0.5},
                                    {"patience": 2, "min_delta": 0.05}])
def test_plateau_follows_keras_callback(kwargs):
    """Our schedule and Keras's ReduceLROnPlateau callback, told the same val_loss sequence,
    take the same decisions epoch by epoch."""
    keras = pytest.importorskip("keras")
    ours = ReduceLROnPlateau(0.01, monitor="val_loss", **kwargs)
    kopt = keras.optimizers.SGD(learning_rate=0.01)

    class Holder:  # what the callback reads: model.optimizer
        optimizer = kopt
    cb = keras.callbacks.ReduceLROnPlateau(monitor="val_loss", **kwargs)
    cb.set_model(Holder())
    cb.on_train_begin()
    for epoch, v in enumerate(VAL_LOSS):
        ours.on_epoch_end(epoch + 1, {"val_loss": v})
        cb.on_epoch_end(epoch, {"val_loss": v})
        assert ours(0) == pytest.approx(float(kopt.learning_rate), rel=1e-6), (epoch, kwargs)


def test_plateau_keeps_its_rate_across_fits_and_restarts_its_counters():
    """One ReduceLROnPlateau object over two fits: the rate reached stays, the best value and
    the patience count restart (Keras's callback on_train_begin)."""
    s = ReduceLROnPlateau(0.1, patience=1, factor=0.5)
    for v in (1.0, 1.0):
        s.on_epoch_end(1, {"val_loss": v})
    assert s(0) == pytest.approx(0.05)
    s.on_train_begin()
    s.on_epoch_end(1, {"val_loss": 5.0})  # the first value of a fit is the new best
    assert s(0) == pytest.approx(0.05) and s.best == 5.0 and s.wait == 0


def test_plateau_on_accuracy_goes_up():
    s = ReduceLROnPlateau(0.1, monitor="val_accuracy", patience=1, factor=0.5)
    for acc in (0.5, 0.6, 0.6, 0.6):
        s.on_epoch_end(1, {"val_accuracy": acc})
    assert s(0) == pytest.approx(0.025)
    with pytest.raises(ValueError, match="monitor='f1'"):
        ReduceLROnPlateau(0.1, monitor="f1")
    assert ReduceLROnPlateau(0.1, monitor="f1", mode="max").mode == "max"


# ---- fit: the rate of every step, resolution, plateau ---------------------------------------------
SPEC = {"input_shape": [1, 4, 4], "layers": [{"type": "flatten"}, {"type": "dense", "units": 3}]}


class Rates(Callback):
    def __init__(self):
        self.lrs = []

    def on_step_end(self, step, logs):
        self.lrs.append(logs["lr"])


def _data(n=40, seed=0):
    rng = np.random.default_rng(seed)
    return rng.standard_normal((n, 1, 4, 4)).astype(np.float32), rng.integers(0, 3, n)


@pytest.mark.parametrize("strategy, threads", [("sequential", 1), ("sync", 2), ("average", 2),
                                               ("hogwild", 2)])
def test_fit_trains_each_step_at_the_schedules_rate(strategy, threads):
    x, y = _data(40)
    rates = Rates()
    h = fit(build_model(SPEC), x, y, epochs=3, batch_size=5, strategy=strategy, threads=threads,
            optimizer={"type": "sgd", "lr": 0.1}, verbose=0, callbacks=[rates],
            lr_schedule={"type": "step", "step_size": 1, "factor": 0.5, "unit": "epoch"})
    per_epoch = 40 // (5 * (1 if strategy in ("sequential", "sync") else threads))
    want = [0.1 * 0.5 ** (i // per_epoch) for i in range(3 * per_epoch)]
    np.testing.assert_allclose(rates.lrs, want, rtol=1e-15)
    np.testing.assert_allclose(h.history["lr"], [0.1, 0.05, 0.025])
    assert h.info["optimizer"]["schedule"] == {"type": "step", "step_size": per_epoch,
                                               "factor": 0.5}


def test_cosine_without_horizon_anneals_to_the_end_of_the_fit():
    x, y = _data(40)
    rates = Rates()
    model = build_model(SPEC)
    fit(model, x, y, epochs=2, batch_size=10, optimizer={"type": "adam", "lr": 0.01},
        lr_schedule="cosine", verbose=0, callbacks=[rates])
    np.testing.assert_allclose(rates.lrs, [0.01 * 0.5 * (1 + math.cos(math.pi * t / 8))
                                           for t in range(8)], rtol=1e-12)
    # a second fit continues from step 8: its horizon ends with it (step 16)
    rates.lrs.clear()
    fit(model, x, y, epochs=1, batch_size=10, optimizer={"type": "adam", "lr": 0.01},
        lr_schedule="cosine", verbose=0, callbacks=[rates])
    np.testing.assert_allclose(rates.lrs, [0.01 * 0.5 * (1 + math.cos(math.pi * t / 12))
                                           for t in range(8, 12)], rtol=1e-12)


def test_plateau_in_fit_reduces_on_validation_loss():
    x, y = _data(60)
    model = build_model(SPEC)
    h = fit(model, x, y, epochs=6, batch_size=10, validation_split=0.25, verbose=0,
            optimizer={"type": "sgd", "lr": 5.0},  # far too large: val_loss will not improve
            lr_schedule={"type": "plateau", "patience": 1, "factor": 0.5, "min_delta": 0})
    ref = ReduceLROnPlateau(5.0, patience=1, factor=0.5, min_delta=0)
    want = []
    for v in h.history["val_loss"]:
        want.append(ref(0))
        ref.on_epoch_end(0, {"val_loss": v})
    np.testing.assert_allclose(h.history["lr"], want)
    assert min(h.history["lr"]) < 5.0


def test_plateau_without_validation_is_refused_before_training():
    x, y = _data(20)
    with pytest.raises(ValueError, match="val_loss.*validation_split"):
        fit(build_model(SPEC), x, y, verbose=0, lr_schedule="plateau")


def test_resolve_epoch_units():
    s = make_schedule({"type": "cosine_restarts", "first_decay_steps": 2, "unit": "epoch",
                       "warmup_steps": 1}, 0.1)
    r = s.resolve(steps_per_epoch=5, end_step=100)
    assert r.warmup_steps == 5 and r.after.first_decay_steps == 10 and r.unit == "step"
    with pytest.raises(ValueError, match="unresolved"):
        s(3)
    assert CosineDecay(0.1).resolve(4, 20).decay_steps == 20


# ---- specs and validation -----------------------------------------------------------------------
def test_names_and_aliases():
    assert schedule_names() == ["constant", "step", "cosine", "cosine_restarts", "cyclic",
                                "warmup", "plateau"]
    assert isinstance(make_schedule("sgdr" and {"type": "sgdr", "first_decay_steps": 3}, 0.1),
                      CosineRestarts)
    assert isinstance(make_schedule({"type": "triangular", "max_lr": 1, "step_size": 2}, 0.1),
                      Cyclic)
    for s in [StepDecay(0.1, 3), CosineDecay(0.1, 9), Cyclic(0.1, 0.3, 2),
              make_schedule({"type": "cosine", "decay_steps": 5, "warmup_steps": 2}, 0.1),
              ReduceLROnPlateau(0.1, patience=3)]:
        assert make_schedule(s.config(), 0.1).config() == s.config()


BAD = [
    ({"type": "bogus"}, "'bogus'"), ({"type": "step"}, "step_size"),
    ({"type": "step", "step_size": 0}, "step_size=0"), ({"type": "step", "step_size": 2, "factor": 0},
                                                         "factor=0"),
    ({"type": "step", "step_size": 2, "factor": 1.5}, "factor=1.5"),
    ({"type": "cosine", "decay_steps": -3}, "decay_steps=-3"),
    ({"type": "cosine", "alpha": 2}, "alpha=2"), ({"type": "cosine", "decay_steps": float("nan")},
                                                  "decay_steps=nan"),
    ({"type": "cosine_restarts", "first_decay_steps": 5, "t_mul": 0.5}, "t_mul=0.5"),
    ({"type": "cyclic", "max_lr": 0.01, "step_size": 2}, "max_lr=0.01"),
    ({"type": "cyclic", "max_lr": 1, "step_size": 2, "mode": "sine"}, "mode='sine'"),
    ({"type": "warmup", "warmup_steps": 0}, "warmup_steps=0"),
    ({"type": "cosine", "warmup_start_lr": 0.01}, "warmup_steps"),
    ({"type": "cosine", "warmup_steps": 2, "warmup_start_lr": 5}, "start_lr=5"),
    ({"type": "plateau", "factor": 1.0}, "factor=1.0"), ({"type": "plateau", "patience": -1},
                                                         "patience=-1"),
    ({"type": "plateau", "mode": "up"}, "mode='up'"), ({"type": "cosine", "unit": "day"}, "unit='day'"),
    ({"type": "cosine", "decay": 3}, "'decay'"), (42, "42"),
]


@pytest.mark.parametrize("spec, match", BAD, ids=[m for _, m in BAD])
def test_bad_schedules_are_refused_naming_the_value(spec, match):
    with pytest.raises(ValueError, match=match):
        make_schedule(spec, 0.1)


def test_bad_step():
    with pytest.raises(ValueError, match="step=-1"):
        StepDecay(0.1, 2)(-1)
    with pytest.raises(TypeError, match="integer"):
        StepDecay(0.1, 2)(1.5)
