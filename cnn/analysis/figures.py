"""The figures of the report, drawn from a :class:`~cnn.analysis.summary.Summary`."""
from __future__ import annotations

import math
from pathlib import Path
from typing import Iterable

import numpy as np
import pandas as pd

from .statistics import amdahl_speedup
from .summary import (BASELINE_PATH, CONFIG_KEYS, TIME_PARTS, Summary, _at_max_p, _config_text,
                      _int, _num, _sort_key)


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
