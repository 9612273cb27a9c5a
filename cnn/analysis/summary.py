"""The one summary of the study's results: per-run table, per-configuration medians, speed-ups
with intervals, efficiency, Karp-Flatt, Amdahl fits, accuracy; the summary files; derived facts.

Failed and diverged runs (``status != 'ok'``) are excluded from every statistic and listed
separately. Nothing here averages speed-ups across configurations (Hoefler & Belli 2015): each
ratio is reported for its own configuration with its own interval.
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from .. import paths as P
from ..results import MACHINE_COLUMNS
from .statistics import (amdahl_speedup, fit_amdahl, karp_flatt, median_ci, percentile_interval,
                         speedup_ci, _fit_amdahl_many)
from .text import _isnan, _pct, fmt

BASELINE_PATH = P.BASELINE
#: what a speed-up is matched on: the sequential run of the same configuration
CONFIG_KEYS = ("dataset", "model", "batch_size", "filters", "train_size", "dtype")
#: ... on the same machine (constant within one study; guards against mixed result files)
MACHINE_KEYS = ("cpu", "cores")
VARIANT_KEYS = ("path", "strategy", "backend")
GROUP_KEYS = CONFIG_KEYS + VARIANT_KEYS + ("threads",)
TIME_PARTS = ("compute", "comm", "data", "transfer", "eval", "compile", "other")


def simulated(df: pd.DataFrame) -> pd.Series:
    """Rows run under the CUDA simulator (``cuda_simulator`` true or ``device ==
    'cuda-simulator'``): correct results, but their times say nothing about speed."""
    sim = pd.Series(False, index=df.index)
    if "cuda_simulator" in df.columns:
        sim |= df["cuda_simulator"].map(lambda v: bool(v) if v == v and v is not None
                                        else False).astype(bool)
    if "device" in df.columns:
        sim |= df["device"].astype(str).eq("cuda-simulator")
    return sim


def split_failed(df: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """``(ok_rows, not_ok_runs)``: the rows of runs whose every row has ``status == 'ok'`` (runs
    under the CUDA simulator excluded, see :func:`simulated`), and one row per run that failed
    or diverged (its configuration, ``status`` and error)."""
    bad_keys = set(df.loc[df["status"] != "ok", "run_key"])
    ok = df[~df["run_key"].isin(bad_keys) & ~simulated(df)]
    failed = (df[df["run_key"].isin(bad_keys) & (df["status"] != "ok")]
              .groupby("run_key", sort=True).first().reset_index())
    cols = ["run_key", "status", *CONFIG_KEYS, *VARIANT_KEYS, "threads", "repeat", "error"]
    return ok, failed[[c for c in cols if c in failed.columns]]


def complete(df: pd.DataFrame) -> pd.DataFrame:
    """``df`` with the optional columns the analysis reads added (NaN) when a frame lacks them
    (a hand-made frame, or a file from an older study), and ``status`` in lower case."""
    missing = [c for c in (*MACHINE_COLUMNS, "num_params", "started_at", "epochs", "test_size",
                           "cold_compile_time", "cuda_simulator", "device", "comm_time",
                           "hosts")
               if c not in df.columns]
    df = df.assign(**{c: np.nan for c in missing}) if missing else df.copy()
    df["status"] = df["status"].astype(str).str.lower()
    return df


# ---- labels (from the path registry) ----------------------------------------------------------
variant_name = P.variant_name
workers = P.workers


def _label(variant: str, p: float) -> str:
    return variant if (variant == BASELINE_PATH or _isnan(p)) else f"{variant} ×{int(p)}"


def _sort_key(path, strategy, backend, threads):
    """Registry order of paths, then each path's own order of strategies and backends."""
    entry = P.PATHS.get(path)
    si = (entry.strategies.index(strategy) if entry and strategy in entry.strategies
          else 99)
    bi = entry.backends.index(backend) if entry and backend in entry.backends else 99
    return (P.order(path), str(path), si, bi, str(backend),
            0 if _isnan(threads) else float(threads))


def _config_text(row, full: bool = False) -> str:
    text = f"batch {_int(row['batch_size'])}, filters {_int(row['filters'])}"
    if full:
        text += f", n={_int(row['train_size'])}, {row['dtype']}"
    return text


def _int(x) -> str:
    return "default" if _isnan(x) else str(int(x))


