"""Timelines (cnn.trace): the Chrome trace events of a traced fit, parsed here as Perfetto would
read them, over two threads, two worker processes and two MPI ranks: every lane named, the
spans of each lane nested, each step covered at least 95% by the spans inside it, one forward
and one backward span per op of the model's plan, the reduce, update and barriers; MPI ranks
merged into one file on one clock; tracing changes no result; the figure of one step."""
from __future__ import annotations

import json
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest

from cnn import cli
from cnn.analysis.timeline import draw_step, step_numbers, typical_step
from parallel_helpers import OPT, blobs, build

HERE = Path(__file__).resolve().parent
MPIEXEC = Path(sys.executable).parent / "mpiexec"
EPS = 1e-3  # microseconds: ts and dur are printed from integer nanoseconds


def lanes_of(trace: dict) -> dict:
    """``{(pid, tid): [complete events sorted by start, outer first]}``."""
    lanes = defaultdict(list)
    for e in trace["traceEvents"]:
        assert e["ph"] in ("X", "M"), e
        if e["ph"] == "X":
            assert e["dur"] >= 0, e
            lanes[(e["pid"], e["tid"])].append(e)
    for spans in lanes.values():
        spans.sort(key=lambda e: (e["ts"], -e["dur"]))
    return dict(lanes)


def children(spans: list[dict]) -> dict:
    """Each span's direct children, checking on the way that the lane's spans nest: a span
    starting inside another ends inside it too."""
    kids, stack = defaultdict(list), []
    for e in spans:
        while stack and e["ts"] >= stack[-1]["ts"] + stack[-1]["dur"] - EPS:
            stack.pop()
        if stack:
            parent = stack[-1]
            assert e["ts"] + e["dur"] <= parent["ts"] + parent["dur"] + EPS, \
                f"{e['name']} crosses the end of {parent['name']}"
            kids[id(parent)].append(e)
        stack.append(e)
    return kids


def check_steps(trace: dict, lanes_with_steps: int) -> dict:
    """Nesting everywhere, and every step of every lane covered >= 95% by its children.
    Returns the lanes."""
    lanes = lanes_of(trace)
    named = {(e["pid"], e["tid"]) for e in trace["traceEvents"]
             if e["ph"] == "M" and e["name"] == "thread_name"}
    assert set(lanes) <= named  # every lane is named
    stepped = 0
    for key, spans in lanes.items():
        kids = children(spans)
        steps = [e for e in spans if e["name"] == "step"]
        stepped += bool(steps)
        for s in steps:
            covered = sum(k["dur"] for k in kids[id(s)])
            assert covered >= 0.95 * s["dur"], (key, s, kids[id(s)])
    assert stepped == lanes_with_steps
    return lanes


def names(spans) -> set:
    return {e["name"] for e in spans}


def op_names(model) -> set:
    """The spans of each op of the model's plan on NumPy (the backend these runs name)."""
    labels = ["+".join(layer.name for layer in op.layers) for op in model.plan("numpy")]
    return {f"forward {x}" for x in labels} | {f"backward {x}" for x in labels}


