"""The study: a parameter grid -> isolated training runs -> one tidy pandas DataFrame on disk.

Usage::

    python -m cnn study --profile quick --out results/quick/df_results.pkl
    python -m cnn study --profile full --data-dir /path/to/data --dry-run    # plan + estimate
    python -m cnn study --grid my_grid.yaml --out results/mine.pkl

    from cnn.study import expand_grid, run_study
    from cnn.analysis import summarize
    df = run_study("quick", out="results/quick/df_results.pkl")
    summarize(df).table          # medians, speed-ups, accuracy per configuration

The package, by concern:

- :mod:`cnn.study.grid`: axes, validation, defaults, expansion into runs, run keys, grid files;
- :mod:`cnn.study.run`: one run as a typed value (:class:`Run`: its configuration and its
  path's registry entry);
- :mod:`cnn.study.profiles`: the named grids (quick, full, third, device, smoke);
- :mod:`cnn.study.runner`: isolated runs in child processes, the lock, resuming;
- :mod:`cnn.study.child`: the child process (one run, dies with its parent);
- :mod:`cnn.study.estimate`: time estimates and the ``--dry-run`` plan;
- :mod:`cnn.study.cli`: the ``study`` command.

What a path is (backend, strategy, workers, launch) comes from :mod:`cnn.paths`; the results'
columns, dtypes and the file format from :mod:`cnn.results`; the analysis (one
``summarize``) from :mod:`cnn.analysis`.
"""
from __future__ import annotations

from ..results import COLUMNS, DEFAULT_RESULTS, load_results, save_results
from .cli import add_arguments, command, main
from .estimate import describe_plan, estimate_seconds
from .grid import DATASET_SIZES, GRID_DEFAULTS, LIST_AXES, SETTINGS, expand_grid, read_grid
from .profiles import FULL_NOTES, PROFILES
from .run import Run
from .runner import run_study

__all__ = ["COLUMNS", "DATASET_SIZES", "DEFAULT_RESULTS", "FULL_NOTES", "GRID_DEFAULTS",
           "LIST_AXES", "PROFILES", "Run", "SETTINGS", "add_arguments", "command", "describe_plan",
           "estimate_seconds", "expand_grid", "load_results", "main", "read_grid", "run_study",
           "save_results"]
