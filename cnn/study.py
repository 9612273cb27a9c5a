"""The study: a parameter grid -> isolated training runs -> one tidy pandas DataFrame on disk.

Usage::

    python -m cnn study --profile quick --out results/quick/df_results.pkl
    python -m cnn study --profile full --data-dir /path/to/data --dry-run    # plan + time estimate
    python -m cnn study --grid my_grid.yaml --out results/mine.pkl

    from cnn.study import PROFILES, expand_grid, run_study, summarize
    df = run_study("quick", out="results/quick/df_results.pkl")
    summarize(df)        # median images/s, speed-up and final test accuracy per configuration

Grids
-----
A grid is a dict mapping axis names to a value or a list of values, or a list of such dicts
(their union; a configuration that two sub-grids both produce runs once). List-valued axes are
crossed. The axes (default in brackets):

- ``dataset`` [mnist_embedded]: mnist | cifar10 | mnist_embedded | blobs | xor.
- ``model`` [cifar_tutorial for cifar10, else mnist_small]: a preset name (cnn.presets).
- ``path`` [sequential]: the named training variant, see below.
- ``strategy`` [sync] and ``backend`` [numpy]: only for path "threads" (sync | average |
  hogwild over numpy | numba); the other paths fix both, so the values are ignored there.
- ``threads`` [1]: worker threads (path threads), NUMBA_NUM_THREADS (numba_parallel) or
  TensorFlow's intra/inter-op threads (keras); forced to 1 for sequential, numba and cuda.
- ``batch_size`` [the preset's], ``filters`` [the preset's; filters of the first conv layer],
  ``epochs`` [1], ``train_size`` / ``test_size`` [the whole split; the first N examples],
  ``dtype`` [float32], ``seed`` [0], ``lr`` / ``momentum`` [the preset's optimizer].
- settings, one value per sub-grid: ``repeats`` [1], ``timeout`` [1800 s per run],
  ``cuda_simulator`` [False: run path cuda under NUMBA_ENABLE_CUDASIM=1].

An unknown axis or an invalid value raises ``ValueError`` naming it. Defaults are resolved
when the grid expands (``filters=None`` becomes the preset's 8, a too-large ``train_size`` the
size of the split), so equal runs get equal keys however they were written.

Paths (speed-up is always against "sequential" on the same machine in the same study):

- ``sequential``: numpy backend, strategy sequential, 1 thread, BLAS pinned to 1 thread.
- ``threads``: data-parallel Python threads, strategy sync | average | hogwild over the numpy
  or numba backend (cnn.parallel.threads), ``threads`` workers.
- ``numba``: numba backend, strategy sequential.
- ``numba_parallel``: intra-op parallel numba kernels; NUMBA_NUM_THREADS=``threads`` is set in
  the child's environment before anything is imported.
- ``cuda``: numba CUDA kernels. Runs only when a GPU is present or the grid sets
  ``cuda_simulator=True``; otherwise its runs are dropped at expansion and nothing is recorded
  for them (the quick and full profiles list cuda, so on a machine without a GPU, such as the
  2-core development machine, they skip it and say so).
- ``keras``: the Keras reference (``cnn.keras_reference.fit_keras``), same spec, same initial
  weights, same data order seed, TensorFlow on the CPU with ``threads`` threads.

Each configuration runs ``repeats`` times with ``seed = seed + repeat`` (so repeat r of every
path starts from the same weights and data order and paths pair up), in interleaved order:
repeat 0 of every configuration, then repeat 1, ..., so drift in the machine's speed hits all
configurations alike. The data sets themselves are always loaded with seed 0.

Isolation
---------
Every run executes in a fresh Python interpreter: the parent writes the run's configuration to
a temporary JSON file and starts ``python -m cnn.study --run-json CONFIG --result RESULT``
(same interpreter, which imports this package as installed: ``pip install -e .``) with its environment set before
the interpreter starts (NUMBA_NUM_THREADS for numba_parallel, NUMBA_ENABLE_CUDASIM for the
simulator). The child trains, writes a JSON result atomically and exits.

JIT compilation: Numba caches compiled kernels on disk, so left alone the first Numba run of a
study would pay the compile and later runs would not. Instead every study invocation points
NUMBA_CACHE_DIR at its own empty folder and, before the first run of each JIT backend and
dtype, a separate warm-up process compiles that backend's kernels into it (timed: the
``cold_compile_time`` column). Every measured run then starts from the same warm disk cache,
whatever its place in the order; its own ``compile_time`` (the fit loop's warm-up step:
loading the kernels from the cache and any compile the warm-up missed) is recorded apart from
the epochs. The folder is deleted when the study ends.

So no run's JIT, thread pools, BLAS state, GPU context or heap carries into the next, and no
run depends on what ran before it. The parent enforces the per-run
``timeout`` (the child is killed) and records the run as failed when the child raises, exits
without a result (a crash) or times out; the study goes on with the next run.

Storage, resuming, interruption
-------------------------------
All rows live in one pickled DataFrame (``out``, default ``results/df_results.pkl``),
rewritten atomically (temporary file in the same folder + ``os.replace``) after every run, so a
crash, a kill or Ctrl-C keeps every finished run (the interrupted run is simply not recorded).
Running the same study again resumes: runs whose ``run_key`` already has status "ok" in the file
are skipped; failed runs are retried (their old rows replaced) unless ``retry_failed=False``.
Rows of other grids already in the file are kept, so one file can grow over several studies;
use one file per machine, and one writer per file at a time.

Schema: one row per (run, epoch)
--------------------------------
A failed run has one row, with ``epoch`` missing (<NA>) and the measurements NaN.

Configuration (the same on every row of a run):
    run_key (str; stable: readable prefix + hash of the configuration, incl. repeat),
    status ("ok" | "failed"), error (str; "" when ok, else "ExceptionType: message"),
    dataset, model (preset name), path, strategy, backend ("tensorflow" for keras) (str),
    threads, batch_size, filters, epochs (int), train_size, test_size (int; examples actually
    used), repeat (int, 0-based), dtype (str), seed (int; the run's seed = base seed + repeat),
    lr, momentum (float), cuda_simulator (bool).
Per epoch:
    epoch (Int64, 1-based), time (float s; training wall time of the epoch = data + transfer +
    compute), compute_time, data_time (shuffle and batch gather), transfer_time (host->device),
    eval_time (evaluation on the test set, not part of ``time``), images_per_sec
    (train_size / time), train_loss, train_accuracy (running, over the epoch's training
    batches), test_loss, test_accuracy (on the held-out test set after the epoch).
Per run (repeated on each of its rows):
    compile_time (s; the run's JIT warm-up before epoch 1, against the study's warm cache;
    0 for numpy), cold_compile_time (s; the one-off compile of the run's backend and dtype
    into the study's empty cache, see Isolation; NaN for paths with nothing to compile, and
    the same for all runs of one backend in one invocation), final_test_accuracy (test
    accuracy after the last epoch), num_params (Int64), load_time (s; loading the data in the
    child), run_time (s; wall time of the whole child process as seen by the parent, start-up
    and compile included), started_at (str, ISO 8601 UTC), device ("cpu", the GPU's name, or
    "cuda-simulator").
Machine and software (from :func:`cnn.machine.machine_info`, probed in the child):
    cpu, cores (int), blas, python, platform, git_commit ("-dirty" when the work tree had
    uncommitted changes), source_hash (hash of the package's .py files as the run imported
    them), numpy_version, numba_version,
    numba_cuda_version, tensorflow_version, keras_version, threadpoolctl_version,
    pandas_version (str).
"""
from __future__ import annotations

