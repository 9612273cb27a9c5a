"""Results -> summary table, figures and the PDF report.

The study (:mod:`cnn.study`) writes ``results/df_results.pkl``: a tidy DataFrame with one row per
(run, epoch). This module turns it into

* a per-run table (:func:`run_table`): one row per successful run; a run's epoch time is the
  median of its epochs' wall times, its throughput the images of one epoch over that time;
* a summary (:func:`summarize`): per configuration (dataset, model, batch size, filters,
  training-set size, dtype, on one machine) and per path variant (path, strategy, backend,
  threads): median over repeats of the epoch time and the throughput with percentile-bootstrap
  confidence intervals, the speed-up against the sequential path of the *same* configuration
  (ratio of medians, CI by bootstrapping the repeats of both sides independently), the parallel
  efficiency ``E = S/p``, the Karp-Flatt serial fraction ``e = (1/S - 1/p)/(1 - 1/p)``, a
  least-squares fit of Amdahl's law ``S(p) = 1/(f + (1-f)/p)`` over the thread counts of each
  variant (with a bootstrap CI), and the median and IQR of the final test accuracy;
* figures (:func:`make_figures`), the summary as CSV and JSON (:func:`write_summary`), every
  number the report prints (:func:`report_numbers` -> ``numbers.json``), and the PDF
  (:func:`build_report`, also ``python -m cnn report``), compiled with Typst from
  ``report/report.typ``. The Typst source contains no measured number: it reads them all from
  ``numbers.json``.

Failed runs (``status != 'ok'``) are excluded from every statistic and listed separately.
Nothing here averages speed-ups across configurations (Hoefler & Belli 2015): each ratio is
reported for its own configuration with its own interval.
"""
from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterable

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parent.parent
REPORT_TYP = ROOT / "report" / "report.typ"

BASELINE_PATH = "sequential"
#: the paths the study knows, in the order figures and tables list them
PATHS = ("sequential", "threads", "numba", "numba_parallel", "cuda", "keras")
STRATEGIES = ("sequential", "sync", "average", "hogwild")
#: the backends a path runs by default (a variant's name shows its backend only otherwise)
DEFAULT_BACKEND = {"sequential": {"numpy"}, "threads": {"numpy"}, "numba": {"numba"},
                   "numba_parallel": {"numba_parallel", "numba"}, "cuda": {"cuda"},
                   "keras": {"keras", "tensorflow"}}
#: what a speed-up is matched on: the sequential run of the same configuration
CONFIG_KEYS = ("dataset", "model", "batch_size", "filters", "train_size", "dtype")
#: ... on the same machine (constant within one study; guards against mixed result files)
MACHINE_KEYS = ("cpu", "cores")
VARIANT_KEYS = ("path", "strategy", "backend")
GROUP_KEYS = CONFIG_KEYS + VARIANT_KEYS + ("threads",)
MACHINE_COLUMNS = ("cpu", "cores", "blas", "python", "numpy_version", "numba_version",
                   "tensorflow_version", "keras_version", "git_commit")
REQUIRED_COLUMNS = ("run_key", "status", "error", *CONFIG_KEYS, *VARIANT_KEYS, "threads",
                    "repeat", "seed", "epoch", "time", "compute_time", "data_time",
                    "transfer_time", "eval_time", "compile_time", "images_per_sec",
                    "test_accuracy", "final_test_accuracy")
TIME_PARTS = ("compute", "data", "transfer", "eval", "compile", "other")


