"""MPI ranks: ``strategy="mpi"`` (the ``sync`` algorithm across processes and machines) and
``strategy="mpi_average"`` (local SGD / model averaging across ranks).

Run under a launcher, one process per rank, each running the same ``fit``:

    mpiexec -n 2 python -m cnn train --strategy mpi ...      # or: --strategy mpi --ranks 2

``mpi`` (:class:`MPISync`)
    Rank 0 broadcasts the initial weights (``Bcast``), so every rank starts from the same ones
    whatever its own initialisation did. Every rank draws the same permutation from the
    fit's seed, so each knows the same global batch, and gathers only its own shard of it
    (:meth:`MPISync.local_rows`, as PyTorch's ``DistributedSampler``): no data is scattered
    and no rank copies the others' examples. Each step is :meth:`~cnn.parallel.sync.SyncCore.worker_step`, the one written
    for threads and processes too, with :class:`MPITransport`: the rank writes ``(n_i / N) g_i``
    and, in three extra elements, its summed loss, its correct count and its vote to stop (see
    :meth:`~cnn.parallel.base.Strategy.request_stop`) into one flat buffer, and one
    ``Allreduce`` (the upper-case buffer call, never the pickling one) sums it on every rank;
    every rank then applies the same optimizer update to the whole vector, so every rank keeps
    the same weights (checked after each epoch). A rank whose shard is empty (a last batch
    smaller than the number of ranks) runs a ghost pass that contributes zeros, so it enters
    every collective.

    ``overlap=True`` starts a non-blocking ``Iallreduce`` of each bucket of gradients as soon
    as backward has produced it (PyTorch DDP's and Horovod's buckets), last layer first, and
    waits for all of them before the update. ``bucket_bytes`` sets the bucket size (0: one
    bucket per parameter array). MPICH progresses a non-blocking collective only inside MPI
    calls, so the strategy tests the outstanding requests after each layer
    (``progress="layers"``), or has a thread of its own start and test them
    (``progress="thread"``, :class:`ProgressThread`); ``python -m cnn bench mpi`` measures
    whether the overlap pays (``--cluster 1gbe``: across hosts with a real link's speed).

    ``compression="fp16"`` or ``"bf16"`` sends the gradients as 16-bit values, summed in that
    format (:mod:`cnn.parallel.compression`; Horovod's ``Compression.fp16``): half the bytes
    of float32, not the sequential algorithm's sums. Off by default.

``mpi_average`` (:class:`MPIAverage`)
    Each rank trains its own replica on its own ``batch_size`` examples per step (a global step
    is ``ranks * batch_size`` examples), and every ``every`` steps (default: after each epoch)
    the replicas' weights, optimizer state and buffers are replaced by their average weighted
    by the examples each trained on: :class:`~cnn.parallel.average.AverageCore`'s steps, the
    ones written for threads too, with :class:`MPITransport` (one ``Allreduce`` of the flat
    replica). ``every=1`` is ``sync`` on the global batch. The per-step loss and correct count
    are summed over the ranks with each rank's vote to stop (three numbers).

Only rank 0 (``is_master``) prints, shows progress, evaluates and saves; it broadcasts its
validation numbers so that callbacks decide alike on every rank. Every call that moves data is
an upper-case buffer call (``Bcast``, ``Allreduce``, ``Iallreduce``, ``Allgather``).

Failure: an exception on any rank makes that rank print the error with its rank and host and
call ``MPI_Abort``, which ends every rank of the job (the launcher's exit status is non-zero):
no rank is left waiting in a collective. A rank that dies (``kill -9``) is noticed by the
launcher, which ends the others. Errors that every rank raises together (bad arguments before
training starts; :class:`cnn.errors.DivergedError`, decided on the all-reduced loss) are raised
normally on every rank.

Without a launcher, ``strategy="mpi"`` runs one rank and warns that it does.

A traced fit (:mod:`cnn.trace`) records a timeline on every rank (``pid`` = the rank); at the
end, the ranks estimate their clocks' offsets to rank 0's and rank 0 gathers every rank's
events onto its clock (:meth:`_MPIStrategy.merge_trace`) and writes one file.
"""
from __future__ import annotations

import json
import os
import queue
import sys
import threading
import time
import traceback
import warnings
import zlib
from typing import Any, Callable

