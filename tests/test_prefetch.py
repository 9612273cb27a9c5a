"""Data loading off the critical path: the batch gather and the transfer to the backend of batch
k+1 run in a prefetching thread while batch k trains; ``data_time``/``transfer_time`` count
only what stays exposed, and the batches are exactly those of the shuffled order."""
from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from cnn.backends.numpy import NumpyBackend
from cnn.layers import layers_from_spec
from cnn.model import Sequential
from cnn.train import _Prefetcher

SPEC = [{"type": "conv2d", "filters": 2, "kernel_size": 3, "activation": "relu"},
        {"type": "flatten"}, {"type": "dense", "units": 3}]
DELAY = 0.03


class SlowTransferBackend(NumpyBackend):
    """NumPy ops, but moving a batch in takes DELAY (a copy, as on a device) and so does a
    step's convolution: a loop without overlap would take 2 * DELAY per step."""

    name = "slow-transfer"

    def __init__(self):
        self.asarray_threads: set[str] = set()

    def asarray(self, x):
        self.asarray_threads.add(threading.current_thread().name)
        if np.ndim(x) == 4:
            time.sleep(DELAY)
        return np.array(x, copy=True, order="C")

    def conv2d_forward(self, *args, **kwargs):
        time.sleep(DELAY)
        return super().conv2d_forward(*args, **kwargs)


def test_transfer_overlaps_compute():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((40, 1, 6, 6))
    y = rng.integers(0, 3, 40)
    model = Sequential(layers_from_spec(SPEC), (1, 6, 6), dtype=np.float64, seed=0)
    be = SlowTransferBackend()
    hist = model.fit(x, y, epochs=1, batch_size=4, backend=be, verbose=0, prefetch=True)
    steps = 10
    assert "prefetch" in be.asarray_threads  # batches move in the prefetching thread
    # the wait for a batch is exposed only for the first one: the others were ready in time
    assert hist.history["transfer_time"][0] + hist.history["data_time"][0] < 4 * DELAY
    assert hist.history["time"][0] < steps * 2 * DELAY * 0.8


@pytest.mark.parametrize("n, step", [(10, 3), (8, 4), (5, 8)])
def test_prefetcher_yields_the_batches_of_the_order(n, step):
    rng = np.random.default_rng(n)
    x = rng.standard_normal((n, 2, 3, 3)).astype(np.float32)
    y = rng.integers(0, 5, n)
    order = rng.permutation(n)
    p = _Prefetcher(NumpyBackend(), x, y, order, step)
    try:
        for i in range(0, n, step):
            xb, yb, size, _, _ = p.next()
            idx = order[i:i + step]
            assert size == len(idx)
            np.testing.assert_array_equal(xb, x[idx])
            np.testing.assert_array_equal(yb, y[idx])
            p.release()
    finally:
        p.close()


def test_prefetcher_error_reaches_the_training_thread():
    class Failing(NumpyBackend):
        def asarray(self, x):
            raise OSError("device gone")

    p = _Prefetcher(Failing(), np.zeros((4, 1, 2, 2)), np.zeros(4, int), np.arange(4), 2)
    with pytest.raises(OSError, match="device gone"):
        p.next()
    p.close()


def test_prefetch_off_trains_the_same_weights():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((30, 1, 6, 6))
    y = rng.integers(0, 3, 30)
    weights = []
    for prefetch in (True, False):
        model = Sequential(layers_from_spec(SPEC), (1, 6, 6), dtype=np.float64, seed=0)
        hist = model.fit(x, y, epochs=2, batch_size=4, verbose=0, prefetch=prefetch)
        assert hist.info["prefetch"] is prefetch
        weights.append(model.get_weights())
    for k in weights[0]:
        np.testing.assert_array_equal(weights[0][k], weights[1][k])


def test_auto_prefetch_takes_a_thread_only_for_work_beyond_the_gather():
    """``prefetch="auto"`` (the default): a bare gather on a CPU backend stays in the training
    thread (no thread named prefetch ever gathers); augmentation or normalisation get the
    thread; worker processes do not (the training thread is their worker 0); a bad value is
    refused before any step, naming the option."""
    rng = np.random.default_rng(2)
    x = rng.standard_normal((64, 1, 6, 6))
    y = rng.integers(0, 3, 64)
    seen = []
    real_run = _Prefetcher._run

    def run(self):
        seen.append(threading.current_thread().name)
        return real_run(self)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(_Prefetcher, "_run", run)
        for kwargs, threaded in (({}, False), ({"normalize": True}, True),
                                 ({"prefetch": True}, True), ({"prefetch": False}, False),
                                 # worker processes: the fit loop's thread trains too
                                 ({"strategy": "processes", "threads": 2}, False)):
            seen.clear()
            model = Sequential(layers_from_spec(SPEC), (1, 6, 6), dtype=np.float64, seed=0)
            hist = model.fit(x, y, epochs=1, batch_size=16, verbose=0, **kwargs)
            assert hist.info["prefetch"] is threaded, kwargs
            assert (seen == ["prefetch"]) is threaded, (kwargs, seen)
    model = Sequential(layers_from_spec(SPEC), (1, 6, 6), dtype=np.float64, seed=0)
    before = model.get_weights()
    with pytest.raises(ValueError, match="prefetch: True, False or 'auto'. Received 'yes'"):
        model.fit(x, y, epochs=1, batch_size=16, verbose=0, prefetch="yes")
    assert all(np.array_equal(before[k], v) for k, v in model.get_weights().items())