# ---- loading ----------------------------------------------------------------------------------
def load_results(path) -> pd.DataFrame:
    """Read the study's results pickle and check its columns.

    Raises FileNotFoundError (telling the user to run the study) when the file is missing and
    ValueError when columns are missing.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(
            f"results file {path} not found: run the study first (`make study`, or "
            f"`python -m cnn study`), then point --results / results_path at its df_results.pkl")
    df = pd.read_pickle(path)
    if not isinstance(df, pd.DataFrame):
        raise ValueError(f"{path} holds a {type(df).__name__}, expected a pandas DataFrame")
    missing = [c for c in REQUIRED_COLUMNS if c not in df.columns]
    if missing:
        raise ValueError(f"{path} lacks the columns {missing} of the study's schema")
    df = df.copy()
    for col in MACHINE_COLUMNS + ("num_params", "started_at", "epochs", "test_size"):
        if col not in df.columns:
            df[col] = np.nan
    df["status"] = df["status"].astype(str).str.lower()
    return df


def simulated(df: pd.DataFrame) -> pd.Series:
    """Rows run under the CUDA simulator (``cuda_simulator`` true or ``device ==
    'cuda-simulator'``): correct results, but their times say nothing about speed."""
    sim = pd.Series(False, index=df.index)
    if "cuda_simulator" in df.columns:
        sim |= df["cuda_simulator"].fillna(False).astype(bool)
    if "device" in df.columns:
        sim |= df["device"].astype(str).eq("cuda-simulator")
    return sim


def split_failed(df: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """``(ok_rows, failed_runs)``: the rows of runs whose every row has ``status == 'ok'`` (runs
    under the CUDA simulator excluded, see :func:`simulated`), and one row per failed run (its
    configuration and error)."""
    bad_keys = set(df.loc[df["status"] != "ok", "run_key"])
    ok = df[~df["run_key"].isin(bad_keys) & ~simulated(df)]
    failed = (df[df["run_key"].isin(bad_keys) & (df["status"] != "ok")]
              .groupby("run_key", sort=True).first().reset_index())
    cols = ["run_key", *CONFIG_KEYS, *VARIANT_KEYS, "threads", "repeat", "error"]
    return ok, failed[[c for c in cols if c in failed.columns]]


# ---- labels -----------------------------------------------------------------------------------
def variant_name(path: str, strategy: str, backend: str) -> str:
    """``threads/sync``, ``threads/hogwild[numba]``, ``numba_parallel``, ``sequential``..."""
    name = str(path)
    if path != BASELINE_PATH and strategy not in (None, "sequential") and not _isnan(strategy):
        name += f"/{strategy}"
    if backend not in DEFAULT_BACKEND.get(path, {path}) and not _isnan(backend):
        name += f"[{backend}]"
    return name


def workers(path: str, threads) -> float:
    """The ``p`` of speed-up, efficiency and Amdahl: the thread count, undefined for CUDA."""
    return float("nan") if path == "cuda" or _isnan(threads) else float(threads)


def _label(variant: str, p: float) -> str:
    return variant if (variant == BASELINE_PATH or _isnan(p)) else f"{variant} ×{int(p)}"


def _isnan(x) -> bool:
    try:
        return x is None or (isinstance(x, float) and math.isnan(x)) or bool(pd.isna(x))
    except (TypeError, ValueError):
        return False


def _sort_key(path, strategy, backend, threads):
    pi = PATHS.index(path) if path in PATHS else len(PATHS)
    si = STRATEGIES.index(strategy) if strategy in STRATEGIES else len(STRATEGIES)
    return (pi, str(path), si, str(backend), 0 if _isnan(threads) else float(threads))


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
                data=("data_time", "sum"), transfer=("transfer_time", "sum"),
                eval=("eval_time", "sum"), images=("_images", "median"))
    last_acc = ok.sort_values("epoch").groupby("run_key")["test_accuracy"].last()
    runs = first.join(agg)
    runs["final_accuracy"] = runs["final_test_accuracy"].fillna(last_acc)
    runs["compile"] = runs["compile_time"].fillna(0.0)
    runs["other"] = (runs["total_time"] - runs["compute"] - runs["data"]
                     - runs["transfer"]).clip(lower=0.0)
    runs["images_per_sec"] = runs["images"] / runs["epoch_time"]
    runs = runs.reset_index()
    runs["variant"] = [variant_name(*v) for v in runs[list(VARIANT_KEYS)].itertuples(index=False)]
    runs["p"] = [workers(a, t) for a, t in zip(runs["path"], runs["threads"])]
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


# ---- statistics ---------------------------------------------------------------------------------
def bootstrap_medians(values, n_boot: int, rng: np.random.Generator) -> np.ndarray:
    """``n_boot`` medians of resamples (with replacement, same size) of ``values``."""
    v = np.asarray(values, dtype=float)
    idx = rng.integers(0, len(v), size=(n_boot, len(v)))
    return np.median(v[idx], axis=1)


def percentile_interval(samples, level: float = 0.95) -> tuple[float, float]:
    a = (1.0 - level) / 2.0
    lo, hi = np.quantile(np.asarray(samples, dtype=float), [a, 1.0 - a])
    return float(lo), float(hi)


def median_ci(values, n_boot: int = 2000, level: float = 0.95, rng=None) -> tuple[float, float, float]:
    """``(median, lo, hi)``: percentile-bootstrap CI of the median; NaN bounds for n < 2."""
    v = np.asarray(values, dtype=float)
    med = float(np.median(v))
    if len(v) < 2:
        return med, float("nan"), float("nan")
    rng = rng if rng is not None else np.random.default_rng(0)
    return (med, *percentile_interval(bootstrap_medians(v, n_boot, rng), level))


def speedup_ci(baseline_times, times, n_boot: int = 2000, level: float = 0.95, rng=None):
    """``(S, lo, hi, samples)`` with ``S = median(baseline_times) / median(times)``; the CI is the
    percentile interval of the ratio over ``n_boot`` independent resamples of the repeats of
    both sides (NaN when either side has fewer than 2 repeats; ``samples`` is then None)."""
    b = np.asarray(baseline_times, dtype=float)
    t = np.asarray(times, dtype=float)
    s = float(np.median(b) / np.median(t))
    if len(b) < 2 or len(t) < 2:
        return s, float("nan"), float("nan"), None
    rng = rng if rng is not None else np.random.default_rng(0)
    samples = bootstrap_medians(b, n_boot, rng) / bootstrap_medians(t, n_boot, rng)
    return (s, *percentile_interval(samples, level), samples)


def amdahl_speedup(f, p):
    """Amdahl's law: the speed-up on ``p`` workers of a program with serial fraction ``f``."""
    f = np.asarray(f, dtype=float)
    p = np.asarray(p, dtype=float)
    return 1.0 / (f + (1.0 - f) / p)


def karp_flatt(s, p):
    """The experimentally determined serial fraction ``e = (1/S - 1/p) / (1 - 1/p)`` (Karp &
    Flatt 1990); NaN for ``p <= 1``."""
    s = np.asarray(s, dtype=float)
    p = np.asarray(p, dtype=float)
    with np.errstate(divide="ignore", invalid="ignore"):
        e = (1.0 / s - 1.0 / p) / (1.0 - 1.0 / p)
    e = np.where(p > 1, e, np.nan)
    return float(e) if e.ndim == 0 else e


_GRID = np.linspace(0.0, 1.0, 1001)


def _amdahl_sse(f, p, s):
    f = np.asarray(f, dtype=float)[..., None]
    return ((s - amdahl_speedup(f, p)) ** 2).sum(axis=-1)


