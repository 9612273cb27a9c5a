"""The default benchmark (``python -m cnn bench``): our training paths against Keras and PyTorch
at one and two threads, side by side in one run.

For each preset and batch size, every contender runs in a worker process of its own
(:mod:`cnn.bench.worker`): ours on NumPy and Numba (sequential), ``numba_parallel`` (Numba's
thread pool), ``sync`` data-parallel threads on NumPy and Numba, ``sync`` over 2
processes (``processes``: the fit's and a worker process) and over 2 MPI ranks (``mpi``: the worker started by the venv's
``mpiexec``, rank 0 speaking for both; skipped, with a line saying so, where MPI is missing)
on Numba, the NumPy and Numba sequential paths again with
``MALLOC_MMAP_THRESHOLD_``/``MALLOC_TRIM_THRESHOLD_`` set (a path that allocates nothing per
step runs the same with and without them), Keras at 1 and 2 threads and PyTorch at 1 and 2
threads (skipped, with a line saying so, when it is not installed: ``pip install -r
requirements-bench.txt``). All workers start together and train one warm-up epoch;
then the parent interleaves their timed epochs (A, B, C, ..., A, B, C, ...), one at a time, so
drift in a shared machine's speed hits all alike, and reports per contender the median
images/s with its range, GFLOP/s from the network's FLOP count (printed), the fraction of the
measured single-core SGEMM peak times the threads used, and the ratios to Keras and PyTorch at
the same thread count. A summary puts the headline ratios side by side (the best path of ours
at 1 and 2 threads against Keras and PyTorch, sync against the best one-thread path, the
``MALLOC_*`` check, batch 128 against batch 32). ``--json PATH`` writes every figure (and the
machine) for the study to read.
"""
from __future__ import annotations

import importlib.util
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field

from ..files import atomic_write
from ..machine import describe, machine_info
from ..model import build_model
from .harness import QUICK_IMAGES, epoch_images
from .hardware import layer_flops, sgemm_peak, training_flops_per_image

#: images per timed epoch: long enough to dwarf per-epoch overhead and a shared machine's
#: hiccups (the suite prints its wall time at the end); others: :func:`.harness.epoch_images`
IMAGES = {"mnist_small": 32768, "cifar_tutorial": 4096, "cifar_resnet20": 1024}
MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "1000000000", "MALLOC_TRIM_THRESHOLD_": "1000000000"}


@dataclass
class Spec:
    """A contender: what the worker runs (``job``), with how many threads, in which env."""

    name: str
    job: dict
    threads: int
    env: dict = field(default_factory=dict)
    family: str = "ours"  # ours | keras | torch

    @property
    def malloc(self) -> bool:
        return bool(self.env)


def contenders(quick: bool = False) -> list[Spec]:
    ours = lambda be, strategy="sequential", threads=1: {  # noqa: E731
        "kind": "ours", "backend": be, "strategy": strategy, "threads": threads}
    specs = [
        Spec("ours numpy", ours("numpy"), 1),
        Spec("ours numba", ours("numba"), 1),
        Spec("ours numpy +MALLOC_*", ours("numpy"), 1, MALLOC_ENV),
        Spec("ours numba +MALLOC_*", ours("numba"), 1, MALLOC_ENV),
        Spec("ours numba_parallel", ours("numba_parallel"), 2),
        Spec("ours sync numpy", ours("numpy", "sync", 2), 2),
        Spec("ours sync numba", ours("numba", "sync", 2), 2),
        Spec("ours processes numba", ours("numba", "processes", 2), 2),
        Spec("ours mpi numba", {**ours("numba", "mpi"), "ranks": 2}, 2),
        Spec("keras", {"kind": "keras", "threads": 1}, 1, family="keras"),
        Spec("keras", {"kind": "keras", "threads": 2}, 2, family="keras"),
        Spec("pytorch", {"kind": "torch", "threads": 1}, 1, family="torch"),
        Spec("pytorch", {"kind": "torch", "threads": 2}, 2, family="torch"),
    ]
    if quick:
        keep = {("ours numpy", 1), ("ours numba", 1), ("ours numpy +MALLOC_*", 1),
                ("ours sync numba", 2), ("keras", 1), ("pytorch", 1)}
        specs = [s for s in specs if (s.name, s.threads) in keep]
    return specs


