"""``python -m cnn bench gpu``: the CUDA path against the sequential path and Keras on the same
machine, interleaved (:mod:`cnn.bench.harness`), with the time split of the CUDA epochs.
Without a real GPU it says so and measures nothing."""
from __future__ import annotations

import os
import statistics

from .harness import (DEFAULT_IMAGES, QUICK_IMAGES, compare, epoch_images, keras_contender,
                      ours_contender, print_rows, synthetic_batch)


def gpu_available() -> bool:
    """True when a real CUDA GPU is usable (the simulator does not count: it measures nothing)."""
    if os.environ.get("NUMBA_ENABLE_CUDASIM", "0") not in ("", "0"):
        return False
    try:
        from numba import cuda
        return bool(cuda.is_available())
    except Exception:  # no driver, no toolkit: no GPU to measure
        return False


def suite(repeats: int = 5, quick: bool = False, presets=None, batch_sizes=None) -> list[dict]:
    """The CUDA path against the sequential path and Keras on the same device.

    Prints images/s (median of interleaved repeats) and, for the CUDA path, the time split of
    its epochs: host-to-device transfer of the batches, compute (kernels plus reading back the
    two scalars per step), and the one-off JIT compile of the warm-up. Without a GPU it says
    so and measures nothing (the simulator runs kernels as Python: its speed means nothing).
    ``quick``: a few images per epoch (a smoke run).
    """
    if not gpu_available():
        print("no CUDA GPU present (numba.cuda.is_available() is False, or NUMBA_ENABLE_CUDASIM "
              "is set): the GPU benchmark has nothing to measure here. On a machine with an "
              "NVIDIA GPU and driver, run `python -m cnn bench gpu`.")
        return []
    images = QUICK_IMAGES if quick else DEFAULT_IMAGES
    results = []
    for preset in presets or ("mnist_small", "cifar_tutorial"):
        n = epoch_images(images, preset)
        x, y = synthetic_batch(preset, n)
        for bs in batch_sizes or (32, 128):
            cuda_runs: list = []
            rows = compare([ours_contender(preset, x, y, bs), keras_contender(preset, x, y, bs),
                            ours_contender(preset, x, y, bs, name="ours (cuda)",
                                           histories=cuda_runs, backend="cuda")], n, repeats)
            print_rows(f"{preset}, batch {bs}, {n} images/epoch (ratio = / numpy sequential)",
                       rows)
            warm, timed = cuda_runs[0], cuda_runs[1:]
            med = {k: statistics.median(h.history[k][0] for h in timed)
                   for k in ("time", "transfer_time", "compute_time", "data_time")}
            print(f"  cuda epoch: transfer {med['transfer_time']:.3f} s, compute "
                  f"{med['compute_time']:.3f} s, data {med['data_time']:.3f} s of "
                  f"{med['time']:.3f} s; JIT compile (warm-up) {warm.info['compile_time']:.2f} s")
            results.append({"preset": preset, "batch_size": bs, "numpy": rows[0]["median"],
                            "keras": rows[1]["median"], "cuda": rows[2]["median"],
                            "compile_time": warm.info["compile_time"], **med})
    return results
