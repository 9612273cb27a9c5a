"""``python -m cnn bench tta``: time to accuracy, side by side: our best one-core and two-core
paths, Keras and PyTorch at 1 and 2 threads, trained to a fixed validation accuracy.

Every contender trains the same network with the same hyperparameters (the preset's optimizer
and batch size) on the same batches: run ``r`` of every contender has the seed ``r``, hence the
same initial weights and the same epoch orders (the references draw them as ``fit`` does).
The runs are the study's (:mod:`cnn.study`): each in a fresh process, the Numba kernels
compiled into the study's cache before the first, the seeds in interleaved blocks (every
contender's seed 0, then seed 1, ...) so that drift in a shared machine's speed hits all alike;
each run holds out a validation split from the end of the training set, evaluates on it every
``k`` steps (the same ``k`` for all) and stops at the first evaluation at or above the target
(:class:`cnn.study.tta.TimeToAccuracy`, the step hook of ``fit``, ``fit_keras`` and
``fit_torch``).

What the time counts: the training clock of the trainer up to that evaluation, i.e. every
step (forward, loss, backward, update), the data preparation whose wait was exposed and the
workers' communication. What it does not: the evaluations themselves, JIT compilation and
Keras's tracing (done before the first epoch), building the model, starting the process and
loading the data, and the test-set evaluation after each epoch.

Printed per preset: each contender's median time to the target over the seeds with its range,
the seeds that reached it, the median steps, and the ratio of our best two-core path to the
faster peer on two cores (the issue's goal: at most 0.7).
"""
from __future__ import annotations

import json
import statistics
import tempfile
from pathlib import Path

#: preset -> (data set, target validation accuracy, epochs at most, validation examples,
#: evaluations per epoch)
PROBLEMS = {"mnist_small": ("mnist", 0.98, 15, 5000, 10),
            "cifar_tutorial": ("cifar10", 0.60, 30, 2500, 5)}
#: the smoke run's problem: the embedded MNIST subset to a low target
QUICK_PROBLEM = ("mnist_embedded", 0.60, 2, 512, 4)
#: contender -> (family, cores, grid axes); "ours" two-core: the faster of the two counts
CONTENDERS = {
    "ours numba (one core)": ("ours", 1, {"path": "numba"}),
    "ours sync numba x2": ("ours", 2, {"path": "threads", "strategy": "sync",
                                       "backend": "numba", "threads": 2}),
    "ours numba_parallel x2": ("ours", 2, {"path": "numba_parallel", "threads": 2}),
    "keras x1": ("keras", 1, {"path": "keras", "threads": 1}),
    "keras x2": ("keras", 2, {"path": "keras", "threads": 2}),
    "pytorch x1": ("torch", 1, {"path": "torch", "threads": 1}),
    "pytorch x2": ("torch", 2, {"path": "torch", "threads": 2}),
}
#: the smoke run's contenders: no compile, one of each family
QUICK_CONTENDERS = {
    "ours numpy (one core)": ("ours", 1, {"path": "sequential"}),
    "ours sync numpy x2": ("ours", 2, {"path": "threads", "strategy": "sync",
                                       "backend": "numpy", "threads": 2}),
    "keras x1": ("keras", 1, {"path": "keras", "threads": 1}),
    "pytorch x1": ("torch", 1, {"path": "torch", "threads": 1}),
}


