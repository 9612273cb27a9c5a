"""The one summary of the study's results: per-run table, per-configuration medians with
distribution-free intervals, speed-ups against three baselines (paired by seed), efficiency,
Karp-Flatt and Amdahl where enough thread counts were measured, accuracy in percentage points,
time-to-accuracy; the summary files; derived facts.

Failed and diverged runs (``status != 'ok'``) are excluded from every statistic and listed
separately (their counts are in the report). Nothing here averages speed-ups across
configurations (Hoefler & Belli 2015): each ratio is reported for its own configuration with
its own interval.

Intervals. With ``n`` repeats, the interval of a median is the order-statistic interval
``[x_(k), x_(n+1-k)]`` with the largest ``k`` whose distribution-free coverage
``1 - 2 P(Bin(n, 1/2) < k)`` is at least ``level``, or the range when ``n`` is too small for
that; its actual coverage is in ``ci_coverage`` (94% for n = 5: the range). Speed-ups are
medians of per-seed ratios (repeat ``r`` of every path has the same seed, initial weights and
data order, so the runs pair), with the same kind of interval over the ratios.

Baselines of a speed-up (issue 10): ``speedup`` against the sequential NumPy path (a),
``speedup_best`` against the best one-core contender measured for the same configuration (b:
whichever of sequential, numba, accumulation, Keras or PyTorch on one thread was fastest,
named in ``best_label``), ``speedup_self`` against the same variant with one worker (c).
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from .. import paths as P
from ..files import atomic_write
from ..results import MACHINE_COLUMNS
from .statistics import (amdahl_speedup, fit_amdahl, holm, karp_flatt, median_interval,
                         paired_log_test, paired_ratios, verdict)
from .text import fmt, fmt_int, fmt_pct, is_missing

BASELINE_PATH = P.BASELINE
#: what a speed-up is matched on: the sequential run of the same configuration
CONFIG_KEYS = ("dataset", "model", "batch_size", "filters", "train_size", "dtype", "optimizer",
               "lr_schedule", "augment")
#: ... on the same machine (constant within one study; guards against mixed result files)
MACHINE_KEYS = ("cpu", "cores")
#: what tells two variants apart: the path, its strategy and backend, average's period, a
#: reference framework's engine (Keras with or without XLA, PyTorch eager or compiled) and the
#: link profile of MPI ranks across an emulated cluster ("" on one host)
VARIANT_KEYS = ("path", "strategy", "backend", "period", "engine", "link")
GROUP_KEYS = CONFIG_KEYS + VARIANT_KEYS + ("threads",)
#: Amdahl and Karp-Flatt only where at least this many worker counts were measured
MIN_P_FOR_FITS = 3


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
    """``df`` with the optional columns the analysis reads added when a frame lacks them (a
    hand-made frame, or a file from an older study), and ``status`` in lower case."""
    defaults = {**{c: np.nan for c in (*MACHINE_COLUMNS, "num_params", "started_at",
                                       "epochs", "test_size", "cold_compile_time",
                                       "cuda_simulator", "device", "comm_time",
                                       "reduce_time", "target", "time_to_target",
                                       "steps_to_target", "examples_to_target",
                                       "order_index", "flops_per_image",
                                       "sgemm_peak_gflops", "lr")},
                "period": "", "tta_status": "", "eval_trace": "", "eval_every": 0,
                "val_size": 0, "hosts": "", "optimizer": "", "lr_schedule": "",
                "augment": "", "engine": "", "link": "",
                "resumed": False, "warmup": False}
    missing = {c: v for c, v in defaults.items() if c not in df.columns}
    df = df.assign(**missing) if missing else df.copy()
    for col in ("period", "optimizer", "lr_schedule", "augment", "engine", "link"):  # text
        df[col] = df[col].fillna("").astype(str).replace("nan", "")
    df["status"] = df["status"].astype(str).str.lower()
    return df


# ---- labels (from the path registry) ----------------------------------------------------------
variant_name = P.variant_name
workers = P.workers


def _variant(path, strategy, backend, period, engine="", link="") -> str:
    name = P.variant_name(path, strategy, backend, engine, link)
    return name + (f"@{period}" if period not in (None, "") and not is_missing(period) else "")


def _label(path, strategy, backend, threads, period, engine="", link="") -> str:
    lab = P.label(path, strategy, backend, threads, engine, link)
    if period not in (None, "") and not is_missing(period):
        head, sep, tail = lab.partition(" ")
        lab = f"{head}@{period}{sep}{tail}"
    return lab


def variant_sort_key(path, strategy, backend, threads):
    """Registry order of paths, then each path's own order of strategies and backends."""
    entry = P.PATHS.get(path)
    si = (entry.strategies.index(strategy) if entry and strategy in entry.strategies
          else 99)
    bi = entry.backends.index(backend) if entry and backend in entry.backends else 99
    return (P.order(path), str(path), si, bi, str(backend),
            0 if is_missing(threads) else float(threads))