def fit_amdahl(p, s) -> float:
    """Least-squares serial fraction: ``argmin_{f in [0, 1]} sum_i (S_i - 1/(f + (1-f)/p_i))^2``
    over the points with finite ``S`` and ``p >= 1`` (NaN without a point at ``p > 1``).

    Minimised on a grid of step 1e-3, then by golden-section search in the bracketing cell to
    1e-12, so a noise-free ``S(p)`` gives back its ``f`` to rounding error.
    """
    p = np.asarray(p, dtype=float)
    s = np.asarray(s, dtype=float)
    keep = np.isfinite(p) & np.isfinite(s) & (p >= 1) & (s > 0)
    p, s = p[keep], s[keep]
    if not np.any(p > 1):
        return float("nan")
    i = int(np.argmin(_amdahl_sse(_GRID, p, s)))
    lo, hi = _GRID[max(i - 1, 0)], _GRID[min(i + 1, len(_GRID) - 1)]
    g = (math.sqrt(5.0) - 1.0) / 2.0
    c, d = hi - g * (hi - lo), lo + g * (hi - lo)
    fc, fd = _amdahl_sse(c, p, s), _amdahl_sse(d, p, s)
    while hi - lo > 1e-12:
        if fc < fd:
            hi, d, fd = d, c, fc
            c = hi - g * (hi - lo)
            fc = _amdahl_sse(c, p, s)
        else:
            lo, c, fc = c, d, fd
            d = lo + g * (hi - lo)
            fd = _amdahl_sse(d, p, s)
    f = (lo + hi) / 2.0
    return float(0.0 if f < 1e-9 else 1.0 if f > 1 - 1e-9 else f)


def _fit_amdahl_many(p, samples, chunk: int = 256) -> np.ndarray:
    """Least-squares ``f`` for each row of ``samples (B, P)`` (the bootstrap): in closed form
    when one thread count above 1 is measured (points at p = 1 add a constant to the loss),
    else on a grid of step 1e-3."""
    keep = p > 1
    p, samples = p[keep], samples[:, keep]
    if len(p) == 1:
        return np.clip(karp_flatt(samples[:, 0], np.full(len(samples), p[0])), 0.0, 1.0)
    model = amdahl_speedup(_GRID[:, None], p[None, :])  # (G, P)
    out = np.empty(len(samples))
    for i in range(0, len(samples), chunk):
        block = samples[i:i + chunk]
        sse = ((block[:, None, :] - model[None, :, :]) ** 2).sum(axis=-1)
        out[i:i + chunk] = _GRID[np.argmin(sse, axis=1)]
    return out


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
    "final_accuracy_q75", "final_accuracy_iqr", "compute_per_epoch", "data_per_epoch",
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


# ---- figures ------------------------------------------------------------------------------------
TEXT_WIDTH_IN = 6.7
FIGURE_KINDS = ("epoch_time", "throughput", "speedup", "efficiency", "speedup_vs_size",
                "speedup_heatmap", "time_breakdown", "accuracy", "accuracy_vs_time")


def _palette(summary: Summary) -> dict:
    import seaborn as sns
    variants = _ordered(summary.runs, "variant")
    colors = sns.color_palette("colorblind", max(len(variants), 1))
    return {v: colors[i % len(colors)] for i, v in enumerate(variants)}


def _ordered(frame: pd.DataFrame, col: str) -> list:
    seen = {}
    keys = frame[["path", "strategy", "backend", "threads", col]].itertuples(index=False)
    for path, strategy, backend, threads, value in sorted(
            keys, key=lambda k: _sort_key(k[0], k[1], k[2], k[3])):
        seen.setdefault(value, None)
    return list(seen)


def _facets(frame: pd.DataFrame):
    """Panels for the configurations of one problem: rows = filters, columns = batch sizes
    (wrapped when training size or dtype vary too). Returns ``[(title, mask, (r, c))], shape``."""
    cfg = frame[list(CONFIG_KEYS) + ["config_id"]].drop_duplicates("config_id")
    cfg = cfg.assign(_b=cfg["batch_size"].map(_num), _f=cfg["filters"].map(_num))
    full = cfg[["train_size", "dtype"]].astype(str).drop_duplicates().shape[0] > 1
    if not full:
        fs, bs = sorted(cfg["_f"].unique()), sorted(cfg["_b"].unique())
        pos = {cid: (fs.index(f), bs.index(b)) for cid, f, b in zip(cfg["config_id"], cfg["_f"], cfg["_b"])}
        shape = (len(fs), len(bs))
    else:
        cfg = cfg.sort_values(["_b", "_f", "train_size"])
        ncol = min(4, len(cfg))
        pos = {cid: divmod(i, ncol) for i, cid in enumerate(cfg["config_id"])}
        shape = (math.ceil(len(cfg) / ncol), ncol)
    panels = [(_config_text(r, full), r["config_id"], pos[r["config_id"]])
              for _, r in cfg.iterrows()]
    return panels, shape


def _new_figure(nrows: int, ncols: int, w: float, h: float, sharex=False, sharey=False):
    from matplotlib.figure import Figure
    fig = Figure(figsize=(max(4.0, w * ncols), max(2.5, h * nrows)), layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False, sharex=sharex, sharey=sharey)
    for ax in axes.flat:
        ax.set_visible(False)
    return fig, axes


def _per_problem(frame: pd.DataFrame, problem: str) -> pd.DataFrame:
    return frame[frame["problem"] == problem]


def plot_epoch_time(summary: Summary, problem: str):
    """Per-run epoch time (dots, one per repeat) and the median (bar) per path variant."""
    runs = _per_problem(summary.runs, problem)
    if runs.empty:
        return None
    pal = _palette(summary)
    panels, (nr, nc) = _facets(runs)
    labels = _ordered(runs, "label")
    fig, axes = _new_figure(nr, nc, 4.2, 0.28 * len(labels) + 1.0)
    for title, cid, (i, j) in panels:
        ax = axes[i][j]
        ax.set_visible(True)
        d = runs[runs["config_id"] == cid]
        order = [lb for lb in labels if lb in set(d["label"])]
        med = d.groupby("label")["epoch_time"].median().reindex(order)
        colors = [pal[d.loc[d["label"] == lb, "variant"].iat[0]] for lb in order]
        ax.barh(range(len(order)), med.to_numpy(), color=colors, alpha=0.35)
        _strip(ax, d, "epoch_time", order, pal)
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("time per epoch (s)")
    return fig


