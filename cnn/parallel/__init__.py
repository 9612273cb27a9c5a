"""Training strategies, chosen by name: ``make_strategy("sync", threads=2)``."""
from __future__ import annotations

import importlib

from .base import SequentialStrategy, Strategy

# name -> (module, class); imported on first use so optional dependencies (mpi4py) stay optional
_STRATEGIES = {
    "sequential": ("cnn.parallel.base", "SequentialStrategy"),
    "sync": ("cnn.parallel.threads", "SyncThreads"),
    "average": ("cnn.parallel.threads", "AverageThreads"),
    "hogwild": ("cnn.parallel.threads", "HogwildThreads"),
    "processes": ("cnn.parallel.processes", "SyncProcesses"),
    "mpi": ("cnn.parallel.mpi", "MPISync"),
    "mpi_average": ("cnn.parallel.mpi", "MPIAverage"),
    "accumulate": ("cnn.parallel.accumulate", "AccumulateStrategy"),
}
#: the strategies that run one process per MPI rank (started by a launcher)
MPI_STRATEGIES = ("mpi", "mpi_average")


def strategy_names() -> list[str]:
    return list(_STRATEGIES)


def strategy_class(name: str) -> type[Strategy]:
    """The class of the strategy called ``name`` (its module imported now)."""
    if not isinstance(name, str) or name not in _STRATEGIES:
        raise ValueError(f"unknown strategy {name!r}; choose one of {strategy_names()}")
    module, cls = _STRATEGIES[name]
    return getattr(importlib.import_module(module), cls)


def strategy_options(name: str) -> list[str]:
    """The options the strategy called ``name`` takes besides ``threads`` (its constructor's
    arguments: ``every`` for the averaging strategies, ``overlap`` for ``mpi``, ...)."""
    import inspect
    return [p for p in inspect.signature(strategy_class(name).__init__).parameters
            if p not in ("self", "threads")]


def make_strategy(name: "str | Strategy" = "sequential", threads: int = 1, **options) -> Strategy:
    """The strategy called ``name`` with ``threads`` workers and its own ``options``."""
    if isinstance(name, Strategy):
        return name
    return strategy_class(name)(threads=threads, **options)


__all__ = ["MPI_STRATEGIES", "SequentialStrategy", "Strategy", "make_strategy", "strategy_class",
           "strategy_names", "strategy_options"]