def _period_key(period) -> float:
    if period in (None, "") or is_missing(period):
        return -1.0
    return 1e18 if period == "epoch" else float(period)


def config_text(row, full: bool = False) -> str:
    """``batch 64, filters 8`` (``full``: with the training size and dtype) of a row."""
    text = f"batch {fmt_int(row['batch_size'])}, filters {fmt_int(row['filters'])}"
    if full:
        text += f", n={fmt_int(row['train_size'])}, {row['dtype']}"
    return text


def sort_number(x) -> float:
    """A setting as a number to sort by; missing values (the preset's default) first."""
    return -1.0 if is_missing(x) else float(x)


def _ids(frame: pd.DataFrame, keys) -> pd.Series:
    cols = [frame[k].map(str) for k in keys]
    return pd.Series(["|".join(v) for v in zip(*cols)], index=frame.index, dtype=object)


# ---- per-run table ------------------------------------------------------------------------------
def run_table(df: pd.DataFrame) -> pd.DataFrame:
    """One row per successful run: configuration, ``epoch_time`` (median over epochs),
    ``images_per_sec`` (images per epoch / epoch_time), per-run totals of each timed phase,
    ``compile_time``, ``final_accuracy``, time-to-accuracy fields, and the labels ``problem``,
    ``variant``, ``label``, ``config_id``, ``p``, ``oversubscribed``, ``tta`` (whether the run
    trained to a target: its epochs stop early, so it is kept out of the throughput
    statistics)."""
    df = complete(df)
    ok, _ = split_failed(df)
    ok = ok[ok["epoch"].notna() & ok["time"].notna()]
    if ok.empty:
        return pd.DataFrame(columns=[*GROUP_KEYS, "run_key", "epoch_time", "problem", "label",
                                     "variant", "p", "config_id", "tta"])
    ok = ok.assign(_images=(ok["images_per_sec"] * ok["time"]).fillna(ok["train_size"]),
                   comm_time=ok["comm_time"].fillna(0.0))
    # the timings of the epochs a resumed process trained (the run's first process died)
    # are kept out of the throughput figures, which come from the run's first process; so
    # are those of a run's warm-up epochs (JIT, caches, thread pools, a compiled graph)
    resumed = (ok["resumed"].fillna(False).astype(bool)
               | ok["warmup"].fillna(False).astype(bool))
    timing = ["time", "compute_time", "comm_time", "data_time", "transfer_time", "eval_time",
              "_images"]
    ok.loc[resumed, timing] = np.nan
    g = ok.groupby("run_key", sort=True)
    first = g[[*GROUP_KEYS, *MACHINE_KEYS, "repeat", "seed", "lr", "compile_time",
               "final_test_accuracy", "num_params", "started_at", "test_size", "order_index",
               "target", "eval_every", "val_size", "tta_status", "time_to_target",
               "steps_to_target", "examples_to_target", "eval_trace", "reduce_time",
               "epochs", "flops_per_image", "sgemm_peak_gflops"]].first()
    agg = g.agg(n_epochs=("epoch", "nunique"), n_timed=("time", "count"),
                epoch_time=("time", "median"),
                total_time=("time", "sum"), compute=("compute_time", "sum"),
                comm=("comm_time", "sum"), data=("data_time", "sum"),
                transfer=("transfer_time", "sum"), eval=("eval_time", "sum"),
                images=("_images", "median"), total_images=("_images", "sum"))
    last_acc = ok.sort_values("epoch").groupby("run_key")["test_accuracy"].last()
    runs = first.join(agg)
    runs["final_accuracy"] = runs["final_test_accuracy"].fillna(last_acc)
    runs["compile"] = runs["compile_time"].fillna(0.0)
    runs["other"] = (runs["total_time"] - runs["compute"] - runs["comm"] - runs["data"]
                     - runs["transfer"]).clip(lower=0.0)
    runs["images_per_sec"] = runs["images"] / runs["epoch_time"]
    runs["time_per_image"] = runs["epoch_time"] / runs["images"]
    runs = runs.reset_index()
    runs["tta"] = runs["target"].notna()
    runs["variant"] = [_variant(*v) for v in runs[list(VARIANT_KEYS)].itertuples(index=False)]
    runs["p"] = [P.workers(a, t) for a, t in zip(runs["path"], runs["threads"])]
    runs["oversubscribed"] = [P.oversubscribed(a, t, c) for a, t, c in
                              zip(runs["path"], runs["threads"], runs["cores"])]
    runs["label"] = [_label(*v) for v in
                     runs[["path", "strategy", "backend", "threads", "period", "engine",
                           "link"]].itertuples(index=False)]
    runs["problem"] = runs["dataset"].astype(str) + "/" + runs["model"].astype(str)
    runs["config_id"] = _ids(runs, CONFIG_KEYS + MACHINE_KEYS + ("target",))
    keys = pd.DataFrame({
        "a": runs["problem"], "t": runs["target"].fillna(-1.0),
        "b": runs["batch_size"].map(sort_number), "c": runs["filters"].map(sort_number),
        "d": runs["train_size"].map(sort_number), "e": runs["dtype"].astype(str),
        "f": [variant_sort_key(*k) for k in runs[["path", "strategy", "backend", "threads"]]
              .itertuples(index=False)], "q": runs["period"].map(_period_key),
        "g": runs["repeat"].map(sort_number)})
    order = keys.sort_values(list(keys.columns), kind="stable").index
    return runs.loc[order].reset_index(drop=True)


