"""Time estimates and the plan printed by ``study --dry-run``."""
from __future__ import annotations

import math

from .. import paths as P
from ..backends.registry import backend_info
from ..results import done_keys, load_results
from .grid import EVALS_PER_EPOCH, expand_grid, unavailable
from .profiles import FULL_NOTES
from .run import Run

#: a guess of the sequential path's images/s (numpy, 1 thread, batch 32), by model and
#: first-layer filters, where no measured result matches a run: only for ``--dry-run``
#: estimates, which calibrate on measured results instead when given them
REFERENCE_IPS = {"mnist_small": {4: 33000, 8: 21000, 16: 9000, 32: 4300},
                 "cifar_tutorial": {16: 1650, 32: 720, 64: 590}}
#: a guess of how many times faster evaluation (a forward pass) runs than training, likewise
EVAL_SPEED_GUESS = 2.5
#: seconds per run outside the epochs: the interpreter's start; a path's own imports and
#: contexts are its registry entry's ``overhead``, a backend's cold compile its record's
#: ``cold_compile``, its speed before it is measured the entry's ``speed_guess``
START_OVERHEAD = 2.0
#: seconds per run loading a real data set
DATASET_OVERHEAD = {"mnist": 2.0, "cifar10": 3.0}
#: time-to-accuracy runs stop at their target: the share of the epoch cap guessed for them
TTA_SHARE_OF_CAP = 0.5
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
            "augment"]
    measured, speedups, overheads = {}, {}, {}
    if calibration is not None and len(calibration):
        if "augment" not in calibration:  # results from before the axis: no augmentation
            calibration = calibration.assign(augment="")
        ok = calibration[calibration["status"] == "ok"].fillna({"augment": ""})
        if len(ok):
            per_run = ok.groupby("run_key").agg(
                **{c: (c, "first") for c in cols + ["dataset", "train_size", "test_size",
                                                    "run_time", "compile_time"]},
                ips=("images_per_sec", "median"), train=("time", "sum"),
                evals=("eval_time", "sum"), epochs=("epoch", "count"))
            per_run["eval_ips"] = per_run["test_size"] * per_run["epochs"] / per_run["evals"]
            per_run["overhead"] = per_run["run_time"] - per_run["train"] - per_run["evals"]
            for key, g in per_run.groupby(cols):
                measured[key] = (g["ips"].median(), g["eval_ips"].median())
            seq = per_run[per_run["path"] == P.BASELINE].groupby(
                ["model", "batch_size", "filters"])["ips"].median()
            for key, g in per_run.groupby(["path", "strategy", "backend", "threads"]):
                ratios = [r.ips / seq[(r.model, r.batch_size, r.filters)]
                          for r in g.itertuples() if (r.model, r.batch_size, r.filters) in seq]
                if ratios:
                    speedups[key] = sorted(ratios)[len(ratios) // 2]
                overheads[key[0]] = float(g["overhead"].median())
    out, compiled = [], set()
    for r in runs:
        jit = r.jit_key()
        cold = 0.0
        if jit is not None and jit not in compiled:
            compiled.add(jit)
            cold = backend_info(r.backend).cold_compile
        key = tuple(r[c] for c in cols)
        if key in measured:
            ips, eval_ips = measured[key]
        else:
            s = speedups.get((r.path, r.strategy, r.backend, r.threads), r.entry.speed_guess)
            ips = _reference_ips(r.model, r.filters) * s
            eval_ips = EVAL_SPEED_GUESS * ips
        overhead = overheads.get(r.path)
        if overhead is None:
            overhead = START_OVERHEAD + r.entry.overhead
        overhead += DATASET_OVERHEAD.get(r.dataset, 0.0)
        epochs = r.epochs
        extra = 0.0
        if r.target is not None:
            # training stops at the target: guess a share of the cap, plus the validation
            # evaluations (every eval_every steps, about EVALS_PER_EPOCH per epoch)
            epochs = max(1.0, TTA_SHARE_OF_CAP * r.epochs)
            extra = epochs * EVALS_PER_EPOCH * r.val_size / eval_ips
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
        groups.setdefault((r.dataset, r.train_size, r.variant), []).append(s)
    for (ds, n, v), secs in groups.items():
        lines.append(f"  {ds:<15} n={n:<6} {v:<24} {len(secs):>3} runs  "
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
    if grid_or_profile == "full":
        lines.append("  " + FULL_NOTES)
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
