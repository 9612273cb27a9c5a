"""Backends: where the arithmetic runs. ``get_backend(name)`` returns a shared instance.

Backends are imported lazily (their records in :mod:`cnn.backends.registry` say where they
live) so that ``import cnn`` needs neither Numba nor a GPU.

``"auto"`` (:data:`AUTO`, the default of models, ``fit`` and ``train``) stands for the fastest
CPU backend installed here (:func:`resolve_backend`): ``numba`` when Numba imports, else
``numpy``. The study and the benchmarks name their backends explicitly.
"""
from __future__ import annotations

from .base import Backend
from .registry import BACKENDS

_INSTANCES: dict[str, Backend] = {}
#: the name that stands for the fastest CPU backend installed (see :func:`resolve_backend`)
AUTO = "auto"
#: the CPU backends ``"auto"`` picks from, fastest first (the last one always imports)
AUTO_ORDER = ("numba", "numpy")


def available_backends() -> list[str]:
    """The registered backends' names (``"auto"`` is not one of them: it names one)."""
    return list(BACKENDS)


def backend_choices() -> list[str]:
    """What a ``backend`` option accepts: ``"auto"``, then every registered backend."""
    return [AUTO, *BACKENDS]


def resolve_backend(name: str) -> str:
    """``name``, or for ``"auto"`` the first backend of :data:`AUTO_ORDER` whose module
    imports here (Numba missing or broken: ``numpy``)."""
    if name != AUTO:
        return name
    for candidate in AUTO_ORDER[:-1]:
        try:
            get_backend(candidate)
        except ImportError:
            continue
        return candidate
    return AUTO_ORDER[-1]


def get_backend(name: str | Backend = "numpy") -> Backend:
    """The backend called ``name`` (or ``name`` itself when it already is a Backend);
    ``"auto"``: the one :func:`resolve_backend` picks."""
    if isinstance(name, Backend):
        return name
    name = resolve_backend(name)
    if name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r}; choose one of {backend_choices()}")
    if name not in _INSTANCES:
        _INSTANCES[name] = BACKENDS[name].load()()
    return _INSTANCES[name]


__all__ = ["AUTO", "AUTO_ORDER", "Backend", "available_backends", "backend_choices",
           "get_backend", "resolve_backend"]
