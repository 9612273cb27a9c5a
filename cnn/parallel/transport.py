"""How data-parallel workers exchange arrays: the flat layout of what they exchange, the
transport interface that ``sync`` (:mod:`cnn.parallel.sync`) and ``average``
(:mod:`cnn.parallel.average`) are each written once over, and the shared-memory transport of
threads and worker processes.

- :class:`FlatLayout`: where each array (a gradient; a replica's weight, optimizer slot or
  buffer) sits in one flat vector, in the order backward produces gradients;
- :class:`Transport`: a worker's ``slot`` (its flat contribution), ``combine`` (the sum over
  the workers of a range ``[lo, hi)`` of the slots), ``done`` (after the update), the
  ``reduce`` collective of synchronised layers and where a step's new buffer values go;
- :class:`SharedSlots` (threads, processes): per-worker slots every worker can read, a
  barrier, and a reduce-scatter in which worker ``j`` adds the slots in the fixed order
  ``0 .. P-1`` over its own ``1/P`` of the vector; :class:`SharedReduce`, its ``reduce``;
- ``MPITransport`` (:mod:`cnn.parallel.mpi`): one ``Allreduce`` of the whole slot.

:func:`shard_bounds` cuts a batch (or a flat vector) into contiguous parts of nearly equal
size, the one split every strategy uses.
"""
from __future__ import annotations

import time
from typing import Any, Callable, Sequence

import numpy as np

__all__ = ["FlatLayout", "SharedReduce", "SharedSlots", "Transport", "flat_view",
           "ordered_sum", "own_rows", "shard_bounds", "worker_rows"]


def shard_bounds(n: int, parts: int) -> list[tuple[int, int]]:
    """``parts`` contiguous ``(start, stop)`` ranges covering ``range(n)`` in order, sizes
    differing by at most one (the first ``n % parts`` are one longer); some are empty when
    ``n < parts``."""
    q, r = divmod(n, parts)
    bounds, start = [], 0
    for i in range(parts):
        stop = start + q + (1 if i < r else 0)
        bounds.append((start, stop))
        start = stop
    return bounds


def worker_rows(n: int, parts: int, i: int) -> tuple[int, int]:
    """The rows ``[lo, hi)`` of a global batch of ``n`` examples that worker ``i`` of ``parts``
    computes on: its shard (:func:`shard_bounds`), or, when the shard is empty, the first
    example, on which it runs a ghost pass (see :mod:`cnn.parallel.sync`)."""
    lo, hi = shard_bounds(n, parts)[i]
    return (lo, hi) if hi > lo else (0, 1)


def own_rows(xb, yb, lo: int, hi: int, global_size: int | None):
    """Rows ``[lo, hi)`` of a global batch ``xb, yb``; with ``global_size`` (the global
    batch's size), ``xb, yb`` already hold those rows alone (a process that gathered only its
    own, see ``Strategy.local_rows``) and are returned as they are, checked."""
    if global_size is None:
        return xb[lo:hi], yb[lo:hi]
    if len(yb) != hi - lo:
        raise ValueError(f"expected rows [{lo}, {hi}) of a global batch of {global_size}. "
                         f"Received {len(yb)} rows")
    return xb, yb


def flat_view(a: np.ndarray) -> np.ndarray:
    """A 1-D view of a C-contiguous array (never a copy: writes must reach ``a``)."""
    if not isinstance(a, np.ndarray) or not a.flags.c_contiguous:
        raise ValueError("data-parallel strategies need C-contiguous host (NumPy) parameter "
                         f"arrays. Received {type(a).__name__}")
    return a.reshape(-1)