import numpy as np

from ..checks import check_bool, check_choice, check_int, check_number
from ..extras import require
from ..trace import BUCKETS_TID, now
from .average import AverageStrategy, check_every
from .base import Strategy, state_arrays, step_scalars
from .compression import check_compression, get_wire_format
from .launch import release_segments, under_launcher
from .sync import SyncCore
from .transport import FlatLayout, Transport, flat_view, shard_bounds, worker_rows

_NAME_BYTES = 256


def load_mpi():
    """``mpi4py.MPI`` (MPI started, this job's shared-memory names released: see
    :func:`cnn.parallel.launch.release_segments`), or a
    :class:`~cnn.errors.MissingExtraError` (an ImportError) that says how to get it."""
    require("mpi", "strategy 'mpi'", ("mpi4py",))
    from mpi4py import MPI
    release_segments(MPI)
    return MPI


def processor_names(comm) -> list[str]:
    """Every rank's host name, in rank order (one ``Allgather`` of fixed-size bytes)."""
    MPI = load_mpi()
    name = MPI.Get_processor_name().encode()[:_NAME_BYTES]
    mine = np.zeros(_NAME_BYTES, np.uint8)
    mine[:len(name)] = np.frombuffer(name, np.uint8)
    every = np.zeros((comm.Get_size(), _NAME_BYTES), np.uint8)
    comm.Allgather(mine, every)
    return [bytes(row).rstrip(b"\0").decode(errors="replace") for row in every]


def _check_cpu_backend(name: str, backend) -> None:
    if getattr(backend, "on_device", False):
        raise ValueError(f"strategy {name!r} runs the CPU path on each rank; backend "
                         f"{backend.name!r} keeps the weights on a device. Use a CPU backend "
                         "(numpy, numba)")


#: how ``overlap=True`` gets the non-blocking allreduces to progress while backward runs:
#: ``"layers"`` (the default: the training thread tests the requests after each layer's
#: backward) or ``"thread"`` (:class:`ProgressThread`). The thread moves the sums on sooner
#: and leaves less of the wait exposed, but every wake-up takes the GIL and a core from the
#: training thread: on a network of many small ops (the ResNet) that costs more than it
#: hides, on the plain CIFAR network the two give the same images/s
#: (results/overlap_1gbe.txt: ``python -m cnn bench mpi --cluster 1gbe --ranks 2 --presets
#: cifar_tutorial cifar_resnet20 --batch-sizes 32 128 --variants blocking overlap
#: overlap,progress=thread`` compares them)
PROGRESS = ("layers", "thread")
#: seconds between two tests of the outstanding requests by the progress thread
PROGRESS_INTERVAL = 500e-6


class ProgressThread:
    """A thread that starts this rank's non-blocking collectives and drives MPI's progress
    engine while the training thread computes the backward pass.

    MPICH moves a non-blocking collective on only inside MPI calls: each round of its
    algorithm (a reduce-scatter's exchange, the reduction, the allgather's exchange) starts
    when some call finds the previous one done. This thread starts every collective
    :meth:`submit` hands it, in order, and tests the outstanding requests every ``interval``
    seconds (or at once when another is submitted) until all are complete; then it blocks
    until the next submission. The training thread only puts work into a queue, which never
    waits: it makes no MPI call while backward runs, so it never waits for MPICH's lock or
    for this thread. It needs ``MPI_THREAD_MULTIPLE`` (mpi4py's default); mpi4py releases
    the GIL inside MPI calls and while waiting on the queue, and NumPy releases it while
    backward computes.

    Collectives must start in the same order on every rank: the training thread starts one of
    its own only after :meth:`flush` (every submitted one started), and takes the requests
    back with :meth:`take` (MPI forbids two threads to complete one request at once)."""

    _FLUSH, _TAKE, _CLOSE = "flush", "take", "close"

    def __init__(self, MPI, interval: float = PROGRESS_INTERVAL):
        self.MPI, self.interval = MPI, interval
        self._work: queue.SimpleQueue = queue.SimpleQueue()
        self._answers: queue.SimpleQueue = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="mpi-progress", daemon=True)
        self._thread.start()

    def submit(self, start: Callable[[], Any]) -> None:
        """Have the thread call ``start()`` (which starts a collective and returns its
        request) after every earlier submission, and test the request from then on."""
        self._work.put(start)

    def flush(self) -> None:
        """Wait until every submitted collective has started."""
        self._work.put(self._FLUSH)
        self._answers.get()

    def take(self) -> list:
        """Start every submitted collective, stop testing, and hand back all requests since
        the last call (some may be complete: ``Waitall`` returns at once for those)."""
        self._work.put(self._TAKE)
        return self._answers.get()

    def close(self) -> None:
        self._work.put(self._CLOSE)
        self._thread.join()

    def _run(self) -> None:
        Testall = self.MPI.Request.Testall
        requests: list = []
        testing = False  # some request has not been seen complete
        while True:
            try:
                item = self._work.get(timeout=self.interval if testing else None)
            except queue.Empty:
                item = None
            if item == self._CLOSE:
                return
            if item == self._TAKE:
                self._answers.put(requests)
                requests, testing = [], False
                continue
            if item == self._FLUSH:
                self._answers.put(None)
                continue
            if item is not None:
                requests.append(item())
            if requests:
                testing = not Testall(requests)  # completes the request objects in place


