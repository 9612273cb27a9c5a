"""The results schema and store: the one definition of the study's DataFrame (columns, dtypes)
and of reading and writing it safely.

Schema: one row per (run, epoch)
--------------------------------
A run that did not train to the end (``status`` "failed" or "diverged") has one row, with
``epoch`` missing (<NA>) and the measurements NaN.

Configuration (the same on every row of a run, :data:`CONFIG_FIELDS`):
    run_key (str; stable: readable prefix + hash of the configuration, incl. repeat),
    status (:data:`STATUSES`: "ok", "failed": an exception, a crash or a timeout, "diverged":
    training produced a non-finite loss or weights), error (str; "" when ok, else
    "ExceptionType: message"), dataset, model (preset name), path (a name in
    :data:`cnn.paths.PATHS`), strategy, backend (str), threads (the path's workers, see the
    registry), batch_size, filters, epochs (int), train_size, test_size (int; examples actually
    used), repeat (int, 0-based), dtype (str), seed (int; the run's seed = base seed + repeat),
    lr, momentum (float), cuda_simulator (bool), period (str; ``average``'s averaging period in
    steps or "epoch", "" for other strategies), target (float; the time-to-accuracy target on
    the validation split, NaN when off), eval_every (int; steps between validation
    evaluations, 0 when off), val_size (int; validation examples carved from the end of the
    training split, 0 when off), optimizer (str; the optimizer as ``NAME[:key=value,...]``, ""
    for the preset's), lr_schedule (str; the schedule likewise, "" for a constant rate),
    augment (str; the training data's augmentation as ``pad=4,flip=true``, :mod:`cnn.augment`,
    "" for none), warmup_epochs (int; epochs trained before the ``epochs`` measured ones, whose
    rows are marked ``warmup``; 0 in files from before it was recorded), engine (str; how a
    reference framework ran the model: Keras ``graph`` or ``xla``, PyTorch ``eager``,
    ``channels_last`` or ``compiled``, the registry's ``TrainingPath.engines``; "" for our
    paths), link (str; the emulated cluster's link profile the MPI ranks ran across, one rank
    per host, ``1gbe``, ``10gbe``; "" for every rank on one host).
Per epoch (:data:`EPOCH_FIELDS`):
    epoch (Int64, 1-based), time (float s; training wall time of the epoch = data + transfer +
    compute + comm), compute_time, comm_time (combining gradients or weights between workers:
    the reduce phase of threads and processes, the allreduce of MPI ranks; 0 for one worker,
    NaN in results from before it was measured), data_time (shuffle and batch gather), transfer_time (host->device),
    eval_time (evaluation on the test set, not part of ``time``), images_per_sec
    (train_size / time), train_loss, train_accuracy (running, over the epoch's training
    batches), test_loss, test_accuracy (on the held-out test set after the epoch),
    step_eval_time (seconds of the validation evaluations inside the epoch, not part of
    ``time``), resumed (bool; the epoch was trained by a process that continued the run from
    its backup after the run's process had died, :mod:`cnn.backup`: the study keeps such
    epochs out of its throughput figures, which come from the epochs of the run's first
    process alone; False in files from before it was recorded), warmup (bool; one of the run's
    ``warmup_epochs``: trained, recorded, and kept out of every throughput figure).
Per run (repeated on each of its rows, :data:`RUN_FIELDS`):
    compile_time (s; the run's JIT warm-up before epoch 1, against the study's warm cache;
    0 for numpy), cold_compile_time (s; the one-off compile of the run's backend and dtype
    into the study's empty cache; NaN for paths with nothing to compile), final_test_accuracy
    (test accuracy after the last epoch), num_params (Int64), load_time (s; loading the data in
    the child), run_time (s; wall time of the whole child process as seen by the parent,
    start-up and compile included), started_at (str, ISO 8601 UTC), device ("cpu", the GPU's
    name, or "cuda-simulator"), order_index (Int64; the run's place in the study's randomised
    order), order_seed (Int64; the seed of that order), reduce_time (s; measured cost of one
    step's reduction of ``threads`` gradient copies of the model's size on one thread, for
    paths with several workers; NaN otherwise), tta_status ("" when no target, "reached",
    "not reached"), time_to_target (training seconds until the first evaluation at or above
    the target), steps_to_target, examples_to_target (NaN when not reached), eval_trace (JSON
    ``[[step, examples, training seconds, validation accuracy], ...]``), hosts (str; the MPI
    ranks' host names, comma-separated in rank order; the machine's name for other paths),
    flops_per_image (float; FLOPs of one training image, forward and both gradients of the
    conv and dense layers: :func:`cnn.bench.hardware.training_flops_per_image`).
Machine and software (:data:`MACHINE_COLUMNS`, from :func:`cnn.machine.machine_info`, probed
in the child):
    cpu, cpu_model_number (family, model, stepping), cpu_frequency, cores (int), smt (whether
    the cores are SMT siblings), virtualization (the hypervisor, or "none detected"),
    cpu_caches (the cache sizes, from sysfs), blas (the BLAS library and the kernel it
    picked), mpi_library, sgemm_peak_gflops (float; float32 GEMM rate of BLAS
    on one thread, measured once by the study before its first run), python, platform,
    git_commit ("-dirty" when the work tree had
    uncommitted changes), source_hash (hash of the package's .py files as the run imported
    them), numpy_version, numba_version, numba_cuda_version, tensorflow_version,
    keras_version, threadpoolctl_version, pandas_version, torch_version, mpi4py_version
    (str; a study recorded before a column existed has it missing).

Columns a newer study adds are kept after these (:func:`typed` never drops a column).

The file
--------
The users asked for a pickled pandas DataFrame, and ``pandas.read_pickle(path)`` reads it. The
study appends an integrity record after the pickle (the unpickler stops at the pickle's STOP
opcode and never reads it)::

    <pickle bytes>\\nCNN-RESULTS v1 sha256=<hex digest of the pickle bytes> bytes=<n>\\n

:func:`load_results` checks that record before it unpickles anything, so a torn (cut short),
garbage or foreign file is refused with its name, and it unpickles with an allow-list of the
pandas/numpy classes a DataFrame is made of, so a crafted pickle cannot run code.
:func:`save_results` writes a temporary file in the same folder, fsyncs it, renames it over
the old one and fsyncs the folder: a crash leaves the old file or the new one, never half, and
a run the study has saved survives a power cut. :class:`ResultsLock` is the lock a study holds
on its output for its whole duration.
"""
from __future__ import annotations