# ---- per-run table ------------------------------------------------------------------------------
def run_table(df: pd.DataFrame) -> pd.DataFrame:
    """One row per successful run: configuration, ``epoch_time`` (median over epochs),
    ``images_per_sec`` (images per epoch / epoch_time), per-run totals of each timed phase,
    ``compile_time``, ``final_accuracy``, and the labels ``problem``, ``variant``, ``label``,
    ``config_id``, ``p``."""
    ok, _ = split_failed(df)
    ok = ok[ok["epoch"].notna() & ok["time"].notna()]
    if ok.empty:
        return pd.DataFrame(columns=[*GROUP_KEYS, "run_key", "epoch_time"])
    ok = ok.assign(_images=(ok["images_per_sec"] * ok["time"]).fillna(ok["train_size"]))
    g = ok.groupby("run_key", sort=True)
    first = g[[*GROUP_KEYS, *[k for k in MACHINE_KEYS], "repeat", "seed", "compile_time",
               "final_test_accuracy", "num_params", "started_at", "test_size"]].first()
    agg = g.agg(n_epochs=("epoch", "nunique"), epoch_time=("time", "median"),
                total_time=("time", "sum"), compute=("compute_time", "sum"),
                comm=("comm_time", "sum"),
                data=("data_time", "sum"), transfer=("transfer_time", "sum"),
                eval=("eval_time", "sum"), images=("_images", "median"))
    last_acc = ok.sort_values("epoch").groupby("run_key")["test_accuracy"].last()
    runs = first.join(agg)
    runs["final_accuracy"] = runs["final_test_accuracy"].fillna(last_acc)
    runs["compile"] = runs["compile_time"].fillna(0.0)
    runs["other"] = (runs["total_time"] - runs["compute"] - runs["comm"] - runs["data"]
                     - runs["transfer"]).clip(lower=0.0)
    runs["images_per_sec"] = runs["images"] / runs["epoch_time"]
    runs = runs.reset_index()
    runs["variant"] = [variant_name(*v) for v in runs[list(VARIANT_KEYS)].itertuples(index=False)]
    runs["p"] = [workers(a, t) for a, t in zip(runs["path"], runs["threads"])]
    runs["oversubscribed"] = [P.oversubscribed(a, t, c) for a, t, c in
                              zip(runs["path"], runs["threads"], runs["cores"])]
    runs["label"] = [_label(v, p) for v, p in zip(runs["variant"], runs["p"])]
    runs["problem"] = runs["dataset"].astype(str) + "/" + runs["model"].astype(str)
    runs["config_id"] = _ids(runs, CONFIG_KEYS + MACHINE_KEYS)
    keys = pd.DataFrame({
        "a": runs["problem"], "b": runs["batch_size"].map(_num), "c": runs["filters"].map(_num),
        "d": runs["train_size"].map(_num), "e": runs["dtype"].astype(str),
        "f": [_sort_key(*k) for k in runs[["path", "strategy", "backend", "threads"]]
              .itertuples(index=False)], "g": runs["repeat"].map(_num)})
    order = keys.sort_values(list(keys.columns), kind="stable").index
    return runs.loc[order].reset_index(drop=True)


def _num(x) -> float:
    return -1.0 if _isnan(x) else float(x)


def _ids(frame: pd.DataFrame, keys) -> pd.Series:
    return frame[list(keys)].astype(str).agg("|".join, axis=1)


# ---- the summary ----------------------------------------------------------------------------------
@dataclass
class Summary:
    """Everything the figures and the report need; build it with :func:`summarize`."""

    results: pd.DataFrame      # the rows as loaded
    runs: pd.DataFrame         # one row per successful run (:func:`run_table`)
    table: pd.DataFrame        # one row per configuration x variant x threads
    amdahl: pd.DataFrame       # one row per configuration x variant with a p > 1 point
    failed: pd.DataFrame       # one row per failed run
    n_boot: int
    level: float
    seed: int
    source: str = ""
    boot: dict = field(default_factory=dict, repr=False)

    @property
    def problems(self) -> list[str]:
        return sorted(self.runs["problem"].unique()) if len(self.runs) else []


SUMMARY_COLUMNS = [
    "problem", *CONFIG_KEYS, *VARIANT_KEYS, "threads", "variant", "label", "p", "n_repeats",
    "n_baseline", "epoch_time_median", "epoch_time_ci_lo", "epoch_time_ci_hi",
    "images_per_sec_median", "images_per_sec_ci_lo", "images_per_sec_ci_hi", "speedup",
    "speedup_ci_lo", "speedup_ci_hi", "efficiency", "efficiency_ci_lo", "efficiency_ci_hi",
    "karp_flatt", "karp_flatt_ci_lo", "karp_flatt_ci_hi", "amdahl_f", "amdahl_f_ci_lo",
    "amdahl_f_ci_hi", "speedup_self", "speedup_self_ci_lo", "speedup_self_ci_hi",
    "karp_flatt_self", "amdahl_f_self", "final_accuracy_median", "final_accuracy_q25",
    "final_accuracy_q75", "final_accuracy_iqr", "compute_per_epoch", "comm_per_epoch",
    "data_per_epoch",
    "transfer_per_epoch", "eval_per_epoch", "compile_time", "epoch_time_cv", "config_id",
]
_FIT_COLUMNS = ("amdahl_f", "amdahl_f_ci_lo", "amdahl_f_ci_hi", "amdahl_f_self")


