"""``python -m cnn bench ceiling``: how fast two workers could train if they exchanged nothing,
beside how fast the two-worker paths do, interleaved in one run (:mod:`cnn.bench.harness`).

A ``sync`` step on two workers is at best two passes (forward, loss, backward) of half the
batch each, at once. Two things keep that below twice one core's pass of the whole batch
before any gradient moves or any weight is updated:

- **fixed costs per pass**: work that does not shrink with the images (the Winograd filter
  transforms, weight-sized gradients, the Python and dispatch of every op), which each
  worker pays for half the images: *one core, half batches* against *one core, whole
  batches*;
- **contention between two passes at once**: for threads the GIL (the Python between the
  ``nogil`` kernels, and the wake-up of a thread that waited for it), for threads and
  processes alike the shared memory system: *two threads* and *two processes* against
  twice *one core, half batches*.

Per preset and batch size ``B`` the suite times, on the Numba backend with BLAS pinned to one
thread, epochs of the same synthetic images as: one core passing batches of ``B``; one core
passing halves of ``B``; two threads and two worker processes each passing half of every
batch at once (the shards of a ``sync`` step, without the exchange or the update; each
process has its own copy of the model and its half of the images); and, as the fit trains,
one Numba core, ``sync`` over two threads and over two processes. The passes read each batch
as a slice (the fits gather theirs).

The summary gives each two-worker path's *ceiling*, its two workers' passes in images/s over
one core's, split into the fixed-cost factor and the contention factor, and what the fit
reaches of its ceiling: what is left to the exchange, the update and the fit loop.
"""
from __future__ import annotations

import threading
import time
from multiprocessing import get_context

from ..backends import get_backend
from ..context import StepContext, Workspace
from ..model import build_model
from ..parallel.transport import shard_bounds
from .harness import (QUICK_IMAGES, Contender, compare, epoch_images, ours_contender,
                      print_rows, synthetic_batch)
from .peers import IMAGES

#: the backend every contender runs on: the fastest CPU backend whose ops are ``nogil``
BACKEND = "numba"
#: the workers of the two-worker rows
WORKERS = 2


def shard_rows(n: int, batch_size: int, workers: int, i: int) -> list[tuple[int, int]]:
    """Worker ``i``'s rows ``[lo, hi)`` of each batch of an epoch of ``n`` images in batches of
    ``batch_size`` (the last one shorter), as ``sync`` cuts them: contiguous shards whose
    sizes differ by at most one, the first ``size % workers`` shards one longer. An empty
    shard (a batch smaller than ``workers``) is left out."""
    rows = []
    for start in range(0, n, batch_size):
        size = min(batch_size, n - start)
        lo, hi = shard_bounds(size, workers)[i]
        if hi > lo:
            rows.append((start + lo, start + hi))
    return rows


class _Passes:
    """One worker's passes: ``run(rows)`` trains forward, loss and backward (no update) on
    ``x[lo:hi]`` for each ``(lo, hi)`` of ``rows`` and returns the seconds they took. Each
    worker has its own workspace (its buffers, as a worker of a fit has)."""

    def __init__(self, model, x, y):
        self.model, self.x, self.y = model, x, y
        self.backend = get_backend(BACKEND)
        self.ctx = StepContext(training=True, workspace=Workspace(self.backend))

    def run(self, rows) -> float:
        start = time.perf_counter()
        for lo, hi in rows:
            self.model.loss_and_grads(self.x[lo:hi], self.y[lo:hi], backend=self.backend,
                                      ctx=self.ctx)
        return time.perf_counter() - start


def one_core_contender(preset: str, x, y, rows, name: str) -> Contender:
    """Passes over ``rows`` on the calling thread."""
    def setup():
        passes = _Passes(build_model(preset, seed=0), x, y)
        passes.run(rows[:1])  # compiles
        return lambda: passes.run(rows)
    return Contender(name, setup)


