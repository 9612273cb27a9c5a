"""Timelines of training: Chrome trace events, the JSON that Perfetto (ui.perfetto.dev) and
``chrome://tracing`` open (``fit(trace="trace.json")``, ``python -m cnn train --trace ...``).

What a trace holds
------------------
One *lane* (a track: ``pid``/``tid`` in the JSON, each named by a metadata event) per worker:
the fit loop's thread (worker 0 of the thread strategies and of ``processes``), every worker
thread, every worker process of ``processes`` and every MPI rank (one ``pid`` per process or
rank: a worker process's is its worker number), the prefetching
thread, and on MPI ranks with ``overlap`` a lane of the per-bucket allreduces. In each lane,
*spans* (complete events, ``"ph": "X"``, ``ts`` and ``dur`` in microseconds):

- ``step``: one global step as this worker saw it (``args``: epoch, global step); inside it
  ``data wait`` (the fit loop waiting for the prefetched batch), ``forward <op>`` and
  ``backward <op>`` per op of the model's plan (:mod:`cnn.plan`: a layer, or a run of layers
  the backend fuses), ``loss``, ``contribute`` (gradients into the worker's flat slot),
  ``reduce`` (the combine of the shard gradients: shared-memory slots or an allreduce, with its
  ``barrier`` inside), ``update`` (the optimizer), ``barrier`` (a wait for the other workers),
  ``data release`` (the fit loop handing the batch back to the prefetcher, which may take the
  GIL), and ``batch to shared memory`` (``processes``: a batch the fit loop did not gather
  there itself, copied in);
- ``gather`` on the prefetching thread's lane: the batch the training thread will take next;
- ``allreduce bucket k`` on the bucket lane: from the non-blocking allreduce's start to the
  moment the rank saw it complete (MPI ``overlap``).

Spans of one lane nest (a span lies inside its parent or after it, never across its end).
They time the host: on the CUDA backend, whose kernels run asynchronously, an op's span is its
launch, and the device's time shows where the host waits for it (reading the loss back).

Clocks
------
Every timestamp is ``time.perf_counter_ns()``: ``CLOCK_MONOTONIC`` on Linux, one clock for
every process of a machine, so threads and worker processes share it as they are. MPI ranks
may run on several machines: before merging, rank 0 estimates each rank's clock offset to its
own (:func:`clock_offsets`: Cristian's algorithm, a clock reading asked for and answered over
MPI, the offset known to within half the shortest round trip of 16: tens of microseconds on
one machine, about a network latency across machines). The ranks' events, shifted by their
offsets, are gathered to rank 0 and written as one file; the offsets and their error bounds
are in ``otherData``.

Cost
----
Off (the default) nothing is recorded and nothing is wrapped: the loops test one attribute
(``ctx.trace``, a lane or None) once per pass or phase, never per op. On, a span is a
``perf_counter_ns`` call and a tuple appended to a list (about a microsecond with the op's
wrapper); the events stay in memory until the fit ends.
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any, Sequence

now = time.perf_counter_ns

#: lane numbers (``tid``) besides the workers' ``0 .. n-1``
PREFETCH_TID = 1000
BUCKETS_TID = 1001


class Lane:
    """One track of the timeline (a thread of a process): the spans recorded on it, as
    ``(name, category, start_ns, end_ns, args)``. Only the thread that owns the lane appends
    to it.

    Spans inside a step are *chained*: one starts where the lane's last boundary was (the end
    of the span before it, or the start of its parent, :meth:`begin`), so the Python between
    two traced calls is charged to the call after it, and a step's spans tile it with no
    gaps but what follows its last span. A parent that holds spans records its own start
    (``start = lane.cursor`` before them) and passes it to :meth:`span`.
    """

    __slots__ = ("tid", "name", "spans", "cursor", "_ops")

    def __init__(self, tid: int, name: str):
        self.tid, self.name = tid, name
        self.spans: list[tuple] = []
        self.cursor = now()  # the lane's last boundary (ns)
        self._ops: dict[int, tuple] = {}

    def begin(self, start: int | None = None) -> int:
        """Mark the start of a parent span (a step): now, or ``start`` (ns). Returns it."""
        self.cursor = now() if start is None else start
        return self.cursor

    def span(self, name: str, start: int | None = None, end: int | None = None,
             cat: str = "step", args: dict | None = None) -> int:
        """Record ``name`` from ``start`` (ns; None: the lane's last boundary) to ``end``
        (None: now), which becomes the last boundary. Returns ``end``."""
        end = now() if end is None else end
        self.spans.append((name, cat, self.cursor if start is None else start, end, args))
        self.cursor = end
        return end

    def interval(self, name: str, start: int, end: int, cat: str) -> None:
        """Record a span measured elsewhere (another thread's work, an asynchronous
        collective), leaving the chain of the lane's own spans alone."""
        self.spans.append((name, cat, start, end, None))

    def ops(self, plan: tuple) -> tuple:
        """The ops of ``plan`` (:mod:`cnn.plan`) wrapped to record their forward and backward
        on this lane (:class:`TracedOp`); built once per plan."""
        traced = self._ops.get(id(plan))
        if traced is None or traced[0] is not plan:
            traced = self._ops[id(plan)] = (plan, tuple(TracedOp(op, self) for op in plan))
        return traced[1]


class TracedOp:
    """An op of a plan whose ``forward`` and ``backward`` are recorded as spans
    (``forward conv2d+maxpool2d``: the names of the layers it runs)."""

    __slots__ = ("op", "layers", "lane", "_fwd", "_bwd")

    def __init__(self, op, lane: Lane):
        self.op, self.layers, self.lane = op, op.layers, lane
        label = "+".join(layer.name for layer in op.layers)
        self._fwd, self._bwd = f"forward {label}", f"backward {label}"

    def forward(self, params, x, ctx):
        out = self.op.forward(params, x, ctx)
        self.lane.span(self._fwd, cat="forward")
        return out

    def backward(self, params, dout, cache, ctx, need_dx):
        out = self.op.backward(params, dout, cache, ctx, need_dx)
        self.lane.span(self._bwd, cat="backward")
        return out


class Tracer:
    """The trace of one process: its lanes, the events absorbed from other processes (worker
    processes, MPI ranks), and the JSON writer.

    Args:
        path: where :meth:`write` puts the trace (``.json``).
        pid: this process's number in the trace (MPI: the rank; worker process ``i``:
            ``i + 1``; the fit's process: 0).
        name: this process's name in the trace.
    """

    def __init__(self, path: "str | os.PathLike | None" = None, pid: int = 0,
                 name: str = "fit (main process)"):
        self.path = None if path is None else Path(path)
        self.pid, self.process_name = pid, name
        self.lanes: dict[int, Lane] = {}
        self.absorbed: list[dict] = []  # events of other processes, already shifted
        self.clock: dict[str, Any] = {"clock": "time.perf_counter_ns (CLOCK_MONOTONIC)"}

    def lane(self, tid: int, name: str | None = None) -> Lane:
        """The lane ``tid`` of this process (made on first use, named ``name``)."""
        lane = self.lanes.get(tid)
        if lane is None:
            lane = self.lanes[tid] = Lane(tid, name or f"thread {tid}")
        return lane

    def set_process(self, pid: int, name: str) -> None:
        self.pid, self.process_name = pid, name

    def events(self, offset_ns: int = 0) -> list[dict]:
        """This process's lanes as Chrome trace events (``ts`` in ns until :meth:`write`
        converts them), shifted by ``-offset_ns`` (onto another process's clock), then the
        events absorbed from other processes."""
        out: list[dict] = [{"name": "process_name", "ph": "M", "pid": self.pid, "tid": 0,
                            "args": {"name": self.process_name}},
                           {"name": "process_sort_index", "ph": "M", "pid": self.pid, "tid": 0,
                            "args": {"sort_index": self.pid}}]
        for lane in self.lanes.values():
            out.append({"name": "thread_name", "ph": "M", "pid": self.pid, "tid": lane.tid,
                        "args": {"name": lane.name}})
            out.append({"name": "thread_sort_index", "ph": "M", "pid": self.pid,
                        "tid": lane.tid, "args": {"sort_index": lane.tid}})
            for name, cat, start, end, args in lane.spans:
                event = {"name": name, "cat": cat, "ph": "X", "pid": self.pid, "tid": lane.tid,
                         "ts": start - offset_ns, "dur": end - start}
                if args:
                    event["args"] = args
                out.append(event)
        return out + self.absorbed

    def absorb(self, events: Sequence[dict], offset_ns: int = 0) -> None:
        """Add another process's :meth:`events`, shifted by ``-offset_ns`` (its clock's
        offset to this one's)."""
        for event in events:
            if "ts" in event:
                event = {**event, "ts": event["ts"] - offset_ns}
            self.absorbed.append(event)

    def to_json(self) -> dict:
        """The trace as Chrome's JSON object format: ``ts``/``dur`` in microseconds from the
        first span (``otherData`` holds the clock, the offsets and the origin in ns)."""
        events = self.events()
        stamped = [e["ts"] for e in events if "ts" in e]
        origin = min(stamped) if stamped else 0
        for e in events:
            if "ts" in e:
                e["ts"] = (e["ts"] - origin) / 1000
                e["dur"] = e["dur"] / 1000
        return {"traceEvents": events, "displayTimeUnit": "ms",
                "otherData": {**self.clock, "origin_ns": origin}}

    def write(self, path: "str | os.PathLike | None" = None) -> Path:
        """Write :meth:`to_json` to ``path`` (default the tracer's) atomically."""
        from .files import atomic_write
        target = Path(path or self.path)
        return atomic_write(target, json.dumps(self.to_json()))


def clock_offsets(comm, rounds: int = 16) -> tuple[list[int], list[int]]:
    """Every rank's clock minus rank 0's, in ns, and a bound on each estimate's error: a
    collective of the ranks of ``comm``.

    Cristian's algorithm, ``rounds`` times per rank: rank 0 reads its clock (``t0``), sends a
    message to the rank, which answers with its own reading ``tr``; rank 0 reads ``t1`` when
    the answer arrives. The rank's reading fell between ``t0`` and ``t1`` on rank 0's clock,
    so ``tr - (t0 + t1) / 2`` is its offset to within half the round trip; the round with the
    shortest round trip is kept (a busy machine delays some rounds, not all). Returns
    ``(offsets, errors)``, ``errors`` the half round trips (rank 0: 0, 0)."""
    import numpy as np
    rank, size = comm.Get_rank(), comm.Get_size()
    found = np.zeros((2, size), np.int64)  # offsets, errors
    buf = np.zeros(1, np.int64)
    for other in range(1, size):
        if rank == 0:
            best = None
            for _ in range(rounds):
                t0 = now()
                comm.Send(buf, dest=other, tag=7)
                comm.Recv(buf, source=other, tag=7)
                t1 = now()
                if best is None or t1 - t0 < best[0]:
                    best = (t1 - t0, int(buf[0]) - (t0 + t1) // 2)
            found[:, other] = best[1], best[0] // 2
        elif rank == other:
            for _ in range(rounds):
                comm.Recv(buf, source=0, tag=7)
                buf[0] = now()
                comm.Send(buf, dest=0, tag=7)
    comm.Bcast(found, root=0)
    return [int(v) for v in found[0]], [int(v) for v in found[1]]


def as_tracer(trace) -> "Tracer | None":
    """``fit``'s ``trace`` argument as a :class:`Tracer` (None: off; a path: a new tracer
    that writes there; a Tracer: itself), its lane 0 named for the fit loop's thread."""
    if trace is None:
        return None
    if isinstance(trace, (str, os.PathLike)):
        trace = Tracer(trace)
    elif not isinstance(trace, Tracer):
        raise TypeError(f"trace must be a path to a .json file or a cnn.trace.Tracer. "
                        f"Received {type(trace).__name__}")
    trace.lane(0, "worker 0 (fit loop)")
    return trace