def _strip(ax, d, value, order, pal, size=12):
    """One dot per run at its category (jittered deterministically), categories top-down."""
    from matplotlib.ticker import MaxNLocator
    for k, lb in enumerate(order):
        dv = d[d["label"] == lb]
        n = len(dv)
        jitter = (np.arange(n) - (n - 1) / 2) * (0.3 / max(n, 1))
        ax.scatter(dv[value], k + jitter, s=size, color=pal[dv["variant"].iat[0]], zorder=3,
                   edgecolor="white", linewidth=0.3)
    ax.set_yticks(range(len(order)), order)
    ax.set_ylim(len(order) - 0.5, -0.5)
    ax.xaxis.set_major_locator(MaxNLocator(5))
    ax.tick_params(labelsize=8)


def _barh_ci(ax, d, value, lo, hi, pal, order):
    d = d.set_index("label").reindex(order)
    y = np.arange(len(order))
    v = d[value].to_numpy(float)
    err = np.vstack([v - d[lo].to_numpy(float), d[hi].to_numpy(float) - v])
    err = np.where(np.isfinite(err), err, 0.0)
    ax.barh(y, v, color=[pal[x] for x in d["variant"]], xerr=err, capsize=2,
            error_kw={"lw": 0.8})
    ax.set_yticks(y, order)
    ax.invert_yaxis()
    ax.tick_params(labelsize=8)


def plot_throughput(summary: Summary, problem: str):
    """Median images/s per path variant with its bootstrap CI."""
    t = _per_problem(summary.table, problem)
    if t.empty:
        return None
    pal = _palette(summary)
    panels, (nr, nc) = _facets(t)
    labels = _ordered(t, "label")
    fig, axes = _new_figure(nr, nc, 4.2, 0.28 * len(labels) + 1.0)
    for title, cid, (i, j) in panels:
        ax = axes[i][j]
        ax.set_visible(True)
        d = t[t["config_id"] == cid]
        _barh_ci(ax, d, "images_per_sec_median", "images_per_sec_ci_lo", "images_per_sec_ci_hi",
                 pal, [lb for lb in labels if lb in set(d["label"])])
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("training throughput (images/s)")
    return fig


def plot_speedup(summary: Summary, problem: str):
    """Speed-up against the sequential path vs threads, per variant, with CIs, the ideal
    ``S = p`` and the fitted Amdahl curve."""
    t = _per_problem(summary.table, problem)
    t = t[(t["path"] != BASELINE_PATH) & t["p"].notna() & t["speedup"].notna()]
    if t.empty:
        return None
    pal = _palette(summary)
    am = summary.amdahl
    panels, (nr, nc) = _facets(t)
    fig, axes = _new_figure(nr, nc, 3.6, 2.9)
    variants = _ordered(t, "variant")
    pmax = float(t["p"].max())
    handles = {}
    for title, cid, (i, j) in panels:
        ax = axes[i][j]
        ax.set_visible(True)
        d = t[t["config_id"] == cid]
        ps = np.linspace(1, max(pmax, 2), 50)
        ax.plot(ps, ps, ls=":", color="0.5", lw=1)
        ax.axhline(1.0, color="0.3", lw=0.8)
        for k, v in enumerate(variants):
            dv = d[d["variant"] == v].sort_values("p")
            if dv.empty:
                continue
            x = dv["p"].to_numpy(float) + (k - len(variants) / 2) * 0.03
            y = dv["speedup"].to_numpy(float)
            err = np.vstack([y - dv["speedup_ci_lo"], dv["speedup_ci_hi"] - y])
            h = ax.errorbar(x, y, yerr=np.where(np.isfinite(err), err, 0), marker="o", ms=4,
                            color=pal[v], capsize=2, lw=1, label=v)
            handles.setdefault(v, h)
            fit = am[(am["config_id"] == cid) & (am["variant"] == v)]
            if len(fit) and np.isfinite(fit["amdahl_f"].iat[0]):
                ax.plot(ps, amdahl_speedup(fit["amdahl_f"].iat[0], ps), ls="--", lw=0.8,
                        color=pal[v])
        ax.set_xticks(sorted(set(t["p"].astype(int))))
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("threads p")
        ax.set_ylabel("speed-up S")
        ax.tick_params(labelsize=8)
    fig.legend(list(handles.values()), list(handles), loc="outside lower center",
               ncol=min(4, len(handles)), fontsize=8, frameon=False)
    return fig


def plot_efficiency(summary: Summary, problem: str):
    """Parallel efficiency ``E = S/p`` with CI for the variants run on ``p > 1`` threads."""
    t = _per_problem(summary.table, problem)
    t = t[(t["p"] > 1) & t["speedup"].notna()]
    if t.empty:
        return None
    pal = _palette(summary)
    panels, (nr, nc) = _facets(t)
    labels = _ordered(t, "label")
    fig, axes = _new_figure(nr, nc, 4.0, 0.3 * len(labels) + 1.0)
    for title, cid, (i, j) in panels:
        ax = axes[i][j]
        ax.set_visible(True)
        d = t[t["config_id"] == cid]
        _barh_ci(ax, d, "efficiency", "efficiency_ci_lo", "efficiency_ci_hi", pal,
                 [lb for lb in labels if lb in set(d["label"])])
        ax.axvline(1.0, color="0.3", lw=0.8)
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("parallel efficiency E = S/p")
    return fig


def _at_max_p(t: pd.DataFrame) -> pd.DataFrame:
    t = t[(t["path"] != BASELINE_PATH) & t["speedup"].notna()]
    if t.empty:
        return t
    pm = t.assign(_p=t["p"].fillna(0)).groupby("variant")["_p"].transform("max")
    return t[t["p"].fillna(0) == pm]


