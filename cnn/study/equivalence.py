"""Equivalence, shown step by step: the relative weight difference between every path that
implements the sequential algorithm and the sequential path, after each step, from the same
initial weights and the same batches, in float64 and float32.

``sync`` threads, processes and MPI ranks, micro-batch accumulation, the Numba kernels and
the CUDA kernels all compute the sequential update (the registry says which: a path's
``sequential_algorithm`` with its strategies whose :class:`~cnn.paths.Algorithm` is
``sequential``); they differ only in the order of floating-point sums, so their weights must
track the sequential weights to rounding error that grows slowly with the steps (and faster in
float32). This is what the algebra predicts; final accuracy after thousands of momentum steps
is not.

``python -m cnn.study.equivalence OUT.csv`` (or :func:`weight_trajectories`) writes a tidy
table: ``problem, dtype, path, label, step, rel_diff`` with ``rel_diff = ||w - w_seq|| /
||w_seq||`` over all parameters (computed in float64), on MNIST and both CIFAR-10 networks
(:data:`PROBLEMS`; ``--problem`` picks others). The MPI variants run as MPI jobs
(``mpiexec``), rank 0 recording the weights.

Beside them a control, :data:`CONTROL_LABEL`: the sequential path against itself with every
initial weight moved by one unit in the last place of the dtype. It is how fast this
trajectory amplifies a rounding-sized difference: a variant that departs no faster than the
control differs from the sequential path by rounding, however large the difference grows; one
that departs faster computes something else.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from .. import paths as P
from ..files import atomic_write, read_structured

#: the workers of a variant whose path scales (one worker is the sequential path's own case)
WORKERS = 2
#: the control's label: the sequential path from initial weights one ulp away
CONTROL_LABEL = "sequential, weights +1 ulp"


def sequential_variants(batch_statistics: bool = False) -> tuple[tuple[str, str, str, int], ...]:
    """The variants compared, ``(path, strategy, backend, threads)``: every strategy and backend
    of every path in the registry that computes the sequential algorithm (on a network with
    batch normalisation where ``batch_statistics``), the baseline aside, with :data:`WORKERS`
    workers where the path scales. Those whose path cannot run here (no GPU, a module missing)
    are left out and listed in the table's ``skipped`` attribute."""
    return tuple((e.name, s, b, WORKERS if e.scales else 1)
                 for e in P.PATHS.values() if e.name != P.BASELINE and e.trainer == "fit"
                 for s in e.strategies if e.computes_sequential(s, batch_statistics)
                 for b in e.backends)


def one_ulp_away(params: dict) -> dict:
    """The control's initial weights: each non-zero array element moved one unit in the last
    place up, zeros kept. (The float after 0 is a denormal: it would open every ReLU whose
    input was exactly 0, as on MNIST's blank border at zero biases, a change of the function,
    not of its rounding.)"""
    import numpy as np
    return {k: np.where(w == 0, w, np.nextafter(w, np.inf)) for k, w in params.items()}


def _train(entry: P.TrainingPath, strategy: str, backend: str, threads: int, model: str,
           dataset: str, data, data_root, steps: int, batch_size: int, seed: int,
           optimizer: dict, dtype, ulp: bool = False):
    """The weights after every step ``(steps, n_params)`` of ``steps`` steps of one variant
    from ``model``'s initial weights (``seed``; ``ulp``: each non-zero one moved one unit in
    the last place up) on the first ``steps * batch_size`` examples of ``data``; a path launched by
    ``mpiexec`` runs as an MPI job of ``threads`` ranks, each loading the same examples, rank
    0 recording (``python -m cnn.study.equivalence --trajectory JOB OUT``)."""
    import json
    import subprocess
    import tempfile

    import numpy as np
    job = {"path": entry.name, "strategy": strategy, "backend": backend, "threads": threads,
           "model": model, "dataset": dataset, "data_root": data_root, "steps": steps,
           "batch_size": batch_size, "seed": seed, "optimizer": optimizer,
           "dtype": np.dtype(dtype).name, "ulp": bool(ulp)}
    if entry.launch != "mpiexec":
        return _trajectory(job, data)
    with tempfile.TemporaryDirectory(prefix="cnn-equivalence-") as tmp:
        job_path, out = Path(tmp) / "job.json", Path(tmp) / "steps.npy"
        job_path.write_text(json.dumps(job))
        cmd = entry.command(job, [sys.executable, "-m", "cnn.study.equivalence",
                                  "--trajectory", str(job_path), str(out)])
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
        if res.returncode != 0 or not out.is_file():
            raise RuntimeError(f"{' '.join(cmd)} failed with exit status {res.returncode}:\n"
                               f"{res.stdout[-3000:]}\n{res.stderr[-3000:]}")
        return np.load(out)


