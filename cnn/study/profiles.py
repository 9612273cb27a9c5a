"""The named grids of the study (``--profile``): quick, full, smoke.

A grid is a dict of axis -> value(s), or a list of such dicts (see :mod:`cnn.study.grid`).
"""
from __future__ import annotations

#: every path of the registry at its scaling points on a 2-core machine (cuda only with a GPU)
_ALL_PATHS = [
    {"path": ["sequential", "numba", "cuda"]},
    {"path": "threads", "strategy": ["sync", "average", "hogwild"], "backend": "numpy",
     "threads": 2},
    {"path": "threads", "strategy": "sync", "backend": "numba", "threads": 2},
    {"path": "numba_parallel", "threads": 2},
    {"path": ["processes", "mpi"], "threads": 2},
    {"path": "keras", "threads": [1, 2]},
]


def _profile(common: dict, parts: list[dict]) -> list[dict]:
    return [{**common, **part} for part in parts]


#: Named grids (every path; cuda only with a GPU). ``quick``: offline (the MNIST subset shipped
#: in the package), batch 32 and 128, 2 epochs, 2 repeats: 36 runs, 2.5 min on the quiet 2-core
#: development machine (10.5 min while it was shared), 44 since the processes and mpi paths
#: joined (2 workers each). ``full``: MNIST and CIFAR-10, whole data sets, 3 repeats, threads x
#: batch x filters (see FULL_NOTES): 117 runs, estimated 1.8 h there (``--dry-run``,
#: calibrated on measured throughput of each configuration), 165 with processes and MPI ranks
#: at 1, 2 and 4 (4 oversubscribes 2 cores and is marked so). ``smoke``: one
#: run on synthetic blobs in a second, to check the machinery.
PROFILES: dict[str, list[dict]] = {
    "quick": _profile({"dataset": "mnist_embedded", "model": "mnist_small",
                       "batch_size": [32, 128], "epochs": 2, "repeats": 2, "timeout": 900},
                      _ALL_PATHS),
    "full": (
        # MNIST, every path, 60,000 train / 10,000 test images, batch 32 and 128, 2 epochs
        _profile({"dataset": "mnist", "model": "mnist_small", "batch_size": [32, 128],
                  "epochs": 2, "repeats": 3, "timeout": 3600}, _ALL_PATHS)
        # MNIST scaling at batch 128: threads 1, 2, 4 (2 cores: 4 oversubscribes) and conv
        # filters 8, 32 (the batch-128, 8-filter runs are those above, not run twice)
        + _profile({"dataset": "mnist", "model": "mnist_small", "batch_size": 128,
                    "filters": [8, 32], "epochs": 2, "repeats": 3, "timeout": 3600},
                   [{"path": "sequential"},
                    {"path": "threads", "strategy": "sync", "backend": "numpy",
                     "threads": [1, 2, 4]},
                    {"path": ["processes", "mpi"], "threads": [1, 2, 4]},
                    {"path": "keras", "threads": [1, 2]}])
        # CIFAR-10, every path, 50,000 train / 10,000 test images, the tutorial's batch 32,
        # ONE epoch (a CIFAR epoch is ~1 min sequential here; one keeps the profile ~1.5 h)
        + _profile({"dataset": "cifar10", "model": "cifar_tutorial", "batch_size": 32,
                    "epochs": 1, "repeats": 3, "timeout": 3600}, _ALL_PATHS)
        # CIFAR-10 scaling at batch 128: sequential vs sync threads on both CPU backends
        + _profile({"dataset": "cifar10", "model": "cifar_tutorial", "epochs": 1,
                    "batch_size": 128, "repeats": 3, "timeout": 3600},
                   [{"path": ["sequential", "numba"]},
                    {"path": "threads", "strategy": "sync", "backend": ["numpy", "numba"],
                     "threads": 2}])
    ),
    "smoke": [{"dataset": "blobs", "model": "mnist_small", "train_size": 256, "test_size": 64,
               "batch_size": 32, "epochs": 1, "repeats": 1, "timeout": 300,
               "path": "sequential"}],
}
FULL_NOTES = ("full profile: whole data sets (MNIST 60,000/10,000, 2 epochs; CIFAR-10 "
              "50,000/10,000, 1 epoch), 3 repeats")