def grid(preset: str, contenders: dict, problem: tuple, repeats: int, batch_size=None) -> list:
    """The study grid of one preset: one sub-grid per contender, ``repeats`` seeds each."""
    from ..presets import get_preset
    dataset, target, epochs, val_size, evals = problem
    train = {"mnist": 60000, "cifar10": 50000, "mnist_embedded": 5120}[dataset] - val_size
    bs = batch_size or get_preset(preset)["batch_size"]
    every = max(1, -(-train // bs) // evals)
    return [{"dataset": dataset, "model": preset, **axes, "epochs": epochs, "target": target,
             "val_size": val_size, "eval_every": every, "batch_size": bs, "test_size": 1000,
             "repeats": repeats, "timeout": 7200} for _, _, axes in contenders.values()]


def _label(row, contenders: dict) -> str | None:
    for label, (_, _, axes) in contenders.items():
        if all(str(row[k]) == str(v) for k, v in axes.items()):
            return label
    return None


def summarise(df, contenders: dict) -> list[dict]:
    """One row per contender from the study's results: seeds that reached the target, the
    median time to it with its range, the median steps and the median img/s of its epochs."""
    runs = df.drop_duplicates("run_key")
    out = []
    for label, (family, cores, _) in contenders.items():
        mine = [r for _, r in runs.iterrows() if _label(r, contenders) == label]
        if not mine:
            continue
        reached = [r for r in mine if r["tta_status"] == "reached"]
        times = [float(r["time_to_target"]) for r in reached]
        epochs = df[df["run_key"].isin([r["run_key"] for r in mine])]
        rates = [float(v) for v in epochs["images_per_sec"].dropna()]
        out.append({"contender": label, "family": family, "cores": cores, "runs": len(mine),
                    "reached": len(reached),
                    "failed": sum(r["status"] != "ok" for r in mine),
                    "median": statistics.median(times) if times else None,
                    "min": min(times) if times else None, "max": max(times) if times else None,
                    "steps": statistics.median(float(r["steps_to_target"]) for r in reached)
                    if reached else None,
                    "images_per_sec": statistics.median(rates) if rates else None})
    return out


def two_core_ratio(rows: list[dict]) -> tuple[dict | None, dict | None, float | None]:
    """Our best two-core contender, the faster peer on two cores, and the ratio of their
    median times to the target (None where either never reached it)."""
    def best(family):
        done = [r for r in rows if r["family"] == family and r["cores"] == 2 and r["median"]]
        return min(done, key=lambda r: r["median"]) if done else None
    ours = best("ours")
    peers = [p for p in (best("keras"), best("torch")) if p]
    peer = min(peers, key=lambda r: r["median"]) if peers else None
    ratio = ours["median"] / peer["median"] if ours and peer else None
    return ours, peer, ratio


def print_table(preset: str, problem: tuple, rows: list[dict], repeats: int, bs: int) -> None:
    dataset, target, epochs, val_size, _ = problem
    print(f"\n{preset} on {dataset}: to {100 * target:g}% validation accuracy ({val_size:,} "
          f"examples held out of the training set), batch {bs}, at most {epochs} epochs, "
          f"{repeats} seed(s)")
    print(f"  {'contender':<26}{'reached':>9}{'time to target, s':>20}{'(range)':>18}"
          f"{'steps':>8}{'img/s':>9}")
    for r in rows:
        if r["median"] is None:
            why = f"{r['failed']} failed" if r["failed"] else "not reached"
            print(f"  {r['contender']:<26}{r['reached']:>5}/{r['runs']:<3}  {why}")
            continue
        rng = f"({r['min']:.1f}-{r['max']:.1f})"
        print(f"  {r['contender']:<26}{r['reached']:>5}/{r['runs']:<3}{r['median']:>18.1f}"
              f"{rng:>18}{r['steps']:>8.0f}{r['images_per_sec'] or 0:>9,.0f}")
    ours, peer, ratio = two_core_ratio(rows)
    if ratio is not None:
        print(f"  our best two-core path ({ours['contender']}) / the faster peer on two cores "
              f"({peer['contender']}): {ratio:.2f} of its time (goal <= 0.7)")


def suite(repeats: int = 3, quick: bool = False, presets=None, batch_sizes=None,
          json_path: str | None = None) -> dict:
    """Every contender to the target of each preset (``mnist_small``: 98% on MNIST,
    ``cifar_tutorial``: 60% on CIFAR-10), ``repeats`` seeds; prints the tables (see the
    module docstring) and returns every figure, also written to ``json_path`` when given.
    ``quick``: the embedded MNIST subset to 60% with the NumPy paths (nothing to compile) and
    one thread of each reference, a smoke run whose figures mean nothing about speed."""
    import importlib.util

    from ..study.runner import run_study
    presets = presets or (("mnist_small",) if quick else ("mnist_small", "cifar_tutorial"))
    contenders = dict(QUICK_CONTENDERS if quick else CONTENDERS)
    for family, module in (("keras", "tensorflow"), ("torch", "torch")):
        if importlib.util.find_spec(module) is None:
            print(f"{family}: {module} is not installed, its contenders are skipped")
            contenders = {k: v for k, v in contenders.items() if v[0] != family}
    if quick:
        print("--quick: a smoke run (the embedded MNIST subset to 60%, one seed); its figures "
              "mean nothing about speed")
    print("time counts the training clock up to the first evaluation at or above the target: "
          "steps, exposed data waits, communication; not the evaluations, JIT compile or "
          "tracing, model building, process start or data loading")
    result: dict = {"repeats": repeats, "presets": {}}
    with tempfile.TemporaryDirectory(prefix="cnn-bench-tta-") as tmp:
        for preset in presets:
            problem = QUICK_PROBLEM if quick else PROBLEMS[preset]
            bs = (batch_sizes or [None])[0]
            runs = grid(preset, contenders, problem, repeats, bs)
            df = run_study(runs, out=Path(tmp) / f"{preset}.pkl", progress=True, order_seed=0)
            rows = summarise(df, contenders)
            print_table(preset, problem, rows, repeats, runs[0]["batch_size"])
            ours, peer, ratio = two_core_ratio(rows)
            result["presets"][preset] = {"problem": problem, "rows": rows,
                                         "two_core_ratio": ratio,
                                         "eval_every": runs[0]["eval_every"]}
    if json_path:
        Path(json_path).write_text(json.dumps(result, indent=1, default=str))
        print(f"results written to {json_path}")
    return result
