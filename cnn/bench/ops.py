"""``python -m cnn bench ops``: every op of a model's training step on the ``numpy``, ``numba``
and ``numba_parallel`` backends, side by side.

    python -m cnn bench ops [--presets mnist_small cifar_tutorial] [--batch-sizes 32 128]
        [--dtype float32] [--repeats 15] [--cpu-time]

The ops are those of the model's plan on each backend (:mod:`cnn.plan`: one op per layer, or
per run of layers the backend fuses), so any preset, and any layer added later, is covered as
training runs it, with nothing here to edit. Where the backends' plans differ (Numba fuses a
conv, its ReLU and its pooling into one op; NumPy runs them as three), a row is the shortest
run of layers that starts and ends an op on every backend, and a backend's time for it is the
sum of its ops in the run, called as training calls them.

Each backend runs the whole step once (forward, loss, backward, with a training context and a
workspace of its own, as a training step after the first), so every op gets its inputs in the
layout its backend hands them over in training (channels-last views between Numba's BLAS-path
convs), and the first op's backward skips ``dx`` as in training. Before timing, each row's
outputs on the Numba backends (the ``numba`` column's default conv algorithm, which runs
Winograd on some layers, included) are checked against NumPy's, from NumPy's inputs copied
into the backend's own buffers, in float64 whatever the timed dtype: in float32 another
rounding can put a ReLU's input on the other side of zero, or pick another maximum in a
pooling window whose two largest values nearly tie, which moves a gradient (a ResNet's
blocks, a ReLU after each batch norm, flip a few per step); float64's errors stay far below
the check's tolerance. BLAS is pinned to one thread (threadpoolctl), the sequential setting of the
study, for all three: ``numba_parallel`` gets its parallelism from Numba's own thread pool, and
its only BLAS calls are the dense ops; unpinned, OpenBLAS's spinning worker threads compete
with that pool for the cores right after each dense op. Each row is called twice to warm up
(the Numba kernels are compiled beforehand by ``warmup``, whose time is printed), then the
backends' repeats are interleaved (numpy, numba, numba_parallel, numpy, ...) so that drift in
a shared machine's speed hits all three alike. Printed: medians in milliseconds and the
speed-ups ``numpy / numba`` (> 1: Numba is faster).
"""
from __future__ import annotations

import statistics
import time
from dataclasses import dataclass

import numpy as np
from threadpoolctl import threadpool_limits

from ..backends import get_backend
from ..context import StepContext, Workspace
from ..machine import describe
from ..model import build_model

BACKENDS = ("numpy", "numba", "numba_parallel")


@dataclass
class StepRun:
    """One training step of ``model`` on ``backend``, kept op by op: each op's input, cache
    and the gradient of its output (buffers of the run's own workspace)."""

    model: object
    backend: object
    ops: tuple
    arrays: dict
    ctx: StepContext
    inputs: list
    caches: list
    douts: list

    @classmethod
    def of(cls, model, backend, x, y) -> "StepRun":
        be = get_backend(backend)
        ops = model.plan(be)
        ctx = StepContext(training=True, workspace=Workspace(be))
        arrays = {**model.params, **model.buffers}
        inputs, caches = [], []
        h = be.asarray(x)
        for op in ops:
            inputs.append(h)
            h, cache = op.forward(arrays, h, ctx)
            caches.append(cache)
        _, d, _ = model.loss(h, be.asarray(y), be, ws=ctx.scope("__loss__"))
        douts = [None] * len(ops)
        for i in reversed(range(len(ops))):
            douts[i] = d
            d, _ = ops[i].backward(arrays, d, caches[i], ctx, need_dx=i > 0)
        return cls(model, be, ops, arrays, ctx, inputs, caches, douts)

    def forward(self, ops: range):
        """Run ``ops`` (consecutive indices) forward from their first input; returns the
        last one's output (each op's cache refreshed)."""
        h = self.inputs[ops.start]
        for i in ops:
            h, self.caches[i] = self.ops[i].forward(self.arrays, h, self.ctx)
        return h

    def backward(self, ops: range) -> tuple:
        """Run ``ops`` backward from the gradient of the last one's output; returns the first
        one's input gradient (None for the model's first op) and the parameters' gradients."""
        d, grads = self.douts[ops.stop - 1], {}
        for i in reversed(ops):
            d, g = self.ops[i].backward(self.arrays, d, self.caches[i], self.ctx,
                                        need_dx=i > 0)
            grads.update(g)
        return d, grads


def _starts(ops) -> list[int]:
    """The layer index at which each op of a plan starts."""
    starts, i = [], 0
    for op in ops:
        starts.append(i)
        i += len(op.layers)
    return starts


def rows(model, runs: dict) -> list[tuple[str, dict]]:
    """The rows: runs of layers each backend's plan starts and ends an op at, as ``(label,
    {backend name: range of its ops})``; a layer index starts a row when it starts an op on
    every backend."""
    starts = {name: _starts(run.ops) for name, run in runs.items()}
    cuts = sorted(set.intersection(*(set(s) for s in starts.values())))
    cuts.append(len(model.layers))
    out = []
    for a, b in zip(cuts, cuts[1:]):
        label = "+".join(layer.name for layer in model.layers[a:b])
        out.append((label, {name: range(s.index(a), s.index(b) if b in s else len(s))
                            for name, s in starts.items()}))
    return out


