"""The named grids of the study (``--profile``): quick, full, third, device, smoke.

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
- ``third``: the third edition (:data:`THIRD_NOTES` says what it runs and why): three problems,
  MNIST ``mnist_small``, CIFAR-10 ``cifar_tutorial`` and CIFAR-10 ``cifar_resnet20`` with
  augmentation, each on every CPU path (sequential, Numba, Numba's parallel kernels,
  micro-batch accumulation, threads sync/average/hogwild, processes, MPI ranks on this host
  and across an emulated cluster over ``1gbe`` and ``10gbe``, Keras with and without XLA,
  PyTorch eager, channels-last and compiled, PyTorch DDP), one discarded warm-up epoch per
  throughput run; then time-to-accuracy for the best one-core contender, sync, average and
  hogwild, Keras and PyTorch. Sized for 2 hours on 2 cores (``--dry-run`` estimates it); the
  emulated cluster needs root.
- ``smoke``: one run on synthetic blobs, to check the machinery.

``study --dry-run`` prints the plan of a profile and its time estimate on this machine.
"""
from __future__ import annotations

from ..presets import get_preset

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
#: the third edition's problems: (data set, preset, the throughput runs' training and test
#: examples, and their axes); throughput subsets are as small as keeps an epoch many steps long
#: (at batch 128: 64, 32 and 8 steps), so that 5 seeds of every path fit the budget
THIRD_PROBLEMS = (
    {"dataset": "mnist", "model": "mnist_small", "train_size": 8192, "test_size": 2000},
    {"dataset": "cifar10", "model": "cifar_tutorial", "train_size": 4096, "test_size": 1000},
    {"dataset": "cifar10", "model": "cifar_resnet20", "augment": "cifar", "train_size": 1024,
     "test_size": 500},
)
#: every CPU path of the registry, each variant once, at two workers where it scales (the
#: machine's cores) and one where the one-worker run is the self-relative baseline
THIRD_PATHS = [
    {"path": ["sequential", "numba"]},
    {"path": "numba_parallel", "threads": 2},
    {"path": "accumulate", "backend": "numba", "threads": 2},
    {"path": "threads", "strategy": "sync", "backend": "numba", "threads": [1, 2]},
    {"path": "threads", "strategy": ["average", "hogwild"], "backend": "numba", "threads": 2},
    {"path": ["processes", "mpi"], "backend": "numba", "threads": 2},
    {"path": "mpi", "backend": "numba", "threads": 2, "link": ["1gbe", "10gbe"]},
    {"path": "keras", "threads": 1, "engine": ["graph", "xla"]},
    {"path": "torch", "threads": 1, "engine": ["eager", "channels_last", "compiled"]},
    {"path": "torch_ddp", "threads": 2},
]
#: time-to-accuracy contenders: our best one-core path (Numba), sync, average and hogwild at 2
#: workers (average and hogwild: each worker stepping on its own batch; average at the
#: preset's learning rate, hogwild at the rate of :data:`THIRD_HOGWILD_LR_DIVISOR`), Keras and
#: PyTorch (channels-last: eager PyTorch's fastest layout); and per problem, the best one-core
#: contender of the throughput runs where it is not ours (:data:`THIRD_TTA_BEST_ONE_CORE`)
THIRD_TTA_PATHS = [
    {"path": "numba"},
    {"path": "threads", "strategy": "sync", "backend": "numba", "threads": 2},
    {"path": "keras", "threads": 1},
    {"path": "torch", "threads": 1, "engine": "channels_last"},
]
#: the fastest one-core trainer of a problem's throughput runs where it is another framework's:
#: on the ResNet, compiled PyTorch. Its compile (a minute, before the first epoch, recorded as
#: ``compile_time``) is not charged to its time to target, as Numba's JIT and XLA's are not
THIRD_TTA_BEST_ONE_CORE = {"cifar_resnet20": [{"path": "torch", "threads": 1,
                                               "engine": "compiled"}]}