def bucket_ranges(layout: FlatLayout, bucket_bytes: int) -> tuple[list[tuple[int, int]],
                                                                  dict[str, int]]:
    """The gradient buckets of ``layout``: contiguous ranges ``(lo, hi)`` of whole parameters
    in backward order, each of at least ``bucket_bytes`` (the last one may be smaller; 0: one
    bucket per parameter), and the bucket of each parameter."""
    buckets: list[tuple[int, int]] = []
    bucket_of: dict[str, int] = {}
    lo = size = 0
    for k in layout.keys:
        bucket_of[k] = len(buckets)
        size += layout.sizes[k]
        if size * layout.dtype.itemsize >= bucket_bytes:
            end = layout.offsets[k] + layout.sizes[k]
            buckets.append((lo, end))
            lo, size = end, 0
    if size:
        buckets.append((lo, layout.total))
    return buckets, bucket_of


class MPITransport(Transport):
    """The transport over MPI (of ``sync``'s gradients and of ``average``'s replicas): one flat
    buffer, ``Allreduce``; optionally per bucket with ``Iallreduce`` while backward runs and
    16-bit values on the wire; ``StepContext.reduce`` as ``Allreduce`` too.

    The buffer holds the ``layout.total`` gradient elements followed by three more: the rank's
    summed loss, its correct count and its vote to stop (:attr:`vote`, 1 when a stop was
    requested on that rank), so one collective also gives every rank the global numbers (and
    so the same divergence decision) and tells all of them, after the same step, whether any
    rank asked to stop (:attr:`stop_votes`). With ``compression`` (a name of
    :data:`cnn.parallel.compression.FORMATS`) the gradients cross as 16-bit values and the
    three numbers, which must stay exact, in a small allreduce of their own started beside
    them.

    ``progress`` (with ``overlap``): see :data:`PROGRESS`. ``timeline``: record in
    :attr:`timeline`, for every step, the ``time.perf_counter()`` at which this rank entered
    the combine (its backward done) and left it (the sum here), and the seconds the
    training thread spent in MPI calls during backward (starting and testing requests), for
    the benchmark's exposed communication.
    """

    def __init__(self, comm, layout: FlatLayout, overlap: bool = False, bucket_bytes: int = 0,
                 progress: str = "layers", compression: str | None = None,
                 timeline: bool = False, progress_interval: float = PROGRESS_INTERVAL):
        self.MPI = load_mpi()
        self.comm, self.layout, self.overlap = comm, layout, overlap
        self.total = layout.total
        self.buf = np.zeros(layout.total + 3, layout.dtype)
        #: this rank's vote to stop after the step (set by the strategy), and the ranks'
        #: votes summed by the last combine
        self.vote, self.stop_votes = 0.0, 0.0
        self._reduce_seconds = 0.0
        self._requests: list = []
        self.wire = None if compression is None else get_wire_format(compression)
        if self.wire is not None:
            self.wire_buf = self.wire.empty(self.total)
            self._wire_type, self._wire_op = self.wire.mpi_type_and_op(self.MPI)
        # the gradients' buckets; the last one's sum also carries the three numbers (started
        # in combine())
        self.buckets, self._bucket_of = bucket_ranges(layout, bucket_bytes)
        self._pending = [0] * len(self.buckets)
        self._progress = (ProgressThread(self.MPI, progress_interval)
                          if overlap and progress == "thread" else None)
        self.timeline: list[tuple[float, float, float]] | None = [] if timeline else None
        self._hook_seconds = 0.0  # this step's MPI calls during backward
        #: in a traced fit with overlap, the lane of the buckets' allreduces (cnn.trace):
        #: each is a span from its start until this rank saw it complete
        self.lane = None
        self._started: list[tuple[int, int]] = []  # (bucket, start ns) still in flight

    def slot(self, i):
        return self.buf

    def _start(self, b: int) -> None:
        """Start the non-blocking sum of bucket ``b``'s gradients (through the wire format with
        compression): by the progress thread when there is one."""
        MPI = self.MPI
        lo, hi = self.buckets[b]
        if self.wire is None:
            args = (MPI.IN_PLACE, self.buf[lo:hi], MPI.SUM)
        else:
            self.wire.encode(self.buf[lo:hi], self.wire_buf[lo:hi])
            args = (MPI.IN_PLACE, [self.wire_buf[lo:hi], self._wire_type], self._wire_op)
        if self._progress is not None:
            self._progress.submit(lambda: self.comm.Iallreduce(*args))
        else:
            self._requests.append(self.comm.Iallreduce(*args))
        self._traced_start(b)

    def _traced_start(self, b: int) -> None:
        """In a traced fit: bucket ``b``'s sum started now (its span ends in
        :meth:`_completed`)."""
        if self.lane is not None:
            self._started.append((b, now()))

    def grad_hook(self, i, core, ghost):
        if not self.overlap:
            return None
        self._pending = [0] * len(self.buckets)
        for k in self.layout.keys:
            self._pending[self._bucket_of[k]] += 1
        self._requests = []

        def on_grads(grads: dict) -> None:
            core.contribute(grads, self.buf, ghost)
            t = time.perf_counter()
            for k in grads:
                b = self._bucket_of[k]
                self._pending[b] -= 1
                if self._pending[b] == 0 and b < len(self.buckets) - 1:
                    self._start(b)
            # no progress thread: MPICH makes progress inside MPI calls only
            if self._requests and self.MPI.Request.Testall(self._requests) and self._started:
                self._completed()
            seconds = time.perf_counter() - t
            self._reduce_seconds += seconds
            self._hook_seconds += seconds
        return on_grads

    def _completed(self) -> None:
        """The buckets in flight were seen complete now: their spans end here."""
        end = now()
        for b, start in self._started:
            self.lane.interval(f"allreduce bucket {b}", start, end, cat="comm")
        self._started = []

    def reducer(self, i, ghost):
        return lambda arrays: self.allreduce_arrays(arrays, ghost)

    def commit_buffers(self, i, ctx):
        ctx.commit()  # every rank holds its own buffers; all computed the same values

    def allreduce_arrays(self, arrays, ghost: bool = False) -> list:
        """``StepContext.reduce``: the element-wise sums of ``arrays`` over the ranks (one
        ``Allreduce`` per dtype; zeros from a ghost)."""
        t = time.perf_counter()
        if self._progress is not None:  # the buckets submitted so far start first everywhere
            self._progress.flush()
        arrays = [np.asarray(a) for a in arrays]
        out: list[Any] = [None] * len(arrays)
        for dt in dict.fromkeys(a.dtype for a in arrays):
            idx = [j for j, a in enumerate(arrays) if a.dtype == dt]
            flat = np.zeros(sum(arrays[j].size for j in idx), dt)
            off = 0
            for j in idx:
                if not ghost:
                    flat[off:off + arrays[j].size] = arrays[j].reshape(-1)
                off += arrays[j].size
            self.comm.Allreduce(self.MPI.IN_PLACE, flat, self.MPI.SUM)
            off = 0
            for j in idx:
                out[j] = flat[off:off + arrays[j].size].reshape(arrays[j].shape)
                off += arrays[j].size
        self._reduce_seconds += time.perf_counter() - t
        return out

    def combine(self, i, local):
        entered = time.perf_counter()
        buf, total, MPI = self.buf, self.total, self.MPI
        buf[total], buf[total + 1], buf[total + 2] = *local, self.vote
        last = len(self.buckets) - 1
        if self.wire is None and not self.overlap:
            self.comm.Allreduce(MPI.IN_PLACE, buf, MPI.SUM)
        elif self.wire is None:  # the last bucket carries the three numbers
            requests = self._take_requests()
            requests.append(self.comm.Iallreduce(MPI.IN_PLACE, buf[self.buckets[last][0]:],
                                                 MPI.SUM))
            self._traced_start(last)
            MPI.Request.Waitall(requests)
        elif self.overlap:  # the three numbers exact, beside the 16-bit gradients
            self._start(last)
            requests = self._take_requests()
            requests.append(self.comm.Iallreduce(MPI.IN_PLACE, buf[total:], MPI.SUM))
            MPI.Request.Waitall(requests)
            self.wire.decode(self.wire_buf, buf[:total])
        else:
            numbers = self.comm.Iallreduce(MPI.IN_PLACE, buf[total:], MPI.SUM)
            self.wire.encode(buf[:total], self.wire_buf)
            self.comm.Allreduce(MPI.IN_PLACE, [self.wire_buf, self._wire_type], self._wire_op)
            numbers.Wait()
            self.wire.decode(self.wire_buf, buf[:total])
        if self._started:
            self._completed()
        self.stop_votes = float(buf[total + 2])
        if self.timeline is not None:
            self.timeline.append((entered, time.perf_counter(), self._hook_seconds))
        self._hook_seconds = 0.0
        return buf[:total], 0, total, (float(buf[total]), int(round(float(buf[total + 1]))))

    def _take_requests(self) -> list:
        """The outstanding requests of this step (from the progress thread, if any)."""
        requests = self._progress.take() if self._progress is not None else self._requests
        self._requests = []
        return requests

    def take_reduce_seconds(self, i):
        t, self._reduce_seconds = self._reduce_seconds, 0.0
        return t

    def close(self) -> None:
        """End the progress thread and free the wire format's operation (safe twice)."""
        if self._progress is not None:
            self._progress.close()
            self._progress = None
        if self.wire is not None and self._wire_op != self.MPI.OP_NULL:
            self._wire_op.Free()  # sets it to OP_NULL


