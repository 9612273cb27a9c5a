"""The study runner: grid expansion and keys, isolated runs in child processes, the tidy schema,
failures recorded as rows, the atomic write, and resuming after a crash or Ctrl-C.

Runs use the synthetic "blobs" set at tiny sizes; each costs about one interpreter start-up.
"""
from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

from cnn.analysis import summarize
from cnn.results import COLUMNS, load_results, save_results
from cnn.study import PROFILES, describe_plan, expand_grid, main as study_main, run_study
from cnn.study import runner

ROOT = Path(__file__).resolve().parent.parent
TINY = {"dataset": "blobs", "model": "mnist_small", "train_size": 64, "test_size": 32,
        "batch_size": 32, "epochs": 1, "timeout": 120}
# xor images are 1x2 pixels: the mnist_small 3x3 convolution cannot be built, so this run
# raises inside its child process
FAILING = {**TINY, "dataset": "xor"}


class Counter:
    """A progress callable counting the runs actually launched."""

    def __init__(self, stop_after: int | None = None):
        self.calls, self.stop_after = [], stop_after

    def __call__(self, event):
        self.calls.append(event)
        if self.stop_after is not None and len(self.calls) >= self.stop_after:
            raise KeyboardInterrupt  # what Ctrl-C does between two runs


# ---- grid expansion -------------------------------------------------------------------------
def test_expand_counts_order_and_seeds():
    grid = {**TINY, "path": ["sequential", "threads"], "strategy": ["sync", "average"],
            "threads": [1, 2], "batch_size": [16, 32], "repeats": 3}
    runs = expand_grid(grid)
    # sequential ignores strategy and threads: 2 batch sizes; threads: 2 x 2 x 2
    assert len(runs) == (2 + 8) * 3
    assert [r["repeat"] for r in runs] == [0] * 10 + [1] * 10 + [2] * 10  # interleaved repeats
    assert all(r["seed"] == r["repeat"] for r in runs)
    seq = [r for r in runs if r["path"] == "sequential"]
    fixed = {(r["strategy"], r["backend"], r["threads"]) for r in seq}
    assert fixed == {("sequential", "numpy", 1)}
    assert all(r["filters"] == 8 and r["lr"] > 0 for r in runs)  # the preset's defaults


def test_keys_are_unique_and_stable():
    grid = {**TINY, "path": ["sequential", "threads", "numba", "keras"], "threads": [1, 2],
            "repeats": 2}
    runs = expand_grid(grid)
    keys = [r["run_key"] for r in runs]
    assert len(set(keys)) == len(keys)
    assert keys == [r["run_key"] for r in expand_grid(grid)]
    # the same configuration written differently has the same key ...
    spelled = expand_grid({**TINY, "path": ["sequential"], "filters": [8], "epochs": [1],
                           "repeats": 2, "timeout": 5})
    assert [r["run_key"] for r in spelled] == [r["run_key"] for r in runs
                                              if r["path"] == "sequential"]
    # ... and any change of configuration changes it
    other = expand_grid({**TINY, "path": "sequential", "lr": 0.5})[0]["run_key"]
    assert other not in keys


def test_overlapping_subgrids_run_once():
    runs = expand_grid([{**TINY, "path": "sequential"}, {**TINY, "path": ["sequential", "numba"]}])
    assert [r["path"] for r in runs] == ["sequential", "numba"]


@pytest.mark.parametrize("grid, named", [
    ({"colour": "red"}, "colour"),
    ({"batch_size": 0}, "batch_size"),
    ({"threads": 1.5}, "threads"),
    ({"epochs": [1, -1]}, "epochs"),
    ({"path": "gpu"}, "path"),
    ({"dataset": "imagenet"}, "dataset"),
    ({"model": "resnet"}, "model"),
    ({"dtype": "int8"}, "dtype"),
    ({"path": "threads", "strategy": "allreduce"}, "strategy"),
    ({"path": "threads", "backend": "cuda"}, "backend"),
    ({"repeats": [1, 2]}, "repeats"),
    ({"momentum": 1.5}, "momentum"),
    ("no_such_profile", "no_such_profile"),
])
def test_bad_axis_or_value_raises_naming_it(grid, named):
    with pytest.raises(ValueError, match=named):
        expand_grid(grid)


def test_cuda_needs_a_gpu_or_the_simulator():
    grid = {**TINY, "path": ["sequential", "cuda"]}
    assert [r["path"] for r in expand_grid(grid, gpu=False)] == ["sequential"]
    assert [r["path"] for r in expand_grid(grid, gpu=True)] == ["sequential", "cuda"]
    sim = expand_grid({**grid, "cuda_simulator": True}, gpu=False)
    assert [(r["path"], r["cuda_simulator"]) for r in sim] == [("sequential", False),
                                                               ("cuda", True)]


