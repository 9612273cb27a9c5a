"""The named grids of the study (``--profile``): quick, full, device, smoke.

A grid is a dict of axis -> value(s), or a list of such dicts (see :mod:`cnn.study.grid`).
Every profile repeats each configuration 5 times (with n = 5 the range of the repeats is a
distribution-free 94% interval for the median), and runs them in a randomised order within
repeat blocks (:func:`cnn.study.grid.plan_order`). Runs of paths that cannot run on a machine
(no GPU, PyTorch not installed) are left out there and the plan says so.

- ``quick``: offline (the MNIST subset shipped in the package), every CPU path at batch 128,
  the strategies' one- and two-worker points, ``average`` at two periods, a time-to-accuracy
  block; minutes on two cores.
- ``full``: MNIST (60,000/10,000) and CIFAR-10 (throughput over the first 12,500 training
  images, time-to-accuracy over all of them): every path, threads 1, 2 and 4 (4
  oversubscribes 2 cores: marked, kept out of fits), batch 32 and 128, filters 8 and 32 on
  MNIST, ``average`` swept over its period (1, 8, 64 steps, epoch), micro-batch accumulation,
  time-to-accuracy to 97.5% (MNIST) and 55% (CIFAR-10); sized for a study of an hour or two
  on two cores.
- ``device``: a 16-core machine with one NVIDIA GPU (no TensorFlow, no network): threads at
  p = 1, 2, 4, 8, 16 on both CPU backends, the CUDA path and PyTorch on the same GPU, on the
  shipped MNIST subset. Its results go to ``results/device/`` and the report merges them as a
  second machine.
- ``smoke``: one run on synthetic blobs, to check the machinery.

``study --dry-run`` prints the plan of a profile and its time estimate on this machine.
"""
from __future__ import annotations

REPEATS = 5


def _profile(common: dict, parts: list[dict]) -> list[dict]:
    return [{**common, **part} for part in parts]