# ---- the summary ----------------------------------------------------------------------------------
@dataclass
class Summary:
    """Everything the figures and the report need; build it with :func:`summarize`."""

    results: pd.DataFrame      # the rows as loaded
    runs: pd.DataFrame         # one row per successful run (:func:`run_table`)
    table: pd.DataFrame        # throughput runs: one row per configuration x variant x threads
    amdahl: pd.DataFrame       # fits, where >= MIN_P_FOR_FITS worker counts were measured
    failed: pd.DataFrame       # one row per failed or diverged run
    tta: pd.DataFrame          # time-to-accuracy: one row per configuration x variant x threads
    n_boot: int
    level: float
    seed: int
    source: str = ""
    extra: dict = field(default_factory=dict, repr=False)

    @property
    def problems(self) -> list[str]:
        return sorted(self.runs["problem"].unique()) if len(self.runs) else []


SUMMARY_COLUMNS = [
    "problem", *CONFIG_KEYS, *VARIANT_KEYS, "threads", "variant", "label", "p",
    "oversubscribed", "n_repeats", "ci_coverage", "epoch_time_median", "epoch_time_ci_lo",
    "epoch_time_ci_hi", "images_per_sec_median", "images_per_sec_ci_lo", "images_per_sec_ci_hi",
    "time_per_image_ms", "gflops", "peak_fraction", "n_pairs", "speedup", "speedup_ci_lo", "speedup_ci_hi",
    "speedup_ci_coverage", "best_label", "speedup_best", "speedup_best_ci_lo",
    "speedup_best_ci_hi", "best_variant", "speedup_self", "speedup_self_ci_lo",
    "speedup_self_ci_hi", "speedup_p", "speedup_p_holm", "speedup_verdict", "speedup_best_p",
    "speedup_best_p_holm", "speedup_best_verdict", "efficiency", "efficiency_best", "efficiency_self", "karp_flatt_self", "amdahl_f",
    "amdahl_f_self", "final_accuracy_median", "final_accuracy_q25", "final_accuracy_q75",
    "final_accuracy_iqr", "accuracy_diff_pp", "accuracy_diff_pp_lo", "accuracy_diff_pp_hi",
    "compute_per_epoch", "comm_per_epoch", "data_per_epoch", "transfer_per_epoch",
    "eval_per_epoch", "compile_time", "reduce_time", "epoch_time_cv", "n_baseline",
    "config_id",
]


def _by_seed(g: pd.DataFrame, col: str = "epoch_time") -> dict:
    return {int(s): float(v) for s, v in zip(g["seed"], g[col]) if np.isfinite(v)}


def _ratio(base: dict | None, mine: dict, level: float):
    """Median of the per-seed ratios base/mine with its interval; (nan...) without pairs."""
    r = paired_ratios(base or {}, mine)
    if not len(r):
        return (float("nan"),) * 4 + (0,)
    m, lo, hi, cov = median_interval(r, level)
    return m, lo, hi, cov, len(r)


