"""Backends: where the arithmetic runs. ``get_backend(name)`` returns a shared instance.

Backends are imported lazily (their records in :mod:`cnn.backends.registry` say where they
live) so that ``import cnn`` needs neither Numba nor a GPU.
"""
from __future__ import annotations

from .base import Backend
from .registry import BACKENDS

_INSTANCES: dict[str, Backend] = {}


def available_backends() -> list[str]:
    return list(BACKENDS)


def get_backend(name: str | Backend = "numpy") -> Backend:
    """The backend called ``name`` (or ``name`` itself when it already is a Backend)."""
    if isinstance(name, Backend):
        return name
    if name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r}; choose one of {sorted(BACKENDS)}")
    if name not in _INSTANCES:
        _INSTANCES[name] = BACKENDS[name].load()()
    return _INSTANCES[name]


__all__ = ["Backend", "available_backends", "get_backend"]
