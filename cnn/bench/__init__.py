"""Benchmarks that print ratios measured side by side in one run (``python -m cnn bench``).

Suites: ``compare`` (the default, :mod:`cnn.bench.peers`: ours on every CPU path against Keras
and PyTorch at 1 and 2 threads, each contender in a process of its own), ``keras`` (the
sequential path against Keras in this process), ``threads`` (speed-up of ``sync``), ``gpu``,
``memory`` (peak resident memory of training on full CIFAR-10, :mod:`cnn.bench.memory`).

Timed tests are not used anywhere: timings on shared machines are noisy, so each benchmark
warms every contender up, then interleaves their repeats (A, B, A, B, ...) so that drift in
the machine's speed hits all of them alike, and reports the median with the spread and the
absolute figures beside the ratio.

Training throughput is images per second of training epochs (forward, loss, backward and
update on every batch, plus the gather of each batch), on the same fixed random images for
every contender; data values do not change the arithmetic.
"""
from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from typing import Callable

import numpy as np

from ..machine import describe
from ..model import build_model
from ..presets import get_preset

#: images per timed epoch, per architecture: long enough to dwarf per-epoch overhead
DEFAULT_IMAGES = {"mnist_small": 4096, "cifar_tutorial": 1024}


@dataclass
class Contender:
    """A named way to train: ``setup()`` returns ``run()``, which trains one epoch over the
    benchmark's images and returns the seconds the epoch took."""

    name: str
    setup: Callable[[], Callable[[], float]]


def synthetic_batch(preset: str, n: int, seed: int = 0, dtype=np.float32):
    """``n`` random images in [0, 1) with the preset's input shape and random labels."""
    spec = get_preset(preset)
    rng = np.random.default_rng(seed)
    x = rng.random((n, *spec["input_shape"]), dtype=np.float64).astype(dtype)
    y = rng.integers(0, 10, n).astype(np.int64)
    return x, y


def ours(preset: str, x, y, batch_size: int, name: str = "ours (numpy, 1 thread)",
         histories: list | None = None, **fit_options) -> Contender:
    """Our fit loop on the preset; ``fit_options`` pick backend, strategy and threads. Each
    run's History is appended to ``histories`` when given (for the time breakdown)."""
    def setup():
        model = build_model(preset, seed=0)
        optimizer = get_preset(preset)["optimizer"]

        def run() -> float:
            hist = model.fit(x, y, epochs=1, batch_size=batch_size, optimizer=optimizer,
                             verbose=0, **fit_options)
            if histories is not None:
                histories.append(hist)
            return hist.history["time"][0]
        run()  # warm-up: JIT, caches, thread pools
        return run
    return Contender(name, setup)


def keras(preset: str, x, y, batch_size: int, threads: int = 1) -> Contender:
    """The same architecture in Keras (TensorFlow), pinned to ``threads`` threads. The epoch
    is timed inside ``fit`` by a callback, so Keras's per-call set-up is not charged to it."""
    def setup():
        import keras as K
        from ..keras_reference import build_keras_model, configure_threads, to_keras_images
        configure_threads(threads)
        model = build_model(preset, seed=0)
        kmodel = build_keras_model(model)
        opt = get_preset(preset)["optimizer"]
        kmodel.compile(optimizer=K.optimizers.SGD(learning_rate=opt["lr"], momentum=opt["momentum"]),
                       loss=K.losses.SparseCategoricalCrossentropy(from_logits=True),
                       metrics=["accuracy"])
        xk = to_keras_images(x)

        class EpochTimer(K.callbacks.Callback):
            def on_epoch_begin(self, epoch, logs=None):
                self.t = time.perf_counter()

            def on_epoch_end(self, epoch, logs=None):
                self.elapsed = time.perf_counter() - self.t

        timer = EpochTimer()

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
    print(f"\n{title}")
    base = rows[baseline]["median"]
    for r in rows:
        ratio = r["median"] / base
        print(f"  {r['name']:<34} {r['median']:>9,.0f} img/s  (min {r['min']:,.0f}, max "
              f"{r['max']:,.0f}, n={r['repeats']})  ratio {ratio:5.2f}")


