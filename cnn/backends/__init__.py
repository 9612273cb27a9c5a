"""Backends: where the arithmetic runs. ``get_backend(name)`` returns a shared instance.

Backends are imported lazily so that ``import cnn`` needs neither Numba nor a GPU.
"""
from __future__ import annotations

import importlib

from .base import Backend

# name -> (module, class); modules import only when the backend is first asked for
_REGISTRY = {
    "numpy": ("cnn.backends.numpy", "NumpyBackend"),
    "naive": ("cnn.backends.naive", "NaiveBackend"),
    "numba": ("cnn.backends.numba", "NumbaBackend"),
    "numba_parallel": ("cnn.backends.numba", "NumbaParallelBackend"),
    "cuda": ("cnn.backends.cuda", "CudaBackend"),
}
_INSTANCES: dict[str, Backend] = {}


def available_backends() -> list[str]:
    return list(_REGISTRY)


def get_backend(name: str | Backend = "numpy") -> Backend:
    """The backend called ``name`` (or ``name`` itself when it already is a Backend)."""
    if isinstance(name, Backend):
        return name
    if name not in _REGISTRY:
        raise ValueError(f"unknown backend {name!r}; choose one of {sorted(_REGISTRY)}")
    if name not in _INSTANCES:
        module, cls = _REGISTRY[name]
        _INSTANCES[name] = getattr(importlib.import_module(module), cls)()
    return _INSTANCES[name]


__all__ = ["Backend", "available_backends", "get_backend"]
