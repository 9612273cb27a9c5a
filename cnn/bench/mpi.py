"""``python -m cnn bench mpi``: what communication costs between MPI ranks, and whether
overlapping it with the backward pass pays; on one machine, or across the hosts of an
emulated cluster whose links are shaped like a real network's.

On one machine (the default) the suite starts ``--ranks`` ranks (default 2) with the venv's
``mpiexec`` running ``python -m cnn.bench.mpi``; rank 0 prints. With ``--cluster PROFILE
[,PROFILE...]`` (root; link profiles of :mod:`cnn.cluster.links`: ``1gbe``, ``10gbe``,
``25gbe``, ``rate=...``) it makes one emulated cluster per profile, with as many hosts as
the largest rank count, and runs the same program on each rank count of ``--ranks`` (default
2, 4, 8), one rank per host, through the cluster's ``mpiexec``. The hosts are network
namespaces of this machine: they share its cores (ranks beyond them are oversubscribed for
computing, though not for a link), and a 10 or 25 Gbit/s profile is a cap that the machine's
own TCP stack may not reach.

1. **Allreduce latency and bandwidth** over message sizes from 1 KiB to 16 MiB (powers of
   two; float32 buffers, ``MPI.SUM``, in place, the call the ``mpi`` strategy makes). For each
   size, after a warm-up, the ranks pass a barrier and time a batch of calls; a call's time is
   the slowest rank's mean; the batch is repeated ``repeats`` times and the median reported.
   With ``--interface NAME`` (the cluster's ``eth0``) each rank also counts the bytes its
   link sent per call, which tells MPICH's algorithm (:mod:`cnn.analysis.collectives`).
   On one machine, ``t(n) = alpha + beta n`` is fitted to the medians by least squares on
   relative error (:func:`fit_alpha_beta`), what the study's scaling model reads from
   ``results/mpi_allreduce.json``.
2. **Training**: images/s of ``strategy="mpi"`` in each variant of ``--variants`` (default
   ``blocking`` and ``overlap``; see :func:`variant_options`), interleaved repeat by repeat on
   the same synthetic images, and the communication each step leaves *exposed*: with
   ``--shared-clock`` (the emulated cluster's hosts read one clock) the time from the moment
   the last rank finished its backward pass to this rank's end of the gradient sum, plus the
   time the training thread spent in MPI calls during backward; without it, the whole time
   in the sum (the wait for the slowest rank included).
3. **The fit per link profile** (with ``--cluster``): ``t(n, p)`` over every measured size
   and rank count with the algorithm MPICH picks for each
   (:func:`cnn.analysis.collectives.fit_allreduce`), its worst and median relative error,
   against the link's own rate; and the one-core step time of each preset (the sequential
   path, in this process), which the scaling model divides over the ranks
   (:mod:`cnn.analysis.scaling`). ``--json PATH`` writes it all (default
   ``results/mpi_cluster.json``).

Timings on a shared machine are noisy: read the spread beside the medians.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from ..files import atomic_write

SIZES = [1 << k for k in range(10, 25)]  # 1 KiB .. 16 MiB
#: the rank counts a cluster run measures by default
CLUSTER_RANKS = (2, 4, 8)
#: where a cluster run writes its figures by default
CLUSTER_JSON = Path("results/mpi_cluster.json")
#: the link each emulated host has (cnn.cluster.emulated.HOST_LINK)
CLUSTER_INTERFACE = "eth0"
#: the training variants the suite measures unless told
DEFAULT_VARIANTS = ("blocking", "overlap")
#: images per timed epoch of the training table, per preset (others: 512)
TRAIN_IMAGES = {"mnist_small": 2048, "cifar_tutorial": 2048, "cifar_resnet20": 1024}


def fit_alpha_beta(sizes, times) -> tuple[float, float, float]:
    """``alpha, beta`` of ``t = alpha + beta * n`` minimising the sum of squared relative
    errors, and the largest relative error of the fit over the points."""
    n = np.asarray(sizes, np.float64)
    t = np.asarray(times, np.float64)
    a = np.stack([np.ones_like(n), n], axis=1) / t[:, None]
    (alpha, beta), *_ = np.linalg.lstsq(a, np.ones_like(t), rcond=None)
    worst = float(np.max(np.abs(alpha + beta * n - t) / t))
    return float(alpha), float(beta), worst


def variant_options(name: str) -> dict:
    """The ``mpi`` strategy options of a training variant named ``name``: ``blocking`` (none),
    or comma-separated items of ``overlap``, ``bucket=<bytes>``, ``progress=<thread|layers>``
    and ``compression=<fp16|bf16>`` (``overlap,bucket=262144``, ``compression=fp16``); a
    ``ValueError`` naming the item otherwise (the strategy checks the values)."""
    if name == "blocking":
        return {}
    keys = {"bucket": ("bucket_bytes", int), "progress": ("progress", str),
            "interval": ("progress_interval", float), "compression": ("compression", str)}
    options: dict = {}
    for item in name.split(","):
        key, _, value = item.partition("=")
        if item == "overlap":
            options["overlap"] = True
        elif key in keys and value:
            option, kind = keys[key]
            try:
                options[option] = kind(value)
            except ValueError:
                raise ValueError(f"variant {name!r}: {key} must be a {kind.__name__}. "
                                 f"Received {item!r}") from None
        else:
            raise ValueError(f"variant {name!r}: items are overlap, bucket=<bytes>, "
                             f"progress=<thread|layers>, compression=<fp16|bf16> (or the whole "
                             f"name blocking). Received {item!r}")
    return options


def _tx_bytes(interface: str | None) -> int:
    """Bytes ``interface`` has sent (0 without one)."""
    if interface is None:
        return 0
    return int(Path(f"/sys/class/net/{interface}/statistics/tx_bytes").read_text())


def allreduce_times(comm, MPI, sizes, repeats: int, budget: float = 0.05,
                    interface: str | None = None) -> list[dict]:
    """Median seconds per in-place Allreduce of each size (the slowest rank's mean); with
    ``interface``, ``sent_per_call``: the mean over the ranks of the bytes their link sent
    per call (headers in), and ``sent_max``: the largest rank's."""
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
        sent = 0
        for _ in range(repeats):
            comm.Barrier()
            before = _tx_bytes(interface)
            t = time.perf_counter()
            for _ in range(calls):
                comm.Allreduce(MPI.IN_PLACE, buf, MPI.SUM)
            mean = np.array([(time.perf_counter() - t) / calls])
            sent += _tx_bytes(interface) - before
            comm.Allreduce(MPI.IN_PLACE, mean, MPI.MAX)
            samples.append(float(mean[0]))
        row = {"bytes": size, "seconds": statistics.median(samples), "min": min(samples),
               "max": max(samples), "calls": calls}
        if interface is not None:  # the barriers' few bytes are in, a rounding error
            per_call = np.array([sent / (calls * repeats)] * 2)
            both = np.empty(2)
            comm.Allreduce(per_call[:1], both[:1], MPI.SUM)
            comm.Allreduce(per_call[1:], both[1:], MPI.MAX)
            row["sent_per_call"] = float(both[0]) / comm.Get_size()
            row["sent_max"] = float(both[1])
        rows.append(row)
    return rows


def exposed_seconds(comm, MPI, timeline, shared_clock: bool) -> dict:
    """Per step, the communication this rank's training thread waited for, as medians over
    the steps of the mean over the ranks: ``wait`` (with ``shared_clock``: from the moment
    the last rank entered the gradient sum to this rank's end of it; without: the whole time
    in it), ``in_backward`` (its MPI calls during backward) and ``exposed``, the sum of the
    two medians.
    ``timeline``: the strategy's ``(entered, left, in_backward)`` of each step."""
    own = np.asarray(timeline, np.float64).reshape(-1, 3)
    every = np.empty((comm.Get_size(), *own.shape))
    comm.Allgather(own, every)
    start = every[:, :, 0].max(axis=0) if shared_clock else every[:, :, 0]
    wait = float(np.median((every[:, :, 1] - start).mean(axis=0)))
    inside = float(np.median(every[:, :, 2].mean(axis=0)))
    return {"wait": wait, "in_backward": inside, "exposed": wait + inside}


def training_times(comm, MPI, preset: str, images: int, batch_size: int, repeats: int,
                   variants, shared_clock: bool = False, interface: str | None = None) -> dict:
    """Images/s of the ``mpi`` strategy in each of ``variants`` (names of
    :func:`variant_options`), interleaved repeat by repeat after one warm-up round, with the
    exposed communication per step (:func:`exposed_seconds`), the share of the epoch the
    strategy spent communicating and, with ``interface``, ``sent_per_step``: the bytes each
    rank's link sent per step (the mean over the ranks)."""
    from ..model import build_model
    from ..parallel.mpi import MPISync
    from ..presets import get_preset
    from .harness import synthetic_batch

    x, y = synthetic_batch(preset, images)
    optimizer = get_preset(preset)["optimizer"]
    options = {name: variant_options(name) for name in variants}
    steps = -(-images // batch_size)
    samples: dict[str, list] = {name: [] for name in variants}
    for r in range(repeats + 1):  # the first round warms up
        for name in variants:
            strategy = MPISync(timeline=True, **options[name])
            model = build_model(preset, seed=0)
            comm.Barrier()
            before = _tx_bytes(interface)
            h = model.fit(x, y, epochs=1, batch_size=batch_size, optimizer=optimizer,
                          strategy=strategy, verbose=0).history
            sent = np.array([(_tx_bytes(interface) - before) / steps])
            comm.Allreduce(MPI.IN_PLACE, sent, MPI.SUM)
            exposed = exposed_seconds(comm, MPI, strategy.timeline, shared_clock)
            if r:
                samples[name].append({"images_per_sec": h["images_per_sec"][0],
                                      "step": h["time"][0] / steps,
                                      "comm_share": h["comm_time"][0] / h["time"][0],
                                      "sent_per_step": float(sent[0]) / comm.Get_size(),
                                      **exposed})
    out = {}
    for name, rows in samples.items():
        ips = [s["images_per_sec"] for s in rows]
        out[name] = {"options": options[name], "images_per_sec": statistics.median(ips),
                     "min": min(ips), "max": max(ips),
                     **{k: statistics.median(s[k] for s in rows)
                        for k in ("step", "comm_share", "wait", "in_backward",
                                  "sent_per_step")}}
        out[name]["exposed"] = out[name]["wait"] + out[name]["in_backward"]
    return out


def _print_allreduce(say, rows, size: int, repeats: int) -> None:
    counted = "sent_per_call" in rows[0]
    say(f"\nAllreduce (in place, float32, SUM) at {size} ranks: median of {repeats} batches "
        f"(min..max); bandwidth = bytes / time" + ("; sent: bytes each rank's link sent per "
                                                    "call / message bytes" if counted else ""))
    say(f"{'bytes':>10}  {'time (us)':>10}  {'min..max (us)':>17}  {'GB/s':>7}"
        + (f"  {'sent/n':>6}" if counted else ""))
    for r in rows:
        say(f"{r['bytes']:>10,}  {r['seconds'] * 1e6:10.1f}  "
            f"{r['min'] * 1e6:7.1f}..{r['max'] * 1e6:<8.1f}  {r['bytes'] / r['seconds'] / 1e9:7.3f}"
            + (f"  {r['sent_per_call'] / r['bytes']:6.2f}" if counted else ""), flush=True)


def compare_with_blocking(results: dict) -> None:
    """Add to each variant of a training table (:func:`training_times`) with a ``blocking``
    one: ``speedup`` (images/s over blocking's), ``exposed_by_step`` (its step time less
    blocking's step without its exposed communication: what the variant adds to the
    computation, slow-downs of the computation by the overlap included) and ``hidden`` and
    ``hidden_by_step``: the share of blocking's exposed communication each measure hides."""
    base = results.get("blocking")
    if base is None:
        return
    compute_only = base["step"] - base["exposed"]
    for r in results.values():
        r["speedup"] = r["images_per_sec"] / base["images_per_sec"]
        r["exposed_by_step"] = r["step"] - compute_only
        if base["exposed"] > 0:
            r["hidden"] = 1 - r["exposed"] / base["exposed"]
            r["hidden_by_step"] = 1 - r["exposed_by_step"] / base["exposed"]


def _print_training(say, preset: str, batch_size: int, results: dict) -> None:
    compare_with_blocking(results)
    for name, r in results.items():
        hidden = ("" if "hidden" not in r or name == "blocking" else
                  f"  hides {r['hidden']:4.0%} (by step {r['hidden_by_step']:4.0%})")
        ratio = f"  x{r['speedup']:.2f}" if "speedup" in r else ""
        sent = f"  sent {r['sent_per_step']:,.0f} B/step" if r["sent_per_step"] else ""
        say(f"{preset:<15} {batch_size:>5}  {name:<28} {r['images_per_sec']:8,.0f} "
            f"({r['min']:,.0f}..{r['max']:,.0f}){ratio}  step {r['step'] * 1e3:6.1f} ms  "
            f"exposed {r['exposed'] * 1e3:6.2f} ms (wait {r['wait'] * 1e3:.2f} + in backward "
            f"{r['in_backward'] * 1e3:.2f}){hidden}{sent}", flush=True)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m cnn.bench.mpi",
                                description="(run under mpiexec) allreduce and training figures")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--presets", nargs="*", default=None,
                   help="presets of the training table (none: no table)")
    p.add_argument("--batch-sizes", nargs="*", type=int, default=None)
    p.add_argument("--variants", nargs="*", default=None,
                   help=f"training variants (default {' '.join(DEFAULT_VARIANTS)})")
    p.add_argument("--interface", default=None,
                   help="count the bytes this network interface sends per allreduce")
    p.add_argument("--shared-clock", action="store_true",
                   help="the ranks read one clock (hosts of an emulated cluster): exposed "
                        "communication counts from the last rank's end of backward")
    p.add_argument("--no-allreduce", action="store_true", help="skip the allreduce table")
    p.add_argument("--json", default=None)
    a = p.parse_args(argv)
    from threadpoolctl import threadpool_limits

    from ..parallel.mpi import load_mpi, processor_names
    MPI = load_mpi()  # MPI started, and this job's shared-memory names released
    threadpool_limits(1, "blas")
    comm = MPI.COMM_WORLD
    rank, size = comm.Get_rank(), comm.Get_size()
    say = print if rank == 0 else (lambda *args, **kw: None)
    sizes = SIZES[::2] if a.quick else SIZES
    repeats = 1 if a.quick else a.repeats
    say(f"MPI: {MPI.Get_library_version().splitlines()[0]}; {size} ranks on hosts "
        f"{processor_names(comm)}", flush=True)
    record: dict = {"ranks": size, "hosts": processor_names(comm)}
    if not a.no_allreduce:
        rows = allreduce_times(comm, MPI, sizes, repeats, budget=0.01 if a.quick else 0.05,
                               interface=a.interface)
        _print_allreduce(say, rows, size, repeats)
        alpha, beta, worst = fit_alpha_beta([r["bytes"] for r in rows],
                                            [r["seconds"] for r in rows])
        say(f"\nfitted t(n) = alpha + beta * n: alpha = {alpha:.3e} s ({alpha * 1e6:.1f} us), "
            f"beta = {beta:.3e} s/byte ({1 / beta / 1e9:.2f} GB/s); worst relative error of "
            f"the fit {worst:.0%}", flush=True)
        # the fastest batch of each size: what the machine can do when nothing else runs on it
        a_min, b_min, worst_min = fit_alpha_beta([r["bytes"] for r in rows],
                                                 [r["min"] for r in rows])
        say(f"fitted to the fastest batch of each size: alpha = {a_min:.3e} s "
            f"({a_min * 1e6:.1f} us), beta = {b_min:.3e} s/byte ({1 / b_min / 1e9:.2f} GB/s); "
            f"worst relative error {worst_min:.0%}", flush=True)
        record.update({"allreduce": rows, "alpha": alpha, "beta": beta,
                       "fit_worst_relative_error": worst, "alpha_fastest": a_min,
                       "beta_fastest": b_min})
    training = {}
    presets = a.presets if a.presets is not None else ["mnist_small", "cifar_tutorial"]
    variants = a.variants or list(DEFAULT_VARIANTS)
    if presets:
        from ..backends import resolve_backend
        say(f"\nTraining: strategy='mpi' at {size} ranks ({resolve_backend('auto')} backend), "
            f"images/s median of "
            f"{repeats} (min..max) and x the blocking one; per step: its time and the "
            f"communication left exposed (median), "
            + ("counted from the last rank's end of backward (one clock)" if a.shared_clock
               else "the whole time in the sum, waits for the slowest rank included"))
    for preset in presets:
        for bs in a.batch_sizes or [32, 128]:
            images = 64 if a.quick else TRAIN_IMAGES.get(preset, 512)
            res = training_times(comm, MPI, preset, images, bs, repeats, variants,
                                 a.shared_clock, a.interface)
            training[f"{preset}/{bs}"] = res
            _print_training(say, preset, bs, res)
    record["training"] = training
    if rank == 0 and a.json:
        atomic_write(a.json, json.dumps(record, indent=1))
        say(f"figures written to {a.json}")
    return 0