def keras_suite(presets=("mnist_small", "cifar_tutorial"), batch_sizes=(32, 128),
                repeats: int = 5, images: dict | None = None) -> list[dict]:
    """Sequential path vs Keras, both on one thread; prints ours/Keras per configuration."""
    results = []
    for preset in presets:
        n = (images or DEFAULT_IMAGES)[preset]
        x, y = synthetic_batch(preset, n)
        for bs in batch_sizes:
            rows = compare([keras(preset, x, y, bs), ours(preset, x, y, bs)], n, repeats)
            print_rows(f"{preset}, batch {bs}, {n} images/epoch (ratio = / keras)", rows)
            results.append({"preset": preset, "batch_size": bs, "keras": rows[0]["median"],
                            "ours": rows[1]["median"],
                            "ratio_ours_keras": rows[1]["median"] / rows[0]["median"]})
    print("\nsummary (images/s, median; ratio ours/keras):")
    for r in results:
        print(f"  {r['preset']:<15} batch {r['batch_size']:>4}: ours {r['ours']:>8,.0f}  "
              f"keras {r['keras']:>8,.0f}  ratio {r['ratio_ours_keras']:.2f}")
    return results


def _backend_available(name: str) -> str | None:
    """None when backend ``name`` loads, else the reason it does not."""
    try:
        from ..backends import get_backend
        get_backend(name)
    except Exception as err:  # an optional backend missing must not stop the other rows
        return f"{type(err).__name__}: {err}"
    return None


def threads_suite(presets=("cifar_tutorial", "mnist_small"), batch_sizes=(32, 128),
                  repeats: int = 5, images: dict | None = None,
                  backends=("numpy", "numba"), threads=(1, 2)) -> list[dict]:
    """Data-parallel threads (strategy ``sync``) against the sequential path.

    Per architecture and batch size, one interleaved comparison of: the sequential path on
    each backend and ``sync`` with each thread count on each backend. Prints images/s, the
    ratio to the sequential NumPy path (the study's baseline) and the ratio to the sequential
    path on the same backend (the threading speed-up proper)."""
    results = []
    usable = []
    for be in backends:
        reason = _backend_available(be)
        if reason:
            print(f"backend {be!r} skipped: {reason}")
        else:
            usable.append(be)
    if "numpy" not in usable:
        raise RuntimeError("the threads suite needs the numpy backend (its baseline)")
    for preset in presets:
        n = (images or DEFAULT_IMAGES)[preset]
        x, y = synthetic_batch(preset, n)
        for bs in batch_sizes:
            configs = []  # (backend, threads or 0 for sequential)
            for be in usable:
                configs.append((be, 0))
                configs += [(be, t) for t in threads if t <= bs]
            contenders = [
                ours(preset, x, y, bs, name=f"{be} sequential", backend=be) if t == 0 else
                ours(preset, x, y, bs, name=f"{be} sync {t} thread{'s' if t > 1 else ''}",
                     backend=be, strategy="sync", threads=t)
                for be, t in configs]
            rows = compare(contenders, n, repeats)
            print_rows(f"{preset}, batch {bs}, {n} images/epoch (ratio = / numpy sequential)",
                       rows)
            seq = {be: rows[configs.index((be, 0))]["median"] for be in usable}
            for (be, t), r in zip(configs, rows):
                results.append({"preset": preset, "batch_size": bs, "backend": be,
                                "strategy": "sequential" if t == 0 else "sync",
                                "threads": max(t, 1), "images_per_sec": r["median"],
                                "min": r["min"], "max": r["max"],
                                "vs_numpy_sequential": r["median"] / seq["numpy"],
                                "speedup": r["median"] / seq[be]})
    print("\nsummary (images/s, median; speed-up = sync / sequential on the same backend; "
          "x np = / numpy sequential):")
    print(f"  {'preset':<15}{'batch':>6}  {'backend':<8}{'sequential':>11}"
          + "".join(f"{f'sync {t}':>10}{'speed-up':>10}{'x np':>7}" for t in threads))
    for preset in presets:
        for bs in batch_sizes:
            for be in usable:
                sel = [r for r in results if (r["preset"], r["batch_size"], r["backend"]) ==
                       (preset, bs, be)]
                seq_row = next(r for r in sel if r["strategy"] == "sequential")
                line = (f"  {preset:<15}{bs:>6}  {be:<8}{seq_row['images_per_sec']:>11,.0f}")
                for t in threads:
                    r = next((r for r in sel if r["strategy"] == "sync" and r["threads"] == t),
                             None)
                    line += (f"{r['images_per_sec']:>10,.0f}{r['speedup']:>9.2f}x"
                             f"{r['vs_numpy_sequential']:>6.2f}x" if r else f"{'-':>27}")
                print(line)
    return results


