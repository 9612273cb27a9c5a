"""Worker processes over shared memory: ``strategy="processes"``, the ``sync`` algorithm
without the GIL and without MPI.

The fit's own process is worker 0, and ``threads - 1`` worker processes, started once per fit
(by :meth:`SyncProcesses.start`) and living until :meth:`~SyncProcesses.close`, are workers
``1 .. threads - 1``: every worker trains, as every MPI rank does, and none only coordinates.
The weights, the optimizer state, one gradient slot per worker, the combined gradient, the
global batch, the step's command and the per-worker results live in
:mod:`multiprocessing.shared_memory` segments that the fit's process creates and every worker
maps, so nothing is pickled or sent per step. Each step:

1. the fit loop gathers the global batch straight into one of the two slots of the shared
   batch segment (:meth:`SyncProcesses.batch_buffers`; a batch from elsewhere is copied in),
   writes the step's command (batch size, slot, step number, learning rate) into shared
   memory and rings the workers' doorbell (:class:`~cnn.parallel.spin.SharedDoorbell`: an
   atomic counter the workers poll, spinning, then napping);
2. every worker, the fit's process included, runs
   :meth:`cnn.parallel.sync.SyncCore.worker_step`, the step written once for threads,
   processes and MPI, with the shared-memory transport
   (:class:`~cnn.parallel.transport.SharedSlots` over a
   :class:`~cnn.parallel.spin.SharedSpinBarrier`, whose count lives in the shared segment):
   compute its shard's gradient on the shared weights, write ``(n_i / N) g_i`` into its slot,
   pass the barrier, add the slots in fixed order over its own ``1/P`` of the parameters and
   update that range of the shared weights and optimizer state in place (worker 0 also
   copies the step's new buffer values, batch norm's running statistics, into the shared
   buffers);
3. each worker writes its loss, correct count and communication seconds into its row of the
   shared results and passes the barrier once more; the fit's process then sums the rows in
   worker order.

Why the fit's process trains: where the workers fill the cores, a process that only sends
commands and waits for answers takes a core from a worker at every step (its wake-up lands
on a worker's core), and the workers idle while it prepares the next one. MPI ranks, which
run their own fit loop, pay neither.

In a traced fit (:mod:`cnn.trace`) worker 0's spans are in the fit loop's lane; each worker
process records its own timeline (a process of its own in the trace, ``pid`` = its worker
number) and sends it to the fit's process when the fit asks (:meth:`SyncProcesses.merge_trace`);
every process reads the same monotonic clock.

Failures: a thread of the fit's process waits on the workers' pipes and on their process
sentinels (it holds no GIL while it waits), so a worker that raises or dies is noticed at once.
A worker that raises aborts the barrier (releasing the others, the fit's process among them)
and sends its exception and traceback; the fit's process re-raises it with a note naming the
worker. A worker that dies (``kill -9``) is found by its sentinel: the watcher aborts the
barrier and the fit ends with a :class:`WorkerError` naming the worker, its pid and the signal.
An error in the fit's own pass (worker 0) aborts the barrier too. Either way the fit stops,
the other workers get :data:`GRACE` seconds to report, every worker is stopped, and every
shared segment is unlinked (also when the fit's process is interrupted; if it is killed, its
workers find their pipe closed while they wait for the next step and exit, and Python's
resource tracker unlinks the segments). Workers ignore SIGINT: Ctrl-C in a terminal reaches
the whole process group, and the fit's process decides (it stops the fit at a step boundary).

Workers are started with the ``forkserver`` method by default (a clean process that has
imported the package, forked per worker: safe when the parent runs threads, unlike ``fork``,
and much faster than ``spawn``); ``start_method`` picks another. Each worker pins BLAS to one
thread.
"""
from __future__ import annotations

import os
import pickle
import queue
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
from ..context import StepContext, Workspace
from .base import Strategy, state_arrays, state_with_arrays, step_scalars
from .spin import (STATE_SIZE, SharedDoorbell, SharedSpinBarrier, default_spin,
                   warm_up as warm_up_spin)
from .sync import SyncCore
from .transport import FlatLayout, SharedReduce, SharedSlots

