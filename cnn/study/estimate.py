"""Time estimates and the plan printed by ``study --dry-run``."""
from __future__ import annotations

import json
import math

import numpy as np

from .. import paths as P
from ..backends.registry import backend_info
from ..results import done_keys, load_results
from .grid import EVALS_PER_EPOCH, expand_grid, unavailable
from .profiles import FULL_NOTES, THIRD_NOTES
from .run import Run

#: a guess of the sequential path's images/s (numpy, 1 thread, batch 32), by model and
#: first-layer filters, where no measured result matches a run: only for ``--dry-run``
#: estimates, which calibrate on measured results instead when given them
REFERENCE_IPS = {"mnist_small": {4: 33000, 8: 21000, 16: 9000, 32: 4300},
                 "cifar_tutorial": {16: 1650, 32: 720, 64: 590},
                 "cifar_resnet20": {16: 150}}
#: a guess of how many times faster evaluation (a forward pass) runs than training, likewise
EVAL_SPEED_GUESS = 2.5
#: seconds per run outside the epochs: the interpreter's start; a path's own imports and
#: contexts are its registry entry's ``overhead``, a backend's cold compile its record's
#: ``cold_compile``, its speed before it is measured the entry's ``speed_guess``
START_OVERHEAD = 2.0
#: seconds per run loading a real data set
DATASET_OVERHEAD = {"mnist": 2.0, "cifar10": 3.0}
#: time-to-accuracy runs stop at their target: the share of the epoch cap guessed for them
#: where no run of their configuration was measured (a measured one gives its epochs to the
#: target, and a run that missed it the whole cap)
TTA_SHARE_OF_CAP = 0.5
#: a profile's notes, printed with its plan
PROFILE_NOTES = {"full": FULL_NOTES, "third": THIRD_NOTES}
#: seconds to make an emulated cluster (namespaces, links, shaping), once per link profile
CLUSTER_UP_SECONDS = 3.0
#: a guess of the seconds per training image of the augmentation (padding, crop, flip) where
#: it is on the critical path: the Keras and PyTorch paths, which make each epoch's batches
#: between steps (fit's paths do it in their prefetching thread, hidden behind the steps)
AUGMENT_SECONDS_PER_IMAGE = 2e-5


def _reference_ips(model: str, filters: int) -> float:
    table = REFERENCE_IPS.get(model, {8: 3000})
    keys = sorted(table)
    if filters in table:
        return float(table[filters])
    lo = max([k for k in keys if k < filters], default=keys[0])
    hi = min([k for k in keys if k > filters], default=keys[-1])
    if lo == hi:
        return table[lo] * (lo / filters) ** 0.8
    w = (math.log(filters) - math.log(lo)) / (math.log(hi) - math.log(lo))
    return math.exp((1 - w) * math.log(table[lo]) + w * math.log(table[hi]))