def _trajectory(job: dict, data=None):
    """The weights after every step of ``job`` (see :func:`_train`), trained in this process
    (one rank of an MPI job when a launcher started it); ``data`` None: loaded here."""
    import numpy as np

    from ..callbacks import WeightRecorder
    from ..data import load_dataset
    from ..model import Sequential, resolve_spec
    from ..train import fit
    dtype = np.dtype(job["dtype"])
    n = job["steps"] * job["batch_size"]
    if data is None:
        data = load_dataset(job["dataset"], root=job["data_root"], limit=n, test_limit=1,
                            seed=0, dtype=dtype)
    entry = P.get_path(job["path"])
    net = Sequential.from_spec(resolve_spec(job["model"]), input_shape=data.input_shape,
                               dtype=dtype, seed=job["seed"], backend=job["backend"])
    if job.get("ulp"):
        net.set_weights(one_ulp_away(net.params))
    recorder = WeightRecorder()
    fit(net, data.x_train[:n], data.y_train[:n], epochs=1, batch_size=job["batch_size"],
        optimizer=job["optimizer"], seed=job["seed"], backend=job["backend"], blas_threads=1,
        verbose=0, callbacks=[recorder],
        **entry.fit_arguments({"strategy": job["strategy"], "threads": job["threads"]}))
    return np.stack(recorder.weights)


def _trajectory_main(job_path: str, out: str) -> int:
    """``--trajectory JOB OUT``: one rank of :func:`_train`'s MPI job; rank 0 writes OUT."""
    import numpy as np

    from ..parallel.launch import launcher_rank
    weights = _trajectory(read_structured(job_path, "equivalence job"))
    if launcher_rank() == 0:
        np.save(out, weights)
    return 0


#: the third edition's problems ``(dataset, model)``: MNIST and both CIFAR-10 networks
PROBLEMS = (("mnist", "mnist_small"), ("cifar10", "cifar_tutorial"),
            ("cifar10", "cifar_resnet20"))
COLUMNS = ["problem", "dtype", "path", "label", "step", "rel_diff", "seconds"]


