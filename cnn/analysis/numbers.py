"""Every number and generated sentence the report prints (``numbers.json``), and their
formatting."""
from __future__ import annotations

from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pandas as pd

from .. import paths as P
from .summary import (BASELINE_PATH, Summary, at_largest_p, cold_compile, config_text,
                      jsonable, noise, simulator_check, sort_number, sync_check)
from ..results import MACHINE_COLUMNS
from .statistics import ALPHA, INTERVAL_METHODS, interval_text
from .text import fmt, fmt_ci, fmt_int, fmt_pct, fmt_prediction, fmt_sig, is_missing


def _table_rows(t: pd.DataFrame) -> list[dict]:
    rows, prev = [], None
    for _, r in t.iterrows():
        seq = r["path"] == BASELINE_PATH
        rows.append({
            "first": bool(rows) and r["config_id"] != prev,
            "label": r["label"] + (" †" if r["oversubscribed"] else ""),
            "batch": fmt_int(r["batch_size"]), "filters": fmt_int(r["filters"]),
            "n": str(int(r["n_repeats"])),
            "time": fmt_ci(r["epoch_time_median"], r["epoch_time_ci_lo"], r["epoch_time_ci_hi"]),
            "ips": fmt_ci(r["images_per_sec_median"], r["images_per_sec_ci_lo"],
                          r["images_per_sec_ci_hi"]),
            "speedup": "1 (base)" if seq else fmt_ci(r["speedup"], r["speedup_ci_lo"],
                                                     r["speedup_ci_hi"]),
            "speedup_best": ("1 (base)" if r["best_label"] == r["label"] else
                             fmt_ci(r["speedup_best"], r["speedup_best_ci_lo"],
                                    r["speedup_best_ci_hi"])),
            "speedup_self": ("–" if is_missing(r["speedup_self"]) or r["p"] == 1 else
                             fmt_ci(r["speedup_self"], r["speedup_self_ci_lo"],
                                    r["speedup_self_ci_hi"])),
            "efficiency": "–" if not r["p"] > 1 else fmt(r["efficiency_best"]),
            "p_best": ("–" if r["speedup_best_verdict"] == "" else
                       f"{fmt_p(r['speedup_best_p_holm'])} ({r['speedup_best_verdict']})"),
            "karp_flatt": fmt(r["karp_flatt_self"], 2),
            "accuracy": fmt_pct(r["final_accuracy_median"]),
            "acc_diff": "–" if seq else _pp(r["accuracy_diff_pp"]),
        })
        prev = r["config_id"]
    return rows


def _pp(x) -> str:
    return "–" if is_missing(x) else f"{float(x):+.2f} pp"


def _short_config(r) -> str:
    return f"b{fmt_int(r['batch_size'])} f{fmt_int(r['filters'])}"


def speedup_verdicts(t: pd.DataFrame, col: str = "speedup_best") -> dict:
    """Per problem and variant using more than one core (p > 1: a one-thread backend swap is
    not parallelism) within the machine's cores: in how many configurations the paired test
    of the speed-up against the base ``col`` (a t-test on the per-seed log ratios, Holm-
    corrected over every such pair: :func:`cnn.analysis.summary.tested`) finds it faster
    (pays), slower (loses) or cannot tell, each with its corrected p. Oversubscribed points
    are neither tested nor counted (``n_oversubscribed`` says how many were left out)."""
    empty = {"n": 0, "n_pays": 0, "n_loses": 0, "n_unclear": 0, "rows": [], "baseline": col,
             "n_oversubscribed": 0, "alpha": fmt(ALPHA, 2), "test": TEST_TEXT}
    if not len(t):
        return empty
    over = int(((t["p"] > 1) & t["oversubscribed"].astype(bool)).sum())
    par = t[t[f"{col}_verdict"] != ""]
    if not len(par):
        return {**empty, "n_oversubscribed": over}
    v = par[f"{col}_verdict"]
    rows = []
    for (problem, lb), g in par.groupby(["problem", "label"], sort=False):
        gv = v[g.index]

        def where(kind, g=g, gv=gv):
            return ", ".join(f"{_short_config(r)} ({p_text(r[f'{col}_p_holm'])})"
                             for _, r in g[gv == kind].iterrows()) or "–"
        rows.append({"problem": problem, "label": lb, "n": str(len(g)),
                     "pays": str(int((gv == "pays").sum())),
                     "loses": str(int((gv == "loses").sum())),
                     "unclear": str(int((gv == "inconclusive").sum())),
                     "where_pays": where("pays"), "where_loses": where("loses"),
                     "where_unclear": where("inconclusive")})
    return {"n": int(len(par)), "n_pays": int((v == "pays").sum()),
            "n_loses": int((v == "loses").sum()),
            "n_unclear": int((v == "inconclusive").sum()), "rows": rows, "baseline": col,
            "n_oversubscribed": over, "alpha": fmt(ALPHA, 2), "test": TEST_TEXT}