class _MPIStrategy(Strategy):
    """What both MPI strategies share: the communicator, rank 0 as master, the initial
    broadcast, agreement checks, failure handling, the record of ranks and hosts."""

    def __init__(self, threads: int = 1, abort_on_error: bool = True, comm=None):
        super().__init__(threads)
        if threads != 1:
            raise ValueError(f"strategy {self.name!r} runs one worker per MPI rank and takes the "
                             f"number of ranks from the launcher (mpiexec -n N, or --ranks N on "
                             f"the command line); threads must be 1. Received threads={threads}")
        check_bool(None, "abort_on_error", abort_on_error)
        self.MPI = load_mpi()
        self.comm = self.MPI.COMM_WORLD if comm is None else comm
        self.rank, self.size = self.comm.Get_rank(), self.comm.Get_size()
        self.is_master = self.rank == 0
        self.abort_on_error = abort_on_error
        if self.size == 1 and not under_launcher():
            warnings.warn(f"strategy {self.name!r}: no MPI launcher, so this runs 1 rank. Start "
                          f"N ranks with `mpiexec -n N python -m cnn train --strategy "
                          f"{self.name} ...` or `python -m cnn train --strategy {self.name} "
                          f"--ranks N`", RuntimeWarning, stacklevel=3)
        self.hosts = self._gather_hosts()

    # ---- set-up ------------------------------------------------------------------------------
    def _gather_hosts(self) -> list[str]:
        return processor_names(self.comm)

    def _agree(self, what: str, values: dict) -> None:
        """Raise ValueError on every rank if the ranks disagree on ``values`` (compared as a
        CRC of their JSON text with one ``Allreduce`` of min and max)."""
        code = zlib.crc32(json.dumps(values, sort_keys=True, default=str).encode())
        mine = np.array([code, -code], np.int64)
        both = np.empty(2, np.int64)
        self.comm.Allreduce(mine, both, self.MPI.MIN)
        if both[0] != -both[1]:
            raise ValueError(f"strategy {self.name!r}: the ranks disagree on {what}; every rank "
                             f"must run the same configuration. This is rank {self.rank} with "
                             f"{values}")

    def start(self, model, optimizer, backend, params, seed=0, **kwargs) -> None:
        _check_cpu_backend(self.name, backend)
        if self.tracer is not None:  # one process of the trace per rank
            self.tracer.set_process(self.rank, f"rank {self.rank} ({self.hosts[self.rank]})")
        super().start(model, optimizer, backend, params, seed, **kwargs)
        self._agree("the model, optimizer, dtype and seed",
                    {"spec": model.spec(), "dtype": str(model.dtype), "optimizer":
                     optimizer.config(), "seed": seed, "strategy": self.describe()})
        # rank 0's weights, buffers and optimizer state (those of a backup it resumes from)
        for v in (list(self.params.values()) + list(self.buffers.values())
                  + state_arrays(self.state)):
            self.comm.Bcast(flat_view(v), root=0)

    # ---- the data ----------------------------------------------------------------------------
    def step(self, xb, yb):
        """One step on a whole global batch: this rank's rows of it (:meth:`local_rows`)."""
        lo, hi = self.local_rows(len(yb))
        return self.step_rows(xb[lo:hi], yb[lo:hi], len(yb))

    # ---- shared numbers ----------------------------------------------------------------------
    def share_metrics(self, values: dict[str, float]) -> dict[str, float]:
        """Rank 0's ``values`` on every rank (its keys too), so the other ranks need not know
        which numbers rank 0 computed."""
        shared = self.share({k: float(v) for k, v in values.items()} if self.is_master else None)
        return {k: float(v) for k, v in shared.items()}

    def share(self, value: Any) -> Any:
        """Rank 0's JSON-able ``value`` on every rank (two ``Bcast`` of bytes, the length
        first)."""
        text = np.frombuffer(json.dumps(value).encode(), np.uint8) if self.is_master \
            else np.zeros(0, np.uint8)
        size = np.array([text.size], np.int64)
        self.comm.Bcast(size, root=0)
        buf = text.copy() if self.is_master else np.zeros(int(size[0]), np.uint8)
        self.comm.Bcast(buf, root=0)
        return json.loads(buf.tobytes().decode())

    def stop_requested(self) -> bool:
        """Whether any rank asked to stop by the last step's collective (every rank has the
        same sum of votes, so all stop after the same step)."""
        return getattr(self, "_stop_agreed", False)

    def check_replicas(self) -> None:
        """Raise RuntimeError (on every rank) unless every rank holds bitwise the same
        weights (a CRC of the bytes, compared by one ``Allreduce``)."""
        crc = 0
        for v in self.params.values():
            crc = zlib.crc32(np.ascontiguousarray(v).tobytes(), crc)
        mine = np.array([crc, -crc], np.int64)
        both = np.empty(2, np.int64)
        self.comm.Allreduce(mine, both, self.MPI.MIN)
        if both[0] != -both[1]:
            raise RuntimeError(f"strategy {self.name!r}: the ranks' weights differ after step "
                               f"{self.steps}; the collectives did not give every rank the same "
                               "sums")

    def merge_trace(self, tracer) -> None:
        """Every rank's timeline on rank 0's clock, in rank 0's ``tracer`` (a collective).

        The offsets come from :func:`cnn.trace.clock_offsets` (clock readings exchanged with
        rank 0); each rank shifts its events by its own offset and sends them as JSON bytes
        (``Gatherv`` of ``uint8``, the lengths first)."""
        from ..trace import clock_offsets
        offsets, errors = clock_offsets(self.comm)
        mine = np.frombuffer(json.dumps(tracer.events(offsets[self.rank])).encode(), np.uint8)
        sizes = np.zeros(self.size, np.int64)
        self.comm.Allgather(np.array([mine.size], np.int64), sizes)
        every = np.empty(int(sizes.sum()) if self.is_master else 0, np.uint8)
        starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])
        self.comm.Gatherv(mine, [every, sizes, starts, self.MPI.BYTE] if self.is_master
                          else None, root=0)
        if self.is_master:  # its own events are on its clock already
            for rank in range(1, self.size):
                part = every[starts[rank]:starts[rank] + sizes[rank]].tobytes()
                tracer.absorb(json.loads(part.decode()))
            tracer.clock.update(
                offsets_ns=offsets, offset_error_ns=errors,
                offsets_method="Cristian's algorithm over MPI: rank 0 asks each rank for its "
                               "clock 16 times; offset = reading - midpoint of the round trip, "
                               "of the shortest round trip; error <= half of it")

    # ---- failure -----------------------------------------------------------------------------
    def abort(self, err: BaseException) -> None:
        """Called by ``fit`` when training stops with ``err``: unless every rank raised it
        together, print it with this rank's number and end every rank (``MPI_Abort``)."""
        from ..errors import DivergedError
        if self.size == 1 or not self.abort_on_error or isinstance(err, DivergedError):
            return
        host = self.hosts[self.rank] if getattr(self, "hosts", None) else "?"
        text = "".join(traceback.format_exception(err))
        sys.stderr.write(f"\n[cnn mpi] rank {self.rank} of {self.size} (host {host}, pid "
                         f"{os.getpid()}) failed with {type(err).__name__}: {err}\n{text}"
                         f"[cnn mpi] aborting all {self.size} ranks\n")
        sys.stderr.flush()
        sys.stdout.flush()
        self.comm.Abort(1)

    def describe(self) -> dict:
        return {**super().describe(), "ranks": self.size, "hosts": list(self.hosts)}