import argparse
import datetime as _dt
import hashlib
import itertools
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from functools import lru_cache
from pathlib import Path
from typing import Any, Callable, Iterable

# NOTE: this module is also the child's entry point. Keep module-level imports to the standard
# library so the child can set its environment before numpy / numba / TensorFlow load.

PATHS = ("sequential", "threads", "numba", "numba_parallel", "cuda", "keras")
THREAD_STRATEGIES = ("sync", "average", "hogwild")
THREAD_BACKENDS = ("numpy", "numba")
DTYPES = ("float32", "float64")
#: full (train, test) sizes per data set; for the synthetic sets, the default sizes generated
DATASET_SIZES = {"mnist": (60000, 10000), "cifar10": (50000, 10000),
                 "mnist_embedded": (5120, 1000), "blobs": (2000, 500), "xor": (1000, 200)}
SYNTHETIC = ("blobs", "xor")
DEFAULT_RESULTS = Path("results") / "df_results.pkl"
#: where ``make study`` puts the quick profile's results; --dry-run calibrates on it
QUICK_RESULTS = Path("results") / "quick" / "df_results.pkl"
DEFAULT_TIMEOUT = 1800.0

#: grid axes that take lists (crossed), in expansion order
LIST_AXES = ("dataset", "model", "path", "strategy", "backend", "threads", "batch_size", "filters",
             "epochs", "train_size", "test_size", "dtype", "seed", "lr", "momentum")
#: grid settings: one value per sub-grid
SETTINGS = ("repeats", "timeout", "cuda_simulator")
GRID_DEFAULTS: dict[str, Any] = {
    "dataset": "mnist_embedded", "model": None, "path": "sequential", "strategy": None,
    "backend": None, "threads": 1, "batch_size": None, "filters": None, "epochs": 1,
    "train_size": None, "test_size": None, "dtype": "float32", "seed": 0, "lr": None,
    "momentum": None, "repeats": 1, "timeout": DEFAULT_TIMEOUT, "cuda_simulator": False,
}

#: the configuration fields of a run, in column order (``timeout`` is not part of the key)
CONFIG_FIELDS = ("dataset", "model", "path", "strategy", "backend", "threads", "batch_size",
                 "filters", "epochs", "train_size", "test_size", "repeat", "dtype", "seed", "lr",
                 "momentum", "cuda_simulator")
EPOCH_FIELDS = ("epoch", "time", "compute_time", "data_time", "transfer_time", "eval_time",
                "images_per_sec", "train_loss", "train_accuracy", "test_loss", "test_accuracy")
RUN_FIELDS = ("compile_time", "cold_compile_time", "final_test_accuracy", "num_params",
              "load_time", "run_time", "started_at", "device")
MACHINE_COLUMNS = ("cpu", "cores", "blas", "python", "platform", "git_commit", "source_hash",
                   "numpy_version",
                   "numba_version", "numba_cuda_version", "tensorflow_version", "keras_version",
                   "threadpoolctl_version", "pandas_version")
COLUMNS = (("run_key", "status", "error") + CONFIG_FIELDS + EPOCH_FIELDS + RUN_FIELDS
           + MACHINE_COLUMNS)
_INT_COLUMNS = ("threads", "batch_size", "filters", "epochs", "train_size", "test_size",
                "repeat", "seed", "cores")
_NULLABLE_INT_COLUMNS = ("epoch", "num_params")
_FLOAT_COLUMNS = ("lr", "momentum", "time", "compute_time", "data_time", "transfer_time",
                  "eval_time", "images_per_sec", "train_loss", "train_accuracy", "test_loss",
                  "test_accuracy", "compile_time", "cold_compile_time", "final_test_accuracy",
                  "load_time", "run_time")
# history key of cnn.train.History -> column
_HISTORY_TO_COLUMN = {"epoch": "epoch", "time": "time", "compute_time": "compute_time",
                      "data_time": "data_time", "transfer_time": "transfer_time",
                      "eval_time": "eval_time", "images_per_sec": "images_per_sec",
                      "loss": "train_loss", "accuracy": "train_accuracy",
                      "val_loss": "test_loss", "val_accuracy": "test_accuracy"}

_ALL_PATHS = [
    {"path": ["sequential", "numba", "cuda"]},
    {"path": "threads", "strategy": ["sync", "average", "hogwild"], "backend": "numpy",
     "threads": 2},
    {"path": "threads", "strategy": "sync", "backend": "numba", "threads": 2},
    {"path": "numba_parallel", "threads": 2},
    {"path": "keras", "threads": [1, 2]},
]


def _profile(common: dict, parts: list[dict]) -> list[dict]:
    return [{**common, **part} for part in parts]


#: Named grids (every path; cuda only with a GPU). ``quick``: offline (the MNIST subset shipped
#: in the package), batch 32 and 128, 2 epochs, 2 repeats: 36 runs, 2.5 min on the quiet 2-core
#: development machine (10.5 min while it was shared). ``full``: MNIST and CIFAR-10, whole data
#: sets, 3 repeats, threads x batch x filters (see FULL_NOTES): 117 runs, estimated 1.8 h there
#: (``--dry-run``, calibrated on measured throughput of each configuration). ``smoke``: one
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


# ---- grid validation and expansion ----------------------------------------------------------
def _is_int(v) -> bool:
    import numbers
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def _check_positive_int(axis, v, allow_none=False):
    if v is None and allow_none:
        return None
    if not _is_int(v) or v < 1:
        raise ValueError(f"grid axis {axis!r}: must be a positive integer"
                         f"{' or None' if allow_none else ''}; received {axis}={v!r}")
    return int(v)


