"""``python -m cnn bench roofline``: the roofline of this machine's one core and where each op
of a network's training step sits under it.

    python -m cnn bench roofline [--presets cifar_tutorial cifar_resnet20] [--batch-sizes 32]
        [--repeats 15] [--json results/roofline.json]

The machine: the measured single-core float32 SGEMM rate (:func:`cnn.bench.hardware.
sgemm_peak`, BLAS pinned to one thread) is the roof's flat part, and a STREAM-like triad in
NumPy (:func:`triad_bandwidth`) its slope. The ops: each op of the model's plan on the chosen
backend (:mod:`cnn.plan`: a layer, a fused run, a residual block), run forward and backward as
one training step runs it (:class:`cnn.bench.ops.StepRun`), timed one op at a time (median of
``repeats`` interleaved calls), with its FLOPs and its bytes (:func:`op_counts`): a point
``(FLOPs / bytes, FLOPs / seconds)`` per op and direction.

What is counted (stated once, here): FLOPs are the multiply-adds times 2 of the conv and dense
layers (:func:`cnn.bench.hardware.layer_flops`, forward; backward the weight gradient and the
input gradient, none for the first op), plus one FLOP per output element of every other layer
(ReLU, pooling, batch norm, the residual sum: their arithmetic is a few operations per
element); a flatten is a reshape, none (ops without FLOPs are not drawn). Bytes are the compulsory traffic of the op at the model's itemsize: forward its input,
its parameters and its output; backward the output's gradient, its input (the weight gradient
reads it), its parameters, their gradients and the input's gradient. Workspaces that stay in
cache and im2col's copies are not counted, so the intensity is an upper bound of what the op
achieves from memory, the usual roofline convention.
"""
from __future__ import annotations

import statistics
import time
from pathlib import Path

import numpy as np

#: the presets of the report's roofline figure
PRESETS = ("cifar_tutorial", "cifar_resnet20")


def _leaves(op) -> list:
    return [leaf for layer in op.layers for leaf in layer.leaves()]


def _param_elements(model, leaves) -> int:
    names = {leaf.name for leaf in leaves}
    return int(sum(v.size for k, v in model.params.items() if k.rsplit(".", 1)[0] in names))


def op_counts(model, op, batch: int) -> dict:
    """``{"forward": (flops, bytes), "backward": (flops, bytes)}`` of one op of ``model``'s
    plan on a batch of ``batch`` examples (see the module doc for what is counted; the
    model's first op computes no input gradient)."""
    from .hardware import layer_flops
    gemm = {r["layer"]: r for r in layer_flops(model)}
    leaves = _leaves(op)
    first = leaves[0] is model.leaves[0]
    fwd = bwd = 0
    for leaf in leaves:
        if leaf.name in gemm:
            fwd += gemm[leaf.name]["forward"]
            bwd += gemm[leaf.name]["weight_grad"] + gemm[leaf.name]["input_grad"]
        elif leaf.type != "flatten":  # a reshape: no arithmetic, no traffic of its own
            fwd += int(np.prod(leaf.output_shape))
            bwd += int(np.prod(leaf.output_shape))
    size = np.dtype(model.dtype).itemsize
    x_in = batch * int(np.prod(leaves[0].input_shape))
    x_out = batch * int(np.prod(leaves[-1].output_shape))
    params = _param_elements(model, leaves)
    return {"forward": (batch * fwd, size * (x_in + params + x_out)),
            "backward": (batch * bwd, size * (x_out + x_in + 2 * params
                                              + (0 if first else x_in)))}


def triad_bandwidth(n: int = 1 << 23, repeats: int = 10) -> dict:
    """A STREAM-like triad ``a = b + s c`` in NumPy on float64 arrays of ``n`` elements (3 x
    64 MiB by default, beyond a server's last-level cache): NumPy does it in two passes
    (``a = s c``, then ``a += b``), which read and write five arrays' worth of bytes, and
    that is what is counted. The best of ``repeats`` (GB/s, 1e9 bytes per second), as STREAM
    reports."""
    rng = np.random.default_rng(0)
    b, c = rng.random(n), rng.random(n)
    a = np.empty(n)
    times = []
    for _ in range(repeats + 1):  # the first pass faults the pages in
        t = time.perf_counter()
        np.multiply(c, 3.0, out=a)
        np.add(a, b, out=a)
        times.append(time.perf_counter() - t)
    moved = 5 * n * a.itemsize
    return {"elements": n, "bytes": moved, "best_gbs": moved / min(times[1:]) / 1e9,
            "median_gbs": moved / statistics.median(times[1:]) / 1e9}


