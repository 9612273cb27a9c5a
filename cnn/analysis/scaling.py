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
           "oversubscribed", "predicted_threads", "predicted_mpi", "t1_step", "compute_step",
           "reduce_step", "rel_error", "band_low", "band_high", "karp_flatt_e",
           "karp_flatt_prediction"]


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
    variant, p): see the module doc. Beyond the largest measured ``p`` within the cores each
    prediction has a band (``band_low`` .. ``band_high``): the threads model scaled by the
    smallest and largest ``measured / predicted`` of the points it was checked at (1
    included), the spread its own check leaves; and beside it the Karp-Flatt reading of the
    same largest measured point: its serial fraction ``e`` (``karp_flatt_e``) carried to ``p``
    by Amdahl's law (``karp_flatt_prediction``)."""
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
                         "measured": m, "oversubscribed": bool(np.isfinite(cores)
                                                               and p > cores), "predicted_threads": pred, "predicted_mpi": mpi,
                         "t1_step": t1, "compute_step": c1, "reduce_step": r,
                         # checked only within the cores: the model splits compute over p
                         # workers, which p > cores cannot do (those points are marked †)
                         "rel_error": pred / m - 1 if np.isfinite(m) and p > 1 and not
                         (np.isfinite(cores) and p > cores) else np.nan})
    return _bands(pd.DataFrame(rows, columns=COLUMNS))


def _bands(model: pd.DataFrame) -> pd.DataFrame:
    """The bands and the Karp-Flatt reading of :func:`scaling_model` (see there)."""
    from .statistics import amdahl_speedup, karp_flatt
    out = []
    for _, g in model.groupby(["config_id", "variant"], sort=False):
        g = g.copy()
        checked = g[g["rel_error"].notna()]
        if len(checked):
            ratios = np.append(1.0 / (1.0 + checked["rel_error"].to_numpy(float)), 1.0)
            p_max = float(checked["p"].max())
            beyond = g["p"] > p_max
            g.loc[beyond, "band_low"] = g.loc[beyond, "predicted_threads"] * ratios.min()
            g.loc[beyond, "band_high"] = g.loc[beyond, "predicted_threads"] * ratios.max()
            last = checked[checked["p"] == p_max].iloc[0]
            e = float(karp_flatt(last["measured"], p_max))
            g["karp_flatt_e"] = e
            g.loc[beyond, "karp_flatt_prediction"] = amdahl_speedup(
                min(max(e, 0.0), 1.0), g.loc[beyond, "p"].to_numpy(float))
        out.append(g)
    return pd.concat(out, ignore_index=True) if out else model


# ---- the emulated cluster ------------------------------------------------------------------------
# ``python -m cnn bench mpi --cluster PROFILES --ranks 2,4,8`` (cnn.bench.mpi.cluster_suite)
# writes, per link profile, the allreduce sweep and the training steps at each rank count, and
# each preset's one-core step; the functions below turn it into the model's communication
# term, check the model against every measured point and draw its prediction to p = 64.
CLUSTER_COLUMNS = ["profile", "config", "p", "cores", "oversubscribed", "measured_step",
                   "predicted_step", "rel_error", "measured_speedup", "predicted_speedup"]
ALLREDUCE_COLUMNS = ["profile", "p", "bytes", "algorithm", "measured", "fit", "rel_error",
                     "sent_per_byte", "expected_sent_per_byte", "link_share", "oversubscribed"]
BAND_COLUMNS = ["profile", "config", "p", "low", "speedup", "high"]


def read_cluster(path) -> dict | None:
    """The record of ``python -m cnn bench mpi --cluster`` (``results/mpi_cluster.json``), or
    None when there is none; a ``ValueError`` naming the file when it is not one."""
    if path is None or not Path(path).is_file():
        return None
    data = read_structured(Path(path), "emulated cluster figures")
    if not isinstance(data, dict) or not isinstance(data.get("profiles"), dict):
        raise ValueError(f"{path}: not the figures of `python -m cnn bench mpi --cluster` "
                         f"(no 'profiles')")
    return data


def machine_cores(record: dict) -> int:
    """The cores of the machine the cluster was emulated on (its hosts share them)."""
    return int(record.get("machine", {}).get("cores") or 1)


def cluster_fit(record: dict, profile: str):
    """The model's allreduce cost for ``profile``: :func:`~cnn.analysis.collectives.
    fit_allreduce` over the measured points whose ranks had a core each (``p <= cores``),
    the costs a cluster with a core per rank would see; every point when none is."""
    from .collectives import fit_allreduce
    cores = machine_cores(record)
    runs = record["profiles"][profile]["runs"]
    points = [(row["bytes"], int(p), row["seconds"]) for p, run in runs.items()
              if "allreduce" in run for row in run["allreduce"]]
    if not points:
        raise ValueError(f"profile {profile!r} has no allreduce figures")
    own = [pt for pt in points if pt[1] <= cores]
    return fit_allreduce(*zip(*(own if len(own) >= 2 else points)))