def summarize(df: pd.DataFrame, n_boot: int = 0, level: float = 0.95, seed: int = 0,
              source: str = "") -> Summary:
    """The summary (see the module doc). ``n_boot`` and ``seed`` are kept for the callers of
    the first edition and recorded; the intervals are order statistics, not resampled."""
    df = complete(df)
    runs = run_table(df)
    _, failed = split_failed(df)
    rows = []
    timing = runs[~runs["tta"]] if len(runs) else runs
    if len(timing):
        seq = {cid: _by_seed(g) for cid, g in timing[timing["path"] == BASELINE_PATH]
               .groupby("config_id")}
        seq_acc = {cid: _by_seed(g, "final_accuracy") for cid, g in
                   timing[timing["path"] == BASELINE_PATH].groupby("config_id")}
        one = {k: _by_seed(g) for k, g in timing[timing["p"] == 1]
               .groupby(["config_id", "variant"])}
        # the best one-core contender per configuration: fastest median epoch time at p = 1
        best = {}
        for cid, g in timing[timing["p"] == 1].groupby("config_id"):
            med = g.groupby("label")["epoch_time"].median()
            lab = med.idxmin()
            mine_best = g[g["label"] == lab]
            best[cid] = (lab, _by_seed(mine_best), mine_best["variant"].iat[0])
        for _, g in timing.groupby(["config_id", "variant", "threads"], sort=False, dropna=False):
            r0 = g.iloc[0]
            cid, variant, p = r0["config_id"], r0["variant"], r0["p"]
            mine = _by_seed(g)
            med, lo, hi, cov = median_interval(g["epoch_time"], level)
            ips, ips_lo, ips_hi, _ = median_interval(g["images_per_sec"], level)
            if r0["path"] == BASELINE_PATH:
                s = (1.0, float("nan"), float("nan"), float("nan"), len(mine))
            else:
                s = _ratio(seq.get(cid), mine, level)
            blab, bseeds, bvariant = best.get(cid, ("", None, ""))
            sb = (1.0, float("nan"), float("nan"), float("nan"), len(mine)) \
                if blab == r0["label"] else _ratio(bseeds, mine, level)
            test_seq = paired_log_test({} if r0["path"] == BASELINE_PATH
                                       else seq.get(cid) or {}, mine)
            test_best = paired_log_test({} if blab == r0["label"] else bseeds or {}, mine)
            base1 = one.get((cid, variant))
            if p == 1 and base1 is not None:
                ss = (1.0, float("nan"), float("nan"), float("nan"), len(mine))
            else:
                ss = _ratio(base1, mine, level) if p == p else (float("nan"),) * 4 + (0,)
            acc = g["final_accuracy"].dropna().to_numpy(float)
            q25, q75 = (np.quantile(acc, [0.25, 0.75]) if len(acc) else (np.nan, np.nan))
            diffs = [100 * (a - seq_acc.get(cid, {}).get(int(sd), np.nan))
                     for sd, a in zip(g["seed"], g["final_accuracy"])]
            dmed, dlo, dhi, _ = median_interval([d for d in diffs if np.isfinite(d)], level)
            n_ep = g["n_timed"].clip(lower=1)  # the epochs whose timings count
            # E = S/p only where the p workers had a core each: an oversubscribed point's S
            # is not spread over p cores
            has_p = p == p and p > 0 and not r0["oversubscribed"]
            t = g["epoch_time"].to_numpy(float)
            rows.append({
                **{k: r0[k] for k in ("problem", *GROUP_KEYS, "variant", "label", "p",
                                      "oversubscribed", "config_id")},
                "n_repeats": len(g), "ci_coverage": cov,
                "epoch_time_median": med, "epoch_time_ci_lo": lo, "epoch_time_ci_hi": hi,
                "images_per_sec_median": ips, "images_per_sec_ci_lo": ips_lo,
                "images_per_sec_ci_hi": ips_hi,
                "time_per_image_ms": 1000 * float(np.median(g["time_per_image"])),
                "gflops": float(ips * g["flops_per_image"].median() / 1e9)
                if g["flops_per_image"].notna().any() else np.nan,
                "peak_fraction": float(ips * g["flops_per_image"].median() / 1e9
                                       / (g["sgemm_peak_gflops"].median() * max(p, 1)))
                if g["flops_per_image"].notna().any() and g["sgemm_peak_gflops"].notna().any()
                and p == p else np.nan,
                "n_pairs": s[4], "speedup": s[0], "speedup_ci_lo": s[1], "speedup_ci_hi": s[2],
                "speedup_ci_coverage": s[3], "best_label": blab, "speedup_best": sb[0],
                "speedup_best_ci_lo": sb[1], "speedup_best_ci_hi": sb[2],
                "best_variant": bvariant, "speedup_p": test_seq["p"],
                "speedup_best_p": test_best["p"], "_log_seq": test_seq["mean_log"],
                "_log_best": test_best["mean_log"],
                "speedup_self": ss[0], "speedup_self_ci_lo": ss[1], "speedup_self_ci_hi": ss[2],
                "efficiency": s[0] / p if has_p else np.nan,
                "efficiency_best": sb[0] / p if has_p else np.nan,
                "efficiency_self": ss[0] / p if has_p else np.nan,
                "final_accuracy_median": float(np.median(acc)) if len(acc) else np.nan,
                "final_accuracy_q25": q25, "final_accuracy_q75": q75,
                "final_accuracy_iqr": q75 - q25,
                "accuracy_diff_pp": dmed, "accuracy_diff_pp_lo": dlo,
                "accuracy_diff_pp_hi": dhi,
                "compute_per_epoch": float(np.median(g["compute"] / n_ep)),
                "comm_per_epoch": float(np.median(g["comm"] / n_ep)),
                "data_per_epoch": float(np.median(g["data"] / n_ep)),
                "transfer_per_epoch": float(np.median(g["transfer"] / n_ep)),
                "eval_per_epoch": float(np.median(g["eval"] / n_ep)),
                "compile_time": float(np.median(g["compile"])),
                "reduce_time": float(np.nanmedian(g["reduce_time"]))
                if g["reduce_time"].notna().any() else np.nan,
                "epoch_time_cv": float(np.std(t, ddof=1) / np.mean(t)) if len(t) > 1 else np.nan,
                "n_baseline": len(seq.get(cid, {})),
            })
    table = pd.DataFrame(rows, columns=[c for c in SUMMARY_COLUMNS
                                        if c not in ("karp_flatt_self", "amdahl_f",
                                                     "amdahl_f_self")] + ["_log_seq",
                                                                          "_log_best"])
    table = tested(table)
    amdahl = _amdahl_table(table, timing, level)
    table = table.merge(amdahl[["config_id", "variant", "amdahl_f", "amdahl_f_self"]],
                        on=["config_id", "variant"], how="left")
    kf = []
    for _, r in table.iterrows():
        fitted = not is_missing(r["amdahl_f_self"]) or not is_missing(r["amdahl_f"])
        kf.append(karp_flatt(r["speedup_self"], r["p"]) if fitted and r["p"] > 1
                  and not r["oversubscribed"] else np.nan)
    table["karp_flatt_self"] = kf
    table = table[SUMMARY_COLUMNS]
    return Summary(results=df, runs=runs, table=table, amdahl=amdahl, failed=failed,
                   tta=tta_table(runs, level), n_boot=n_boot, level=level, seed=seed,
                   source=str(source))