PROFILES: dict[str, list[dict]] = {
    "quick": (
        _profile({"dataset": "mnist_embedded", "model": "mnist_small", "batch_size": 128,
                  "epochs": 2, "repeats": REPEATS, "timeout": 600},
                 [{"path": ["sequential", "numba", "cuda", "torch_cuda"]},
                  {"path": "accumulate", "threads": 2},
                  {"path": "threads", "strategy": "sync", "backend": ["numpy", "numba"],
                   "threads": [1, 2]},
                  {"path": "threads", "strategy": "average", "threads": 2,
                   "period": [8, "epoch"]},
                  {"path": "threads", "strategy": "hogwild", "threads": 2},
                  {"path": "numba_parallel", "threads": 2},
                  {"path": ["processes", "mpi"], "threads": 2},
                  # PyTorch is optional (not in requirements.txt) and slow to import: in full
                  {"path": "keras", "threads": 1}])
        # batch 32: the sequential path against sync and its one-core counterpart
        + _profile({"dataset": "mnist_embedded", "model": "mnist_small", "batch_size": 32,
                    "epochs": 2, "repeats": REPEATS, "timeout": 600},
                   [{"path": "sequential"}, {"path": "accumulate", "threads": 2},
                    {"path": "threads", "strategy": "sync", "threads": 2}])
        # time-to-accuracy on a validation split of the training set
        + _profile({"dataset": "mnist_embedded", "model": "mnist_small", "batch_size": 32,
                    "epochs": 4, "target": 0.90, "val_size": 512, "repeats": REPEATS,
                    "timeout": 600},
                   [{"path": "sequential"}, {"path": "threads", "strategy": "sync",
                                             "threads": 2}])
    ),
    "full": (
        # MNIST at batch 128: every path, threads 1, 2 and 4 (4 oversubscribes 2 cores),
        # filters 8 and 32
        _profile({"dataset": "mnist", "model": "mnist_small", "batch_size": 128,
                  "filters": [8, 32], "epochs": 2, "repeats": REPEATS, "timeout": 3600},
                 [{"path": ["sequential", "numba"]},
                  {"path": "accumulate", "threads": 2},
                  {"path": "threads", "strategy": "sync", "backend": ["numpy", "numba"],
                   "threads": [1, 2, 4]},
                  {"path": "keras", "threads": 1}])
        # PyTorch (where installed) at one configuration per problem: it is slow to start
        + _profile({"dataset": "mnist", "model": "mnist_small", "batch_size": 128,
                    "epochs": 2, "repeats": REPEATS, "timeout": 3600},
                   [{"path": "torch", "threads": 1}])
        + _profile({"dataset": "mnist", "model": "mnist_small", "batch_size": 128,
                    "epochs": 2, "repeats": REPEATS, "timeout": 3600},
                   [{"path": ["cuda", "torch_cuda"]},
                    {"path": "threads", "strategy": "hogwild", "threads": 2},
                    {"path": "numba_parallel", "threads": [1, 2]},
                    # threads versus processes versus MPI ranks, the same sync algorithm
                    {"path": ["processes", "mpi"], "threads": [1, 2, 4]},
                    {"path": "keras", "threads": 2}])
        # MNIST at batch 32: the sequential path, its one-core contenders and sync
        + _profile({"dataset": "mnist", "model": "mnist_small", "batch_size": 32, "epochs": 2,
                    "repeats": REPEATS, "timeout": 3600},
                   [{"path": ["sequential", "numba"]}, {"path": "accumulate", "threads": 2},
                    {"path": "threads", "strategy": "sync", "backend": ["numpy", "numba"],
                     "threads": 2},
                    {"path": "keras", "threads": 1}])
        # MNIST: average swept over its period (steps between averages, or once per epoch)
        + _profile({"dataset": "mnist", "model": "mnist_small", "batch_size": 32, "epochs": 2,
                    "repeats": REPEATS, "timeout": 3600},
                   [{"path": "threads", "strategy": "average", "threads": 2,
                     "period": [1, 8, 64, "epoch"]}])
        # MNIST time-to-accuracy: 97.5% on a 5,000-image validation split, cap 6 epochs
        + _profile({"dataset": "mnist", "model": "mnist_small", "batch_size": 32, "epochs": 6,
                    "target": 0.975, "repeats": REPEATS, "timeout": 3600},
                   [{"path": ["sequential", "numba"]},
                    {"path": "threads", "strategy": "sync", "backend": ["numpy", "numba"],
                     "threads": 2}])
        # CIFAR-10 throughput: one epoch over the first 12,500 training images (a quarter of
        # the set keeps 5 repeats of every configuration in budget); accuracy is the
        # time-to-accuracy block's business
        + _profile({"dataset": "cifar10", "model": "cifar_tutorial", "batch_size": 32,
                    "train_size": 12500, "epochs": 1, "repeats": REPEATS, "timeout": 3600},
                   [{"path": ["sequential", "numba", "cuda", "torch_cuda"]},
                    {"path": "threads", "strategy": "sync", "backend": ["numpy", "numba"],
                     "threads": 2},
                    {"path": "numba_parallel", "threads": 2},
                    {"path": "accumulate", "threads": 2},
                    {"path": ["keras", "torch"], "threads": 1}])
        # batch 128 has every one-core contender too: the best of them is baseline (b)
        + _profile({"dataset": "cifar10", "model": "cifar_tutorial", "batch_size": 128,
                    "train_size": 12500, "epochs": 1, "repeats": REPEATS, "timeout": 3600},
                   [{"path": ["sequential", "numba"]}, {"path": "accumulate", "threads": 2},
                    {"path": "threads", "strategy": "sync", "backend": ["numpy", "numba"],
                     "threads": [1, 2]},
                    {"path": ["keras", "torch"], "threads": 1}])
        # CIFAR-10 time-to-accuracy on the whole training set: 55% on a 5,000-image
        # validation split, cap 4 epochs
        + _profile({"dataset": "cifar10", "model": "cifar_tutorial", "batch_size": 32,
                    "epochs": 4, "target": 0.55, "repeats": REPEATS, "timeout": 3600},
                   [{"path": "sequential"},
                    {"path": "threads", "strategy": "sync", "backend": "numba",
                     "threads": 2}])
    ),
    "device": _profile(
        {"dataset": "mnist_embedded", "model": "mnist_small", "batch_size": 128, "epochs": 3,
         "repeats": REPEATS, "timeout": 300},
        [{"path": ["sequential", "numba", "cuda", "torch_cuda"]},
         {"path": "accumulate", "threads": 16},
         {"path": "threads", "strategy": "sync", "backend": ["numpy", "numba"],
          "threads": [1, 2, 4, 8, 16]},
         {"path": "numba_parallel", "threads": 16},
         {"path": "torch", "threads": [1, 16]}]),
    "smoke": [{"dataset": "blobs", "model": "mnist_small", "train_size": 256, "test_size": 64,
               "batch_size": 32, "epochs": 1, "repeats": 1, "timeout": 300,
               "path": "sequential"}],
}
FULL_NOTES = ("full profile: MNIST 60,000/10,000 (2 epochs; time-to-accuracy to 97.5%, cap 6) "
              "and CIFAR-10 (throughput: 1 epoch of the first 12,500 images; time-to-accuracy "
              f"to 55% on 45,000 + 5,000, cap 4), {REPEATS} repeats")