def torch_available() -> bool:
    return importlib.util.find_spec("torch") is not None


def mpi_available() -> str:
    """Why the MPI contender cannot run here ("" when it can)."""
    if importlib.util.find_spec("mpi4py") is None:
        return "mpi4py is not installed"
    try:
        from ..parallel.launch import find_mpiexec
        find_mpiexec()
    except FileNotFoundError as err:
        return str(err).split(".")[0]
    return ""


class _Worker:
    """A running contender process and its protocol pipe (a contender of several MPI ranks:
    ``mpiexec`` started here, rank 0 speaking for them)."""

    def __init__(self, spec: Spec, job: dict):
        self.spec = spec
        env = {k: v for k, v in os.environ.items() if k not in MALLOC_ENV
               and not k.startswith(("PMI_", "PMIX_", "OMPI_"))}  # not a rank of an outer job
        env.update(spec.env)
        env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
        self.err = tempfile.TemporaryFile(mode="w+")
        cmd = [sys.executable, "-m", "cnn.bench.worker", json.dumps(job)]
        ranks = spec.job.get("ranks")
        if ranks:
            from ..parallel.launch import find_mpiexec
            cmd = [find_mpiexec(), "-n", str(ranks), *cmd]
        self.started = time.time()
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=self.err, text=True, env=env)
        self.failed: str | None = None

    def read(self) -> dict | None:
        line = self.proc.stdout.readline()
        if not line:
            self._fail("the worker exited")
            return None
        event = json.loads(line)
        if event.get("event") == "error":
            self._fail(event.get("message", "error"))
            return None
        return event

    def go(self) -> dict | None:
        try:
            self.proc.stdin.write("go\n")
            self.proc.stdin.flush()
        except (BrokenPipeError, OSError):
            self._fail("the worker's stdin closed")
            return None
        return self.read()

    def _fail(self, why: str) -> None:
        self.err.seek(0)
        tail = self.err.read()[-800:].strip().splitlines()[-3:]
        self.failed = f"{why}: {' | '.join(tail)}"

    def close(self) -> None:
        try:
            self.proc.stdin.close()
        except OSError:
            pass
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.err.close()
        if self.spec.job.get("ranks"):
            # a rank that failed while MPI started, or an mpiexec killed above, never reaches
            # release_segments: its host's segment would stay in /dev/shm
            from ..parallel.launch import remove_orphan_segments
            remove_orphan_segments(since=self.started)


def measure(preset: str, batch_size: int, specs: list[Spec], images: int,
            repeats: int) -> list[dict]:
    """Run every contender on ``preset`` at ``batch_size``: start them all, wait for their
    warm-up epochs, then interleave ``repeats`` timed epochs. One row per contender."""
    workers = []
    for s in specs:
        job = {"contender": s.job, "preset": preset, "batch_size": batch_size,
               "images": images, "epochs": repeats + 1}
        workers.append(_Worker(s, job))
    rows = []
    try:
        for w in workers:  # the warm-up epochs (run concurrently; not timed)
            w.read()
        times: list[list[float]] = [[] for _ in workers]
        data_times: list[list[float]] = [[] for _ in workers]
        for _ in range(repeats):
            for i, w in enumerate(workers):
                if w.failed:
                    continue
                ev = w.go()
                if ev is not None:
                    times[i].append(ev["time"])
                    if "data_time" in ev:
                        data_times[i].append(ev["data_time"])
        for w, ts, ds in zip(workers, times, data_times):
            row = {"preset": preset, "batch_size": batch_size,
                   "backend": w.spec.job.get("backend"), "strategy": w.spec.job.get("strategy"),
                   "name": w.spec.name, "family": w.spec.family, "threads": w.spec.threads,
                   "malloc_env": w.spec.malloc, "images": images, "repeats": len(ts),
                   "error": w.failed}
            if ts and not w.failed:
                rates = [images / t for t in ts]
                row.update(images_per_sec=statistics.median(rates), min=min(rates),
                           max=max(rates), epoch_times=ts,
                           data_time=statistics.median(ds) if ds else None)
            rows.append(row)
    finally:
        for w in workers:
            w.close()
    return rows