def allreduce_table(record: dict) -> pd.DataFrame:
    """Every measured allreduce against its profile's :func:`cluster_fit`: the algorithm
    MPICH picks, the relative error, the bytes each rank's link sent per message byte (and
    what that algorithm sends), the share of the time the link's own rate accounts for
    (``sent * 8 / rate / measured``: near 1 where the link dominates, near 0 where latency and
    computing do), and whether the ranks outnumbered the cores."""
    from .collectives import cost_terms, mpich_algorithm, wire_seconds_per_byte
    cores = machine_cores(record)
    rows = []
    for profile, data in record["profiles"].items():
        fit = cluster_fit(record, profile)
        per_byte = wire_seconds_per_byte(data.get("link", {}).get("rate_bit_per_s"))
        for p, run in data["runs"].items():
            for row in run.get("allreduce", []):
                n, p_ = row["bytes"], int(p)
                algorithm = mpich_algorithm(n, p_)
                expected = float(cost_terms(algorithm, n, p_)[1]) / n
                sent = row.get("sent_per_call")
                predicted = float(fit.seconds(n, p_))
                rows.append({"profile": profile, "p": p_, "bytes": n, "algorithm": algorithm,
                             "measured": row["seconds"], "fit": predicted,
                             "rel_error": predicted / row["seconds"] - 1,
                             "sent_per_byte": np.nan if sent is None else sent / n,
                             "expected_sent_per_byte": expected,
                             "link_share": expected * n * per_byte / row["seconds"],
                             "oversubscribed": p_ > cores})
    return pd.DataFrame(rows, columns=ALLREDUCE_COLUMNS)


def _step_parts(record: dict, config: str) -> tuple[float, float, float, int]:
    """``(T1, C1, D, gradient bytes)`` of ``config`` (``preset/batch``): the one-core step,
    its compute part (split over the ranks) and the rest (not split)."""
    one = record.get("one_core", {}).get(config)
    if one is None:
        raise ValueError(f"no one-core step for {config!r} in the cluster figures")
    t1, c1 = float(one["step"]), min(float(one["compute"]), float(one["step"]))
    return t1, c1, t1 - c1, int(one["parameters"]) * int(one["itemsize"])


def predicted_step(p, c1: float, rest: float, n_bytes: float, fit, cores=None, ratio=1.0):
    """The model's step on ``p`` ranks: ``C1 / min(p, cores) + D + ratio * A(n_bytes, p)``
    (``cores`` None: a core per rank; ``ratio`` scales the allreduce, for the band)."""
    p = np.asarray(p, dtype=float)
    workers = p if cores is None else np.minimum(p, cores)
    comm = np.where(p > 1, fit.seconds(n_bytes, np.maximum(p, 1)), 0.0)
    return c1 / workers + rest + ratio * comm


def cluster_scaling(record: dict, variant: str = "blocking") -> pd.DataFrame:
    """The model against every training point measured on the emulated cluster: per profile,
    configuration and rank count, the measured step of ``variant`` and the model's, with the
    machine's cores shared by the ranks (ranks beyond them time-share the computing: the
    model's compute term is ``C1 / min(p, cores)``; the allreduce comes from the profile's
    :func:`cluster_fit`), the relative error and both speed-ups over the one-core step."""
    cores = machine_cores(record)
    rows = []
    for profile, data in record["profiles"].items():
        fit = cluster_fit(record, profile)
        for p, run in data["runs"].items():
            for config, table in run.get("training", {}).items():
                if variant not in table or config not in record.get("one_core", {}):
                    continue
                t1, c1, rest, n_bytes = _step_parts(record, config)
                measured = float(table[variant]["step"])
                predicted = float(predicted_step(int(p), c1, rest, n_bytes, fit, cores))
                rows.append({"profile": profile, "config": config, "p": int(p), "cores": cores,
                             "oversubscribed": int(p) > cores, "measured_step": measured,
                             "predicted_step": predicted,
                             "rel_error": predicted / measured - 1,
                             "measured_speedup": t1 / measured,
                             "predicted_speedup": t1 / predicted})
    return pd.DataFrame(rows, columns=CLUSTER_COLUMNS)


def prediction_band(record: dict, config: str, ps=P_GRID) -> pd.DataFrame:
    """The model's speed-up over the one-core step at each ``p`` of ``ps`` on a cluster with a
    core per rank, per link profile: ``speedup`` with the profile's fitted allreduce, and a
    band from ``low`` to ``high`` with the allreduce scaled by the smallest and largest
    ``measured / fit`` of the fit's points (:attr:`~cnn.analysis.collectives.AllreduceFit.
    ratio_range`): the spread the measurements themselves leave around the fit."""
    t1, c1, rest, n_bytes = _step_parts(record, config)
    rows = []
    for profile in record["profiles"]:
        fit = cluster_fit(record, profile)
        low_ratio, high_ratio = fit.ratio_range
        for p in ps:
            speed = {name: t1 / float(predicted_step(p, c1, rest, n_bytes, fit, None, ratio))
                     for name, ratio in (("high", low_ratio), ("speedup", 1.0),
                                         ("low", high_ratio))}
            rows.append({"profile": profile, "config": config, "p": float(p), **speed})
    return pd.DataFrame(rows, columns=BAND_COLUMNS)