#: the pays/loses rule, in the report's words
TEST_TEXT = ("a two-sided paired t-test of the per-seed log ratios of the epoch times (seeds "
             "pair the runs), Holm-Bonferroni-corrected over every variant-configuration pair "
             f"tested, at a family-wise error rate of {ALPHA:.0%}")


def p_text(p) -> str:
    """``p = 0.0053`` or ``p < 0.001``."""
    text = fmt_p(p)
    return f"p {text}" if text.startswith("<") else f"p = {text}"


def fmt_p(p) -> str:
    """A p-value: two significant digits, ``< 0.001`` below that."""
    if is_missing(p):
        return "–"
    return "< 0.001" if float(p) < 0.001 else fmt_sig(p, 2)


def speedup_trends(t: pd.DataFrame) -> list[dict]:
    """How the speed-up against the best one-core contender of each variant (at its largest p
    within the cores) moves with the batch size, filters held fixed, and with the filter
    count, batch size held fixed; ``clear`` when the intervals at the two ends do not
    overlap."""
    out = []
    t = at_largest_p(t)
    for (problem, lb), g in t.groupby(["problem", "label"], sort=False):
        for axis, other, unit, ounit in (("batch_size", "filters", "batch", "filters"),
                                         ("filters", "batch_size", "filters", "batch")):
            for ov, h in g.groupby(other, dropna=False):
                h = h.sort_values(axis, key=lambda s: s.map(sort_number))
                if h[axis].nunique() < 2:
                    continue
                a, b = h.iloc[0], h.iloc[-1]
                clear = ((a["speedup_best_ci_hi"] < b["speedup_best_ci_lo"])
                         or (b["speedup_best_ci_hi"] < a["speedup_best_ci_lo"]))
                out.append({"problem": problem, "label": lb, "fixed": f"{ounit} {fmt_int(ov)}",
                            "varied": unit,
                            "values": ", ".join(f"{fmt_int(x)}: {fmt(y)}" for x, y in
                                                zip(h[axis], h["speedup_best"])),
                            "direction": ("rises" if b["speedup_best"] > a["speedup_best"]
                                          else "falls"),
                            "clear": "yes" if clear else "no"})
    return out


def _machines(summary: Summary) -> list[dict]:
    r = summary.results[summary.results["status"] == "ok"]
    if r.empty:
        r = summary.results
    cols = [c for c in MACHINE_COLUMNS if c != "git_commit"]
    m = r[cols].copy()
    if "sgemm_peak_gflops" in m:  # measured per study; its digits beyond 0.1 GFLOP/s are noise
        m["sgemm_peak_gflops"] = pd.to_numeric(m["sgemm_peak_gflops"], errors="coerce").round(1)
    m = m.astype(object).where(m.notna(), "not recorded").astype(str)
    return m.drop_duplicates().to_dict("records")


def _model_text(name: str) -> str:
    try:
        from ..presets import get_preset
        spec = get_preset(name)
    except (ValueError, ImportError):
        return name
    parts = []
    for layer in spec["layers"]:
        kind = layer["type"]
        if kind == "conv2d":
            act = f" {layer['activation']}" if layer.get("activation") else ""
            parts.append(f"conv {layer['filters']}×{layer['kernel_size']}×{layer['kernel_size']}{act}")
        elif kind == "maxpool2d":
            parts.append(f"max-pool {layer['pool_size']}")
        elif kind == "dense":
            act = f" {layer['activation']}" if layer.get("activation") else ""
            parts.append(f"dense {layer['units']}{act}")
        else:
            parts.append(kind)
    return " → ".join(parts) + " → softmax"


