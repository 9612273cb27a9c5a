"""Divergence is detected, not trained through: a non-finite loss stops ``fit`` with
:class:`cnn.train.DivergedError` naming the epoch and step (or keeps going on request), non-finite
inputs are refused before training starts, and the CLI exits non-zero without saving NaN weights.
(Issue 13, item 2.)"""
from __future__ import annotations

import pickle
import threading
import warnings

import numpy as np
import pytest

from cnn import DivergedError
from cnn.cli import main
from cnn.data import make_blobs_images
from cnn.layers import layers_from_spec
from cnn.model import Sequential
from cnn.parallel import SequentialStrategy

# NumPy's own overflow/NaN warnings are the expected symptom here, not news
pytestmark = [pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning"),
              pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")]

SPEC = [{"type": "conv2d", "filters": 2, "kernel_size": 3, "activation": "relu"},
        {"type": "flatten"},
        {"type": "dense", "units": 4}]


def model_and_data(n=40, dtype=np.float32):
    x, y = make_blobs_images(n, classes=4, size=6, seed=0, dtype=dtype)
    return Sequential(layers_from_spec(SPEC), (1, 6, 6), dtype=dtype, seed=0), x, y


class PoisonAfter(SequentialStrategy):
    """The sequential step, but after ``after`` steps it writes NaN into the weights (after the
    loss was read back), as an overflowing update would."""

    def __init__(self, threads=1, after=1):
        super().__init__(threads)
        self.after, self.calls = after, 0

    def step(self, xb, yb):
        out = super().step(xb, yb)
        self.calls += 1
        if self.calls == self.after:
            for p in self.params.values():
                p[...] = np.nan
        return out


def test_huge_lr_raises_naming_epoch_and_step():
    model, x, y = model_and_data()
    with pytest.raises(DivergedError, match=r"epoch 1, step \d+") as exc:
        model.fit(x, y, epochs=3, batch_size=8, optimizer={"type": "sgd", "lr": 1e30}, verbose=0)
    err = exc.value
    assert err.epoch == 1 and 1 <= err.step <= 5 and err.phase == "train"
    assert not np.isfinite(err.loss)
    assert err.history is not None and err.history.epochs == 0
    assert isinstance(err, FloatingPointError)


def test_divergence_in_a_later_epoch_keeps_the_history_of_earlier_ones():
    model, x, y = model_and_data()
    # 5 steps per epoch: the poisoned update is the last one of epoch 2, found at epoch 3 step 1
    with pytest.raises(DivergedError) as exc:
        model.fit(x, y, epochs=4, batch_size=8, strategy=PoisonAfter(after=10), verbose=0,
                  shuffle=False)
    err = exc.value
    assert (err.epoch, err.step, err.phase) == (3, 1, "train")
    assert err.history.epochs == 2 and all(np.isfinite(err.history.history["loss"]))
    assert "epoch 3, step 1" in str(err)


def test_nonfinite_validation_loss_raises_after_that_epoch():
    model, x, y = model_and_data()
    with pytest.raises(DivergedError) as exc:
        model.fit(x, y, epochs=2, batch_size=8, strategy=PoisonAfter(after=5), verbose=0,
                  validation_data=(x, y))
    assert (exc.value.epoch, exc.value.step, exc.value.phase) == (1, 5, "validation")
    assert "after epoch 1" in str(exc.value)


def test_nonfinite_weights_after_the_last_update_raise():
    """The last step's loss is read before its update: the weights it leaves are checked."""
    model, x, y = model_and_data()
    with pytest.raises(DivergedError) as exc:
        model.fit(x, y, epochs=1, batch_size=8, strategy=PoisonAfter(after=5), verbose=0)
    assert (exc.value.epoch, exc.value.phase) == (1, "weights")
    assert exc.value.history.epochs == 1


def test_continue_keeps_going_counts_and_warns_once():
    model, x, y = model_and_data()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        hist = model.fit(x, y, epochs=2, batch_size=8, strategy=PoisonAfter(after=2), verbose=0,
                         shuffle=False, on_nonfinite="continue", validation_data=(x, y))
    assert hist.epochs == 2
    assert hist.info["first_nonfinite"] == (1, 3)
    assert hist.info["nonfinite_steps"] == 8       # steps 3-5 of epoch 1 and all 5 of epoch 2
    runtime = [w for w in caught if issubclass(w.category, RuntimeWarning)
               and "non-finite training loss" in str(w.message)]
    assert len(runtime) == 1 and "epoch 1, step 3" in str(runtime[0].message)


def test_finite_run_records_no_nonfinite_steps():
    model, x, y = model_and_data()
    hist = model.fit(x, y, epochs=1, batch_size=8, optimizer={"type": "sgd", "lr": 0.05},
                     verbose=0)
    assert hist.info["nonfinite_steps"] == 0 and hist.info["first_nonfinite"] is None


def test_bad_policy_is_refused_before_training():
    model, x, y = model_and_data()
    before = model.get_weights()
    with pytest.raises(ValueError, match="on_nonfinite must be one of .* Received on_nonfinite='ignore'"):
        model.fit(x, y, epochs=1, verbose=0, on_nonfinite="ignore")
    assert all(np.array_equal(before[k], model.params[k]) for k in before)


def test_threads_strategy_diverges_cleanly_and_ends_its_workers():
    model, x, y = model_and_data()
    alive = threading.active_count()
    with pytest.raises(DivergedError):
        model.fit(x, y, epochs=2, batch_size=8, strategy="sync", threads=2,
                  optimizer={"type": "sgd", "lr": 1e30}, verbose=0)
    assert threading.active_count() == alive


def test_diverged_error_pickles_with_its_attributes():
    err = DivergedError(2, 7, float("nan"))
    back = pickle.loads(pickle.dumps(err))
    assert (back.epoch, back.step, back.phase) == (2, 7, "train") and np.isnan(back.loss)
    assert str(back) == str(err)


# ---- non-finite inputs ---------------------------------------------------------------------
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_nonfinite_inputs_refused_before_training(bad, dtype):
    model, x, y = model_and_data(dtype=dtype)
    x = x.copy()
    x[17, 0, 2, 3] = bad
    before = model.get_weights()
    with pytest.raises(ValueError, match=r"non-finite .* 1 of 40 examples, the first at index 17"):
        model.fit(x, y, epochs=1, batch_size=8, verbose=0)
    assert all(np.array_equal(before[k], model.params[k]) for k in before)
    with pytest.raises(ValueError, match="non-finite"):
        model.check_inputs(x)
    with pytest.raises(ValueError, match="non-finite"):
        model.evaluate(x, y)
    good, _, _ = model_and_data(dtype=dtype)
    with pytest.raises(ValueError, match="non-finite"):
        good.fit(*model_and_data(dtype=dtype)[1:], epochs=1, verbose=0, validation_data=(x, y))


# ---- the CLI -------------------------------------------------------------------------------
CLI = ["train", "--dataset", "blobs", "--quiet", "--limit", "64", "--test-limit", "16",
       "--epochs", "2"]


def test_cli_divergence_exits_nonzero_and_saves_nothing(tmp_path, capsys):
    save = tmp_path / "w.npz"
    rc = main([*CLI, "--lr", "1e30", "--save", str(save)])
    err = capsys.readouterr().err
    assert rc == 3
    assert "training diverged" in err and "epoch 1, step" in err
    assert "not saved" in err and "--on-nonfinite continue" in err
    assert not save.exists() and not list(tmp_path.iterdir())


def test_cli_continue_runs_every_epoch_but_refuses_to_save_nan_weights(tmp_path, capsys):
    save = tmp_path / "w.npz"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        rc = main([*CLI, "--lr", "1e30", "--on-nonfinite", "continue", "--save", str(save)])
    out, err = capsys.readouterr()
    assert rc == 3
    assert "non-finite" in err and "not saved" in err
    assert not save.exists()


def test_cli_continue_with_a_finite_run_saves(tmp_path, capsys):
    save = tmp_path / "w.npz"
    rc = main([*CLI, "--on-nonfinite", "continue", "--save", str(save)])
    assert rc == 0, capsys.readouterr().err
    assert save.is_file()
