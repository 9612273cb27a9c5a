"""What a throughput figure is measured against: the arithmetic of a network (FLOPs per
training image) and of the machine (cache sizes, BLAS kernel, measured single-core SGEMM peak).
"""
from __future__ import annotations

import statistics
import time
from pathlib import Path

import numpy as np


# ---- FLOPs -------------------------------------------------------------------------------------
def layer_flops(model) -> list[dict]:
    """Per layer with arithmetic (conv2d, dense): multiply-adds x 2 of the forward pass, of
    the weight gradient (the same count) and of the input gradient (the same count; zero for
    the first layer, whose input is data and whose ``dx`` no contender computes). Biases,
    activations, pooling and the loss are not counted (they are O(activations), not
    O(activations x fan-in))."""
    rows = []
    for i, layer in enumerate(model.layers):
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
def cache_sizes() -> str:
    """``"L1d 48K, L1i 32K, L2 2048K, L3 32768K"`` from sysfs (per core for L1/L2), or ``"?"``."""
    root = Path("/sys/devices/system/cpu/cpu0/cache")
    parts = []
    try:
        for idx in sorted(root.glob("index*")):
            level = (idx / "level").read_text().strip()
            kind = (idx / "type").read_text().strip()
            size = (idx / "size").read_text().strip()
            suffix = {"Data": "d", "Instruction": "i"}.get(kind, "")
            parts.append(f"L{level}{suffix} {size}")
    except OSError:
        return "?"
    return ", ".join(parts) or "?"


def blas_kernel() -> str:
    """The BLAS library NumPy uses and the kernel it picked (``openblas 0.3.x SkylakeX``)."""
    try:
        from threadpoolctl import threadpool_info
        libs = [f"{i.get('internal_api')} {i.get('version')} {i.get('architecture', '?')}"
                for i in threadpool_info() if i.get("user_api") == "blas"]
        return "; ".join(libs) or "?"
    except Exception as err:  # the probe must never break a benchmark
        return f"? ({err})"


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
