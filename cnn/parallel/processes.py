"""Worker processes over shared memory: ``strategy="processes"``, the ``sync`` algorithm
without the GIL and without MPI.

``threads`` worker processes are started once per fit (by :meth:`SyncProcesses.start`) and
live until :meth:`~SyncProcesses.close`. The weights, the optimizer state, one gradient slot
per worker, the combined gradient, the global batch and the per-worker results live in
:mod:`multiprocessing.shared_memory` segments that the main process creates and every worker
maps, so nothing is pickled per step but a three-item command. Each step:

1. the fit loop gathers the global batch straight into one of the two slots of the shared
   batch segment (:meth:`SyncProcesses.batch_buffers`; a prefetching thread fills the other
   slot with the next batch while the workers train), and the main process sends every worker
   ``("step", N, step, ..., slot)`` through its pipe (a batch from elsewhere is copied in);
2. every worker runs :meth:`cnn.parallel.sync.SyncCore.worker_step`, the step written once
   for threads, processes and MPI, with the shared-memory transport
   (:class:`~cnn.parallel.transport.SharedSlots` over a
   :class:`~cnn.parallel.spin.SharedSpinBarrier`, whose count lives in the shared segment): compute
   its shard's gradient on the shared weights, write ``(n_i / N) g_i`` into its slot, pass the
   barrier, add the slots in fixed order over its own ``1/P`` of the parameters and update that
   range of the shared weights and optimizer state in place, pass the barrier again (worker 0
   also copies the step's new buffer values, batch norm's running statistics, into the shared
   buffers);
3. each worker writes its loss, correct count and communication seconds into its row of the
   shared results and answers ``"ok"``; the main process sums the rows in worker order.

In a traced fit (:mod:`cnn.trace`) each worker records its own timeline (a process of its own
in the trace, ``pid`` = worker + 1) and sends it to the main process when the fit asks
(:meth:`SyncProcesses.merge_trace`); every process reads the same monotonic clock.

The main process computes nothing itself: it waits on the workers' pipes and on their process
sentinels together, so a worker that raises or dies is noticed at once. A worker that raises
aborts the barrier (releasing the others), sends its exception and traceback, and the main
process re-raises it with a note naming the worker; a worker that dies (``kill -9``) ends the
fit with a ``RuntimeError`` naming the worker, its pid and the signal. The main process never
touches the barrier itself: the workers still running are killed, at once after a death (the
others would wait for it in the barrier for ever) and after :data:`GRACE` seconds after an
exception (time for them to report). Either way the fit stops, every worker is
stopped, and every shared segment is unlinked (also when the main process is interrupted; if
the main process itself is killed, Python's resource tracker unlinks them when the last worker
has gone). Workers ignore SIGINT: Ctrl-C in a terminal reaches the whole process group, and
the main process decides (it stops the fit at a step boundary).

Workers are started with the ``forkserver`` method by default (a clean process that has
imported the package, forked per worker: safe when the parent runs threads, unlike ``fork``,
and much faster than ``spawn``); ``start_method`` picks another. Each worker pins BLAS to one
thread.
"""
from __future__ import annotations

import os
import pickle
import signal
import threading
import time
import traceback
import uuid
import weakref
from contextlib import contextmanager
from multiprocessing import connection, get_context, shared_memory
from typing import Any

import numpy as np

from ..checks import check_choice, check_int, check_positive
from .base import Strategy, state_arrays, state_with_arrays, step_scalars
from .spin import STATE_SIZE, SharedSpinBarrier, default_spin, warm_up as warm_up_spin
from .sync import SyncCore
from .transport import FlatLayout, SharedReduce, SharedSlots

START_METHODS = ("forkserver", "spawn", "fork")
#: seconds the other workers get to report after one raised, before they are killed
GRACE = 2.0
#: the prefix of every shared-memory segment this strategy creates (``/dev/shm/<name>``)
SEGMENT_PREFIX = "pcnn_"
_ALIGN = 64


