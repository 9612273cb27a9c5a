"""The ``average`` algorithm, written once: local SGD / model averaging (Zinkevich et al. 2010).

Every worker trains a replica of its own on its own examples, and every ``every`` global steps
the replicas are replaced by their average. Threads (strategy ``average``,
:class:`~cnn.parallel.threads.AverageThreads`) and MPI ranks (``mpi_average``,
:class:`~cnn.parallel.mpi.MPIAverage`) run the same per-worker steps, :meth:`AverageCore.train`
and :meth:`AverageCore.average`; they differ only in the *transport* that moves the replicas
between workers, the one ``sync`` uses (:class:`~cnn.parallel.transport.Transport`: shared slots
and a barrier for threads, one ``Allreduce`` of a flat buffer for MPI).

1. **replicas**: worker ``i`` of ``P`` owns replica ``i``: the weights, every optimizer slot
   (velocity, Adam's ``m`` and ``v``) and the buffers (batch norm's running statistics), all
   views of one flat vector (:class:`Replica`, laid out by a
   :class:`~cnn.parallel.transport.FlatLayout`). Every replica starts as a copy of the model.
2. **train**: a global step is ``P * batch_size`` examples; worker ``i`` takes shard ``i`` of
   it (:func:`~cnn.parallel.transport.shard_bounds`; within an epoch the replicas see disjoint
   examples that together cover the training set) and takes one optimizer step of its replica
   on that shard alone: the shard's own batch statistics (no reduce across workers), its own
   new buffer values, dropout masks keyed by each example's position in the global step. Every
   replica uses the global step's learning rate and 1-based number; the scalar step (Adam's
   bias correction, schedules) advances once per global step.
3. **average**: after every ``every``-th global step (``every="epoch"``, the default: after
   each epoch) every replica is replaced by the weighted mean ``x = sum_i w_i x_i``, with
   ``w_i = c_i / sum_j c_j`` and ``c_i`` the examples replica ``i`` trained on since the last
   average, over the whole flat vector (weights, slots and buffers alike):

   a. *contribute*: worker ``i`` writes ``w_i x_i`` into its slot (zeros when ``c_i = 0``);
   b. *combine* (the transport): the sum over the workers, for a range ``[lo, hi)`` (threads:
      worker ``j`` adds the slots in the fixed order ``0 .. P-1`` over its own ``1/P`` of the
      vector, so the same run gives the same bits; MPI: the whole vector on every rank);
   c. worker ``i`` writes ``[lo, hi)`` of the sum into the *mean*, the copy the strategy
      reports (for evaluation, and the weights and optimizer state ``fit`` ends with);
   d. *done* (the transport: threads pass a barrier, so the mean is whole), then worker ``i``
      copies the mean into its replica.

   Between averages the strategy reports the mean of the replicas as they are: steps a-c
   without d (the replicas go on unchanged).

Averaging the optimizer slots too makes ``every=1`` with SGD exactly synchronous SGD on the
global batch of ``P * batch_size`` examples, for models without batch norm (whose replicas
normalise with their own shard's statistics); with one worker (``w_0 = 1``) ``average`` is the
sequential path, bit for bit. All arithmetic is in the parameters' dtype.
"""
from __future__ import annotations

import time
from typing import Any, Sequence

import numpy as np

from ..checks import is_integer
from .base import state_with_arrays
from .transport import FlatLayout, Transport, flat_view, own_rows, shard_bounds

__all__ = ["AverageCore", "AverageStrategy", "Replica", "check_every"]


def check_every(owner: str, every: Any) -> "int | str":
    """The ``every`` option of an averaging strategy: a positive number of global steps
    between averages, or ``"epoch"`` (after each epoch); else a ``ValueError`` naming
    ``owner`` and the value."""
    if isinstance(every, str) and every == "epoch":
        return every
    if not is_integer(every) or every < 1:
        raise ValueError(f"{owner}: every must be a positive number of steps or 'epoch'. "
                         f"Received every={every!r}")
    return int(every)