def summarize(df: pd.DataFrame, n_boot: int = 2000, level: float = 0.95, seed: int = 0,
              source: str = "") -> Summary:
    """Per configuration and variant: medians over repeats with bootstrap CIs, speed-up against
    the sequential run of the same configuration (``speedup``; also against the same variant on
    one thread, ``speedup_self``, when that was run), efficiency, Karp-Flatt, Amdahl fit,
    accuracy. Deterministic for a given ``seed``."""
    rng = np.random.default_rng(seed)
    df = complete(df)
    runs = run_table(df)
    _, failed = split_failed(df)
    rows, boot, boot_self = [], {}, {}
    if len(runs):
        base = {cid: g["epoch_time"].to_numpy()
                for cid, g in runs[runs["path"] == BASELINE_PATH].groupby("config_id")}
        one = {k: g["epoch_time"].to_numpy()
               for k, g in runs[runs["p"] == 1].groupby(["config_id", "variant"])}
        for _, g in runs.groupby(["config_id", "variant", "threads"], sort=False, dropna=False):
            r0 = g.iloc[0]
            cid, variant, p = r0["config_id"], r0["variant"], r0["p"]
            t = g["epoch_time"].to_numpy()
            med, lo, hi = median_ci(t, n_boot, level, rng)
            ips, ips_lo, ips_hi = median_ci(g["images_per_sec"].to_numpy(), n_boot, level, rng)
            b = base.get(cid)
            s = s_lo = s_hi = ss = ss_lo = ss_hi = float("nan")
            if r0["path"] == BASELINE_PATH:
                s = 1.0
            elif b is not None:
                s, s_lo, s_hi, samples = speedup_ci(b, t, n_boot, level, rng)
                if samples is not None:
                    boot[(cid, variant, p)] = samples
            b1 = one.get((cid, variant))
            if r0["path"] != BASELINE_PATH and b1 is not None and p == p:
                if p == 1:
                    ss = 1.0
                else:
                    ss, ss_lo, ss_hi, samples = speedup_ci(b1, t, n_boot, level, rng)
                    if samples is not None:
                        boot_self[(cid, variant, p)] = samples
            acc = g["final_accuracy"].dropna().to_numpy()
            q25, q75 = (np.quantile(acc, [0.25, 0.75]) if len(acc) else (np.nan, np.nan))
            n_ep = g["n_epochs"].clip(lower=1)
            has_p = p == p
            rows.append({
                **{k: r0[k] for k in ("problem", *GROUP_KEYS, "variant", "label", "p",
                                      "config_id")},
                "n_repeats": len(g), "n_baseline": 0 if b is None else len(b),
                "epoch_time_median": med, "epoch_time_ci_lo": lo, "epoch_time_ci_hi": hi,
                "images_per_sec_median": ips, "images_per_sec_ci_lo": ips_lo,
                "images_per_sec_ci_hi": ips_hi,
                "speedup": s, "speedup_ci_lo": s_lo, "speedup_ci_hi": s_hi,
                "efficiency": s / p if has_p else np.nan,
                "efficiency_ci_lo": s_lo / p if has_p else np.nan,
                "efficiency_ci_hi": s_hi / p if has_p else np.nan,
                # e decreases with S, so the CI bounds swap
                "karp_flatt": karp_flatt(s, p) if has_p else np.nan,
                "karp_flatt_ci_lo": karp_flatt(s_hi, p) if has_p else np.nan,
                "karp_flatt_ci_hi": karp_flatt(s_lo, p) if has_p else np.nan,
                "speedup_self": ss, "speedup_self_ci_lo": ss_lo, "speedup_self_ci_hi": ss_hi,
                "karp_flatt_self": karp_flatt(ss, p) if has_p else np.nan,
                "final_accuracy_median": float(np.median(acc)) if len(acc) else np.nan,
                "final_accuracy_q25": q25, "final_accuracy_q75": q75,
                "final_accuracy_iqr": q75 - q25,
                "compute_per_epoch": float(np.median(g["compute"] / n_ep)),
                "comm_per_epoch": float(np.median(g["comm"] / n_ep)),
                "data_per_epoch": float(np.median(g["data"] / n_ep)),
                "transfer_per_epoch": float(np.median(g["transfer"] / n_ep)),
                "eval_per_epoch": float(np.median(g["eval"] / n_ep)),
                "compile_time": float(np.median(g["compile"])),
                "epoch_time_cv": float(np.std(t, ddof=1) / np.mean(t)) if len(t) > 1 else np.nan,
            })
    table = pd.DataFrame(rows, columns=[c for c in SUMMARY_COLUMNS if c not in _FIT_COLUMNS])
    amdahl = _amdahl_table(table, boot, boot_self, level)
    table = table.merge(amdahl[["config_id", "variant", *_FIT_COLUMNS]],
                        on=["config_id", "variant"], how="left")[SUMMARY_COLUMNS]
    return Summary(results=df, runs=runs, table=table, amdahl=amdahl, failed=failed,
                   n_boot=n_boot, level=level, seed=seed, source=str(source),
                   boot={"sequential": boot, "self": boot_self})