class FlatLayout:
    """Where each parameter sits in one flat vector of ``total`` elements.

    The order is the reverse of the parameters' order, i.e. the order in which the backward
    pass produces their gradients, so that the gradients of the last layers (ready first) form
    a contiguous prefix: a bucket of consecutive layers is one contiguous range.
    """

    def __init__(self, params: dict[str, Any]):
        if not params:
            raise ValueError("the model has no parameters to train")
        dtypes = {np.dtype(v.dtype) for v in params.values()}
        if len(dtypes) != 1:
            raise ValueError(f"all parameters must share one dtype. Received {sorted(map(str, dtypes))}")
        self.dtype = dtypes.pop()
        self.keys = list(reversed(list(params)))
        self.shapes = {k: tuple(params[k].shape) for k in self.keys}
        self.sizes = {k: int(np.prod(self.shapes[k], dtype=np.int64)) for k in self.keys}
        self.offsets: dict[str, int] = {}
        offset = 0
        for k in self.keys:
            self.offsets[k] = offset
            offset += self.sizes[k]
        self.total = offset

    @property
    def nbytes(self) -> int:
        return self.total * self.dtype.itemsize

    def ranges(self, parts: int) -> list[tuple[int, int]]:
        """``parts`` contiguous ranges of (nearly) equal length covering the vector."""
        return shard_bounds(self.total, parts)

    def pieces(self, lo: int, hi: int) -> list[tuple[str, slice, slice]]:
        """The parameters that ``[lo, hi)`` covers: ``(key, slice of the flattened parameter,
        slice of a buffer that holds [lo, hi))``."""
        out = []
        for k in self.keys:
            off, size = self.offsets[k], self.sizes[k]
            a, b = max(lo, off), min(hi, off + size)
            if a < b:
                out.append((k, slice(a - off, b - off), slice(a - lo, b - lo)))
        return out

    def views(self, flat: np.ndarray) -> dict[str, np.ndarray]:
        """``{key: view of flat shaped like the parameter}``, in the parameters' own order."""
        return {k: flat[self.offsets[k]:self.offsets[k] + self.sizes[k]].reshape(self.shapes[k])
                for k in reversed(self.keys)}

    def pack(self, arrays: dict[str, Any], out: np.ndarray) -> np.ndarray:
        """Copy ``arrays`` (same keys as the parameters) into ``out[:total]``."""
        for k in self.keys:
            out[self.offsets[k]:self.offsets[k] + self.sizes[k]] = np.ravel(arrays[k])
        return out

    def unpack(self, flat: np.ndarray, arrays: dict[str, Any]) -> None:
        """Copy ``flat[:total]`` into ``arrays`` in place."""
        for k in self.keys:
            arrays[k][...] = flat[self.offsets[k]:self.offsets[k] + self.sizes[k]].reshape(
                self.shapes[k])

    def describe(self) -> str:
        return f"{self.total:,} {self.dtype} parameters ({self.nbytes:,} bytes)"


def ordered_sum(slots: Sequence[np.ndarray], lo: int, hi: int, out: np.ndarray) -> np.ndarray:
    """``out = slots[0][lo:hi] + slots[1][lo:hi] + ...`` in that order (deterministic
    rounding, the same bits in every worker that computes it)."""
    return _sum_in_order([s[lo:hi] for s in slots], out)


def _sum_in_order(parts: Sequence[np.ndarray], out: np.ndarray) -> np.ndarray:
    """``out = parts[0] + parts[1] + ...`` in that order (zeros for no parts)."""
    if not parts:
        out[...] = 0
    elif len(parts) == 1:
        np.copyto(out, parts[0])
    else:  # the first two in one pass
        np.add(parts[0], parts[1], out=out)
        for p in parts[2:]:
            np.add(out, p, out=out)
    return out


