"""The second edition's measurements: the fit loop's step hook, time-to-accuracy on a
validation split, micro-batch accumulation and the PyTorch reference as one-core contenders,
the per-step equivalence table, the run order, and the device profile (its plan as a dry run,
its CUDA runs under the simulator on a tiny shape). Each is checked against an independent
reference: the sequential path, PyTorch itself, hand-counted steps."""
from __future__ import annotations

import json
import time

import numpy as np
import pandas as pd
import pytest

from cnn.data import load_dataset
from cnn.model import Sequential, resolve_spec
from cnn.study import PROFILES, describe_plan, expand_grid, run_study
from cnn.study.grid import plan_order
from cnn.train import Callback, fit

TINY = {"dataset": "blobs", "model": "mnist_small", "train_size": 64, "test_size": 32,
        "batch_size": 32, "epochs": 1, "timeout": 300}


def _model(data, dtype=np.float64, seed=0):
    return Sequential.from_spec(resolve_spec("mnist_small"), input_shape=data.input_shape,
                                dtype=dtype, seed=seed)


@pytest.fixture(scope="module")
def blobs():
    return load_dataset("blobs", limit=100, test_limit=40, dtype=np.float64)


# ---- the step hook ------------------------------------------------------------------------------
class Recorder(Callback):
    def __init__(self, stop_at=None, sleep=0.0):
        self.logs, self.stop_at, self.sleep = [], stop_at, sleep

    def on_step_end(self, step, logs):
        self.logs.append({k: v for k, v in logs.items() if k not in ("params", "evaluate")})
        time.sleep(self.sleep)
        return self.stop_at is not None and step >= self.stop_at


def test_step_hook_counts_steps_examples_and_leaves_its_time_out(blobs):
    rec = Recorder(sleep=0.05)
    hist = fit(_model(blobs), blobs.x_train, blobs.y_train, epochs=2, batch_size=32,
               verbose=0, callbacks=[rec])
    # 100 examples in batches of 32: 4 steps per epoch (32, 32, 32, 4)
    assert [r["step"] for r in rec.logs] == list(range(1, 9))
    assert [r["examples"] for r in rec.logs] == [32, 64, 96, 100, 132, 164, 196, 200]
    assert [r["epoch"] for r in rec.logs] == [1] * 4 + [2] * 4
    elapsed = [r["elapsed"] for r in rec.logs]
    assert elapsed == sorted(elapsed)
    # 8 sleeps of 50 ms are the callback's, not training time
    assert sum(hist.history["time"]) < 0.4 <= sum(hist.history["callback_time"])
    assert elapsed[-1] <= sum(hist.history["time"]) + 1e-9


def test_step_hook_stops_training(blobs):
    rec = Recorder(stop_at=3)
    hist = fit(_model(blobs), blobs.x_train, blobs.y_train, epochs=5, batch_size=32,
               verbose=0, callbacks=[rec])
    assert len(rec.logs) == 3 and hist.epochs == 1 and hist.history["examples"] == [96]


def test_step_hook_evaluates_the_current_weights(blobs):
    seen = []

    class Eval(Callback):
        def on_step_end(self, step, logs):
            seen.append((logs["evaluate"](blobs.x_test, blobs.y_test)["accuracy"],
                         {k: np.array(v) for k, v in logs["params"]().items()}))

    model = _model(blobs)
    fit(model, blobs.x_train, blobs.y_train, epochs=1, batch_size=32, verbose=0,
        callbacks=[Eval()])
    acc, params = seen[-1]
    for k, v in model.params.items():  # after the last step the params are the model's
        np.testing.assert_array_equal(params[k], v)
    assert acc == pytest.approx(model.evaluate(blobs.x_test, blobs.y_test)["accuracy"])


# ---- time-to-accuracy runs ------------------------------------------------------------------------
def test_time_to_accuracy_run_stops_at_the_target(tmp_path):
    grid = {**TINY, "train_size": 256, "epochs": 6, "target": 0.9, "val_size": 64,
            "eval_every": 2, "lr": 0.1}
    cfg = expand_grid(grid)[0]
    assert cfg["val_size"] == 64 and cfg["eval_every"] == 2
    df = run_study(grid, out=tmp_path / "df.pkl", progress=False)
    r = df.iloc[-1]
    trace = json.loads(r["eval_trace"])
    assert [t[0] for t in trace] == list(range(2, 2 * len(trace) + 1, 2))  # every 2 steps
    assert [t[1] for t in trace] == [32 * t[0] for t in trace]  # 256 = 8 full batches
    if r["tta_status"] == "reached":  # stops at the first evaluation at the target
        assert trace[-1][3] >= 0.9 and all(t[3] < 0.9 for t in trace[:-1])
        assert r["steps_to_target"] == trace[-1][0]
        assert r["time_to_target"] == pytest.approx(trace[-1][2])
    else:
        assert all(t[3] < 0.9 for t in trace)
    assert (df["train_size"] == 256).all()  # the validation split came out of the training set