START_METHODS = ("forkserver", "spawn", "fork")
#: seconds the other workers get to report after one raised, before they are killed
GRACE = 2.0
#: the prefix of every shared-memory segment this strategy creates (``/dev/shm/<name>``)
SEGMENT_PREFIX = "pcnn_"
_ALIGN = 64
#: the commands the doorbell announces: train a step; send the timeline
STEP, TRACE = 1, 2
#: the step's command, an int64 row: what to do, batch size, batch slot, global step, the
#: optimizer's 1-based step, the batch segment's capacity, the length of its name
_KIND, _N, _SLOT, _STEP, _T, _CAPACITY, _NAME_LEN = range(7)
_COMMAND_SIZE = 7
#: bytes for the batch segment's name in the command (names are ``pcnn_<pid>_<12 hex>``)
_NAME_BYTES = 64


def _view(buf, dtype, shape, offset: int) -> np.ndarray:
    """An array of ``shape`` over the bytes of the segment buffer ``buf`` from ``offset``.
    Made with :func:`numpy.frombuffer`, which holds the buffer while the array (or any view of
    it) lives: the segment then cannot be unmapped under it (closing it raises
    ``BufferError``), where an array made with ``np.ndarray(buffer=...)`` would be left
    pointing at unmapped memory (a traceback's frames keep such arrays)."""
    dtype = np.dtype(dtype)
    return np.frombuffer(buf, dtype, int(np.prod(shape)), offset).reshape(shape)


