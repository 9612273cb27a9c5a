"""Run under ``mpiexec -n 2`` by tests/test_mpi.py (never collected by pytest itself).

``python tests/mpi_checks.py train OUT``: train every scenario of :data:`SCENARIOS` with the
MPI strategies and write, from every rank, ``OUT/<scenario>.rank<r>.npz`` (weights) and
``.json`` (history and info); the test compares them with the sequential path, computed in the
test's own process. One launch trains all of them, to keep CI short.

``python tests/mpi_checks.py layers|resnet|augment OUT``: the same for :data:`LAYER_SCENARIOS`,
:data:`RESNET_SCENARIOS` or :data:`AUGMENT_SCENARIOS`.

``python tests/mpi_checks.py raise OUT``: rank 1 raises in its third dense forward, after
writing the MPICH segments it maps to ``OUT/segments.rank1``.
``python tests/mpi_checks.py trace OUT``: a traced run (overlap, several buckets), rank 0
writing ``OUT/trace.json``.
``python tests/mpi_checks.py rows OUT``: train with ``mpi`` and ``mpi_average`` on images
whose gathers are recorded (a NumPy array subclass that notes every ``np.take`` along the
examples) and write, from every rank, ``OUT/rows.<strategy>.rank<r>.json``: the example
indices each gather took, in order.
``python tests/mpi_checks.py slow OUT``: trains for a long time after writing
``OUT/pid.rank<r>`` and, once training has started, ``OUT/started.rank<r>`` (the test kills
rank 1 with SIGKILL).
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import numpy as np

# run as a script, so this folder is sys.path[0] and the shared helpers import directly
from parallel_helpers import OPT, RESNET_OPT, blobs, build, train

from cnn.backends.numpy import NumpyBackend

#: name -> (strategy, keyword arguments of parallel_helpers.train)
SCENARIOS = {
    "float64": ("mpi", {}),
    "float32": ("mpi", {"dtype": np.float32}),
    "auto": ("mpi", {"backend": "auto"}),  # fit's default: the fastest backend installed
    "overlap": ("mpi", {"overlap": True}),
    "overlap_buckets": ("mpi", {"overlap": True, "bucket_bytes": 1000}),
    "overlap_thread": ("mpi", {"overlap": True, "progress": "thread"}),
    "fp16": ("mpi", {"compression": "fp16"}),
    "bf16": ("mpi", {"compression": "bf16"}),
    "overlap_fp16": ("mpi", {"overlap": True, "bucket_bytes": 1000, "compression": "fp16",
                             "progress": "thread"}),
    "overlap_bf16": ("mpi", {"overlap": True, "compression": "bf16"}),
    "bf16_float32": ("mpi", {"compression": "bf16", "dtype": np.float32}),
    "center": ("mpi", {"kind": "center"}),
    "batch1": ("mpi", {"batch_size": 1, "epochs": 1, "n": 9}),  # every step: one rank a ghost
    "plain_sgd": ("mpi", {"optimizer": {"type": "sgd", "lr": 0.1}, "epochs": 3}),
    "adam": ("mpi", {"optimizer": {"type": "adam", "lr": 0.01}}),
    "adamw_cosine": ("mpi", {"optimizer": {"type": "adamw", "lr": 0.01, "schedule": "cosine"}}),
    "average_adam": ("mpi_average", {"every": 2, "batch_size": 5,
                                     "optimizer": {"type": "rmsprop", "lr": 0.01}}),
    "average_every1": ("mpi_average", {"every": 1, "batch_size": 5}),
    "average_every3": ("mpi_average", {"every": 3, "batch_size": 5}),
    "average_epoch": ("mpi_average", {"batch_size": 5}),
    # 45 examples: every epoch ends with a step of 5, split 3/2, so the weights of the
    # average differ between the replicas
    "average_uneven": ("mpi_average", {"every": 2, "batch_size": 4, "n": 45}),
    "average_float32": ("mpi_average", {"every": 3, "batch_size": 5, "n": 45,
                                        "dtype": np.float32}),
}

#: ``python tests/mpi_checks.py layers OUT``: the layers of issue 12 (batch norm synchronised
#: across ranks, dropout masks keyed by the global example index, penalties), launched by
#: tests/test_parallel_layers.py
LAYER_SCENARIOS = {
    "layers": ("mpi", {"kind": "layers"}),
    "layers_batch1": ("mpi", {"kind": "layers", "batch_size": 1, "epochs": 1, "n": 9}),
    # batch norm's sums during backward between buckets the progress thread starts
    "layers_overlap": ("mpi", {"kind": "layers", "overlap": True, "progress": "thread"}),
    "layers_average3": ("mpi_average", {"kind": "layers", "every": 3, "batch_size": 5}),
}


#: ``python tests/mpi_checks.py resnet OUT``: the test ResNet (issue 20: residual blocks, batch
#: norm synchronised across ranks inside them), launched by tests/test_resnet_references.py
RESNET_SCENARIOS = {
    "resnet": ("mpi", {"kind": "resnet", "batch_size": 8, "epochs": 1, "n": 160,
                       "optimizer": RESNET_OPT}),
    # 50 examples in batches of 7: shards of 4/3, and a last step of one example (a ghost rank)
    "resnet_uneven": ("mpi", {"kind": "resnet", "batch_size": 7, "epochs": 1, "n": 50,
                              "optimizer": RESNET_OPT}),
    "resnet_average": ("mpi_average", {"kind": "resnet", "batch_size": 4, "epochs": 1, "n": 48,
                                       "every": 2, "optimizer": RESNET_OPT}),
}


class RecordedTakes(np.ndarray):
    """Images that note the indices of every ``np.take`` along their first axis (how the fit
    loop gathers a batch) in ``rows`` (one list per take)."""

    rows: list

    def __array_function__(self, func, types, args, kwargs):
        if func is np.take and args[0] is self and kwargs.get("axis") == 0:
            self.rows.append([int(i) for i in np.asarray(args[1])])
        return super().__array_function__(func, types, args, kwargs)

    @classmethod
    def record(cls, images: np.ndarray) -> "RecordedTakes":
        recorded = images.view(cls)
        recorded.rows = []
        return recorded
#: ``python tests/mpi_checks.py augment OUT``: training batches augmented (issue 20: crops and
#: flips keyed by the example's index in the training set, whichever rank gathers it) and
#: normalised per channel, launched by tests/test_augment.py
AUGMENT_SCENARIOS = {
    "augment": ("mpi", {"kind": "layers", "augment": "cifar", "normalize": True}),
    "augment_resnet": ("mpi", {"kind": "resnet", "batch_size": 8, "epochs": 1, "n": 48,
                               "optimizer": RESNET_OPT, "augment": {"pad": 2, "flip": True},
                               "normalize": True}),
}


def main(mode: str, out: str) -> None:
    from mpi4py import MPI
    rank = MPI.COMM_WORLD.Get_rank()
    out_dir = Path(out)
    if mode in ("train", "layers", "resnet", "augment"):
        scenarios = {"train": SCENARIOS, "layers": LAYER_SCENARIOS, "resnet": RESNET_SCENARIOS,
                     "augment": AUGMENT_SCENARIOS}[mode]
        for name, (strategy, kwargs) in scenarios.items():
            weights, hist = train(strategy, **kwargs)
            np.savez(out_dir / f"{name}.rank{rank}.npz", **weights)
            (out_dir / f"{name}.rank{rank}.json").write_text(
                json.dumps({"history": hist.history, "info": hist.info}, default=str))
    elif mode == "rows":
        for strategy, batch_size in (("mpi", 7), ("mpi_average", 4)):
            x, y = blobs()
            images = RecordedTakes.record(x)
            build().fit(images, y, epochs=2, batch_size=batch_size, optimizer=OPT,
                        strategy=strategy, seed=5, verbose=0)
            (out_dir / f"rows.{strategy}.rank{rank}.json").write_text(json.dumps(images.rows))
    elif mode == "raise":
        class Failing(NumpyBackend):
            calls = 0

            def dense_forward(self, x, w, b, *args, **kwargs):
                if rank == 1:
                    self.calls += 1
                    if self.calls > 2:
                        with open("/proc/self/maps") as f:  # the test checks their names
                            (out_dir / "segments.rank1").write_text("".join(
                                line.split(None, 5)[5] for line in f
                                if "/dev/shm/mpich_shm" in line))
                        raise FloatingPointError("injected failure")
                return super().dense_forward(x, w, b, *args, **kwargs)

        x, y = blobs()
        build().fit(x, y, epochs=2, batch_size=8, optimizer=OPT, strategy="mpi",
                    backend=Failing(), verbose=0)
    elif mode == "trace":  # a traced run with overlapped buckets: one file, merged by rank 0
        x, y = blobs(200)
        build().fit(x, y, epochs=1, batch_size=32, optimizer=OPT, strategy="mpi", verbose=0,
                    backend="numpy", strategy_options={"overlap": True, "bucket_bytes": 200},
                    trace=out_dir / "trace.json")
    elif mode == "slow":
        (out_dir / f"pid.rank{rank}").write_text(str(os.getpid()))
        started = out_dir / f"started.rank{rank}"

        def progress(epoch, done, total):
            if not started.exists():
                started.write_text("1")

        x, y = blobs(2000)
        build().fit(x, y, epochs=1000, batch_size=8, optimizer=OPT, strategy="mpi",
                    verbose=0, progress=progress)
    else:
        raise SystemExit(f"unknown mode {mode!r}")


if __name__ == "__main__":
    main(*sys.argv[1:])
