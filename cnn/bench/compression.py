"""``python -m cnn bench compression``: what 16-bit gradients on the wire (the ``mpi``
strategy's ``compression``, :mod:`cnn.parallel.compression`) cost in accuracy and gain in
bytes and speed.

1. **Accuracy**: the final test accuracy of 2 MPI ranks (the venv's ``mpiexec``, one host:
   compression changes the numbers, not where the ranks run) trained exactly and with each
   wire format, from the same seeds, on MNIST (``mnist_small``) and CIFAR-10
   (``cifar_tutorial``): ``repeats`` seeds (default 5), each seed the model's initial weights
   and the data order; the table gives each format's mean and its spread over the seeds,
   and the mean of the per-seed differences to the exact run (with their range). The data
   comes from ``$CNN_DATA_DIR`` (``--data-dir`` of ``train``); the training-set size, epochs
   and batch are :data:`ACCURACY_RUNS` (``--quick``: a few hundred examples, one epoch).
2. **Bytes and speed** (with ``--cluster PROFILE``, root): the training table of
   ``python -m cnn bench mpi`` on 2 emulated hosts for the variants ``blocking``,
   ``compression=fp16``, ``compression=bf16`` and their overlapped forms: images/s, the
   exposed communication and the bytes each host's link sent per step.

``--json PATH`` writes both.
"""
from __future__ import annotations

import json
import statistics

#: dataset -> (preset, training examples, test examples, epochs, batch size)
ACCURACY_RUNS = {"mnist": ("mnist_small", 20000, 10000, 2, 32),
                 "cifar10": ("cifar_tutorial", 20000, 10000, 3, 32)}
#: the wire formats measured, None the exact sum
FORMATS = (None, "fp16", "bf16")
#: the training variants of the bytes-and-speed table
VARIANTS = ("blocking", "compression=fp16", "compression=bf16", "overlap",
            "overlap,compression=fp16")


def final_accuracy(dataset: str, compression: str | None, seed: int, quick: bool) -> float:
    """The test accuracy after training ``dataset``'s preset on 2 MPI ranks from ``seed``."""
    from ..parallel.launch import fit_under_mpiexec
    from ..presets import get_preset

    preset, train, test, epochs, batch = ACCURACY_RUNS[dataset]
    if quick:
        train, test, epochs = 512, 256, 1
    options = {} if compression is None else {"compression": compression}
    out = fit_under_mpiexec(2, model=preset, dataset=dataset, limit=train, test_limit=test,
                            model_seed=seed, seed=seed, epochs=epochs, batch_size=batch,
                            optimizer=get_preset(preset)["optimizer"], strategy="mpi",
                            strategy_options=options, validation=True, timeout=3600)
    return float(out["history"]["val_accuracy"][-1])


def accuracy_table(repeats: int, quick: bool, datasets=None) -> dict:
    """``{dataset: {format: {"accuracy": [per seed], ...}}}`` with the differences to the
    exact run per seed, printed as they come."""
    record: dict = {}
    seeds = list(range(repeats))
    for dataset in datasets or ACCURACY_RUNS:
        preset, train, test, epochs, batch = ACCURACY_RUNS[dataset]
        print(f"\n{dataset} ({preset}, 2 ranks, batch {batch}): final test accuracy over seeds "
              f"{seeds}", flush=True)
        accuracies = {fmt: [final_accuracy(dataset, fmt, s, quick) for s in seeds]
                      for fmt in FORMATS}
        rows = {}
        for fmt, acc in accuracies.items():
            diff = [a - e for a, e in zip(acc, accuracies[None])]
            rows[fmt or "exact"] = {"accuracy": acc, "mean": statistics.fmean(acc),
                                    "spread": max(acc) - min(acc),
                                    "difference": diff, "mean_difference": statistics.fmean(diff)}
            print(f"  {fmt or 'exact':<6} mean {statistics.fmean(acc):.4f} "
                  f"(min {min(acc):.4f}, max {max(acc):.4f})"
                  + ("" if fmt is None else
                     f"; minus exact, per seed: mean {statistics.fmean(diff):+.4f} "
                     f"(from {min(diff):+.4f} to {max(diff):+.4f})"), flush=True)
        record[dataset] = rows
    return record


def suite(repeats: int = 5, quick: bool = False, presets=None, batch_sizes=None,
          cluster: str | None = None, json_path: str | None = None) -> dict:
    """Run the comparison (``python -m cnn bench compression``); returns the record."""
    from ..files import atomic_write
    from .mpi import cluster_suite

    from ..machine import machine_info
    record: dict = {"machine": machine_info(),
                    "accuracy": accuracy_table(1 if quick else repeats, quick)}
    if cluster:
        record["speed"] = cluster_suite(cluster, [2], 1 if quick else repeats, quick,
                                        presets or ["cifar_tutorial"], batch_sizes,
                                        list(VARIANTS), json_path=None, allreduce=False)
    if json_path:
        atomic_write(json_path, json.dumps(record, indent=1, default=str))
        print(f"figures written to {json_path}")
    return record