# the names of a replica's arrays in its flat layout (one namespace for weights, optimizer
# slots and buffers, whose own keys may coincide)
def _leaves(params: dict, state, buffers: dict) -> dict[str, Any]:
    return {**{f"param/{k}": v for k, v in params.items()},
            **{f"slot/{n}/{k}": a for n, s in state.slots.items() for k, a in s.items()},
            **{f"buffer/{k}": v for k, v in buffers.items()}}


class Replica:
    """One copy of everything ``average`` averages, in one flat vector ``flat`` of
    ``layout.total`` elements: ``params``, ``state`` (an :class:`~cnn.optim.OptimizerState`
    with the same slots) and ``buffers`` are views of it, shaped like the arrays they were
    copied from."""

    def __init__(self, layout: FlatLayout, params: dict, state, buffers: dict):
        self.layout = layout
        self.flat = layout.pack(_leaves(params, state, buffers),
                                np.empty(layout.total, layout.dtype))
        views = layout.views(self.flat)
        self.params = {k: views[f"param/{k}"] for k in params}
        self.state = state_with_arrays(state, [views[f"slot/{n}/{k}"]
                                               for n, s in state.slots.items() for k in s])
        self.buffers = {k: views[f"buffer/{k}"] for k in buffers}

    def copy(self) -> "Replica":
        return Replica(self.layout, self.params, self.state, self.buffers)