def _check_value(axis: str, v):
    """Validate one value of one axis; returns it normalised."""
    if axis == "dataset":
        if v not in DATASET_SIZES:
            raise ValueError(f"grid axis 'dataset': unknown data set {v!r}; choose one of "
                             f"{sorted(DATASET_SIZES)}")
        return v
    if axis == "model":
        if v is None:
            return None
        from .presets import PRESETS
        if v not in PRESETS:
            raise ValueError(f"grid axis 'model': unknown preset {v!r}; choose one of "
                             f"{sorted(PRESETS)}")
        return v
    if axis == "path":
        if v not in PATHS:
            raise ValueError(f"grid axis 'path': unknown path {v!r}; choose one of {list(PATHS)}")
        return v
    if axis == "strategy":
        if v not in (None, "sequential") + THREAD_STRATEGIES:
            raise ValueError(f"grid axis 'strategy': unknown strategy {v!r}; path 'threads' "
                             f"takes one of {list(THREAD_STRATEGIES)}")
        return v
    if axis == "backend":
        if v not in (None, "numpy", "numba", "numba_parallel", "cuda", "tensorflow"):
            raise ValueError(f"grid axis 'backend': unknown backend {v!r}; path 'threads' takes "
                             f"one of {list(THREAD_BACKENDS)}")
        return v
    if axis in ("threads", "epochs"):
        return _check_positive_int(axis, v)
    if axis in ("batch_size", "filters", "train_size", "test_size"):
        return _check_positive_int(axis, v, allow_none=True)
    if axis == "dtype":
        name = getattr(v, "__name__", None) or str(v)
        if name not in DTYPES:
            raise ValueError(f"grid axis 'dtype': must be one of {list(DTYPES)}; received {v!r}")
        return name
    if axis == "seed":
        if not _is_int(v) or v < 0:
            raise ValueError(f"grid axis 'seed': must be a non-negative integer; received {v!r}")
        return int(v)
    if axis in ("lr", "momentum"):
        if v is None:
            return None
        ok = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
        ok = ok and (v > 0 if axis == "lr" else 0 <= v < 1)
        if not ok:
            rng = "> 0" if axis == "lr" else "in [0, 1)"
            raise ValueError(f"grid axis {axis!r}: must be a number {rng} or None; "
                             f"received {v!r}")
        return float(v)
    if axis == "repeats":
        return _check_positive_int(axis, v)
    if axis == "timeout":
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not v > 0:
            raise ValueError(f"grid axis 'timeout': must be a positive number of seconds; "
                             f"received {v!r}")
        return float(v)
    if axis == "cuda_simulator":
        if not isinstance(v, bool):
            raise ValueError(f"grid axis 'cuda_simulator': must be True or False; received {v!r}")
        return v
    raise AssertionError(axis)


def _as_subgrids(grid) -> list[dict]:
    if isinstance(grid, str):
        if grid not in PROFILES:
            raise ValueError(f"unknown profile {grid!r}; choose one of {sorted(PROFILES)}")
        grid = PROFILES[grid]
    if isinstance(grid, dict):
        grid = [grid]
    if (not isinstance(grid, (list, tuple)) or not grid
            or not all(isinstance(g, dict) for g in grid)):
        raise ValueError("a grid is a profile name, a dict of axis -> value(s), or a non-empty "
                         f"list of such dicts; received {grid!r}")
    return list(grid)


def _preset_defaults(model: str) -> dict:
    from .presets import get_preset
    spec = get_preset(model)
    conv = next((layer for layer in spec["layers"] if layer["type"] == "conv2d"), None)
    opt = spec.get("optimizer", {"type": "sgd", "lr": 0.01})
    return {"filters": conv["filters"] if conv else None, "batch_size": spec.get("batch_size", 32),
            "lr": float(opt.get("lr", 0.01)), "momentum": float(opt.get("momentum", 0.0))}


def _canonical(raw: dict) -> dict:
    """Resolve defaults and fix the axes a path does not use."""
    c = dict(raw)
    c["model"] = c["model"] or ("cifar_tutorial" if c["dataset"] == "cifar10" else "mnist_small")
    defaults = _preset_defaults(c["model"])
    for k in ("filters", "batch_size", "lr", "momentum"):
        if c[k] is None:
            c[k] = defaults[k]
    full_train, full_test = DATASET_SIZES[c["dataset"]]
    if c["dataset"] in SYNTHETIC:  # generated: any size is available
        c["train_size"] = c["train_size"] or full_train
        c["test_size"] = c["test_size"] or full_test
    else:
        c["train_size"] = min(c["train_size"] or full_train, full_train)
        c["test_size"] = min(c["test_size"] or full_test, full_test)
    path = c["path"]
    if path == "threads":
        c["strategy"] = c["strategy"] or "sync"
        c["backend"] = c["backend"] or "numpy"
        if c["strategy"] not in THREAD_STRATEGIES:
            raise ValueError(f"grid axis 'strategy': path 'threads' takes one of "
                             f"{list(THREAD_STRATEGIES)}; received strategy={c['strategy']!r}")
        if c["backend"] not in THREAD_BACKENDS:
            raise ValueError(f"grid axis 'backend': path 'threads' runs over one of "
                             f"{list(THREAD_BACKENDS)}; received backend={c['backend']!r}")
    else:
        c["strategy"] = "sequential"
        c["backend"] = {"sequential": "numpy", "numba": "numba", "numba_parallel": "numba_parallel",
                        "cuda": "cuda", "keras": "tensorflow"}[path]
        if path in ("sequential", "numba", "cuda"):
            c["threads"] = 1
    if path != "cuda":
        c["cuda_simulator"] = False
    return c


def _variant(cfg: dict, sep: str = "/") -> str:
    """The path, with strategy and backend for path "threads"."""
    if cfg["path"] != "threads":
        return cfg["path"]
    return sep.join(("threads", cfg["strategy"], cfg["backend"]))


def _run_key(cfg: dict) -> str:
    ident = {k: cfg[k] for k in CONFIG_FIELDS}
    digest = hashlib.sha1(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:10]
    variant = _variant(cfg, ".")
    return (f"{cfg['dataset']}.{cfg['model']}.{variant}.t{cfg['threads']}.b{cfg['batch_size']}"
            f".f{cfg['filters']}.e{cfg['epochs']}.n{cfg['train_size']}.r{cfg['repeat']}-{digest}")


@lru_cache(maxsize=1)
def gpu_available() -> bool:
    """True when a CUDA GPU is usable (checked in a child process, so the caller's process never
    creates a CUDA context); False at once on machines without the NVIDIA driver."""
    if not (Path("/proc/driver/nvidia").exists() or shutil.which("nvidia-smi")):
        return False
    try:
        out = subprocess.run([sys.executable, "-c",
                              "from numba import cuda; print(cuda.is_available())"],
                             capture_output=True, text=True, timeout=120, env=_child_env({}))
        return out.stdout.strip().endswith("True")
    except (OSError, subprocess.SubprocessError):
        return False


