"""``python -m cnn bench trace``: what recording a timeline (``fit(trace=...)``, see
:mod:`cnn.trace`) costs: each path trained with the trace off and on, the two interleaved epoch
by epoch in this process (:mod:`cnn.bench.harness`), on the same synthetic images.

The traced epochs record every span of every step; the trace file is written after the fit,
outside the timed epoch, so what the ratio shows is the recording itself.
"""
from __future__ import annotations

import tempfile
from pathlib import Path

from .harness import (DEFAULT_IMAGES, QUICK_IMAGES, compare, epoch_images, ours_contender,
                      synthetic_batch)

#: (label, fit options) of the paths measured
PATHS = (("sequential numba", {"backend": "numba"}),
         ("sync numba x2", {"backend": "numba", "strategy": "sync", "threads": 2}))


def suite(repeats: int = 5, quick: bool = False, presets=None, batch_sizes=None) -> list[dict]:
    """Per preset, batch size and path: img/s with the trace off and on (medians of
    ``repeats`` interleaved epochs) and the overhead of tracing, ``off / on - 1``."""
    images = QUICK_IMAGES if quick else DEFAULT_IMAGES
    results = []
    with tempfile.TemporaryDirectory(prefix="cnn-bench-trace-") as tmp:
        for preset in presets or ("cifar_tutorial", "mnist_small"):
            n = epoch_images(images, preset)
            x, y = synthetic_batch(preset, n)
            for bs in batch_sizes or (32, 128):
                for label, options in PATHS:
                    off = ours_contender(preset, x, y, bs, name=f"{label}, trace off", **options)
                    on = ours_contender(preset, x, y, bs, name=f"{label}, trace on",
                                        trace=Path(tmp) / "trace.json", **options)
                    rows = compare([off, on], n, repeats)
                    overhead = rows[0]["median"] / rows[1]["median"] - 1
                    results.append({"preset": preset, "batch_size": bs, "path": label,
                                    "off": rows[0]["median"], "on": rows[1]["median"],
                                    "overhead": overhead})
                    print(f"{preset:<15} batch {bs:>4}  {label:<17} off {rows[0]['median']:>8,.0f}"
                          f" img/s ({rows[0]['min']:,.0f}-{rows[0]['max']:,.0f})  on "
                          f"{rows[1]['median']:>8,.0f} img/s ({rows[1]['min']:,.0f}-"
                          f"{rows[1]['max']:,.0f})  tracing costs {100 * overhead:+.1f}%",
                          flush=True)
    return results
