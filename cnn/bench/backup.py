"""``python -m cnn bench backup``: what :func:`cnn.train.fit`'s backups (:mod:`cnn.backup`)
cost a training run: the sequential path on one thread (Numba, :data:`BACKEND`) trains epochs
of 100 steps without backups and with a backup every 100 steps, interleaved
(:mod:`cnn.bench.harness`).

Two figures per preset and batch size: the ratio of the median epoch times (what a user sees,
noisy on a shared machine), and the seconds the backups took, measured inside ``fit``
(``history.info["backup_time"]``, per backup) against the median epoch without backups (the
direct figure, which a loaded machine disturbs much less).
"""
from __future__ import annotations

import shutil
import statistics
import tempfile

from ..model import build_model
from ..presets import get_preset
from .harness import Contender, compare, ours_contender, print_rows, synthetic_batch

#: steps between backups, and per timed epoch
EVERY = 100
#: the backend both contenders train on, named (never fit's default, which may change): the
#: fastest CPU backend, where a backup's share of an epoch is the largest
BACKEND = "numba"


def backup_contender(preset: str, x, y, batch_size: int, every: int,
                     costs: list, backend: str = BACKEND) -> Contender:
    """Our fit loop with a backup every ``every`` steps into a new folder for each epoch (a
    folder with a finished run's backup would continue it instead of training); the seconds
    each backup took go to ``costs``."""
    def setup():
        model = build_model(preset, seed=0)
        optimizer = get_preset(preset)["optimizer"]

        def run() -> float:
            folder = tempfile.mkdtemp(prefix="cnn-bench-backup-")
            try:
                hist = model.fit(x, y, epochs=1, batch_size=batch_size, optimizer=optimizer,
                                 backend=backend, verbose=0, backup_dir=folder,
                                 backup_every=f"{every}steps")
            finally:
                shutil.rmtree(folder, ignore_errors=True)
            writes = len(x) // (batch_size * every) + 1  # those due, and the one at the end
            costs.append(hist.info["backup_time"] / writes)
            return hist.history["time"][0]
        run()  # warm-up
        costs.clear()
        return run
    return Contender(f"ours, a backup every {every} steps", setup)


def suite(repeats: int = 5, quick: bool = False, presets=None, batch_sizes=None) -> list[dict]:
    """Epochs of :data:`EVERY` steps with and without a backup at their end, per preset
    (default ``cifar_tutorial``) and batch size (default 32); prints both figures.
    ``quick``: epochs of 10 steps, a backup every 10 (a smoke run)."""
    every = 10 if quick else EVERY
    results = []
    for preset in presets or ("cifar_tutorial",):
        for bs in batch_sizes or (32,):
            n = every * bs
            x, y = synthetic_batch(preset, n)
            costs: list[float] = []
            rows = compare([ours_contender(preset, x, y, bs, name="ours, no backup",
                                           backend=BACKEND),
                            backup_contender(preset, x, y, bs, every, costs)], n, repeats)
            print_rows(f"{preset}, batch {bs}, {every} steps ({n} images) per epoch "
                       f"(ratio = / no backup)", rows)
            epoch = n / rows[0]["median"]
            cost = statistics.median(costs)
            result = {"preset": preset, "batch_size": bs, "steps": every,
                      "epoch_seconds": epoch, "backup_seconds": cost,
                      "overhead_measured": cost / epoch,
                      "overhead_ratio": rows[0]["median"] / rows[1]["median"] - 1.0}
            print(f"  one backup: {cost * 1e3:.1f} ms (median of {len(costs)}) = "
                  f"{100 * result['overhead_measured']:.2f}% of {every} steps "
                  f"({epoch:.2f} s); from the epoch times: "
                  f"{100 * result['overhead_ratio']:+.2f}%")
            results.append(result)
    return results
