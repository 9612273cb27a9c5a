"""The path registry is the one source of truth: it drives the grid's validation, the runner's
launch (command line and environment) and the child's training call, and the analysis's
labels and order. Adding a path is one entry (plus its strategy): shown here with a toy path
added to the registry, which the grid, the launcher, a real training run and the analysis then
all know without any other change."""
from __future__ import annotations

import os
from dataclasses import replace

import pandas as pd
import pytest

from cnn import paths as P
from cnn.analysis import summarize
from cnn.analysis.summary import variant_sort_key
from cnn.backends import available_backends
from cnn.parallel import strategy_names
from cnn.study import expand_grid
from cnn.study import runner
from cnn.study.child import execute_run

TINY = {"dataset": "blobs", "model": "mnist_small", "train_size": 64, "test_size": 32,
        "batch_size": 32, "epochs": 1}


def test_every_entry_names_real_strategies_and_backends():
    for entry in P.PATHS.values():
        for s in entry.strategies:
            assert entry.fit_strategy.get(s, s) in strategy_names(), (entry.name, s)
        if entry.trainer == "fit":
            for b in entry.backends:
                assert b in available_backends(), (entry.name, b)
    assert P.BASELINE in P.PATHS and P.PATHS[P.BASELINE].default_backend == "numpy"


def test_registry_drives_grid_validation():
    with pytest.raises(ValueError, match=r"path 'threads' takes one of \['sync', 'average', "
                                         r"'hogwild'\]"):
        expand_grid({**TINY, "path": "threads", "strategy": "sequential"})
    with pytest.raises(ValueError, match="unknown path 'gpu'.*sequential"):
        expand_grid({**TINY, "path": "gpu"})
    runs = expand_grid({**TINY, "path": ["sequential", "numba", "numba_parallel", "threads"],
                        "threads": 3})
    got = {(r["path"], r["strategy"], r["backend"], r["threads"]) for r in runs}
    assert got == {("sequential", "sequential", "numpy", 1), ("numba", "sequential", "numba", 1),
                   ("numba_parallel", "sequential", "numba_parallel", 3),
                   ("threads", "sync", "numpy", 3)}


def test_oversubscription_comes_from_the_registry():
    assert P.oversubscribed("threads", 4, 2) and not P.oversubscribed("threads", 2, 2)
    assert P.oversubscribed("numba_parallel", 3, 2)
    assert not P.oversubscribed("cuda", 4, 2)
    assert not P.oversubscribed("threads", 4, float("nan"))  # machine unknown


@pytest.fixture
def toy_path(monkeypatch):
    """A new path: sync over 'toy' workers, launched with an environment variable."""
    entry = P.TrainingPath("toy", "sync over toy workers", strategies=("sync",),
                           backends=("numpy", "numba"), workers="toy workers", scales=True,
                           launch="env", env={"TOY_WORKERS": "{threads}"})
    monkeypatch.setitem(P.PATHS, "toy", entry)
    return entry


def test_adding_a_path_is_one_registry_entry(toy_path, tmp_path):
    runs = expand_grid({**TINY, "path": ["sequential", "toy"], "threads": [1, 2],
                        "strategy": "sync", "backend": ["numpy", "numba"]})
    toy = [r for r in runs if r["path"] == "toy"]
    assert {(r["strategy"], r["backend"], r["threads"]) for r in toy} == {
        ("sync", b, t) for b in ("numpy", "numba") for t in (1, 2)}
    # a path with one strategy fixes it (a crossed strategy axis is for the paths that vary it)
    assert {r["strategy"] for r in expand_grid({**TINY, "path": "toy",
                                                "strategy": "hogwild"})} == {"sync"}
    with pytest.raises(ValueError, match="path 'toy' runs over one of \\['numpy', 'numba'\\]"):
        expand_grid({**TINY, "path": "toy", "backend": "cuda"})
    cfg = next(r for r in toy if r["threads"] == 2 and r["backend"] == "numpy")
    # the launch: its environment and its command line
    assert runner.child_env(cfg)["TOY_WORKERS"] == "2"
    argv = runner.child_command(cfg, "--run-json", "c.json")
    assert argv[1:4] == ["-m", "cnn.study.child", "--run-json"]
    assert str(os.getpid()) in argv  # the child watches this study
    assert cfg.jit_key() is None and replace(cfg, backend="numba").jit_key()
    # the training call: fit gets the path's strategy and workers (a real, tiny run)
    result = execute_run(cfg)
    assert len(result["epochs"]) == 1 and 0 <= result["epochs"][0]["test_accuracy"] <= 1
    # the analysis: label, p and order, all from the entry
    assert P.variant_name("toy", "sync", "numpy") == "toy"
    assert P.variant_name("toy", "sync", "numba") == "toy[numba]"
    assert P.workers("toy", 2) == 2.0
    assert (variant_sort_key("keras", "sequential", "tensorflow", 1)
            < variant_sort_key("toy", "sync", "numpy", 1))
    rows = [{"run_key": f"{p}{r}", "status": "ok", "error": "", "dataset": "blobs",
             "model": "mnist_small", "path": p, "strategy": s, "backend": "numpy",
             "threads": t, "batch_size": 32, "filters": 8, "train_size": 64, "test_size": 32,
             "dtype": "float32", "repeat": r, "seed": r, "epoch": 1, "epochs": 1,
             "time": tm, "compute_time": tm, "data_time": 0.0, "transfer_time": 0.0,
             "eval_time": 0.1, "compile_time": 0.0, "images_per_sec": 64 / tm,
             "test_accuracy": 0.5, "final_test_accuracy": 0.5, "cpu": "x", "cores": 2}
            for r in range(3) for p, s, t, tm in (("sequential", "sequential", 1, 1.0),
                                                 ("toy", "sync", 2, 0.5))]
    table = summarize(pd.DataFrame(rows), n_boot=20).table.set_index("label")
    assert table.loc["toy ×2", "speedup"] == pytest.approx(2.0)


def test_mpiexec_launch(monkeypatch):
    entry = P.TrainingPath("ranks", "sync across ranks", strategies=("sync",), scales=True,
                           workers="MPI ranks", launch="mpiexec", fit_workers=False)
    monkeypatch.setitem(P.PATHS, "ranks", entry)
    cfg = expand_grid({**TINY, "path": "ranks", "threads": 4})[0]
    argv = runner.child_command(cfg, "--run-json", "c.json")
    assert os.path.basename(argv[0]) == "mpiexec" and argv[1:3] == ["-n", "4"]
    assert entry.fit_arguments(cfg) == {"strategy": "sync", "threads": 1}
    with pytest.raises(ValueError, match="launch"):
        P.TrainingPath("bad", "x", launch="ssh")
