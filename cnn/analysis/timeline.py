"""One step of a training timeline (a trace written by ``fit(trace=...)``, see
:mod:`cnn.trace`) drawn as a figure: a row per lane (worker thread, worker process, MPI rank,
the prefetcher, the bucket allreduces), its spans as bars coloured by kind, nested spans drawn
thinner inside their parents.

    from cnn.analysis.timeline import draw_step
    draw_step("trace.json", step=20).savefig("step20.png", dpi=150)
"""
from __future__ import annotations

import subprocess
import sys
from collections import defaultdict
from pathlib import Path

from .figures import TEXT_WIDTH_IN

#: span category -> colour (matplotlib's tab10), in the legend's order
COLOURS = {"data": "tab:gray", "forward": "tab:blue", "loss": "tab:purple",
           "backward": "tab:orange", "comm": "tab:green", "update": "tab:red",
           "barrier": "tab:olive", "step": "whitesmoke"}


def load_trace(trace) -> dict:
    """A trace's JSON object (``trace``: a path, or the object itself)."""
    if isinstance(trace, dict):
        return trace
    from ..files import read_structured
    return read_structured(Path(trace), "trace")


def step_numbers(trace) -> list[int]:
    """The global steps the trace holds (the fit loop's ``step`` spans, 1-based)."""
    events = load_trace(trace)["traceEvents"]
    return sorted({e["args"]["step"] for e in events
                   if e.get("ph") == "X" and e["name"] == "step" and "step" in e.get("args", {})})


def step_window(trace, step: int) -> tuple[float, float]:
    """``(start, end)`` in microseconds of global step ``step``: from the earliest start to
    the latest end of every process's ``step`` span of that number (a worker thread's step
    span, which carries no number, lies inside its fit loop's)."""
    spans = [e for e in load_trace(trace)["traceEvents"] if e.get("ph") == "X"
             and e["name"] == "step" and e.get("args", {}).get("step") == step]
    if not spans:
        raise ValueError(f"the trace has no step {step}; it has steps {step_numbers(trace)}")
    return min(e["ts"] for e in spans), max(e["ts"] + e["dur"] for e in spans)


def _names(events) -> tuple[dict, dict]:
    processes, threads = {}, {}
    for e in events:
        if e.get("ph") == "M" and e["name"] == "process_name":
            processes[e["pid"]] = e["args"]["name"]
        elif e.get("ph") == "M" and e["name"] == "thread_name":
            threads[(e["pid"], e["tid"])] = e["args"]["name"]
    return processes, threads


def _depths(spans: list[dict]) -> list[int]:
    """Each span's nesting depth in its lane (0: outermost), spans sorted by start."""
    depths, stack = [], []
    for e in spans:
        while stack and e["ts"] >= stack[-1] - 1e-3:
            stack.pop()
        depths.append(len(stack))
        stack.append(e["ts"] + e["dur"])
    return depths