@pytest.mark.parametrize("strategy", ["sync", "processes"])
def test_two_workers_trace(tmp_path, strategy):
    x, y = blobs(200)
    model = build()
    path = tmp_path / "trace.json"
    hist = model.fit(x, y, epochs=2, batch_size=32, optimizer=OPT, strategy=strategy, threads=2,
                     verbose=0, backend="numpy", trace=path, prefetch=True)
    assert hist.info["trace"] == str(path)
    trace = json.loads(path.read_text())
    steps = 2 * -(-200 // 32)
    lanes = check_steps(trace, lanes_with_steps=2)
    main = lanes[(0, 0)]
    fit_steps = [e for e in main if e["name"] == "step"]
    assert [e["args"]["step"] for e in fit_steps] == list(range(1, steps + 1))
    assert {"data wait", "data release"} <= names(main)
    assert names(lanes[(0, 1000)]) == {"gather"}  # the prefetcher's lane
    # worker 0 trains in the fit loop's lane; worker 1 is a thread or a process of its own
    workers = [(0, 0), (0, 1)] if strategy == "sync" else [(0, 0), (1, 0)]
    for key in workers:
        got = names(lanes[key])
        assert op_names(model) | {"loss", "contribute", "reduce", "update", "barrier",
                                  "step"} <= got, key
        assert sum(e["name"] == "step" for e in lanes[key]) == steps
    if strategy == "processes":
        # the prefetcher gathers into the shared batch segment: no copy per step
        assert "batch to shared memory" not in names(main)
        procs = {e["pid"]: e["args"]["name"] for e in trace["traceEvents"]
                 if e["name"] == "process_name"}
        assert sorted(procs) == [0, 1] and procs[1].startswith("worker process 1")


def test_tracing_changes_no_result(tmp_path):
    x, y = blobs(120)
    plain = build()
    h = plain.fit(x, y, epochs=1, batch_size=16, optimizer=OPT, strategy="sync", threads=2,
                  verbose=0, backend="numpy")
    assert "trace" not in h.info
    traced = build()
    traced.fit(x, y, epochs=1, batch_size=16, optimizer=OPT, strategy="sync", threads=2,
               verbose=0, backend="numpy", trace=tmp_path / "t.json")
    assert all(np.array_equal(plain.params[k], traced.params[k]) for k in plain.params)


@pytest.mark.skipif(not MPIEXEC.is_file(), reason=f"MPI unavailable: no mpiexec at {MPIEXEC}")
def test_two_ranks_trace_merged_on_one_clock(tmp_path):
    cmd = [str(MPIEXEC), "-n", "2", sys.executable, str(HERE / "mpi_checks.py"), "trace",
           str(tmp_path)]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    trace = json.loads((tmp_path / "trace.json").read_text())
    lanes = check_steps(trace, lanes_with_steps=2)
    procs = {e["pid"]: e["args"]["name"] for e in trace["traceEvents"]
             if e["name"] == "process_name"}
    assert sorted(procs) == [0, 1]
    assert procs[0].startswith("rank 0 (") and procs[1].startswith("rank 1 (")
    steps = -(-200 // 32)
    for rank in (0, 1):
        main = lanes[(rank, 0)]
        assert [e["args"]["step"] for e in main if e["name"] == "step"] == list(
            range(1, steps + 1))
        assert op_names(build()) | {"data wait", "loss", "contribute", "reduce",
                                    "update"} <= names(main)
        buckets = names(lanes[(rank, 1001)])  # overlap: a lane of the buckets' allreduces
        assert len(buckets) >= 2 and all(b.startswith("allreduce bucket ") for b in buckets)
    clock = trace["otherData"]
    # one machine: both ranks read the same CLOCK_MONOTONIC, so the true offset is 0 and the
    # estimate must lie within its own error bound of it
    assert clock["offsets_ns"][0] == 0 and abs(clock["offsets_ns"][1]) <= \
        clock["offset_error_ns"][1]
    # on the common clock, the ranks' step k overlap (each waits for the other in the reduce)
    for k in range(steps):
        a, b = [[e for e in lanes[(r, 0)] if e["name"] == "step"][k] for r in (0, 1)]
        assert a["ts"] < b["ts"] + b["dur"] and b["ts"] < a["ts"] + a["dur"]


def test_draw_one_step(tmp_path):
    x, y = blobs(100)
    path = tmp_path / "trace.json"
    build().fit(x, y, epochs=1, batch_size=20, optimizer=OPT, strategy="sync", threads=2,
                verbose=0, backend="numpy", trace=path, prefetch=True)
    assert step_numbers(path) == [1, 2, 3, 4, 5]
    assert typical_step(path) in (2, 3, 4, 5)  # never the epoch's first (the prefetch wait)
    fig = draw_step(path, step=3)
    ax = fig.axes[0]
    assert [t.get_text() for t in ax.get_yticklabels()] == [
        "fit (main process): worker 0 (fit loop)", "fit (main process): sync worker 1",
        "fit (main process): prefetch"]
    fig.savefig(tmp_path / "step.png")
    with pytest.raises(ValueError, match="no step 9"):
        draw_step(path, step=9)


def test_bad_trace_arguments_are_refused(capsys):
    x, y = blobs(20)
    with pytest.raises(TypeError, match="trace must be a path"):
        build().fit(x, y, verbose=0, trace=3)
    assert cli.main(["train", "--trace", "/nonexistent-dir/t.json", "--limit", "10"]) == 2
    assert "--trace: /nonexistent-dir/t.json is not a file in an existing folder" in \
        capsys.readouterr().err
    assert cli.main(["train", "--trace", "t.txt", "--limit", "10"]) == 2
    assert "--trace: give a .json file" in capsys.readouterr().err