def _label(r: dict) -> str:
    return f"{r['name']} {r['threads']}t"


def annotate(rows: list[dict], flops: int, peak: float) -> None:
    """Add GFLOP/s, fraction of peak (x threads) and the ratios to Keras/PyTorch at the same
    thread count to each row of one (preset, batch) group."""
    ref = {(r["family"], r["threads"]): r.get("images_per_sec") for r in rows
           if r["family"] in ("keras", "torch")}
    for r in rows:
        ips = r.get("images_per_sec")
        if ips is None:
            continue
        r["gflops"] = ips * flops / 1e9
        r["fraction_of_peak"] = r["gflops"] / (peak * r["threads"])
        for fam in ("keras", "torch"):
            other = ref.get((fam, r["threads"]))
            r[f"ratio_{fam}"] = ips / other if other else None


def print_group(preset: str, bs: int, rows: list[dict], flops: int, images: int) -> None:
    print(f"\n{preset}, batch {bs}: {flops / 1e6:.2f} MFLOP per training image, {images} images "
          f"per epoch, median of {max(r['repeats'] for r in rows)} interleaved epochs "
          f"(ratio = / same-thread keras, pytorch)")
    print(f"  {'contender':<28}{'thr':>4}{'img/s':>10}{'(min-max)':>18}{'GFLOP/s':>9}"
          f"{'%peak':>7}{'/keras':>8}{'/torch':>8}")
    for r in rows:
        if r.get("images_per_sec") is None:
            print(f"  {r['name']:<28}{r['threads']:>4}  skipped: {r['error']}")
            continue
        fmt = lambda v: f"{v:8.2f}" if v else f"{'-':>8}"  # noqa: E731
        rng = f"({r['min']:,.0f}-{r['max']:,.0f})"
        print(f"  {r['name']:<28}{r['threads']:>4}{r['images_per_sec']:>10,.0f}{rng:>18}"
              f"{r['gflops']:>9.1f}{100 * r['fraction_of_peak']:>6.0f}%"
              f"{fmt(r.get('ratio_keras'))}{fmt(r.get('ratio_torch'))}")
    # the lines the smoke test and a quick reader look for
    best1 = _best(rows, 1)
    keras1 = _ref(rows, "keras", 1)
    if best1 and keras1:
        print(f"  best 1-thread path of ours ({best1['name']}) / keras 1 thread: "
              f"ratio {best1['images_per_sec'] / keras1:.2f}")


def _best(rows, threads):
    mine = [r for r in rows if r["family"] == "ours" and r["threads"] == threads
            and not r["malloc_env"] and r.get("images_per_sec")]
    return max(mine, key=lambda r: r["images_per_sec"]) if mine else None


def _ref(rows, family, threads):
    return next((r["images_per_sec"] for r in rows if r["family"] == family
                 and r["threads"] == threads and r.get("images_per_sec")), None)


def _ips(rows, name, threads=1):
    return next((r["images_per_sec"] for r in rows if r["name"] == name
                 and r["threads"] == threads and r.get("images_per_sec")), None)