def estimate_seconds(runs: list[Run], calibration=None) -> list[float]:
    """Rough wall time of each run (the first run of each JIT backend also carries the study's
    one-off cold compile). With ``calibration`` (a results DataFrame), a run whose
    configuration (model, path, strategy, backend, threads, batch, filters, augmentation) was
    measured takes its median images/s, eval speed and overhead; other runs use the reference
    throughput of their model times the speed-up measured for their path in the calibration
    data (else a guess), plus a fixed overhead, and, where the augmentation is on the critical
    path, :data:`AUGMENT_SECONDS_PER_IMAGE`."""
    cols = ["model", "path", "strategy", "backend", "threads", "batch_size", "filters",
            "augment", "engine", "link"]
    measured, speedups, overheads, cold_compiles, tta_measured = {}, {}, {}, {}, {}
    if calibration is not None and len(calibration):
        # results from before an axis: no augmentation, the default engine, one host; a
        # warm-up epoch's time is not the throughput of the measured ones
        calibration = calibration.assign(**{c: "" for c in ("augment", "engine", "link")
                                            if c not in calibration})
        if "warmup" in calibration:
            warm = calibration["warmup"].fillna(False).astype(bool)
            calibration = calibration.assign(
                time=calibration["time"].where(~warm),
                images_per_sec=calibration["images_per_sec"].where(~warm),
                warmup_time=calibration["time"].where(warm))
        ok = calibration[calibration["status"] == "ok"].fillna(
            {"augment": "", "engine": "", "link": ""})
        # runs of a path with engines from before the axis ran its default one
        ok = ok.assign(engine=[e or (P.PATHS[p].resolve_engine(None) if p in P.PATHS else "")
                               for p, e in zip(ok["path"], ok["engine"])])
        if len(ok):
            # the configuration by .first(): a named aggregation cannot be called "engine"
            # (agg's own keyword)
            ok = ok.assign(**{c: np.nan for c in ("target", "examples_to_target",
                                                  "step_eval_time") if c not in ok})
            ok = ok.assign(images=ok["images_per_sec"] * ok["time"])
            grouped = ok.groupby("run_key")
            per_run = grouped[cols + ["dataset", "train_size", "test_size", "run_time",
                                      "compile_time", "target", "examples_to_target",
                                      "eval_trace"]].first().join(grouped.agg(
                images=("images", "sum"), train=("time", "sum"),
                timed=("time", "count"), evals=("eval_time", "sum"),
                epochs=("epoch", "count"), tta_evals=("step_eval_time", "sum"),
                **({"warm": ("warmup_time", "sum")} if "warmup_time" in ok else {})))
            per_run["eval_ips"] = per_run["test_size"] * per_run["epochs"] / per_run["evals"]
            # a time-to-accuracy run's validation passes are its own cost, not start-up
            per_run["overhead"] = (per_run["run_time"] - per_run["train"] - per_run["evals"]
                                   - per_run["tta_evals"] - per_run.get("warm", 0.0))
            tta = per_run[per_run["target"].notna()]
            for key, g in tta.groupby(cols + ["target"]):
                # epochs trained: to the target where reached, else all of them (the cap);
                # seconds per validation pass: the callback's time over its evaluations
                reached = g["examples_to_target"] / g["train_size"]
                passes = [max(1, len(json.loads(t))) if isinstance(t, str) else 1
                          for t in g["eval_trace"]]
                tta_measured[key] = (list(reached.where(reached.notna(), math.inf)),
                                     float((g["tta_evals"] / passes).median()))
            per_run["warm_extra"] = (per_run.get("warm", 0.0) * per_run["timed"]
                                     / per_run["train"] - 1.0).clip(lower=0.0).fillna(0.0)
            # a configuration's images/s over all its runs' images, so that the short last
            # epoch of a run stopped at its target weighs what it trained
            per_run["ips"] = per_run["images"] / per_run["train"]
            for key, g in per_run.groupby(cols):
                measured[key] = (g["images"].sum() / g["train"].sum(), g["eval_ips"].median())
            if "cold_compile_time" in ok:  # the study's one-off compile per backend and dtype
                for key, g in ok.groupby(["backend", "dtype"])["cold_compile_time"]:
                    if g.notna().any():
                        cold_compiles[key] = float(g.median())
            seq = per_run[per_run["path"] == P.BASELINE].groupby(
                ["model", "batch_size", "filters"])["ips"].median()
            for key, g in per_run.groupby(["path", "strategy", "backend", "threads", "engine",
                                           "link"]):
                ratios = [r.ips / seq[(r.model, r.batch_size, r.filters)]
                          for r in g.itertuples() if (r.model, r.batch_size, r.filters) in seq]
                if ratios:
                    speedups[key] = sorted(ratios)[len(ratios) // 2]
            # start-up: imports, JIT loads, a compiled graph's build: per model, path and
            # engine where measured, else per path
            for key, g in per_run.groupby(["model", "path", "engine"]):
                overheads[key] = (float(g["overhead"].median()),
                                  float(g["warm_extra"].median()))
            for key, g in per_run.groupby("path"):
                overheads.setdefault(key, (float(g["overhead"].median()),
                                           float(g["warm_extra"].median())))
    out, compiled, clusters = [], set(), set()
    for r in runs:
        jit = r.jit_key()
        cold = 0.0
        if jit is not None and jit not in compiled:
            compiled.add(jit)
            cold = cold_compiles.get(jit, backend_info(r.backend).cold_compile)
        if r.link and r.link not in clusters:
            clusters.add(r.link)
            cold += CLUSTER_UP_SECONDS
        key = tuple(r[c] for c in cols)
        if key in measured:
            ips, eval_ips = measured[key]
        else:
            s = speedups.get((r.path, r.strategy, r.backend, r.threads, r.engine, r.link),
                             speedups.get((r.path, r.strategy, r.backend, r.threads, "", ""),
                                          r.entry.speed_guess))
            ips = _reference_ips(r.model, r.filters) * s
            eval_ips = EVAL_SPEED_GUESS * ips
        overhead, warm_extra = overheads.get((r.model, r.path, r.engine),
                                             overheads.get(r.path, (None, 0.0)))
        if overhead is None:  # a measured one includes loading the data
            overhead = (START_OVERHEAD + r.entry.overhead
                        + DATASET_OVERHEAD.get(r.dataset, 0.0))
        # a warm-up epoch: an epoch, and what it costs beyond one where that was measured
        epochs = r.epochs + r.warmup_epochs * (1.0 + warm_extra)
        extra = 0.0
        if r.target is not None:
            # training stops at the target: the measured epochs to it (each seed's, capped
            # by this run's cap; a seed that missed it trains the whole cap) or a guessed share
            # of the cap, plus the validation passes (every eval_every steps)
            to_target, per_eval = tta_measured.get(key + (r.target,), (None, None))
            if to_target:
                epochs = float(np.median([min(float(r.epochs), e) for e in to_target]))
            else:
                epochs = max(1.0, TTA_SHARE_OF_CAP * r.epochs)
            workers = r.threads if P.ALGORITHMS[r.strategy].batch_per_worker else 1
            steps = math.ceil(r.train_size / (r.batch_size * workers))
            passes = epochs * (steps / r.eval_every if r.eval_every else EVALS_PER_EPOCH)
            extra = passes * (per_eval if per_eval is not None else r.val_size / eval_ips)
        if r.augment and r.entry.trainer != "fit" and key not in measured:
            extra += epochs * r.train_size * AUGMENT_SECONDS_PER_IMAGE
        out.append(cold + overhead + extra + epochs * (r.train_size / ips + r.test_size / eval_ips))
    return out


def describe_plan(grid_or_profile="quick", calibration=None, gpu: bool | None = None,
                  out=None) -> str:
    """A text plan: run counts per dataset/path, runs skipped for want of a GPU, the
    oversubscribed points, and a time estimate."""
    runs = expand_grid(grid_or_profile, gpu=gpu)
    everything = expand_grid(grid_or_profile, gpu=gpu, include_unavailable=True)
    est = estimate_seconds(runs, calibration)
    configs = {tuple(v for k, v in r.items() if k not in ("repeat", "seed", "run_key"))
               for r in runs}
    lines = [f"{len(runs)} runs ({len(configs)} configurations x repeats)"]
    groups: dict[tuple, list] = {}
    for r, s in zip(runs, est):
        groups.setdefault((r.dataset, r.model, r.train_size, r.variant), []).append(s)
    for (ds, model, n, v), secs in groups.items():
        lines.append(f"  {ds:<8} {model:<15} n={n:<6} {v:<24} {len(secs):>3} runs  "
                     f"~{sum(secs) / 60:6.1f} min")
    over = sorted({(r.variant, r.threads) for r in runs if r.entry.oversubscribed(r.threads)})
    if over:
        lines.append("  oversubscribed on this machine (more workers than cores): "
                     + ", ".join(f"{v} x{t}" for v, t in over))
    if len(everything) > len(runs):
        why = sorted({f"{r.path} ({unavailable(r.entry, gpu, r.cuda_simulator)})"
                      for r in everything if unavailable(r.entry, gpu, r.cuda_simulator)})
        lines.append(f"  skipped: {len(everything) - len(runs)} run(s) that cannot run on this "
                     f"machine, nothing will be recorded for them: {', '.join(why)}")
    if isinstance(grid_or_profile, str) and grid_or_profile in PROFILE_NOTES:
        lines.append("  " + PROFILE_NOTES[grid_or_profile])
    links = sorted({r.link for r in runs if r.link})
    if links:
        from ..cluster import unavailable as cluster_unavailable
        reason = cluster_unavailable()
        lines.append(f"  emulated clusters for the runs across links ({', '.join(links)}): "
                     + (f"CANNOT be made here ({reason}): the study will refuse to start"
                        if reason else "can be made here"))
    if out is not None:
        skip = done_keys(load_results(out, missing_ok=True))
        remaining = [s for r, s in zip(runs, est) if r.run_key not in skip]
        lines.append(f"already done in {out}: {len(runs) - len(remaining)} runs")
        est = remaining
    total = sum(est)
    basis = "calibrated on earlier results" if calibration is not None and len(calibration) \
        else "guessed reference throughput and speed-ups"
    lines.append(f"estimated wall time: {total / 60:.0f} min ({total / 3600:.1f} h; {basis})")
    return "\n".join(lines)
