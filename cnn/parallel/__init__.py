"""Training strategies, chosen by name: ``make_strategy("sync", threads=2)``.

Where each strategy lives is its record in the registry (:data:`cnn.paths.STRATEGIES`, the
standard library only); its module is imported when the strategy is first made, so optional
dependencies (mpi4py) stay optional. A new strategy is its module here and its record there.
"""
from __future__ import annotations

from ..paths import STRATEGIES, strategy_info
from .base import SequentialStrategy, Strategy


def strategy_names() -> list[str]:
    return list(STRATEGIES)


def mpi_strategies() -> list[str]:
    """The strategies that run one process per MPI rank (started by a launcher)."""
    return [name for name, info in STRATEGIES.items() if info.mpi_ranks]


def strategy_class(name: str) -> type[Strategy]:
    """The class of the strategy called ``name`` (its module imported now)."""
    return strategy_info(name).load()


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


__all__ = ["SequentialStrategy", "Strategy", "make_strategy", "mpi_strategies",
           "strategy_class", "strategy_names", "strategy_options"]