def test_profiles():
    quick = expand_grid("quick", gpu=False)
    assert {r["dataset"] for r in quick} == {"mnist_embedded"}  # offline
    assert {r["batch_size"] for r in quick} == {32, 128}
    assert {"sequential", "threads", "numba", "keras"} <= {r["path"] for r in quick}
    assert "cuda" not in {r["path"] for r in quick}
    assert "cuda" in {r["path"] for r in expand_grid("quick", gpu=True)}
    full = expand_grid("full", gpu=False)
    assert {r["dataset"] for r in full} == {"mnist", "cifar10"}
    repeats: dict[tuple, int] = {}
    for r in full:
        ident = tuple(v for k, v in r.items() if k not in ("repeat", "seed", "run_key"))
        repeats[ident] = repeats.get(ident, 0) + 1
    assert min(repeats.values()) >= 5
    # the whole training split, or 55,000 + a 5,000-image validation split (time-to-accuracy)
    assert {r["train_size"] for r in full if r["dataset"] == "mnist"} == {60000, 55000}
    assert {r["val_size"] for r in full if r["target"] is not None} == {5000}
    # baseline (b) is the best one-core contender of each throughput configuration: Keras on
    # one thread is among them in every one (the first edition lacked it at CIFAR batch 128)
    def config(r):
        return r["dataset"], r["batch_size"], r.get("filters"), r["train_size"]
    throughput = [r for r in full if r["target"] is None]
    assert {config(r) for r in throughput} == {
        config(r) for r in throughput if r["path"] == "keras" and r["threads"] == 1}
    plan = describe_plan("full", gpu=False)
    assert "estimated wall time" in plan and "cuda" in plan
    assert set(PROFILES) >= {"quick", "full"}


def _run(**axes):
    """The first run of a tiny grid with ``axes``."""
    return expand_grid({"dataset": "blobs", "model": "mnist_small", **axes},
                       include_unavailable=True)[0]


def test_child_environment():
    env = runner.child_env(_run(path="numba_parallel", threads=3), numba_cache=Path("/x"))
    assert env["NUMBA_NUM_THREADS"] == "3" and env["NUMBA_CACHE_DIR"] == "/x"
    assert runner.child_env(_run(path="cuda", cuda_simulator=True))["NUMBA_ENABLE_CUDASIM"] == "1"


def test_jit_warm_up_runs_in_its_own_process(tmp_path):
    assert _run(path="numba", dtype="float32").jit_key() == ("numba", "float32")
    assert _run(path="threads", backend="numba", dtype="float64").jit_key() is not None
    assert _run(path="numba_parallel", dtype="float64").jit_key() is not None
    assert _run(path="keras", dtype="float32").jit_key() is None
    seconds, message = runner.warm_jit(("numpy", "float32"), tmp_path)
    assert seconds is None and "nothing to compile" in message


# ---- the atomic write -----------------------------------------------------------------------
def test_save_is_atomic(tmp_path, monkeypatch):
    out = tmp_path / "df.pkl"
    save_results(pd.DataFrame({"run_key": ["a"], "status": ["ok"]}), out)

    def crash(fd):  # the disk fills up while the new file is being made durable
        raise OSError("disk full")

    monkeypatch.setattr("os.fsync", crash)
    with pytest.raises(OSError, match="disk full"):
        save_results(pd.DataFrame({"run_key": ["b"], "status": ["ok"]}), out)
    monkeypatch.undo()
    assert list(pd.read_pickle(out)["run_key"]) == ["a"]  # the old file, intact
    assert [p.name for p in tmp_path.iterdir()] == ["df.pkl"]  # no temporary left behind


# ---- real runs in child processes -----------------------------------------------------------
@pytest.fixture(scope="module")
def studied(tmp_path_factory):
    """One ok run of 2 epochs and one failing run, in a fresh results file."""
    out = tmp_path_factory.mktemp("study") / "results" / "df.pkl"
    grid = [{**TINY, "path": "sequential", "epochs": 2}, FAILING]
    counter = Counter()
    df = run_study(grid, out=out, progress=counter)
    return out, grid, df, counter


def test_failed_run_is_recorded_and_the_study_goes_on(studied):
    out, grid, df, counter = studied
    assert len(counter.calls) == 2
    runs = df.drop_duplicates("run_key").set_index("dataset")
    assert runs.loc["blobs", "status"] == "ok" and runs.loc["blobs", "error"] == ""
    assert runs.loc["xor", "status"] == "failed"
    assert "ValueError" in runs.loc["xor", "error"] and "kernel" in runs.loc["xor", "error"]
    failed = df[df["status"] == "failed"]
    assert len(failed) == 1 and failed["epoch"].isna().all() and failed["time"].isna().all()
    assert failed["cpu"].iloc[0] != ""  # the machine is recorded for failures too


