"""``python -m cnn bench ddp``: our 2-worker data-parallel paths beside PyTorch's
``DistributedDataParallel`` (the established peer: gradient buckets allreduced while backward
runs, gloo on the CPU), on one host and across two emulated hosts per link profile.

Every contender trains the preset's network from the same initial weights (ours, seed 0; the
PyTorch copy built from them by :func:`cnn.reference.torch.build_torch_model`) on the same
synthetic images in the same global batches (each worker its shard of a batch of
``batch_size``), with SGD and the preset's learning rate and momentum, one BLAS/intra-op
thread per worker:

- ``ours mpi``: :class:`~cnn.parallel.mpi.MPISync`, 2 ranks (blocking allreduce);
- ``ours mpi overlap``: the same with ``overlap=True`` (its default buckets and progress);
- ``ours processes``: :class:`~cnn.parallel.processes.SyncProcesses`, 2 workers (the fit's
  process and a worker process) over shared memory (one host only);
- all three on our fastest backend (``"auto"``: Numba where it is installed; its compilation
  in the warm-up epoch), what a user gets by default;
- ``pytorch ddp``: :func:`cnn.reference.torch.fit_torch` with ``distributed=True``: 2
  processes, ``torch.distributed`` with the gloo backend, ``init_method=tcp://`` to the first
  host's address (``bucket_cap_mb`` 25, DDP's default).

On one host the workers talk over the loopback (MPI over shared memory); with ``--cluster
PROFILE[,PROFILE...]`` (root) each profile gets an emulated cluster of two hosts
(:mod:`cnn.cluster`), rank ``r`` on host ``r``, and every byte between the workers crosses a
shaped link. Each contender is a job of its own (a warm-up epoch, then ``EPOCHS`` timed
ones); the contenders take turns, ``repeats`` rounds, and the table gives each one's median
images/s over every timed epoch with its spread, and the ratio of our best to DDP's.
``--json PATH`` writes the figures.

The workers run as ``python -m cnn.bench.ddp JOB`` (JOB: the job as JSON): under
``mpiexec`` for ``mpi``, one process per rank for ``ddp``, one process for ``processes``.
"""
from __future__ import annotations

import contextlib
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import NamedTuple

#: timed epochs per job, after one warm-up epoch
EPOCHS = 2
#: images per epoch, per preset (others: 512)
IMAGES = {"mnist_small": 2048, "cifar_tutorial": 2048, "cifar_resnet20": 1024}
class Contender(NamedTuple):
    """How a contender trains: ``kind`` (``mpi``, ``processes`` or ``ddp``), our strategy's
    ``options``, whether it runs on ``one_host`` only (shared memory), and our ``backend``."""
    kind: str
    options: dict
    one_host: bool = False
    backend: str = "auto"


CONTENDERS = {
    "ours mpi": Contender("mpi", {}),
    "ours mpi overlap": Contender("mpi", {"overlap": True}),
    "ours processes": Contender("processes", {}, one_host=True),
    "pytorch ddp": Contender("ddp", {}),
}
WORKERS = 2


# ---- one worker ----------------------------------------------------------------------------------
def run_job(job: dict) -> list[float] | None:
    """Train as one worker of ``job``; the timed epochs' images/s on the first worker (None on
    the others)."""
    from threadpoolctl import threadpool_limits

    from ..model import build_model
    from ..presets import get_preset
    from .harness import synthetic_batch

    threadpool_limits(1, "blas")
    x, y = synthetic_batch(job["preset"], job["images"])
    model = build_model(job["preset"], seed=0)
    optimizer = get_preset(job["preset"])["optimizer"]
    epochs = job["epochs"] + 1
    if job["kind"] == "ddp":
        import torch.distributed as dist

        from ..reference.torch import fit_torch
        dist.init_process_group("gloo", init_method=job["init_method"], rank=job["rank"],
                                world_size=job["workers"])
        try:
            history = fit_torch(model, x, y, epochs=epochs, batch_size=job["batch_size"],
                                optimizer=optimizer, threads=1, distributed=True).history
            dist.barrier()  # the first process hosts the rendezvous: it leaves last
        finally:
            dist.destroy_process_group()
        first = job["rank"] == 0
    else:
        strategy, threads = (("mpi", 1) if job["kind"] == "mpi" else
                             ("processes", job["workers"]))
        fitted = model.fit(x, y, epochs=epochs, batch_size=job["batch_size"],
                           optimizer=optimizer, strategy=strategy, threads=threads,
                           strategy_options=job["options"] or None, backend=job["backend"],
                           verbose=0)
        history = fitted.history
        from ..parallel.launch import launcher_rank
        first = launcher_rank() == 0
    return history["images_per_sec"][1:] if first else None