def plot_speedup_vs_size(summary: Summary, problem: str):
    """Speed-up (at each variant's largest thread count) against batch size, one panel per
    filter count: above 1 parallelism pays, below it the overhead wins."""
    t = _at_max_p(_per_problem(summary.table, problem))
    if t.empty or t["batch_size"].nunique() < 2 and t["filters"].nunique() < 2:
        return None
    pal = _palette(summary)
    by, panel_key = ("batch_size", "filters") if t["batch_size"].nunique() >= 2 else ("filters", "batch_size")
    keys = sorted(t[panel_key].unique(), key=_num)
    fig, axes = _new_figure(1, len(keys), 3.6, 3.0, sharey=True)
    handles = {}
    for j, key in enumerate(keys):
        ax = axes[0][j]
        ax.set_visible(True)
        d = t[t[panel_key] == key]
        for k, (lb, dv) in enumerate(sorted(d.groupby("label"), key=lambda x: _ordered(t, "label").index(x[0]))):
            dv = dv.sort_values(by)
            x = dv[by].to_numpy(float) * (1 + (k - 2) * 0.015)
            y = dv["speedup"].to_numpy(float)
            err = np.vstack([y - dv["speedup_ci_lo"], dv["speedup_ci_hi"] - y])
            h = ax.errorbar(x, y, yerr=np.where(np.isfinite(err), err, 0), marker="o", ms=4,
                            capsize=2, lw=1, color=pal[dv["variant"].iat[0]], label=lb)
            handles.setdefault(lb, h)
        ax.axhline(1.0, color="0.3", lw=0.8)
        ax.set_xscale("log", base=2)
        xs = sorted(t[by].dropna().unique())
        ax.set_xticks(xs, [str(int(x)) for x in xs])
        ax.minorticks_off()
        ax.set_xlabel(by.replace("_", " "))
        ax.set_ylabel("speed-up S vs sequential")
        ax.set_title(f"{panel_key.replace('_', ' ')} {_int(key)}", fontsize=9)
        ax.tick_params(labelsize=8)
    fig.legend(list(handles.values()), list(handles), loc="outside lower center",
               ncol=min(4, len(handles)), fontsize=8, frameon=False)
    return fig


def plot_speedup_heatmap(summary: Summary, problem: str):
    """Median speed-up over batch size x filters, one panel per variant (largest p)."""
    t = _at_max_p(_per_problem(summary.table, problem))
    if t.empty or (t["batch_size"].nunique() < 2 and t["filters"].nunique() < 2):
        return None
    from matplotlib.colors import TwoSlopeNorm
    import seaborn as sns
    labels = _ordered(t, "label")
    ncol = min(4, len(labels))
    nrow = math.ceil(len(labels) / ncol)
    fig, axes = _new_figure(nrow, ncol, 2.6, 2.3)
    lo = min(0.9, float(t["speedup"].min()))
    hi = max(1.1, float(t["speedup"].max()))
    norm = TwoSlopeNorm(vmin=lo, vcenter=1.0, vmax=hi)
    for k, lb in enumerate(labels):
        ax = axes[k // ncol][k % ncol]
        ax.set_visible(True)
        d = t[t["label"] == lb].pivot_table(index="filters", columns="batch_size",
                                            values="speedup", aggfunc="median")
        d.index = [_int(x) for x in d.index]
        d.columns = [_int(x) for x in d.columns]
        sns.heatmap(d, ax=ax, annot=True, fmt=".2f", cmap="RdBu", norm=norm, cbar=False,
                    annot_kws={"fontsize": 8}, linewidths=0.5)
        ax.invert_yaxis()
        ax.set_title(lb, fontsize=9)
        ax.set_xlabel("batch size")
        ax.set_ylabel("filters")
        ax.tick_params(labelsize=8)
    return fig


def plot_time_breakdown(summary: Summary, problem: str):
    """Median seconds per run in each phase: compute, data, host-device transfer, evaluation,
    JIT compile (once per run) and the rest of the epoch loop."""
    runs = _per_problem(summary.runs, problem)
    if runs.empty:
        return None
    import seaborn as sns
    panels, (nr, nc) = _facets(runs)
    labels = _ordered(runs, "label")
    colors = dict(zip(TIME_PARTS, sns.color_palette("Set2", len(TIME_PARTS))))
    fig, axes = _new_figure(nr, nc, 4.2, 0.28 * len(labels) + 1.0)
    for title, cid, (i, j) in panels:
        ax = axes[i][j]
        ax.set_visible(True)
        d = runs[runs["config_id"] == cid]
        order = [lb for lb in labels if lb in set(d["label"])]
        med = d.groupby("label")[list(TIME_PARTS)].median().reindex(order)
        left = np.zeros(len(order))
        for part in TIME_PARTS:
            ax.barh(range(len(order)), med[part].to_numpy(), left=left, color=colors[part],
                    label=part)
            left += med[part].to_numpy()
        ax.set_yticks(range(len(order)), order)
        ax.invert_yaxis()
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("seconds per run (all epochs)")
        ax.tick_params(labelsize=8)
    h, lb = axes[panels[0][2][0]][panels[0][2][1]].get_legend_handles_labels()
    fig.legend(h, lb, loc="outside lower center", ncol=len(TIME_PARTS), fontsize=8,
               frameon=False)
    return fig


def plot_accuracy(summary: Summary, problem: str):
    """Final test accuracy per variant: box (quartiles) and one dot per repeat."""
    runs = _per_problem(summary.runs, problem)
    runs = runs[runs["final_accuracy"].notna()]
    if runs.empty:
        return None
    pal = _palette(summary)
    panels, (nr, nc) = _facets(runs)
    labels = _ordered(runs, "label")
    fig, axes = _new_figure(nr, nc, 4.2, 0.28 * len(labels) + 1.0)
    for title, cid, (i, j) in panels:
        ax = axes[i][j]
        ax.set_visible(True)
        d = runs[runs["config_id"] == cid]
        order = [lb for lb in labels if lb in set(d["label"])]
        box = ax.boxplot([d.loc[d["label"] == lb, "final_accuracy"].to_numpy() for lb in order],
                         positions=range(len(order)), orientation="horizontal", widths=0.6,
                         showfliers=False, patch_artist=True, medianprops={"color": "0.2"})
        for patch, lb in zip(box["boxes"], order):
            patch.set(facecolor=pal[d.loc[d["label"] == lb, "variant"].iat[0]], alpha=0.35,
                      linewidth=0.8)
        _strip(ax, d, "final_accuracy", order, pal, size=9)
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("final test accuracy")
    return fig


def plot_accuracy_vs_time(summary: Summary, problem: str):
    """Final test accuracy against the run's training wall time (all epochs), one dot a run."""
    runs = _per_problem(summary.runs, problem)
    runs = runs[runs["final_accuracy"].notna()]
    if runs.empty:
        return None
    import seaborn as sns
    pal = _palette(summary)
    runs = runs.assign(config=[_config_text(r) for _, r in runs.iterrows()])
    fig, axes = _new_figure(1, 1, 6.5, 4.0)
    ax = axes[0][0]
    ax.set_visible(True)
    sns.scatterplot(data=runs, x="total_time", y="final_accuracy", hue="variant",
                    hue_order=_ordered(runs, "variant"), palette=pal, style="config", ax=ax,
                    s=30, alpha=0.85)
    wide = runs["total_time"].max() > 10 * runs["total_time"].min()
    if wide:
        ax.set_xscale("log")
    ax.set_xlabel("training wall time of the run (s" + (", log scale)" if wide else ")"))
    ax.set_ylabel("final test accuracy")
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5), frameon=False)
    return fig


