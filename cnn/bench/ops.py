"""``python -m cnn bench ops``: every layer op of the reference architectures on the
``numpy``, ``numba`` and ``numba_parallel`` backends, side by side.

    python -m cnn bench ops [--presets mnist_small cifar_tutorial] [--batch-sizes 32 128]
        [--dtype float32] [--repeats 15] [--cpu-time]

BLAS is pinned to one thread (threadpoolctl), the sequential setting of the study, for all
three: ``numba_parallel`` gets its parallelism from Numba's own thread pool, and its only BLAS
calls are the dense ops; unpinned, OpenBLAS's spinning worker threads compete with that pool
for the cores right after each dense op, and the small op that follows one pays for it. ``fit``
pins BLAS the same way by default. The first layer's backward skips ``dx``
(``need_dx=False``), as in training. Every op gets a workspace (``ws=``) of its own, as in
a training step after the first, so outputs and temporaries are reused, not allocated. Each op is
called twice to warm up (the Numba kernels are compiled beforehand by ``warmup``, whose time
is printed), then the backends' repeats are interleaved (numpy, numba, numba_parallel,
numpy, ...) so that drift in a shared machine's speed hits all three alike. Printed: medians
in milliseconds and the speed-ups ``numpy / numba`` (> 1: Numba is faster). Before timing, each
op's outputs on the Numba backends are checked against NumPy's. A conv layer whose ReLU is
followed by max pooling is one row, as a training step runs it: the fused op on the Numba
backends (``conv2d_relu_maxpool2d_*``), the three ops chained on NumPy. Each op gets its
inputs in the layout its backend hands them over in training: on ``numba``, the activations
after a BLAS-path conv and the gradients flowing back into one are channels-last views.
"""
from __future__ import annotations

import statistics
import time

import numpy as np
from threadpoolctl import threadpool_limits

from ..backends import get_backend
from ..backends.fusion import CONV_RELU_MAXPOOL
from ..backends.numba.backend import NumbaBackend
from ..context import Workspace
from ..machine import describe
from ..presets import get_preset

BACKENDS = ("numpy", "numba", "numba_parallel")


def _as_received(be, a, channels_last: bool):
    """``a`` as ``be`` receives it in a training step: with ``channels_last``, on the ``numba``
    backend, an ``(N, C, H, W)`` view of an ``(N, H, W, C)`` buffer (what its BLAS-path convs
    hand over, see ``cnn.backends.numba.backend``); NCHW everywhere else."""
    if not channels_last or be.name != "numba" or a.ndim != 4:
        return a
    return np.ascontiguousarray(a.transpose(0, 2, 3, 1)).transpose(0, 3, 1, 2)