import datetime as _dt
import hashlib
import io
import json
import math
import os
import pickle
import re
import sys
import time
from pathlib import Path

from .files import atomic_write

DEFAULT_RESULTS = Path("results") / "df_results.pkl"
#: where ``make study`` puts the quick profile's results
QUICK_RESULTS = Path("results") / "quick" / "df_results.pkl"
#: short timed runs of the third edition's paths and problems (one seed each), which the
#: ``--dry-run`` estimate calibrates on beside the study's own results
CALIBRATION_RESULTS = Path("results") / "calibration" / "df_results.pkl"

#: a run's outcome
STATUSES = ("ok", "failed", "diverged")

CONFIG_FIELDS = ("dataset", "model", "path", "strategy", "backend", "threads", "batch_size",
                 "filters", "epochs", "train_size", "test_size", "repeat", "dtype", "seed", "lr",
                 "momentum", "cuda_simulator", "period", "target", "eval_every", "val_size",
                 "optimizer", "lr_schedule", "augment", "warmup_epochs", "engine", "link")
EPOCH_FIELDS = ("epoch", "time", "compute_time", "data_time", "transfer_time", "eval_time",
                "images_per_sec", "train_loss", "train_accuracy", "test_loss", "test_accuracy",
                "comm_time", "step_eval_time", "resumed", "warmup")