def read_gpu_kernels(path) -> list[dict] | None:
    """The on-paper GPU analysis (``results/gpu_kernels.csv``: kernel, arch, registers,
    smem_bytes, spill_stores, spill_loads, threads_per_block, occupancy, arithmetic_intensity)
    as rows of display strings, or None when the file is absent or empty."""
    path = Path(path) if path else None
    if path is None or not path.exists():
        return None
    k = pd.read_csv(path)
    if k.empty:
        return None
    rows = []
    for _, r in k.iterrows():
        row = {}
        for col, v in r.items():
            if is_missing(v):
                row[col] = "–"
            elif col == "occupancy" and 0 <= float(v) <= 1:
                row[col] = fmt_pct(v, 0)
            elif isinstance(v, (int, np.integer)) or (isinstance(v, float) and v.is_integer()
                                                       and col != "arithmetic_intensity"):
                row[col] = str(int(v))
            elif isinstance(v, (float, np.floating)):
                row[col] = fmt(v)
            elif col == "kernel":  # display only: every name ends in _kernel
                row[col] = str(v).removesuffix("_kernel")
            else:
                row[col] = str(v)
        rows.append(row)
    return rows


def communication(t: pd.DataFrame) -> list[dict]:
    """Per configuration of a communicating path with more than one worker: the median
    seconds per epoch spent computing and communicating (threads and processes: the reduce
    phase; MPI: the allreduce), and the share of the steps' time that communication took."""
    rows = []
    if not len(t) or "comm_per_epoch" not in t:
        return rows
    communicating = [n for n, e in P.PATHS.items() if e.communicates]  # comm_time measured
    sel = t[t["path"].isin(communicating) & (t["p"] > 1) & t["comm_per_epoch"].notna()]
    for _, r in sel.iterrows():
        steps = r["compute_per_epoch"] + r["comm_per_epoch"]
        rows.append({"problem": r["problem"], "label": r["label"], "config": _short_config(r),
                     "compute": fmt(r["compute_per_epoch"]), "comm": fmt(r["comm_per_epoch"]),
                     "share": fmt_pct(r["comm_per_epoch"] / steps) if steps > 0 else "–",
                     # the summary's column, from the recorded machine's cores
                     "oversubscribed": bool(r.get("oversubscribed", False))})
    return rows


def _best_parallel(tp: pd.DataFrame, col: str):
    par = tp[(tp["p"] > 1) & tp[col].notna() & ~tp["oversubscribed"].astype(bool)]
    if not len(par):
        return None
    r = par.loc[par[col].idxmax()]
    return {"label": r["label"], "config": config_text(r), "p": fmt_int(r["p"]),
            "speedup": fmt_ci(r[col], r[f"{col}_ci_lo"], r[f"{col}_ci_hi"]),
            "speedup_seq": fmt_ci(r["speedup"], r["speedup_ci_lo"], r["speedup_ci_hi"]),
            "best_label": r["best_label"],
            "self_relative": bool(r["best_variant"] == r["variant"]),
            "efficiency": fmt(r[col] / r["p"]), "superlinear": bool(r[col] > r["p"]),
            "superlinear_seq": bool(r["speedup"] > r["p"])}


def _superlinear(tp: pd.DataFrame) -> list[dict]:
    """Every S > p (against any baseline), with the per-image times that explain it."""
    out = []
    for _, r in tp[(tp["p"] > 1)].iterrows():
        over = [name for col, name in (("speedup", "sequential"),
                                       ("speedup_best", "best one-core"),
                                       ("speedup_self", "own one-worker run"))
                if np.isfinite(r[col]) and r[col] > r["p"]]
        if not over:
            continue
        base = tp[(tp["config_id"] == r["config_id"]) & (tp["path"] == BASELINE_PATH)]
        out.append({"label": r["label"], "config": config_text(r), "p": fmt_int(r["p"]),
                    "against": ", ".join(over), "speedup": fmt(r["speedup"]),
                    "speedup_self": fmt(r["speedup_self"]),
                    "backend": str(r["backend"]),
                    "ms_per_image": fmt(r["time_per_image_ms"] * r["p"]),
                    "seq_ms_per_image": fmt(base["time_per_image_ms"].iat[0]) if len(base)
                    else "–"})
    return out


