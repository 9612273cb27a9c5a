"""The PDF: results -> summary, figures, ``numbers.json`` -> Typst -> ``report.pdf``."""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

from ..files import atomic_write
from ..results import load_results
from .figures import make_figures
from .numbers import report_numbers
from .summary import summarize, write_summary

ROOT = Path(__file__).resolve().parent.parent.parent
#: the report's Typst source: package data, so an installed package builds the PDF too
REPORT_TYP = Path(__file__).resolve().parent / "report.typ"


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
    pdf = typst.compile(str(typ), root=str(root), format="pdf",
                        sys_inputs={"numbers": _root_relative(numbers_json, root),
                                    "figures": _root_relative(figures_dir, root)})
    return atomic_write(out, pdf)


#: the largest relative weight difference that counts as rounding, per dtype: float64 keeps
#: the equivalence tests' 1e-12; float32 rounding grows with the steps (about 1e-7 per step
#: times the trajectory's condition), so its bound is looser
ROUNDING = {"float64": 1e-12, "float32": 1e-4}


#: a variant departs "alike" the one-ulp control when its largest difference is at most this
#: many times the control's: rounding differences of another order (the sums' order, not one
#: ulp of the initial weights) start larger, and the trajectory amplifies both alike
CONTROL_FACTOR = 100.0


def equivalence_numbers(eq) -> dict:
    """The per-step comparison (``results/equivalence.csv``: problem, dtype, path, label, step,
    rel_diff) in the report's words: the largest difference per dtype, and per problem and
    dtype whether it stays at rounding level (:data:`ROUNDING`) or from which step and
    variant it departs, and then whether the variants depart alike the one-ulp control
    (:data:`cnn.study.equivalence.CONTROL_LABEL`: within :data:`CONTROL_FACTOR` of its
    largest difference), which tells an amplifying trajectory from another algorithm."""
    import pandas as pd

    from ..study.equivalence import CONTROL_LABEL
    eq = eq if "problem" in eq else eq.assign(problem="")
    control = eq[eq["label"] == CONTROL_LABEL]
    eq = eq[eq["label"] != CONTROL_LABEL]
    last = eq.sort_values("step").groupby(["problem", "dtype", "label"]).last()["rel_diff"]

    def worst(dtype):
        d = eq.loc[eq["dtype"] == dtype, "rel_diff"]
        return f"{d.max():.1e}" if len(d) else "–"

    by_problem = []
    for problem, rows in eq.groupby("problem", sort=False):
        entry = {"problem": problem}
        for dtype, bound in ROUNDING.items():
            d = rows[rows["dtype"] == dtype]
            if not len(d):
                entry[dtype] = "not run"
                continue
            over = d[d["rel_diff"] > bound].sort_values(["step", "rel_diff"],
                                                        ascending=[True, False])
            text = f"at most {d['rel_diff'].max():.1e}"
            c = control[(control["problem"] == problem) & (control["dtype"] == dtype)]
            alike = None
            if len(over):
                first = over.iloc[0]
                labels = over["label"].unique()
                text += (f", beyond rounding ({bound:.0e}) from step {int(first['step'])} "
                         f"({first['label']} first; {len(labels)} of "
                         f"{d['label'].nunique()} variants)")
                if len(c):
                    worst_variant = d.groupby("label")["rel_diff"].max()
                    faster = worst_variant[worst_variant > CONTROL_FACTOR
                                           * max(c["rel_diff"].max(), bound)]
                    alike = faster.empty
                    text += (f"; the one-ulp control reaches {c['rel_diff'].max():.1e}: "
                             + ("every variant departs alike it (rounding, amplified by the "
                                "trajectory)" if alike else
                                f"{', '.join(faster.index)} depart(s) faster than it"))
            elif len(c):
                text += f" (the one-ulp control: at most {c['rel_diff'].max():.1e})"
            entry[dtype] = text
            if alike is not None:
                entry[f"{dtype}_alike_control"] = alike
        entry["rounding"] = all(e.startswith("at most") and "beyond" not in e
                                for k, e in entry.items() if k in ROUNDING and e != "not run")
        by_problem.append(entry)
    departures = [f"{e['problem']} {dtype}" for e in by_problem for dtype in ROUNDING
                  if "beyond" in e.get(dtype, "")]
    return {"variants": int(eq["label"].nunique()), "steps": int(eq["step"].max()),
            "at_rounding": [f"{e['problem']} {dtype}" for e in by_problem for dtype in ROUNDING
                            if e.get(dtype, "not run") != "not run"
                            and "beyond" not in e[dtype]],
            "departures": departures,
            # None without a control to hold the departures against
            "departures_alike_control": (
                all(e.get(f"{dtype}_alike_control", False) for e in by_problem
                    for dtype in ROUNDING if "beyond" in e.get(dtype, ""))
                if departures and len(control) else None),
            "max64": worst("float64"), "max32": worst("float32"),
            "labels": sorted(eq["label"].unique()),
            "skipped": list(eq.attrs.get("skipped", [])),
            "by_problem": by_problem, "control_factor": f"{CONTROL_FACTOR:.0f}",
            "all_rounding": all(e["rounding"] for e in by_problem),
            "final": {" ".join(map(str, k)).strip(): f"{v:.1e}"
                      for k, v in pd.Series(last).items()}}