# ---- one-core contenders ---------------------------------------------------------------------------
def test_accumulation_is_the_sequential_algorithm(blobs):
    """m micro-batches on one thread, summed and applied once: the sequential update up to
    the order of the sums (float64)."""
    weights = {}
    for strategy, threads in (("sequential", 1), ("accumulate", 3)):
        model = _model(blobs)
        fit(model, blobs.x_train, blobs.y_train, epochs=2, batch_size=32, verbose=0,
            optimizer={"type": "sgd", "lr": 0.1, "momentum": 0.9}, strategy=strategy,
            threads=threads)
        weights[strategy] = model.params
    for k, v in weights["sequential"].items():
        np.testing.assert_allclose(weights["accumulate"][k], v, rtol=1e-11, atol=1e-13)
    with pytest.raises(ValueError, match="micro_batches"):
        fit(_model(blobs), blobs.x_train, blobs.y_train, batch_size=2, strategy="accumulate",
            threads=4, verbose=0)


def test_pytorch_reference_matches_our_model(blobs):
    torch = pytest.importorskip("torch")
    from cnn.reference.torch import build_torch_model, fit_torch
    for preset, shape in (("mnist_small", blobs.input_shape), ("cifar_tutorial", (3, 32, 32))):
        ours = Sequential.from_spec(resolve_spec(preset), input_shape=shape,
                                    dtype=np.float64, seed=1)
        x = np.random.default_rng(0).random((4, *shape))
        theirs = build_torch_model(ours)(torch.from_numpy(x)).detach().numpy()
        np.testing.assert_allclose(theirs, ours.predict_logits(x), rtol=1e-10, atol=1e-12)
    weights = {}
    opt = {"type": "sgd", "lr": 0.1, "momentum": 0.9}
    for who in ("ours", "torch"):
        model = _model(blobs)
        kw = dict(epochs=2, batch_size=32, optimizer=opt, seed=3,
                  validation_data=(blobs.x_test, blobs.y_test))
        h = (fit(model, blobs.x_train, blobs.y_train, verbose=0, **kw) if who == "ours"
             else fit_torch(model, blobs.x_train, blobs.y_train, **kw))
        weights[who] = (model.params, h.history["val_accuracy"])
    for k, v in weights["ours"][0].items():
        np.testing.assert_allclose(weights["torch"][0][k], v, rtol=1e-9, atol=1e-11)
    assert weights["torch"][1] == weights["ours"][1]


def test_missing_modules_drop_their_runs(monkeypatch):
    from cnn import paths as P
    entry = P.PATHS["torch"]
    monkeypatch.setitem(P.PATHS, "torch", type(entry)(**{**entry.__dict__,
                                                          "requires": ("no_such_module",)}))
    runs = expand_grid({**TINY, "path": ["sequential", "torch"]})
    assert [r["path"] for r in runs] == ["sequential"]
    plan = describe_plan({**TINY, "path": ["sequential", "torch"]})
    assert "torch (no_such_module not installed)" in plan


# ---- equivalence table -------------------------------------------------------------------------------
def test_equivalence_table_at_rounding_level():
    from cnn.study.equivalence import weight_trajectories
    table = weight_trajectories(variants=(("threads", "sync", "numpy", 2),
                                          ("accumulate", "accumulate", "numpy", 2),
                                          ("cuda", "sequential", "cuda", 1)),
                                dtypes=("float64",), dataset="blobs", steps=4, batch_size=16,
                                gpu=False)
    from cnn.study.equivalence import CONTROL_LABEL
    assert set(table["label"]) == {"threads/sync ×2", "accumulate m=2", CONTROL_LABEL}
    assert table.attrs["skipped"] == ["cuda (no GPU on this machine)"]
    assert (table["rel_diff"] < 1e-13).all() and list(table["step"][:4]) == [1, 2, 3, 4]
    # the control moved every initial weight by one ulp: between eps/2 and eps of the norm
    # before the first step, not much more after it
    control = table.loc[table["label"] == CONTROL_LABEL, "rel_diff"]
    eps = float(np.finfo(np.float64).eps)
    assert eps / 4 < control.iloc[0] < 4 * eps and len(control) == 4


