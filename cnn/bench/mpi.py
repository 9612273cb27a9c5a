"""``python -m cnn bench mpi``: what communication costs between MPI ranks, and whether
overlapping it with the backward pass pays.

The suite starts ``ranks`` ranks (default 2) with the venv's ``mpiexec`` running
``python -m cnn.bench.mpi``; rank 0 prints.

1. **Allreduce latency and bandwidth** over message sizes from 1 KiB to 16 MiB (powers of
   two; float32 buffers, ``MPI.SUM``, in place, the call the ``mpi`` strategy makes). For each
   size, after a warm-up, the ranks pass a barrier and time a batch of calls; a call's time is
   the slowest rank's mean; the batch is repeated ``repeats`` times and the median reported.
   The cost model ``t(n) = alpha + beta * n`` (``n`` in bytes) is fitted to the medians by
   least squares on relative error, so that the small messages (latency) weigh as much as the
   large ones (bandwidth); ``alpha`` (s) and ``beta`` (s/byte) are what the study's scaling
   model uses for the time of one gradient allreduce, ``alpha + beta * 4 * parameters``.
2. **Overlap**: training throughput of ``strategy="mpi"`` with ``overlap=False`` and
   ``overlap=True`` (per-layer ``Iallreduce`` started while backward runs), the two
   interleaved repeat by repeat, on the same synthetic images; with the median images/s of
   each and their ratio.

``--json PATH`` writes the figures (for the study). Timings on a shared machine are noisy:
read the spread beside the medians.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import numpy as np

from ..files import atomic_write

SIZES = [1 << k for k in range(10, 25)]  # 1 KiB .. 16 MiB


def fit_alpha_beta(sizes, times) -> tuple[float, float, float]:
    """``alpha, beta`` of ``t = alpha + beta * n`` minimising the sum of squared relative
    errors, and the largest relative error of the fit over the points."""
    n = np.asarray(sizes, np.float64)
    t = np.asarray(times, np.float64)
    a = np.stack([np.ones_like(n), n], axis=1) / t[:, None]
    (alpha, beta), *_ = np.linalg.lstsq(a, np.ones_like(t), rcond=None)
    worst = float(np.max(np.abs(alpha + beta * n - t) / t))
    return float(alpha), float(beta), worst


def allreduce_times(comm, MPI, sizes, repeats: int, budget: float = 0.05) -> list[dict]:
    """Median seconds per in-place Allreduce of each size (the slowest rank's mean)."""
    rows = []
    for size in sizes:
        buf = np.ones(size // 4, np.float32)
        for _ in range(3):
            comm.Allreduce(MPI.IN_PLACE, buf, MPI.SUM)
        # calls per batch: about `budget` seconds, agreed on by all ranks
        comm.Barrier()
        t = time.perf_counter()
        comm.Allreduce(MPI.IN_PLACE, buf, MPI.SUM)
        one = np.array([time.perf_counter() - t])
        comm.Allreduce(MPI.IN_PLACE, one, MPI.MAX)
        calls = int(max(3, min(2000, budget / max(one[0], 1e-7))))
        samples = []
        for _ in range(repeats):
            comm.Barrier()
            t = time.perf_counter()
            for _ in range(calls):
                comm.Allreduce(MPI.IN_PLACE, buf, MPI.SUM)
            mean = np.array([(time.perf_counter() - t) / calls])
            comm.Allreduce(MPI.IN_PLACE, mean, MPI.MAX)
            samples.append(float(mean[0]))
        rows.append({"bytes": size, "seconds": statistics.median(samples),
                     "min": min(samples), "max": max(samples), "calls": calls})
    return rows


def overlap_times(preset: str, images: int, batch_size: int, repeats: int) -> dict:
    """img/s of the mpi strategy without and with overlap, interleaved."""
    from ..model import build_model
    from ..presets import get_preset
    from .harness import synthetic_batch

    x, y = synthetic_batch(preset, images)
    optimizer = get_preset(preset)["optimizer"]
    results: dict[str, list] = {"blocking": [], "overlap": []}
    comm_share: dict[str, list] = {"blocking": [], "overlap": []}
    models = {k: build_model(preset, seed=0) for k in results}
    for r in range(repeats + 1):  # the first round warms up
        for name in results:
            h = models[name].fit(x, y, epochs=1, batch_size=batch_size, optimizer=optimizer,
                                 strategy="mpi", verbose=0,
                                 strategy_options={"overlap": name == "overlap"}).history
            if r:
                results[name].append(h["images_per_sec"][0])
                comm_share[name].append(h["comm_time"][0] / h["time"][0])
    return {name: {"images_per_sec": statistics.median(v), "min": min(v), "max": max(v),
                   "comm_share": statistics.median(comm_share[name])}
            for name, v in results.items()}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m cnn.bench.mpi",
                                description="(run under mpiexec) allreduce and overlap figures")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--presets", nargs="*", default=None)
    p.add_argument("--batch-sizes", nargs="*", type=int, default=None)
    p.add_argument("--json", default=None)
    a = p.parse_args(argv)
    from threadpoolctl import threadpool_limits

    from ..parallel.mpi import load_mpi
    MPI = load_mpi()  # MPI started, and this job's shared-memory names released
    threadpool_limits(1, "blas")
    comm = MPI.COMM_WORLD
    rank, size = comm.Get_rank(), comm.Get_size()
    say = print if rank == 0 else (lambda *args, **kw: None)
    sizes = SIZES[::2] if a.quick else SIZES
    repeats = 1 if a.quick else a.repeats
    from ..parallel.mpi import processor_names
    say(f"MPI: {MPI.Get_library_version().splitlines()[0]}; {size} ranks on hosts "
        f"{processor_names(comm)}", flush=True)
    rows = allreduce_times(comm, MPI, sizes, repeats, budget=0.01 if a.quick else 0.05)
    alpha, beta, worst = fit_alpha_beta([r["bytes"] for r in rows], [r["seconds"] for r in rows])
    say(f"\nAllreduce (in place, float32, SUM) at {size} ranks: median of {repeats} batches "
        f"(min..max); bandwidth = bytes / time")
    say(f"{'bytes':>10}  {'time (us)':>10}  {'min..max (us)':>17}  {'GB/s':>7}  {'model (us)':>10}")
    for r in rows:
        say(f"{r['bytes']:>10,}  {r['seconds'] * 1e6:10.1f}  "
            f"{r['min'] * 1e6:7.1f}..{r['max'] * 1e6:<8.1f}  {r['bytes'] / r['seconds'] / 1e9:7.3f}"
            f"  {(alpha + beta * r['bytes']) * 1e6:10.1f}")
    say(f"\nfitted t(n) = alpha + beta * n: alpha = {alpha:.3e} s ({alpha * 1e6:.1f} us), "
        f"beta = {beta:.3e} s/byte ({1 / beta / 1e9:.2f} GB/s); worst relative error of the "
        f"fit {worst:.0%}", flush=True)
    # the fastest batch of each size: what the machine can do when nothing else runs on it
    a_min, b_min, worst_min = fit_alpha_beta([r["bytes"] for r in rows], [r["min"] for r in rows])
    say(f"fitted to the fastest batch of each size: alpha = {a_min:.3e} s ({a_min * 1e6:.1f} us), "
        f"beta = {b_min:.3e} s/byte ({1 / b_min / 1e9:.2f} GB/s); worst relative error "
        f"{worst_min:.0%}", flush=True)
    overlap = {}
    presets = a.presets or ["mnist_small", "cifar_tutorial"]
    batch_sizes = a.batch_sizes or [32, 128]
    images = {"mnist_small": 256 if a.quick else 2048, "cifar_tutorial": 64 if a.quick else 512}
    say(f"\nOverlap: strategy='mpi' training at {size} ranks (numpy backend, fit's default), "
        f"images/s median of {repeats} (min..max), blocking Allreduce vs per-layer Iallreduce "
        "during backward")
    say(f"{'preset':<15} {'batch':>5}  {'blocking':>18}  {'overlap':>18}  {'ratio':>6}  "
        f"{'comm share (blocking / overlap)':>31}")
    for preset in presets:
        for bs in batch_sizes:
            res = overlap_times(preset, images.get(preset, 512), bs, repeats)
            overlap[f"{preset}/{bs}"] = res
            b, o = res["blocking"], res["overlap"]
            say(f"{preset:<15} {bs:>5}  {b['images_per_sec']:8,.0f} ({b['min']:,.0f}..{b['max']:,.0f})"
                f"  {o['images_per_sec']:8,.0f} ({o['min']:,.0f}..{o['max']:,.0f})"
                f"  {o['images_per_sec'] / b['images_per_sec']:6.2f}  "
                f"{b['comm_share']:>15.0%} / {o['comm_share']:.0%}", flush=True)
    say("\nratio > 1: overlapping pays. MPICH progresses a non-blocking collective only inside "
        "MPI calls (the strategy tests its requests after each layer), and on one machine the "
        "ranks share the cores that compute")
    if rank == 0 and a.json:
        atomic_write(a.json, json.dumps({"ranks": size, "allreduce": rows, "alpha": alpha,
                                         "beta": beta, "fit_worst_relative_error": worst,
                                         "alpha_fastest": a_min, "beta_fastest": b_min,
                                         "overlap": overlap}, indent=1))
        say(f"figures written to {a.json}")
    return 0


def suite(repeats: int = 5, quick: bool = False, presets=None, batch_sizes=None,
          ranks: int = 2, json_path: str | None = None) -> int:
    """Run the benchmark on ``ranks`` ranks (``python -m cnn bench mpi``)."""
    import subprocess

    from ..parallel.launch import find_mpiexec
    cmd = [find_mpiexec(), "-n", str(ranks), sys.executable, "-m", "cnn.bench.mpi",
           "--repeats", str(repeats)]
    if quick:
        cmd.append("--quick")
    if presets:
        cmd += ["--presets", *presets]
    if batch_sizes:
        cmd += ["--batch-sizes", *map(str, batch_sizes)]
    if json_path:
        cmd += ["--json", json_path]
    code = subprocess.call(cmd)
    if code:
        raise RuntimeError(f"the MPI benchmark failed (exit status {code}): {' '.join(cmd)}")
    return code


if __name__ == "__main__":
    sys.exit(main())