#: segments whose mapping outlived :meth:`SyncProcesses.close` because arrays over them were
#: still alive (in the frames of a traceback): kept mapped for the process's life, unlinked
_STILL_VIEWED: list = []


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
        for name, size in [("barrier", 8 * STATE_SIZE), ("doorbell", 8 * STATE_SIZE),
                           ("command", 8 * _COMMAND_SIZE), ("lr", 8), ("name", _NAME_BYTES),
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
            return _view(buf, dtype, shape, self.regions[name][0])
        t, w = self.total, self.workers
        return {"barrier": region("barrier", np.int64, (STATE_SIZE,)),
                "doorbell": region("doorbell", np.int64, (STATE_SIZE,)),
                "command": region("command", np.int64, (_COMMAND_SIZE,)),
                "lr": region("lr", np.float64, (1,)),
                "name": region("name", np.uint8, (_NAME_BYTES,)),
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


#: batches in the batch segment: the fit loop may gather the next into one while the
#: workers train on the other
BATCH_SLOTS = 2


def _slot_bytes(capacity: int, input_shape, dtype) -> int:
    x = capacity * int(np.prod(input_shape)) * np.dtype(dtype).itemsize
    return -(-x // _ALIGN) * _ALIGN + -(-8 * capacity // _ALIGN) * _ALIGN


def _batch_views(buf, capacity: int, input_shape, dtype) -> list[tuple[np.ndarray, np.ndarray]]:
    """The :data:`BATCH_SLOTS` ``(x (capacity, *input_shape), y (capacity,) int64)`` batches of
    the batch segment ``buf``."""
    size, views = _slot_bytes(capacity, input_shape, dtype), []
    for k in range(BATCH_SLOTS):
        x = _view(buf, dtype, (capacity, *input_shape), k * size)
        y = _view(buf, np.int64, (capacity,), k * size + -(-x.nbytes // _ALIGN) * _ALIGN)
        views.append((x, y))
    return views


def _batch_bytes(capacity: int, input_shape, dtype) -> int:
    return BATCH_SLOTS * _slot_bytes(capacity, input_shape, dtype)


@contextmanager
def _ctrl_c_after_the_step():
    """Hold a first Ctrl-C (SIGINT) until the step is whole; yields a function that says
    whether one came. The workers ignore SIGINT and finish their step; a KeyboardInterrupt
    raised in the fit's process at an arbitrary point of the step (in its own pass, or after
    the last barrier but before the step was counted) would leave the weights of one step and
    the counter of another. A second Ctrl-C interrupts at once (a worker that hangs). Off the
    main thread, where Python delivers no SIGINT, nothing is held."""
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


class _Worker:
    """What one worker (the fit's process or a worker process) trains with: views of the main
    segment, the barrier, its :class:`SyncCore` on the shared weights and optimizer state, the
    shared-memory transport and its step context."""

    def __init__(self, i: int, workers: int, buf, model, optimizer, backend, seed: int,
                 state_sizes: list[int], reduce_bytes: int, lane=None):
        self.i, self.workers = i, workers
        layout = FlatLayout(model.params)
        buf_layout = _buffer_layout(model.buffers)
        self.plan = _Plan(layout, state_sizes, workers, reduce_bytes,
                          buf_layout.total if buf_layout else 0)
        self.views = views = self.plan.views(buf)
        warm_up_spin()  # compiled now, not in the first step
        self.barrier = SharedSpinBarrier(workers, views["barrier"])
        params = layout.views(views["params"])
        # the buffers every worker reads; worker 0 copies each step's new values into them
        buffers = buf_layout.views(views["buffers"]) if buf_layout else {}
        state_tree = optimizer.init_state(model.params, backend)
        state = state_with_arrays(state_tree, [v.reshape(a.shape) for v, a in zip(
            self.plan.state_rows(views["state"]), state_arrays(state_tree))])
        self.core = SyncCore(model, optimizer, backend, params, state)
        reduce = SharedReduce(workers, self.barrier, views["reduce"])
        # no barrier in the transport's done(): the step's last barrier comes after each
        # worker wrote its results (it orders the updates before the next pass just as well)
        self.transport = SharedSlots(layout, list(views["slots"]), views["gsum"], self.barrier,
                                     reduce, copy_buffers=True, done_barrier=False)
        if lane is not None:
            self.transport.lanes[i] = lane
        self.ctx = StepContext(training=True, workspace=Workspace(backend), seed=seed,
                               buffers=buffers, trace=lane)
        if getattr(backend, "jit", False):  # compile now, not in the first timed step
            model.loss_and_grads(np.zeros((2, *model.input_shape), model.dtype),
                                 np.zeros(2, np.int64), params, backend,
                                 StepContext(training=True, seed=seed, buffers=buffers))

    def step(self, xb, yb, step: int, lr: float, t: int) -> None:
        """This worker's part of the global step on the batch ``xb, yb``: the sync step, its
        numbers into its row of the results, and the step's last barrier."""
        self.ctx.step = step
        loss, correct, comm, _ = self.core.worker_step(self.i, self.workers, xb, yb,
                                                       self.transport, self.ctx, lr, t)
        self.views["results"][self.i, :3] = loss, correct, comm
        start = time.perf_counter()
        self.barrier.wait()  # every row written, every range updated
        self.views["results"][self.i, 2] += time.perf_counter() - start
        if self.ctx.trace is not None:
            self.ctx.trace.span("barrier", cat="barrier")


# ---- a worker process ------------------------------------------------------------------------
def _parent_gone(conn):
    """A worker's nap while it waits for the doorbell: ``conn.poll`` on its pipe, which the
    fit's process never writes after the start, so a readable pipe means that process closed
    it or died (the worker then ends)."""
    def nap(seconds: float) -> None:
        if conn.poll(seconds):
            raise EOFError("the fit's process closed the pipe")
    return nap


def _worker_main(i: int, workers: int, conn, spec: dict) -> None:
    """Worker process ``i`` (>= 1): attach the segments, then run the commands the doorbell
    announces until the fit's process closes the pipe."""
    segments: list[shared_memory.SharedMemory] = []
    worker = xs = views = doorbell = cmd = None
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the fit's process's to handle
    try:
        from threadpoolctl import threadpool_limits
        _limits = threadpool_limits(1, "blas")  # noqa: F841 - held for the worker's life
        model = spec["model"]
        main = shared_memory.SharedMemory(name=spec["segment"])
        segments.append(main)
        tracer = lane = None
        if spec["trace"]:
            from ..trace import Tracer
            tracer = Tracer(pid=i, name=f"worker process {i} (pid {os.getpid()})")
            lane = tracer.lane(0, f"worker process {i}")
        worker = _Worker(i, workers, main.buf, model, spec["optimizer"], spec["backend"],
                         spec["seed"], spec["state_sizes"], spec["reduce_bytes"], lane)
        views = worker.views
        doorbell = SharedDoorbell(views["doorbell"], workers)
        nap = _parent_gone(conn)
        seen, batch_name = doorbell.rings, None
        conn.send(("ready", i, os.getpid()))
        while True:
            seen = doorbell.wait(seen, nap)
            cmd = views["command"]
            if cmd[_KIND] == TRACE:
                conn.send(("trace", tracer.events() if tracer is not None else []))
                continue
            start = None if lane is None else lane.begin()
            name = bytes(views["name"][:cmd[_NAME_LEN]]).decode()
            if name != batch_name:  # the fit's process grew the batch segment
                xs = None
                if len(segments) > 1:
                    old = segments.pop()
                    try:
                        old.close()
                    except BufferError:  # a workspace still holds rows of the last batch
                        _STILL_VIEWED.append(old)
                seg = shared_memory.SharedMemory(name=name)
                segments.append(seg)
                xs = _batch_views(seg.buf, int(cmd[_CAPACITY]), model.input_shape, model.dtype)
                batch_name = name
            n, k = int(cmd[_N]), int(cmd[_SLOT])
            worker.step(xs[k][0][:n], xs[k][1][:n], int(cmd[_STEP]), float(views["lr"][0]),
                        int(cmd[_T]))
            if lane is not None:
                lane.span("step", start, args={"step": int(cmd[_STEP]) + 1})
    except EOFError:
        pass  # the fit is over (or its process died): nothing to report
    except BaseException as err:  # noqa: BLE001 - reported to the fit's process
        try:
            worker.barrier.abort()  # release the workers waiting for this one
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
        # every view goes before its segment closes (a view would keep it mapped)
        worker = xs = views = doorbell = cmd = None  # noqa: F841
        for seg in segments:
            try:
                seg.close()
            except Exception:
                pass


# ---- watching the worker processes -----------------------------------------------------------
class _Watcher:
    """A thread of the fit's process that waits on the worker processes' pipes and sentinels:
    answers (``ready``, ``trace``) go to :attr:`answers`; a worker's exception or death is
    recorded in :attr:`failures` and aborts the barrier, which releases every worker waiting
    in it, the fit's process included. It holds no GIL while it waits."""

    def __init__(self, processes: list, conns: dict, barrier: SharedSpinBarrier, state):
        self.processes, self.conns, self.barrier = processes, dict(conns), barrier
        self._state = state  # the optimizer state: its step counts the fit's steps
        #: whether every worker answered ``ready`` (a death before is one during start-up)
        self.started = False
        self.answers: queue.Queue = queue.Queue()
        #: (worker, primary, error), in the order they were found
        self.failures: list[tuple[int, bool, BaseException]] = []
        self.failed = threading.Event()
        self._stop_r, self._stop_w = os.pipe()
        self.closing = False
        self._thread = threading.Thread(target=self._run, name="cnn-processes-watcher",
                                        daemon=True)
        self._thread.start()

    def _run(self) -> None:
        sentinels = {self.processes[i - 1].sentinel: i for i in self.conns}
        conns = dict(self.conns)
        while conns or sentinels:
            ready = connection.wait(list(conns.values()) + list(sentinels) + [self._stop_r])
            if self._stop_r in ready:
                return
            for i, conn in list(conns.items()):
                if conn in ready:
                    self._receive(i, conn, conns)
            for s in [s for s in sentinels if s in ready]:
                i = sentinels.pop(s)
                conn = conns.get(i)
                if conn is not None and conn.poll():  # its last words come before its death
                    self._receive(i, conn, conns)
                conns.pop(i, None)
                if self.closing or any(f[0] == i for f in self.failures):
                    continue
                proc = self.processes[i - 1]
                proc.join(1)
                self.fail(i, True, WorkerError(
                    f"worker process {i} of {len(self.processes) + 1} (pid {proc.pid}) "
                    f"{_describe_exit(proc.exitcode)} during "
                    f"{f'step {self._state.step + 1}' if self.started else 'start-up'}"))

    def _receive(self, i: int, conn, conns: dict) -> None:
        try:
            msg = conn.recv()
        except (EOFError, OSError):
            conns.pop(i, None)  # its sentinel tells how it ended
            return
        if msg[0] == "error":
            self.fail(*self._exception(msg))
        else:
            self.answers.put((i, msg))

    def _exception(self, msg) -> tuple[int, bool, BaseException]:
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
        pid = self.processes[i - 1].pid
        err.add_note(f"(raised in worker process {i} of {len(self.processes) + 1}, pid {pid})")
        err.add_note(f"worker {i}'s traceback:\n{tb}")
        return i, primary, err

    def fail(self, i: int, primary: bool, err: BaseException) -> None:
        """Record worker ``i``'s failure and abort the barrier."""
        self.failures.append((i, primary, err))
        self.barrier.abort()  # nobody waits for a worker that will not come
        self.failed.set()
        self.answers.put((i, None))  # wakes a wait for answers

    def primary(self, wait: float) -> tuple[int, bool, BaseException] | None:
        """The failure to raise: the lowest-numbered worker's primary one (waiting up to
        ``wait`` seconds for one), else the first found; None if none was."""
        deadline = time.monotonic() + wait
        while not any(f[1] for f in self.failures) and time.monotonic() < deadline:
            self.failed.wait(0.01)
        found = sorted([f for f in self.failures if f[1]], key=lambda f: f[0]) or \
            sorted(self.failures, key=lambda f: f[0])
        return found[0] if found else None

    def close(self) -> None:
        self.closing = True
        try:
            os.write(self._stop_w, b"x")
        except OSError:
            pass
        self._thread.join(5)
        for fd in (self._stop_r, self._stop_w):
            try:
                os.close(fd)
            except OSError:
                pass


# ---- the strategy ---------------------------------------------------------------------------------
def _release(processes, conns, segments, watcher) -> None:
    """Stop the workers and unlink the segments (also run by a finalizer if close() was not):
    closing a worker's pipe ends it where it waits for the next command."""
    if watcher:
        watcher[0].close()
    for c in conns:
        try:
            c.close()
        except Exception:
            pass
    deadline = time.monotonic() + 5
    for p in processes:
        p.join(max(0.0, deadline - time.monotonic()))
    for p in processes:
        if p.is_alive():
            p.kill()
            p.join(5)
    for seg in segments:
        try:
            seg.unlink()
        except FileNotFoundError:
            pass
        try:
            seg.close()
        except BufferError:
            _STILL_VIEWED.append(seg)  # not unmapped under the arrays that still view it


class SyncProcesses(Strategy):
    """``sync`` over the fit's process and worker processes, on shared memory. See the module
    docstring.

    Args:
        threads: workers: the fit's process and ``threads - 1`` worker processes.
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
        self._conns: list = []
        self._segments: list[shared_memory.SharedMemory] = []
        self._watcher: list[_Watcher] = []  # the live list the finalizer closes
        self._worker: _Worker | None = None
        self._failed: str | None = None
        self._finalizer = None

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
        """The worker processes' pids (workers 1 .. threads - 1; worker 0 is this process)."""
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
        for i in range(1, w):  # started first: they import and compile while this one does
            parent, child = ctx.Pipe()
            p = ctx.Process(target=_worker_main, args=(i, w, child, spec),
                            name=f"cnn-processes-worker-{i}", daemon=True)
            p.start()
            child.close()
            self._processes.append(p)
            self._conns.append(parent)
        # the live lists: a batch segment made later (a larger batch) is released too
        self._finalizer = weakref.finalize(self, _release, self._processes, self._conns,
                                           self._segments, self._watcher)
        lane = None if self.tracer is None else self.tracer.lane(0)
        self._worker = _Worker(0, w, main.buf, model, optimizer, backend, seed, state_sizes,
                               self.reduce_bytes, lane)
        self._doorbell = SharedDoorbell(self._views["doorbell"], w)
        if self._processes:
            self._watcher.append(_Watcher(self._processes, dict(enumerate(self._conns, 1)),
                                          self._worker.barrier, self.state))
            self._answers("ready", self.start_timeout)
            self._watcher[0].started = True

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
        name = seg.name.encode()
        if len(name) > _NAME_BYTES:
            raise RuntimeError(f"shared-memory segment name {seg.name!r} is longer than "
                               f"{_NAME_BYTES} bytes")
        self._views["name"][:len(name)] = np.frombuffer(name, np.uint8)
        self._views["command"][_NAME_LEN] = len(name)
        self._views["command"][_CAPACITY] = capacity
        if old is not None:  # the workers re-attach by the new name at the next step
            self._segments.remove(old)
            old.unlink()
            try:
                old.close()
            except BufferError:
                _STILL_VIEWED.append(old)

    # ---- the step --------------------------------------------------------------------------------
    def _check_usable(self) -> None:
        if self._failed:
            raise RuntimeError(f"strategy 'processes' stopped after an earlier failure: "
                               f"{self._failed}")
        if self._worker is None:
            raise RuntimeError("strategy 'processes' is not started (call start() first)")

    def _ring(self, kind: int) -> None:
        """Announce a command to the worker processes (its fields are written before)."""
        self._views["command"][_KIND] = kind
        self._doorbell.ring()

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
                if self._worker.ctx.trace is not None:
                    self._worker.ctx.trace.span("batch to shared memory", cat="data")
            if self._watcher and self._watcher[0].failed.is_set():  # a worker ended meanwhile
                self._fail_step(threading.BrokenBarrierError())
            lr, t = step_scalars(self.optimizer, self.state, self.steps)
            cmd = self._views["command"]
            cmd[_N], cmd[_SLOT], cmd[_STEP], cmd[_T] = n, k, self.steps, t
            self._views["lr"][0] = lr
            try:
                self._ring(STEP)
                self._worker.step(self._xs[k][0][:n], self._xs[k][1][:n], self.steps, lr, t)
            except BaseException as err:
                self._fail_step(err)
            loss, correct = self._take_results()
        if ctrl_c():  # after the step the workers finished: the weights are a whole step's
            raise KeyboardInterrupt
        return loss, correct

    def _take_results(self) -> tuple[float, int]:
        """Count the step and sum the workers' rows of the results, in worker order."""
        res = self._views["results"]
        self.steps += 1
        self.comm_time += float(res[0, 2])  # as seen by worker 0
        return float(res[:, 0].sum()), int(round(float(res[:, 1].sum())))

    def _fail_step(self, err: BaseException) -> None:
        """The step (or the start, or a trace request) failed: in this process (its own error,
        an interrupt) or in a worker (``err`` a BrokenBarrierError: the watcher knows which).
        Release the workers, raise the first error, stop for good."""
        self._worker.barrier.abort()  # a worker waiting for this process raises and reports
        watcher = self._watcher[0] if self._watcher else None
        failure = None
        if not isinstance(err, threading.BrokenBarrierError):
            failure = (0, True, err)
            if self.threads > 1 and isinstance(err, Exception):  # not a Ctrl-C
                err.add_note(f"(raised in worker 0 of {self.threads}, the fit's own process "
                             f"{os.getpid()})")
        elif watcher is not None:
            failure = watcher.primary(GRACE)
        self._kill_the_rest()
        if failure is None:
            failure = (0, True, err)
        i, _, primary = failure
        self._failed = f"worker {i}: {type(primary).__name__}: {primary}"
        raise primary

    def _kill_the_rest(self) -> None:
        """Give the worker processes :data:`GRACE` seconds to end after a failure (a worker
        released from the broken barrier reports and exits), then kill the rest."""
        deadline = time.monotonic() + GRACE
        for p in self._processes:
            p.join(max(0.0, deadline - time.monotonic()))
            if p.is_alive():
                p.kill()
                p.join(5)

    def _answers(self, expected: str, timeout: float | None = None) -> dict:
        """Every worker process's answer ``expected`` (``ready``, ``trace``), by worker; raises
        the first failure if a worker fails or one does not answer within ``timeout``."""
        answers: dict = {}
        if not self._watcher:
            return answers
        watcher = self._watcher[0]
        deadline = None if timeout is None else time.monotonic() + timeout
        while len(answers) < len(self._processes) and not watcher.failed.is_set():
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            try:
                i, msg = watcher.answers.get(timeout=left)
            except queue.Empty:
                late = next(i for i in range(1, self.threads) if i not in answers)
                watcher.fail(late, True, WorkerError(
                    f"worker process {late} of {self.threads} (pid "
                    f"{self._processes[late - 1].pid}) did not answer within {timeout:.0f} s"))
                break
            if msg is not None and msg[0] == expected:
                answers[i] = msg
        if watcher.failed.is_set():
            self._fail_step(threading.BrokenBarrierError())  # raises the watcher's first
        return answers

    def merge_trace(self, tracer) -> None:
        """Every worker process's timeline (asked for with the doorbell, sent through its
        pipe) into ``tracer``."""
        self._check_usable()
        self._ring(TRACE)
        for msg in self._answers("trace").values():
            tracer.absorb(msg[1])

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
        self._views = self._xs = self._worker = self._doorbell = None
        if self._finalizer is not None:
            self._finalizer()
            self._finalizer = None
        else:
            _release(self._processes, self._conns, self._segments, self._watcher)
        self._processes, self._conns, self._segments = [], [], []
        self._watcher.clear()