AMDAHL_COLUMNS = ["problem", *CONFIG_KEYS, "variant", "config_id", "p_values", "n_points",
                  "amdahl_f", "amdahl_f_ci_lo", "amdahl_f_ci_hi", "rms_residual", "at_bound",
                  "amdahl_f_self", "amdahl_f_self_ci_lo", "amdahl_f_self_ci_hi",
                  "rms_residual_self", "p_max", "speedup_at_p_max", "karp_flatt_at_p_max",
                  "karp_flatt_self_at_p_max"]


def _fit_with_ci(cid, variant, p, s, boot, level):
    keep = np.isfinite(s)
    p, s = p[keep], s[keep]
    if not np.any(p > 1):
        return (float("nan"),) * 4
    f = fit_amdahl(p, s)
    lo = hi = float("nan")
    samples = [boot.get((cid, variant, pi)) for pi in p if pi > 1]
    if samples and all(x is not None for x in samples):
        fs = _fit_amdahl_many(p[p > 1], np.stack(samples, axis=1))
        lo, hi = percentile_interval(fs, level)
    rms = float(np.sqrt(np.mean((s - amdahl_speedup(f, p)) ** 2)))
    return f, lo, hi, rms


def _amdahl_table(table: pd.DataFrame, boot: dict, boot_self: dict, level: float) -> pd.DataFrame:
    """Amdahl fits per configuration and variant over its thread counts: ``amdahl_f`` on the
    speed-up against the sequential path, ``amdahl_f_self`` on the speed-up against the same
    variant on one thread (the scaling of the variant itself)."""
    rows = []
    cand = table[(table["path"] != BASELINE_PATH) & table["p"].notna()]
    for (cid, variant), g in cand.groupby(["config_id", "variant"], sort=False):
        g = g.sort_values("p")
        p = g["p"].to_numpy(float)
        if not np.any(p > 1):
            continue
        s = g["speedup"].to_numpy(float)
        f, lo, hi, rms = _fit_with_ci(cid, variant, p, s, boot, level)
        fs, fs_lo, fs_hi, rms_s = _fit_with_ci(cid, variant, p, g["speedup_self"].to_numpy(float),
                                               boot_self, level)
        top = g.iloc[-1]
        rows.append({**{k: g.iloc[0][k] for k in ("problem", *CONFIG_KEYS)},
                     "variant": variant, "config_id": cid,
                     "p_values": ", ".join(str(int(x)) for x in p), "n_points": len(p),
                     "amdahl_f": f, "amdahl_f_ci_lo": lo, "amdahl_f_ci_hi": hi,
                     "rms_residual": rms,
                     # no serial fraction in [0, 1] explains S > p (a faster single worker
                     # than the baseline) or S < 1 at p > 1 (slower than sequential)
                     "at_bound": bool(np.any([(si > pi) or (pi > 1 and si < 1)
                                              for si, pi in zip(s, p) if np.isfinite(si)])),
                     "amdahl_f_self": fs, "amdahl_f_self_ci_lo": fs_lo,
                     "amdahl_f_self_ci_hi": fs_hi, "rms_residual_self": rms_s,
                     "p_max": top["p"], "speedup_at_p_max": top["speedup"],
                     "karp_flatt_at_p_max": top["karp_flatt"],
                     "karp_flatt_self_at_p_max": top["karp_flatt_self"]})
    return pd.DataFrame(rows, columns=AMDAHL_COLUMNS)


def _at_max_p(t: pd.DataFrame) -> pd.DataFrame:
    t = t[(t["path"] != BASELINE_PATH) & t["speedup"].notna()]
    if t.empty:
        return t
    pm = t.assign(_p=t["p"].fillna(0)).groupby("variant")["_p"].transform("max")
    return t[t["p"].fillna(0) == pm]