PLOTS = {"epoch_time": plot_epoch_time, "throughput": plot_throughput,
         "speedup": plot_speedup, "efficiency": plot_efficiency,
         "speedup_vs_size": plot_speedup_vs_size, "speedup_heatmap": plot_speedup_heatmap,
         "time_breakdown": plot_time_breakdown, "accuracy": plot_accuracy,
         "accuracy_vs_time": plot_accuracy_vs_time}


def _caption(kind: str, summary: Summary, problem: str) -> str:
    ci = f"{summary.level:.0%} percentile-bootstrap CI over repeats ({summary.n_boot} resamples)"
    return {
        "epoch_time": f"{problem}: training wall time per epoch; a dot is one run (the median "
                      f"of its epochs), the bar the median over repeats.",
        "throughput": f"{problem}: training throughput (images/s), median over repeats; "
                      f"whiskers: {ci}.",
        "speedup": f"{problem}: speed-up S against the sequential path of the same "
                   f"configuration vs threads p; whiskers: {ci} of the ratio of medians; "
                   f"dotted: ideal S = p; dashed: least-squares Amdahl fit.",
        "efficiency": f"{problem}: parallel efficiency E = S/p for p > 1; whiskers: {ci}.",
        "speedup_vs_size": f"{problem}: speed-up at each variant's largest thread count "
                           f"against the batch size; above 1 parallelism pays, below 1 the "
                           f"overhead wins. Whiskers: {ci}.",
        "speedup_heatmap": f"{problem}: median speed-up over batch size and filter count at "
                           f"each variant's largest thread count (blue: faster than "
                           f"sequential, red: slower).",
        "time_breakdown": f"{problem}: where a run's time goes, median seconds per run: "
                          f"compute, data (shuffle, gather), host-device transfer, test-set "
                          f"evaluation, JIT compile (once per run) and the rest of the loop.",
        "accuracy": f"{problem}: final test accuracy on the held-out split; boxes: quartiles "
                    f"over repeats, dots: runs.",
        "accuracy_vs_time": f"{problem}: final test accuracy against the training wall time "
                            f"of the run (all epochs, compile excluded); one marker a run.",
    }[kind]


def figure_name(kind: str, problem: str) -> str:
    return f"{kind}_{problem.replace('/', '_')}.png"


def make_figures(summary: Summary, figures_dir, dpi: int = 150,
                 kinds: Iterable[str] = FIGURE_KINDS) -> list[dict]:
    """Draw and save every figure (PNG) under ``figures_dir``; figures that have nothing to
    show (e.g. no thread counts above 1) are skipped. Returns ``[{problem, kind, file,
    path, caption}]`` in report order."""
    out = Path(figures_dir)
    out.mkdir(parents=True, exist_ok=True)
    made = []
    for problem in summary.problems:
        for kind in kinds:
            fig = PLOTS[kind](summary, problem)
            if fig is None:
                continue
            name = figure_name(kind, problem)
            fig.savefig(out / name, dpi=dpi)
            made.append({"problem": problem, "kind": kind, "file": name,
                         "path": str(out / name), "caption": _caption(kind, summary, problem),
                         # share of the report's text width (17 cm), so fonts keep one size
                         "width": round(min(1.0, fig.get_figwidth() / TEXT_WIDTH_IN), 3)})
    return made


def show_figures(figures: list[dict], kind: str | None = None):
    """Display saved figures inline in a notebook (optionally only one ``kind``)."""
    from IPython.display import Image, Markdown, display
    for f in figures:
        if kind is None or f["kind"] == kind:
            display(Markdown(f"**{f['caption']}**"), Image(filename=f["path"]))


# ---- numbers for the report ---------------------------------------------------------------------
def fmt(x, digits: int = 3) -> str:
    """``digits`` significant figures (no exponent for ordinary magnitudes); '–' for NaN."""
    if x is None or _isnan(x):
        return "–"
    x = float(x)
    if x == 0:
        return "0"
    mag = math.floor(math.log10(abs(x)))
    dec = min(max(0, digits - 1 - mag), 4)
    text = f"{x:.{dec}f}"
    return "0" if float(text) == 0 else text


def fmt_ci(m, lo, hi, digits: int = 3) -> str:
    if _isnan(lo) or _isnan(hi):
        return fmt(m, digits)
    return f"{fmt(m, digits)} [{fmt(lo, digits)}, {fmt(hi, digits)}]"