class AverageCore:
    """The transport-independent part of ``average`` (see the module docstring): the
    replicas, the examples each trained on, when to average, a training step, the average.

    Args:
        model: the :class:`~cnn.model.Sequential` whose ``loss_and_grads`` trains a replica.
        optimizer: a :class:`cnn.optim.Optimizer` (``apply`` with the step's ``lr`` and ``t``).
        backend: a CPU backend (host NumPy arrays).
        params, state, buffers: the starting weights, :class:`~cnn.optim.OptimizerState` and
            buffers (host arrays of one dtype); copied, never modified.
        workers: ``P``, the replicas over all processes.
        local: the workers whose replicas this process holds (threads: all of them; an MPI
            rank: its own).
        every: steps between averages, or ``"epoch"`` (see :func:`check_every`).

    Attributes:
        mean: the :class:`Replica` the strategy reports; its ``state.step`` is the fit's
            scalar step (the replicas' own ``step`` is unused).
        replicas: ``{worker: Replica}`` of the ``local`` workers.
    """

    def __init__(self, model, optimizer, backend, params: dict, state, buffers: dict,
                 workers: int, local: Sequence[int], every: "int | str"):
        leaves = _leaves(params, state, buffers)
        dtype = FlatLayout(params).dtype  # (a ValueError if there are none, or several)
        for name, a in leaves.items():
            flat_view(a)  # host and C-contiguous, or a ValueError
            if a.dtype != dtype:
                raise ValueError(f"averaging keeps a replica in one flat vector of the "
                                 f"parameters' dtype; {name} has dtype {a.dtype}")
        self.model, self.optimizer, self.backend = model, optimizer, backend
        self.workers, self.every = workers, every
        self.layout = FlatLayout(leaves)
        self.mean = Replica(self.layout, params, state, buffers)
        self.replicas = {i: self.mean.copy() for i in local}
        self._counts = [0] * workers  # examples per replica since the last average
        self._since = 0  # global steps since the last average (the same on every worker)
        self._mean_current = True  # whether the mean is the mean of the replicas as they are

    # ---- when to average ---------------------------------------------------------------------
    def _weights(self) -> list[float]:
        """``w_i = c_i / sum_j c_j`` for every worker."""
        total = sum(self._counts)
        return [c / total for c in self._counts]

    def _take_weights(self) -> list[float]:
        """The weights of an average into the replicas, which starts a new period."""
        weights = self._weights()
        self._counts, self._since, self._mean_current = [0] * self.workers, 0, True
        return weights

    def begin_step(self, n: int) -> list[float] | None:
        """Record a global step of ``n`` examples (every worker's shard; call it once per
        process, before the step). Returns the weights to average the replicas with after the
        step when one is due (every ``every`` steps), else None."""
        for i, (lo, hi) in enumerate(shard_bounds(n, self.workers)):
            self._counts[i] += hi - lo
        self._since += 1
        self._mean_current = False
        if self.every != "epoch" and self._since % self.every == 0:
            return self._take_weights()
        return None

    def end_epoch(self) -> list[float] | None:
        """The weights to average the replicas with after an epoch (``every="epoch"`` and
        they trained since the last average), else None."""
        return self._take_weights() if self.every == "epoch" and self._since else None

    def progress(self) -> dict:
        """Where the averaging period stands: the examples each replica trained on and the
        global steps since the last average (what a backup keeps with the replicas)."""
        return {"counts": list(self._counts), "since": self._since}

    def set_progress(self, progress: dict) -> None:
        """Continue the averaging period that :meth:`progress` described (the replicas set
        by the caller); the mean is recomputed when next asked for."""
        counts = [int(c) for c in progress["counts"]]
        if len(counts) != self.workers:
            raise ValueError(f"averaging progress of {len(counts)} replicas; this strategy has "
                             f"{self.workers}")
        # after an average (no example since) the replicas are the mean the backup holds
        self._counts, self._since = counts, int(progress["since"])
        self._mean_current = not any(counts)

    def mean_weights(self) -> list[float] | None:
        """The weights to refresh the mean with (leaving the replicas as they are) when the
        replicas have trained since it was computed, else None."""
        if self._mean_current:
            return None
        self._mean_current = True
        return self._weights()

    # ---- the worker's part -------------------------------------------------------------------
    def train(self, i: int, xb, yb, ctx, lr: float, t: int,
              global_size: int | None = None) -> tuple[float, int]:
        """Worker ``i`` trains its replica on its shard of the global batch ``xb, yb`` (with
        ``ctx``, whose ``step`` the strategy has set; ``lr`` and ``t``: the global step's
        learning rate and 1-based number); with ``global_size`` (the global batch's size),
        ``xb, yb`` hold the shard alone (a process that gathers its own shard). Returns the
        shard's summed loss and its correct count as host numbers (0 for an empty shard)."""
        lo, hi = shard_bounds(len(yb) if global_size is None else global_size, self.workers)[i]
        if hi == lo:
            return 0.0, 0
        xb, yb = own_rows(xb, yb, lo, hi, global_size)
        rep = self.replicas[i]
        # the shard is the replica's whole batch: its own statistics, its own buffers; its
        # offset keys dropout masks by the example's position in the global step
        ctx.offset, ctx.global_batch, ctx.reduce, ctx.buffers = lo, None, None, rep.buffers
        loss, correct, grads = self.model.loss_and_grads(xb, yb, rep.params, self.backend, ctx)
        self.optimizer.apply(rep.params, grads, rep.state.slots, self.backend, lr, t)
        ctx.commit(copy=True)  # into the replica's flat vector
        be = self.backend
        return float(be.to_host(loss)) * (hi - lo), int(be.to_host(correct))

    def average(self, i: int, transport: Transport, weights: Sequence[float],
                into_replicas: bool) -> float:
        """Worker ``i``'s part of the collective average (steps a-d of the module docstring;
        every worker calls it with the same ``weights``): the mean becomes ``sum_j w_j x_j``
        and, with ``into_replicas``, so does every replica. Returns the seconds it took.

        After ``transport.done`` the mean must be whole in this process: the workers of one
        process share it (threads: the transport sums straight into it), or one worker's range
        is the whole vector (an MPI rank)."""
        start = time.perf_counter()
        rep, total = self.replicas[i], self.layout.total
        slot = transport.slot(i)[:total]
        if weights[i]:
            np.multiply(rep.flat, weights[i], out=slot)
        else:  # trained on nothing since the last average
            slot[...] = 0
        g, lo, hi, _ = transport.combine(i, (0.0, 0))
        mean = self.mean.flat[lo:hi]
        if not np.may_share_memory(g, mean):  # threads sum straight into the mean
            np.copyto(mean, g)
        transport.done(i)
        if into_replicas:
            np.copyto(rep.flat, self.mean.flat)
        return time.perf_counter() - start