class MPISync(_MPIStrategy):
    """``sync`` across MPI ranks. See the module docstring.

    Args:
        threads: must be 1 (one worker per rank; the launcher sets the ranks).
        overlap: start a non-blocking allreduce per bucket while backward runs.
        bucket_bytes: minimum bytes per bucket with ``overlap`` (0: one per parameter array;
            PyTorch DDP's ``bucket_cap_mb`` is the same idea, as a maximum).
        progress: with ``overlap``, how the allreduces progress during backward
            (:data:`PROGRESS`).
        compression: None (default: exact sums), ``"fp16"`` or ``"bf16"``: the gradients
            cross as 16-bit values (:mod:`cnn.parallel.compression`).
        timeline: record when each step's combine starts and ends (:attr:`timeline`).
        abort_on_error: end every rank when one fails (default); False only re-raises on the
            failing rank (for debugging: the others then wait).
        comm: the communicator (default ``MPI.COMM_WORLD``).
    """

    name = "mpi"

    def __init__(self, threads: int = 1, overlap: bool = False, bucket_bytes: int = 0,
                 progress: str = "layers", compression: str | None = None,
                 timeline: bool = False, abort_on_error: bool = True, comm=None,
                 progress_interval: float = PROGRESS_INTERVAL):
        self.progress_interval = check_number(None, "progress_interval", progress_interval,
                                              low=0.0, low_open=True)
        self.overlap = check_bool(None, "overlap", overlap)
        self.bucket_bytes = check_int(None, "bucket_bytes", bucket_bytes, low=0)
        self.progress = check_choice(None, "progress", progress, PROGRESS)
        self.compression = check_compression(compression)
        self.record_timeline = check_bool(None, "timeline", timeline)
        super().__init__(threads, abort_on_error, comm)

    def start(self, model, optimizer, backend, params, seed=0, **kwargs) -> None:
        super().start(model, optimizer, backend, params, seed, **kwargs)
        self._core = SyncCore(model, optimizer, backend, self.params, self.state, flat=True)
        self._transport = MPITransport(self.comm, self._core.layout, self.overlap,
                                       self.bucket_bytes, self.progress, self.compression,
                                       self.record_timeline, self.progress_interval)
        if self.tracer is not None and self.overlap:
            self._transport.lane = self.tracer.lane(BUCKETS_TID, "allreduce buckets")
        self._ctx = self.new_context()

    @property
    def timeline(self) -> list[tuple[float, float, float]] | None:
        """With ``timeline=True``: ``(entered, left, in_backward)`` of each step so far: the
        ``time.perf_counter()`` at which this rank entered and left the gradient sum, and the
        seconds it spent in MPI calls during the backward pass before it."""
        transport = getattr(self, "_transport", None)
        return None if transport is None else transport.timeline

    def close(self) -> None:
        transport = getattr(self, "_transport", None)
        if transport is not None:
            transport.close()

    def local_rows(self, n: int) -> tuple[int, int]:
        """This rank's shard of a global batch of ``n`` (the first example for a ghost pass
        when the shard is empty): the fit loop gathers only these rows."""
        return worker_rows(n, self.size, self.rank)

    def step_rows(self, xb, yb, n):
        if not hasattr(self, "_core"):
            raise RuntimeError(f"strategy {self.name!r} is not started (call start() first)")
        self._ctx.step = self.steps
        lr, t = step_scalars(self.optimizer, self.state, self.steps)
        self._transport.vote = 1.0 if getattr(self, "_stop_vote", False) else 0.0
        _, _, comm, totals = self._core.worker_step(self.rank, self.size, xb, yb,
                                                    self._transport, self._ctx, lr, t,
                                                    global_size=n)
        self._stop_agreed = self._transport.stop_votes > 0
        self.steps += 1
        self.comm_time += comm
        return totals

    def end_epoch(self) -> None:
        t = time.perf_counter()
        self.check_replicas()
        self.comm_time += time.perf_counter() - t

    def describe(self) -> dict:
        return {**super().describe(), "overlap": self.overlap, "compression": self.compression}