def layer_ops(spec: dict, batch: int, dtype, rng):
    """The op calls of one training step of ``spec``, in forward-then-backward order.

    Returns a list of ``(label, input shape, make, is_forward)``; ``make(backend)`` prepares
    that op's inputs on ``backend`` (running the matching forward for a backward op, as the
    backward needs that backend's own cache) and returns the zero-argument call to time.
    """
    shape = (batch, *spec["input_shape"])
    fwd, bwd = [], []
    first = True
    conv_i = dense_i = 0
    layers = list(spec["layers"])
    blas = get_backend("numba")._use_blas
    cl_in = False  # the input comes from a BLAS-path conv: channels-last on numba
    while layers:
        layer = layers.pop(0)
        kind = layer["type"]
        x = rng.standard_normal(shape).astype(dtype)
        # a BLAS-path conv's output, and the gradient that flows back into it, are
        # channels-last on numba
        cl_out = kind == "conv2d" and blas(layer["filters"],
                                           shape[1] * layer["kernel_size"] ** 2)
        if kind == "conv2d" and layer.get("activation") == "relu" and layers \
                and layers[0]["type"] == "maxpool2d":
            # a conv, its ReLU and the pooling after it: one op where the backend fuses them
            # (as a training step runs them), the three ops chained where it does not
            pool = layers.pop(0)
            conv_i += 1
            k, p = layer["kernel_size"], pool["pool_size"]
            s = pool.get("stride", p)
            w = (rng.standard_normal((layer["filters"], shape[1], k, k)) * 0.1).astype(dtype)
            b = np.zeros(layer["filters"], dtype)
            need_dx = not first
            ho, wo = shape[2] - k + 1, shape[3] - k + 1

            def fwd_call(be, x=x, w=w, b=b, p=p, s=s, cl=(cl_in, cl_out)):
                ws = Workspace(be)
                xb = _as_received(be, x, cl[0])
                return lambda: _conv_relu_pool(be, xb, w, b, p, s, ws)

            def bwd_call(be, x=x, w=w, b=b, p=p, s=s, need_dx=need_dx, cl=(cl_in, cl_out)):
                ws = Workspace(be)
                out, cache = _conv_relu_pool(be, _as_received(be, x, cl[0]), w, b, p, s, ws)
                dout = _as_received(be, np.ones(out.shape, out.dtype), cl[1])
                return lambda: _conv_relu_pool_backward(be, dout, cache, need_dx, ws)

            name = f"conv{conv_i}+relu+pool"
            fwd.append((f"{name} fwd", x.shape, fwd_call, True))
            bwd.append((f"{name} bwd", x.shape, bwd_call, False))
            shape = (batch, layer["filters"], (ho - p) // s + 1, (wo - p) // s + 1)
            first = False
            cl_in = cl_out
            continue
        if kind == "conv2d":
            if layer.get("padding", "valid") != "valid" or layer.get("stride", 1) != 1:
                raise ValueError(f"bench ops supports stride-1 'valid' conv; received {layer}")
            conv_i += 1
            k = layer["kernel_size"]
            w = (rng.standard_normal((layer["filters"], shape[1], k, k)) * 0.1).astype(dtype)
            b = np.zeros(layer["filters"], dtype)
            pads = ((0, 0), (0, 0))
            need_dx = not first

            def fwd_call(be, x=x, w=w, b=b, pads=pads, cl=(cl_in, cl_out)):
                ws = Workspace(be)
                xb = _as_received(be, x, cl[0])
                return lambda: be.conv2d_forward(xb, w, b, 1, pads, ws=ws)

            def bwd_call(be, x=x, w=w, b=b, pads=pads, need_dx=need_dx, cl=(cl_in, cl_out)):
                ws = Workspace(be)
                out, cache = be.conv2d_forward(_as_received(be, x, cl[0]), w, b, 1, pads, ws=ws)
                dout = _as_received(be, np.ones(out.shape, out.dtype), cl[1])
                return lambda: be.conv2d_backward(dout, cache, need_dx=need_dx, ws=ws)

            shape = (batch, layer["filters"], shape[2] - k + 1, shape[3] - k + 1)
            name = f"conv{conv_i} {w.shape[1]}->{w.shape[0]} {k}x{k}"
        elif kind == "maxpool2d":
            p = layer["pool_size"]
            s = layer.get("stride", p)

            def fwd_call(be, x=x, p=p, s=s):
                ws = Workspace(be)
                return lambda: be.maxpool2d_forward(x, p, s, ws=ws)

            def bwd_call(be, x=x, p=p, s=s):
                ws = Workspace(be)
                out, cache = be.maxpool2d_forward(x, p, s, ws=ws)
                dout = np.ones_like(out)
                return lambda: be.maxpool2d_backward(dout, cache, ws=ws)

            shape = (batch, shape[1], (shape[2] - p) // s + 1, (shape[3] - p) // s + 1)
            name = f"maxpool {p}/{s}"
        elif kind == "flatten":
            shape = (batch, int(np.prod(shape[1:])))
            continue
        elif kind == "dense":
            dense_i += 1
            w = (rng.standard_normal((shape[1], layer["units"])) * 0.05).astype(dtype)
            b = np.zeros(layer["units"], dtype)
            need_dx = not first

            def fwd_call(be, x=x, w=w, b=b):
                ws = Workspace(be)
                return lambda: be.dense_forward(x, w, b, ws=ws)

            def bwd_call(be, x=x, w=w, b=b, need_dx=need_dx):
                ws = Workspace(be)
                out, cache = be.dense_forward(x, w, b, ws=ws)
                dout = np.ones_like(out)
                return lambda: be.dense_backward(dout, cache, need_dx=need_dx, ws=ws)

            shape = (batch, layer["units"])
            name = f"dense{dense_i} {w.shape[0]}->{w.shape[1]}"
        else:
            raise ValueError(f"bench ops: unsupported layer type {kind!r}")
        fwd.append((f"{name} fwd", x.shape, fwd_call, True))
        bwd.append((f"{name} bwd", x.shape, bwd_call, False))
        first = False
        cl_in = cl_out
        if layer.get("activation") == "relu":
            y = rng.standard_normal(shape).astype(dtype)

            def relu_fwd(be, y=y, cl=cl_out):
                ws = Workspace(be)
                yb = _as_received(be, y, cl)
                return lambda: be.relu_forward(yb, ws=ws)

            def relu_bwd(be, y=y, cl=cl_out):
                ws = Workspace(be)
                out, cache = be.relu_forward(_as_received(be, y, cl), ws=ws)
                return lambda: be.relu_backward(y, cache, ws=ws)

            fwd.append(("  relu fwd", shape, relu_fwd, True))
            bwd.append(("  relu bwd", shape, relu_bwd, False))
    return fwd + bwd[::-1]


def _conv_relu_pool(be, x, w, b, pool, stride, ws):
    """Forward of a conv, ReLU, max-pooling run: the fused op, or the three ops."""
    pads = ((0, 0), (0, 0))
    if CONV_RELU_MAXPOOL in be.fusions:
        return be.conv2d_relu_maxpool2d_forward(x, w, b, 1, pads, pool, stride, ws=ws)
    h, conv = be.conv2d_forward(x, w, b, 1, pads, ws=ws.scope("conv"))
    h, relu = be.relu_forward(h, ws=ws.scope("relu"))
    out, pooling = be.maxpool2d_forward(h, pool, stride, ws=ws.scope("pool"))
    return out, (conv, relu, pooling)


def _conv_relu_pool_backward(be, dout, cache, need_dx, ws):
    if CONV_RELU_MAXPOOL in be.fusions:
        return be.conv2d_relu_maxpool2d_backward(dout, cache, need_dx=need_dx, ws=ws)
    conv, relu, pooling = cache
    d = be.maxpool2d_backward(dout, pooling, ws=ws.scope("pool"))
    d = be.relu_backward(d, relu, ws=ws.scope("relu"))
    return be.conv2d_backward(d, conv, need_dx=need_dx, ws=ws.scope("conv"))


def _outputs(result, is_forward):
    """The arrays an op returns: ``out`` of a forward (not its cache), all gradients of a
    backward (``None`` for a skipped ``dx``)."""
    if is_forward:
        return (result[0],)
    return result if isinstance(result, tuple) else (result,)


def _check(label, ref, got, dtype):
    """Numba's outputs must match NumPy's before their timings mean anything. The ``numba``
    column times the backend's default conv algorithm, which runs Winograd on some layers;
    its outputs are checked with the direct algorithm's: Winograd's rounding may pick another
    maximum in a pooling window whose two largest values nearly tie, which moves a gradient
    to another pixel (tests/test_winograd.py checks Winograd against the naive loops)."""
    tol = 1e-4 if np.dtype(dtype) == np.float32 else 1e-10
    for r, g in zip(ref, got):
        if r is None or g is None:
            assert r is None and g is None, label
        else:
            np.testing.assert_allclose(g, r, rtol=tol, atol=tol, err_msg=label)


def bench(preset: str, batch: int, dtype, repeats: int, clock=time.perf_counter) -> None:
    """The table of one preset and batch size: each op's median of ``repeats`` interleaved
    calls per backend (milliseconds of ``clock``) and the speed-ups over NumPy."""
    spec = get_preset(preset)
    ops = layer_ops(spec, batch, dtype, np.random.default_rng(0))
    print(f"\n{preset}, batch {batch}, {np.dtype(dtype).name}: median ms of {repeats} "
          f"interleaved repeats")
    head = (f"{'op':<26}{'input':>18}{'numpy':>9}{'numba':>9}{'nb_par':>9}"
            f"{'np/nb':>8}{'np/nb_par':>10}")
    print(head)
    print("-" * len(head))
    totals = dict.fromkeys(BACKENDS, 0.0)
    for label, shape, make, is_forward in ops:
        calls = {}
        for name in BACKENDS:
            calls[name] = make(get_backend(name))
            calls[name]()  # warm-up: caches, first-touch of the outputs
            if name == "numba":  # checked with the direct conv algorithm, see _check
                result = _outputs(make(NumbaBackend(conv_algorithm="direct"))(), is_forward)
            else:
                result = _outputs(calls[name](), is_forward)
            if name == "numpy":
                ref = result
            else:
                _check(f"{preset} b{batch} {label} on {name}", ref, result, dtype)
        times = {name: [] for name in BACKENDS}
        for _ in range(repeats):
            for name in BACKENDS:
                t0 = clock()
                calls[name]()
                times[name].append(clock() - t0)
        med = {name: statistics.median(ts) * 1e3 for name, ts in times.items()}
        for name in BACKENDS:
            totals[name] += med[name]
        print(f"{label:<26}{str(tuple(shape)):>18}{med['numpy']:9.3f}{med['numba']:9.3f}"
              f"{med['numba_parallel']:9.3f}{med['numpy'] / med['numba']:8.2f}"
              f"{med['numpy'] / med['numba_parallel']:10.2f}")
    print(f"{'sum of layer ops':<44}{totals['numpy']:9.3f}{totals['numba']:9.3f}"
          f"{totals['numba_parallel']:9.3f}{totals['numpy'] / totals['numba']:8.2f}"
          f"{totals['numpy'] / totals['numba_parallel']:10.2f}")


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
        seconds = get_backend(name).warmup(dtype)
        print(f"{name}: JIT compile / cache load for {dtype_name}: {seconds:.1f} s")
    layer = get_backend("numba_parallel").threading_layer
    print(f"numba threading layer: {layer}, {__import__('numba').get_num_threads()} threads")
    with threadpool_limits(limits=1, user_api="blas"):
        for preset in presets or ("mnist_small", "cifar_tutorial"):
            for batch in batch_sizes or (32, 128):
                bench(preset, batch, dtype, repeats, clock)