def threads_contender(preset: str, x, y, shards, name: str) -> Contender:
    """``len(shards)`` threads, thread ``i`` passing ``shards[i]``, all at once on one model's
    weights (each thread its own workspace); the epoch is the wall time until the last ends."""
    def setup():
        model = build_model(preset, seed=0)
        workers = [_Passes(model, x, y) for _ in shards]
        for w, rows in zip(workers, shards):
            w.run(rows[:1])

        def run() -> float:
            threads = [threading.Thread(target=w.run, args=(rows,))
                       for w, rows in zip(workers, shards)]
            start = time.perf_counter()
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            return time.perf_counter() - start
        return run
    return Contender(name, setup)


def _process_worker(conn, preset: str, n: int, rows) -> None:
    """A worker process of :class:`ProcessesContender`: its own model and images (the same
    synthetic images as the parent's), BLAS on one thread; passes ``rows`` each time it is
    told to and answers when done, until told ``None``."""
    from threadpoolctl import threadpool_limits
    with threadpool_limits(1, "blas"):
        x, y = synthetic_batch(preset, n)
        passes = _Passes(build_model(preset, seed=0), x, y)
        passes.run(rows[:1])
        conn.send("ready")
        while conn.recv() is not None:
            passes.run(rows)
            conn.send("done")


class ProcessesContender(Contender):
    """``len(shards)`` worker processes (started with ``spawn``: the parent runs threads), process
    ``i`` passing ``shards[i]``, all told to start at once; the epoch is the wall time until
    the last answers. :meth:`close` stops them."""

    def __init__(self, preset: str, n: int, shards, name: str):
        super().__init__(name, self._setup)
        self.preset, self.n, self.shards = preset, n, shards
        self._workers: list = []

    def _setup(self):
        ctx = get_context("spawn")
        for rows in self.shards:
            parent, child = ctx.Pipe()
            proc = ctx.Process(target=_process_worker, args=(child, self.preset, self.n, rows),
                               daemon=True)
            proc.start()
            child.close()
            self._workers.append((proc, parent))
        for proc, conn in self._workers:
            if conn.recv() != "ready":
                raise RuntimeError(f"bench ceiling: worker process {proc.pid} did not start")

        def run() -> float:
            start = time.perf_counter()
            for _, conn in self._workers:
                conn.send(True)
            for _, conn in self._workers:
                conn.recv()
            return time.perf_counter() - start
        return run

    def close(self) -> None:
        for proc, conn in self._workers:
            try:
                conn.send(None)
            except OSError:  # already gone
                pass
        for proc, conn in self._workers:
            proc.join(10)
            if proc.is_alive():
                proc.kill()
            conn.close()
        self._workers = []


#: the rows of one comparison, in order: (key, name with {b} for the batch and {h} its half)
ROWS = (("one_core", "one core, passes of {b}"),
        ("one_core_half", "one core, passes of {h}"),
        ("threads", f"{WORKERS} threads, passes of {{h}} each"),
        ("processes", f"{WORKERS} processes, passes of {{h}} each"),
        ("fit_one_core", "fit: numba, 1 core"),
        ("fit_sync", f"fit: sync, {WORKERS} threads"),
        ("fit_processes", f"fit: processes, {WORKERS} workers"))


def ceilings(rate: dict) -> dict:
    """The summary of one comparison from the median images/s of each row of :data:`ROWS`
    (keyed by its key): for ``threads`` and ``processes``, the ceiling (their passes over one
    core's passes of whole batches), its fixed-cost factor (``WORKERS`` times one core's rate
    on halves over its rate on whole batches: what the workers could reach with no
    contention) and contention factor (the workers' rate over that), the fit's speed-up over
    the one-core fit, and the share of the ceiling it reaches; and ``gil_factor``, the threads'
    contention factor over the processes': what threads lose beyond what separate processes
    lose on the same memory system: the GIL's part (1: the GIL costs nothing)."""
    fixed = WORKERS * rate["one_core_half"] / rate["one_core"]
    out = {"fixed_cost_factor": fixed}
    for path, fit in (("threads", "fit_sync"), ("processes", "fit_processes")):
        ceiling = rate[path] / rate["one_core"]
        speedup = rate[fit] / rate["fit_one_core"]
        out[path] = {"ceiling": ceiling, "contention_factor": ceiling / fixed,
                     "fit_speedup": speedup, "share_of_ceiling": speedup / ceiling}
    out["gil_factor"] = (out["threads"]["contention_factor"]
                         / out["processes"]["contention_factor"])
    return out