def expand_grid(grid="quick", *, gpu: bool | None = None,
                include_unavailable: bool = False) -> list[dict]:
    """The runs of ``grid`` (a profile name, a dict or a list of dicts; see the module doc).

    Returns one dict per run, in execution order (all configurations' repeat 0, then repeat 1,
    ...), with the resolved configuration (``CONFIG_FIELDS``), ``run_key`` and ``timeout``.
    Path "cuda" runs are dropped unless a GPU is present (``gpu``; None detects it) or their
    grid sets ``cuda_simulator=True``; ``include_unavailable=True`` keeps them.
    """
    configs: dict[str, dict] = {}
    for sub in _as_subgrids(grid):
        unknown = sorted(set(sub) - set(LIST_AXES) - set(SETTINGS))
        if unknown:
            raise ValueError(f"unknown grid axis {unknown[0]!r}; valid axes are "
                             f"{list(LIST_AXES) + list(SETTINGS)}")
        values = {}
        for axis in LIST_AXES:
            v = sub.get(axis, GRID_DEFAULTS[axis])
            vs = list(v) if isinstance(v, (list, tuple)) else [v]
            if not vs:
                raise ValueError(f"grid axis {axis!r}: empty list of values")
            values[axis] = [_check_value(axis, x) for x in vs]
        settings = {}
        for axis in SETTINGS:
            v = sub.get(axis, GRID_DEFAULTS[axis])
            if isinstance(v, (list, tuple)):
                raise ValueError(f"grid axis {axis!r} is a setting: give one value per "
                                 f"sub-grid, not a list; received {v!r}")
            settings[axis] = _check_value(axis, v)
        for combo in itertools.product(*(values[a] for a in LIST_AXES)):
            raw = dict(zip(LIST_AXES, combo), cuda_simulator=settings["cuda_simulator"])
            c = _canonical(raw)
            ident = json.dumps({k: c[k] for k in CONFIG_FIELDS if k != "repeat"}, sort_keys=True)
            if ident in configs:  # the same configuration from another sub-grid or a fixed axis
                prev = configs[ident]
                prev["repeats"] = max(prev["repeats"], settings["repeats"])
                prev["timeout"] = max(prev["timeout"], settings["timeout"])
            else:
                configs[ident] = {**c, "repeats": settings["repeats"],
                                  "timeout": settings["timeout"]}
    runs = []
    max_repeats = max(c["repeats"] for c in configs.values())
    base = list(configs.values())
    needs_gpu = any(c["path"] == "cuda" and not c["cuda_simulator"] for c in base)
    if needs_gpu and not include_unavailable:
        has_gpu = gpu_available() if gpu is None else gpu
        if not has_gpu:
            base = [c for c in base if c["path"] != "cuda" or c["cuda_simulator"]]
    for r in range(max_repeats):
        for c in base:
            if r < c["repeats"]:
                run = {k: c[k] for k in CONFIG_FIELDS if k != "repeat"}
                run["repeat"] = r
                run["seed"] = c["seed"] + r
                run = {k: run[k] for k in CONFIG_FIELDS}
                run["run_key"] = _run_key(run)
                run["timeout"] = c["timeout"]
                runs.append(run)
    return runs


# ---- the child: one run in a fresh interpreter ----------------------------------------------
def _package_root() -> str:
    return str(Path(__file__).resolve().parent.parent)


def _child_env(cfg: dict, numba_cache: Path | None = None) -> dict:
    """The child's environment, complete before its interpreter starts (numba and TensorFlow
    read these variables at import)."""
    env = dict(os.environ)
    if numba_cache is not None:
        env["NUMBA_CACHE_DIR"] = str(numba_cache)  # the study's own JIT cache
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    env["PYTHONUNBUFFERED"] = "1"
    if cfg.get("path") == "numba_parallel":
        env["NUMBA_NUM_THREADS"] = str(cfg["threads"])
    if cfg.get("cuda_simulator"):
        env["NUMBA_ENABLE_CUDASIM"] = "1"
    return env


def _finite(v):
    try:
        v = float(v)
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) else None


def _device(cfg: dict) -> str:
    if cfg["path"] != "cuda":
        return "cpu"
    if cfg.get("cuda_simulator"):
        return "cuda-simulator"
    try:
        from numba import cuda
        name = cuda.get_current_device().name
        return name.decode() if isinstance(name, bytes) else str(name)
    except Exception:  # the name is a nicety; never fail a run for it
        return "cuda"


def execute_run(cfg: dict, data_root=None, download: bool = True) -> dict:
    """Train one configuration in this process and return its measurements (JSON-able).

    The study calls this in a fresh child process (see the module doc); calling it directly
    is for debugging only, since nothing then isolates runs from each other.
    """
    import numpy as np

    from .data import load_dataset
    from .model import Sequential, resolve_spec
    from .presets import with_filters

    dtype = np.dtype(cfg["dtype"])
    t = time.perf_counter()
    data = load_dataset(cfg["dataset"], root=data_root, limit=cfg["train_size"],
                        test_limit=cfg["test_size"], seed=0, dtype=dtype, download=download)
    load_time = time.perf_counter() - t
    spec = with_filters(resolve_spec(cfg["model"]), cfg["filters"])
    backend = "numpy" if cfg["path"] == "keras" else cfg["backend"]
    model = Sequential.from_spec(spec, input_shape=data.input_shape, dtype=dtype,
                                 seed=cfg["seed"], backend=backend)
    optimizer = {**spec.get("optimizer", {"type": "sgd"}), "lr": cfg["lr"],
                 "momentum": cfg["momentum"]}
    common = dict(epochs=cfg["epochs"], batch_size=cfg["batch_size"], optimizer=optimizer,
                  seed=cfg["seed"], validation_data=(data.x_test, data.y_test), verbose=0)
    if cfg["path"] == "keras":
        from .keras_reference import fit_keras
        hist = fit_keras(model, data.x_train, data.y_train, threads=cfg["threads"], **common)
    else:
        from .train import fit
        # numba_parallel: the threads are NUMBA_NUM_THREADS inside the kernels, one worker
        workers = cfg["threads"] if cfg["path"] == "threads" else 1
        hist = fit(model, data.x_train, data.y_train, strategy=cfg["strategy"], threads=workers,
                   backend=backend, blas_threads=1, **common)
    h = hist.history
    epochs = len(h.get("epoch", h.get("loss", [])))
    per_epoch = []
    for i in range(epochs):
        row = {col: (_finite(h[key][i]) if key in h and i < len(h[key]) else None)
               for key, col in _HISTORY_TO_COLUMN.items()}
        row["epoch"] = int(h["epoch"][i]) if "epoch" in h else i + 1
        per_epoch.append(row)
    return {"epochs": per_epoch, "compile_time": _finite(hist.info.get("compile_time")),
            "num_params": int(model.num_params), "train_size": int(len(data.x_train)),
            "test_size": int(len(data.x_test)), "load_time": load_time, "device": _device(cfg)}