RUN_FIELDS = ("compile_time", "cold_compile_time", "final_test_accuracy", "num_params",
              "load_time", "run_time", "started_at", "device", "order_index", "order_seed",
              "reduce_time", "tta_status", "time_to_target", "steps_to_target",
              "examples_to_target", "eval_trace", "hosts", "flops_per_image")
MACHINE_COLUMNS = ("cpu", "cpu_model_number", "cpu_frequency", "cores", "smt",
                   "virtualization", "cpu_caches", "blas", "mpi_library", "sgemm_peak_gflops",
                   "python", "platform", "git_commit", "source_hash",
                   "numpy_version", "numba_version", "numba_cuda_version", "tensorflow_version",
                   "keras_version", "threadpoolctl_version", "pandas_version", "torch_version",
                   "mpi4py_version")
COLUMNS = (("run_key", "status", "error") + CONFIG_FIELDS + EPOCH_FIELDS + RUN_FIELDS
           + MACHINE_COLUMNS)
INT_COLUMNS = ("threads", "batch_size", "filters", "epochs", "train_size", "test_size",
               "repeat", "seed", "cores", "eval_every", "val_size", "warmup_epochs")
NULLABLE_INT_COLUMNS = ("epoch", "num_params", "order_index", "order_seed")
FLOAT_COLUMNS = ("lr", "momentum", "target", "time", "compute_time", "data_time",
                 "transfer_time", "eval_time", "images_per_sec", "train_loss", "train_accuracy",
                 "test_loss", "test_accuracy", "comm_time", "step_eval_time", "compile_time",
                 "cold_compile_time", "final_test_accuracy", "load_time", "run_time",
                 "reduce_time", "time_to_target", "steps_to_target", "examples_to_target",
                 "flops_per_image", "sgemm_peak_gflops")
#: what a column added after the first edition holds in an older file
FILL = {"eval_every": 0, "val_size": 0, "resumed": False, "warmup_epochs": 0, "warmup": False}
BOOL_COLUMNS = ("cuda_simulator", "resumed", "warmup")
STRING_COLUMNS = tuple(c for c in COLUMNS if c not in INT_COLUMNS + NULLABLE_INT_COLUMNS
                       + FLOAT_COLUMNS + BOOL_COLUMNS)
#: the columns without which a file is not a study results file
REQUIRED_COLUMNS = ("run_key", "status", "error", "dataset", "model", "path", "strategy",
                    "backend", "threads", "batch_size", "filters", "train_size", "dtype",
                    "repeat", "seed", "epoch", "time", "compute_time", "data_time",
                    "transfer_time", "eval_time", "compile_time", "images_per_sec",
                    "test_accuracy", "final_test_accuracy")

DTYPES = {**{c: "int64" for c in INT_COLUMNS}, **{c: "Int64" for c in NULLABLE_INT_COLUMNS},
          **{c: "float64" for c in FLOAT_COLUMNS}, **{c: "bool" for c in BOOL_COLUMNS},
          **{c: "str" for c in STRING_COLUMNS}}


class ResultsFileError(ValueError):
    """A results file that cannot be used: torn, garbage, foreign or of the wrong shape. The
    message names the file."""


class StudyLockedError(RuntimeError):
    """Another study holds the lock on the same results file."""


