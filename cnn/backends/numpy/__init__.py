"""The NumPy backend: im2col with stride tricks and BLAS matrix products, the sequential
baseline (:mod:`.backend`), and the NumPy ops of the other layers (:mod:`.layer_ops`)."""
from .backend import NumpyBackend

__all__ = ["NumpyBackend"]