def _write_json(path: Path, obj) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj))
    os.replace(tmp, path)


def _child_main(config_path: str, result_path: str) -> int:
    """Entry point of ``python -m cnn.study --run-json CONFIG --result RESULT``."""
    payload = json.loads(Path(config_path).read_text())
    cfg = payload["config"]
    source = source_hash()  # the code this run imports, hashed before it trains
    result: dict[str, Any] = {"status": "ok", "error": ""}
    try:
        result.update(execute_run(cfg, payload.get("data_root"), payload.get("download", True)))
    except KeyboardInterrupt:
        return 130
    except BaseException as err:  # noqa: BLE001 - every failure becomes a 'failed' row
        traceback.print_exc()
        result = {"status": "failed", "error": f"{type(err).__name__}: {err}".strip()}
    try:
        from .machine import machine_info
        result["machine"] = dict(machine_info())
    except Exception as err:  # noqa: BLE001
        result["machine"] = {"cpu": f"unknown ({err})"}
    result["machine"]["source_hash"] = source
    _write_json(Path(result_path), result)
    return 0


def source_hash() -> str:
    """SHA-1 (12 hex digits) of the package's Python sources: tells runs apart that ran on
    different code under one "-dirty" git commit."""
    root = Path(__file__).resolve().parent
    digest = hashlib.sha1()
    for path in sorted(root.rglob("*.py")):
        digest.update(str(path.relative_to(root)).encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()[:12]


# ---- the parent: run, record, resume --------------------------------------------------------
@lru_cache(maxsize=1)
def _parent_machine() -> dict:
    from .machine import machine_info
    return dict(machine_info())


def _tail(text: str, lines: int = 200) -> str:
    return "\n".join(text.strip().splitlines()[-lines:])


def _launch(cfg: dict, data_root, download: bool, jit_cache: Path | None = None
            ) -> tuple[dict, float, str]:
    """Run one configuration in a child; returns (result, wall seconds, child output tail)."""
    with tempfile.TemporaryDirectory(prefix="cnn-study-") as tmp:
        cfg_path, res_path = Path(tmp) / "config.json", Path(tmp) / "result.json"
        root = None if data_root is None else str(data_root)
        cfg_path.write_text(json.dumps({"config": cfg, "download": download, "data_root": root}))
        cmd = [sys.executable, "-m", "cnn.study", "--run-json", str(cfg_path),
               "--result", str(res_path)]
        t = time.perf_counter()
        try:
            proc = subprocess.run(cmd, env=_child_env(cfg, numba_cache=jit_cache),
                                  cwd=_package_root(),
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                  timeout=cfg.get("timeout", DEFAULT_TIMEOUT))
            output, code = proc.stdout or "", proc.returncode
        except subprocess.TimeoutExpired as err:  # run() has killed the child
            wall = time.perf_counter() - t
            out = err.output or ""
            out = out.decode(errors="replace") if isinstance(out, bytes) else out
            return ({"status": "failed",
                     "error": f"TimeoutError: the run exceeded its timeout of "
                              f"{cfg.get('timeout', DEFAULT_TIMEOUT):g} s and was killed"},
                    wall, _tail(out))
        wall = time.perf_counter() - t
        if res_path.is_file():
            return json.loads(res_path.read_text()), wall, _tail(output)
        if code == 130:
            raise KeyboardInterrupt
        last = _tail(output, 1) or "no output"
        return ({"status": "failed",
                 "error": f"ChildProcessError: the run's process exited with code {code} without "
                          f"a result ({last})"}, wall, _tail(output))


#: backends whose kernels are JIT-compiled and cached on disk by Numba
JIT_BACKENDS = ("numba", "numba_parallel", "cuda")


def _jit_key(cfg: dict):
    """``(backend, dtype)`` when the run's kernels are JIT-compiled, else None."""
    return (cfg["backend"], cfg["dtype"]) if cfg["backend"] in JIT_BACKENDS else None


def _warm_jit(jit: tuple, jit_cache: Path, timeout: float = DEFAULT_TIMEOUT):
    """Compile ``(backend, dtype)``'s kernels into the empty study cache in a child process.
    Returns (cold compile seconds or None, a message)."""
    backend, dtype = jit
    cfg = {"path": "numba_parallel" if backend == "numba_parallel" else backend, "threads": 1,
           "cuda_simulator": False}
    with tempfile.TemporaryDirectory(prefix="cnn-study-") as tmp:
        res_path = Path(tmp) / "result.json"
        cmd = [sys.executable, "-m", "cnn.study", "--warmup", backend, dtype,
               "--result", str(res_path)]
        try:
            proc = subprocess.run(cmd, env=_child_env(cfg, numba_cache=jit_cache),
                                  cwd=_package_root(), stdout=subprocess.PIPE,
                                  stderr=subprocess.STDOUT, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            return None, f"timed out after {timeout:g} s; the runs will compile for themselves"
        if not res_path.is_file():
            return None, (f"failed ({_tail(proc.stdout, 1) or proc.returncode}); the runs will "
                          f"compile for themselves")
        result = json.loads(res_path.read_text())
    if result.get("error"):
        return None, f"failed ({result['error']})"
    seconds = result.get("seconds")
    return seconds, (f"{seconds:.1f} s" if seconds is not None else "nothing to compile")


def _warmup_main(backend: str, dtype: str, result_path: str) -> int:
    """Entry point of ``python -m cnn.study --warmup BACKEND DTYPE --result RESULT``: compile
    the backend's kernels (import excluded from the time) into ``$NUMBA_CACHE_DIR``."""
    result: dict[str, Any] = {}
    try:
        import numpy as np

        from .backends import get_backend
        be = get_backend(backend)  # imports numba: not compile time
        if hasattr(be, "warmup"):
            t = time.perf_counter()
            be.warmup(np.dtype(dtype))
            result["seconds"] = time.perf_counter() - t
        else:
            result["seconds"] = None
    except Exception as err:  # noqa: BLE001
        traceback.print_exc()
        result["error"] = f"{type(err).__name__}: {err}"
    _write_json(Path(result_path), result)
    return 0


def _where(output: str) -> str:
    """``file:line in function`` of the deepest traceback frame inside this package."""
    import re
    root = _package_root() + os.sep
    frames = re.findall(r'File "([^"]+)", line (\d+), in (\S+)', output or "")
    ours = [f for f in frames if f[0].startswith(root)]
    if not ours:
        return ""
    path, line, func = ours[-1]
    return f"{path[len(root):]}:{line} in {func}"


def _rows(cfg: dict, result: dict, started_at: str, run_time: float,
          cold_compile_time: float | None = None) -> list[dict]:
    base = {"run_key": cfg["run_key"], "status": result.get("status", "failed"),
            "error": result.get("error", "")}
    base.update({k: cfg[k] for k in CONFIG_FIELDS})
    for k in ("train_size", "test_size"):
        if result.get(k) is not None:
            base[k] = result[k]  # what was actually used
    epochs = result.get("epochs") or []
    final = epochs[-1].get("test_accuracy") if epochs else None
    run = {"compile_time": result.get("compile_time"), "cold_compile_time": cold_compile_time,
           "final_test_accuracy": final,
           "num_params": result.get("num_params"), "load_time": result.get("load_time"),
           "run_time": run_time, "started_at": started_at,
           "device": result.get("device", "cpu" if cfg["path"] != "cuda" else "cuda")}
    machine = result.get("machine") or {**_parent_machine(), "source_hash": source_hash()}
    mach = {k: machine.get(k) for k in MACHINE_COLUMNS}
    if base["status"] == "ok" and not epochs:
        base.update(status="failed", error="RuntimeError: the run recorded no epochs")
    if base["status"] != "ok":
        epochs = [{}]  # one row for a failed run, measurements missing
    return [{**base, **{k: e.get(k) for k in EPOCH_FIELDS}, **run, **mach} for e in epochs]


def _typed(df):
    """Apply the schema's column order and dtypes."""
    import pandas as pd
    for col in COLUMNS:
        if col not in df:
            df[col] = None
    extra = [c for c in df.columns if c not in COLUMNS]
    df = df[list(COLUMNS) + extra].copy()
    for col in _INT_COLUMNS:
        df[col] = pd.to_numeric(df[col]).astype("int64")
    for col in _NULLABLE_INT_COLUMNS:
        df[col] = pd.to_numeric(df[col]).astype("Int64")
    for col in _FLOAT_COLUMNS:
        df[col] = pd.to_numeric(df[col]).astype("float64")
    df["cuda_simulator"] = df["cuda_simulator"].astype(bool)
    strings = [c for c in COLUMNS if c not in _INT_COLUMNS + _NULLABLE_INT_COLUMNS
               + _FLOAT_COLUMNS + ("cuda_simulator",)]
    for col in strings:
        df[col] = df[col].map(lambda v: "" if v is None or (isinstance(v, float) and math.isnan(v))
                              else str(v)).astype(str)
    return df.reset_index(drop=True)


def empty_results():
    """An empty DataFrame with the schema's columns and dtypes."""
    import pandas as pd
    return _typed(pd.DataFrame(columns=list(COLUMNS)))


def load_results(path=DEFAULT_RESULTS):
    """The study DataFrame pickled at ``path`` (an empty one with the schema if none)."""
    import pandas as pd
    path = Path(path)
    if not path.is_file():
        return empty_results()
    df = pd.read_pickle(path)
    missing = [c for c in ("run_key", "status") if c not in df]
    if missing:
        raise ValueError(f"{path} is not a study results file: columns {missing} are missing")
    return df


def save_results(df, path=DEFAULT_RESULTS) -> Path:
    """Pickle ``df`` to ``path`` atomically: a temporary file in the same folder, then
    ``os.replace``, so readers and crashes only ever see the old or the new file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")  # same folder: same file system
    try:
        df.to_pickle(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def _fmt_run(cfg: dict) -> str:
    variant = _variant(cfg)
    return (f"{cfg['dataset']} {variant} t{cfg['threads']} b{cfg['batch_size']} "
            f"f{cfg['filters']} e{cfg['epochs']} n{cfg['train_size']} r{cfg['repeat']}")


def _summary_line(rows: list[dict], wall: float) -> str:
    first = rows[0]
    if first["status"] != "ok":
        return f"FAILED after {wall:.1f} s: {first['error']}"
    ips = [r["images_per_sec"] for r in rows if r["images_per_sec"] is not None]
    acc = first["final_test_accuracy"]
    ips_txt = f"{sorted(ips)[len(ips) // 2]:,.0f} img/s" if ips else "? img/s"
    acc_txt = f"{acc:.4f}" if acc is not None else "?"
    return f"ok in {wall:.1f} s: {ips_txt}, test acc {acc_txt}"


def run_study(grid_or_profile="quick", out=DEFAULT_RESULTS, data_root=None,
              progress: bool | Callable[[dict], None] = True, retry_failed: bool = True,
              download: bool = True, timeout: float | None = None, gpu: bool | None = None):
    """Run every run of the grid not already done in ``out``; return the whole DataFrame.

    Args:
        grid_or_profile: a name in :data:`PROFILES` or a grid (see the module doc).
        out: the results pickle; rewritten atomically after every run.
        data_root: where MNIST / CIFAR-10 live (default ``$CNN_DATA_DIR`` or the cache).
        progress: True prints one line per run; a callable receives, after each run is
            saved, ``{"index", "total", "config", "rows", "wall"}`` (raising from it stops the
            study, with every finished run kept).
        retry_failed: rerun runs recorded as failed (default) instead of skipping them.
        download: let the loaders download missing data sets.
        timeout: per-run timeout in seconds, overriding the grid's.
        gpu: whether a GPU is present (None detects it), for path "cuda".
    Returns:
        every row in ``out`` after the study (earlier rows included), typed per the schema.
    """
    out = Path(out)
    say = print if progress is True else (lambda *a, **k: None)
    runs = expand_grid(grid_or_profile, gpu=gpu)
    everything = expand_grid(grid_or_profile, gpu=gpu, include_unavailable=True)
    if len(everything) > len(runs):
        say(f"skipping {len(everything) - len(runs)} run(s) of path 'cuda': no GPU on this "
            f"machine (set cuda_simulator=True in a grid to use the simulator); nothing is "
            f"recorded for them")
    df = load_results(out)
    ok = set(df.loc[df["status"] == "ok", "run_key"])
    done_keys = ok if retry_failed else set(df["run_key"])
    todo = [r for r in runs if r["run_key"] not in done_keys]
    say(f"study: {len(runs)} runs, {len(runs) - len(todo)} already in {out}, {len(todo)} to run")
    if todo:
        _preflight(todo, data_root, download)
    jit_cache = Path(tempfile.mkdtemp(prefix="cnn-study-jit-"))
    cold: dict[tuple, float | None] = {}
    try:
        _run_all(todo, df, out, data_root, download, timeout, progress, say, jit_cache, cold)
    finally:
        shutil.rmtree(jit_cache, ignore_errors=True)
    df = _typed(load_results(out))
    if todo:
        n_failed = int((df[df["run_key"].isin([r["run_key"] for r in runs])]
                        .drop_duplicates("run_key")["status"] != "ok").sum())
        say(f"study done: {len(todo)} run(s) this time, {n_failed} failed in this grid; "
            f"results in {out.resolve()}")
    return df


def _run_all(todo, df, out, data_root, download, timeout, progress, say, jit_cache, cold):
    import pandas as pd
    for i, cfg in enumerate(todo, 1):
        if timeout is not None:
            cfg = {**cfg, "timeout": float(timeout)}
        jit = _jit_key(cfg)
        if jit is not None and jit not in cold:
            say(f"compiling the {jit[0]} kernels ({jit[1]}) into the study's JIT cache ...",
                end="", flush=True)
            cold[jit], message = _warm_jit(jit, jit_cache)
            say(f" {message}", flush=True)
        started = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
        say(f"[{i}/{len(todo)}] {_fmt_run(cfg)} ...", end="", flush=True)
        result, wall, output = _launch(cfg, data_root, download, jit_cache)
        rows = _rows(cfg, result, started, wall, cold.get(jit))
        new = _typed(pd.DataFrame(rows))
        kept = df[df["run_key"] != cfg["run_key"]]
        df = _typed(pd.concat([kept, new], ignore_index=True)) if len(kept) else new
        save_results(df, out)
        say(" " + _summary_line(rows, wall), flush=True)
        if rows[0]["status"] != "ok" and (where := _where(output)):
            say(f"    raised at {where}", flush=True)
        if callable(progress):
            progress({"index": i, "total": len(todo), "config": cfg, "rows": rows, "wall": wall})


def _preflight(runs: list[dict], data_root, download: bool) -> None:
    """Fail early, before any run, when a real data set is missing (downloading it once here
    rather than in every child)."""
    from .data import load_dataset
    for name in sorted({r["dataset"] for r in runs} - set(SYNTHETIC) - {"mnist_embedded"}):
        load_dataset(name, root=data_root, limit=1, test_limit=1, download=download)


# ---- summaries and estimates ----------------------------------------------------------------
def summarize(df, by=("dataset", "model", "path", "strategy", "backend", "threads",
                      "batch_size", "filters")):
    """Per configuration: runs, median images/s (epochs after the first excluded when there are
    several, so warm-up does not count), speed-up over the sequential path with the same
    dataset, model, batch size, filters, epochs and train size, and the median final test
    accuracy. Only status "ok" rows count."""
    import pandas as pd
    by = list(by)
    ok = df[df["status"] == "ok"]
    if ok.empty:
        return pd.DataFrame(columns=by + ["runs", "images_per_sec", "speedup",
                                          "final_test_accuracy"])
    steady = ok[(ok["epoch"] > 1) | (ok["epochs"] == 1)]
    per_run = (steady.groupby("run_key")
               .agg(images_per_sec=("images_per_sec", "median"),
                    final_test_accuracy=("final_test_accuracy", "first"),
                    **{c: (c, "first") for c in set(by) | {"epochs", "train_size"}}))
    table = (per_run.groupby(by + ["epochs", "train_size"], dropna=False)
             .agg(runs=("images_per_sec", "size"), images_per_sec=("images_per_sec", "median"),
                  final_test_accuracy=("final_test_accuracy", "median"))
             .reset_index())
    match = [c for c in ("dataset", "model", "batch_size", "filters", "epochs", "train_size")
             if c in table]
    base = (table[table["path"] == "sequential"][match + ["images_per_sec"]]
            .rename(columns={"images_per_sec": "_seq"}))
    table = table.merge(base, on=match, how="left")
    table["speedup"] = table["images_per_sec"] / table["_seq"]
    cols = by + ["epochs", "train_size", "runs", "images_per_sec", "speedup",
                 "final_test_accuracy"]
    return table[cols].sort_values(by).reset_index(drop=True)


#: images/s of the sequential path (numpy, 1 thread, batch 32) on the 2-core development
#: machine (AMD EPYC, OpenBLAS), by model and first-layer filters; evaluation runs ~2.5x faster.
#: Only for --dry-run estimates when no measured results match.
REFERENCE_IPS = {"mnist_small": {4: 33000, 8: 21000, 16: 9000, 32: 4300},
                 "cifar_tutorial": {16: 1650, 32: 720, 64: 590}}
#: guessed speed relative to sequential until measured (results of an earlier study replace it)
DEFAULT_SPEEDUP = {"sequential": 1.0, "threads": 1.3, "numba": 1.0, "numba_parallel": 1.3,
                   "cuda": 5.0, "keras": 3.0}
#: seconds per run outside the epochs: interpreter start, imports (TensorFlow), data loading
OVERHEAD = {"base": 2.0, "mnist": 2.0, "cifar10": 3.0, "keras": 12.0, "numba": 2.0,
            "numba_parallel": 2.0, "cuda": 5.0}
#: seconds of the one-off cold compile per JIT backend and dtype (see Isolation)
COLD_COMPILE = {"numba": 40.0, "numba_parallel": 60.0, "cuda": 30.0}


def _reference_ips(model: str, filters: int) -> float:
    table = REFERENCE_IPS.get(model, {8: 3000})
    keys = sorted(table)
    if filters in table:
        return float(table[filters])
    lo = max([k for k in keys if k < filters], default=keys[0])
    hi = min([k for k in keys if k > filters], default=keys[-1])
    if lo == hi:
        return table[lo] * (lo / filters) ** 0.8
    w = (math.log(filters) - math.log(lo)) / (math.log(hi) - math.log(lo))
    return math.exp((1 - w) * math.log(table[lo]) + w * math.log(table[hi]))


def estimate_seconds(runs: list[dict], calibration=None) -> list[float]:
    """Rough wall time of each run (the first run of each JIT backend also carries the study's
    one-off cold compile). With ``calibration`` (a results DataFrame), a run whose
    configuration (model, path, strategy, backend, threads, batch, filters) was measured takes
    its median images/s, eval speed and overhead; other runs use the reference throughput of
    their model times the speed-up measured for their path in the calibration data (else a
    guess), plus a fixed overhead."""
    cols = ["model", "path", "strategy", "backend", "threads", "batch_size", "filters"]
    measured, speedups, overheads = {}, {}, {}
    if calibration is not None and len(calibration):
        ok = calibration[calibration["status"] == "ok"]
        if len(ok):
            per_run = ok.groupby("run_key").agg(
                **{c: (c, "first") for c in cols + ["dataset", "train_size", "test_size",
                                                    "run_time", "compile_time"]},
                ips=("images_per_sec", "median"), train=("time", "sum"),
                evals=("eval_time", "sum"), epochs=("epoch", "count"))
            per_run["eval_ips"] = per_run["test_size"] * per_run["epochs"] / per_run["evals"]
            per_run["overhead"] = per_run["run_time"] - per_run["train"] - per_run["evals"]
            for key, g in per_run.groupby(cols):
                measured[key] = (g["ips"].median(), g["eval_ips"].median())
            seq = per_run[per_run["path"] == "sequential"].groupby(
                ["model", "batch_size", "filters"])["ips"].median()
            for key, g in per_run.groupby(["path", "strategy", "backend", "threads"]):
                ratios = [r.ips / seq[(r.model, r.batch_size, r.filters)]
                          for r in g.itertuples() if (r.model, r.batch_size, r.filters) in seq]
                if ratios:
                    speedups[key] = sorted(ratios)[len(ratios) // 2]
                overheads[key[0]] = float(g["overhead"].median())
    out, compiled = [], set()
    for r in runs:
        jit = _jit_key(r)
        cold = 0.0
        if jit is not None and jit not in compiled:
            compiled.add(jit)
            cold = COLD_COMPILE.get(r["backend"], 30.0)
        key = tuple(r[c] for c in cols)
        if key in measured:
            ips, eval_ips = measured[key]
        else:
            s = speedups.get((r["path"], r["strategy"], r["backend"], r["threads"]),
                             DEFAULT_SPEEDUP[r["path"]])
            ips = _reference_ips(r["model"], r["filters"]) * s
            eval_ips = 2.5 * ips
        overhead = overheads.get(r["path"])
        if overhead is None:
            overhead = OVERHEAD["base"] + OVERHEAD.get(r["path"], 0.0)
        overhead += OVERHEAD.get(r["dataset"], 0.0)
        out.append(cold + overhead
                   + r["epochs"] * (r["train_size"] / ips + r["test_size"] / eval_ips))
    return out


def describe_plan(grid_or_profile="quick", calibration=None, gpu: bool | None = None,
                  out=None) -> str:
    """A text plan: run counts per dataset/path, cuda runs skipped, and a time estimate."""
    runs = expand_grid(grid_or_profile, gpu=gpu)
    everything = expand_grid(grid_or_profile, gpu=gpu, include_unavailable=True)
    est = estimate_seconds(runs, calibration)
    configs = {tuple(v for k, v in r.items() if k not in ("repeat", "seed", "run_key"))
               for r in runs}
    lines = [f"{len(runs)} runs ({len(configs)} configurations x repeats)"]
    groups: dict[tuple, list] = {}
    for r, s in zip(runs, est):
        variant = _variant(r)
        groups.setdefault((r["dataset"], r["train_size"], variant), []).append(s)
    for (ds, n, variant), secs in groups.items():
        lines.append(f"  {ds:<15} n={n:<6} {variant:<24} {len(secs):>3} runs  "
                     f"~{sum(secs) / 60:6.1f} min")
    if len(everything) > len(runs):
        lines.append(f"  skipped: {len(everything) - len(runs)} cuda run(s), no GPU on this "
                     f"machine (nothing will be recorded for them)")
    if grid_or_profile == "full":
        lines.append("  " + FULL_NOTES)
    if out is not None:
        done = load_results(out)
        ok = set(done.loc[done["status"] == "ok", "run_key"])
        remaining = [s for r, s in zip(runs, est) if r["run_key"] not in ok]
        lines.append(f"already done in {out}: {len(runs) - len(remaining)} runs")
        est = remaining
    total = sum(est)
    basis = "calibrated on earlier results" if calibration is not None and len(calibration) \
        else "reference throughput of the development machine, guessed speed-ups"
    lines.append(f"estimated wall time: {total / 60:.0f} min ({total / 3600:.1f} h; {basis})")
    return "\n".join(lines)


# ---- command line ---------------------------------------------------------------------------
def add_arguments(p: argparse.ArgumentParser) -> None:
    """The ``study`` command's options (shared by ``python -m cnn study`` and this module)."""
    g = p.add_mutually_exclusive_group()
    g.add_argument("--profile", default="quick", choices=sorted(PROFILES),
                   help="named grid (default quick: offline, a few minutes)")
    g.add_argument("--grid", default=None, help="a grid as a .json or .yaml file instead")
    p.add_argument("--data-dir", default=None,
                   help="data root with mnist/ and cifar-10-batches-py/ (default $CNN_DATA_DIR)")
    p.add_argument("--out", default=str(DEFAULT_RESULTS),
                   help="results pickle (default %(default)s)")
    p.add_argument("--dry-run", action="store_true", help="print the plan and a time estimate")
    p.add_argument("--calibrate", default=None,
                   help="results pickle whose measurements refine the --dry-run estimate "
                        f"(default: --out, else {QUICK_RESULTS}, when it exists)")
    p.add_argument("--timeout", type=float, default=None, help="per-run timeout in seconds")
    p.add_argument("--no-retry-failed", action="store_true", help="skip runs recorded as failed")
    p.add_argument("--no-download", action="store_true", help="never download data sets")


def _read_grid(path: str):
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"no grid file at {p}")
    if p.suffix.lower() in (".yaml", ".yml"):
        import yaml
        return yaml.safe_load(p.read_text())
    return json.loads(p.read_text())


def command(args) -> int:
    """Run the ``study`` command from parsed arguments."""
    grid = _read_grid(args.grid) if args.grid else args.profile
    if args.dry_run:
        calib_path = args.calibrate or next(
            (p for p in (args.out, QUICK_RESULTS) if Path(p).is_file()), None)
        calibration = load_results(calib_path) if calib_path else None
        print(describe_plan(grid, calibration, out=args.out))
        if calib_path:
            print(f"(estimate calibrated on {calib_path})")
        return 0
    import signal

    def _terminate(signum, frame):  # a kill ends the child too, like Ctrl-C
        raise KeyboardInterrupt
    if hasattr(signal, "SIGTERM"):
        signal.signal(signal.SIGTERM, _terminate)
    t = time.perf_counter()
    try:
        run_study(grid, out=args.out, data_root=args.data_dir, progress=True,
                  retry_failed=not args.no_retry_failed, download=not args.no_download,
                  timeout=args.timeout)
    except KeyboardInterrupt:
        print(f"\ninterrupted: every finished run is kept in {args.out}; run the same command "
              f"again to resume", file=sys.stderr)
        return 130
    print(f"study wall time {time.perf_counter() - t:.0f} s")
    return 0


def main(argv: Iterable[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--warmup" in argv:
        p = argparse.ArgumentParser(prog="python -m cnn.study")
        p.add_argument("--warmup", nargs=2, metavar=("BACKEND", "DTYPE"), required=True)
        p.add_argument("--result", required=True)
        a = p.parse_args(argv)
        return _warmup_main(*a.warmup, a.result)
    if "--run-json" in argv:
        p = argparse.ArgumentParser(prog="python -m cnn.study")
        p.add_argument("--run-json", required=True)
        p.add_argument("--result", required=True)
        a = p.parse_args(argv)
        return _child_main(a.run_json, a.result)
    p = argparse.ArgumentParser(prog="python -m cnn.study", description="run the study")
    add_arguments(p)
    return command(p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