# ---- the suite (python -m cnn bench mpi) ---------------------------------------------------------
def _rank_arguments(repeats: int, quick: bool, presets, batch_sizes, variants) -> list[str]:
    args = ["--repeats", str(repeats)]
    if quick:
        args.append("--quick")
    if presets is not None:
        args += ["--presets", *presets]
    if batch_sizes:
        args += ["--batch-sizes", *map(str, batch_sizes)]
    if variants:
        args += ["--variants", *variants]
    return args


def _environment() -> dict:
    """This environment without an outer MPI job's launcher variables."""
    return {k: v for k, v in os.environ.items() if not k.startswith(("PMI_", "PMIX_", "OMPI_"))}


def suite(repeats: int = 5, quick: bool = False, presets=None, batch_sizes=None,
          ranks=None, json_path: str | None = None, cluster: str | None = None,
          variants=None) -> int:
    """Run the benchmark (``python -m cnn bench mpi``): on ``ranks`` ranks of this machine
    (default 2), or with ``cluster`` (link profiles, comma-separated) across emulated hosts
    for each rank count of ``ranks`` (default 2, 4, 8): :func:`cluster_suite`."""
    import subprocess

    from ..parallel.launch import find_mpiexec
    if cluster:
        return cluster_suite(cluster, ranks or CLUSTER_RANKS, repeats, quick, presets,
                             batch_sizes, variants, json_path or CLUSTER_JSON)
    (count,) = ranks or (2,)
    cmd = [find_mpiexec(), "-n", str(count), sys.executable, "-m", "cnn.bench.mpi",
           *_rank_arguments(repeats, quick, presets, batch_sizes, variants)]
    if json_path:
        cmd += ["--json", json_path]
    code = subprocess.call(cmd)
    if code:
        raise RuntimeError(f"the MPI benchmark failed (exit status {code}): {' '.join(cmd)}")
    return code


