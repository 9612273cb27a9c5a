"""The analysis of the study's results: statistics, the one summary, figures, the PDF.

The study (:mod:`cnn.study`) writes ``results/df_results.pkl`` (schema and file format:
:mod:`cnn.results`). This package turns it into

* a per-run table (:func:`run_table`): one row per successful run; a run's epoch time is the
  median of its epochs' wall times, its throughput the images of one epoch over that time;
* the summary (:func:`summarize`, the only one): per configuration (dataset, model, batch
  size, filters, training-set size, dtype, on one machine) and per path variant (path,
  strategy, backend, threads): median over repeats of the epoch time and the throughput with
  percentile-bootstrap intervals, the speed-up against the sequential path of the *same*
  configuration (ratio of medians), the parallel efficiency ``E = S/p``, the Karp-Flatt serial
  fraction, a least-squares fit of Amdahl's law over the thread counts of each variant, and
  the median and IQR of the final test accuracy;
* figures (:func:`make_figures`), the summary as CSV and JSON (:func:`write_summary`), every
  number the report prints (:func:`report_numbers` -> ``numbers.json``), and the PDF
  (:func:`build_report`, also ``python -m cnn report``), compiled with Typst from
  ``cnn/analysis/report.typ``, which contains no measured number.

Modules: :mod:`.statistics` (pure functions), :mod:`.summary`, :mod:`.figures`,
:mod:`.numbers`, :mod:`.pdf`, :mod:`.text` (formatting). Path names, labels and orders come
from the registry (:mod:`cnn.paths`).
"""
from __future__ import annotations

from ..results import load_results
from .figures import FIGURE_KINDS, PLOTS, figure_name, make_figures, show_figures
from .numbers import read_gpu_kernels, report_numbers, speedup_trends, speedup_verdicts
from .pdf import REPORT_TYP, build_report, compile_report
from .statistics import (amdahl_speedup, bootstrap_medians, fit_amdahl, karp_flatt, median_ci,
                         percentile_interval, speedup_ci)
from .summary import (AMDAHL_COLUMNS, SUMMARY_COLUMNS, VIEW_COLUMNS, Summary, cold_compile,
                      noise, run_table, simulated, simulator_check, split_failed, summarize,
                      sync_check, write_summary)
from .text import fmt, fmt_ci

__all__ = ["AMDAHL_COLUMNS", "FIGURE_KINDS", "PLOTS", "REPORT_TYP", "SUMMARY_COLUMNS",
           "VIEW_COLUMNS", "Summary", "amdahl_speedup", "bootstrap_medians", "build_report",
           "cold_compile", "compile_report", "figure_name", "fit_amdahl", "fmt", "fmt_ci",
           "karp_flatt", "load_results", "make_figures", "median_ci", "noise",
           "percentile_interval", "read_gpu_kernels", "report_numbers", "run_table",
           "show_figures", "simulated", "simulator_check", "speedup_ci", "speedup_trends",
           "speedup_verdicts", "split_failed", "summarize", "sync_check", "write_summary"]