def main(argv=None) -> int:
    (text,) = sys.argv[1:] if argv is None else argv
    result = run_job(json.loads(text))
    if result is not None:
        print(json.dumps({"images_per_sec": result}), flush=True)
    return 0


# ---- the suite -----------------------------------------------------------------------------------
def _environment(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PMI_", "PMIX_", "OMPI_"))}
    return {**env, **extra}


def _result(outputs: list[str], what: str) -> list[float]:
    for out in outputs:
        for line in reversed(out.splitlines()):
            if line.startswith("{"):
                return json.loads(line)["images_per_sec"]
    raise RuntimeError(f"{what}: no result; output:\n" + "\n".join(o[-2000:] for o in outputs))


def _worker(job: dict) -> list[str]:
    return [sys.executable, "-m", "cnn.bench.ddp", json.dumps(job)]


def run_contender(name: str, job: dict, cluster=None, timeout: float = 900) -> list[float]:
    """The timed epochs' images/s of contender ``name`` on ``job``'s workers: on this host, or
    on the first hosts of ``cluster`` (an :class:`~cnn.cluster.EmulatedCluster`)."""
    kind, options, _, backend = CONTENDERS[name]
    job = {**job, "kind": kind, "options": options, "backend": backend}
    if kind == "mpi":
        from ..parallel.launch import find_mpiexec
        if cluster is None:
            res = subprocess.run([find_mpiexec(), "-n", str(job["workers"]), *_worker(job)],
                                 capture_output=True, text=True, timeout=timeout,
                                 env=_environment())
        else:
            res = cluster.run_mpiexec(_worker(job), ranks=job["workers"], timeout=timeout,
                                      env=_environment())
        if res.returncode:
            raise RuntimeError(f"{name} failed: {res.stdout[-2000:]}\n{res.stderr[-2000:]}")
        return _result([res.stdout], name)
    if kind == "processes":
        res = subprocess.run(_worker(job), capture_output=True, text=True, timeout=timeout,
                             env=_environment())
        if res.returncode:
            raise RuntimeError(f"{name} failed: {res.stderr[-2000:]}")
        return _result([res.stdout], name)
    # ddp: one process per worker, the first one's address the rendezvous
    port = random.randint(20000, 40000)
    address = "127.0.0.1" if cluster is None else cluster.hosts[0].address
    env = _environment(GLOO_SOCKET_IFNAME="lo" if cluster is None else "eth0",
                       OMP_NUM_THREADS="1")
    procs = []
    for rank in range(job["workers"]):
        argv = _worker({**job, "rank": rank, "init_method": f"tcp://{address}:{port}"})
        kwargs = {"stdout": subprocess.PIPE, "stderr": subprocess.PIPE, "text": True,
                  "env": env}
        procs.append(subprocess.Popen(argv, **kwargs) if cluster is None else
                     cluster.popen(rank, argv, **kwargs))
    outputs, failed = [], []
    for rank, proc in enumerate(procs):
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            for p in procs:
                p.kill()
            raise
        outputs.append(out)
        if proc.returncode:
            failed.append(f"rank {rank}: {err[-2000:]}")
    if failed:
        raise RuntimeError(f"{name} failed: " + "\n".join(failed))
    return _result(outputs, name)


def _hosts(profile: str | None, state_dir: Path):
    """A context with two emulated hosts linked by ``profile`` (None: this host alone)."""
    if profile is None:
        return contextlib.nullcontext()
    from ..cluster import EmulatedCluster
    return EmulatedCluster(hosts=WORKERS, link=profile, state_dir=state_dir)


def _profiles(cluster: str | None) -> list[str]:
    from ..cluster.links import LinkProfile
    return [] if not cluster else [LinkProfile.parse(t).name for t in cluster.split(",")]


def _summarise(rows: dict) -> dict:
    """Median images/s (with min and max) per contender, and our best over DDP's."""
    out = {}
    for name, samples in rows.items():
        out[name] = {"images_per_sec": statistics.median(samples), "min": min(samples),
                     "max": max(samples), "epochs": len(samples)}
    ours = [v["images_per_sec"] for k, v in out.items() if k.startswith("ours")]
    if "pytorch ddp" in out and ours:
        out["best_ours_over_ddp"] = max(ours) / out["pytorch ddp"]["images_per_sec"]
    return out


def suite(repeats: int = 3, quick: bool = False, presets=None, batch_sizes=None,
          cluster: str | None = None, json_path: str | None = None) -> dict:
    """Run the comparison (``python -m cnn bench ddp``): on one host, then on two emulated
    hosts per link profile of ``cluster``; print a table per setting and write ``json_path``.
    Returns ``{"machine": ..., setting: {"preset/batch": {contender: figures}}}``."""
    from ..files import atomic_write
    from .peers import torch_available

    if not torch_available():
        raise RuntimeError("the ddp suite needs PyTorch: pip install -r requirements-bench.txt")
    presets = presets or ["cifar_tutorial"]
    batch_sizes = batch_sizes or [32]
    rounds = 1 if quick else repeats
    from ..machine import machine_info
    settings = [("1 host", None)] + [(f"2 hosts, {p}", p) for p in _profiles(cluster)]
    record: dict = {"machine": machine_info()}
    for setting, profile in settings:
        with tempfile.TemporaryDirectory(prefix="cnn-bench-ddp-") as tmp, \
                _hosts(profile, Path(tmp) / "cluster") as cluster:
            record[setting] = _measure_setting(setting, cluster, presets, batch_sizes, rounds,
                                               quick)
    if json_path:
        atomic_write(json_path, json.dumps(record, indent=1, default=str))
        print(f"figures written to {json_path}")
    return record


def _measure_setting(setting: str, cluster, presets, batch_sizes, rounds: int,
                     quick: bool) -> dict:
    names = [n for n, c in CONTENDERS.items() if cluster is None or not c.one_host]
    print(f"\n{setting}" + (f": every link {cluster.link.describe()}" if cluster else
                            ": MPI over shared memory, gloo over the loopback")
          + f"; images/s, median of {rounds} x {EPOCHS} epochs (min..max)", flush=True)
    out = {}
    for preset in presets:
        for bs in batch_sizes:
            job = {"preset": preset, "batch_size": bs, "workers": WORKERS, "epochs": EPOCHS,
                   "images": 64 if quick else IMAGES.get(preset, 512)}
            rows: dict[str, list] = {n: [] for n in names}
            for _ in range(rounds):  # the contenders take turns
                for name in names:
                    rows[name] += run_contender(name, job, cluster)
            figures = _summarise(rows)
            out[f"{preset}/{bs}"] = figures
            ddp = figures.get("pytorch ddp", {}).get("images_per_sec")
            for name in names:
                f = figures[name]
                ratio = f"  x{f['images_per_sec'] / ddp:.2f} DDP's" if ddp else ""
                print(f"  {preset:<15} {bs:>4}  {name:<18} {f['images_per_sec']:8,.0f} "
                      f"({f['min']:,.0f}..{f['max']:,.0f}){ratio}", flush=True)
    return out


if __name__ == "__main__":
    sys.exit(main())