# ---- the schema -----------------------------------------------------------------------------
def typed(df):
    """``df`` with the schema's columns (missing ones added empty) in order, then any extra
    columns, each with the schema's dtype."""
    import pandas as pd
    df = df.copy()
    for col in COLUMNS:
        if col not in df:
            df[col] = None
    extra = [c for c in df.columns if c not in COLUMNS]
    df = df[list(COLUMNS) + extra]
    for col, value in FILL.items():
        df[col] = df[col].fillna(value) if df[col].dtype != object else \
            df[col].map(lambda v: value if v is None or v != v else v)
    for col in INT_COLUMNS:
        df[col] = pd.to_numeric(df[col]).astype("int64")
    for col in NULLABLE_INT_COLUMNS:
        df[col] = pd.to_numeric(df[col]).astype("Int64")
    for col in FLOAT_COLUMNS:
        df[col] = pd.to_numeric(df[col]).astype("float64")
    for col in BOOL_COLUMNS:
        df[col] = df[col].fillna(False).astype(bool)
    for col in STRING_COLUMNS:
        df[col] = df[col].map(lambda v: "" if v is None or (isinstance(v, float) and math.isnan(v))
                              else str(v)).astype(str)
    return df.reset_index(drop=True)


def empty_results():
    """An empty DataFrame with the schema's columns and dtypes."""
    import pandas as pd
    return typed(pd.DataFrame(columns=list(COLUMNS)))


def check_columns(df, path) -> None:
    missing = [c for c in REQUIRED_COLUMNS if c not in df.columns]
    if missing:
        raise ResultsFileError(f"{path} is not a study results file: it lacks the columns "
                               f"{missing} of the schema (cnn/results.py)")
    bad = sorted(set(df["status"].astype(str)) - set(STATUSES))
    if bad:
        raise ResultsFileError(f"{path}: unknown run status {bad}; a results file holds only "
                               f"{list(STATUSES)}")


def done_keys(df, retry_failed: bool = True) -> set[str]:
    """The run keys a study skips on resume: runs that finished ("ok") or diverged (training
    is deterministic for a seed, so a diverged run would diverge again), and the failed ones
    too unless ``retry_failed``."""
    if retry_failed:
        return set(df.loc[df["status"].isin(["ok", "diverged"]), "run_key"])
    return set(df["run_key"])


# ---- reading --------------------------------------------------------------------------------
_TRAILER = re.compile(rb"\nCNN-RESULTS v(\d+) sha256=([0-9a-f]{64}) bytes=(\d+)\n\Z")
_MAGIC_VERSION = 1


def _trailer(payload: bytes) -> bytes:
    digest = hashlib.sha256(payload).hexdigest()
    return f"\nCNN-RESULTS v{_MAGIC_VERSION} sha256={digest} bytes={len(payload)}\n".encode()


class _DataFrameUnpickler(pickle.Unpickler):
    """Unpickles a pandas DataFrame of plain columns and nothing else: any other global in the
    stream (``os.system``, ``builtins.eval``, ...) is refused before it is looked up."""

    ALLOWED = frozenset({
        ("builtins", "slice"), ("builtins", "object"),
        ("numpy", "dtype"), ("numpy", "ndarray"),
        ("numpy._core.multiarray", "_reconstruct"), ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.numeric", "_frombuffer"), ("numpy.core.numeric", "_frombuffer"),
        ("pandas", "DataFrame"), ("pandas", "Index"), ("pandas", "RangeIndex"),
        ("pandas", "Int64Dtype"), ("pandas", "StringDtype"), ("pandas", "BooleanDtype"),
        ("pandas", "Float64Dtype"), ("pandas", "Categorical"), ("pandas", "CategoricalDtype"),
        ("pandas.arrays", "IntegerArray"), ("pandas.arrays", "StringArray"),
        ("pandas.arrays", "BooleanArray"), ("pandas.arrays", "FloatingArray"),
        ("pandas.arrays", "DatetimeArray"),
        ("pandas._libs.arrays", "__pyx_unpickle_NDArrayBacked"),
        ("pandas._libs.internals", "_unpickle_block"),
        ("pandas._libs.missing", "NA"),
        ("pandas.core.indexes.base", "_new_Index"),
        ("pandas.core.internals.managers", "BlockManager"),
    })

    def __init__(self, file, name):
        super().__init__(file)
        self._name = name

    def find_class(self, module, name):
        if (module, name) not in self.ALLOWED:
            raise ResultsFileError(
                f"{self._name}: refused to unpickle it: it refers to {module}.{name}, which a "
                f"study results DataFrame never holds (a crafted or foreign pickle)")
        return super().find_class(module, name)