def more_figures(figures_dir, dpi: int, cluster: dict | None, trace_dir) -> list[dict]:
    """The figures of no one problem that need the scaling model or a trace: one step of
    each trace in ``trace_dir`` (:func:`cnn.analysis.timeline.step_figures`) and the model
    on the emulated cluster per configuration (``cluster``:
    :func:`cnn.analysis.scaling.read_cluster`'s record), saved into ``figures_dir``."""
    from .figures import plot_cluster_scaling, save_figure
    from .scaling import cluster_scaling, machine_cores, prediction_band
    from .timeline import step_figures
    made = []
    for i, (title, fig) in enumerate(step_figures(trace_dir)):
        made.append(save_figure(fig, figures_dir, "timeline", "", f"One training step of "
                    f"{title} on cifar_tutorial, batch 32 (a typical step: the median "
                    f"duration, each epoch's first left out), from a trace of fit(trace=...) "
                    f"committed under results/: a row per worker thread or rank and the "
                    f"prefetcher, nested spans drawn thinner inside their parents.", dpi,
                    name=f"step{i}"))
    if cluster is not None:
        measured, cores = cluster_scaling(cluster), machine_cores(cluster)
        for config in cluster.get("one_core", {}):
            fig = plot_cluster_scaling(prediction_band(cluster, config), measured, cores,
                                       config)
            if fig is not None:
                made.append(save_figure(fig, figures_dir, "cluster_scaling", "",
                                        _cluster_caption(cluster, config, cores), dpi,
                                        name=config.replace("/", "_b")))
    return made


def _cluster_caption(record: dict, config: str, cores: int) -> str:
    from .statistics import interval_text
    from .scaling import cluster_fit
    n = min(cluster_fit(record, p).points for p in record["profiles"])
    return (f"The scaling model on the emulated cluster ({config}: preset/batch): per link "
            f"profile the model's speed-up over one core with the allreduce fitted on that "
            f"link (solid; a prediction beyond the measured ranks), its band ({interval_text('band', n)}), and the speed-ups measured at "
            f"{', '.join(map(str, record.get('ranks', [])))} ranks (dots; hollow: more ranks "
            f"than the machine's {cores} cores, which the model's check divides the computing "
            f"over). Shaded: beyond the cores of this machine.")


