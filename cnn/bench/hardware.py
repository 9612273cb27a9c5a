"""What a throughput figure is measured against: the arithmetic of a network (FLOPs per
training image) and of the machine (measured single-core SGEMM peak; the CPU, its caches and
the BLAS kernel are :mod:`cnn.machine`'s).
"""
from __future__ import annotations

import statistics
import time

import numpy as np


# ---- FLOPs -------------------------------------------------------------------------------------
def layer_flops(model) -> list[dict]:
    """Per layer with arithmetic (conv2d, dense): multiply-adds x 2 of the forward pass, of
    the weight gradient (the same count) and of the input gradient (the same count; zero for
    the first layer, whose input is data and whose ``dx`` no contender computes). Biases,
    activations, pooling, residual sums and the loss are not counted (they are O(activations),
    not O(activations x fan-in)); the layers of residual blocks are (``model.leaves``)."""
    rows = []
    for i, layer in enumerate(model.leaves):
        if layer.type == "conv2d":
            f, ho, wo = layer.output_shape
            c = layer.input_shape[0]
            kh, kw = layer.kernel_size
            fwd = 2 * f * ho * wo * c * kh * kw
        elif layer.type == "dense":
            fwd = 2 * layer.input_shape[0] * layer.units
        else:
            continue
        rows.append({"layer": layer.name, "forward": fwd, "weight_grad": fwd,
                     "input_grad": 0 if i == 0 else fwd})
    return rows


def training_flops_per_image(model) -> int:
    """FLOPs of one training example (forward + both gradients), see :func:`layer_flops`."""
    return int(sum(r["forward"] + r["weight_grad"] + r["input_grad"] for r in layer_flops(model)))


# ---- the machine -------------------------------------------------------------------------------
def sgemm_peak(threads: int = 1, sizes=(1024, 1536), repeats: int = 5) -> dict:
    """Measured float32 GEMM rate of BLAS pinned to ``threads`` threads (threadpoolctl):
    for each square size the median of ``repeats`` products, and the best of those medians as
    ``peak`` (GFLOP/s). The yardstick of "fraction of peak"."""
    from threadpoolctl import threadpool_limits
    rng = np.random.default_rng(0)
    rates = {}
    with threadpool_limits(limits=threads, user_api="blas"):
        for n in sizes:
            a = rng.random((n, n), dtype=np.float32)
            b = rng.random((n, n), dtype=np.float32)
            c = np.empty((n, n), dtype=np.float32)
            np.matmul(a, b, out=c)
            times = []
            for _ in range(repeats):
                t = time.perf_counter()
                np.matmul(a, b, out=c)
                times.append(time.perf_counter() - t)
            rates[n] = 2 * n ** 3 / statistics.median(times) / 1e9
    return {"threads": threads, "peak": max(rates.values()), "by_size": rates}