def _lr_text(lr) -> str:
    return "–" if is_missing(lr) else f"{float(lr):g}"


def _lr_exceptions(tt: pd.DataFrame) -> list[dict]:
    """The time-to-accuracy rows that train at another learning rate than most rows of their
    configuration (a grid's rule for one variant, e.g. hogwild at lr / p)."""
    out = []
    for _, g in tt[tt["lr"].notna()].groupby("config_id", sort=False):
        usual = g["lr"].mode().iat[0]
        out += [{"label": r["label"], "config": config_text(r), "lr": _lr_text(r["lr"]),
                 "usual": _lr_text(usual)} for _, r in g[g["lr"] != usual].iterrows()]
    return out


def _tta_rows(tt: pd.DataFrame) -> list[dict]:
    return [{"label": r["label"], "config": config_text(r), "target": fmt_pct(r["target"], 1),
             "lr": _lr_text(r["lr"]),
             "runs": str(int(r["n_runs"])), "reached": str(int(r["n_reached"])),
             "failed": str(int(r["n_failed"])), "cap": str(int(r["cap_epochs"])),
             "time": fmt_ci(r["time_to_target_median"], r["time_to_target_ci_lo"],
                            r["time_to_target_ci_hi"]),
             "steps": fmt(r["steps_to_target_median"]),
             "per_step_ms": fmt(1000 * r["time_per_step"]),
             "product": fmt(r["steps_x_time_per_step"]),
             "speedup": ("1 (base)" if r["path"] == BASELINE_PATH else
                         fmt_ci(r["tta_speedup"], r["tta_speedup_ci_lo"],
                                r["tta_speedup_ci_hi"]))}
            for _, r in tt.iterrows()]