#: the columns a reader looks at first (the notebook shows these)
VIEW_COLUMNS = ["problem", "label", "batch_size", "filters", "n_repeats", "epoch_time_median",
                "images_per_sec_median", "images_per_sec_ci_lo", "images_per_sec_ci_hi",
                "speedup", "speedup_ci_lo", "speedup_ci_hi", "efficiency", "karp_flatt",
                "speedup_self", "final_accuracy_median", "final_accuracy_iqr"]


def write_summary(summary: Summary, out_dir) -> dict[str, Path]:
    """Write ``summary.csv`` and ``summary.json`` (the same tidy table, JSON as a list of
    records with nulls for undefined values) into ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    table = summary.table.drop(columns=["config_id"])
    paths = {"csv": out / "summary.csv", "json": out / "summary.json"}
    table.to_csv(paths["csv"], index=False)
    records = [{k: _jsonable(v) for k, v in r.items()} for r in table.to_dict("records")]
    _atomic_write(paths["json"], json.dumps(records, indent=1))
    return paths


def _jsonable(v):
    if isinstance(v, (np.integer,)):
        return int(v)
    if isinstance(v, (np.floating, float)):
        return None if not math.isfinite(float(v)) else float(v)
    if isinstance(v, (np.bool_,)):
        return bool(v)
    if v is None or (not isinstance(v, (str, list, dict, tuple)) and pd.isna(v)):
        return None
    return v


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


# ---- derived facts for the narrative ------------------------------------------------------------
def sync_check(summary: Summary) -> dict:
    """Final test accuracy of ``sync`` runs against the sequential run with the same
    configuration and seed: ``sync`` is the sequential algorithm, so they should agree."""
    r = summary.runs
    if not len(r):
        return {"pairs": 0}
    seq = r[r["path"] == BASELINE_PATH][["config_id", "seed", "final_accuracy"]]
    syn = r[(r["strategy"] == "sync") & (r["path"] != BASELINE_PATH)]
    m = syn.merge(seq, on=["config_id", "seed"], suffixes=("", "_seq"))
    if m.empty:
        return {"pairs": 0}
    d = (m["final_accuracy"] - m["final_accuracy_seq"]).abs()
    return {"pairs": int(len(m)), "max_abs_diff": float(d.max()),
            "median_abs_diff": float(d.median())}


def simulator_check(summary: Summary) -> dict:
    """CUDA runs under the simulator (excluded from the timings): their final test accuracy
    against the sequential run with the same configuration and seed."""
    res = summary.results
    sim = res[simulated(res) & (res["status"] == "ok")]
    if sim.empty:
        return {"runs": 0, "pairs": 0}
    per = sim.sort_values("epoch").groupby("run_key").agg(
        **{k: (k, "first") for k in (*CONFIG_KEYS, *MACHINE_KEYS, "seed")},
        final=("final_test_accuracy", "first"), last=("test_accuracy", "last"))
    per["final"] = per["final"].fillna(per["last"])
    per["config_id"] = _ids(per, CONFIG_KEYS + MACHINE_KEYS)
    r = summary.runs
    out = {"runs": int(len(per)), "pairs": 0}
    if len(r):
        seq = r[r["path"] == BASELINE_PATH][["config_id", "seed", "final_accuracy"]]
        m = per.merge(seq, on=["config_id", "seed"])
        if len(m):
            d = (m["final"] - m["final_accuracy"]).abs()
            out.update(pairs=int(len(m)), max_abs_diff=float(d.max()),
                       max_abs_diff_text=_pct(d.max(), 2))
    return out


def cold_compile(summary: Summary) -> list[dict]:
    """The study's one-off compile of each JIT backend into an empty cache (``cold_compile_time``,
    not part of any run), median over the runs that report it."""
    res = summary.results
    if "cold_compile_time" not in res.columns:
        return []
    c = res[res["status"] == "ok"].groupby("backend")["cold_compile_time"].median().dropna()
    return [{"backend": str(b), "seconds": fmt(v)} for b, v in c.items()]


def noise(summary: Summary) -> dict:
    """Run-to-run variability: coefficient of variation of the epoch time over repeats."""
    cv = summary.table["epoch_time_cv"].dropna()
    if cv.empty:
        return {"groups": 0}
    worst = summary.table.loc[cv.idxmax()]
    return {"groups": int(len(cv)), "cv_median": float(cv.median()), "cv_max": float(cv.max()),
            "cv_max_label": f"{worst['label']} ({worst['problem']}, {_config_text(worst)})"}
