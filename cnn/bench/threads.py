"""``python -m cnn bench threads``: the speed-up of data-parallel threads (strategy ``sync``)
over the sequential path, on each backend, in this process, interleaved
(:mod:`cnn.bench.harness`)."""
from __future__ import annotations

from .harness import (DEFAULT_IMAGES, QUICK_IMAGES, compare, epoch_images, ours_contender,
                      print_rows, synthetic_batch)


def _backend_available(name: str) -> str | None:
    """None when backend ``name`` loads, else the reason it does not."""
    try:
        from ..backends import get_backend
        get_backend(name)
    except Exception as err:  # an optional backend missing must not stop the other rows
        return f"{type(err).__name__}: {err}"
    return None


def suite(repeats: int = 5, quick: bool = False, presets=None, batch_sizes=None,
          backends=("numpy", "numba"), threads=(1, 2)) -> list[dict]:
    """Data-parallel threads (strategy ``sync``) against the sequential path.

    Per architecture and batch size, one interleaved comparison of: the sequential path on
    each backend and ``sync`` with each thread count on each backend. Prints images/s, the
    ratio to the sequential NumPy path (the study's baseline) and the ratio to the sequential
    path on the same backend (the threading speed-up proper). ``quick``: a few images per
    epoch (a smoke run)."""
    presets = presets or ("cifar_tutorial", "mnist_small")
    batch_sizes = batch_sizes or (32, 128)
    images = QUICK_IMAGES if quick else DEFAULT_IMAGES
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
        n = epoch_images(images, preset)
        x, y = synthetic_batch(preset, n)
        for bs in batch_sizes:
            configs = []  # (backend, threads or 0 for sequential)
            for be in usable:
                configs.append((be, 0))
                configs += [(be, t) for t in threads if t <= bs]
            contenders = [
                ours_contender(preset, x, y, bs, name=f"{be} sequential", backend=be) if t == 0
                else ours_contender(preset, x, y, bs,
                                    name=f"{be} sync {t} thread{'s' if t > 1 else ''}",
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