class AverageStrategy:
    """What the ``average`` strategies share, mixed in before their base class
    (``class AverageThreads(AverageStrategy, ThreadStrategy)``): the replicas' count per
    step, the description, the average after an epoch, and the mean as the current weights,
    optimizer state and buffers.

    A strategy using it sets ``every`` (:func:`check_every`) in ``__init__``, calls
    :meth:`_start_average` in ``start`` and implements :attr:`replica_count` and
    :meth:`_average`, which runs :meth:`AverageCore.average` on every worker.
    """

    every: "int | str"

    @property
    def replica_count(self) -> int:
        raise NotImplementedError

    def _average(self, weights: Sequence[float], into_replicas: bool) -> float:
        """Run :meth:`AverageCore.average` on every worker; returns worker 0's seconds (this
        process's own, for MPI)."""
        raise NotImplementedError

    def _start_average(self, local: Sequence[int]) -> AverageCore:
        """Make the core from the fit's weights, state and buffers (after ``Strategy.start``);
        from then on ``params``, ``state`` and ``buffers`` are the core's mean."""
        core = AverageCore(self.model, self.optimizer, self.backend, self.params, self.state,
                           self.buffers, self.replica_count, local, self.every)
        self._core = core
        self.params, self.state, self.buffers = core.mean.params, core.mean.state, core.mean.buffers
        return core

    def _gather_replicas(self) -> "np.ndarray | None":
        """Every replica's flat vector, ``(replicas, total)``, on the master (a collective for
        MPI; other ranks get None)."""
        raise NotImplementedError

    def _scatter_replicas(self, flats: "np.ndarray | None") -> None:
        """Set every local replica from the master's ``flats`` (``(replicas, total)``)."""
        raise NotImplementedError

    def examples_per_step(self, batch_size: int) -> int:
        return self.replica_count * batch_size

    def algorithm(self) -> dict:
        """Averaging depends on the number of replicas (the examples of a global step, each
        replica's shard) and on the period, so a backup continues only with the same ones."""
        return {"algorithm": "average", "replicas": self.replica_count, "every": self.every}

    def snapshot(self) -> dict:
        """The replicas themselves (between averages they differ from the mean the backup
        holds as the weights) and the averaging period's progress: with them the run continues
        bit for bit."""
        return {"replicas": self._gather_replicas(), **self._core.progress()}

    def restore(self, snapshot: dict) -> None:
        self._scatter_replicas(snapshot["replicas"])
        self._core.set_progress(snapshot)

    def describe(self) -> dict:
        return {**super().describe(), "average_every": self.every}

    def end_epoch(self) -> None:
        weights = self._core.end_epoch()
        if weights is not None:
            self.comm_time += self._average(weights, into_replicas=True)

    def _refresh_mean(self) -> None:
        """Make the mean that of the replicas as they are (a collective for MPI: every rank
        calls it, as ``fit`` does, at the same points)."""
        core = getattr(self, "_core", None)
        weights = None if core is None else core.mean_weights()
        if weights is not None:
            self._average(weights, into_replicas=False)

    def current_params(self) -> dict:
        """The weighted mean of the replicas (the replicas are left as they are)."""
        self._refresh_mean()
        return self.params

    def current_buffers(self) -> dict:
        """The buffers of the mean (see :meth:`current_params`)."""
        self._refresh_mean()
        return self.buffers

    def current_state(self):
        """The optimizer state of the mean: every slot averaged like the weights."""
        self._refresh_mean()
        return self.state
