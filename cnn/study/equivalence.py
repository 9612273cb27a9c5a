"""Equivalence, shown step by step: the relative weight difference between every path that
implements the sequential algorithm and the sequential path, after each step, from the same
initial weights and the same batches, in float64 and float32.

``sync`` threads and processes, micro-batch accumulation, the Numba kernels and the CUDA
kernels all compute the sequential update (the registry says which: a path's
``sequential_algorithm`` with its strategies whose :class:`~cnn.paths.Algorithm` is
``sequential``); they differ only in the order of floating-point sums, so their weights must
track the sequential weights to rounding error that grows slowly with the steps (and faster in
float32). This is what the algebra predicts; final accuracy after thousands of momentum steps
is not.

``python -m cnn.study.equivalence OUT.csv`` (or :func:`weight_trajectories`) writes a tidy
table: ``dtype, path, label, step, rel_diff`` with ``rel_diff = ||w - w_seq|| / ||w_seq||``
over all parameters (computed in float64).
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


def sequential_variants() -> tuple[tuple[str, str, str, int], ...]:
    """The variants compared, ``(path, strategy, backend, threads)``: every strategy and backend
    of every path in the registry that computes the sequential algorithm, the baseline aside,
    with :data:`WORKERS` workers where the path scales. Those whose path cannot run here (no
    GPU, a module missing) are left out and listed in the table's ``skipped`` attribute."""
    return tuple((e.name, s, b, WORKERS if e.scales else 1)
                 for e in P.PATHS.values() if e.name != P.BASELINE and e.trainer == "fit"
                 for s in e.strategies if e.computes_sequential(s)
                 for b in e.backends)


class _Recorder:
    """Flattened float64 copies of the parameters after every step."""

    def __init__(self):
        from ..train import Callback

        class Hook(Callback):
            def on_step_end(hook, step, logs):
                import numpy as np
                params = logs["params"]()
                self.weights.append(np.concatenate([
                    np.asarray(_host(params[k]), dtype=np.float64).ravel()
                    for k in sorted(params)]))
        self.weights = []
        self.hook = Hook()


def _host(a):
    return a.copy_to_host() if hasattr(a, "copy_to_host") else a


def _train(entry: P.TrainingPath, strategy: str, backend: str, threads: int, model: str, data,
           steps: int, batch_size: int, seed: int, optimizer: dict, dtype) -> list:
    from ..model import Sequential, resolve_spec
    from ..train import fit
    net = Sequential.from_spec(resolve_spec(model), input_shape=data.input_shape, dtype=dtype,
                               seed=seed, backend=backend)
    rec = _Recorder()
    n = steps * batch_size
    fit(net, data.x_train[:n], data.y_train[:n], epochs=1, batch_size=batch_size,
        optimizer=optimizer, seed=seed, backend=backend, blas_threads=1, verbose=0,
        callbacks=[rec.hook], **entry.fit_arguments({"strategy": strategy, "threads": threads}))
    return rec.weights


def weight_trajectories(variants=None, dtypes=("float64", "float32"),
                        dataset: str = "mnist_embedded", model: str = "mnist_small",
                        steps: int = 60, batch_size: int = 32, seed: int = 0,
                        lr: float = 0.05, momentum: float = 0.9, data_root=None,
                        gpu: bool | None = None, cuda_simulator: bool = False):
    """The table described in the module doc (a pandas DataFrame) for ``variants``
    (``(path, strategy, backend, threads)``; None: :func:`sequential_variants`)."""
    import numpy as np
    import pandas as pd

    from ..data import load_dataset
    from .grid import unavailable
    rows, skipped = [], []
    variants = sequential_variants() if variants is None else variants
    optimizer = {"type": "sgd", "lr": lr, "momentum": momentum}
    for dt in dtypes:
        dtype = np.dtype(dt)
        data = load_dataset(dataset, root=data_root, limit=steps * batch_size, test_limit=1,
                            seed=0, dtype=dtype)
        base = P.get_path(P.BASELINE)
        seq = np.stack(_train(base, base.default_strategy, base.default_backend, 1, model, data,
                              steps, batch_size, seed, optimizer, dtype))
        norm = np.linalg.norm(seq, axis=1)
        for path, strategy, backend, threads in variants:
            entry = P.get_path(path)
            why = unavailable(entry, gpu, cuda_simulator)
            if why:
                skipped.append(f"{path} ({why})")
                continue
            t = time.perf_counter()
            w = np.stack(_train(entry, strategy, backend, threads, model, data, steps,
                                batch_size, seed, optimizer, dtype))
            diff = np.linalg.norm(w - seq, axis=1) / norm
            label = entry.label(strategy, backend, threads)
            rows += [{"dtype": dt, "path": path, "label": label, "step": i + 1,
                      "rel_diff": float(d), "seconds": time.perf_counter() - t}
                     for i, d in enumerate(diff)]
    table = pd.DataFrame(rows, columns=["dtype", "path", "label", "step", "rel_diff", "seconds"])
    table.attrs["skipped"] = sorted(set(skipped))
    table.attrs["setup"] = (f"{dataset}, {model}, batch {batch_size}, {steps} steps, SGD lr "
                            f"{lr} momentum {momentum}, seed {seed}")
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
    p = argparse.ArgumentParser(prog="python -m cnn.study.equivalence",
                                description=__doc__.splitlines()[0])
    p.add_argument("out", help="the CSV to write (e.g. results/equivalence.csv)")
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--data-dir", default=None)
    p.add_argument("--cuda-simulator", action="store_true",
                   help="include the CUDA path under the simulator (slow: tiny steps only)")
    a = p.parse_args(argv)
    table = weight_trajectories(steps=a.steps, data_root=a.data_dir,
                                cuda_simulator=a.cuda_simulator)
    print(f"{write(table, a.out)}: {table['label'].nunique()} variants x "
          f"{table['dtype'].nunique()} dtypes; skipped {table.attrs['skipped']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