def tested(table: pd.DataFrame) -> pd.DataFrame:
    """The verdicts of the paired tests (:func:`~cnn.analysis.statistics.paired_log_test`)
    against the sequential path and against the best one-core contender, each family
    corrected by Holm-Bonferroni: the family is every row that uses more than one core
    (``p > 1``) without oversubscribing the machine and has a test; the other rows keep no
    corrected p and no verdict (``""``)."""
    table = table.copy()
    family = ((table["p"] > 1) & ~table["oversubscribed"].astype(bool)) if len(table) else \
        pd.Series(dtype=bool)
    for col, log in (("speedup", "_log_seq"), ("speedup_best", "_log_best")):
        raw = table[f"{col}_p"].where(family)
        table[f"{col}_p_holm"] = holm(raw.to_numpy(float)) if len(table) else []
        table[f"{col}_verdict"] = [verdict(m, q) if f and np.isfinite(q) else ""
                                   for m, q, f in zip(table[log], table[f"{col}_p_holm"],
                                                      family)]
    return table.drop(columns=["_log_seq", "_log_best"])


AMDAHL_COLUMNS = ["problem", *CONFIG_KEYS, "variant", "config_id", "p_values", "n_points",
                  "excluded", "amdahl_f", "amdahl_f_ci_lo", "amdahl_f_ci_hi",
                  "amdahl_f_ci_coverage", "rms_residual", "amdahl_f_self",
                  "amdahl_f_self_ci_lo", "amdahl_f_self_ci_hi", "rms_residual_self",
                  "p_max", "speedup_self_at_p_max", "karp_flatt_self_at_p_max"]


def _fits(points: dict, level: float):
    """Least-squares Amdahl ``f`` over the medians of per-seed speed-ups ``{p: {seed: S}}``,
    and the order-statistic interval of the per-seed fits (seeds measured at every p)."""
    ps = np.array(sorted(points), dtype=float)
    med = np.array([np.median(list(points[p].values())) for p in sorted(points)])
    f = fit_amdahl(ps, med)
    seeds = set.intersection(*(set(points[p]) for p in sorted(points)))
    per_seed = [fit_amdahl(ps, np.array([points[p][s] for p in sorted(points)]))
                for s in sorted(seeds)]
    _, lo, hi, cov = median_interval(per_seed, level) if per_seed else (np.nan,) * 4
    rms = float(np.sqrt(np.mean((med - amdahl_speedup(f, ps)) ** 2)))
    return f, lo, hi, cov, rms