class Transport:
    """How ``sync`` workers exchange gradients (and ``average`` workers their replicas, through
    ``slot``, ``combine`` and ``done``: :mod:`cnn.parallel.average`). See the module docstring;
    implementations: :class:`SharedSlots` here, ``MPITransport`` in :mod:`cnn.parallel.mpi`.

    ``slot(i)``: worker ``i``'s flat contribution buffer (at least ``layout.total`` long).
    ``contribute(i, core, grads, ghost)``: hand over worker ``i``'s gradients (by default a copy
    into its slot).
    ``grad_hook(i, core, ghost)``: a callable for ``loss_and_grads(on_grads=...)`` when the
    transport overlaps communication with backward (it then contributes), else None.
    ``reducer(i, ghost)``: the ``StepContext.reduce`` of worker ``i`` for this step.
    ``commit_buffers(i, ctx)``: after the combine, make the step's new buffer values
    (``ctx.updates``, the same on every shard) current, once per copy of the buffers: worker 0
    for buffers the workers share (threads: one dict; processes: shared memory, by copy),
    every rank for MPI (each holds its own).
    ``combine(i, local)``: ``(g, lo, hi, totals)``, ``g`` holding ``[lo, hi)`` of the sum.
    ``done(i)``: called after the update.
    """

    def slot(self, i: int) -> np.ndarray:
        raise NotImplementedError

    def contribute(self, i: int, core: "SyncCore", grads: dict, ghost: bool) -> None:
        """Worker ``i``'s gradients ``{key: array}`` after its backward pass (zeros for a
        ghost): copied into its slot, unless the transport reads them where they are."""
        core.contribute(grads, self.slot(i), ghost)

    def grad_hook(self, i: int, core: "SyncCore", ghost: bool) -> Callable | None:
        return None

    def reducer(self, i: int, ghost: bool):
        return None

    def commit_buffers(self, i: int, ctx) -> None:
        if i == 0:
            ctx.commit(copy=getattr(self, "copy_buffers", False))
        else:
            ctx.updates.clear()

    def combine(self, i: int, local):
        raise NotImplementedError

    def done(self, i: int) -> None:
        pass

    def take_reduce_seconds(self, i: int) -> float:
        """Seconds worker ``i`` spent in ``reduce`` collectives since the last call."""
        return 0.0