def gpu_available() -> bool:
    """True when a real CUDA GPU is usable (the simulator does not count: it measures nothing)."""
    import os
    if os.environ.get("NUMBA_ENABLE_CUDASIM", "0") not in ("", "0"):
        return False
    try:
        from numba import cuda
        return bool(cuda.is_available())
    except Exception:  # no driver, no toolkit: no GPU to measure
        return False


def gpu_suite(presets=("mnist_small", "cifar_tutorial"), batch_sizes=(32, 128),
              repeats: int = 5, images: dict | None = None) -> list[dict]:
    """The CUDA path against the sequential path and Keras on the same device.

    Prints images/s (median of interleaved repeats) and, for the CUDA path, the time split of
    its epochs: host-to-device transfer of the batches, compute (kernels plus reading back the
    two scalars per step), and the one-off JIT compile of the warm-up. Without a GPU it says
    so and measures nothing (the simulator runs kernels as Python: its speed means nothing).
    """
    if not gpu_available():
        print("no CUDA GPU present (numba.cuda.is_available() is False, or NUMBA_ENABLE_CUDASIM "
              "is set): the GPU benchmark has nothing to measure here. On a machine with an "
              "NVIDIA GPU and driver, run `python -m cnn bench gpu`.")
        return []
    results = []
    for preset in presets:
        n = (images or DEFAULT_IMAGES)[preset]
        x, y = synthetic_batch(preset, n)
        for bs in batch_sizes:
            cuda_runs: list = []
            rows = compare([ours(preset, x, y, bs), keras(preset, x, y, bs),
                            ours(preset, x, y, bs, name="ours (cuda)", histories=cuda_runs,
                                 backend="cuda")], n, repeats)
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


def mpi_suite(repeats: int = 5, images=None, presets=None, batch_sizes=None,
              json_path: str | None = None) -> None:
    """MPI ranks: allreduce latency/bandwidth (fitted alpha, beta) and whether overlapping the
    allreduce with backward pays; the code is in :mod:`cnn.parallel.bench_mpi`. ``json_path``:
    where the figures go for the study's scaling model (``results/mpi_allreduce.json``)."""
    from ..parallel.bench_mpi import suite
    suite(repeats=repeats, quick=images is not None, presets=presets, batch_sizes=batch_sizes,
          json_path=json_path)


def compare_suite(quick: bool = False, json_path: str | None = None, **kwargs):
    """The default suite: ours vs Keras and PyTorch at 1 and 2 threads (:mod:`.peers`)."""
    from .peers import run
    return run(quick=quick, json_path=json_path, **kwargs)


def memory_suite(**kwargs):
    """Peak resident memory of training on full CIFAR-10 (:mod:`.memory`), for the model of
    ``--presets`` (default ``cifar_tutorial``) at ``--batch-sizes`` (default 128)."""
    from .memory import memory_suite as run
    kwargs.pop("repeats", None)
    if kwargs.pop("images", None) is not None:  # --quick: a small subset, a smoke run
        kwargs["limit"] = 1024
    return run(**kwargs)


#: suite name -> function; ``compare`` is the default (other suites register here too)
SUITES = {"compare": compare_suite, "keras": keras_suite, "threads": threads_suite,
          "gpu": gpu_suite, "mpi": mpi_suite, "memory": memory_suite}
#: the suites that write their figures to ``--json PATH``
JSON_SUITES = ("compare", "mpi")


def main(suite: str = "compare", repeats: int = 5, quick: bool = False, presets=None,
         batch_sizes=None, json_path: str | None = None) -> None:
    if suite not in SUITES:
        raise ValueError(f"unknown benchmark suite {suite!r}; choose one of {sorted(SUITES)}")
    if json_path is not None and suite not in JSON_SUITES:
        raise ValueError(f"--json {json_path}: the {suite!r} suite writes no figures; --json "
                         f"works with {' and '.join(JSON_SUITES)}")
    kwargs = {"repeats": 1 if quick else repeats}
    if suite in JSON_SUITES:
        kwargs["json_path"] = json_path
    if suite == "compare":
        kwargs["quick"] = quick
    else:
        print(f"machine: {describe()}")
        if quick:
            kwargs["images"] = {"mnist_small": 256, "cifar_tutorial": 64}
    if presets:
        kwargs["presets"] = presets
    if batch_sizes:
        kwargs["batch_sizes"] = batch_sizes
    SUITES[suite](**kwargs)