def _pct(x, digits: int = 1) -> str:
    return "–" if _isnan(x) else f"{100 * float(x):.{digits}f}%"


def _table_rows(t: pd.DataFrame) -> list[dict]:
    rows, prev = [], None
    for _, r in t.iterrows():
        rows.append({
            "first": bool(rows) and r["config_id"] != prev,
            "label": r["label"], "batch": _int(r["batch_size"]), "filters": _int(r["filters"]),
            "n": str(int(r["n_repeats"])),
            "time": fmt_ci(r["epoch_time_median"], r["epoch_time_ci_lo"], r["epoch_time_ci_hi"]),
            "ips": fmt_ci(r["images_per_sec_median"], r["images_per_sec_ci_lo"],
                          r["images_per_sec_ci_hi"]),
            "speedup": ("1 (baseline)" if r["path"] == BASELINE_PATH else
                        fmt_ci(r["speedup"], r["speedup_ci_lo"], r["speedup_ci_hi"])),
            "efficiency": "–" if r["path"] == BASELINE_PATH else fmt(r["efficiency"]),
            "karp_flatt": fmt(r["karp_flatt"], 2),
            "accuracy": (f"{_pct(r['final_accuracy_median'])} ({_pct(r['final_accuracy_iqr'])})"),
        })
        prev = r["config_id"]
    return rows


def _short_config(r) -> str:
    return f"b{_int(r['batch_size'])} f{_int(r['filters'])}"


def speedup_verdicts(t: pd.DataFrame) -> dict:
    """Per problem and variant (with a sequential baseline and a CI): in how many configurations
    the speed-up's CI lies above 1 (parallelism pays), below 1 (the overhead wins), or spans 1."""
    par = t[(t["path"] != BASELINE_PATH) & t["speedup_ci_lo"].notna()]
    pays = par["speedup_ci_lo"] > 1
    loses = par["speedup_ci_hi"] < 1
    rows = []
    for (problem, lb), g in par.groupby(["problem", "label"], sort=False):
        gp, gl = pays[g.index], loses[g.index]
        gu = ~(gp | gl)
        rows.append({"problem": problem, "label": lb, "n": str(len(g)),
                     "pays": str(int(gp.sum())), "loses": str(int(gl.sum())),
                     "unclear": str(int(gu.sum())),
                     "where_loses": ", ".join(_short_config(r) for _, r in g[gl].iterrows()) or "–",
                     "where_unclear": ", ".join(_short_config(r) for _, r in g[gu].iterrows()) or "–"})
    return {"n": int(len(par)), "n_pays": int(pays.sum()), "n_loses": int(loses.sum()),
            "n_unclear": int(len(par) - pays.sum() - loses.sum()), "rows": rows}


def speedup_trends(t: pd.DataFrame) -> list[dict]:
    """How the speed-up of each variant (at its largest p) moves with the batch size, filters
    held fixed, and with the filter count, batch size held fixed; ``clear`` when the CIs at the
    two ends do not overlap."""
    out = []
    t = _at_max_p(t)
    for (problem, lb), g in t.groupby(["problem", "label"], sort=False):
        for axis, other, unit, ounit in (("batch_size", "filters", "batch", "filters"),
                                         ("filters", "batch_size", "filters", "batch")):
            for ov, h in g.groupby(other, dropna=False):
                h = h.sort_values(axis, key=lambda s: s.map(_num))
                if h[axis].nunique() < 2:
                    continue
                a, b = h.iloc[0], h.iloc[-1]
                clear = (a["speedup_ci_hi"] < b["speedup_ci_lo"]) or (b["speedup_ci_hi"] < a["speedup_ci_lo"])
                out.append({"problem": problem, "label": lb, "fixed": f"{ounit} {_int(ov)}",
                            "varied": unit,
                            "values": ", ".join(f"{_int(x)}: {fmt(y)}" for x, y in
                                                zip(h[axis], h["speedup"])),
                            "direction": "rises" if b["speedup"] > a["speedup"] else "falls",
                            "clear": "yes" if clear else "no"})
    return out


def _machines(summary: Summary) -> list[dict]:
    r = summary.results[summary.results["status"] == "ok"]
    if r.empty:
        r = summary.results
    cols = [c for c in MACHINE_COLUMNS if c != "git_commit"]
    m = r[cols].astype(str).drop_duplicates()
    return m.to_dict("records")


def _model_text(name: str) -> str:
    try:
        from .presets import get_preset
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
            if _isnan(v):
                row[col] = "–"
            elif col == "occupancy" and 0 <= float(v) <= 1:
                row[col] = _pct(v, 0)
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