def direct_numba():
    """The Numba backend with the direct convolution (im2col and one GEMM): the FLOPs it does
    are the FLOPs counted, where Winograd's would do fewer and show a rate above the peak."""
    from ..backends.numba.backend import NumbaBackend
    return NumbaBackend(conv_algorithm="direct")


def profile(preset: str, batch: int, backend=None, dtype="float32",
            repeats: int = 15) -> list[dict]:
    """Every op of ``preset``'s plan on ``backend`` (a name or a backend; default
    :func:`direct_numba`), forward and backward: its FLOPs, bytes, intensity (FLOP/byte),
    median seconds and GFLOP/s (BLAS pinned to one thread)."""
    from threadpoolctl import threadpool_limits

    from ..model import build_model
    from .ops import StepRun, median_times
    model = build_model(preset, seed=0, dtype=dtype)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((batch, *model.input_shape)).astype(dtype)
    y = rng.integers(0, model.num_classes, batch)
    rows = []
    with threadpool_limits(limits=1, user_api="blas"):
        run = StepRun.of(model, backend if backend is not None else direct_numba(), x, y)
        for i, op in enumerate(run.ops):
            counts = op_counts(model, op, batch)
            calls = {d: (lambda d=d, i=i: getattr(run, d)(range(i, i + 1)))
                     for d in ("forward", "backward")}
            seconds = median_times(calls, repeats)
            for direction, (flops, nbytes) in counts.items():
                rows.append({"op": "+".join(layer.name for layer in op.layers),
                             "direction": direction, "flops": int(flops), "bytes": int(nbytes),
                             "intensity": flops / nbytes, "seconds": seconds[direction],
                             "gflops": flops / seconds[direction] / 1e9})
    return rows


def suite(repeats: int = 15, quick: bool = False, presets=None, batch_sizes=None,
          json_path: str | None = None) -> dict:
    """The roof (SGEMM peak, triad bandwidth) and every op of each preset at the first batch
    size (default 32) on the Numba backend with the direct convolution (the fastest one-core
    backend; see :func:`direct_numba`), printed and, with
    ``json_path``, written there (``results/roofline.json`` is what the report reads)."""
    from ..backends import get_backend
    from ..files import atomic_write
    from ..machine import describe, machine_info
    from .hardware import sgemm_peak
    import json
    print(describe())
    backend, dtype = "numba, direct convolution", "float32"
    get_backend("numba").warmup(np.float32)
    batch = (batch_sizes or [32])[0]
    peak = sgemm_peak(1, sizes=(256,) if quick else (1024, 1536), repeats=repeats if quick else 5)
    triad = triad_bandwidth(1 << 18 if quick else 1 << 23, repeats=max(repeats, 2))
    print(f"SGEMM peak, 1 thread: {peak['peak']:.1f} GFLOP/s; triad bandwidth: "
          f"{triad['best_gbs']:.1f} GB/s (median {triad['median_gbs']:.1f}); ridge at "
          f"{peak['peak'] / triad['best_gbs']:.1f} FLOP/byte")
    record = {"machine": machine_info(), "backend": backend, "dtype": dtype, "batch": batch,
              "repeats": repeats, "sgemm_peak_gflops": peak["peak"],
              "sgemm_by_size": {str(k): v for k, v in peak["by_size"].items()},
              "bandwidth_gbs": triad["best_gbs"], "triad": triad, "networks": {}}
    for preset in presets or PRESETS:
        rows = profile(preset, batch, None, dtype, repeats)
        record["networks"][preset] = rows
        print(f"\n{preset}, batch {batch}, {backend}, {dtype}: median of {repeats} calls")
        print(f"{'op':<40}{'dir':>9}{'FLOP/B':>9}{'ms':>9}{'GFLOP/s':>9}")
        for r in rows:
            print(f"{r['op'][:39]:<40}{r['direction']:>9}{r['intensity']:9.2f}"
                  f"{1e3 * r['seconds']:9.3f}{r['gflops']:9.2f}")
    if json_path:
        atomic_write(Path(json_path), json.dumps(record, indent=1))
        print(f"written to {json_path}")
    return record
