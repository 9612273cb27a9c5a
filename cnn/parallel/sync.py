"""The ``sync`` algorithm, written once: shard gradients, their sum, one update.

Every data-parallel *sync* path (Python threads, worker processes over shared memory, MPI
ranks) runs the same per-worker step, :meth:`SyncCore.worker_step`; they differ only in the
*transport* that moves gradients between workers:

1. **compute**: worker ``i`` of ``P`` takes shard ``i`` of the global batch of ``N`` examples
   (:func:`shard_bounds`: contiguous, sizes ``n_i`` differing by at most one) and computes, on
   the common weights, the gradient ``g_i`` of its share of the global mean loss, ``(n_i / N)``
   times its shard's mean loss (``loss_and_grads(loss_scale=n_i / N)``), with a training
   :class:`~cnn.context.StepContext` that knows the shard's offset in the global batch and
   whose ``reduce`` sums small arrays over all shards (synchronised batch statistics). Scaling
   the loss rather than the finished gradient matters for synchronised layers: their backward
   pass sums terms across shards, which must all be gradients of the same (global) loss;
2. **contribute**: it copies ``g_i`` into its own *slot*, one flat buffer over all parameters
   (:class:`FlatLayout`, laid out in the order backward produces gradients);
3. **combine** (the transport): the sum ``g = sum_i g_i`` over the workers, for a
   range ``[lo, hi)`` of the flat vector. Shared-memory transports (:class:`SharedSlots`:
   threads, processes) pass a barrier and let worker ``j`` add the slots in the fixed order
   ``i = 0 .. P-1`` over its own ``1/P`` of the vector (a reduce-scatter; the shared weights
   make the all-gather free); MPI calls one ``Allreduce`` of the whole slot, so every rank
   holds all of ``g``;
4. **apply**: the optimizer's update of the parameters (and its state) over ``[lo, hi)``,
   through the optimizer's own API on slices: element-wise optimizers update each element
   from that element's gradient and state alone, so updating disjoint ranges in different
   workers, or the whole vector on every rank, is the same update;
5. **done** (the transport): shared-memory transports pass a barrier, so no worker starts the
   next step's forward pass before every range is updated.

``g`` is the gradient of the mean loss over the global batch, which is what the sequential
path computes, so ``sync`` equals sequential up to the order of floating-point sums.

A worker whose shard is empty (a last batch smaller than the number of workers) still takes
part in every collective: it runs a *ghost* pass on one example of the batch whose
contributions are zero (loss scale 0 for its gradient, zeros for every ``reduce``), so a rank with
nothing to do never leaves the others waiting.
"""
from __future__ import annotations

import time
from typing import Any, Callable, Sequence

import numpy as np

