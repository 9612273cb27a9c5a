"""The figures of the report, drawn from a :class:`~cnn.analysis.summary.Summary`.

Every figure is one column of panels or a single panel (no empty slots in a grid), keeps its
legend inside the canvas, gives heatmaps a colour bar, uses readable log axes (powers of two
or decades, plain labels), and marks oversubscribed points (more workers than cores) with
hollow markers. A figure with nothing to show is not drawn (its function returns None).
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Iterable

import numpy as np
import pandas as pd

from .. import paths as P
from ..study.equivalence import CONTROL_LABEL
from .statistics import amdahl_speedup
from .summary import (BASELINE_PATH, Summary, at_largest_p, config_text, sort_number,
                      trace_frame, variant_sort_key)
from .text import fmt_int

TEXT_WIDTH_IN = 6.7
#: the tallest a figure may print (inches): the A4 text height (25.3 cm) less two caption lines
MAX_HEIGHT_IN = 8.6
FIGURE_KINDS = ("throughput", "baselines", "scaling", "per_image", "time_breakdown",
                "accuracy", "time_to_accuracy", "average_period", "heatmap", "scaling_model")
PARTS = ("compute", "comm", "data", "transfer", "other")
SMALL_PARTS = ("data", "transfer", "comm", "compile", "eval")


def _palette(summary: Summary) -> dict:
    import seaborn as sns
    variants = _ordered(summary.runs, "variant") if len(summary.runs) else []
    colors = sns.color_palette("colorblind", max(len(variants), 1))
    return {v: colors[i % len(colors)] for i, v in enumerate(variants)}


def _ordered(frame: pd.DataFrame, col: str) -> list:
    seen = {}
    keys = frame[["path", "strategy", "backend", "threads", col]].itertuples(index=False)
    for path, strategy, backend, threads, value in sorted(
            keys, key=lambda k: variant_sort_key(k[0], k[1], k[2], k[3])):
        seen.setdefault(value, None)
    return list(seen)


def _figure(w: float, h: float, nrows: int = 1, ncols: int = 1, **kw):
    from matplotlib.figure import Figure
    fig = Figure(figsize=(w, h), layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False, **kw)
    return fig, axes


def _per_problem(frame: pd.DataFrame, problem: str) -> pd.DataFrame:
    return frame[frame["problem"] == problem] if len(frame) else frame


def _configs(frame: pd.DataFrame) -> list[tuple[str, str]]:
    """``[(config_id, title)]`` in batch, filters, size order."""
    cfg = frame.drop_duplicates("config_id")
    cfg = cfg.assign(_b=cfg["batch_size"].map(sort_number), _f=cfg["filters"].map(sort_number),
                     _n=cfg["train_size"].map(sort_number)).sort_values(["_b", "_f", "_n"])
    full = cfg[["train_size", "dtype"]].astype(str).drop_duplicates().shape[0] > 1
    return [(r["config_id"], config_text(r, full)) for _, r in cfg.iterrows()]


def _grouped_rows(frame: pd.DataFrame, labels_of) -> list[tuple]:
    """Rows of a grouped horizontal chart: ``(y, config_id, label or None for a header,
    title)``, one block per configuration."""
    rows, y = [], 0.0
    for cid, title in _configs(frame):
        rows.append((y, cid, None, title))
        y += 1.0
        for lb in labels_of(frame[frame["config_id"] == cid]):
            rows.append((y, cid, lb, title))
            y += 1.0
        y += 0.4
    return rows


def _style_grouped(ax, rows, xlabel: str) -> None:
    ticks = [(y, lb) for y, _, lb, _ in rows if lb is not None]
    ax.set_yticks([y for y, _ in ticks], [lb for _, lb in ticks])
    for y, _, lb, title in rows:
        if lb is None:
            ax.text(0.0, y, title, transform=ax.get_yaxis_transform(), fontsize=8,
                    fontweight="bold", va="center", ha="left")
    ax.set_ylim(max(y for y, *_ in rows) + 0.7, -0.7)
    ax.set_xlabel(xlabel)
    ax.tick_params(labelsize=7.5)
    ax.grid(axis="x", lw=0.3, alpha=0.5)


def _err(v, lo, hi):
    e = np.vstack([v - lo, hi - v]).astype(float)
    return np.where(np.isfinite(e), np.maximum(e, 0), 0.0)


# ---- throughput -----------------------------------------------------------------------------------
def plot_throughput(summary: Summary, problem: str):
    """Median images/s per variant and configuration, with the order-statistic interval;
    the best one-core contender of each configuration is outlined."""
    t = _per_problem(summary.table, problem)
    if t.empty:
        return None
    pal = _palette(summary)
    labels = _ordered(t, "label")
    rows = _grouped_rows(t, lambda d: [lb for lb in labels if lb in set(d["label"])])
    fig, axes = _figure(6.4, 0.2 * len(rows) + 1.0)
    ax = axes[0][0]
    for y, cid, lb, _ in rows:
        if lb is None:
            continue
        r = t[(t["config_id"] == cid) & (t["label"] == lb)].iloc[0]
        best = r["best_label"] == lb
        ax.barh(y, r["images_per_sec_median"], color=pal[r["variant"]], height=0.75,
                edgecolor="black" if best else "none", linewidth=1.2 if best else 0,
                hatch="///" if r["oversubscribed"] else None,
                xerr=_err(np.array([r["images_per_sec_median"]]),
                          np.array([r["images_per_sec_ci_lo"]]),
                          np.array([r["images_per_sec_ci_hi"]])),
                error_kw={"lw": 0.8, "capsize": 2})
    _style_grouped(ax, rows, "training throughput (images/s)")
    return fig


# ---- speed-up against the three baselines ------------------------------------------------------------
BASELINES = (("speedup", "(a) vs sequential NumPy", "o"),
             ("speedup_best", "(b) vs best one-core contender", "D"),
             ("speedup_self", "(c) vs own one-worker run", "s"))


def plot_baselines(summary: Summary, problem: str):
    """Speed-up of every variant using more than one core against (a) sequential NumPy,
    (b) the best one-core contender of the configuration, (c) its own one-worker run."""
    t = _per_problem(summary.table, problem)
    t = t[(t["p"] > 1)]
    if t.empty:
        return None
    labels = _ordered(t, "label")
    rows = _grouped_rows(t, lambda d: [lb for lb in labels if lb in set(d["label"])])
    fig, axes = _figure(6.4, 0.24 * len(rows) + 1.3)
    ax = axes[0][0]
    colors = ("#4c72b0", "#c44e52", "#55a868")
    for k, (col, name, marker) in enumerate(BASELINES):
        ys, v, lo, hi, hollow = [], [], [], [], []
        for y, cid, lb, _ in rows:
            if lb is None:
                continue
            r = t[(t["config_id"] == cid) & (t["label"] == lb)].iloc[0]
            ys.append(y + (k - 1) * 0.22)
            v.append(r[col])
            lo.append(r[f"{col}_ci_lo"])
            hi.append(r[f"{col}_ci_hi"])
            hollow.append(bool(r["oversubscribed"]))
        v, lo, hi = (np.array(a, dtype=float) for a in (v, lo, hi))
        ax.errorbar(v, ys, xerr=_err(v, lo, hi), fmt="none", ecolor=colors[k], lw=0.8,
                    capsize=1.5)
        hollow = np.array(hollow)
        ax.scatter(v[~hollow], np.array(ys)[~hollow], marker=marker, s=16, color=colors[k],
                   label=name, zorder=3)
        if hollow.any():
            ax.scatter(v[hollow], np.array(ys)[hollow], marker=marker, s=16,
                       facecolor="white", edgecolor=colors[k], zorder=3)
    for y, cid, lb, _ in rows:
        if lb is not None:
            p = t[(t["config_id"] == cid) & (t["label"] == lb)]["p"].iat[0]
            ax.plot([p, p], [y - 0.4, y + 0.4], color="0.5", lw=0.8, ls=":")
    ax.axvline(1.0, color="0.3", lw=0.8)
    _style_grouped(ax, rows, "speed-up S (dotted tick: S = p; hollow: oversubscribed)")
    fig.legend(*ax.get_legend_handles_labels(), loc="outside lower center", ncol=3,
               fontsize=7, frameon=False)
    return fig


# ---- scaling with p ---------------------------------------------------------------------------------
def plot_scaling(summary: Summary, problem: str):
    """Self-relative speed-up against workers p, per configuration with at least two
    measured p; ideal S = p dotted; the Amdahl fit (only where >= 3 worker counts were
    measured) dashed over the measured range, never beyond it; oversubscribed points hollow
    and left out of the fit."""
    t = _per_problem(summary.table, problem)
    t = t[t["p"].notna() & t["speedup_self"].notna() & (t["path"] != BASELINE_PATH)]
    multi = t.groupby(["config_id", "variant"])["p"].transform("nunique") >= 2
    t = t[multi]
    if t.empty:
        return None
    pal = _palette(summary)
    configs = _configs(t)
    fig, axes = _figure(5.0, 2.6 * len(configs), nrows=len(configs))
    am = summary.amdahl
    for (cid, title), ax in zip(configs, axes[:, 0]):
        d = t[t["config_id"] == cid]
        pmax = float(d["p"].max())
        ps = np.linspace(1, pmax, 50)
        ax.plot(ps, ps, ls=":", color="0.5", lw=1, label="ideal S = p")
        for v in _ordered(d, "variant"):
            dv = d[d["variant"] == v].sort_values("p")
            x, y = dv["p"].to_numpy(float), dv["speedup_self"].to_numpy(float)
            over = dv["oversubscribed"].to_numpy(bool)
            ax.errorbar(x, y, yerr=_err(y, dv["speedup_self_ci_lo"].to_numpy(float),
                                        dv["speedup_self_ci_hi"].to_numpy(float)),
                        color=pal[v], lw=1, capsize=2, label=v, marker=None)
            ax.scatter(x[~over], y[~over], color=pal[v], s=18, zorder=3)
            ax.scatter(x[over], y[over], facecolor="white", edgecolor=pal[v], s=18, zorder=3)
            fit = am[(am["config_id"] == cid) & (am["variant"] == v)] if len(am) else am
            if len(fit) and np.isfinite(fit["amdahl_f_self"].iat[0]):
                pm = float(fit["p_max"].iat[0])
                q = np.linspace(1, pm, 50)
                ax.plot(q, amdahl_speedup(fit["amdahl_f_self"].iat[0], q), ls="--", lw=0.9,
                        color=pal[v])
        ax.set_xticks(sorted(set(d["p"].astype(int))))
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("workers p (hollow: more workers than cores)")
        ax.set_ylabel("S vs own one-worker run")
        ax.tick_params(labelsize=8)
        ax.legend(fontsize=7, loc="upper left", framealpha=0.9)
    return fig


# ---- per-image time against the batch a worker computes ------------------------------------------------
def plot_per_image(summary: Summary, problem: str):
    """Core-milliseconds per training image against the examples one worker computes at a
    time (the batch, its shard for ``sync`` with p workers, its micro-batch for accumulation).
    A parallel variant's point is p x its time per image. When a worker's per-image cost falls
    as its batch shrinks, a speed-up above p follows without any parallel magic."""
    t = _per_problem(summary.table, problem)
    t = t[t["p"].notna() & ((t["p"] == 1) | (t["strategy"] == "sync"))]
    if t.empty:
        return None
    pal = _palette(summary)
    filters = sorted(t["filters"].unique(), key=sort_number)
    fig, axes = _figure(5.0, 2.7 * len(filters), nrows=len(filters))
    for f, ax in zip(filters, axes[:, 0]):
        d = t[t["filters"] == f]
        xs_all = []
        for lb in _ordered(d, "label"):
            dv = d[d["label"] == lb].copy()
            shards = [s for s, a in P.ALGORITHMS.items() if a.shards]  # batch / p per worker
            m = dv["threads"].where(dv["strategy"].isin(shards), 1)
            dv["x"] = dv["batch_size"] / m
            dv["y"] = dv["time_per_image_ms"] * dv["p"].fillna(1)
            dv = dv.sort_values("x")
            xs_all += list(dv["x"])
            sync = dv["strategy"].iat[0] == "sync"
            ax.plot(dv["x"], dv["y"], marker="s" if sync else "o", ms=3.5, lw=1,
                    ls="--" if sync else "-", color=pal[dv["variant"].iat[0]], label=lb)
        ax.set_xscale("log", base=2)
        xs = sorted(set(np.round(xs_all, 6)))
        ax.set_xticks(xs, [f"{x:g}" for x in xs])
        ax.minorticks_off()
        ax.set_xlabel("examples one worker computes per step")
        ax.set_ylabel("core-ms per image")
        ax.set_title(f"{problem}, filters {fmt_int(f)}", fontsize=9)
        ax.tick_params(labelsize=8)
        ax.legend(fontsize=6.5, loc="center left", bbox_to_anchor=(1.01, 0.5), frameon=False)
    return fig


# ---- where the time goes ------------------------------------------------------------------------------------
def plot_time_breakdown(summary: Summary, problem: str):
    """Left: median seconds per epoch in compute, communication (combining gradients or
    weights, where measured), data preparation, host-device transfer and the rest. Right:
    the small parts alone on a log axis (data, transfer, communication, the run's JIT compile
    and the test-set evaluation per epoch), so they are visible at all."""
    t = _per_problem(summary.table, problem)
    if t.empty:
        return None
    import seaborn as sns
    labels = _ordered(t, "label")
    rows = _grouped_rows(t, lambda d: [lb for lb in labels if lb in set(d["label"])])
    colors = dict(zip(PARTS + ("compile", "eval"),
                      sns.color_palette("Set2", len(PARTS) + 2)))
    fig, axes = _figure(6.6, 0.2 * len(rows) + 1.4, ncols=2, sharey=True)
    left, right = axes[0]
    cols = {"compute": "compute_per_epoch", "comm": "comm_per_epoch", "data": "data_per_epoch",
            "transfer": "transfer_per_epoch", "eval": "eval_per_epoch",
            "compile": "compile_time"}
    for y, cid, lb, _ in rows:
        if lb is None:
            continue
        r = t[(t["config_id"] == cid) & (t["label"] == lb)].iloc[0]
        parts = {k: float(r[c]) if np.isfinite(r[c]) else 0.0 for k, c in cols.items()}
        parts["other"] = max(float(r["epoch_time_median"]) - parts["compute"] - parts["comm"]
                             - parts["data"] - parts["transfer"], 0.0)
        x = 0.0
        for part in PARTS:
            left.barh(y, parts[part], left=x, color=colors[part], height=0.75,
                      label=part if y == rows[1][0] else None)
            x += parts[part]
        for k, part in enumerate(SMALL_PARTS):
            val = parts[part]
            if val > 0:
                right.barh(y + (k - 2) * 0.15, val, height=0.15, color=colors[part],
                           label=part if y == rows[1][0] else None)
    _style_grouped(left, rows, "seconds per epoch")
    _style_grouped(right, rows, "seconds, log scale")
    right.set_xscale("log")
    right.tick_params(axis="y", labelleft=False)
    from matplotlib.patches import Patch  # every part in the legend, drawn or not
    fig.legend(handles=[Patch(color=colors[k], label=k) for k in (*PARTS, "compile", "eval")],
               loc="outside lower center", ncol=len(PARTS) + 2, fontsize=7, frameon=False)
    return fig


# ---- accuracy ----------------------------------------------------------------------------------------------
def plot_accuracy(summary: Summary, problem: str):
    """Final test accuracy of each run minus the sequential run with the same seed, in
    percentage points (one dot per seed, bar: median), beside the seed-to-seed spread of the
    sequential runs (grey band: their range)."""
    runs = _per_problem(summary.runs, problem)
    if not len(runs):
        return None
    runs = runs[~runs["tta"] & runs["final_accuracy"].notna()]
    seq = runs[runs["path"] == BASELINE_PATH]
    if runs.empty or seq.empty:
        return None
    pal = _palette(summary)
    labels = [lb for lb in _ordered(runs, "label") if lb != BASELINE_PATH]
    rows = _grouped_rows(runs, lambda d: [lb for lb in labels if lb in set(d["label"])])
    if not any(lb for _, _, lb, _ in rows):
        return None
    fig, axes = _figure(6.4, 0.2 * len(rows) + 1.2)
    ax = axes[0][0]
    for y, cid, lb, _ in rows:
        s = seq[seq["config_id"] == cid]
        base = dict(zip(s["seed"], s["final_accuracy"]))
        spread = 100 * (s["final_accuracy"] - s["final_accuracy"].median())
        if lb is None:
            continue
        ax.fill_betweenx([y - 0.45, y + 0.45], spread.min(), spread.max(), color="0.85",
                         lw=0)
        d = runs[(runs["config_id"] == cid) & (runs["label"] == lb)]
        diffs = [100 * (a - base[sd]) for sd, a in zip(d["seed"], d["final_accuracy"])
                 if sd in base]
        if diffs:
            n = len(diffs)
            jitter = (np.arange(n) - (n - 1) / 2) * (0.5 / max(n, 1))
            ax.scatter(diffs, y + jitter, s=10, color=pal[d["variant"].iat[0]], zorder=3)
            ax.plot([np.median(diffs)] * 2, [y - 0.4, y + 0.4], color="0.1", lw=1.2)
    ax.axvline(0, color="0.3", lw=0.8)
    _style_grouped(ax, rows, "accuracy minus sequential, same seed (percentage points)")
    return fig


# ---- time-to-accuracy ---------------------------------------------------------------------------------------
def plot_time_to_accuracy(summary: Summary, problem: str):
    """Left: validation accuracy against training seconds for every run (evaluations every k
    steps, the clock stopped while evaluating), target dashed. Right: median time-to-target
    with its interval over the runs that reached it; how many did not, within the cap, is
    written beside each bar."""
    tr = trace_frame(_per_problem(summary.runs, problem))
    tt = _per_problem(summary.tta, problem)
    if tr.empty or tt.empty:
        return None
    pal = _palette(summary)
    fig, axes = _figure(6.6, max(2.8, 0.3 * len(tt) + 1.6), ncols=2)
    left, right = axes[0]
    for (key, v), d in tr.groupby(["run_key", "variant"], sort=False):
        left.plot(d["seconds"], d["val_accuracy"], lw=0.7, alpha=0.7, color=pal[v])
    for target in sorted(tr["target"].dropna().unique()):
        left.axhline(target, ls="--", color="0.3", lw=0.8)
    left.set_xlabel("training seconds")
    left.set_ylabel("validation accuracy")
    lo = max(0.0, float(tr["val_accuracy"].quantile(0.05)) - 0.05)
    left.set_ylim(lo, min(1.0, float(tr["val_accuracy"].max()) + 0.02))
    left.tick_params(labelsize=8)
    order = _ordered(tt, "label")
    tt = tt.set_index("label").reindex(order).reset_index()
    y = np.arange(len(tt))
    v = tt["time_to_target_median"].to_numpy(float)
    right.barh(y, np.nan_to_num(v), color=[pal[x] for x in tt["variant"]],
               xerr=_err(v, tt["time_to_target_ci_lo"].to_numpy(float),
                         tt["time_to_target_ci_hi"].to_numpy(float)),
               error_kw={"lw": 0.8, "capsize": 2})
    for yi, (_, r) in zip(y, tt.iterrows()):
        right.text(np.nan_to_num(r["time_to_target_median"]), yi,
                   f"  {int(r['n_reached'])}/{int(r['n_runs'])}", va="center", fontsize=7)
    right.set_yticks(y, tt["label"])
    right.invert_yaxis()
    right.set_xlabel("median seconds to target")
    right.tick_params(labelsize=7.5)
    return fig


# ---- average's period -------------------------------------------------------------------------------------------
def plot_average_period(summary: Summary, problem: str):
    """``average`` swept over its averaging period: final test accuracy (left) and
    throughput (right) against the steps between averages ("epoch": once per epoch)."""
    t = _per_problem(summary.table, problem)
    t = t[(t["strategy"] == "average")]
    if t.empty or t["period"].nunique() < 2:
        return None
    fig, axes = _figure(6.4, 2.6, ncols=2)
    left, right = axes[0]
    for (cid, lab), d in t.groupby(["config_id", "threads"]):
        d = d.assign(_k=d["period"].map(lambda q: 1e9 if q == "epoch" else float(q)))
        d = d.sort_values("_k")
        x = np.arange(len(d))
        name = f"{config_text(d.iloc[0])}, ×{int(lab)}"
        left.errorbar(x, 100 * d["final_accuracy_median"], marker="o", ms=3, ls="none",
                      label=name)  # the periods are categories: no line between them
        right.errorbar(x, d["images_per_sec_median"],
                       yerr=_err(d["images_per_sec_median"].to_numpy(float),
                                 d["images_per_sec_ci_lo"].to_numpy(float),
                                 d["images_per_sec_ci_hi"].to_numpy(float)),
                       marker="o", ms=3, ls="none", capsize=2)
        for ax in (left, right):
            ax.set_xticks(x, list(d["period"]))
    seq = _per_problem(summary.table, problem)
    seq = seq[(seq["path"] == BASELINE_PATH) & seq["config_id"].isin(t["config_id"])]
    for acc in 100 * seq["final_accuracy_median"]:
        left.axhline(acc, ls=":", color="0.4", lw=0.8)
    left.set_xlabel("steps between averages")
    left.set_ylabel("test accuracy (%)")
    right.set_xlabel("steps between averages")
    right.set_ylabel("images/s")
    left.legend(fontsize=7, loc="lower left")
    for ax in (left, right):
        ax.tick_params(labelsize=8)
    return fig


# ---- heatmap ---------------------------------------------------------------------------------------------------
def plot_heatmap(summary: Summary, problem: str):
    """Speed-up against the best one-core contender over batch size x filters, for variants
    measured on at least a 2 x 2 grid (each at its largest p that fits the cores), with a
    colour bar."""
    t = at_largest_p(_per_problem(summary.table, problem))
    if t.empty:
        return None
    ok = [lb for lb, d in t.groupby("label")
          if d["batch_size"].nunique() >= 2 and d["filters"].nunique() >= 2]
    if not ok:
        return None
    import matplotlib
    from matplotlib.colors import TwoSlopeNorm
    # unmeasured cells: grey, not the white of S = 1 (with_extremes: set_bad in place is
    # deprecated)
    cmap = matplotlib.colormaps["RdBu"].with_extremes(bad="0.75")
    fig, axes = _figure(4.6, 2.4 * len(ok), nrows=len(ok))
    vals = t[t["label"].isin(ok)]["speedup_best"]
    norm = TwoSlopeNorm(vmin=min(0.9, float(vals.min())), vcenter=1.0,
                        vmax=max(1.1, float(vals.max())))
    for lb, ax in zip(ok, axes[:, 0]):
        d = t[t["label"] == lb].pivot_table(index="filters", columns="batch_size",
                                            values="speedup_best", aggfunc="median")
        im = ax.imshow(np.ma.masked_invalid(d.to_numpy(float)), cmap=cmap, norm=norm,
                       origin="lower", aspect="auto")
        for (i, j), val in np.ndenumerate(d.to_numpy(float)):
            ax.text(j, i, f"{val:.2f}" if np.isfinite(val) else "not measured",
                    ha="center", va="center", fontsize=8 if np.isfinite(val) else 7)
        ax.set_xticks(range(d.shape[1]), [fmt_int(x) for x in d.columns])
        ax.set_yticks(range(d.shape[0]), [fmt_int(x) for x in d.index])
        ax.set_xlabel("batch size")
        ax.set_ylabel("filters")
        ax.set_title(lb, fontsize=9)
        fig.colorbar(im, ax=ax, label="S vs best one-core")
    return fig


# ---- the scaling model -------------------------------------------------------------------------------------------
def plot_scaling_model(summary: Summary, problem: str):
    """The scaling model (:func:`cnn.analysis.scaling.scaling_model`) beside the measured
    points (hollow: more workers than cores, not checked): solid up to the largest point
    checked, and beyond it a prediction, drawn as its band with the model dashed inside, the
    Karp-Flatt reading of the same measurements dotted; shaded: beyond this machine's
    cores."""
    model = summary.extra.get("scaling")
    if model is None or model.empty:
        return None
    m = model[model["problem"] == problem]
    if m.empty:
        return None
    keys = list(m.groupby(["config_id", "variant"], sort=False).groups)[:4]
    fig, axes = _figure(5.2, 2.7 * len(keys), nrows=len(keys))
    for (cid, v), ax in zip(keys, axes[:, 0]):
        d = m[(m["config_id"] == cid) & (m["variant"] == v)].sort_values("p")
        ps = d["p"].to_numpy(float)
        ax.plot(ps, ps, ls=":", color="0.5", lw=1, label="ideal S = p")
        checked = d["rel_error"].notna()
        p_max = float(d.loc[checked, "p"].max()) if checked.any() else 1.0
        inside, beyond = d[d["p"] <= p_max], d[d["p"] >= p_max]
        ax.plot(inside["p"], inside["predicted_threads"], color="C0", lw=1.2,
                label="model (checked at the measured points)")
        band = beyond[beyond["band_low"].notna()]
        ax.fill_between(np.r_[p_max, band["p"]], np.r_[d.loc[d["p"] == p_max,
                                                              "predicted_threads"].iat[0],
                                                       band["band_low"]],
                        np.r_[d.loc[d["p"] == p_max, "predicted_threads"].iat[0],
                              band["band_high"]], color="C0", alpha=0.2, lw=0)
        ax.plot(beyond["p"], beyond["predicted_threads"], color="C0", lw=1.2, ls="--",
                label="model: prediction, band from its check")
        kf = beyond[beyond["karp_flatt_prediction"].notna()]
        if len(kf):
            ax.plot(np.r_[p_max, kf["p"]], np.r_[d.loc[d["p"] == p_max, "measured"].iat[0],
                                                 kf["karp_flatt_prediction"]],
                    color="C1", lw=1.2, ls="-.",
                    label=f"Karp-Flatt e = {d['karp_flatt_e'].iat[0]:.2f}: prediction")
        meas = d[d["measured"].notna()]
        over = meas["oversubscribed"].astype(bool)
        ax.scatter(meas.loc[~over, "p"], meas.loc[~over, "measured"], color="black", s=20,
                   zorder=3, label="measured")
        if over.any():
            ax.scatter(meas.loc[over, "p"], meas.loc[over, "measured"], facecolor="white",
                       edgecolor="black", s=20, zorder=3, label="measured, oversubscribed")
        _speedup_axes(ax, ps, d["cores"].iat[0], "workers p", "speed-up vs one worker",
                      f"{v}, {d['title'].iat[0]}", 0.5)
    return fig


def _speedup_axes(ax, ps, cores, xlabel: str, ylabel: str, title: str, ymin: float) -> None:
    """Speed-up against workers on log2 axes with plain power-of-two ticks, shaded beyond
    ``cores`` (prediction only there), and the legend inside."""
    if np.isfinite(cores):
        ax.axvspan(cores, ps.max(), color="0.93", zorder=0)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log", base=2)
    ticks = [int(x) for x in ps if x == 2 ** round(math.log2(x))]
    ax.set_xticks(ticks, [str(x) for x in ticks])
    ax.set_yticks(ticks, [str(x) for x in ticks])
    ax.minorticks_off()
    ax.set_ylim(ymin, ps.max() * 1.2)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=9)
    ax.tick_params(labelsize=8)
    ax.legend(fontsize=7, loc="upper left", framealpha=0.9)


# ---- equivalence (global) ------------------------------------------------------------------------------------------
def plot_equivalence(table: pd.DataFrame):
    """Relative weight difference ``||w - w_seq|| / ||w_seq||`` after each step, for every
    path that implements the sequential algorithm, float64 and float32, same initial weights
    and batches (log scale; float64 sits near 1e-16, float32 near 1e-7), and the one-ulp
    control (:data:`cnn.study.equivalence.CONTROL_LABEL`, dashed black)."""
    if table is None or table.empty:
        return None
    dtypes = [d for d in ("float64", "float32") if d in set(table["dtype"])]
    # one row per problem (tables from before the problem column hold one)
    problems = list(dict.fromkeys(table["problem"])) if "problem" in table else [""]
    fig, axes = _figure(6.4, 2.6 * len(problems), nrows=len(problems), ncols=len(dtypes),
                        sharey=False)
    import seaborn as sns
    labels = list(dict.fromkeys(table["label"]))
    colors = dict(zip(labels, sns.color_palette("colorblind", len(labels))))
    for row, problem in zip(axes, problems):
        rows = table[table["problem"] == problem] if problem else table
        for dt, ax in zip(dtypes, row):
            d = rows[rows["dtype"] == dt]
            for lb, g in d.groupby("label", sort=False):
                control = lb == CONTROL_LABEL  # the trajectory's own amplification
                ax.plot(g["step"], g["rel_diff"].clip(lower=1e-20), lw=1.4 if control else 1,
                        color="0.1" if control else colors[lb], ls="--" if control else "-",
                        label=lb, zorder=3 if control else 2)
            ax.set_yscale("log")
            ax.set_xlabel("optimizer step")
            ax.set_ylabel("relative weight difference")
            ax.set_title(f"{problem}, {dt}" if problem else dt, fontsize=9)
            ax.tick_params(labelsize=8)
            eps = float(np.finfo(dt).eps)
            ax.axhline(eps, ls=":", color="0.4", lw=0.8)
    axes[0][0].legend(fontsize=6.5, loc="lower right", framealpha=0.9)
    return fig


def plot_cluster_scaling(band: pd.DataFrame, measured: pd.DataFrame, cores: int,
                         config: str):
    """Predicted speed-up over one core to p = 64 on a cluster with a core per rank, one band
    per link profile (``band``: :func:`cnn.analysis.scaling.prediction_band`, the allreduce
    fitted on the emulated cluster scaled by the spread of its measured points), beside the
    speed-ups measured on the emulated cluster (``measured``:
    :func:`cnn.analysis.scaling.cluster_scaling`; hollow: more ranks than the machine's
    ``cores``, where the model's check divides the computing over the cores, not the ranks).
    None when ``band`` holds no ``config``."""
    band = band[band["config"] == config]
    if band.empty:
        return None
    measured = measured[measured["config"] == config]
    fig, axes = _figure(5.2, 3.4)
    ax = axes[0][0]
    ps = np.sort(band["p"].unique()).astype(float)
    ax.plot(ps, ps, ls=":", color="0.5", lw=1, label="ideal S = p")
    colours = dict(zip(band["profile"].unique(), [f"C{i}" for i in range(10)]))
    for profile, b in band.groupby("profile", sort=False):
        c = colours[profile]
        ax.fill_between(b["p"], b["low"], b["high"], color=c, alpha=0.18, lw=0)
        ax.plot(b["p"], b["speedup"], color=c, lw=1.2, label=f"model, {profile} (prediction)")
        m = measured[measured["profile"] == profile]
        for over, face in ((False, c), (True, "none")):
            pts = m[m["oversubscribed"] == over]
            ax.scatter(pts["p"], pts["measured_speedup"], s=22, zorder=3, edgecolors=c,
                       facecolors=face)
    _speedup_axes(ax, ps, cores, "MPI ranks p (one per host)", "speed-up vs one core",
                  f"{config}: model to p = {int(ps.max())} per link profile; dots measured", 0.25)
    return fig


def plot_roofline(record: dict | None):
    """The roofline of one core (``results/roofline.json``, :mod:`cnn.bench.roofline`): the
    measured SGEMM peak and triad bandwidth as the roof ``min(peak, bandwidth x intensity)``,
    and one point per op of each network's training step, forward filled and backward hollow,
    at its arithmetic intensity and achieved GFLOP/s; one panel per network."""
    if not record or not record.get("networks"):
        return None
    nets = list(record["networks"])
    peak, bw = float(record["sgemm_peak_gflops"]), float(record["bandwidth_gbs"])
    fig, axes = _figure(5.6, 2.9 * len(nets), nrows=len(nets))
    for net, ax in zip(nets, axes[:, 0]):
        rows = pd.DataFrame(record["networks"][net])
        rows = rows[(rows["flops"] > 0) & (rows["gflops"] > 0)]
        lo = min(0.02, float(rows["intensity"].min()) / 2) if len(rows) else 0.02
        hi = max(1000.0, float(rows["intensity"].max()) * 2) if len(rows) else 1000.0
        x = np.geomspace(lo, hi, 200)
        ax.plot(x, np.minimum(peak, bw * x), color="0.2", lw=1.2,
                label=f"roof: SGEMM {peak:.0f} GFLOP/s, triad {bw:.1f} GB/s")
        ax.axvline(peak / bw, color="0.6", lw=0.6, ls=":")
        for direction, colour, face in (("forward", "C0", "C0"), ("backward", "C3", "none")):
            d = rows[rows["direction"] == direction]
            ax.scatter(d["intensity"], d["gflops"], s=18, zorder=3, edgecolors=colour,
                       facecolors=face, label=f"{direction}: one point per op")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("arithmetic intensity (FLOP per byte of compulsory traffic)")
        ax.set_ylabel("achieved GFLOP/s (one core)")
        ax.set_title(f"{net}, batch {record.get('batch', '?')}, {record.get('backend', '')}",
                     fontsize=9)
        ax.tick_params(labelsize=8)
        ax.legend(fontsize=7, loc="lower right", framealpha=0.9)
    return fig


PLOTS = {"throughput": plot_throughput, "baselines": plot_baselines, "scaling": plot_scaling,
         "per_image": plot_per_image, "time_breakdown": plot_time_breakdown,
         "accuracy": plot_accuracy, "time_to_accuracy": plot_time_to_accuracy,
         "average_period": plot_average_period, "heatmap": plot_heatmap,
         "scaling_model": plot_scaling_model}


def _caption(kind: str, summary: Summary, problem: str) -> str:
    cov = summary.table["ci_coverage"].dropna() if len(summary.table) else pd.Series(dtype=float)
    ci = ("whiskers: distribution-free order-statistic interval of the median over repeats"
          + (f" (coverage {100 * cov.min():.0f}% at n = {int(summary.table['n_repeats'].min())})"
             if len(cov) else ""))
    text = {
        "throughput": f"{problem}: training throughput, median over repeats; {ci}. Black "
                      f"outline: the best one-core contender of the configuration; hatched: "
                      f"more workers than cores (oversubscribed).",
        "baselines": f"{problem}: speed-up of each variant using more than one core against "
                     f"(a) the sequential NumPy path, (b) the best one-core contender measured "
                     f"for that configuration (named in the table), (c) its own one-worker "
                     f"run; medians of per-seed ratios, {ci}. Strong scaling: the global "
                     f"batch is fixed.",
        "scaling": f"{problem}: strong scaling (fixed global batch): speed-up against the "
                   f"variant's own one-worker run, against workers p; dotted: S = p; "
                   + ("dashed: Amdahl fit over the measured worker counts within the cores "
                      "(at least three), never beyond them; "
                      if len(summary.amdahl) and (summary.amdahl["problem"] == problem).any()
                      else "no Amdahl fit (fewer than three worker counts within the cores); ")
                   + "hollow: more workers than cores, not fitted.",
        "per_image": f"{problem}: core-milliseconds per training image against the examples "
                     f"one worker computes per step. A sync point with p workers is p times "
                     f"its time per image at shard size batch/p; accumulation runs the same "
                     f"shards on one core. Where the per-image cost falls with the shard size, "
                     f"S > p against the whole-batch sequential run follows.",
        "time_breakdown": f"{problem}: where an epoch's time goes (median over repeats). "
                          f"Right: the small parts on a log axis, including the run's JIT "
                          f"compile (once per run) and the test-set evaluation per epoch.",
        "accuracy": f"{problem}: final test accuracy minus that of the sequential run with "
                    f"the same seed, in percentage points (dots: seeds; bar: median), against "
                    f"the sequential runs' own seed-to-seed spread (grey).",
        "time_to_accuracy": f"{problem}: time-to-accuracy on a validation split carved from "
                            f"the training set (evaluations every k steps, not timed). Left: "
                            f"every run's validation accuracy against training seconds, "
                            f"target dashed. Right: median time to target over the runs that "
                            f"reached it; reached/runs beside each bar.",
        "average_period": f"{problem}: model averaging (average) swept over its period: steps "
                          f"between averages (each step a replica trains on its own batch; "
                          f"examples per global step = workers x batch).",
        "heatmap": f"{problem}: speed-up against the best one-core contender over batch size "
                   f"and filter count (each variant at its largest p within the cores).",
        "scaling_model": f"{problem}: the scaling model's self-relative speed-up (compute of "
                         f"the one-worker run split over p, the rest not, the measured "
                         f"reduction) checked at the measured points (black; hollow: more "
                         f"workers than cores, not checked) and, beyond the largest point "
                         f"checked, a prediction: its band scales the model by the smallest "
                         f"and largest measured/predicted ratio of its check (1 included); "
                         f"dash-dotted, the Karp-Flatt reading of the same largest point "
                         f"carried by Amdahl's law. Shaded: beyond this machine's cores.",
    }
    return text[kind]


def figure_name(kind: str, problem: str) -> str:
    return f"{kind}_{problem.replace('/', '_')}.png"


def save_figure(fig, out_dir, kind: str, problem: str, caption: str, dpi: int = 150,
                name: str | None = None) -> dict:
    """Save ``fig`` as ``out_dir/<kind>_<problem or name or 'all'>.png`` and return its
    entry for the report: ``{problem, kind, file, path, caption, width}``."""
    file = figure_name(kind, problem or name or "all")
    fig.savefig(Path(out_dir) / file, dpi=dpi)
    return {"problem": problem, "kind": kind, "file": file, "path": str(Path(out_dir) / file),
            "caption": caption,
            # share of the report's text width (17 cm), so fonts keep one size; a tall
            # figure is narrowed until it and its caption fit on a page
            "width": round(min(1.0, fig.get_figwidth() / TEXT_WIDTH_IN,
                               MAX_HEIGHT_IN * fig.get_figwidth()
                               / fig.get_figheight() / TEXT_WIDTH_IN), 3)}


def make_figures(summary: Summary, figures_dir, dpi: int = 150,
                 kinds: Iterable[str] = FIGURE_KINDS, equivalence=None,
                 roofline=None) -> list[dict]:
    """Draw and save every figure (PNG) under ``figures_dir``; figures with nothing to show
    are skipped. Returns ``[{problem, kind, file, path, caption, width}]`` in report order.
    The figures of no one problem have ``problem`` "": the equivalence figure (when its
    table is given) and the roofline (``roofline``: :mod:`cnn.bench.roofline`'s record);
    :func:`cnn.analysis.pdf.build_report` adds the timeline's and the cluster's."""
    out = Path(figures_dir)
    out.mkdir(parents=True, exist_ok=True)
    made = []

    def save(fig, kind, problem, caption):
        made.append(save_figure(fig, out, kind, problem, caption, dpi))

    fig = plot_equivalence(equivalence)
    if fig is not None:
        skipped = (equivalence.attrs or {}).get("skipped", [])
        setup = (equivalence.attrs or {}).get("setup", "")
        save(fig, "equivalence", "", "Relative weight difference to the sequential path after "
             "each step, same initial weights and batches" + (f" ({setup})" if setup else "")
             + "; dotted: the dtype's machine epsilon"
             + ("; dashed black: the control, the sequential path from initial weights one "
                "unit in the last place away, zeros kept (how fast this trajectory amplifies a rounding-"
                "sized difference)." if (equivalence["label"] == CONTROL_LABEL).any() else ".")
             + (f" Not run here: {', '.join(skipped)}." if skipped else ""))
    fig = plot_roofline(roofline)
    if fig is not None:
        save(fig, "roofline", "", "The roofline of one core: the measured single-core "
             "float32 SGEMM rate and the bandwidth of a NumPy triad (the roof), and each op "
             "of a training step forward (filled) and backward (hollow) at its arithmetic "
             "intensity (FLOPs over the op's compulsory bytes) and its achieved rate (median "
             f"of {roofline.get('repeats', '?')} calls, BLAS on one thread). Dotted: the "
             "ridge, where the two limits meet.")
    for problem in summary.problems:
        for kind in kinds:
            fig = PLOTS[kind](summary, problem)
            if fig is not None:
                save(fig, kind, problem, _caption(kind, summary, problem))
    return made


def show_figures(figures: list[dict], kind: str | None = None):
    """Display saved figures inline in a notebook (optionally only one ``kind``)."""
    from IPython.display import Image, Markdown, display
    for f in figures:
        if kind is None or f["kind"] == kind:
            display(Markdown(f"**{f['caption']}**"), Image(filename=f["path"]))