def one_core_step(preset: str, images: int, batch_size: int, repeats: int) -> dict:
    """The sequential path's seconds per step on ``preset`` (one core, BLAS on one thread):
    median of ``repeats`` epochs after a warm-up, with the compute part (forward, backward,
    update) and the rest (data and loop)."""
    from ..model import build_model
    from ..presets import get_preset
    from .harness import synthetic_batch

    x, y = synthetic_batch(preset, images)
    steps = -(-images // batch_size)
    model = build_model(preset, seed=0)
    times, computes = [], []
    for r in range(repeats + 1):
        h = model.fit(x, y, epochs=1, batch_size=batch_size,
                      optimizer=get_preset(preset)["optimizer"], verbose=0).history
        if r:
            times.append(h["time"][0] / steps)
            computes.append(h["compute_time"][0] / steps)
    return {"step": statistics.median(times), "compute": statistics.median(computes),
            "parameters": int(sum(v.size for v in model.params.values())),
            "itemsize": int(np.dtype(model.dtype).itemsize), "images": images}


def cluster_suite(profiles: str, ranks, repeats: int = 5, quick: bool = False, presets=None,
                  batch_sizes=None, variants=None, json_path=None,
                  state_dir: str | None = None, allreduce: bool = True) -> dict:
    """For each link profile of ``profiles`` (comma-separated; ``1gbe,10gbe``): an emulated
    cluster of ``max(ranks)`` hosts, and on it :func:`main` at each rank count of ``ranks``
    (the allreduce table with the link's byte counts unless not ``allreduce``, and the
    training table when ``presets``), then the fit of every profile's allreduce times
    (:mod:`cnn.analysis.collectives`) and each preset's one-core step; printed, and written
    to ``json_path`` when given. Returns the record."""
    from ..analysis.collectives import fit_allreduce
    from ..cluster import EmulatedCluster
    from ..cluster.links import LinkProfile
    from ..machine import machine_info

    names = [LinkProfile.parse(text).name for text in profiles.split(",")] \
        if isinstance(profiles, str) else list(profiles)
    ranks = sorted({int(r) for r in ranks})
    presets = list(presets) if presets is not None else ["cifar_tutorial"]
    batch_sizes = list(batch_sizes or [32])
    record = {"machine": machine_info(), "ranks": ranks, "profiles": {}, "one_core": {}}
    for name in names:
        profile: dict = {"link": LinkProfile.parse(name).to_dict(), "runs": {}}
        record["profiles"][name] = profile
        with tempfile.TemporaryDirectory(prefix="cnn-bench-mpi-") as tmp, \
                EmulatedCluster(hosts=max(ranks), link=name,
                                state_dir=state_dir or Path(tmp) / "cluster") as cluster:
            print(f"\n=== cluster of {max(ranks)} hosts, every link "
                  f"{cluster.link.describe()} ===", flush=True)
            for p in ranks:
                out = Path(tmp) / f"ranks{p}.json"
                argv = [sys.executable, "-m", "cnn.bench.mpi", "--interface", CLUSTER_INTERFACE,
                        "--shared-clock", "--json", str(out),
                        *_rank_arguments(repeats, quick, presets, batch_sizes, variants),
                        *([] if allreduce else ["--no-allreduce"])]
                job = cluster.run_mpiexec(argv, ranks=p, env=_environment(),
                                          capture_output=False)
                if job.returncode != 0 or not out.is_file():
                    raise RuntimeError(f"the MPI benchmark failed on {p} ranks over {name} "
                                       f"(exit status {job.returncode})")
                profile["runs"][str(p)] = json.loads(out.read_text())
        if not allreduce:
            continue
        points = [(row["bytes"], int(p), row["seconds"]) for p, run in profile["runs"].items()
                  for row in run["allreduce"]]
        fit = fit_allreduce(*zip(*points))
        profile["fit"] = fit.to_dict()
        print(f"\n{name}: t(n, p) = alpha rounds + beta sent (MPICH's algorithm per point): "
              f"alpha = {fit.alpha * 1e6:.1f} us, beta = {fit.beta:.3e} s/byte "
              f"({8 / fit.beta / 1e9 if fit.beta else float('inf'):.2f} Gbit/s); relative "
              f"error worst {fit.worst_error:.0%}, median {fit.median_error:.0%} over "
              f"{fit.points} points", flush=True)
    for preset in presets if allreduce else ():  # the scaling model's one-core time
        for bs in batch_sizes:
            images = 64 if quick else TRAIN_IMAGES.get(preset, 512)
            record["one_core"][f"{preset}/{bs}"] = one_core_step(preset, images, bs,
                                                                 1 if quick else repeats)
    if json_path:
        Path(json_path).parent.mkdir(parents=True, exist_ok=True)
        atomic_write(json_path, json.dumps(record, indent=1, default=str))
        print(f"figures written to {json_path}")
    return record


if __name__ == "__main__":
    sys.exit(main())