def report_numbers(summary: Summary, figures: list[dict], gpu_kernels=None) -> dict:
    """Every number and generated sentence ``report/report.typ`` prints (a JSON-able dict)."""
    runs, t, res = summary.runs, summary.table, summary.results
    present = [p for p in PATHS if p in set(runs["path"])] + sorted(set(runs["path"]) - set(PATHS))
    failed_only = sorted(set(summary.failed["path"]) - set(present)) if len(summary.failed) else []
    started = pd.to_datetime(res["started_at"], errors="coerce", utc=True,
                             format="ISO8601").dropna()
    reps = runs.groupby(list(GROUP_KEYS), dropna=False).size() if len(runs) else pd.Series(dtype=int)
    epochs = sorted(int(x) for x in runs["n_epochs"].unique()) if len(runs) else []
    problems = []
    for problem in summary.problems:
        tp = t[t["problem"] == problem]
        rp = runs[runs["problem"] == problem]
        am = summary.amdahl[summary.amdahl["problem"] == problem]
        par = tp[(tp["path"] != BASELINE_PATH) & tp["speedup"].notna()]
        best = par.loc[par["speedup"].idxmax()] if len(par) else None
        params = rp.groupby("filters", dropna=False)["num_params"].first()
        problems.append({
            "name": problem, "dataset": str(rp["dataset"].iat[0]), "model": str(rp["model"].iat[0]),
            "architecture": _model_text(str(rp["model"].iat[0])),
            "params": ", ".join(f"{_int(k)} filters: {int(v):,} parameters" for k, v in params.items()
                                if not _isnan(v)),
            "train_size": ", ".join(sorted({_int(x) for x in rp["train_size"]})),
            "test_size": ", ".join(sorted({_int(x) for x in rp["test_size"].dropna()})) or "–",
            "runs": int(rp["run_key"].nunique()), "configs": int(rp["config_id"].nunique()),
            "paths": [p for p in present if p in set(rp["path"])],
            "absent": [p for p in PATHS if p not in set(rp["path"])],
            "no_baseline": sorted({_config_text(r) for _, r in tp.iterrows() if r["n_baseline"] == 0}),
            "best": None if best is None else {
                "label": best["label"], "config": _config_text(best),
                "speedup": fmt_ci(best["speedup"], best["speedup_ci_lo"], best["speedup_ci_hi"]),
                "efficiency": fmt(best["efficiency"]),
            },
            "table": _table_rows(tp),
            "amdahl": [{"variant": r["variant"], "config": _config_text(r),
                        "p_values": r["p_values"],
                        "f": fmt_ci(r["amdahl_f"], r["amdahl_f_ci_lo"], r["amdahl_f_ci_hi"], 2)
                        + ("*" if r["at_bound"] else ""),
                        "rms": fmt(r["rms_residual"], 2),
                        "f_self": fmt_ci(r["amdahl_f_self"], r["amdahl_f_self_ci_lo"],
                                         r["amdahl_f_self_ci_hi"], 2),
                        "kf": fmt(r["karp_flatt_at_p_max"], 2),
                        "kf_self": fmt(r["karp_flatt_self_at_p_max"], 2),
                        "p_max": _int(r["p_max"]),
                        "s_max": fmt(r["speedup_at_p_max"])} for _, r in am.iterrows()],
            "amdahl_at_bound": int(am["at_bound"].sum()) if len(am) else 0,
            # a single p > 1 point determines the fit (p = 1 only adds a constant to the loss)
            "amdahl_one_point": bool(len(am) and all(
                sum(int(x) > 1 for x in pv.split(", ")) <= 1 for pv in am["p_values"])),
            "figures": [f for f in figures if f["problem"] == problem],
        })
    ok_machines = _machines(summary)
    cuda_ok = "cuda" in set(runs["path"])
    cuda_failed = summary.failed[summary.failed["path"] == "cuda"] if len(summary.failed) else []
    n_rep_min = int(reps.min()) if len(reps) else 0
    numbers = {
        "generated_at": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "source": summary.source,
        "counts": {
            "rows": int(len(res)), "runs": int(res["run_key"].nunique()),
            "runs_ok": int(runs["run_key"].nunique()) if len(runs) else 0,
            "runs_failed": int(len(summary.failed)),
            "repeats_min": n_rep_min, "repeats_max": int(reps.max()) if len(reps) else 0,
            "epochs": ", ".join(map(str, epochs)) or "–",
            "configs": int(runs["config_id"].nunique()) if len(runs) else 0,
            "problems": len(summary.problems),
            "groups": int(len(t)),
        },
        "period": {"start": started.min().strftime("%Y-%m-%d %H:%M") if len(started) else "–",
                   "end": started.max().strftime("%Y-%m-%d %H:%M") if len(started) else "–"},
        "machines": ok_machines,
        "commits": sorted({str(c) for c in res["git_commit"].dropna()}),
        "versions": {c: sorted({str(v) for v in res[c].dropna()}) for c in
                     ("python", "numpy_version", "numba_version", "tensorflow_version",
                      "keras_version")},
        "failed": [{"run_key": r["run_key"], "path": r["path"],
                    "error": str(r.get("error", ""))[:160]} for _, r in summary.failed.iterrows()],
        "paths": {"expected": list(PATHS), "present": present,
                  "absent": [p for p in PATHS if p not in present], "failed_only": failed_only},
        "method": {"n_boot": summary.n_boot, "level": _pct(summary.level, 0),
                   "seed": summary.seed,
                   # a bootstrap CI of a median cannot leave the range of the observations; the
                   # range [min, max] of n samples covers the true median with prob. 1 - 2^(1-n)
                   "range_coverage": _pct(1 - 2.0 ** (1 - n_rep_min), 0) if n_rep_min else "–",
                   "n_min": n_rep_min},
        "problems": problems,
        "verdicts": speedup_verdicts(t) if len(t) else {"n": 0},
        "trends": speedup_trends(t) if len(t) else [],
        "sync": sync_check(summary),
        "noise": noise(summary),
        "cold_compile": cold_compile(summary),
        "gpu": {"cuda_measured": bool(cuda_ok), "cuda_failed": int(len(cuda_failed)),
                "simulated": simulator_check(summary),
                "cuda_error": (str(cuda_failed["error"].iat[0])[:160] if len(cuda_failed) else ""),
                "kernels": read_gpu_kernels(gpu_kernels)},
        "datasets": sorted(set(runs["dataset"])) if len(runs) else [],
    }
    s = numbers["sync"]
    if s.get("pairs"):
        s["max_abs_diff_text"] = _pct(s["max_abs_diff"], 2)
    n = numbers["noise"]
    if n.get("groups"):
        n["cv_median_text"], n["cv_max_text"] = _pct(n["cv_median"]), _pct(n["cv_max"])
    return _json_clean(numbers)


def _json_clean(x):
    if isinstance(x, dict):
        return {str(k): _json_clean(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_json_clean(v) for v in x]
    return _jsonable(x)


# ---- the PDF ------------------------------------------------------------------------------------
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