def read_verified(path) -> bytes:
    """The pickle bytes of the results file ``path`` after checking its integrity record."""
    path = Path(path)
    if path.is_dir():
        raise ResultsFileError(f"{path} is a folder, not a results file")
    data = path.read_bytes()
    m = _TRAILER.search(data[-200:]) if data else None
    if m is None:
        if data.startswith(b"\x80") and b"pandas" in data[:4096]:
            why = ("it has no integrity record: it was cut short while being written, or "
                   "written by something other than the study (e.g. DataFrame.to_pickle); if "
                   "you trust it, cnn.results.adopt(path) checks it and adds the record")
        elif not data:
            why = "it is empty"
        else:
            why = "it is not a results file written by the study (no integrity record)"
        raise ResultsFileError(f"{path}: {why}")
    version, digest, n = int(m.group(1)), m.group(2).decode(), int(m.group(3))
    payload = data[:len(data) - len(m.group(0))]
    if version > _MAGIC_VERSION:
        raise ResultsFileError(f"{path}: written by a newer version of the study "
                               f"(record v{version}); update the package")
    if len(payload) != n or hashlib.sha256(payload).hexdigest() != digest:
        raise ResultsFileError(f"{path}: its contents do not match its integrity record (the "
                               f"file was changed or damaged after the study wrote it)")
    return payload


def _unpickle(payload: bytes, name):
    import pandas as pd
    try:
        df = _DataFrameUnpickler(io.BytesIO(payload), name).load()
    except ResultsFileError:
        raise
    except Exception as err:  # noqa: BLE001 - any unpickling failure: a damaged file
        raise ResultsFileError(f"{name}: cannot be read as a pickled DataFrame "
                               f"({type(err).__name__}: {err})") from None
    if not isinstance(df, pd.DataFrame):
        raise ResultsFileError(f"{name} holds a {type(df).__name__}, not a DataFrame")
    return df


def load_results(path=DEFAULT_RESULTS, *, missing_ok: bool = False):
    """The study DataFrame stored at ``path``.

    The integrity record is checked before anything is unpickled, and unpickling is restricted
    to the classes of a DataFrame (see the module doc); columns are checked against the schema.

    Args:
        missing_ok: return an empty DataFrame with the schema when there is no file (the study,
            about to create it); otherwise a missing file raises FileNotFoundError saying to
            run the study first (the analysis).
    Raises:
        ResultsFileError (a ValueError) naming the file when it is torn, garbage, foreign,
        unsafe or lacks the schema's columns.
    """
    path = Path(path)
    if not path.exists():
        if missing_ok:
            return empty_results()
        raise FileNotFoundError(
            f"results file {path} not found: run the study first (`make study`, or "
            f"`python -m cnn study`), then point --results / results_path at its df_results.pkl")
    df = _unpickle(read_verified(path), path)
    check_columns(df, path)
    return df


def adopt(path, out=None):
    """Check a results pickle that has no integrity record (one written by an older study, or
    by ``DataFrame.to_pickle``) with the restricted unpickler and the schema, and write it back
    (to ``out``, default in place) with the record. Returns the DataFrame."""
    path = Path(path)
    data = path.read_bytes()
    if _TRAILER.search(data[-200:]):
        return load_results(path)
    df = _unpickle(data, path)
    check_columns(df, path)
    save_results(df, out or path)
    return df


# ---- writing ----------------------------------------------------------------------------------
def save_results(df, path=DEFAULT_RESULTS) -> Path:
    """Write ``df`` to ``path`` durably and atomically (:func:`cnn.files.atomic_write`: a
    temporary file in the same folder, fsync, rename, fsync of the folder): pickle + integrity
    record. Readers and crashes only ever see the old file or the new one."""
    path = Path(path)
    check_out_path(path)
    buf = io.BytesIO()
    df.to_pickle(buf)
    payload = buf.getvalue()

    def write(f) -> None:
        f.write(payload)
        f.write(_trailer(payload))
    atomic_write(path, write)
    return path