def test_the_one_ulp_control_moves_each_non_zero_weight_one_ulp_and_keeps_zeros():
    from cnn.study.equivalence import one_ulp_away
    for dtype in (np.float32, np.float64):
        w = np.array([[0.5, -0.25], [3.0, -1e-3]], dtype=dtype)
        b = np.zeros(3, dtype=dtype)
        moved = one_ulp_away({"w": w, "b": b})
        assert moved["w"].dtype == dtype and moved["b"].dtype == dtype
        # up by one spacing (for a negative w, the spacing of the next float toward zero)
        up = np.array([[0.5 + np.spacing(dtype(0.5)), -0.25 + np.spacing(dtype(0.25)) / 2],
                       [3.0 + np.spacing(dtype(3.0)), -1e-3]], dtype=dtype)
        up[1, 1] = -np.nextafter(-w[1, 1], dtype(0))
        np.testing.assert_array_equal(moved["w"], up)
        assert (moved["w"] != w).all()
        np.testing.assert_array_equal(moved["b"], b)   # not the denormal after 0


# ---- order -------------------------------------------------------------------------------------------
def test_run_order_is_randomised_within_repeat_blocks_and_recorded():
    runs = expand_grid({**TINY, "batch_size": [8, 16, 32, 64], "repeats": 3})
    a, b = plan_order(runs, 0), plan_order(runs, 1)
    assert [r["repeat"] for r in a] == [0] * 4 + [1] * 4 + [2] * 4
    assert [r["order_index"] for r in a] == list(range(12))
    assert sorted(r["run_key"] for r in a) == sorted(r["run_key"] for r in runs)
    assert [r["run_key"] for r in a] != [r["run_key"] for r in b]
    assert [r["run_key"] for r in plan_order(runs, None)] == [r["run_key"] for r in runs]


# ---- the device profile ---------------------------------------------------------------------------
def test_device_profile_plan_dry_run():
    runs = expand_grid("device", gpu=True)
    threads = {r["threads"] for r in runs if r["path"] == "threads"}
    assert threads == {1, 2, 4, 8, 16}
    assert "cuda" in {r["path"] for r in runs}
    assert "torch_cuda" in {r["path"] for r in expand_grid("device", gpu=True,
                                                          include_unavailable=True)}
    assert "keras" not in {r["path"] for r in runs}  # no TensorFlow on the device machine
    reps = pd.Series([r["run_key"].rsplit(".r", 1)[0] for r in runs]).value_counts()
    assert (reps == 5).all()
    plan = describe_plan("device", gpu=True)
    assert "threads/sync" in plan and "estimated wall time" in plan
    assert "cuda" not in {r["path"] for r in expand_grid("device", gpu=False)}


def test_device_profile_cuda_runs_under_the_simulator(tmp_path):
    cuda = next(g for g in PROFILES["device"]
                if "cuda" in (g["path"] if isinstance(g["path"], list) else [g["path"]]))
    grid = {**cuda, "path": "cuda", "dataset": "blobs", "train_size": 8, "test_size": 4,
            "batch_size": 4, "epochs": 1, "repeats": 1, "cuda_simulator": True}
    df = run_study(grid, out=tmp_path / "df.pkl", progress=False, gpu=False)
    assert df["status"].tolist() == ["ok"], df["error"].tolist()
    assert df["device"].iat[0] == "cuda-simulator"


# ---- what every run records about the machine and the arithmetic ---------------------------------
def test_runs_record_caches_blas_sgemm_peak_and_flops(tmp_path):
    df = run_study({**TINY, "path": "sequential"}, out=tmp_path / "df.pkl", progress=False)
    r = df.iloc[0]
    assert r["sgemm_peak_gflops"] > 0 and r["blas"] and r["cpu_caches"]
    # FLOPs by hand: conv 8 3x3 filters over C x H x W (forward and weight gradient; no input
    # gradient for the first layer) and the dense layer (forward and both gradients)
    c, h, w = load_dataset("blobs", limit=1, test_limit=1).input_shape
    conv = 2 * 8 * (h - 2) * (w - 2) * c * 9
    dense = 2 * 8 * ((h - 2) // 2) * ((w - 2) // 2) * 10
    assert r["flops_per_image"] == 2 * conv + 3 * dense