THIRD_TTA_HOGWILD = {"path": "threads", "strategy": "hogwild", "backend": "numba", "threads": 2}
#: average's period in steps for the CIFAR-10 time-to-accuracy runs: MNIST's sweep
#: (:data:`THIRD_PERIODS`) says which is best; 8 was the full profile's best trade-off
THIRD_AVERAGE_PERIOD = 8
THIRD_PERIODS = [1, 8, 64, "epoch"]
#: per problem: target, epoch cap, batch, training examples (None: all but the validation
#: split), validation examples, test examples (None: all), seeds. The ResNet's cap is 8
#: epochs of 12,000 images: at 4 the one-core paths reached 50% in 2 of 3 seeds and
#: sync, average and hogwild in 1 of 9; at 8, average reached 58% and hogwild at lr/p 57%
#: (seed 0); its test split is 2,000 images (each epoch's evaluation of 10,000 cost as much
#: as a third of the training)
THIRD_TTA = (
    {"dataset": "mnist", "model": "mnist_small", "target": 0.98, "epochs": 4, "batch_size": 32,
     "val_size": 2000, "repeats": REPEATS},
    {"dataset": "cifar10", "model": "cifar_tutorial", "target": 0.60, "epochs": 4,
     "batch_size": 32, "val_size": 2000, "repeats": 3},
    {"dataset": "cifar10", "model": "cifar_resnet20", "augment": "cifar", "target": 0.50,
     "epochs": 8, "batch_size": 128, "train_size": 12000, "val_size": 2000,
     "test_size": 2000, "repeats": 3},
)
#: hogwild's learning-rate rule per problem, as a divisor of the preset's rate: the ResNet's
#: lr / p (p = 2 workers). At the preset's 0.1 its first epoch ended at a training loss of 2.6,
#: above chance (2.30): each worker steps on weights the other is changing, with momentum
#: 0.9 on top, and in 8 epochs it reached 37% (seed 0); at 0.05 its loss after one epoch was
#: 2.17 and it reached 57%. MNIST and cifar_tutorial train at the preset's rate
THIRD_HOGWILD_LR_DIVISOR = {"cifar_resnet20": 2}


def _third() -> list[dict]:
    grid = []
    for problem in THIRD_PROBLEMS:
        grid += _profile({**problem, "batch_size": 128, "warmup_epochs": 1, "epochs": 1,
                          "repeats": REPEATS, "timeout": 900}, THIRD_PATHS)
    for tta in THIRD_TTA:
        period = THIRD_PERIODS if tta["model"] == "mnist_small" else THIRD_AVERAGE_PERIOD
        hogwild = dict(THIRD_TTA_HOGWILD)
        if tta["model"] in THIRD_HOGWILD_LR_DIVISOR:
            hogwild["lr"] = (get_preset(tta["model"])["optimizer"]["lr"]
                             / THIRD_HOGWILD_LR_DIVISOR[tta["model"]])
        grid += _profile({**tta, "timeout": 1800},
                         THIRD_TTA_PATHS + THIRD_TTA_BEST_ONE_CORE.get(tta["model"], [])
                         + [hogwild, {"path": "threads", "strategy": "average",
                                                      "backend": "numba", "threads": 2,
                                                      "period": period}])
    return grid


PROFILES["third"] = _third()
THIRD_NOTES = ("third profile: throughput of every CPU path on MNIST (8,192/2,000), CIFAR-10 "
               "cifar_tutorial (4,096/1,000) and cifar_resnet20 with augmentation "
               f"(1,024/500), batch 128, one warm-up epoch and one measured, {REPEATS} seeds; "
               "time-to-accuracy to 98% (MNIST, batch 32, cap 4 epochs, average's period "
               f"swept over {THIRD_PERIODS}, {REPEATS} seeds), 60% (cifar_tutorial, batch 32, "
               "cap 4 epochs, 3 seeds) and 50% (cifar_resnet20 on 12,000 images, batch 128, "
               "cap 8 epochs, 3 seeds, hogwild at half the preset's rate, compiled PyTorch "
               "beside the channels-last one: 75% takes about ten "
               "epochs of the whole set, hours per seed on one core), on 2,000-image "
               "validation splits")
FULL_NOTES = ("full profile: MNIST 60,000/10,000 (2 epochs; time-to-accuracy to 97.5%, cap 6) "
              "and CIFAR-10 (throughput: 1 epoch of the first 12,500 images; time-to-accuracy "
              f"to 55% on 45,000 + 5,000, cap 4), {REPEATS} repeats")
