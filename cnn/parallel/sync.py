"""The ``sync`` algorithm, written once: shard gradients, their sum, one update.

Every data-parallel *sync* path (Python threads, worker processes over shared memory, MPI
ranks) runs the same per-worker step, :meth:`SyncCore.worker_step`; they differ only in the
*transport* that moves gradients between workers:

1. **compute**: worker ``i`` of ``P`` takes shard ``i`` of the global batch of ``N`` examples
   (:func:`~cnn.parallel.transport.shard_bounds`: contiguous, sizes ``n_i`` differing by at
   most one) and computes, on the common weights, the gradient ``g_i`` of its share of the global mean loss, ``(n_i / N)``
   times its shard's mean loss (``loss_and_grads(loss_scale=n_i / N)``), with a training
   :class:`~cnn.context.StepContext` that knows the shard's offset in the global batch and
   whose ``reduce`` sums small arrays over all shards (synchronised batch statistics). Scaling
   the loss rather than the finished gradient matters for synchronised layers: their backward
   pass sums terms across shards, which must all be gradients of the same (global) loss;
2. **contribute**: it copies ``g_i`` into its own *slot*, one flat buffer over all parameters
   (:class:`~cnn.parallel.transport.FlatLayout`, laid out in the order backward produces
   gradients); threads, which share one address space, skip the copy and hand over their
   gradient arrays as they are (``SharedSlots(by_reference=True)``);
3. **combine** (the transport, :mod:`cnn.parallel.transport`): the sum ``g = sum_i g_i`` over
   the workers, for a range ``[lo, hi)`` of the flat vector. Shared-memory transports
   (:class:`~cnn.parallel.transport.SharedSlots`: threads, processes) pass a barrier and let worker ``j`` add the slots in the fixed order
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
from typing import Callable

import numpy as np

from .transport import FlatLayout, Transport, flat_view, own_rows, shard_bounds, worker_rows

__all__ = ["SyncCore"]


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
        flat: move the parameters and each slot of the optimizer into one buffer each, in the
            layout's order (the entries of ``params`` and ``state.slots`` become views of
            them), so that updating a range is one optimizer call however many parameters it
            covers; False where ``params`` must stay where they are (shared memory).
    """

    def __init__(self, model, optimizer, backend, params: dict, state, flat: bool = False):
        self.model, self.optimizer, self.backend = model, optimizer, backend
        self.params, self.state = params, state
        self.layout = FlatLayout(params)
        #: the whole flat parameters and slots when ``flat``, else None
        self._flat: tuple[np.ndarray, dict] | None = None
        if flat:
            self._flat = (self._gather(params), {n: self._gather(per_key)
                                                 for n, per_key in state.slots.items()})
        self._flat_params = {k: flat_view(v) for k, v in params.items()}
        self._flat_slots = state.flat()  # {slot name: {key: flat view}}
        self._pieces: dict[tuple[int, int], list] = {}  # (lo, hi) -> apply's pieces
        #: this global step's learning rate and 1-based number (set by worker_step)
        self.lr: float | None = None
        self.t = 1

    def _gather(self, arrays: dict) -> np.ndarray:
        """``arrays`` (keyed like the parameters) copied into one new flat buffer in the
        layout's order; their entries become views of it."""
        flat = self.layout.pack(arrays, np.empty(self.layout.total, self.layout.dtype))
        arrays.update(self.layout.views(flat))
        return flat

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
        if self._flat is not None:  # elementwise optimizers: one call for the whole range
            params, slots = self._flat
            opt.update_step(params[lo:hi], g, {n: s[lo:hi] for n, s in slots.items()},
                            self.lr, self.t, be)
            return
        pieces = self._pieces.get((lo, hi))
        if pieces is None:  # the same ranges every step: their views are made once
            pieces = self._pieces[(lo, hi)] = [
                (self._flat_params[key][p_sl], g_sl,
                 {n: s[key][p_sl] for n, s in self._flat_slots.items()})
                for key, p_sl, g_sl in self.layout.pieces(lo, hi)]
        for param, g_sl, slots in pieces:
            opt.update_step(param, g[g_sl], slots, self.lr, self.t, be)

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
        hook = transport.grad_hook(i, self, ghost)
        lane = None if ctx is None else ctx.trace
        if lane is not None and hook is not None:
            hook = _traced_hook(hook, lane)
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
            transport.contribute(i, self, grads, ghost)
        be = self.backend
        local = (0.0, 0) if ghost else (float(be.to_host(loss)) * (hi - lo),
                                        int(be.to_host(correct)))
        if lane is not None:
            start = lane.span("contribute", cat="comm")
        t = time.perf_counter()
        g, a, b, totals = transport.combine(i, local)
        comm = time.perf_counter() - t
        if lane is not None:  # the transport's barrier, if it has one, is a span inside
            lane.span("reduce", start, cat="comm")
        if ctx is not None:  # every shard computed the same new statistics (synchronised)
            transport.commit_buffers(i, ctx)
        self.apply(g, a, b)
        if lane is not None:
            lane.span("update", cat="update")
        t = time.perf_counter()
        transport.done(i)
        comm += time.perf_counter() - t + transport.take_reduce_seconds(i)
        return local[0], local[1], comm, totals


def _traced_hook(hook: Callable, lane) -> Callable:
    """``hook`` (a transport's ``on_grads``) recording each call as a ``contribute`` span."""
    def on_grads(grads: dict) -> None:
        hook(grads)
        lane.span("contribute", cat="comm")
    return on_grads