def _amdahl_table(table: pd.DataFrame, timing: pd.DataFrame, level: float) -> pd.DataFrame:
    """Amdahl fits per configuration and variant, only where at least
    :data:`MIN_P_FOR_FITS` worker counts (1 included) were measured without oversubscribing
    the machine; oversubscribed counts are left out of the fit (``excluded``) and the fit is
    never used past the largest measured ``p``. ``amdahl_f`` fits the speed-up against the
    sequential path, ``amdahl_f_self`` against the variant's own one-worker run."""
    rows = []
    if not len(timing):
        return pd.DataFrame(columns=AMDAHL_COLUMNS)
    cand = timing[timing["p"].notna() & (timing["path"] != BASELINE_PATH)]
    seq = timing[timing["path"] == BASELINE_PATH]
    for (cid, variant), g in cand.groupby(["config_id", "variant"], sort=False):
        fit_g = g[~g["oversubscribed"]]
        ps = sorted(fit_g["p"].unique())
        if len(ps) < MIN_P_FOR_FITS or 1.0 not in ps:
            continue
        one = _by_seed(fit_g[fit_g["p"] == 1])
        base = _by_seed(seq[seq["config_id"] == cid])
        self_pts = {p: {s: one[s] / t for s, t in _by_seed(fit_g[fit_g["p"] == p]).items()
                        if s in one} for p in ps}
        seq_pts = {p: {s: base[s] / t for s, t in _by_seed(fit_g[fit_g["p"] == p]).items()
                       if s in base} for p in ps}
        f_s, lo_s, hi_s, _, rms_s = _fits(self_pts, level)
        if all(seq_pts.values()):
            f, lo, hi, cov, rms = _fits(seq_pts, level)
        else:
            f = lo = hi = cov = rms = float("nan")
        top = table[(table["config_id"] == cid) & (table["variant"] == variant)
                    & (table["p"] == max(ps))]
        s_top = float(top["speedup_self"].iat[0]) if len(top) else np.nan
        r0 = g.iloc[0]
        rows.append({**{k: r0[k] for k in ("problem", *CONFIG_KEYS)}, "variant": variant,
                     "config_id": cid, "p_values": ", ".join(str(int(x)) for x in ps),
                     "n_points": len(ps),
                     "excluded": ", ".join(str(int(x)) for x in
                                           sorted(g.loc[g["oversubscribed"], "p"].unique())),
                     "amdahl_f": f, "amdahl_f_ci_lo": lo, "amdahl_f_ci_hi": hi,
                     "amdahl_f_ci_coverage": cov, "rms_residual": rms,
                     "amdahl_f_self": f_s, "amdahl_f_self_ci_lo": lo_s,
                     "amdahl_f_self_ci_hi": hi_s, "rms_residual_self": rms_s,
                     "p_max": max(ps), "speedup_self_at_p_max": s_top,
                     "karp_flatt_self_at_p_max": karp_flatt(s_top, max(ps))})
    return pd.DataFrame(rows, columns=AMDAHL_COLUMNS)


TTA_COLUMNS = ["problem", *CONFIG_KEYS, *VARIANT_KEYS, "threads", "variant", "label", "p",
               "target", "lr", "n_runs", "n_reached", "n_failed", "cap_epochs",
               "time_to_target_median", "time_to_target_ci_lo", "time_to_target_ci_hi",
               "ci_coverage", "steps_to_target_median", "time_per_step",
               "steps_x_time_per_step", "tta_speedup", "tta_speedup_ci_lo",
               "tta_speedup_ci_hi", "config_id"]


def tta_table(runs: pd.DataFrame, level: float = 0.95) -> pd.DataFrame:
    """Time-to-accuracy per configuration, variant and learning rate (runs with a target; a
    variant may train at another rate than the configuration's others): runs, runs that
    reached the target within the cap and that did not, median time-to-target over the runs
    that reached it with its interval, median steps-to-target, the time per step measured
    over the runs' training, their product (the time-to-target a variant would have with the
    median number of steps), and the speed-up in time-to-target against sequential (per seed,
    seeds where both reached)."""
    if not len(runs) or not runs["tta"].any():
        return pd.DataFrame(columns=TTA_COLUMNS)
    t = runs[runs["tta"]].copy()
    t["steps_total"] = [_steps(tr) for tr in t["eval_trace"]]
    t["time_per_step"] = t["total_time"] / t["steps_total"]
    seq = {cid: _by_seed(g[g["tta_status"] == "reached"], "time_to_target")
           for cid, g in t[t["path"] == BASELINE_PATH].groupby("config_id")}
    rows = []
    for _, g in t.groupby(["config_id", "variant", "threads", "lr"], sort=False, dropna=False):
        r0 = g.iloc[0]
        hit = g[g["tta_status"] == "reached"]
        med, lo, hi, cov = median_interval(hit["time_to_target"], level)
        steps = float(hit["steps_to_target"].median()) if len(hit) else np.nan
        tps = float(g["time_per_step"].median())
        sp = (1.0, np.nan, np.nan, np.nan, 0) if r0["path"] == BASELINE_PATH else \
            _ratio(seq.get(r0["config_id"]), _by_seed(hit, "time_to_target"), level)
        rows.append({**{k: r0[k] for k in ("problem", *GROUP_KEYS, "variant", "label", "p",
                                           "target", "lr", "config_id")},
                     "n_runs": len(g), "n_reached": len(hit), "n_failed": len(g) - len(hit),
                     "cap_epochs": int(r0["epochs"]),
                     "time_to_target_median": med, "time_to_target_ci_lo": lo,
                     "time_to_target_ci_hi": hi, "ci_coverage": cov,
                     "steps_to_target_median": steps, "time_per_step": tps,
                     "steps_x_time_per_step": steps * tps, "tta_speedup": sp[0],
                     "tta_speedup_ci_lo": sp[1], "tta_speedup_ci_hi": sp[2]})
    return pd.DataFrame(rows, columns=TTA_COLUMNS)