def weight_trajectories(variants=None, dtypes=("float64", "float32"),
                        dataset: str = "mnist_embedded", model: str = "mnist_small",
                        steps: int = 60, batch_size: int = 32, seed: int = 0,
                        lr: float = 0.05, momentum: float = 0.9, data_root=None,
                        gpu: bool | None = None, cuda_simulator: bool = False,
                        problems=None):
    """The table described in the module doc (a pandas DataFrame) for ``variants``
    (``(path, strategy, backend, threads)``; None: :func:`sequential_variants` of each
    problem's network) on each of
    ``problems`` (``(dataset, model)`` pairs; None: ``dataset`` and ``model``), its
    ``problem`` column ``dataset/model``. A variant launched by ``mpiexec`` runs as an MPI
    job of its ``threads`` ranks."""
    import numpy as np
    import pandas as pd

    from ..data import load_dataset
    from ..model import has_batch_statistics
    from .grid import unavailable
    rows, skipped = [], []
    problems = [(dataset, model)] if problems is None else list(problems)
    optimizer = {"type": "sgd", "lr": lr, "momentum": momentum}
    base = P.get_path(P.BASELINE)
    for ds, net in problems:
        compared = (sequential_variants(has_batch_statistics(net)) if variants is None
                    else variants)
        for dt in dtypes:
            dtype = np.dtype(dt)
            data = load_dataset(ds, root=data_root, limit=steps * batch_size, test_limit=1,
                                seed=0, dtype=dtype)
            seq = _train(base, base.default_strategy, base.default_backend, 1, net, ds, data,
                         data_root, steps, batch_size, seed, optimizer, dtype)
            norm = np.linalg.norm(seq, axis=1)
            t = time.perf_counter()
            control = _train(base, base.default_strategy, base.default_backend, 1, net, ds,
                             data, data_root, steps, batch_size, seed, optimizer, dtype,
                             ulp=True)
            rows += [{"problem": f"{ds}/{net}", "dtype": dt, "path": P.BASELINE,
                      "label": CONTROL_LABEL, "step": i + 1, "rel_diff": float(d),
                      "seconds": time.perf_counter() - t}
                     for i, d in enumerate(np.linalg.norm(control - seq, axis=1) / norm)]
            for path, strategy, backend, threads in compared:
                entry = P.get_path(path)
                why = unavailable(entry, gpu, cuda_simulator)
                if why:
                    skipped.append(f"{path} ({why})")
                    continue
                t = time.perf_counter()
                w = _train(entry, strategy, backend, threads, net, ds, data, data_root, steps,
                           batch_size, seed, optimizer, dtype)
                diff = np.linalg.norm(w - seq, axis=1) / norm
                label = entry.label(strategy, backend, threads)
                rows += [{"problem": f"{ds}/{net}", "dtype": dt, "path": path, "label": label,
                          "step": i + 1, "rel_diff": float(d),
                          "seconds": time.perf_counter() - t}
                         for i, d in enumerate(diff)]
    table = pd.DataFrame(rows, columns=COLUMNS)
    table.attrs["skipped"] = sorted(set(skipped))
    table.attrs["setup"] = (f"{', '.join(f'{d}/{m}' for d, m in problems)}, batch "
                            f"{batch_size}, {steps} steps, SGD lr {lr} momentum {momentum}, "
                            f"seed {seed}")
    return table


def write(table, out) -> Path:
    """Write the table as CSV (with its setup and skipped paths in a ``.json`` beside it)."""
    import json
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(out, table.to_csv(index=False))
    atomic_write(out.with_suffix(".json"),
                 json.dumps({"setup": table.attrs.get("setup", ""),
                             "skipped": table.attrs.get("skipped", [])}, indent=1))
    return out


def read(path):
    """The table written by :func:`write`, or None when there is none."""
    import pandas as pd
    path = Path(path)
    if not path.is_file():
        return None
    table = pd.read_csv(path)
    meta = path.with_suffix(".json")
    if meta.is_file():
        table.attrs.update(read_structured(meta))
    return table


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["--trajectory"]:  # a rank of an MPI variant's job (see _train)
        return _trajectory_main(*argv[1:3])
    p = argparse.ArgumentParser(prog="python -m cnn.study.equivalence",
                                description=__doc__.splitlines()[0])
    p.add_argument("out", help="the CSV to write (e.g. results/equivalence.csv)")
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--problem", action="append", default=None, metavar="DATASET/MODEL",
                   help="a problem to compare on, repeatable (default: the third edition's: "
                        + ", ".join(f"{d}/{m}" for d, m in PROBLEMS) + ")")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--cuda-simulator", action="store_true",
                   help="include the CUDA path under the simulator (slow: tiny steps only)")
    a = p.parse_args(argv)
    problems = PROBLEMS
    if a.problem:
        problems = [tuple(text.split("/", 1)) for text in a.problem]
        bad = [text for text, pr in zip(a.problem, problems) if len(pr) != 2]
        if bad:
            p.error(f"--problem takes DATASET/MODEL (mnist/mnist_small); received {bad[0]!r}")
    table = weight_trajectories(steps=a.steps, data_root=a.data_dir,
                                cuda_simulator=a.cuda_simulator, problems=problems)
    print(f"{write(table, a.out)}: {table['label'].nunique()} variants x "
          f"{table['dtype'].nunique()} dtypes; skipped {table.attrs['skipped']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