def report_numbers(summary: Summary, figures: list[dict], gpu_kernels=None) -> dict:
    """Every number and generated sentence ``cnn/analysis/report.typ`` prints (a JSON-able dict)."""
    runs, t, res = summary.runs, summary.table, summary.results
    PATHS = P.path_names()
    present = [p for p in PATHS if p in set(runs["path"])] + sorted(set(runs["path"]) - set(PATHS))
    failed_only = sorted(set(summary.failed["path"]) - set(present)) if len(summary.failed) else []
    started = pd.to_datetime(res["started_at"], errors="coerce", utc=True,
                             format="ISO8601").dropna()
    timing = runs[~runs["tta"]] if len(runs) else runs
    reps = (timing.groupby(["config_id", "variant", "threads"], dropna=False).size()
            if len(timing) else pd.Series(dtype=int))
    epochs = sorted(int(x) for x in timing["n_epochs"].unique()) if len(timing) else []
    scaling = summary.extra.get("scaling")
    problems = []
    for problem in summary.problems:
        tp = t[t["problem"] == problem]
        rp = runs[runs["problem"] == problem]
        am = summary.amdahl[summary.amdahl["problem"] == problem]
        tt = summary.tta[summary.tta["problem"] == problem]
        params = rp.groupby("filters", dropna=False)["num_params"].first()
        sc = scaling[scaling["problem"] == problem] if scaling is not None and len(scaling) \
            else None
        problems.append({
            "name": problem, "dataset": str(rp["dataset"].iat[0]), "model": str(rp["model"].iat[0]),
            "architecture": _model_text(str(rp["model"].iat[0])),
            "params": ", ".join(f"{fmt_int(k)} filters: {int(v):,} parameters"
                                for k, v in params.items() if not is_missing(v)),
            "train_size": ", ".join(sorted({fmt_int(x) for x in rp["train_size"]})),
            "test_size": ", ".join(sorted({fmt_int(x) for x in rp["test_size"].dropna()})) or "–",
            "runs": int(rp["run_key"].nunique()), "configs": int(rp["config_id"].nunique()),
            "paths": [p for p in present if p in set(rp["path"])],
            "absent": [p for p in PATHS if p not in set(rp["path"])],
            "no_baseline": sorted({config_text(r) for _, r in tp.iterrows()
                                   if r["n_baseline"] == 0}),
            "best": _best_parallel(tp, "speedup_best"),
            "best_seq": _best_parallel(tp, "speedup"),
            "contenders": sorted({r["best_label"] for _, r in tp.iterrows() if r["best_label"]}),
            "superlinear": _superlinear(tp),
            "table": _table_rows(tp),
            "oversubscribed": sorted({r["label"] for _, r in tp.iterrows() if r["oversubscribed"]}),
            "amdahl": [{"variant": r["variant"], "config": config_text(r),
                        "p_values": r["p_values"], "excluded": r["excluded"] or "–",
                        "f": fmt_ci(r["amdahl_f"], r["amdahl_f_ci_lo"], r["amdahl_f_ci_hi"], 2),
                        "f_self": fmt_ci(r["amdahl_f_self"], r["amdahl_f_self_ci_lo"],
                                         r["amdahl_f_self_ci_hi"], 2),
                        "rms": fmt(r["rms_residual_self"], 2),
                        "kf": fmt(r["karp_flatt_self_at_p_max"], 2),
                        "p_max": fmt_int(r["p_max"])} for _, r in am.iterrows()],
            "tta": _tta_rows(tt),
            "lr_exceptions": _lr_exceptions(tt),
            "rates": [{"label": r["label"], "config": config_text(r),
                       "ips": fmt(r["images_per_sec_median"]), "gflops": fmt(r["gflops"]),
                       "peak": fmt_pct(r["peak_fraction"], 1)}
                      for _, r in tp[(tp["p"] == 1) & tp["gflops"].notna()].iterrows()],
            "scaling": predictions(sc),
            "figures": [f for f in figures if f["problem"] == problem],
        })
    ok_machines = _machines(summary)
    cuda_ok = "cuda" in set(runs["path"])
    cuda_failed = summary.failed[summary.failed["path"] == "cuda"] if len(summary.failed) else []
    n_rep_min = int(reps.min()) if len(reps) else 0
    cov = t["ci_coverage"].dropna() if len(t) else pd.Series(dtype=float)
    orders = res["order_seed"].dropna().unique() if "order_seed" in res else []
    numbers = {
        "generated_at": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "source": summary.source,
        "counts": {
            "rows": int(len(res)), "runs": int(res["run_key"].nunique()),
            "runs_ok": int(runs["run_key"].nunique()) if len(runs) else 0,
            "runs_failed": int((summary.failed["status"] != "diverged").sum())
            if len(summary.failed) else 0,
            "runs_diverged": int((summary.failed["status"] == "diverged").sum())
            if len(summary.failed) else 0,
            "repeats_min": n_rep_min, "repeats_max": int(reps.max()) if len(reps) else 0,
            "epochs": ", ".join(map(str, epochs)) or "–",
            "configs": int(runs["config_id"].nunique()) if len(runs) else 0,
            "problems": len(summary.problems),
            "groups": int(len(t)),
            "tta_runs": int(runs["tta"].sum()) if len(runs) else 0,
        },
        "period": {"start": started.min().strftime("%Y-%m-%d %H:%M") if len(started) else "–",
                   "end": started.max().strftime("%Y-%m-%d %H:%M") if len(started) else "–"},
        "machines": ok_machines,
        "commits": sorted({str(c) for c in res["git_commit"].dropna()}),
        "versions": {c: sorted({str(v) for v in res[c].dropna()}) for c in
                     ("python", "numpy_version", "numba_version", "tensorflow_version",
                      "keras_version", "torch_version", "mpi4py_version") if c in res},
        "failed": [{"run_key": r["run_key"], "path": r["path"], "status": r["status"],
                    "error": str(r.get("error", ""))[:160]} for _, r in summary.failed.iterrows()],
        "paths": {"expected": list(PATHS), "present": present,
                  "absent": [p for p in PATHS if p not in present], "failed_only": failed_only},
        "method": {"level": fmt_pct(summary.level, 0), "n_min": n_rep_min,
                   "coverage_min": fmt_pct(cov.min(), 0) if len(cov) else "–",
                   "coverage_max": fmt_pct(cov.max(), 0) if len(cov) else "–",
                   "randomised": bool(len(orders)),
                   "order_seeds": ", ".join(str(int(x)) for x in orders) or "–",
                   "min_p_for_fits": 3},
        "problems": problems,
        "verdicts": speedup_verdicts(t) if len(t) else {"n": 0},
        "verdicts_seq": speedup_verdicts(t, "speedup") if len(t) else {"n": 0},
        "trends": speedup_trends(t) if len(t) else [],
        "communication": communication(t),
        "sync": sync_check(summary),
        "noise": noise(summary),
        "cold_compile": cold_compile(summary),
        "equivalence": summary.extra.get("equivalence_numbers", {"variants": 0}),
        "allreduce": summary.extra.get("allreduce_text", ""),
        "gpu": {"cuda_measured": bool(cuda_ok), "cuda_failed": int(len(cuda_failed)),
                "simulated": simulator_check(summary),
                "cuda_error": (str(cuda_failed["error"].iat[0])[:160] if len(cuda_failed) else ""),
                "kernels": read_gpu_kernels(gpu_kernels)},
        "datasets": sorted(set(runs["dataset"])) if len(runs) else [],
        "global_figures": {kind: [f for f in figures if not f["problem"] and f["kind"] == kind]
                           for kind in ("equivalence", "timeline", "cluster_scaling",
                                        "roofline")},
        "scaling_checks": scaling_checks(scaling),
        "predictions": predictions(scaling),
        "intranode_fit": intranode_fit(summary.extra.get("allreduce")),
        "cluster": cluster_numbers(summary.extra.get("cluster")),
        "roofline": roofline_numbers(summary.extra.get("roofline")),
        "slower": slower_than_one_core(t),
        "self_relative": self_relative(t),
        "title": measured_title(present, summary.extra.get("cluster") is not None,
                                bool(cuda_ok)),
        "intervals": {kind: interval_text(kind, n_rep_min, cov.min() if len(cov) and kind in
                                          ("median", "ratio", "fit") else None)
                      for kind in INTERVAL_METHODS},
    }
    s = numbers["sync"]
    if s.get("pairs"):
        s["max_text"] = f"{s['max_abs_diff_pp']:.2f}"
        s["spread_text"] = f"{s['seed_spread_pp_max']:.2f}"
        s["n_configs"] = len(s["configs"])
        # each configuration against its own reference's spread, never another's
        s["within_spread"] = not s["outside"]
        for c in s["configs"]:
            c["text"] = (f"{c['problem']} b{c['batch_size']}"
                         f"{' (to the target)' if c['tta'] else ''}: "
                         f"{c['max_abs_diff_pp']:.2f} against {c['seed_spread_pp']:.2f} "
                         f"(reference {c['reference']}, {100 * c['reference_accuracy']:.1f}%)")
        s["outside_text"] = [c["text"] for c in s["outside"]]
        s["tta_text"] = [c["text"] for c in s["configs"] if c["tta"]]
    n = numbers["noise"]
    if n.get("groups"):
        n["cv_median_text"], n["cv_max_text"] = fmt_pct(n["cv_median"]), fmt_pct(n["cv_max"])
    return _json_clean(numbers)