def summary(groups: dict) -> list[str]:
    """The issue's targets, checked on this run's medians. ``groups``: (preset, bs) -> rows."""
    lines = []
    fmt = lambda v: f"{v:.2f}" if v else "-"  # noqa: E731
    lines.append(f"  {'preset':<15}{'batch':>6}  {'best 1t (ours)':<16}{'/keras1':>8}{'/torch1':>8}"
                 f"  {'best 2t (ours)':<22}{'/keras2':>8}{'/torch2':>8}{'sync/best1':>11}"
                 f"{'proc/best1':>11}{'mpi/best1':>10}{'malloc np':>10}{'malloc nb':>10}")
    for (preset, bs), rows in groups.items():
        b1, b2 = _best(rows, 1), _best(rows, 2)
        k1, t1, k2, t2 = (_ref(rows, "keras", 1), _ref(rows, "torch", 1),
                          _ref(rows, "keras", 2), _ref(rows, "torch", 2))
        r = lambda a, b: (a / b) if a and b else None  # noqa: E731
        sync = max(filter(None, [_ips(rows, "ours sync numba", 2), _ips(rows, "ours sync numpy", 2)]),
                   default=None)
        m_np = r(_ips(rows, "ours numpy +MALLOC_*"), _ips(rows, "ours numpy"))
        m_nb = r(_ips(rows, "ours numba +MALLOC_*"), _ips(rows, "ours numba"))
        lines.append(
            f"  {preset:<15}{bs:>6}  {(b1['name'][5:] if b1 else '-'):<16}"
            f"{fmt(r(b1 and b1['images_per_sec'], k1)):>8}{fmt(r(b1 and b1['images_per_sec'], t1)):>8}"
            f"  {(b2['name'][5:] if b2 else '-'):<22}{fmt(r(b2 and b2['images_per_sec'], k2)):>8}"
            f"{fmt(r(b2 and b2['images_per_sec'], t2)):>8}"
            f"{fmt(r(sync, b1 and b1['images_per_sec'])):>11}"
            f"{fmt(r(_ips(rows, 'ours processes numba', 2), b1 and b1['images_per_sec'])):>11}"
            f"{fmt(r(_ips(rows, 'ours mpi numba', 2), b1 and b1['images_per_sec'])):>10}"
            f"{fmt(m_np):>10}{fmt(m_nb):>10}")
    # batch scaling of the sequential paths
    for preset in sorted({p for p, _ in groups}):
        for name in ("ours numpy", "ours numba"):
            a = _ips(groups.get((preset, 32), []), name)
            b = _ips(groups.get((preset, 128), []), name)
            if a and b:
                lines.append(f"  {preset} {name[5:]} sequential: img/s at batch 128 / batch 32 = "
                             f"{b / a:.2f} (target >= 0.95)")
    return lines


#: the paired ratios of :func:`paired_ratios`: (label, numerator, denominator), each a
#: ``(name, threads)`` of a row or ``"best1"`` (the best one-thread path of ours)
PAIRED = (("/keras1", "best1", ("keras", 1)), ("/torch1", "best1", ("pytorch", 1)),
          ("sync/best1", ("ours sync numba", 2), "best1"),
          ("proc/best1", ("ours processes numba", 2), "best1"),
          ("mpi/best1", ("ours mpi numba", 2), "best1"))


def paired_ratios(rows: list[dict]) -> dict:
    """The summary's ratios taken round by round: each round of :func:`measure` runs every
    contender once, back to back, so a drift in the machine's speed between rounds (a shared
    machine's swings) hits both sides of a round's ratio alike. Per ratio of :data:`PAIRED`:
    ``{"median", "min", "max", "rounds"}`` of the rounds' ratios (rates from each row's
    ``epoch_times``); None where a side is missing or did not run every round."""
    best = _best(rows, 1)

    def rates(side):
        row = best if side == "best1" else next(
            (r for r in rows if (r["name"], r["threads"]) == side and r.get("epoch_times")),
            None)
        return None if row is None else [row["images"] / t for t in row["epoch_times"]]

    out = {}
    for label, top, bottom in PAIRED:
        a, b = rates(top), rates(bottom)
        if not a or not b or len(a) != len(b):
            out[label] = None
            continue
        ratios = [x / y for x, y in zip(a, b)]
        out[label] = {"median": statistics.median(ratios), "min": min(ratios),
                      "max": max(ratios), "rounds": len(ratios)}
    return out


def paired_lines(groups: dict) -> list[str]:
    """One line per preset and batch size: each paired ratio as ``median [min, max]``."""
    lines = []
    for (preset, bs), rows in groups.items():
        cells = []
        for label, r in paired_ratios(rows).items():
            if r is not None:
                cells.append(f"{label} {r['median']:.2f} [{r['min']:.2f}, {r['max']:.2f}]")
        lines.append(f"  {preset:<15}{bs:>6}  " + "   ".join(cells))
    return lines