class MPIAverage(AverageStrategy, _MPIStrategy):
    """Local SGD across MPI ranks: one replica per rank, averaged (weights, optimizer state and
    buffers, weighted by examples) every ``every`` steps or after each epoch. See the module
    docstring.

    Args:
        threads: must be 1.
        every: steps between averages, or ``"epoch"`` (default).
        abort_on_error, comm: as for :class:`MPISync`.
    """

    name = "mpi_average"

    def __init__(self, threads: int = 1, every: "int | str" = "epoch",
                 abort_on_error: bool = True, comm=None):
        self.every = check_every(f"strategy {self.name!r}", every)
        super().__init__(threads, abort_on_error, comm)

    @property
    def replica_count(self) -> int:
        return self.size

    def start(self, model, optimizer, backend, params, seed=0, **kwargs) -> None:
        super().start(model, optimizer, backend, params, seed, **kwargs)
        core = self._start_average((self.rank,))
        self._transport = MPITransport(self.comm, core.layout)
        self._ctx = self.new_context()
        self._sums = np.zeros(3, np.float64)  # loss, correct, votes to stop

    def _average(self, weights, into_replicas):
        return self._core.average(self.rank, self._transport, weights, into_replicas)

    def _gather_replicas(self):
        mine = self._core.replicas[self.rank].flat
        every = np.empty((self.size, mine.size), mine.dtype) if self.is_master else None
        self.comm.Gather(mine, every, root=0)
        return every

    def _scatter_replicas(self, flats):
        mine = self._core.replicas[self.rank].flat
        if self.is_master and flats.shape != (self.size, mine.size):
            raise ValueError(f"replicas of shape {flats.shape}; strategy {self.name!r} has "
                             f"{self.size} of {mine.size} values")
        self.comm.Scatter(flats if self.is_master else None, mine, root=0)

    def local_rows(self, n: int) -> tuple[int, int]:
        """This rank's shard of a global step of ``n`` examples (possibly empty): the fit loop
        gathers only these rows."""
        return shard_bounds(n, self.size)[self.rank]

    def step_rows(self, xb, yb, n):
        if not hasattr(self, "_core"):
            raise RuntimeError(f"strategy {self.name!r} is not started (call start() first)")
        weights = self._core.begin_step(n)
        self._ctx.step = self.steps
        lr, t = step_scalars(self.optimizer, self.state, self.steps)
        vote = 1.0 if getattr(self, "_stop_vote", False) else 0.0
        local = np.array([*self._core.train(self.rank, xb, yb, self._ctx, lr, t, global_size=n),
                          vote],
                         np.float64)
        start = time.perf_counter()
        self.comm.Allreduce(local, self._sums, self.MPI.SUM)
        self.comm_time += time.perf_counter() - start
        self._stop_agreed = self._sums[2] > 0
        self.steps += 1
        if weights is not None:
            self.comm_time += self._average(weights, into_replicas=True)
        return float(self._sums[0]), int(round(self._sums[1]))
