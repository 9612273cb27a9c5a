"""Run by tests/test_numba_backend.py in a process of its own, with an empty Numba cache
(``NUMBA_CACHE_DIR``), never collected by pytest itself: ``python tests/compile_checks.py``.

Fits a model whose layers reach every kind of Numba kernel (the small-filter conv, the BLAS
conv on few and on many input channels, pooling, ReLU, batch norm, dropout, fused
conv-ReLU-pooling) on the JIT paths: ``numba`` with ``sync`` threads (shards of one example in
the last step), ``numba`` alone and ``numba_parallel``, each with a last batch of one example
and a validation set smaller than the evaluation batch. Every compilation and every load from
the disk cache takes Numba's compiler lock; the lock's events are recorded with the time they
started, and so is the end of each fit's warm-up (``cnn.train._warm_up``). Prints one JSON line
per fit: events during the warm-up, and those after it up to the end of the fit (its epochs and
evaluations: there should be none).
"""
from __future__ import annotations

import json
import time

import numpy as np
from numba.core import event

import cnn.train
from cnn import build_model

SPEC = {"input_shape": [3, 12, 12], "layers": [
    {"type": "conv2d", "filters": 4, "kernel_size": 3, "padding": "same", "activation": "relu"},
    {"type": "conv2d", "filters": 16, "kernel_size": 3, "padding": "same"},
    {"type": "batchnorm"}, {"type": "relu"}, {"type": "maxpool2d", "pool_size": 2},
    {"type": "conv2d", "filters": 16, "kernel_size": 3}, {"type": "relu"},
    {"type": "maxpool2d", "pool_size": 2}, {"type": "dropout", "rate": 0.25},
    {"type": "flatten"}, {"type": "dense", "units": 3}]}
PATHS = [("numba", "sync", 2), ("numba", "sequential", 1), ("numba_parallel", "sequential", 1)]


class Recorder(event.Listener):
    def __init__(self):
        self.starts: list[float] = []

    def on_start(self, ev):
        self.starts.append(time.perf_counter())

    def on_end(self, ev):
        pass


def main() -> None:
    rng = np.random.default_rng(0)
    x = rng.standard_normal((42, 3, 12, 12)).astype(np.float32)
    y = rng.integers(0, 3, 42)
    marks: list[float] = []
    warm_up = cnn.train._warm_up

    def timed_warm_up(*args, **kwargs):
        seconds = warm_up(*args, **kwargs)
        marks.append(time.perf_counter())
        return seconds

    cnn.train._warm_up = timed_warm_up
    recorder = Recorder()
    with event.install_listener("numba:compiler_lock", recorder):
        for backend, strategy, threads in PATHS:
            begun = time.perf_counter()
            model = build_model(SPEC, seed=0)
            # 37 examples in batches of 4: a last batch of 1 (under sync: shards of 1 and 0)
            hist = model.fit(x[:37], y[:37], epochs=2, batch_size=4, backend=backend,
                             strategy=strategy, threads=threads, verbose=0,
                             validation_data=(x[37:], y[37:]))
            ended = time.perf_counter()
            during = [t for t in recorder.starts if begun <= t <= marks[-1]]
            after = [t for t in recorder.starts if marks[-1] < t <= ended]
            print(json.dumps({"path": f"{backend} {strategy} x{threads}",
                              "warm_up_events": len(during), "events_after_warm_up": len(after),
                              "compile_time": hist.info["compile_time"]}), flush=True)


if __name__ == "__main__":
    main()