def build_report(results, out="report/report.pdf", *, figures_dir=None, summary_dir=None,
                 generated_dir=None, gpu_kernels=None, n_boot: int = 0, level: float = 0.95,
                 seed: int = 0, dpi: int = 150, typ=REPORT_TYP, pdf: bool = True,
                 verbose: bool = True, merge=(), equivalence=None, allreduce=None,
                 cluster=None, roofline=None, trace_dir=None) -> dict:
    """The one command: results pickle -> summary (CSV, JSON) + figures + ``numbers.json`` ->
    PDF. Defaults: figures in ``<results dir>/figures``, the summary beside the results,
    ``numbers.json`` in ``<out dir>/generated``, the GPU table from ``<results dir>/
    gpu_kernels.csv`` (else the repository's ``results/gpu_kernels.csv``), the equivalence
    table from ``<results dir>/equivalence.csv`` and the MPI allreduce fit from
    ``<results dir>/mpi_allreduce.json``, the emulated cluster's figures from
    ``mpi_cluster.json``, the roofline from ``roofline.json`` and the step traces
    (``trace_*.json``, :data:`cnn.analysis.timeline.STEP_TRACES`) from ``<results dir>`` (or
    ``trace_dir``) when they exist. ``merge``: more results files (for
    example another machine's, ``results/device/df_results.pkl``), analysed beside the main
    one (speed-ups are only ever formed within one machine). Returns the paths written and the
    seconds taken."""
    import pandas as pd

    from ..study.equivalence import read as read_equivalence
    from ..files import read_structured
    from .scaling import read_allreduce, read_cluster, scaling_model
    t0 = time.perf_counter()
    results = Path(results)
    out = Path(out)
    figures_dir = Path(figures_dir) if figures_dir else results.parent / "figures"
    summary_dir = Path(summary_dir) if summary_dir else results.parent
    generated_dir = Path(generated_dir) if generated_dir else out.parent / "generated"
    if gpu_kernels is None:
        cands = [results.parent / "gpu_kernels.csv", ROOT / "results" / "gpu_kernels.csv"]
        gpu_kernels = next((c for c in cands if c.exists()), None)
    frames = [load_results(results)] + [load_results(m) for m in merge]
    df = pd.concat(frames, ignore_index=True) if len(frames) > 1 else frames[0]
    source = " + ".join(str(x) for x in (results, *merge))
    summary = summarize(df, n_boot=n_boot, level=level, seed=seed, source=source)
    eq = read_equivalence(equivalence or results.parent / "equivalence.csv")
    ar = read_allreduce(allreduce or results.parent / "mpi_allreduce.json")
    summary.extra["scaling"] = scaling_model(summary, ar)
    summary.extra["allreduce"] = ar
    summary.extra["cluster"] = read_cluster(cluster or results.parent / "mpi_cluster.json")
    roofline = Path(roofline) if roofline else results.parent / "roofline.json"
    summary.extra["roofline"] = read_structured(roofline, "roofline") if roofline.is_file() \
        else None
    summary.extra["allreduce_text"] = (
        f"alpha = {ar['alpha'] * 1e6:.1f} us, beta = {ar['beta'] * 1e9:.3f} ns/byte at "
        f"{int(ar.get('ranks', 2))} ranks (from {ar['source']})" if ar else "")
    if eq is not None and len(eq):
        summary.extra["equivalence_numbers"] = equivalence_numbers(eq)
    paths = write_summary(summary, summary_dir)
    figures = make_figures(summary, figures_dir, dpi=dpi, equivalence=eq,
                           roofline=summary.extra["roofline"])
    figures += more_figures(figures_dir, dpi, summary.extra["cluster"],
                            Path(trace_dir) if trace_dir else results.parent)
    numbers = report_numbers(summary, figures, gpu_kernels)
    numbers["gpu"]["kernels_source"] = str(gpu_kernels) if gpu_kernels else ""
    generated_dir.mkdir(parents=True, exist_ok=True)
    numbers_path = generated_dir / "numbers.json"
    atomic_write(numbers_path, json.dumps(numbers, indent=1, ensure_ascii=False))
    written = {**{f"summary_{k}": v for k, v in paths.items()}, "numbers": numbers_path,
               "figures": [Path(f["path"]) for f in figures]}
    if pdf:
        written["pdf"] = compile_report(numbers_path, figures_dir, out, typ)
    written["seconds"] = time.perf_counter() - t0
    if verbose:
        c = numbers["counts"]
        print(f"{c['runs_ok']} runs ok, {c['runs_failed']} failed and {c['runs_diverged']} "
              f"diverged (excluded); {len(figures)} figures in {figures_dir}; summary "
              f"{paths['csv']}; numbers {numbers_path}"
              + (f"; report {written['pdf']}" if pdf else "") + f" ({written['seconds']:.1f} s)")
    return written
