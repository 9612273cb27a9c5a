"""parallel-cnn: a from-scratch CNN whose training runs sequentially, on CPU threads, on a GPU
and over MPI ranks from one model definition, to measure speed-up and check equivalence."""
from .model import Sequential, build_model
from .presets import PRESETS, get_preset
from .errors import DivergedError
from .train import Callback, History, fit

__all__ = ["Callback", "DivergedError", "History", "PRESETS", "Sequential", "build_model", "fit", "get_preset"]
