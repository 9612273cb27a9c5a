"""The child: one run in a fresh interpreter (``python -m cnn.study.child``).

The parent (:mod:`cnn.study.runner`) writes the run's configuration to a JSON file and starts
``python -m cnn.study.child --run-json CONFIG --result RESULT --parent-pid PID`` with the
environment the path's registry entry asks for (NUMBA_NUM_THREADS, NUMBA_ENABLE_CUDASIM, the
study's NUMBA_CACHE_DIR) set before the interpreter starts. The child trains, writes a JSON
result atomically and exits.

The child dies with its parent: on Linux it asks the kernel for SIGKILL when the parent dies
(``prctl(PR_SET_PDEATHSIG)``), then checks that the parent it was started by is still its
parent (closing the window before that call); elsewhere a daemon thread watches the parent's
pid. A ``kill -9`` of the study therefore never leaves a run competing for the CPU.

Outcomes: "ok"; "diverged" when training raised :class:`cnn.errors.DivergedError` (a
non-finite loss or weights) or recorded a non-finite training loss; "failed" for any other
exception (the error is ``ExceptionType: message``).

Module-level imports are the standard library and the package's modules that import nothing
else (:mod:`cnn.errors`, :mod:`cnn.files`, and :mod:`cnn.study.run` with the registry it
reads, :mod:`cnn.paths`).
"""
from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import math
import os
import signal
import sys
import threading
import time
import traceback
from pathlib import Path
from typing import Any, Iterable

from ..errors import DivergedError
from ..files import atomic_write, read_structured
from .run import Run

PR_SET_PDEATHSIG = 1
#: history key of cnn.train.History -> results column
HISTORY_TO_COLUMN = {"epoch": "epoch", "time": "time", "compute_time": "compute_time",
                     "comm_time": "comm_time",
                     "data_time": "data_time", "transfer_time": "transfer_time",
                     "eval_time": "eval_time", "images_per_sec": "images_per_sec",
                     "loss": "train_loss", "accuracy": "train_accuracy",
                     "val_loss": "test_loss", "val_accuracy": "test_accuracy"}


# ---- dying with the parent ----------------------------------------------------------------------
def die_with_parent(parent_pid: int | None, poll: float = 0.5) -> str:
    """Arrange for this process to end when ``parent_pid`` (its parent) dies. Returns how:
    "prctl", "watcher" or "none"."""
    if not parent_pid:
        return "none"
    how = "watcher"
    if sys.platform.startswith("linux"):
        try:
            import ctypes
            libc = ctypes.CDLL(None, use_errno=True)
            if libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) == 0:
                how = "prctl"
        except (OSError, AttributeError):
            pass
    if os.getppid() != parent_pid:  # the parent died before the call above
        os._exit(137)
    if how == "watcher":
        def watch():
            while True:
                if os.getppid() != parent_pid:
                    os._exit(137)
                time.sleep(poll)
        threading.Thread(target=watch, name="parent-watcher", daemon=True).start()
    return how


# ---- one run ----------------------------------------------------------------------------------
def _finite(v):
    try:
        v = float(v)
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) else None


def _device(run: Run) -> str:
    if not run.entry.needs_gpu:
        return "cpu"
    if run.cuda_simulator:
        return "cuda-simulator"
    try:
        from numba import cuda
        name = cuda.get_current_device().name
        return name.decode() if isinstance(name, bytes) else str(name)
    except Exception:  # the name is a nicety; never fail a run for it
        return "cuda"


class Diverged(Exception):
    """Raised inside :func:`execute_run` when a run's history shows a non-finite loss."""