class _Plan:
    """Byte offsets of the regions of the main shared segment (the same in every process)."""

    def __init__(self, layout: FlatLayout, state_sizes: list[int], workers: int,
                 reduce_bytes: int, n_buffers: int = 0):
        self.total, self.dtype = layout.total, layout.dtype
        nbytes = layout.nbytes
        self.state_sizes = list(state_sizes)
        self.n_state = sum(self.state_sizes)
        self.n_buffers = n_buffers  # values of the model's buffers (batch-norm statistics)
        self.regions: dict[str, tuple[int, int]] = {}
        off = 0
        for name, size in [("barrier", 8 * STATE_SIZE),
                           ("params", nbytes), ("state", self.n_state * self.dtype.itemsize),
                           ("slots", nbytes * workers), ("gsum", nbytes),
                           ("results", 8 * 4 * workers), ("reduce", 2 * workers * reduce_bytes),
                           ("buffers", n_buffers * self.dtype.itemsize)]:
            self.regions[name] = (off, size)
            off += -(-size // _ALIGN) * _ALIGN
        self.size = max(off, 1)
        self.workers, self.reduce_bytes = workers, reduce_bytes

    def state_rows(self, flat: np.ndarray) -> list[np.ndarray]:
        """The optimizer state's arrays as consecutive 1-D views of the state region."""
        rows, off = [], 0
        for size in self.state_sizes:
            rows.append(flat[off:off + size])
            off += size
        return rows

    def views(self, buf) -> dict[str, Any]:
        def region(name, dtype, shape):
            off, size = self.regions[name]
            return np.ndarray(shape, dtype=dtype, buffer=buf, offset=off)
        t, w = self.total, self.workers
        return {"barrier": region("barrier", np.int64, (STATE_SIZE,)),
                "params": region("params", self.dtype, (t,)),
                "state": region("state", self.dtype, (self.n_state,)),
                "slots": region("slots", self.dtype, (w, t)),
                "gsum": region("gsum", self.dtype, (t,)),
                "results": region("results", np.float64, (w, 4)),
                "reduce": region("reduce", np.uint8, (2, w, self.reduce_bytes)),
                "buffers": region("buffers", self.dtype, (self.n_buffers,))}


def _buffer_layout(buffers: dict) -> FlatLayout | None:
    """Where the model's buffers sit in the shared ``buffers`` region (None: it has none)."""
    return FlatLayout(buffers) if buffers else None


#: batches in the batch segment: the fit loop gathers the next into one while the workers
#: train on the other
BATCH_SLOTS = 2


def _slot_bytes(capacity: int, input_shape, dtype) -> int:
    x = capacity * int(np.prod(input_shape)) * np.dtype(dtype).itemsize
    return -(-x // _ALIGN) * _ALIGN + -(-8 * capacity // _ALIGN) * _ALIGN


def _batch_views(buf, capacity: int, input_shape, dtype) -> list[tuple[np.ndarray, np.ndarray]]:
    """The :data:`BATCH_SLOTS` ``(x (capacity, *input_shape), y (capacity,) int64)`` batches of
    the batch segment ``buf``."""
    size, views = _slot_bytes(capacity, input_shape, dtype), []
    for k in range(BATCH_SLOTS):
        x = np.ndarray((capacity, *input_shape), dtype=dtype, buffer=buf, offset=k * size)
        y = np.ndarray((capacity,), dtype=np.int64, buffer=buf,
                       offset=k * size + -(-x.nbytes // _ALIGN) * _ALIGN)
        views.append((x, y))
    return views


def _batch_bytes(capacity: int, input_shape, dtype) -> int:
    return BATCH_SLOTS * _slot_bytes(capacity, input_shape, dtype)


@contextmanager
def _ctrl_c_after_the_step():
    """Hold a first Ctrl-C (SIGINT) until the step is whole; yields a function that says
    whether one came. The workers ignore SIGINT and finish their step; a KeyboardInterrupt
    raised in the main process at an arbitrary point of the step (between the sends, or after
    the workers answered but before the step was counted) would leave the weights of one step
    and the counter of another. A second Ctrl-C interrupts at once (a worker that hangs).
    Off the main thread, where Python delivers no SIGINT, nothing is held."""
    if threading.current_thread() is not threading.main_thread():
        yield lambda: False
        return
    came = []

    def hold(signum, frame):
        came.append(signum)
        if len(came) > 1:
            raise KeyboardInterrupt

    previous = signal.signal(signal.SIGINT, hold)
    try:
        yield lambda: bool(came)
    finally:
        signal.signal(signal.SIGINT, previous)


def _describe_exit(code: int | None) -> str:
    if code is None:
        return "is still running"
    if code < 0:
        try:
            return f"was killed by signal {-code} ({signal.Signals(-code).name})"
        except ValueError:
            return f"was killed by signal {-code}"
    return f"exited with code {code}"


class WorkerError(RuntimeError):
    """A worker process died, or raised an exception that cannot be re-raised as it was."""


# ---- the worker process ------------------------------------------------------------------------
def _next_command(conn, spin: float):
    """The next message from the main process, polled for up to ``spin`` seconds before a
    blocking read: the next step's command comes a fraction of a millisecond after a worker
    answered, and a worker woken from a blocking read starts it a wake-up later. ``spin`` is
    :func:`~.spin.default_spin`: zero where the workers outnumber the cores. Each poll yields
    the CPU: the main process, which collects the answers and gathers the next batch
    meanwhile, runs at once where it shares a core with a polling worker."""
    deadline = time.perf_counter() + spin
    while time.perf_counter() < deadline:
        if conn.poll():
            break
        os.sched_yield()
    return conn.recv()


def _worker_main(i: int, workers: int, conn, spec: dict) -> None:
    """One worker process: attach the segments, then run steps until told to stop."""
    segments: list[shared_memory.SharedMemory] = []
    views: dict = {}
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the main process's to handle
    try:
        from threadpoolctl import threadpool_limits
        _limits = threadpool_limits(1, "blas")  # noqa: F841 - held for the worker's life
        from ..context import StepContext, Workspace

        model, optimizer, backend = spec["model"], spec["optimizer"], spec["backend"]
        main = shared_memory.SharedMemory(name=spec["segment"])
        segments.append(main)
        layout = FlatLayout(model.params)
        buf_layout = _buffer_layout(model.buffers)
        plan = _Plan(layout, spec["state_sizes"], workers, spec["reduce_bytes"],
                     buf_layout.total if buf_layout else 0)
        views = plan.views(main.buf)
        warm_up_spin()  # compiled now, not in the first step
        barrier = SharedSpinBarrier(workers, views["barrier"])
        spin = default_spin(workers)
        params = layout.views(views["params"])
        # the buffers every worker reads; worker 0 copies each step's new values into them
        buffers = buf_layout.views(views["buffers"]) if buf_layout else {}
        state_tree = optimizer.init_state(model.params, backend)
        state = state_with_arrays(state_tree, [v.reshape(a.shape) for v, a in zip(
            plan.state_rows(views["state"]), state_arrays(state_tree))])
        core = SyncCore(model, optimizer, backend, params, state)
        reduce = SharedReduce(workers, barrier, views["reduce"])
        transport = SharedSlots(layout, list(views["slots"]), views["gsum"], barrier, reduce,
                                copy_buffers=True)
        tracer = lane = None
        if spec["trace"]:
            from ..trace import Tracer
            tracer = Tracer(pid=i + 1, name=f"worker process {i} (pid {os.getpid()})")
            lane = transport.lanes[i] = tracer.lane(0, f"worker process {i}")
        ctx = StepContext(training=True, workspace=Workspace(backend), seed=spec["seed"],
                          buffers=buffers, trace=lane)
        if getattr(backend, "jit", False):  # compile now, not in the first timed step
            model.loss_and_grads(np.zeros((2, *model.input_shape), model.dtype),
                                 np.zeros(2, np.int64), params, backend,
                                 StepContext(training=True, seed=spec["seed"], buffers=buffers))
        batch_name, xs = None, None
        conn.send(("ready", i, os.getpid()))
        while True:
            msg = _next_command(conn, spin)
            if msg[0] == "stop":
                break
            if msg[0] == "trace":
                conn.send(("trace", tracer.events() if tracer is not None else []))
                continue
            start = None if lane is None else lane.begin()
            _, n, step, name, capacity, lr, t, k = msg
            if name != batch_name:  # the main process grew the batch segment
                xs = None
                if len(segments) > 1:
                    segments.pop().close()
                seg = shared_memory.SharedMemory(name=name)
                segments.append(seg)
                xs = _batch_views(seg.buf, capacity, model.input_shape, model.dtype)
                batch_name = name
            ctx.step = step
            loss, correct, comm, _ = core.worker_step(i, workers, xs[k][0][:n], xs[k][1][:n],
                                                      transport, ctx, lr, t)
            views["results"][i, :3] = loss, correct, comm
            conn.send(("ok",))
            if lane is not None:
                lane.span("report", cat="data")
                lane.span("step", start, args={"step": step + 1})
    except BaseException as err:  # noqa: BLE001 - reported to the main process
        try:
            barrier.abort()  # release the workers waiting for this one
        except Exception:
            pass
        try:
            payload = pickle.dumps(err)
        except Exception:
            payload = None
        try:
            conn.send(("error", i, payload, type(err).__name__, str(err),
                       "".join(traceback.format_exception(err))))
        except Exception:
            pass
    finally:
        views = xs = params = state = core = transport = reduce = ctx = buffers = None  # noqa: F841
        for seg in segments:
            try:
                seg.close()
            except Exception:
                pass


# ---- the strategy ---------------------------------------------------------------------------------
def _release(processes, conns, segments) -> None:
    """Stop the workers and unlink the segments (also run by a finalizer if close() was not)."""
    for c in conns:
        try:
            c.send(("stop",))
        except Exception:
            pass
    deadline = time.monotonic() + 5
    for p in processes:
        p.join(max(0.0, deadline - time.monotonic()))
    for p in processes:
        if p.is_alive():
            p.kill()
            p.join(5)
    for c in conns:
        try:
            c.close()
        except Exception:
            pass
    for seg in segments:
        try:
            seg.unlink()
        except FileNotFoundError:
            pass
        try:
            seg.close()
        except BufferError:
            pass  # a view is still alive somewhere: the mapping goes with the process


class SyncProcesses(Strategy):
    """``sync`` over worker processes and shared memory. See the module docstring.

    Args:
        threads: worker processes.
        start_method: ``"forkserver"`` (default), ``"spawn"`` or ``"fork"``.
        reduce_bytes: bytes per worker for the cross-shard ``reduce`` of synchronised layers.
        start_timeout: seconds to wait for the workers to start (import, attach, compile).
    """

    name = "processes"

    def __init__(self, threads: int = 1, start_method: str = "forkserver",
                 reduce_bytes: int = 1 << 16, start_timeout: float = 120.0):
        super().__init__(threads)
        self.start_method = check_choice(None, "start_method", start_method, START_METHODS)
        self.reduce_bytes = check_int(None, "reduce_bytes", reduce_bytes, low=0)
        self.start_timeout = check_positive(None, "start_timeout", start_timeout)
        self._batch_hint = 1
        self._processes: list = []
        self._lane = None  # the fit loop's lane in a traced fit
        self._conns: list = []
        self._segments: list[shared_memory.SharedMemory] = []
        self._failed: str | None = None
        self._finalizer = None

    #: the fit loop's thread only waits for the workers during a step: it has time to gather
    #: the next batch (``fit(prefetch="auto")``)
    waits_during_steps = True

    def check_batch_size(self, batch_size: int) -> None:
        if batch_size < self.threads:
            raise ValueError(f"strategy 'processes' splits each batch of batch_size={batch_size} "
                             f"examples into threads={self.threads} shards; every shard needs "
                             "at least one example, so use batch_size >= threads")
        self._batch_hint = batch_size

    def describe(self) -> dict:
        return {**super().describe(), "workers": self.threads}

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self._processes]

    @property
    def segment_names(self) -> list[str]:
        return [s.name for s in self._segments]

    # ---- start ----------------------------------------------------------------------------------
    def _new_segment(self, size: int) -> shared_memory.SharedMemory:
        seg = shared_memory.SharedMemory(
            name=f"{SEGMENT_PREFIX}{os.getpid()}_{uuid.uuid4().hex[:12]}", create=True,
            size=max(size, 1))
        self._segments.append(seg)
        return seg

    def start(self, model, optimizer, backend, params, seed=0, **kwargs) -> None:
        if getattr(backend, "on_device", False):
            raise ValueError(f"strategy 'processes' runs CPU worker processes; backend "
                             f"{backend.name!r} keeps the weights on a device. Use a CPU "
                             "backend (numpy, numba)")
        super().start(model, optimizer, backend, params, seed, **kwargs)
        try:
            self._start(model, optimizer, backend, seed)
        except BaseException:
            self.close()
            raise

    def _start(self, model, optimizer, backend, seed) -> None:
        w = self.threads
        self._layout = FlatLayout(self.params)
        leaves = state_arrays(self.state)
        for a in leaves:
            if a.dtype != self._layout.dtype:
                raise ValueError(f"strategy 'processes' keeps the optimizer state in shared "
                                 f"memory in the parameters' dtype {self._layout.dtype}; the "
                                 f"optimizer's state has an array of dtype {a.dtype}")
        state_sizes = [a.size for a in leaves]
        self._buf_layout = _buffer_layout(self.buffers)
        self._plan = _Plan(self._layout, state_sizes, w, self.reduce_bytes,
                           self._buf_layout.total if self._buf_layout else 0)
        main = self._new_segment(self._plan.size)
        self._views = self._plan.views(main.buf)
        self._layout.pack(self.params, self._views["params"])
        if self._buf_layout:
            self._buf_layout.pack(self.buffers, self._views["buffers"])
        for row, a in zip(self._plan.state_rows(self._views["state"]), leaves):
            row[...] = a.reshape(-1)
        self._grow_batch(self._batch_hint)
        ctx = get_context(self.start_method)
        if self.start_method == "forkserver":
            ctx.set_forkserver_preload(["cnn.parallel.processes", "cnn.model"])
        spec = {"model": model, "optimizer": optimizer, "backend": backend, "seed": seed,
                "segment": main.name, "state_sizes": state_sizes,
                "reduce_bytes": self.reduce_bytes, "trace": self.tracer is not None}
        self._lane = None if self.tracer is None else self.tracer.lane(0)
        for i in range(w):
            parent, child = ctx.Pipe()
            p = ctx.Process(target=_worker_main, args=(i, w, child, spec),
                            name=f"cnn-processes-worker-{i}", daemon=True)
            p.start()
            child.close()
            self._processes.append(p)
            self._conns.append(parent)
        # the live lists: a batch segment made later (a larger batch) is released too
        self._finalizer = weakref.finalize(self, _release, self._processes, self._conns,
                                           self._segments)
        self._collect("ready", timeout=self.start_timeout)

    def batch_buffers(self, rows, x_dtype, y_dtype):
        """The batch segment's slots, where the workers read a batch in place (no copy per
        step); None for labels that are not int64 (they are copied, converted, per step)."""
        self._check_usable()
        if np.dtype(x_dtype) != self.model.dtype or np.dtype(y_dtype) != np.int64:
            return None
        if rows > self._capacity:
            self._grow_batch(rows)
        return list(self._xs)

    def _slot_of(self, xb, yb) -> int | None:
        """The slot of the batch segment that ``xb, yb`` are the first rows of, or None."""
        if not (isinstance(xb, np.ndarray) and isinstance(yb, np.ndarray)):
            return None
        for k, (xs, ys) in enumerate(self._xs):
            if xb.ctypes.data == xs.ctypes.data and yb.ctypes.data == ys.ctypes.data:
                return k
        return None

    def _grow_batch(self, capacity: int) -> None:
        old = getattr(self, "_batch_seg", None)
        shape, dtype = self.model.input_shape, self.model.dtype
        seg = self._new_segment(_batch_bytes(capacity, shape, dtype))
        self._xs = _batch_views(seg.buf, capacity, shape, dtype)
        self._batch_seg, self._capacity = seg, capacity
        if old is not None:  # the workers re-attach by the new name at the next step
            self._segments.remove(old)
            old.unlink()
            try:
                old.close()
            except BufferError:
                pass

    # ---- the step --------------------------------------------------------------------------------
    def _check_usable(self) -> None:
        if self._failed:
            raise RuntimeError(f"strategy 'processes' stopped after an earlier failure: "
                               f"{self._failed}")
        if not self._processes:
            raise RuntimeError("strategy 'processes' is not started (call start() first)")

    def step(self, xb, yb):
        self._check_usable()
        with _ctrl_c_after_the_step() as ctrl_c:
            n = len(yb)
            k = self._slot_of(xb, yb)
            if k is None:  # a batch from elsewhere: copied into the shared segment
                if n > self._capacity:
                    self._grow_batch(n)
                k = 0
                self._xs[k][0][:n] = xb
                self._xs[k][1][:n] = yb
                if self._lane is not None:
                    self._lane.span("batch to shared memory", cat="data")
            lr, t = step_scalars(self.optimizer, self.state, self.steps)
            msg = ("step", n, self.steps, self._batch_seg.name, self._capacity, lr, t, k)
            for c in self._conns:
                try:
                    c.send(msg)
                except OSError:
                    pass  # a worker that died: _collect finds its sentinel and names it
            self._collect("ok")
            if self._lane is not None:
                self._lane.span("wait for workers", cat="barrier")
            res = self._views["results"]
            self.steps += 1
            self.comm_time += float(res[0, 2])  # as seen by worker 0
        if ctrl_c():  # after the step the workers finished: the weights are a whole step's
            raise KeyboardInterrupt
        return float(res[:, 0].sum()), int(round(float(res[:, 1].sum())))

    def merge_trace(self, tracer) -> None:
        """Every worker's timeline (asked for through its pipe) into ``tracer``."""
        self._check_usable()
        for c in self._conns:
            c.send(("trace",))
        answers = self._collect("trace")
        for msg in answers.values():
            tracer.absorb(msg[1])

    def _collect(self, expected: str, timeout: float | None = None) -> dict:
        """Wait for every worker's answer (``expected``), watching their sentinels; on any
        failure, release the others and raise the first primary error. Returns the answers,
        by worker."""
        pending = dict(enumerate(self._conns))
        answers = {}
        failures: list[tuple[int, bool, BaseException]] = []  # (worker, primary, error)
        deadline = None if timeout is None else time.monotonic() + timeout
        while pending:
            waitables = list(pending.values()) + [self._processes[i].sentinel for i in pending]
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            ready = connection.wait(waitables, left)
            if not ready:
                if not failures:
                    late = sorted(pending)[0]
                    failures.append((late, True, WorkerError(
                        f"worker process {late} of {self.threads} (pid "
                        f"{self._processes[late].pid}) did not answer within {timeout:.0f} s")))
                self._kill_pending(pending, failures)
                break
            for i in list(pending):
                if i not in pending:  # killed after another worker failed
                    continue
                conn, proc = pending[i], self._processes[i]
                if conn in ready or (proc.sentinel in ready and conn.poll()):
                    try:
                        msg = conn.recv()
                    except (EOFError, OSError):
                        msg = None
                    if msg is not None and msg[0] == expected:
                        answers[i] = msg
                        del pending[i]
                        continue
                    if msg is not None and msg[0] == "error":
                        failures.append(self._worker_exception(msg))
                        del pending[i]
                        # the others report soon (the failing worker aborted the barrier) or
                        # are stuck: they get GRACE seconds, then they are killed
                        grace = time.monotonic() + GRACE
                        deadline = grace if deadline is None else min(deadline, grace)
                        continue
                if proc.sentinel in ready or (conn in ready):
                    proc.join(1)
                    failures.append((i, True, WorkerError(
                        f"worker process {i} of {self.threads} (pid {proc.pid}) "
                        f"{_describe_exit(proc.exitcode)} during "
                        f"{'start-up' if expected == 'ready' else f'step {self.steps + 1}'}")))
                    del pending[i]
                    # the others wait for it in the barrier: nothing releases them but ending
                    # them
                    self._kill_pending(pending, failures)
        if failures:
            self._fail(failures)
        return answers

    def _worker_exception(self, msg) -> tuple[int, bool, BaseException]:
        _, i, payload, type_name, text, tb = msg
        err = None
        if payload is not None:
            try:
                err = pickle.loads(payload)
            except Exception:
                err = None
        if not isinstance(err, BaseException):
            err = WorkerError(f"{type_name}: {text}")
        primary = not isinstance(err, threading.BrokenBarrierError) and \
            type_name != "BrokenBarrierError"
        pid = self._processes[i].pid
        err.add_note(f"(raised in worker process {i} of {self.threads}, pid {pid})")
        err.add_note(f"worker {i}'s traceback:\n{tb}")
        return i, primary, err

    def _kill_pending(self, pending: dict, failures: list) -> None:
        """Kill the workers that have not answered (after another worker failed), recorded as
        consequences of that failure."""
        for i in sorted(pending):
            proc = self._processes[i]
            if proc.is_alive():
                proc.kill()
            proc.join(5)
            failures.append((i, False, WorkerError(
                f"worker process {i} of {self.threads} (pid {proc.pid}) was stopped after "
                f"another worker failed")))
        pending.clear()

    def _fail(self, failures) -> None:
        primary = sorted([f for f in failures if f[1]], key=lambda f: f[0]) or \
            sorted(failures, key=lambda f: f[0])
        i, _, err = primary[0]
        self._failed = f"worker {i}: {type(err).__name__}: {err}"
        raise err

    # ---- results and the end ------------------------------------------------------------------------
    def current_params(self) -> dict:
        """The fit's parameter arrays, refreshed from the shared weights."""
        if getattr(self, "_views", None) is not None:
            self._layout.unpack(self._views["params"], self.params)
            for row, a in zip(self._plan.state_rows(self._views["state"]),
                              state_arrays(self.state)):
                a.reshape(-1)[...] = row
        return self.params

    def current_buffers(self) -> dict:
        """The fit's buffers, refreshed from the shared ones (worker 0 commits into them)."""
        if getattr(self, "_views", None) is not None and self._buf_layout:
            self._buf_layout.unpack(self._views["buffers"], self.buffers)
        return self.buffers

    def current_state(self):
        """The optimizer state, its slots refreshed from shared memory."""
        self.current_params()
        return self.state

    def close(self) -> None:
        """Stop the workers and unlink every shared segment. Safe to call twice."""
        try:
            self.current_params()
            self.current_buffers()
        except Exception:
            pass
        self._views = self._xs = None
        if self._finalizer is not None:
            self._finalizer()
            self._finalizer = None
        else:
            _release(self._processes, self._conns, self._segments)
        self._processes, self._conns, self._segments = [], [], []
