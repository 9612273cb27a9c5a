"""What the benchmark suites are built from: the synthetic images every contender trains on,
a :class:`Contender` (ours or Keras, set up in this process), the interleaved comparison of
contenders and its table.

Timed tests are not used anywhere: timings on shared machines are noisy, so each comparison
warms every contender up, then interleaves their repeats (A, B, A, B, ...) so that drift in
the machine's speed hits all of them alike, and reports the median with the spread and the
absolute figures beside the ratio.

Training throughput is images per second of training epochs (forward, loss, backward and
update on every batch, plus the gather of each batch), on the same fixed random images for
every contender; data values do not change the arithmetic.
"""
from __future__ import annotations

import statistics
from dataclasses import dataclass
from typing import Callable

import numpy as np

from ..model import build_model
from ..presets import get_preset

#: images per timed epoch, per architecture: long enough to dwarf per-epoch overhead (others:
#: :func:`epoch_images`)
DEFAULT_IMAGES = {"mnist_small": 4096, "cifar_tutorial": 1024, "cifar_resnet20": 256}
#: images per epoch of a ``--quick`` smoke run
QUICK_IMAGES = {"mnist_small": 256, "cifar_tutorial": 64, "cifar_resnet20": 64}


def epoch_images(table: dict, preset) -> int:
    """Images per timed epoch of ``preset`` (a name or a spec): its entry in ``table``, else
    as many as train in the FLOPs of ``cifar_tutorial``'s entry, rounded up to a multiple of
    128 (the largest batch the suites time by default)."""
    if isinstance(preset, str) and preset in table:
        return table[preset]
    from .hardware import training_flops_per_image
    budget = table["cifar_tutorial"] * training_flops_per_image(build_model("cifar_tutorial"))
    images = budget / training_flops_per_image(build_model(preset))
    return 128 * max(1, -(-int(images) // 128))


@dataclass
class Contender:
    """A named way to train: ``setup()`` returns ``run()``, which trains one epoch over the
    benchmark's images and returns the seconds the epoch took."""

    name: str
    setup: Callable[[], Callable[[], float]]


def synthetic_batch(preset: str, n: int, seed: int = 0, dtype=np.float32):
    """``n`` random images in [0, 1) with the preset's input shape ``(n, C, H, W)`` and random
    labels ``(n,)`` in 0..9."""
    spec = get_preset(preset)
    rng = np.random.default_rng(seed)
    x = rng.random((n, *spec["input_shape"]), dtype=np.float64).astype(dtype)
    y = rng.integers(0, 10, n).astype(np.int64)
    return x, y


def ours_contender(preset: str, x, y, batch_size: int, name: str = "ours (numpy, 1 thread)",
         histories: list | None = None, backend: str = "numpy", **fit_options) -> Contender:
    """Our fit loop on the preset over ``backend`` (named, never ``fit``'s default);
    ``fit_options`` pick strategy and threads. Each run's History is appended to
    ``histories`` when given (for the time breakdown)."""
    def setup():
        model = build_model(preset, seed=0)
        optimizer = get_preset(preset)["optimizer"]

        def run() -> float:
            hist = model.fit(x, y, epochs=1, batch_size=batch_size, optimizer=optimizer,
                             backend=backend, verbose=0, **fit_options)
            if histories is not None:
                histories.append(hist)
            return hist.history["time"][0]
        run()  # warm-up: JIT, caches, thread pools
        return run
    return Contender(name, setup)


def keras_contender(preset: str, x, y, batch_size: int, threads: int = 1) -> Contender:
    """The same architecture in Keras (TensorFlow), pinned to ``threads`` threads, set up by
    the Keras reference. The epoch is timed inside ``fit`` by its epoch timer, so Keras's
    per-call set-up is not charged to it."""
    def setup():
        from ..reference.keras import compiled_keras_model, epoch_timer, to_keras_images
        model = build_model(preset, seed=0)
        kmodel = compiled_keras_model(model, get_preset(preset)["optimizer"], threads)
        xk = to_keras_images(x)
        timer = epoch_timer()

        def run() -> float:
            kmodel.fit(xk, y, batch_size=batch_size, epochs=1, shuffle=True, verbose=0,
                       callbacks=[timer])
            return timer.elapsed
        run()
        return run
    return Contender(f"keras (tensorflow, {threads} thread{'s' if threads > 1 else ''})", setup)


def compare(contenders: list[Contender], n_images: int, repeats: int) -> list[dict]:
    """Warm every contender up, then interleave ``repeats`` epochs of each. Returns one row per
    contender: median images/s and the min-max range."""
    runs = [c.setup() for c in contenders]
    times: list[list[float]] = [[] for _ in contenders]
    for _ in range(repeats):
        for i, run in enumerate(runs):
            times[i].append(run())
    rows = []
    for c, ts in zip(contenders, times):
        rates = [n_images / t for t in ts]
        rows.append({"name": c.name, "median": statistics.median(rates), "min": min(rates),
                     "max": max(rates), "repeats": repeats})
    return rows


def print_rows(title: str, rows: list[dict], baseline: int = 0) -> None:
    """The table of one comparison: per contender its median images/s, range, repeats and
    ratio to the row ``baseline``."""
    print(f"\n{title}")
    base = rows[baseline]["median"]
    for r in rows:
        ratio = r["median"] / base
        print(f"  {r['name']:<34} {r['median']:>9,.0f} img/s  (min {r['min']:,.0f}, max "
              f"{r['max']:,.0f}, n={r['repeats']})  ratio {ratio:5.2f}")