def typical_step(trace) -> int:
    """The global step of median duration, leaving out the first step of each epoch (which
    waits for the prefetcher's first batch)."""
    spans = [e for e in load_trace(trace)["traceEvents"] if e.get("ph") == "X"
             and e["name"] == "step" and "epoch" in e.get("args", {})]
    if not spans:
        raise ValueError("the trace holds no step spans")
    first: dict = {}
    for e in spans:
        epoch, step = e["args"]["epoch"], e["args"]["step"]
        first[epoch] = min(first.get(epoch, step), step)
    rest = sorted((e for e in spans if e["args"]["step"] not in first.values()),
                  key=lambda e: e["dur"]) or spans
    return rest[len(rest) // 2]["args"]["step"]


def draw_step(trace, step: int | None = None, title: str | None = None):
    """The figure of global step ``step`` (default: a typical one, :func:`typical_step`):
    every lane with a span in the step's window (:func:`step_window`), time in milliseconds
    from the step's start. Returns a matplotlib Figure."""
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch
    data = load_trace(trace)
    events = data["traceEvents"]
    if step is None:
        step = typical_step(data)
    lo, hi = step_window(data, step)
    processes, threads = _names(events)
    lanes: dict = defaultdict(list)
    for e in events:
        if e.get("ph") == "X" and e["ts"] < hi and e["ts"] + e["dur"] > lo:
            lanes[(e["pid"], e["tid"])].append(e)
    order = sorted(lanes)
    fig = Figure(figsize=(TEXT_WIDTH_IN, 0.45 * len(order) + 1.3), layout="constrained")
    ax = fig.subplots()
    for row, key in enumerate(order):
        spans = sorted(lanes[key], key=lambda e: (e["ts"], -e["dur"]))
        for e, depth in zip(spans, _depths(spans)):
            start, end = max(e["ts"], lo), min(e["ts"] + e["dur"], hi)
            height = 0.8 * 0.75 ** depth
            ax.broken_barh([((start - lo) / 1e3, (end - start) / 1e3)],
                           (row - height / 2, height),
                           facecolors=COLOURS.get(e.get("cat"), "tab:cyan"),
                           edgecolors="black", linewidths=0.3)
    labels = [f"{processes.get(pid, pid)}: {threads.get((pid, tid), tid)}" for pid, tid in order]
    ax.set_yticks(range(len(order)), labels, fontsize=7)
    ax.invert_yaxis()
    ax.set_xlim(0, (hi - lo) / 1e3)
    ax.set_xlabel(f"milliseconds since the start of step {step}")
    ax.set_title(title or f"step {step}", fontsize=9)
    fig.legend(handles=[Patch(facecolor=c, edgecolor="black", linewidth=0.3, label=k)
                        for k, c in COLOURS.items()],
               loc="outside lower center", ncols=len(COLOURS) // 2, fontsize=7, frameon=False)
    return fig


#: the traces the report draws one step of: file name -> (title, the train command's options)
STEP_TRACES = {
    "trace_sync_x2.json": ("threads/sync[numba] ×2", ["--strategy", "sync", "--threads", "2"]),
    "trace_mpi_x2.json": ("mpi/sync[numba] ×2 (2 ranks, one host)",
                          ["--strategy", "mpi", "--ranks", "2"]),
}


def make_step_traces(out_dir="results", batches: int = 12, batch_size: int = 32,
                     data_dir: str | None = None) -> list[Path]:
    """Train ``cifar_tutorial`` on CIFAR-10 for ``batches`` steps of ``batch_size`` with
    each of :data:`STEP_TRACES` (the default backend, as the study runs it) and write each
    fit's trace (``fit(trace=...)`` through ``python -m cnn train --trace``, a fresh
    interpreter per path, mpiexec for the ranks) into ``out_dir``, so the report draws a
    step without training. Returns the files written."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for name, (_, options) in STEP_TRACES.items():
        cmd = [sys.executable, "-m", "cnn", "train", "--dataset", "cifar10", "--model",
               "cifar_tutorial", "--limit", str(batches * batch_size), "--test-limit", "64",
               "--epochs", "1", "--batch-size", str(batch_size), "--seed", "0", "--quiet",
               "--trace", str(out / name), *options]
        if data_dir:
            cmd += ["--data-dir", str(data_dir)]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed ({done.returncode}):\n"
                               f"{done.stdout[-2000:]}\n{done.stderr[-2000:]}")
        written.append(out / name)
    return written


def step_figures(trace_dir) -> list[tuple[str, object]]:
    """``[(title, figure)]``: a typical step of each trace of :data:`STEP_TRACES` found in
    ``trace_dir`` (none when it holds none)."""
    found = []
    for name, (title, _) in STEP_TRACES.items():
        path = Path(trace_dir) / name
        if path.is_file():
            data = load_trace(path)
            step = typical_step(data)
            found.append((title, draw_step(data, step, f"{title}: step {step}, cifar_tutorial")))
    return found


if __name__ == "__main__":
    print("\n".join(str(p) for p in make_step_traces(*sys.argv[1:2])))