def _steps(trace) -> float:
    """The steps a run trained (the last evaluation's step; evaluations end the run)."""
    try:
        tr = json.loads(trace) if isinstance(trace, str) and trace else []
    except ValueError:
        return np.nan
    return float(tr[-1][0]) if tr else np.nan


def trace_frame(runs: pd.DataFrame) -> pd.DataFrame:
    """The evaluation traces of time-to-accuracy runs, one row per evaluation: ``run_key``,
    ``label``, ``problem``, ``config_id``, ``seed``, ``step``, ``examples``, ``seconds``,
    ``val_accuracy``."""
    rows = []
    for _, r in runs[runs["tta"]].iterrows() if len(runs) else []:
        try:
            tr = json.loads(r["eval_trace"]) if r["eval_trace"] else []
        except ValueError:
            tr = []
        rows += [{"run_key": r["run_key"], "label": r["label"], "variant": r["variant"],
                  "problem": r["problem"], "config_id": r["config_id"], "seed": r["seed"],
                  "target": r["target"], "step": s, "examples": e, "seconds": sec,
                  "val_accuracy": a} for s, e, sec, a in tr]
    return pd.DataFrame(rows, columns=["run_key", "label", "variant", "problem", "config_id",
                                       "seed", "target", "step", "examples", "seconds",
                                       "val_accuracy"])


def at_largest_p(t: pd.DataFrame) -> pd.DataFrame:
    """Each variant at its largest measured p that does not oversubscribe the machine."""
    t = t[(t["path"] != BASELINE_PATH) & t["speedup"].notna() & t["p"].notna()
          & ~t["oversubscribed"].astype(bool)]
    if t.empty:
        return t
    pm = t.groupby(["config_id", "variant"])["p"].transform("max")
    return t[t["p"] == pm]


#: the columns a reader looks at first (the notebooks show these)
VIEW_COLUMNS = ["problem", "label", "batch_size", "filters", "n_repeats", "epoch_time_median",
                "images_per_sec_median", "images_per_sec_ci_lo", "images_per_sec_ci_hi",
                "speedup", "speedup_ci_lo", "speedup_ci_hi", "best_label", "speedup_best",
                "speedup_self", "efficiency_best", "karp_flatt_self", "final_accuracy_median",
                "accuracy_diff_pp", "oversubscribed"]


