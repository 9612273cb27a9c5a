"""A scaling model: how far the synchronous algorithm would scale on a larger machine,
predicted from costs measured on this one, and checked against the points measured here.

For a configuration (batch ``B``, ``N`` parameters) and a synchronous data-parallel variant
(``sync`` over threads, processes or ranks), one step on ``p`` workers takes

    T(p) = C_1 / p + D + R(p)   (threads)      or      T(p) = C_1 / p + D + A(p)   (MPI ranks)

where ``C_1`` is the measured compute time of one step of the variant's own one-worker run
(the ``compute_time`` column: forward, backward and update; it splits over the workers), ``D``
the rest of its step (data preparation, transfers, the loop: not split), ``R(p)`` the cost of combining the ``p`` shard gradients, measured at the
worker counts run here (the strategy's ``comm_time`` per step where it reports it, else the
``reduce_time`` micro-benchmark divided by ``p``: each worker sums its ``1/p`` slice of the
``p`` gradients) and held at the value measured at the largest measured ``p`` beyond it, and
``A(p)`` the allreduce of ``N`` parameters of ``b`` bytes over ``p`` ranks: the MPI
benchmark fits ``t(n) = alpha + beta n`` at its number of ranks ``r`` (``python -m cnn bench
mpi --json results/mpi_allreduce.json``: ``alpha``, ``beta``, ``ranks``), and the model scales
the latency with a tree's rounds and the volume with a ring's,
``A(p) = alpha ceil(log2 p) / ceil(log2 r) + beta N b ((p - 1) / p) / ((r - 1) / r)``. The
predicted speed-up is ``S(p) = T_1 / T(p)``, drawn to ``p = 64`` beside the measured
self-relative speed-ups. The model ignores memory-bandwidth contention and the loss of BLAS
efficiency at small shards, so it is an upper bound where those matter; the distance between
the model and the measured points says how much they do.
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd

from .. import paths as P
from ..files import read_structured
from .summary import BASELINE_PATH, Summary, config_text

P_GRID = (1, 2, 4, 8, 16, 32, 64)
COLUMNS = ["problem", "config_id", "variant", "title", "p", "cores", "measured",
           "predicted_threads", "predicted_mpi", "t1_step", "compute_step", "reduce_step",
           "rel_error"]


def read_allreduce(path) -> dict | None:
    """``{"alpha": seconds, "beta": seconds per byte, ...}`` from the MPI benchmark's JSON file,
    or None when there is none (the MPI curve is then not drawn)."""
    if path is None:
        return None
    path = Path(path)
    if not path.is_file():
        return None
    data = read_structured(path, "allreduce fit")  # errors name the file and the line
    try:
        alpha, beta = float(data["alpha"]), float(data["beta"])
    except (ValueError, KeyError, TypeError) as err:
        raise ValueError(f"{path}: not an allreduce fit with 'alpha' and 'beta' ({err})") \
            from None
    if not (math.isfinite(alpha) and math.isfinite(beta) and alpha >= 0 and beta >= 0):
        raise ValueError(f"{path}: alpha and beta must be finite and >= 0")
    return {**data, "alpha": alpha, "beta": beta, "source": str(path)}


def allreduce_seconds(p, n_bytes: float, alpha: float, beta: float, ranks: int = 2):
    """Seconds of one allreduce of ``n_bytes`` over ``p`` ranks, from the benchmark's fit
    ``t(n) = alpha + beta n`` at ``ranks`` ranks: the latency grows with the rounds of a tree
    (``ceil(log2 p)``), the volume each rank moves with a ring's ``2 (p - 1) / p``; both scaled
    so that the model equals the fit at ``ranks``."""
    p = np.asarray(p, dtype=float)
    rounds = np.ceil(np.log2(np.maximum(p, 1))) / max(math.ceil(math.log2(max(ranks, 2))), 1)
    volume = ((p - 1) / p) / ((ranks - 1) / ranks)
    return np.where(p > 1, rounds * alpha + volume * n_bytes * beta, 0.0)


def scaling_model(summary: Summary, allreduce: dict | None = None) -> pd.DataFrame:
    """The model's predictions and the measured points, one row per (configuration,
    variant, p): see the module doc."""
    t = summary.table
    if not len(t):
        return pd.DataFrame(columns=COLUMNS)
    runs = summary.runs
    rows = []
    cand = t[(t["path"] != BASELINE_PATH) & (t["strategy"] == "sync") & t["p"].notna()]
    for (cid, variant), g in cand.groupby(["config_id", "variant"], sort=False):
        entry = P.PATHS.get(g["path"].iat[0])
        if entry is None or entry.cores != "workers":
            continue
        one = g[g["p"] == 1]
        if one.empty or not (g["p"] > 1).any():
            continue
        r0 = one.iloc[0]
        steps = math.ceil(int(r0["train_size"]) / int(r0["batch_size"]))
        t1 = float(r0["epoch_time_median"]) / steps
        c1 = float(r0["compute_per_epoch"]) / steps if np.isfinite(r0["compute_per_epoch"]) \
            else t1
        c1 = min(c1, t1)
        rest = t1 - c1
        measured_r = {}
        for _, r in g[(g["p"] > 1) & ~g["oversubscribed"].astype(bool)].iterrows():
            comm = float(r["comm_per_epoch"]) / steps if np.isfinite(r["comm_per_epoch"]) else 0
            red = float(r["reduce_time"]) / r["p"] if np.isfinite(r["reduce_time"]) else 0
            measured_r[float(r["p"])] = comm if comm > 0 else red
        if not measured_r:
            continue
        pr = runs[(runs["config_id"] == cid)]
        n_params = float(pr["num_params"].dropna().iloc[0]) if pr["num_params"].notna().any() \
            else np.nan
        bytes_per = np.dtype(str(r0["dtype"])).itemsize
        cores = float(pr["cores"].iloc[0]) if len(pr) and pd.notna(pr["cores"].iloc[0]) \
            else np.nan
        ps = sorted(set(P_GRID) | {float(x) for x in g["p"]})
        pmax_meas = max(measured_r)
        for p in ps:
            r = measured_r.get(p, measured_r[pmax_meas] if p > pmax_meas else
                               measured_r[min(measured_r, key=lambda q: abs(q - p))])
            pred = 1.0 if p == 1 else t1 / (c1 / p + rest + r)
            mpi = np.nan
            if allreduce and np.isfinite(n_params):
                a = float(allreduce_seconds(p, n_params * bytes_per, allreduce["alpha"],
                                            allreduce["beta"], int(allreduce.get("ranks", 2))))
                mpi = 1.0 if p == 1 else t1 / (c1 / p + rest + a)
            meas = g[g["p"] == p]["speedup_self"]
            m = float(meas.iat[0]) if len(meas) else np.nan
            rows.append({"problem": r0["problem"], "config_id": cid, "variant": variant,
                         "title": config_text(r0), "p": float(p), "cores": cores,
                         "measured": m, "predicted_threads": pred, "predicted_mpi": mpi,
                         "t1_step": t1, "compute_step": c1, "reduce_step": r,
                         # checked only within the cores: the model splits compute over p
                         # workers, which p > cores cannot do (those points are marked †)
                         "rel_error": pred / m - 1 if np.isfinite(m) and p > 1 and not
                         (np.isfinite(cores) and p > cores) else np.nan})
    return pd.DataFrame(rows, columns=COLUMNS)