def suite(repeats: int = 5, quick: bool = False, presets=None, batch_sizes=None) -> list[dict]:
    """Per preset and batch size: the rows of :data:`ROWS` (median images/s of ``repeats``
    interleaved epochs, with their range) and :func:`ceilings`."""
    from threadpoolctl import threadpool_limits
    batch_sizes = batch_sizes or (32, 128)
    for bs in batch_sizes:
        if bs < WORKERS:
            raise ValueError(f"--batch-sizes {bs}: the ceiling suite splits each batch between "
                             f"{WORKERS} workers; use batch sizes >= {WORKERS}")
    images = QUICK_IMAGES if quick else IMAGES
    results = []
    with threadpool_limits(1, "blas"):
        for preset in presets or ("cifar_tutorial", "cifar_resnet20"):
            n = epoch_images(images, preset)
            x, y = synthetic_batch(preset, n)
            for bs in batch_sizes:
                results.append(_comparison(preset, n, x, y, bs, repeats))
    print(f"\nsummary: ceiling = {WORKERS} workers' passes (img/s) / one core's passes of whole "
          "batches = fixed-cost factor x contention factor; fit = the fit's speed-up over one "
          "core's fit; share = fit / ceiling; gil = threads' contention / processes' contention")
    print(f"  {'preset':<15}{'batch':>6}{'fixed':>7}  {'path':<10}{'contention':>11}"
          f"{'ceiling':>9}{'fit':>7}{'share':>7}{'gil':>7}")
    for r in results:
        s = r["summary"]
        for path in ("threads", "processes"):
            p = s[path]
            print(f"  {r['preset']:<15}{r['batch_size']:>6}{s['fixed_cost_factor']:>7.2f}  "
                  f"{path:<10}{p['contention_factor']:>11.2f}{p['ceiling']:>9.2f}"
                  f"{p['fit_speedup']:>7.2f}{p['share_of_ceiling']:>7.2f}"
                  + (f"{s['gil_factor']:>7.2f}" if path == "threads" else ""))
    return results


def _comparison(preset: str, n: int, x, y, bs: int, repeats: int) -> dict:
    half = -(-bs // WORKERS)
    names = {key: name.format(b=bs, h=half) for key, name in ROWS}
    shards = [shard_rows(n, bs, WORKERS, i) for i in range(WORKERS)]
    processes = ProcessesContender(preset, n, shards, names["processes"])
    fit = {"backend": BACKEND}
    contenders = [
        one_core_contender(preset, x, y, shard_rows(n, bs, 1, 0), names["one_core"]),
        one_core_contender(preset, x, y, shard_rows(n, half, 1, 0), names["one_core_half"]),
        threads_contender(preset, x, y, shards, names["threads"]),
        processes,
        ours_contender(preset, x, y, bs, names["fit_one_core"], **fit),
        ours_contender(preset, x, y, bs, names["fit_sync"], strategy="sync", threads=WORKERS,
                       **fit),
        ours_contender(preset, x, y, bs, names["fit_processes"], strategy="processes",
                       threads=WORKERS, **fit)]
    try:
        rows = compare(contenders, n, repeats)
    finally:
        processes.close()
    print_rows(f"{preset}, batch {bs}, {n} images/epoch, backend {BACKEND} (ratio = / one "
               f"core's passes of {bs})", rows)
    rate = {key: r["median"] for (key, _), r in zip(ROWS, rows)}
    return {"preset": preset, "batch_size": bs, "images": n, "backend": BACKEND,
            "rows": {key: {k: r[k] for k in ("name", "median", "min", "max", "repeats")}
                     for (key, _), r in zip(ROWS, rows)},
            "summary": ceilings(rate)}