def check_out_path(path) -> Path:
    """Check, before any work, that a results file can be written at ``path`` (creating its
    folder if needed); a clear ValueError naming the path otherwise."""
    path = Path(path)
    if str(path) in ("", ".") or path.name in ("", ".", ".."):
        raise ValueError(f"results file {str(path)!r}: give a file name, e.g. "
                         f"results/df_results.pkl")
    if path.is_dir():
        raise ValueError(f"results file {path} is a folder; give a file inside it, e.g. "
                         f"{path / 'df_results.pkl'}")
    parent = path.parent
    for up in [parent, *parent.parents]:
        if up.exists():
            if not up.is_dir():
                raise ValueError(f"results file {path}: {up} is a file, not a folder")
            break
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ValueError(f"results file {path}: cannot create its folder {parent} "
                         f"({err.strerror or err})") from None
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ValueError(f"results file {path}: the folder {parent} is not writable")
    if path.exists() and not os.access(path, os.R_OK):
        raise ValueError(f"results file {path} exists but is not readable")
    return path


# ---- the study's lock -------------------------------------------------------------------------
def lock_path(path) -> Path:
    path = Path(path)
    return path.with_name(f".{path.name}.lock")


class ResultsLock:
    """An exclusive lock on a results file, held by a study for its whole duration
    (``fcntl.flock`` on ``.<name>.lock`` beside it: released by the kernel when the holder
    exits, however it exits, so a killed study never leaves a stale lock).

    ``wait`` seconds: 0 refuses at once when another study holds it, with a message naming
    that study (pid, host, start time, command); > 0 waits that long; None waits forever.
    """

    def __init__(self, path, wait: float | None = 0.0, poll: float = 0.2):
        self.path = Path(path)
        # the file itself, through any symbolic link: one lock however a study names it
        self.file = lock_path(Path(os.path.realpath(self.path)))
        self.wait = wait
        self.poll = poll
        self._fd = None

    def acquire(self) -> "ResultsLock":
        import fcntl
        check_out_path(self.path)
        fd = os.open(self.file, os.O_RDWR | os.O_CREAT, 0o644)
        deadline = None if self.wait is None else time.monotonic() + max(self.wait, 0.0)
        announced = False
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                holder = self._holder(fd)
                if deadline is not None and time.monotonic() >= deadline:
                    os.close(fd)
                    waited = f" after waiting {self.wait:g} s" if self.wait else ""
                    raise StudyLockedError(
                        f"another study is writing {self.path} ({holder}){waited}; wait for it "
                        f"to finish (or pass --wait SECONDS to wait for it), or write to "
                        f"another --out") from None
                if not announced:
                    print(f"waiting for the study writing {self.path} ({holder}) to finish ...",
                          file=sys.stderr, flush=True)
                    announced = True
                time.sleep(self.poll)
        info = {"pid": os.getpid(), "host": os.uname().nodename if hasattr(os, "uname") else "",
                "started_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
                "command": " ".join(sys.argv)[:300]}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(info).encode(), 0)
        self._fd = fd
        return self

    @staticmethod
    def _holder(fd) -> str:
        try:
            info = json.loads(os.pread(fd, 4096, 0) or b"{}")
            return (f"pid {info.get('pid')} on {info.get('host') or '?'}, started "
                    f"{info.get('started_at')}: {info.get('command')}")
        except (OSError, ValueError):
            return "holder unknown"

    def release(self) -> None:
        if self._fd is not None:
            import fcntl
            try:
                os.ftruncate(self._fd, 0)
            except OSError:
                pass
            # the file stays: unlinking a lock file others may have opened breaks the lock
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    def __enter__(self):
        return self.acquire()

    def __exit__(self, *exc):
        self.release()
        return False