def execute_run(run: Run, data_root=None, download: bool = True,
                backup_dir: str | None = None) -> dict:
    """Train one run in this process and return its measurements (JSON-able).

    The study calls this in a fresh child process; calling it directly is for debugging only,
    since nothing then isolates runs from each other. ``backup_dir``: the run's backups
    (paths trained by :func:`cnn.train.fit`), written after every epoch, outside its timed
    part; a run given a folder that holds one continues from it, and the epochs trained after
    such a resume are marked ``resumed``.
    """
    import numpy as np

    from ..data import load_dataset
    from ..model import Sequential, resolve_spec
    from ..presets import with_filters

    entry = run.entry
    dtype = np.dtype(run.dtype)
    val_size = int(run.val_size or 0)
    t = time.perf_counter()
    data = load_dataset(run.dataset, root=data_root, limit=run.train_size + val_size,
                        test_limit=run.test_size, seed=0, dtype=dtype, download=download)
    x_train, y_train = data.x_train, data.y_train
    if val_size:  # the validation split: the end of the training split, never the test set
        if len(x_train) <= val_size:
            raise ValueError(f"val_size={val_size} leaves no training examples of "
                             f"{len(x_train)}")
        x_val, y_val = x_train[-val_size:], y_train[-val_size:]
        x_train, y_train = x_train[:-val_size], y_train[:-val_size]
    load_time = time.perf_counter() - t
    spec = with_filters(resolve_spec(run.model), run.filters or None)  # 0: no conv layer
    backend = entry.model_backend or run.backend
    model = Sequential.from_spec(spec, input_shape=data.input_shape, dtype=dtype,
                                 seed=run.seed, backend=backend)
    from .grid import run_optimizer
    optimizer = run_optimizer(run, spec)  # the preset's or the grid's, lr, momentum, schedule
    # the warm-up epochs first, then the measured ones: one fit, so nothing restarts between
    common = dict(epochs=run.warmup_epochs + run.epochs, batch_size=run.batch_size,
                  optimizer=optimizer,
                  seed=run.seed, validation_data=(data.x_test, data.y_test), verbose=0,
                  augment=run.augment or None)
    tta = None
    if run.target is not None and not (isinstance(run.target, float)
                                       and math.isnan(run.target)):
        from .tta import TimeToAccuracy
        tta = TimeToAccuracy(x_val, y_val, int(run.eval_every), float(run.target))
    callbacks = [tta] if tta else []
    if entry.trainer == "keras":
        from ..reference.keras import fit_keras
        hist = fit_keras(model, x_train, y_train, threads=run.threads, callbacks=callbacks,
                         engine=run.engine, **common)
    elif entry.trainer == "torch" and entry.launch == "mpiexec":  # one process of a DDP job
        from ..reference.torch import fit_torch
        with torch_process_group():
            hist = fit_torch(model, x_train, y_train, threads=1, device=entry.device,
                             callbacks=callbacks, distributed=True, **common)
    elif entry.trainer == "torch":
        from ..reference.torch import fit_torch
        hist = fit_torch(model, x_train, y_train, threads=run.threads, device=entry.device,
                         callbacks=callbacks, engine=run.engine, **common)
    else:
        from ..train import fit
        hist = fit(model, x_train, y_train, backend=backend, blas_threads=1,
                   callbacks=callbacks, backup_dir=backup_dir, backup_every="epoch",
                   **entry.fit_arguments(run), **common)
    h = hist.history
    epochs = len(h.get("epoch", h.get("loss", [])))
    losses = [h["loss"][i] for i in range(min(epochs, len(h.get("loss", []))))]
    bad = next((i for i, v in enumerate(losses) if _finite(v) is None), None)
    if bad is not None:
        raise Diverged(f"training diverged: non-finite training loss {losses[bad]!r} in "
                       f"epoch {bad + 1}")
    # the epochs from the first one a resume trained on: another process measured them
    resumes = hist.info.get("resumes") or []
    first_resumed = min((r["epoch"] + (1 if r["done"] else 0) for r in resumes), default=None)
    per_epoch = []
    for i in range(epochs):
        row = {col: (_finite(h[key][i]) if key in h and i < len(h[key]) else None)
               for key, col in HISTORY_TO_COLUMN.items()}
        row["epoch"] = int(h["epoch"][i]) if "epoch" in h else i + 1
        if "comm_time" in h and i < len(h["comm_time"]):
            row["comm_time"] = _finite(h["comm_time"][i])
        if "callback_time" in h and i < len(h["callback_time"]):
            row["step_eval_time"] = _finite(h["callback_time"][i])
        row["resumed"] = first_resumed is not None and row["epoch"] >= first_resumed
        row["warmup"] = row["epoch"] <= run.warmup_epochs
        per_epoch.append(row)
    import socket
    hosts = hist.info.get("hosts") or [socket.gethostname()]
    out = {"epochs": per_epoch, "compile_time": _finite(hist.info.get("compile_time")),
           "hosts": ",".join(map(str, hosts)),
           "num_params": int(model.num_params), "train_size": int(len(x_train)),
           "test_size": int(len(data.x_test)), "load_time": load_time, "device": _device(run)}
    try:
        from ..bench.hardware import training_flops_per_image
        out["flops_per_image"] = float(training_flops_per_image(model))
    except Exception:  # noqa: BLE001 - a nicety; never fail a run for it
        pass
    if tta:
        out.update(tta.summary())
        out["eval_trace"] = json.dumps(tta.trace)
    if (entry.trainer == "fit" and entry.cores == "workers" and entry.fit_workers
            and int(run.threads) > 1):
        out["reduce_time"] = measure_reduce(int(model.num_params), int(run.threads), dtype)
    return out


