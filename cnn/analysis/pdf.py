"""The PDF: results -> summary, figures, ``numbers.json`` -> Typst -> ``report.pdf``."""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

from ..results import load_results
from .figures import make_figures
from .numbers import report_numbers
from .summary import _atomic_write, summarize, write_summary

ROOT = Path(__file__).resolve().parent.parent.parent
REPORT_TYP = ROOT / "report" / "report.typ"


def _root_relative(path: Path, root: Path) -> str:
    return "/" + path.resolve().relative_to(root).as_posix()


def compile_report(numbers_json, figures_dir, out, typ=REPORT_TYP) -> Path:
    """Compile ``typ`` to the PDF ``out`` with Typst; the document reads ``numbers_json`` and the
    figures through ``sys.inputs`` (paths relative to a root that holds all three)."""
    import typst
    typ, numbers_json, figures_dir = (Path(x).resolve() for x in (typ, numbers_json, figures_dir))
    root = Path(os.path.commonpath([typ.parent, numbers_json.parent, figures_dir]))
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp.pdf")
    typst.compile(str(typ), output=str(tmp), root=str(root),
                  sys_inputs={"numbers": _root_relative(numbers_json, root),
                              "figures": _root_relative(figures_dir, root)})
    os.replace(tmp, out)
    return out


def build_report(results, out="report/report.pdf", *, figures_dir=None, summary_dir=None,
                 generated_dir=None, gpu_kernels=None, n_boot: int = 2000, level: float = 0.95,
                 seed: int = 0, dpi: int = 150, typ=REPORT_TYP, pdf: bool = True,
                 verbose: bool = True) -> dict:
    """The one command: results pickle -> summary (CSV, JSON) + figures + ``numbers.json`` ->
    PDF. Defaults: figures in ``<results dir>/figures``, the summary beside the results,
    ``numbers.json`` in ``<out dir>/generated``, the GPU table from ``<results dir>/
    gpu_kernels.csv`` (else the repository's ``results/gpu_kernels.csv``). Returns the paths
    written and the seconds taken."""
    t0 = time.perf_counter()
    results = Path(results)
    out = Path(out)
    figures_dir = Path(figures_dir) if figures_dir else results.parent / "figures"
    summary_dir = Path(summary_dir) if summary_dir else results.parent
    generated_dir = Path(generated_dir) if generated_dir else out.parent / "generated"
    if gpu_kernels is None:
        cands = [results.parent / "gpu_kernels.csv", ROOT / "results" / "gpu_kernels.csv"]
        gpu_kernels = next((c for c in cands if c.exists()), None)
    df = load_results(results)
    summary = summarize(df, n_boot=n_boot, level=level, seed=seed, source=str(results))
    paths = write_summary(summary, summary_dir)
    figures = make_figures(summary, figures_dir, dpi=dpi)
    numbers = report_numbers(summary, figures, gpu_kernels)
    numbers["gpu"]["kernels_source"] = str(gpu_kernels) if gpu_kernels else ""
    generated_dir.mkdir(parents=True, exist_ok=True)
    numbers_path = generated_dir / "numbers.json"
    _atomic_write(numbers_path, json.dumps(numbers, indent=1, ensure_ascii=False))
    written = {**{f"summary_{k}": v for k, v in paths.items()}, "numbers": numbers_path,
               "figures": [Path(f["path"]) for f in figures]}
    if pdf:
        written["pdf"] = compile_report(numbers_path, figures_dir, out, typ)
    written["seconds"] = time.perf_counter() - t0
    if verbose:
        c = numbers["counts"]
        print(f"{c['runs_ok']} runs ok, {c['runs_failed']} failed (excluded); "
              f"{len(figures)} figures in {figures_dir}; summary {paths['csv']}; "
              f"numbers {numbers_path}" + (f"; report {written['pdf']}" if pdf else "")
              + f" ({written['seconds']:.1f} s)")
    return written