def test_schema_one_row_per_epoch(studied):
    out, grid, df, _ = studied
    on_disk = pd.read_pickle(out)
    pd.testing.assert_frame_equal(on_disk, df)
    assert list(df.columns[:len(COLUMNS)]) == list(COLUMNS)
    for col in ("threads", "batch_size", "filters", "epochs", "train_size", "test_size",
                "repeat", "seed", "cores"):
        assert pd.api.types.is_integer_dtype(df[col]), col
    assert str(df["epoch"].dtype) == "Int64" and str(df["num_params"].dtype) == "Int64"
    for col in ("time", "compute_time", "data_time", "transfer_time", "eval_time",
                "compile_time", "cold_compile_time", "images_per_sec", "train_loss",
                "train_accuracy", "test_loss",
                "test_accuracy", "final_test_accuracy", "lr", "momentum", "run_time"):
        assert pd.api.types.is_float_dtype(df[col]), col
    for col in ("run_key", "status", "error", "dataset", "model", "path", "strategy",
                "backend", "dtype", "started_at", "cpu", "blas", "python", "git_commit",
                "source_hash",
                "numpy_version", "numba_version", "tensorflow_version", "keras_version"):
        assert pd.api.types.is_string_dtype(df[col]), col
    ok = df[df["status"] == "ok"]
    assert len(ok) == 2 and list(ok["epoch"]) == [1, 2]  # one row per epoch
    assert ok["run_key"].nunique() == 1 and (ok["train_size"] == 64).all()
    assert (ok["test_size"] == 32).all() and ok["num_params"].iloc[0] > 0
    assert (ok["final_test_accuracy"] == ok["test_accuracy"].iloc[-1]).all()
    assert ok["test_accuracy"].between(0, 1).all() and (ok["images_per_sec"] > 0).all()
    parts = ok["compute_time"] + ok["data_time"] + ok["transfer_time"]
    assert (parts <= ok["time"] * (1 + 1e-6)).all() and (ok["eval_time"] > 0).all()
    assert (ok["compile_time"] == 0).all() and ok["cold_compile_time"].isna().all()  # numpy
    assert (ok["run_time"] > ok["time"].sum()).all()
    pd.Timestamp(ok["started_at"].iloc[0])  # ISO 8601


def test_rerun_skips_done_and_retries_failed(studied):
    out, grid, df, _ = studied
    skip_all = Counter()
    again = run_study(grid, out=out, progress=skip_all, retry_failed=False)
    assert skip_all.calls == [] and len(again) == len(df)
    retry = Counter()
    again = run_study(grid, out=out, progress=retry)
    assert [e["config"]["dataset"] for e in retry.calls] == ["xor"]  # only the failed one
    assert len(again) == len(df) and again["run_key"].nunique() == 2
    ok_before = df[df["status"] == "ok"].reset_index(drop=True)
    ok_after = again[again["status"] == "ok"].reset_index(drop=True)
    pd.testing.assert_frame_equal(ok_before, ok_after)
    table = summarize(again, n_boot=50).table
    assert len(table) == 1 and table["speedup"].iloc[0] == pytest.approx(1.0)


def test_interrupt_keeps_finished_runs_and_resumes(tmp_path):
    out = tmp_path / "df.pkl"
    grid = {**TINY, "path": "sequential", "batch_size": [16, 32, 64]}
    with pytest.raises(KeyboardInterrupt):
        run_study(grid, out=out, progress=Counter(stop_after=1))
    kept = load_results(out)
    assert kept["run_key"].nunique() == 1 and (kept["status"] == "ok").all()
    resumed = Counter()
    df = run_study(grid, out=out, progress=resumed)
    assert len(resumed.calls) == 2
    assert set(df["run_key"]) == {r["run_key"] for r in expand_grid(grid)}
    first = df[df["run_key"] == kept["run_key"].iloc[0]]
    assert first["started_at"].tolist() == kept["started_at"].tolist()  # not rerun


def test_timeout_is_a_failed_run(tmp_path):
    df = run_study({**TINY, "path": "sequential"}, out=tmp_path / "df.pkl", progress=False,
                   timeout=0.05)
    assert df["status"].tolist() == ["failed"] and "timeout" in df["error"].iloc[0]


def test_cli_ctrl_c_then_resume(tmp_path):
    """A real SIGINT to ``python -m cnn study`` between runs keeps the finished runs; the same
    command again completes the grid without redoing them."""
    grid_file, out = tmp_path / "grid.json", tmp_path / "df.pkl"
    grid = {**TINY, "path": "sequential", "batch_size": [8, 16, 32, 64]}
    grid_file.write_text(json.dumps(grid))
    cmd = [sys.executable, "-m", "cnn", "study", "--grid", str(grid_file), "--out", str(out)]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    deadline = time.monotonic() + 60
    while not out.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGINT)
    output = proc.communicate(timeout=60)[0]
    kept = load_results(out)
    assert 1 <= kept["run_key"].nunique() <= 4 and (kept["status"] == "ok").all(), output
    if kept["run_key"].nunique() < 4:
        assert proc.returncode == 130 and "resume" in output, output
    rerun = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    df = load_results(out)
    assert df["run_key"].nunique() == 4 and (df["status"] == "ok").all()
    for key, group in kept.groupby("run_key"):
        assert df.loc[df["run_key"] == key, "started_at"].tolist() == group["started_at"].tolist()


def test_cli_dry_run(tmp_path, capsys):
    assert study_main(["--profile", "full", "--dry-run", "--out", str(tmp_path / "x.pkl")]) == 0
    text = capsys.readouterr().out
    assert "runs" in text and "estimated wall time" in text
    assert not (tmp_path / "x.pkl").exists()