def suite(repeats: int = 5, quick: bool = False, presets=None, batch_sizes=None,
          json_path: str | None = None) -> dict:
    """Every contender of :func:`contenders` per preset and batch size (see the module's
    description); prints the tables and the summary and returns every figure, also written
    to ``json_path`` when given. ``quick``: six contenders on a few images per epoch."""
    presets = presets or ("cifar_tutorial", "mnist_small")
    batch_sizes = batch_sizes or (32, 128)
    specs = contenders(quick)
    if not torch_available():
        print("pytorch: not installed, its contenders are skipped (pip install -r "
              "requirements-bench.txt, or the package's [bench] extra, for torch==2.13.0 CPU)")
        specs = [s for s in specs if s.family != "torch"]
    if importlib.util.find_spec("tensorflow") is None:
        print("keras: TensorFlow is not installed, its contenders are skipped")
        specs = [s for s in specs if s.family != "keras"]
    why = mpi_available()
    if why and any(s.job.get("ranks") for s in specs):
        print(f"mpi: {why}, its contender is skipped (pip install -r requirements.txt)")
        specs = [s for s in specs if not s.job.get("ranks")]
    images = QUICK_IMAGES if quick else IMAGES
    if quick:
        print("--quick: a smoke run (a few images per epoch, one repeat, six contenders); its "
              "figures are dominated by per-epoch overhead and mean nothing about speed")
    info = machine_info()
    peak1 = sgemm_peak(1, sizes=(512,) if quick else (1024, 1536), repeats=3 if quick else 5)
    print(f"cpu: {info['cpu']}, {info['cores']} cores; caches: {info['cpu_caches']}")
    print(f"blas: {info['blas']}; measured single-core SGEMM peak (float32, threadpoolctl "
          f"1 thread): {peak1['peak']:.1f} GFLOP/s "
          f"({', '.join(f'n={n}: {v:.1f}' for n, v in peak1['by_size'].items())})")
    print(f"software: {describe()}")
    try:
        load = os.getloadavg()
        print(f"load average before the run: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f} "
              f"(a busy machine widens the min-max ranges; ratios are side by side)")
    except OSError:
        pass
    print("GFLOP/s count multiply-adds x 2 of conv/dense: forward + weight gradient + input "
          "gradient (none for the first layer), those of the direct conv whatever algorithm "
          "runs (Winograd's are fewer); %peak = GFLOP/s / (threads x 1-core peak)")
    from .conv_algorithms import algorithm_summary  # imports Numba: only when the bench runs
    groups, all_rows, flops_of, images_of = {}, [], {}, {}
    t_start = time.perf_counter()
    for preset in presets:
        model = build_model(preset, seed=0)
        flops = flops_of[preset] = training_flops_per_image(model)
        per_layer = ", ".join(f"{r['layer']} {r['forward'] / 1e6:.2f}" for r in layer_flops(model))
        print(f"\n{preset}: forward MFLOP per image by layer: {per_layer}; training "
              f"{flops / 1e6:.2f} MFLOP per image")
        print(f"  numba conv algorithm: {algorithm_summary(model)}")
        n = images_of[preset] = epoch_images(images, preset)
        for bs in batch_sizes:
            rows = measure(preset, bs, specs, n, repeats)
            annotate(rows, flops, peak1["peak"])
            print_group(preset, bs, rows, flops, n)
            groups[(preset, bs)] = rows
            all_rows += rows
    print("\nsummary: ratio ours/keras and ours/pytorch of medians (/keras1 = best 1-thread "
          "path of ours / Keras 1 thread, likewise for torch and 2 threads; sync/best1 = best "
          "sync at 2 threads / best 1-thread path, proc/best1 and mpi/best1 likewise for 2 "
          "worker processes and 2 MPI ranks on Numba; malloc = with MALLOC_* / without, same "
          "path):")
    for line in summary(groups):
        print(line)
    print("\npaired: the same ratios round by round (each round runs every contender once, back "
          "to back): median [min, max] over the rounds")
    for line in paired_lines(groups):
        print(line)
    print(f"\nbenchmark wall time {time.perf_counter() - t_start:.0f} s")
    result = {"machine": dict(info),
              "sgemm_peak_1thread_gflops": peak1["peak"], "sgemm_by_size": peak1["by_size"],
              "flops_per_image": flops_of, "repeats": repeats, "images": images_of,
              "rows": all_rows,
              "paired": {f"{p} {bs}": paired_ratios(rows) for (p, bs), rows in groups.items()}}
    if json_path:
        atomic_write(json_path, json.dumps(result, indent=1, default=str))
        print(f"results written to {json_path}")
    return result