def _json_clean(x):
    if isinstance(x, dict):
        return {str(k): _json_clean(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_json_clean(v) for v in x]
    return jsonable(x)


# ---- the third edition's additions: scaling checked, predictions as such, the setup --------------
def _signed_pct(x) -> str:
    return "–" if is_missing(x) else f"{100 * float(x):+.0f}%"


def scaling_checks(model: pd.DataFrame | None) -> list[dict]:
    """The scaling model against every point measured on one host (threads, processes, MPI
    ranks; p > 1): measured and predicted self-relative speed-up and the model's error with its
    sign (``+``: the model predicts faster than measured). Points with more workers than
    cores are listed, marked, and not checked (the model splits the compute over p cores)."""
    if model is None or not len(model):
        return []
    m = model[model["measured"].notna() & (model["p"] > 1)]
    return [{"problem": r["problem"], "variant": r["variant"], "config": r["title"],
             "p": fmt_int(r["p"]), "oversubscribed": bool(r["oversubscribed"]),
             "measured": fmt(r["measured"]), "model": fmt(r["predicted_threads"]),
             "error": _signed_pct(r["rel_error"])} for _, r in m.iterrows()]


def predictions(model: pd.DataFrame | None, p: float = 64.0) -> list[dict]:
    """Per variant, the speed-up the model predicts at ``p`` with its band, beside the
    Karp-Flatt reading of the largest point measured within the cores (its ``e`` carried by
    Amdahl's law): both two significant digits and labelled as predictions."""
    if model is None or not len(model):
        return []
    rows = []
    for _, r in model[model["p"] == p].iterrows():
        rows.append({"problem": r["problem"], "variant": r["variant"], "config": r["title"],
                     "p": fmt_int(p),
                     "model": fmt_prediction(r["predicted_threads"], r["band_low"],
                                             r["band_high"]),
                     "model_mpi": "–" if is_missing(r["predicted_mpi"]) else
                     fmt_prediction(r["predicted_mpi"]),
                     "karp_flatt": fmt_prediction(r["karp_flatt_prediction"]),
                     "e": fmt(r["karp_flatt_e"], 2)})
    return rows


def intranode_fit(allreduce: dict | None) -> dict:
    """The error of the one-host allreduce fit ``t = alpha + beta n`` (``mpi_allreduce.json``)
    at its own measured points: worst and median ``|fit - measured| / measured``."""
    if not allreduce or not allreduce.get("allreduce"):
        return {}
    pts = allreduce["allreduce"]
    err = np.array([abs(allreduce["alpha"] + allreduce["beta"] * r["bytes"] - r["seconds"])
                    / r["seconds"] for r in pts])
    return {"points": len(pts), "worst": fmt_pct(err.max(), 0), "median": fmt_pct(np.median(err), 0),
            "ranks": int(allreduce.get("ranks", 2))}


def cluster_numbers(record: dict | None) -> dict:
    """The emulated cluster (``mpi_cluster.json``) in the report's words: per link profile
    the allreduce fit and its error (worst and median over the points it was fitted to, and
    over every measured point); the model against every measured training step (error with
    its sign); and the predicted speed-up at p = 64 with its band."""
    if record is None:
        return {"measured": False}
    from .scaling import (P_GRID, allreduce_table, cluster_fit, cluster_scaling, machine_cores,
                          prediction_band)
    cores = machine_cores(record)
    table = allreduce_table(record)
    fits = []
    for profile, g in table.groupby("profile", sort=False):
        fit = cluster_fit(record, profile)
        rate = record["profiles"][profile].get("link", {}).get("rate_bit_per_s")
        err = g["rel_error"].abs()
        fits.append({"profile": profile,
                     "link": "unshaped" if not rate else f"{rate / 1e9:g} Gbit/s",
                     "alpha_us": fmt(fit.alpha * 1e6), "beta": f"{fit.beta:.2e}",
                     "fitted_at": f"p ≤ {cores}", "points": str(fit.points),
                     "worst": fmt_pct(fit.worst_error, 0), "median": fmt_pct(fit.median_error, 0),
                     "worst_all": fmt_pct(err.max(), 0), "median_all": fmt_pct(err.median(), 0)})
    steps = cluster_scaling(record)
    checks = [{"profile": r["profile"], "config": r["config"], "p": str(int(r["p"])),
               "oversubscribed": bool(r["oversubscribed"]),
               "measured_ms": fmt(1e3 * r["measured_step"]),
               "model_ms": fmt(1e3 * r["predicted_step"]), "error": _signed_pct(r["rel_error"]),
               "measured": fmt(r["measured_speedup"]), "model": fmt(r["predicted_speedup"])}
              for _, r in steps.iterrows()]
    preds = []
    for config in record.get("one_core", {}):
        band = prediction_band(record, config)
        for _, r in band[band["p"] == max(P_GRID)].iterrows():
            preds.append({"profile": r["profile"], "config": config, "p": str(max(P_GRID)),
                          "speedup": fmt_prediction(r["speedup"], r["low"], r["high"])})
    errors = steps["rel_error"].abs() if len(steps) else pd.Series(dtype=float)
    return {"measured": True, "cores": cores, "ranks": ", ".join(map(str, record.get("ranks", []))),
            "profiles": list(record["profiles"]), "fits": fits, "checks": checks,
            "predictions": preds,
            "step_error_worst": fmt_pct(errors.max(), 0) if len(errors) else "–",
            "step_error_median": fmt_pct(errors.median(), 0) if len(errors) else "–"}


def roofline_numbers(record: dict | None) -> dict:
    """The roofline's machine (SGEMM peak, triad bandwidth, the ridge between them) and per
    network the ops' best and median share of the peak."""
    if not record or not record.get("networks"):
        return {"measured": False}
    peak, bw = float(record["sgemm_peak_gflops"]), float(record["bandwidth_gbs"])
    nets = []
    for net, rows in record["networks"].items():
        r = pd.DataFrame(rows)
        r = r[r["flops"] > 0]
        share = r["gflops"] / np.minimum(peak, bw * r["intensity"])
        gemm = r["intensity"] >= peak / bw
        nets.append({"network": net, "ops": str(r["op"].nunique()),
                     "points": str(len(r)),
                     "median_share": fmt_pct(share.median(), 0),
                     "compute_bound": str(int(gemm.sum())),
                     "compute_share": fmt_pct(share[gemm].median(), 0) if gemm.any() else "–",
                     "above_roof": str(int((share > 1).sum()))})
    return {"measured": True, "peak": fmt(peak), "bandwidth": fmt(bw), "ridge": fmt(peak / bw, 2),
            "batch": str(record.get("batch", "?")), "backend": str(record.get("backend", "")),
            "networks": nets}


def slower_than_one_core(t: pd.DataFrame) -> list[dict]:
    """Every variant using more than one core (within the cores) whose median speed-up
    against the best one-core contender is below 1, with the paired test's verdict: the
    report says so wherever a two-core path loses to one core."""
    if not len(t):
        return []
    s = t[(t["p"] > 1) & ~t["oversubscribed"].astype(bool) & (t["speedup_best"] < 1)]
    return [{"problem": r["problem"], "label": r["label"], "config": _short_config(r),
             "speedup": fmt(r["speedup_best"]), "best_label": r["best_label"],
             "verdict": r["speedup_best_verdict"] or "not tested",
             "p_holm": p_text(r["speedup_best_p_holm"])} for _, r in s.iterrows()]


def self_relative(t: pd.DataFrame) -> list[dict]:
    """The configurations whose best one-core contender is a variant's own one-worker run
    (``best_variant`` is the variant): there, the speed-up against the best one-core
    contender is self-relative, and the report says so."""
    if not len(t):
        return []
    s = t[(t["p"] > 1) & ~t["oversubscribed"].astype(bool) & (t["best_variant"] == t["variant"])]
    return [{"problem": r["problem"], "label": r["label"], "config": _short_config(r),
             "best_label": r["best_label"]} for _, r in s.iterrows()]


def measured_title(present: list[str], cluster: bool, gpu: bool) -> str:
    """The report's title: what was measured, nothing more."""
    parts = ["threads"]
    if "processes" in present:
        parts.append("processes")
    if "mpi" in present or cluster:
        parts.append("MPI ranks (one host" + (" and an emulated cluster)" if cluster else ")"))
    text = ", ".join(parts[:-1]) + (" and " if len(parts) > 1 else "") + parts[-1]
    return (f"Training CNNs on one CPU core and in parallel over {text}"
            + (", and on a GPU" if gpu else "") + ": speed-up, efficiency and accuracy")