__all__ = ["FlatLayout", "SharedReduce", "SharedSlots", "SyncCore", "shard_bounds",
           "worker_rows"]


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
    example, on which it runs a ghost pass (see the module docstring)."""
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


# ---- the optimizer's state --------------------------------------------------------------------
# cnn.optim keeps an optimizer's state as named slots per parameter plus a scalar step
# (``state.slots[name][key]``, ``state.step``) and updates any slice of a parameter with
# ``update_step(param, grad, {name: slot}, lr, t, backend)``, the same lr and t for every slice
# of one global step; the strategy advances ``state.step`` once per global step.
def state_arrays(state) -> list[np.ndarray]:
    """The slot arrays of an optimizer state, in a fixed order (the same in every process)."""
    return [a for s in state.slots.values() for a in s.values()]


def state_with_arrays(state, arrays: Sequence[np.ndarray]):
    """A state like ``state`` (same slots, step, optimizer) whose arrays, in
    :func:`state_arrays` order, are ``arrays``: views into shared memory, for instance."""
    it = iter(arrays)
    return state.map(lambda a: next(it))


def step_scalars(optimizer, state, steps: int) -> tuple[float, int]:
    """``(lr, t)`` of the global step about to be taken after ``steps`` updates: the same for
    every slice every worker updates in it."""
    return optimizer.learning_rate(steps), steps + 1


def ordered_sum(slots: Sequence[np.ndarray], lo: int, hi: int, out: np.ndarray) -> np.ndarray:
    """``out = slots[0][lo:hi] + slots[1][lo:hi] + ...`` in that order (deterministic
    rounding, the same bits in every worker that computes it)."""
    np.copyto(out, slots[0][lo:hi])
    for s in slots[1:]:
        np.add(out, s[lo:hi], out=out)
    return out


class SyncCore:
    """The transport-independent part of ``sync``: shard pass, contribution, update.

    Args:
        model: the :class:`~cnn.model.Sequential` whose ``loss_and_grads`` computes a shard.
        optimizer: a :class:`cnn.optim.Optimizer` (its ``update_step`` is applied to flat
            slices, all with the step's ``lr`` and ``t``).
        backend: a CPU backend (host NumPy arrays).
        params: ``{key: array}`` the weights this worker reads and updates in place.
        state: the :class:`cnn.optim.OptimizerState` of ``params``: its slots are updated in
            place here; its scalar ``step`` is advanced by the strategy, once per global step.
    """

    def __init__(self, model, optimizer, backend, params: dict, state):
        self.model, self.optimizer, self.backend = model, optimizer, backend
        self.params, self.state = params, state
        self.layout = FlatLayout(params)
        self._flat_params = {k: flat_view(v) for k, v in params.items()}
        self._flat_slots = state.flat()  # {slot name: {key: flat view}}
        #: this global step's learning rate and 1-based number (set by worker_step)
        self.lr: float | None = None
        self.t = 1

    # ---- 2. contribute ------------------------------------------------------------------------
    def contribute(self, grads: dict, slot: np.ndarray, ghost: bool = False) -> None:
        """``slot[range of key] = grads[key]`` for every key in ``grads`` (zeros for a ghost:
        its backward pass saw the other shards' sums, so its gradients are not zero)."""
        lay = self.layout
        for k, g in grads.items():
            off = lay.offsets[k]
            if ghost:
                slot[off:off + lay.sizes[k]] = 0
            else:
                np.copyto(slot[off:off + lay.sizes[k]], np.ravel(g))

    # ---- 4. apply -----------------------------------------------------------------------------
    def apply(self, g: np.ndarray, lo: int, hi: int) -> None:
        """The optimizer's update of ``[lo, hi)`` of the flat parameters from ``g`` (which
        holds that range of the combined gradient)."""
        opt, be = self.optimizer, self.backend
        for key, p_sl, g_sl in self.layout.pieces(lo, hi):
            opt.update_step(self._flat_params[key][p_sl], g[g_sl],
                            {n: s[key][p_sl] for n, s in self._flat_slots.items()},
                            self.lr, self.t, be)

    # ---- the step, once -------------------------------------------------------------------------
    def worker_step(self, i: int, parts: int, xb, yb, transport: "Transport", ctx=None,
                    lr: float | None = None, t: int = 1, global_size: int | None = None):
        """Worker ``i`` of ``parts``: compute its shard, contribute, combine, apply, done.
        ``lr`` and ``t``: the global step's learning rate and 1-based number
        (:func:`step_scalars`; the strategy advances its scalar step once, afterwards).
        ``xb, yb``: the global batch; or, with ``global_size`` (the global batch's size), only
        the rows :func:`worker_rows` gives this worker (a process that gathers its own shard).

        Returns ``(loss_sum, correct, comm_seconds, totals)``: this shard's summed loss and
        correct count (0 for a ghost), the seconds spent in the transport's collectives, and
        the transport's global ``(loss_sum, correct)`` when it computes one (MPI), else None.
        """
        self.lr, self.t = lr, t
        n = len(yb) if global_size is None else global_size
        start, stop = shard_bounds(n, parts)[i]
        ghost = start == stop  # an empty shard: a pass on one example that contributes nothing
        lo, hi = worker_rows(n, parts, i)
        share = 0.0 if ghost else (hi - lo) / n
        xb, yb = own_rows(xb, yb, lo, hi, global_size)
        slot = transport.slot(i)
        hook = transport.grad_hook(i, self, ghost)
        if ctx is not None:
            ctx.offset, ctx.global_batch = lo, n
            ctx.reduce = transport.reducer(i, ghost)
        kwargs = {} if ctx is None else {"ctx": ctx}
        if hook is not None:
            kwargs["on_grads"] = hook
        # the gradient of this shard's share of the global mean loss: the shards' gradients
        # add up to the global one, and synchronised layers sum like-scaled terms in backward
        loss, correct, grads = self.model.loss_and_grads(xb, yb, self.params, self.backend,
                                                         loss_scale=share, **kwargs)
        if hook is None:
            self.contribute(grads, slot, ghost)
        be = self.backend
        local = (0.0, 0) if ghost else (float(be.to_host(loss)) * (hi - lo),
                                        int(be.to_host(correct)))
        t = time.perf_counter()
        g, a, b, totals = transport.combine(i, local)
        comm = time.perf_counter() - t
        if ctx is not None:  # every shard computed the same new statistics (synchronised)
            transport.commit_buffers(i, ctx)
        self.apply(g, a, b)
        t = time.perf_counter()
        transport.done(i)
        comm += time.perf_counter() - t + transport.take_reduce_seconds(i)
        return local[0], local[1], comm, totals


class Transport:
    """How ``sync`` workers exchange gradients (and ``average`` workers their replicas, through
    ``slot``, ``combine`` and ``done``: :mod:`cnn.parallel.average`). See the module docstring.

    ``slot(i)``: worker ``i``'s flat contribution buffer (at least ``layout.total`` long).
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

    def grad_hook(self, i: int, core: SyncCore, ghost: bool) -> Callable | None:
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
        slots: ``n`` flat buffers of ``layout.total`` elements (worker ``i`` writes ``slots[i]``).
        gsum: a flat buffer of ``layout.total`` elements for the combined gradient.
        barrier: a barrier of the ``n`` workers.
        reduce: the :class:`SharedReduce` behind ``StepContext.reduce``, or None.
        copy_buffers: worker 0 commits new buffer values by copying them into the arrays
            (buffers in shared memory between processes) rather than rebinding them (one dict
            shared by threads).
        done_barrier: :meth:`done` passes the barrier; False when the caller's own barrier
            follows every step anyway (the threads' phase barrier), which orders the updates
            before the next forward pass just as well: one wake-up fewer per step.
    """

    def __init__(self, layout: FlatLayout, slots: Sequence[np.ndarray], gsum: np.ndarray,
                 barrier, reduce: SharedReduce | None = None, copy_buffers: bool = False,
                 done_barrier: bool = True):
        self.layout, self.slots, self.gsum, self.barrier = layout, list(slots), gsum, barrier
        self.copy_buffers, self.done_barrier = copy_buffers, done_barrier
        self.n = len(self.slots)
        self.ranges = layout.ranges(self.n)
        self._reduce = reduce

    def slot(self, i):
        return self.slots[i]

    def reducer(self, i, ghost):
        return None if self._reduce is None else self._reduce.for_worker(i, ghost)

    def combine(self, i, local):
        lo, hi = self.ranges[i]
        if self.n == 1:
            return self.slots[0], 0, self.layout.total, None
        self.barrier.wait()
        return ordered_sum(self.slots, lo, hi, self.gsum[lo:hi]), lo, hi, None

    def done(self, i):
        if self.n > 1 and self.done_barrier:
            self.barrier.wait()

    def take_reduce_seconds(self, i):
        return 0.0 if self._reduce is None else self._reduce.take_seconds(i)


Transport.__doc__ += "\n\nImplementations: :class:`SharedSlots` here, ``MPITransport`` in :mod:`cnn.parallel.mpi`."