def write_summary(summary: Summary, out_dir) -> dict[str, Path]:
    """Write ``summary.csv`` and ``summary.json`` (the same tidy table, JSON as a list of
    records with nulls for undefined values) into ``out_dir``, and ``summary_tta.csv`` (the
    time-to-accuracy table) when there are such runs."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    table = summary.table.drop(columns=["config_id"])
    paths = {"csv": out / "summary.csv", "json": out / "summary.json"}
    atomic_write(paths["csv"], table.to_csv(index=False))
    records = [{k: jsonable(v) for k, v in r.items()} for r in table.to_dict("records")]
    atomic_write(paths["json"], json.dumps(records, indent=1))
    if len(summary.tta):
        paths["tta_csv"] = out / "summary_tta.csv"
        atomic_write(paths["tta_csv"],
                     summary.tta.drop(columns=["config_id"]).to_csv(index=False))
    return paths


def jsonable(v):
    """``v`` as a plain JSON value: NumPy scalars as Python numbers, NaN/inf/NA as None."""
    if isinstance(v, (np.integer,)):
        return int(v)
    if isinstance(v, (np.floating, float)):
        return None if not math.isfinite(float(v)) else float(v)
    if isinstance(v, (np.bool_,)):
        return bool(v)
    if v is None or (not isinstance(v, (str, list, dict, tuple)) and pd.isna(v)):
        return None
    return v


# ---- derived facts for the narrative ------------------------------------------------------------
def sync_check(summary: Summary) -> dict:
    """Final test accuracy of the runs of every path that computes the sequential algorithm
    (the registry's ``sequential_algorithm``: sync threads, processes, MPI ranks, Numba, CUDA;
    accumulation only on a network without batch statistics) against the one-worker reference of the same configuration and seed (the sequential
    path where the configuration ran it, else Numba's one core, as the time-to-accuracy
    runs do), in percentage points, beside the seed-to-seed spread of that configuration's
    own reference runs (their range over seeds): a difference inside it says nothing either
    way; the per-step weights (the equivalence figure) are the test of equivalence.

    ``configs``: one record per configuration (``problem``, ``batch_size``, ``tta``: the
    time-to-accuracy runs, trained to their target or their epoch cap, ``reference``,
    ``pairs``, ``max_abs_diff_pp``, ``seed_spread_pp``, ``within_spread``,
    ``reference_accuracy``: the reference's median final accuracy); the top-level figures
    are over every configuration, ``outside``: the configurations whose largest difference
    exceeds their own spread."""
    r = summary.runs
    empty = {"pairs": 0, "configs": [], "outside": []}
    if not len(r):
        return empty
    r = r[r["final_accuracy"].notna()]
    normalises = {m: _has_batch_statistics(m) for m in r["model"].unique()}
    algo = pd.Series([path in P.PATHS and (path == BASELINE_PATH or P.PATHS[path]
                                           .computes_sequential(strategy, normalises[model]))
                      for path, strategy, model in zip(r["path"], r["strategy"], r["model"])],
                     index=r.index, dtype=bool)
    configs = []
    for _, g in r[algo].groupby("config_id", sort=False):
        reference = next((p for p in (BASELINE_PATH, "numba") if (g["path"] == p).any()), None)
        if reference is None:
            continue
        ref = g[(g["path"] == reference) & (g["p"] == 1)]
        m = g.drop(ref.index).merge(ref[["seed", "final_accuracy"]], on="seed",
                                    suffixes=("", "_ref"))
        if m.empty:
            continue
        d = 100 * (m["final_accuracy"] - m["final_accuracy_ref"]).abs()
        spread = 100 * (ref["final_accuracy"].max() - ref["final_accuracy"].min())
        configs.append({"problem": g["problem"].iat[0], "batch_size": int(g["batch_size"].iat[0]),
                        "tta": bool(g["tta"].iat[0]), "reference": reference,
                        "pairs": int(len(m)), "max_abs_diff_pp": float(d.max()),
                        "median_abs_diff_pp": float(d.median()),
                        "seed_spread_pp": float(spread),
                        "within_spread": bool(d.max() <= spread),
                        "reference_accuracy": float(ref["final_accuracy"].median())})
    if not configs:
        return empty
    c = pd.DataFrame(configs)
    return {"pairs": int(c["pairs"].sum()), "max_abs_diff_pp": float(c["max_abs_diff_pp"].max()),
            "seed_spread_pp_median": float(c["seed_spread_pp"].median()),
            "seed_spread_pp_max": float(c["seed_spread_pp"].max()),
            "configs": configs, "outside": [x for x in configs if not x["within_spread"]]}


def _has_batch_statistics(model: str) -> bool:
    """Whether the results' ``model`` normalises with batch statistics (False for a network
    this code does not know: a results file from elsewhere)."""
    from ..model import has_batch_statistics
    try:
        return has_batch_statistics(model)
    except (ValueError, OSError):
        return False


def simulator_check(summary: Summary) -> dict:
    """CUDA runs under the simulator (excluded from the timings): their final test accuracy
    against the sequential run with the same configuration and seed."""
    res = summary.results
    sim = res[simulated(res) & (res["status"] == "ok")]
    if sim.empty:
        return {"runs": 0, "pairs": 0}
    per = sim.sort_values("epoch").groupby("run_key").agg(
        **{k: (k, "first") for k in (*CONFIG_KEYS, *MACHINE_KEYS, "target", "seed")},
        final=("final_test_accuracy", "first"), last=("test_accuracy", "last"))
    per["final"] = per["final"].fillna(per["last"])
    per["config_id"] = _ids(per, CONFIG_KEYS + MACHINE_KEYS + ("target",))
    r = summary.runs
    out = {"runs": int(len(per)), "pairs": 0}
    if len(r):
        seq = r[r["path"] == BASELINE_PATH][["config_id", "seed", "final_accuracy"]]
        m = per.merge(seq, on=["config_id", "seed"])
        if len(m):
            d = (m["final"] - m["final_accuracy"]).abs()
            out.update(pairs=int(len(m)), max_abs_diff=float(d.max()),
                       max_abs_diff_text=fmt_pct(d.max(), 2))
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
            "cv_max_label": f"{worst['label']} ({worst['problem']}, {config_text(worst)})"}