def cluster_report(record: dict) -> list[str]:
    """The cluster figures in words: per link profile the model's allreduce fit and its error
    at every rank count (oversubscribed ones marked), the bytes per message byte against
    MPICH's algorithm, the largest share of a call the link accounts for; the model against
    every measured training step; and the predicted speed-up band at p = 64."""
    from .collectives import fit_allreduce
    cores = machine_cores(record)
    table = allreduce_table(record)
    lines = [f"{cores} cores shared by every emulated host; ranks beyond them are "
             f"oversubscribed (marked *)"]
    for profile, g in table.groupby("profile", sort=False):
        fit = cluster_fit(record, profile)
        rate = record["profiles"][profile].get("link", {}).get("rate_bit_per_s")
        lines.append(f"{profile} (link {'unshaped' if not rate else f'{rate / 1e9:g} Gbit/s'}): "
                     f"t = alpha rounds + beta sent, alpha {fit.alpha * 1e6:.1f} us, beta "
                     f"{fit.beta:.3e} s/byte ({8 / fit.beta / 1e9 if fit.beta else math.inf:.2f}"
                     f" Gbit/s), fitted at p <= {cores}")
        for p, h in g.groupby("p"):
            own = fit_allreduce(h["bytes"], h["p"], h["measured"])
            err = h["rel_error"].abs()
            lines.append(f"  p = {p}{'*' if p > cores else ' '}: model error worst {err.max():.0%}"
                         f", median {err.median():.0%}; sent/byte {h['sent_per_byte'].median():.2f}"
                         f" ({h['algorithm'].iat[-1]}: {h['expected_sent_per_byte'].iat[-1]:.2f});"
                         f" link share at most {h['link_share'].max():.0%}; this p alone: alpha "
                         f"{own.alpha * 1e6:.0f} us, beta {own.beta:.2e} s/byte")
    steps = cluster_scaling(record)
    if len(steps):
        lines.append("training steps, blocking: measured vs model (C1 / min(p, cores) + D + A)")
        for _, r in steps.iterrows():
            lines.append(f"  {r['profile']:<9} {r['config']:<20} p = {r['p']}"
                         f"{'*' if r['oversubscribed'] else ' '} measured "
                         f"{r['measured_step'] * 1e3:6.1f} ms, model {r['predicted_step'] * 1e3:6.1f}"
                         f" ms ({r['rel_error']:+.0%}); speed-up {r['measured_speedup']:.2f} vs "
                         f"{r['predicted_speedup']:.2f}")
    for config in record.get("one_core", {}):
        band = prediction_band(record, config)
        for _, r in band[band["p"] == max(P_GRID)].iterrows():
            lines.append(f"predicted at p = {max(P_GRID)}, {config}, {r['profile']}: speed-up "
                         f"{r['speedup']:.1f} (band {r['low']:.1f} .. {r['high']:.1f})")
    return lines


def main(argv=None) -> int:
    """``python -m cnn.analysis.scaling [FIGURES.json] [--figures DIR]``: print
    :func:`cluster_report` and draw :func:`~cnn.analysis.figures.plot_cluster_scaling` per
    configuration into ``DIR``."""
    import argparse
    p = argparse.ArgumentParser(prog="python -m cnn.analysis.scaling",
                                description="the scaling model on the emulated cluster's figures")
    p.add_argument("path", nargs="?", default="results/mpi_cluster.json")
    p.add_argument("--figures", default=None, help="folder for the figures (PNG)")
    a = p.parse_args(argv)
    record = read_cluster(a.path)
    if record is None:
        p.error(f"no figures at {a.path}: `python -m cnn bench mpi --cluster 1gbe,10gbe "
                f"--ranks 2,4,8` writes them")
    print("\n".join(cluster_report(record)))
    if a.figures:
        import matplotlib
        matplotlib.use("Agg")
        from .figures import plot_cluster_scaling
        Path(a.figures).mkdir(parents=True, exist_ok=True)
        measured, cores = cluster_scaling(record), machine_cores(record)
        for config in record.get("one_core", {}):
            fig = plot_cluster_scaling(prediction_band(record, config), measured, cores, config)
            if fig is not None:
                out = Path(a.figures) / f"cluster_scaling_{config.replace('/', '_')}.png"
                fig.savefig(out, dpi=150)
                print(f"figure written to {out}")
    return 0


if __name__ == "__main__":
    import sys
    sys.exit(main())