def _check(label, ref, got) -> None:
    """Numba's outputs must match NumPy's (in float64) before their timings mean anything."""
    tol = 1e-10
    if isinstance(ref, dict):
        assert ref.keys() == got.keys(), label
        for k in ref:
            np.testing.assert_allclose(got[k], ref[k], rtol=tol, atol=tol, err_msg=f"{label} {k}")
    elif ref is None or got is None:
        assert ref is None and got is None, label
    else:
        np.testing.assert_allclose(got, ref, rtol=tol, atol=tol, err_msg=label)


def check_row(label: str, ops: dict, reference: StepRun, other: StepRun, name: str) -> None:
    """Run the row on ``other`` from ``reference``'s (NumPy's) inputs, copied into
    ``other``'s own buffers, and compare the outputs and gradients."""
    mine, theirs = ops["numpy"], ops[name]
    np.copyto(other.inputs[theirs.start], reference.inputs[mine.start])
    _check(f"{label} forward on {name}", reference.forward(mine), other.forward(theirs))
    np.copyto(other.douts[theirs.stop - 1], reference.douts[mine.stop - 1])
    ref_dx, ref_grads = reference.backward(mine)
    dx, grads = other.backward(theirs)
    _check(f"{label} backward dx on {name}", ref_dx, dx)
    _check(f"{label} backward gradients on {name}", ref_grads, grads)


def median_times(calls: dict, repeats: int, clock=time.perf_counter) -> dict:
    """Median seconds of ``repeats`` interleaved calls of each backend's call."""
    for call in calls.values():  # warm-up: caches, first touch of the outputs
        call()
        call()
    times = {name: [] for name in calls}
    for _ in range(repeats):
        for name, call in calls.items():
            t0 = clock()
            call()
            times[name].append(clock() - t0)
    return {name: statistics.median(ts) for name, ts in times.items()}


def bench(preset: str, batch: int, dtype, repeats: int, clock=time.perf_counter) -> dict:
    """The table of one preset and batch size: each row's median of ``repeats`` interleaved
    calls per backend (milliseconds of ``clock``) and the speed-ups over NumPy. Returns the
    summed milliseconds per backend."""
    model = build_model(preset, seed=0, dtype=np.float64)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((batch, *model.input_shape))
    y = rng.integers(0, model.num_classes, batch)
    checks = {name: StepRun.of(model, name, x, y) for name in BACKENDS}
    for label, ops in rows(model, checks):
        for name in BACKENDS[1:]:
            check_row(f"{preset} b{batch} {label}", ops, checks["numpy"], checks[name], name)
    del checks
    model = build_model(preset, seed=0, dtype=dtype)
    runs = {name: StepRun.of(model, name, x.astype(dtype), y) for name in BACKENDS}
    table = rows(model, runs)
    print(f"\n{preset}, batch {batch}, {np.dtype(dtype).name}: median ms of {repeats} "
          f"interleaved repeats; a row runs the layers named, as one op where a backend fuses "
          f"them")
    head = (f"{'op':<34}{'input':>18}{'numpy':>9}{'numba':>9}{'nb_par':>9}"
            f"{'np/nb':>8}{'np/nb_par':>10}")
    print(head)
    print("-" * len(head))
    totals = dict.fromkeys(BACKENDS, 0.0)
    passes = [(f"{label} fwd", ops, "forward") for label, ops in table]
    passes += [(f"{label} bwd", ops, "backward") for label, ops in reversed(table)]
    for label, ops, direction in passes:
        calls = {name: (lambda r=run, o=ops[name], d=direction: getattr(r, d)(o))
                 for name, run in runs.items()}
        med = {name: 1e3 * t for name, t in median_times(calls, repeats, clock).items()}
        for name in BACKENDS:
            totals[name] += med[name]
        shape = tuple(runs["numpy"].inputs[ops["numpy"].start].shape)
        print(f"{label[:33]:<34}{str(shape):>18}{med['numpy']:9.3f}{med['numba']:9.3f}"
              f"{med['numba_parallel']:9.3f}{med['numpy'] / med['numba']:8.2f}"
              f"{med['numpy'] / med['numba_parallel']:10.2f}")
    print(f"{'sum of the ops':<52}{totals['numpy']:9.3f}{totals['numba']:9.3f}"
          f"{totals['numba_parallel']:9.3f}{totals['numpy'] / totals['numba']:8.2f}"
          f"{totals['numpy'] / totals['numba_parallel']:10.2f}")
    return totals


def suite(repeats: int = 15, quick: bool = False, presets=None, batch_sizes=None,
          dtype: str = "float32", cpu_time: bool = False) -> None:
    """One table per preset and batch size, BLAS pinned to one thread. ``dtype``: float32 or
    float64. ``cpu_time``: time the calling thread's CPU time instead of the wall clock, which
    a busy shared machine disturbs less (meaningless for numba_parallel, whose work runs on
    other threads too). ``quick`` needs nothing beyond the one repeat the command gives it."""
    clock = time.perf_counter
    if cpu_time:
        clock = time.thread_time
        print("timing: CPU time of the calling thread (numba_parallel's column is not wall time)")
    dtype_name, dtype = dtype, np.dtype(dtype).type

    print(describe())
    for name in ("numba", "numba_parallel"):
        for kind in sorted({dtype_name, "float64"}):  # float64: the checks'
            seconds = get_backend(name).warmup(np.dtype(kind).type)
            print(f"{name}: JIT compile / cache load for {kind}: {seconds:.1f} s")
    layer = get_backend("numba_parallel").threading_layer
    print(f"numba threading layer: {layer}, {__import__('numba').get_num_threads()} threads")
    with threadpool_limits(limits=1, user_api="blas"):
        for preset in presets or ("mnist_small", "cifar_tutorial"):
            for batch in batch_sizes or (32, 128):
                bench(preset, batch, dtype, repeats, clock)
