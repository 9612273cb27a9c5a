"""What the tests of the process and MPI strategies share (imported by the tests, by worker
processes that unpickle these classes, and by ``tests/mpi_checks.py`` under ``mpiexec``).

``CenterLayer`` is a layer that needs the whole global batch: it subtracts the batch mean of
each feature, ``y_j = x_j - (1/N) sum_k x_k``, whose gradient is ``dx_j = dy_j - (1/N) sum_k
dy_k``. Across shards, both sums go through ``StepContext.sum_over_shards`` (the ``reduce``
collective that synchronised batch norm uses), so a sharded run equals the sequential one only
if every transport's ``reduce`` sums over every shard, ghosts included.
"""
from __future__ import annotations

import numpy as np

from cnn.backends.numpy import NumpyBackend
from cnn.data import make_blobs_images
from cnn.layers import Layer, layers_from_spec
from cnn.model import Sequential

SPEC = [{"type": "conv2d", "filters": 4, "kernel_size": 3, "activation": "relu"},
        {"type": "maxpool2d", "pool_size": 2},
        {"type": "flatten"},
        {"type": "dense", "units": 10}]
#: the layers of issue 12: batch norm after a conv (per channel) and after a dense layer
#: (per unit), dropout before and after it, tanh, an L2 and an L1 penalty
LAYERS_SPEC = [{"type": "conv2d", "filters": 4, "kernel_size": 3,
                "kernel_regularizer": {"l2": 0.01}},
               {"type": "batchnorm", "momentum": 0.8}, {"type": "relu"},
               {"type": "maxpool2d", "pool_size": 2},
               {"type": "flatten"}, {"type": "dropout", "rate": 0.3},
               {"type": "dense", "units": 12, "activation": "tanh",
                "kernel_regularizer": {"l1": 0.001}},
               {"type": "batchnorm", "momentum": 0.5}, {"type": "dropout", "rate": 0.2},
               {"type": "dense", "units": 10}]
OPT = {"type": "sgd", "lr": 0.05, "momentum": 0.9}
N = 50  # batch 7 splits 4/3 over two workers, and the epoch's last batch has 1 example


class CenterLayer(Layer):
    """Subtracts the global-batch mean of every feature (see the module docstring)."""

    type = "center"

    def forward(self, params, x, backend, ctx):
        n = len(x) if ctx.global_batch is None else ctx.global_batch
        (total,) = ctx.sum_over_shards([x.sum(axis=0)]) if ctx.training else ([x.sum(axis=0)])
        if not ctx.training:
            n = len(x)
        return x - total / n, n

    def backward(self, params, dout, n, backend, ctx, need_dx=True):
        (total,) = ctx.sum_over_shards([dout.sum(axis=0)])
        return dout - total / n, {}


def blobs(n: int = N, dtype=np.float64, seed: int = 1):
    return make_blobs_images(n, classes=10, size=8, seed=seed, dtype=dtype)


def build(kind: str = "plain", dtype=np.float64, seed: int = 3) -> Sequential:
    """``plain``: :data:`SPEC`; ``center``: a CenterLayer after the pooling; ``layers``:
    :data:`LAYERS_SPEC` (batch norm, dropout, penalties)."""
    if kind == "plain":
        return Sequential.from_spec(SPEC, input_shape=(1, 8, 8), dtype=dtype, seed=seed)
    if kind == "layers":
        return Sequential.from_spec(LAYERS_SPEC, input_shape=(1, 8, 8), dtype=dtype, seed=seed)
    if kind == "center":
        layers = layers_from_spec(SPEC[:2]) + [CenterLayer()] + layers_from_spec(SPEC[2:])
        return Sequential(layers, (1, 8, 8), dtype=dtype, seed=seed)
    raise ValueError(kind)


def train(strategy="sequential", threads=1, *, kind="plain", dtype=np.float64, batch_size=7,
          epochs=2, n=N, optimizer=OPT, backend="numpy", **options):
    """Weights (and buffers) and History after ``epochs`` of ``strategy`` from the same initial
    weights and the same batches."""
    x, y = blobs(n, dtype)
    model = build(kind, dtype)
    hist = model.fit(x, y, epochs=epochs, batch_size=batch_size, optimizer=optimizer,
                     strategy=strategy, threads=threads, strategy_options=options or None,
                     seed=5, verbose=0, backend=backend)
    return model.get_weights(), hist


def max_abs_diff(a, b) -> float:
    assert a.keys() == b.keys()
    return max(float(np.max(np.abs(a[k].astype(np.float64) - b[k]))) for k in a)


def max_rel_diff(a, b) -> float:
    """Per parameter array: max |a - b| / max |b|; the worst over the arrays."""
    return max(float(np.max(np.abs(a[k].astype(np.float64) - b[k])) / np.max(np.abs(b[k])))
               for k in a)


class KillingBackend(NumpyBackend):
    """Worker 1 of strategy ``processes`` kills itself with SIGKILL in its third dense forward
    (a crash, an OOM kill), after :meth:`before_dying`."""

    def __init__(self):
        self.calls = 0

    def before_dying(self) -> None:
        pass

    def dense_forward(self, x, w, b, *args, **kwargs):
        import multiprocessing
        import os
        import signal
        if multiprocessing.current_process().name == "cnn-processes-worker-1":
            self.calls += 1
            if self.calls > 2:
                self.before_dying()
                os.kill(os.getpid(), signal.SIGKILL)
        return super().dense_forward(x, w, b, *args, **kwargs)


class DyingHoldingTheBarrier(KillingBackend):
    """:class:`KillingBackend` whose worker first takes the lock of its strategy's
    ``multiprocessing.Barrier`` (as a worker does for a moment inside ``Barrier.wait``) and
    dies holding it: the lock is never released (what ``kill -9`` of a worker inside the
    barrier does by chance, made certain)."""

    def before_dying(self) -> None:
        import gc
        from multiprocessing.synchronize import Barrier
        barrier = next(o for o in gc.get_objects() if isinstance(o, Barrier))
        barrier._cond.acquire()