@contextlib.contextmanager
def torch_process_group():
    """PyTorch's default process group (gloo) over the MPI job this process is a rank of, on
    one host: rank 0 finds a free TCP port on the loopback and tells the others through MPI,
    every rank joins ``tcp://127.0.0.1:<port>``; on the way out, a barrier (rank 0 hosts the
    rendezvous, so it leaves last) and the group destroyed."""
    import socket

    import torch.distributed as dist
    from mpi4py import MPI
    comm = MPI.COMM_WORLD
    address = None
    if comm.Get_rank() == 0:
        with socket.socket() as probe:  # a port free now; gloo binds it a moment later
            probe.bind(("127.0.0.1", 0))
            address = f"tcp://127.0.0.1:{probe.getsockname()[1]}"
    address = comm.bcast(address, root=0)
    dist.init_process_group("gloo", init_method=address, rank=comm.Get_rank(),
                            world_size=comm.Get_size())
    try:
        yield
        dist.barrier()
    finally:
        dist.destroy_process_group()


def measure_reduce(num_params: int, p: int, dtype, repeats: int = 21) -> float:
    """Median seconds, on one thread, of one step's reduction: the size-weighted sum of ``p``
    gradient vectors of ``num_params`` elements (what ``sync`` does between the backward pass
    and the update; its workers share it by slices)."""
    import numpy as np
    rng = np.random.default_rng(0)
    grads = [rng.random(num_params).astype(dtype) for _ in range(p)]
    acc, tmp = np.empty(num_params, dtype=dtype), np.empty(num_params, dtype=dtype)
    w = 1.0 / p
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        np.multiply(grads[0], w, out=acc)
        for g in grads[1:]:
            acc += np.multiply(g, w, out=tmp)
        times.append(time.perf_counter() - t)
    return float(sorted(times)[len(times) // 2])


def is_divergence(err: BaseException) -> bool:
    """Whether ``err`` says training diverged (:class:`cnn.errors.DivergedError`, raised by
    the fit loop and the strategies, or this module's :class:`Diverged`)."""
    return isinstance(err, (Diverged, DivergedError))


def source_hash() -> str:
    """SHA-1 (12 hex digits) of the package's Python sources: tells runs apart that ran on
    different code under one "-dirty" git commit."""
    root = Path(__file__).resolve().parent.parent
    digest = hashlib.sha1()
    for path in sorted(root.rglob("*.py")):
        digest.update(str(path.relative_to(root)).encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()[:12]


def run_main(config_path: str, result_path: str, write: bool = True) -> int:
    """``--run-json CONFIG --result RESULT``: train, write the result (``write``: MPI ranks
    other than 0 train without writing it)."""
    payload = read_structured(config_path, "run configuration")
    source = source_hash()  # the code this run imports, hashed before it trains
    result: dict[str, Any] = {"status": "ok", "error": ""}
    try:
        run = Run.from_row(payload["config"])
        result.update(execute_run(run, payload.get("data_root"), payload.get("download", True),
                                  payload.get("backup_dir")))
    except KeyboardInterrupt:
        return 130
    except BaseException as err:  # noqa: BLE001 - every failure becomes a row
        traceback.print_exc()
        status = "diverged" if is_divergence(err) else "failed"
        result = {"status": status, "error": f"{type(err).__name__}: {err}".strip()}
    try:
        from ..machine import machine_info
        result["machine"] = dict(machine_info())
    except Exception as err:  # noqa: BLE001
        result["machine"] = {"cpu": f"unknown ({err})"}
    result["machine"]["source_hash"] = source
    if write:
        atomic_write(result_path, json.dumps(result))
    if result["status"] == "failed" and _mpi_rank() is not None:
        # a failure on one rank would leave the others waiting in a collective: end them all
        # (rank 0 has written its result; another rank gives it a moment to, if it failed too)
        from ..parallel.launch import abort_mpi_job
        if not write:
            time.sleep(1.0)
        abort_mpi_job(1)
    return 0


def warmup_main(backend: str, dtype: str, result_path: str) -> int:
    """``--warmup BACKEND DTYPE --result RESULT``: compile the backend's kernels (import
    excluded from the time) into ``$NUMBA_CACHE_DIR``."""
    result: dict[str, Any] = {}
    try:
        import numpy as np

        from ..backends import get_backend
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
    atomic_write(result_path, json.dumps(result))
    return 0


def main(argv: Iterable[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m cnn.study.child",
                                description="one isolated run of the study (started by it)")
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--run-json", help="the run's configuration (JSON)")
    g.add_argument("--warmup", nargs=2, metavar=("BACKEND", "DTYPE"))
    p.add_argument("--result", required=True)
    p.add_argument("--parent-pid", type=int, default=None,
                   help="end when this process (the study) ends")
    a = p.parse_args(None if argv is None else list(argv))
    rank = _mpi_rank()
    if rank is None:
        die_with_parent(a.parent_pid)
    else:  # an MPI rank: its parent is the launcher's proxy; watch the study's pid itself
        watch_pid(a.parent_pid)
        try:  # initialise MPI first, so that a failure on one rank can end them all
            from mpi4py import MPI
        except ImportError:
            pass
        else:
            from ..parallel.launch import release_segments
            release_segments(MPI)  # no end of the job leaves MPICH's segments behind
    if a.warmup:
        return warmup_main(*a.warmup, a.result)
    # every rank trains (the MPI paths); rank 0 alone writes the result
    return run_main(a.run_json, a.result, write=not rank)


def _mpi_rank() -> int | None:
    """This process's MPI rank when an MPI launcher started it (Hydra: PMI_RANK), else None."""
    for var in ("PMI_RANK", "PMIX_RANK", "OMPI_COMM_WORLD_RANK"):
        if os.environ.get(var, "").isdigit():
            return int(os.environ[var])
    return None


def watch_pid(pid: int | None, poll: float = 0.5) -> None:
    """End this process when ``pid`` is gone (for processes whose parent is not ``pid``)."""
    if not pid:
        return

    def watch():
        while True:
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                os._exit(137)
            except PermissionError:
                pass
            time.sleep(poll)
    threading.Thread(target=watch, name="study-watcher", daemon=True).start()


if __name__ == "__main__":
    sys.exit(main())
