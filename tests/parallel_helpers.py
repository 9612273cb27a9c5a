"""What the tests of the process and MPI strategies share (imported by the tests, by worker
processes that unpickle these classes, and by ``tests/mpi_checks.py`` under ``mpiexec``).

``CenterLayer`` is a layer that needs the whole global batch: it subtracts the batch mean of
each feature, ``y_j = x_j - (1/N) sum_k x_k``, whose gradient is ``dx_j = dy_j - (1/N) sum_k
dy_k``. Across shards, both sums go through ``StepContext.sum_over_shards`` (the ``reduce``
collective that synchronised batch norm uses), so a sharded run equals the sequential one only
if every transport's ``reduce`` sums over every shard, ghosts included.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

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
#: a small residual network (issue 20) on 3 x 8 x 8 images: convs without bias, batch norm in
#: every branch, both shortcut options (an identity block, a pad block halving the image, a
#: 1x1-conv block), a block inside a block, global average pooling
RESNET_SPEC = [{"type": "conv2d", "filters": 4, "kernel_size": 3, "padding": 1, "use_bias": False},
               {"type": "batchnorm", "momentum": 0.875, "epsilon": 1e-5}, {"type": "relu"},
               {"type": "residual", "activation": "relu", "layers": [
                   {"type": "conv2d", "filters": 4, "kernel_size": 3, "padding": 1,
                    "use_bias": False},
                   {"type": "batchnorm", "momentum": 0.875, "epsilon": 1e-5}, {"type": "relu"},
                   {"type": "residual", "layers": [
                       {"type": "conv2d", "filters": 4, "kernel_size": 3, "padding": 1}]},
                   {"type": "batchnorm", "momentum": 0.875, "epsilon": 1e-5}]},
               {"type": "residual", "shortcut": "pad", "activation": "relu", "layers": [
                   {"type": "conv2d", "filters": 6, "kernel_size": 3, "stride": 2, "padding": 1,
                    "use_bias": False},
                   {"type": "batchnorm", "momentum": 0.875, "epsilon": 1e-5}, {"type": "relu"},
                   {"type": "conv2d", "filters": 6, "kernel_size": 3, "padding": 1,
                    "use_bias": False},
                   {"type": "batchnorm", "momentum": 0.875, "epsilon": 1e-5}]},
               {"type": "residual", "activation": "relu", "layers": [
                   {"type": "conv2d", "filters": 8, "kernel_size": 3, "stride": 2, "padding": 1,
                    "use_bias": False},
                   {"type": "batchnorm", "momentum": 0.875, "epsilon": 1e-5}],
                "shortcut": [{"type": "conv2d", "filters": 8, "kernel_size": 1, "stride": 2,
                              "use_bias": False},
                             {"type": "batchnorm", "momentum": 0.875, "epsilon": 1e-5}]},
               {"type": "globalavgpool2d"}, {"type": "dense", "units": 10}]
#: the ResNet paper's optimizer (momentum exact in float32, which Keras casts it through)
RESNET_OPT = {"type": "sgd", "lr": 0.1, "momentum": 0.875, "weight_decay": 2 ** -10,
              "weight_decay_mode": "coupled"}
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


def blobs(n: int = N, dtype=np.float64, seed: int = 1, channels: int = 1):
    x, y = make_blobs_images(n, classes=10, size=8, seed=seed, dtype=dtype)
    if channels > 1:  # colour images: each channel a scaled copy, so the channels differ
        x = np.concatenate([x * (1 + c / 2) for c in range(channels)], axis=1)
    return x, y


def build(kind: str = "plain", dtype=np.float64, seed: int = 3) -> Sequential:
    """``plain``: :data:`SPEC`; ``center``: a CenterLayer after the pooling; ``layers``:
    :data:`LAYERS_SPEC` (batch norm, dropout, penalties); ``resnet``: :data:`RESNET_SPEC` on
    3-channel images."""
    if kind == "resnet":
        return Sequential.from_spec(RESNET_SPEC, input_shape=(3, 8, 8), dtype=dtype, seed=seed)
    if kind == "plain":
        return Sequential.from_spec(SPEC, input_shape=(1, 8, 8), dtype=dtype, seed=seed)
    if kind == "layers":
        return Sequential.from_spec(LAYERS_SPEC, input_shape=(1, 8, 8), dtype=dtype, seed=seed)
    if kind == "center":
        layers = layers_from_spec(SPEC[:2]) + [CenterLayer()] + layers_from_spec(SPEC[2:])
        return Sequential(layers, (1, 8, 8), dtype=dtype, seed=seed)
    raise ValueError(kind)


def train(strategy="sequential", threads=1, *, kind="plain", dtype=np.float64, batch_size=7,
          epochs=2, n=N, optimizer=OPT, backend="numpy", augment=None, normalize=False,
          **options):
    """Weights (and buffers) and History after ``epochs`` of ``strategy`` from the same initial
    weights and the same batches (augmented and normalised as ``fit`` is told)."""
    x, y = blobs(n, dtype, channels=3 if kind == "resnet" else 1)
    model = build(kind, dtype)
    hist = model.fit(x, y, epochs=epochs, batch_size=batch_size, optimizer=optimizer,
                     strategy=strategy, threads=threads, strategy_options=options or None,
                     seed=5, verbose=0, backend=backend, augment=augment, normalize=normalize)
    return model.get_weights(), hist


def max_abs_diff(a, b) -> float:
    assert a.keys() == b.keys()
    return max(float(np.max(np.abs(a[k].astype(np.float64) - b[k]))) for k in a)


def max_rel_diff(a, b) -> float:
    """Per parameter array: max |a - b| / max |b|; the worst over the arrays."""
    return max(float(np.max(np.abs(a[k].astype(np.float64) - b[k])) / np.max(np.abs(b[k])))
               for k in a)


def run_mpi_checks(mode: str, out: Path) -> Path:
    """``tests/mpi_checks.py MODE OUT`` under the venv's ``mpiexec -n 2`` (the test is skipped
    where mpi4py or mpiexec is missing); returns ``out``, where every rank wrote its results."""
    import pytest
    pytest.importorskip("mpi4py")
    mpiexec = Path(sys.executable).parent / "mpiexec"
    if not mpiexec.is_file():
        pytest.skip(f"no mpiexec at {mpiexec}")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PMI_", "PMIX_", "OMPI_"))}
    cmd = [str(mpiexec), "-n", "2", sys.executable,
           str(Path(__file__).resolve().parent / "mpi_checks.py"), mode, str(out)]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert res.returncode == 0, f"{cmd} failed:\n{res.stdout}\n{res.stderr}"
    return out


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


class DyingInsideTheBarrier(KillingBackend):
    """:class:`KillingBackend` whose worker first arrives at its strategy's shared barrier
    (its arrival is counted, as a worker's is at the start of a wait) and dies there: the
    other worker passes that barrier and waits at the next one for a worker that will never
    come (what ``kill -9`` of a worker inside the barrier does by chance, made certain)."""

    def before_dying(self) -> None:
        import gc

        from cnn.parallel.spin import SharedSpinBarrier, _arrive
        barrier = next(o for o in gc.get_objects() if isinstance(o, SharedSpinBarrier))
        _arrive(barrier.state, barrier.parties)


def barrier_rounds(i: int, barrier, cells: np.ndarray, rounds: int) -> None:
    """Party ``i`` of a barrier test: each round write the round into its cell, pass the
    barrier, check every cell (raise on a stale one: a party let through early), pass it again
    before the next write. Random pauses send the late arrivals down the sleeping path."""
    import time
    rng = np.random.default_rng(i)
    for r in range(rounds):
        if rng.random() < 0.05:
            time.sleep(rng.random() * 1e-3)
        cells[i] = r
        barrier.wait()
        if not np.all(cells == r):
            raise AssertionError(f"party {i}, round {r}: cells {cells.tolist()}")
        barrier.wait()


def shared_barrier_rounds(i: int, parties: int, rounds: int, names: tuple[str, str]) -> None:
    """:func:`barrier_rounds` in process ``i`` of a
    :class:`~cnn.parallel.spin.SharedSpinBarrier` test. ``names``: the shared segments of the
    barrier's state and of the cells."""
    from multiprocessing import shared_memory

    from cnn.parallel.spin import STATE_SIZE, SharedSpinBarrier
    segments = [shared_memory.SharedMemory(name=n) for n in names]
    try:
        state = np.ndarray((STATE_SIZE,), np.int64, buffer=segments[0].buf)
        cells = np.ndarray((parties,), np.int64, buffer=segments[1].buf)
        barrier_rounds(i, SharedSpinBarrier(parties, state), cells, rounds)
        del state, cells
    finally:
        for seg in segments:
            seg.close()