class SharedReduce:
    """``StepContext.reduce`` for workers that share memory (threads, processes).

    Each call is a collective of the ``n`` workers: worker ``i`` copies its arrays into its
    slot of ``storage`` (zeros for a ghost), all pass ``barrier``, and each worker adds the
    ``n`` slots in the fixed order ``0 .. n-1`` (so every worker gets the same bits). The slots
    alternate between two halves of ``storage`` call by call, so a worker writing call ``c + 1``
    never overwrites what a slower worker is still reading from call ``c``: one barrier per call.

    Args:
        n: workers.
        barrier: a barrier of the ``n`` workers (``threading.Barrier`` or
            ``multiprocessing.Barrier``).
        storage: ``uint8`` array of shape ``(2, n, capacity)`` all workers see (NumPy memory
            for threads, shared memory for processes).
    """

    ALIGN = 16

    def __init__(self, n: int, barrier, storage: np.ndarray):
        if storage.dtype != np.uint8 or storage.ndim != 3 or storage.shape[:2] != (2, n):
            raise ValueError(f"storage must be uint8 of shape (2, {n}, capacity). Received "
                             f"{storage.dtype} {storage.shape}")
        self.n, self.barrier, self.storage = n, barrier, storage
        self.capacity = storage.shape[2]
        self._calls = [0] * n  # per worker: each worker touches only its own entry
        self.seconds = [0.0] * n  # per worker: time in the barrier and the sums

    def for_worker(self, i: int, ghost: bool) -> Callable[[Sequence[Any]], list]:
        return lambda arrays: self.reduce(i, arrays, ghost)

    def _offsets(self, arrays) -> list[int]:
        offs, off = [], 0
        for a in arrays:
            offs.append(off)
            off += -(-np.asarray(a).nbytes // self.ALIGN) * self.ALIGN
        if off > self.capacity:
            raise ValueError(f"reduce: {len(arrays)} arrays of {off:,} bytes exceed the "
                             f"{self.capacity:,} bytes per worker this strategy reserves; raise "
                             "the strategy option reduce_bytes")
        return offs

    def reduce(self, i: int, arrays: Sequence[Any], ghost: bool = False) -> list:
        arrays = [np.asarray(a) for a in arrays]
        offs = self._offsets(arrays)
        half = self.storage[self._calls[i] % 2]
        self._calls[i] += 1
        for a, off in zip(arrays, offs):
            view = half[i, off:off + a.nbytes].view(a.dtype)
            if ghost:
                view[...] = 0
            else:
                view[...] = a.reshape(-1)
        t = time.perf_counter()
        self.barrier.wait()
        out = []
        for a, off in zip(arrays, offs):
            slots = [half[j, off:off + a.nbytes].view(a.dtype) for j in range(self.n)]
            total = np.empty(a.size, dtype=a.dtype)
            ordered_sum(slots, 0, a.size, total)
            out.append(total.reshape(a.shape))
        self.seconds[i] += time.perf_counter() - t
        return out

    def take_seconds(self, i: int) -> float:
        t, self.seconds[i] = self.seconds[i], 0.0
        return t


class SharedSlots(Transport):
    """The shared-memory transport (threads and processes): per-worker slots all workers can
    read, a barrier, and a reduce-scatter in which worker ``j`` sums the slots over its range.

    Args:
        layout: the flat layout of the parameters.
        slots: ``n`` flat buffers of ``layout.total`` elements (worker ``i`` writes ``slots[i]``);
            None with ``by_reference`` (``n`` is then the barrier's ``parties``).
        gsum: a flat buffer of ``layout.total`` elements for the combined gradient.
        barrier: a barrier of the ``n`` workers.
        reduce: the :class:`SharedReduce` behind ``StepContext.reduce``, or None.
        copy_buffers: worker 0 commits new buffer values by copying them into the arrays
            (buffers in shared memory between processes) rather than rebinding them (one dict
            shared by threads).
        done_barrier: :meth:`done` passes the barrier; False when the caller's own barrier
            follows every step anyway (the threads' phase barrier), which orders the updates
            before the next forward pass just as well: one wake-up fewer per step.
        by_reference: ``sync`` workers that share an address space (threads) contribute their
            gradient arrays as they are, and each worker sums its range straight from the
            others' arrays: no copy into a slot. Safe because a worker's gradients stay
            untouched until its next backward pass, which starts after the barrier that ends
            the step (``done``, or the caller's own).
    """

    def __init__(self, layout: FlatLayout, slots: Sequence[np.ndarray] | None, gsum: np.ndarray,
                 barrier, reduce: SharedReduce | None = None, copy_buffers: bool = False,
                 done_barrier: bool = True, by_reference: bool = False):
        self.layout, self.gsum, self.barrier = layout, gsum, barrier
        self.slots = [] if slots is None else list(slots)
        self.copy_buffers, self.done_barrier = copy_buffers, done_barrier
        self.n = barrier.parties if slots is None else len(self.slots)
        self.ranges = layout.ranges(self.n)
        self._reduce = reduce
        self.by_reference = by_reference
        #: by reference: each worker's gradients of this step (None: a ghost's zeros), and the
        #: pieces of the parameters each worker's range covers
        self._grads: list[dict | None] = [None] * self.n
        self._pieces = [layout.pieces(lo, hi) for lo, hi in self.ranges]
        #: worker -> its :class:`cnn.trace.Lane` in a traced fit: the barriers are spans there
        self.lanes: dict = {}

    def _wait(self, i: int) -> None:
        self.barrier.wait()
        lane = self.lanes.get(i)
        if lane is not None:
            lane.span("barrier", cat="barrier")

    def slot(self, i):
        return self.slots[i]

    def reducer(self, i, ghost):
        return None if self._reduce is None else self._reduce.for_worker(i, ghost)

    def contribute(self, i, core, grads, ghost):
        if not self.by_reference:
            return super().contribute(i, core, grads, ghost)
        self._grads[i] = None if ghost else grads

    def combine(self, i, local):
        lo, hi = self.ranges[i]
        if self.by_reference:
            if self.n > 1:
                self._wait(i)
            out = self.gsum[lo:hi]
            for key, p_sl, g_sl in self._pieces[i]:
                _sum_in_order([g[key].reshape(-1)[p_sl] for g in self._grads if g is not None],
                              out[g_sl])
            return out, lo, hi, None
        if self.n == 1:
            return self.slots[0], 0, self.layout.total, None
        self._wait(i)
        return ordered_sum(self.slots, lo, hi, self.gsum[lo:hi]), lo, hi, None

    def done(self, i):
        if self.n > 1 and self.done_barrier:
            self._wait(i)

    def take_reduce_seconds(self, i):
        return 0.0 if self._reduce is None else self._reduce.take_seconds(i)
