"""The study grid's ``optimizer`` and ``lr_schedule`` axes: canonical values, the lr/momentum
defaults that go with them, unchanged keys for runs that do not use them, every bad value
refused naming it, and one tiny run through the study's child that trains what the row says."""
from __future__ import annotations

import numpy as np
import pytest

from cnn.study.grid import expand_grid, run_optimizer

BASE = {"dataset": "blobs", "train_size": 64, "test_size": 32}


def runs(**axes):
    return expand_grid({**BASE, **axes}, include_unavailable=True)


def test_defaults_are_the_presets_and_leave_the_keys_alone():
    plain = runs()[0]
    assert plain["optimizer"] == "" and plain["lr_schedule"] == ""
    # written out, the preset's optimizer (mnist_small: sgd) and no schedule are the same run
    same = runs(optimizer="SGD", lr_schedule="constant")[0]
    assert same["run_key"] == plain["run_key"]
    assert (plain["lr"], plain["momentum"]) == (0.1, 0.0)


def test_another_optimizer_takes_its_own_defaults():
    adam = runs(optimizer="adam")[0]
    assert (adam["optimizer"], adam["lr"], adam["momentum"]) == ("adam", 0.001, 0.0)
    rms = runs(optimizer={"type": "rmsprop", "rho": 0.8, "centered": True}, momentum=0.5)[0]
    assert rms["optimizer"] == "rmsprop:centered=true,rho=0.8" and rms["momentum"] == 0.5
    cos = runs(lr_schedule="cosine:warmup_steps=2")[0]
    assert cos["lr_schedule"] == "cosine:warmup_steps=2"
    keys = {r["run_key"] for r in runs(optimizer=[None, "adam", "adamw"],
                                       lr_schedule=[None, "cosine", "step:step_size=1,unit=epoch"])}
    assert len(keys) == 9


def test_run_optimizer_builds_the_spec_the_run_trains_with():
    from cnn.presets import get_preset
    spec = get_preset("mnist_small")
    cfg = runs(optimizer="sgd:nesterov=true", momentum=0.9, lr=0.05, lr_schedule="cosine")[0]
    assert run_optimizer(cfg, spec) == {"type": "sgd", "nesterov": True, "lr": 0.05,
                                        "momentum": 0.9, "schedule": {"type": "cosine"}}
    cfg = runs(optimizer="adam:beta_2=0.99")[0]
    assert run_optimizer(cfg, spec) == {"type": "adam", "beta_2": 0.99, "lr": 0.001}
    assert run_optimizer(runs()[0], spec) == {"type": "sgd", "lr": 0.1, "momentum": 0.0}


@pytest.mark.parametrize("axes, match", [
    ({"optimizer": "lion"}, "'lion'"),
    ({"optimizer": "adam:beta_1=2"}, "beta_1=2"),
    ({"optimizer": "adam:lr=0.1"}, "'lr' as its own axis"),
    ({"optimizer": 3}, "optimizer=3"),
    ({"optimizer": "adam", "momentum": 0.9}, "adam takes no momentum"),
    ({"optimizer": "sgd:nesterov=true"}, "nesterov=True needs momentum"),
    ({"lr_schedule": "sine"}, "'sine'"),
    ({"lr_schedule": "cosine:alpha=3"}, "alpha=3"),
    ({"lr_schedule": "plateau"}, "plateau"),
    ({"optimizer": "adam", "path": "torch"}, "plain SGD"),
    ({"model": "xor_mlp", "dataset": "xor", "filters": 4}, "no conv2d layer"),
])
def test_bad_values_are_refused_naming_them(axes, match):
    with pytest.raises(ValueError, match=match):
        runs(**axes)


def test_a_run_trains_the_optimizer_and_schedule_of_its_row(tmp_path):
    """The study's child process trains exactly what the row says: same weights as a fit with
    that optimizer spec, computed here."""
    from cnn.data import load_dataset
    from cnn.model import Sequential
    from cnn.study.child import execute_run
    cfg = expand_grid({"dataset": "xor", "model": "xor_mlp", "optimizer": "rmsprop",
                       "lr_schedule": "step:step_size=10", "train_size": 200, "test_size": 50,
                       "epochs": 2})[0]
    assert cfg["filters"] == 0  # a feed-forward preset
    got = execute_run(cfg)
    data = load_dataset("xor", limit=200, test_limit=50, seed=0)
    model = Sequential.from_spec("xor_mlp", input_shape=data.input_shape, seed=cfg["seed"])
    h = model.fit(data.x_train, data.y_train, epochs=2, batch_size=cfg["batch_size"],
                  optimizer={"type": "rmsprop", "lr": 0.001,
                             "schedule": {"type": "step", "step_size": 10}},
                  seed=cfg["seed"], validation_data=(data.x_test, data.y_test), verbose=0)
    np.testing.assert_allclose([e["train_loss"] for e in got["epochs"]], h.history["loss"],
                               rtol=1e-6)
    np.testing.assert_allclose([e["test_accuracy"] for e in got["epochs"]],
                               h.history["val_accuracy"])
