"""The backend registry: one record per backend, saying where its class lives and the facts
about it that code outside the backend decides on.

The :class:`~cnn.backends.base.Backend` classes read their facts from here (``jit``,
``on_device``, ``parallel_ops``), :func:`cnn.backends.get_backend` imports a class from its
record, and the path registry (:mod:`cnn.paths`: which runs compile) and the study's estimates
(:mod:`cnn.study.estimate`: the cold compile) read the records without importing the backend,
so each fact is stated once.

Importing this module imports the standard library only: it is read before Numba or a GPU is
touched (the study's parent and child processes, ``import cnn``).
"""
from __future__ import annotations

from dataclasses import dataclass

from ..records import ClassRecord, add_record


@dataclass(frozen=True)
class BackendInfo(ClassRecord):
    """What is known about a backend before its module is imported.

    Attributes:
        module: the module that defines its class, imported when the backend is first asked
            for (so ``import cnn`` needs neither Numba nor a GPU).
        cls: the class's name in ``module``.
        jit: its ops compile on first use (Numba, CUDA): :func:`cnn.train.fit` times a warm-up
            step as JIT compile time, outside the epochs, and the study compiles its kernels
            into a shared disk cache before its first run.
        on_device: its ops run on an accelerator and its arrays live in device memory, so the
            CPU strategies (threads, processes, MPI, accumulation) refuse it.
        parallel_ops: each op runs on the backend's own thread pool, so one thread alone may
            call it (the thread strategies refuse it with more than one worker).
        cold_compile: a guess of the seconds one cold compile of its kernels takes per dtype,
            for the study's time estimate (``study --dry-run``); the study measures the real
            figure (its ``cold_compile_time`` column).
    """

    jit: bool = False
    on_device: bool = False
    parallel_ops: bool = False
    cold_compile: float = 0.0


#: name -> record, in the order ``--help`` lists them
BACKENDS: dict[str, BackendInfo] = {
    "numpy": BackendInfo("cnn.backends.numpy", "NumpyBackend"),
    "naive": BackendInfo("cnn.backends.naive", "NaiveBackend"),
    "numba": BackendInfo("cnn.backends.numba", "NumbaBackend", jit=True,
                         cold_compile=40.0),
    "numba_parallel": BackendInfo("cnn.backends.numba", "NumbaParallelBackend",
                                  jit=True, parallel_ops=True, cold_compile=60.0),
    "cuda": BackendInfo("cnn.backends.cuda", "CudaBackend", jit=True, on_device=True,
                        cold_compile=30.0),
}
#: the facts of a backend with no record (a test's stand-in, a framework such as
#: ``tensorflow`` that a reference path runs over): a CPU backend that compiles nothing
UNREGISTERED = BackendInfo()


def backend_info(name: str) -> BackendInfo:
    """The record of backend ``name`` (:data:`UNREGISTERED` when it has none)."""
    return BACKENDS.get(name, UNREGISTERED)


def register_backend(name: str, info: BackendInfo) -> BackendInfo:
    """Add backend ``name`` (see :func:`cnn.records.add_record` for what it refuses)."""
    return add_record(BACKENDS, "backend", name, info, BackendInfo)
