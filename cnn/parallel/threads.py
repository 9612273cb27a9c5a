"""Data-parallel Python threads on one machine: ``sync``, ``average`` and ``hogwild``.

All three run ``threads`` workers that live for the whole fit: the calling (main) thread is
worker 0 and ``threads - 1`` daemon threads are started in :meth:`~ThreadStrategy.start` and
ended in :meth:`~ThreadStrategy.close`. Per step the workers pass a few barriers (one to start,
one after each phase; :class:`~cnn.parallel.spin.SpinBarrier`s, which spin without the GIL
before they sleep); nothing is created per step. The per-shard work is the model's ordinary ``loss_and_grads`` on a CPU backend, and it
runs in parallel because the heavy ops release the GIL: NumPy's BLAS products, copies and
ufunc loops (with BLAS pinned to one thread per process by ``fit(blas_threads=1)``, so each
worker runs its products on its own core), or the Numba backend's ``nogil`` kernels. What still
holds the GIL is the Python between ops (and NumPy's small-array fast paths); that and memory
bandwidth bound the speed-up (``python -m cnn bench threads`` measures it).

The strategies
--------------
``sync``
    Each global batch of ``batch_size`` examples is cut into ``threads`` contiguous shards
    (sizes differ by at most one). Every worker computes the mean-loss gradient ``g_i`` of its
    shard on the same weights; then each worker combines, for its own fixed slice of the
    flattened parameters, ``g = sum_i (n_i / N) g_i`` in the fixed order ``i = 0 .. T-1`` and
    applies the optimizer update to that slice. That is the sequential algorithm (the gradient
    of the batch mean loss) up to the order of floating-point sums, and it does not depend on
    thread timing: the same run gives the same bits. Tested against the sequential path.
    Splitting the combination and the update across workers by slices of the flattened
    parameters is valid for element-wise optimizers (SGD with or without momentum: the state
    is per element); both then use both cores.
``average``
    Model averaging / local SGD (Zinkevich et al. 2010): worker ``i`` trains its own replica
    (weights, optimizer slots and buffers) with ``batch_size`` examples per step on its own part
    of the data, and every ``every`` steps (or, with ``every="epoch"``, the default, after each
    epoch) the replicas are replaced by their average, weighted by the examples each trained
    on. :class:`~cnn.parallel.average.AverageCore`'s steps (written once for threads and MPI
    ranks; the algorithm is described there) with the shared-memory transport: per-worker
    slots in ordinary NumPy memory and a barrier. Evaluation uses the
    average of the replicas.
``hogwild``
    Lock-free updates of shared weights (Niu et al. 2011): worker ``i`` computes the gradient
    of its shard (``batch_size`` examples) on the shared weights and applies its update to the
    shared arrays in place, with no lock, while the other workers are reading them and writing
    their own updates. A global step is ``threads * batch_size`` examples; the workers meet at
    one barrier per global step, which bounds staleness to one step but does not order the
    updates. The races it accepts, knowingly:

    - *torn reads*: a worker's forward/backward reads a weight array while another worker's
      ``param -= lr * g`` is half-way through it, so it computes with a mix of old and new
      values (different layers, or different elements of one array, from different versions);
    - *lost updates*: NumPy's in-place update is an element-wise read-modify-write with the
      GIL released (for arrays above NumPy's small-array threshold); when two workers update
      the same array at the same moment, one can read an element before the other stores it
      and then overwrite it, so that worker's contribution to that element is lost. Which
      elements, and how many, depends on timing: hogwild runs are **not reproducible**.

    Optimizer state: each worker keeps **its own slots** (velocity, Adam's moments; only the
    weights are shared), so the slots never race; the sum of the workers' velocities plays
    the role of the sequential velocity. The scalar step advances once per global step, and
    the state kept after the fit is worker 0's. With ``threads=1`` hogwild is exactly the
    sequential path. Buffers
    (batch-norm running statistics) are shared like the weights: each worker normalises with
    its own batch's statistics and then rebinds the shared buffers to its new running
    statistics, so the last worker to finish a step wins (another lost update, by design).

Only ``hogwild`` shares mutable state between running workers. In ``sync`` the workers read the
same weights while computing gradients (nobody writes them), then each writes only its own
disjoint slice of the combined gradient, the weights and the optimizer state; in ``average`` each
worker owns its replica, and an average writes disjoint slices of the mean, which each worker
then copies into its own replica. Barriers order the phases.

An exception in any worker stops the step: the other workers finish their current phase, skip
the rest, and the exception is re-raised in the main thread (with a note naming the worker);
``fit`` then calls :meth:`close`, which stops and joins every worker thread.

Backends: any CPU backend whose ops may be called from several threads at once (``numpy``,
``numba``). A backend that starts its own thread pool inside each op (its record's
``parallel_ops``: ``numba_parallel``) must not be called from several threads; device backends
(``cuda``) keep the weights on the GPU. Both are refused: with ``threads > 1`` (``parallel_ops``)
or always (device backends).
"""
from __future__ import annotations

import threading
import warnings
from typing import Any, Callable, Sequence

import numpy as np

from ..backends import Backend
from ..checks import check_int
from .average import AverageStrategy, check_every
from .base import Strategy, step_scalars
from .spin import SpinBarrier, warm_up as warm_up_spin
from .sync import SyncCore
from .transport import SharedReduce, SharedSlots, shard_bounds

Phase = Callable[[int], None]


class _Workers:
    """``n`` persistent workers: the caller is worker 0, ``n - 1`` daemon threads the others.

    :meth:`run` executes a sequence of *phases* (callables taking the worker index) on every
    worker, with a barrier after each phase, and returns when all workers have finished all
    phases. If a phase raises in any worker, the remaining phases are skipped by everyone and
    the first exception (lowest worker index) is re-raised in the caller.
    """

    #: seconds :meth:`close` lets the workers finish the last step before breaking its barrier
    CLOSE_GRACE = 0.5

    def __init__(self, n: int, name: str, on_error: Callable[[], None] | None = None):
        self.n = n
        # called (in the failing worker) when a phase raises: releases workers blocked in a
        # collective of the strategy's own (a barrier inside a phase), so none waits forever
        self._on_error = on_error
        self._phases: Sequence[Phase] = ()
        self._errors: list[BaseException | None] = [None] * n
        self._failed = False
        self._closed = False
        self._go = SpinBarrier(n)
        self._phase_done = SpinBarrier(n)
        #: the workers' :class:`cnn.trace.Lane` in a traced fit (None each otherwise): a
        #: worker thread's step and every barrier wait are spans there
        self.lanes: list = [None] * n
        self._threads = [threading.Thread(target=self._loop, args=(i,), name=f"{name}-worker-{i}",
                                          daemon=True) for i in range(1, n)]
        for t in self._threads:
            t.start()

    def _loop(self, i: int) -> None:
        try:
            while True:
                self._go.wait()
                if self._closed:
                    return
                lane = self.lanes[i]
                start = None if lane is None else lane.begin()
                self._run_phases(i)
                if lane is not None:
                    lane.span("step", start)
        except threading.BrokenBarrierError:
            return  # close() aborted the barriers

    def _run_phases(self, i: int) -> None:
        lane = self.lanes[i]
        for phase in self._phases:
            if not self._failed:
                try:
                    phase(i)
                except BaseException as err:  # noqa: BLE001 - handed to the main thread
                    self._errors[i] = err
                    self._failed = True
                    if self._on_error is not None:
                        self._on_error()
            if self.n > 1:
                self._phase_done.wait()
                if lane is not None:
                    lane.span("barrier", cat="barrier")

    def run(self, phases: Sequence[Phase]) -> None:
        if self._closed:
            raise RuntimeError("the worker threads are closed")
        if self.n == 1:
            for phase in phases:
                phase(0)
            return
        self._phases = phases
        self._go.wait()
        if self.lanes[0] is not None:
            self.lanes[0].span("barrier", cat="barrier")
        self._run_phases(0)
        if self._failed:
            # the first error that is not a consequence of another (a collective aborted
            # because some worker failed), lowest worker index first
            failed = [(i, e) for i, e in enumerate(self._errors) if e is not None]
            i, err = next(((i, e) for i, e in failed
                           if not isinstance(e, threading.BrokenBarrierError)), failed[0])
            self._errors = [None] * self.n
            self._failed = False
            if i > 0:
                err.add_note(f"(raised in worker thread {i} of {self.n})")
            raise err

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        # abort wakes the workers waiting for the next step with BrokenBarrierError; a worker
        # still leaving the last step's phase barrier finishes its step first (breaking that
        # barrier now would raise in it: its step would not end as it did)
        self._go.abort()
        for t in self._threads:
            t.join(self.CLOSE_GRACE)
        # a worker blocked in a step that never finished (the caller was interrupted in a
        # phase) finds the phase barrier broken and exits
        self._phase_done.abort()
        for t in self._threads:
            t.join()


class ThreadStrategy(Strategy):
    """Shared machinery: backend checks, the persistent workers, the barrier of a strategy's
    own collectives."""

    name = "threads"

    def __init__(self, threads: int = 1):
        super().__init__(threads)
        self._workers: _Workers | None = None
        #: the barrier inside the strategy's collectives (set by ``_setup``), if it has one
        self._barrier: SpinBarrier | None = None

    def _check_backend(self, backend: Backend) -> None:
        if getattr(backend, "on_device", False):
            raise ValueError(f"strategy {self.name!r} runs Python threads over a CPU backend; "
                             f"backend {backend.name!r} keeps the weights on a device. Use "
                             "strategy='sequential' on it (one device), or MPI for several")
        if backend.parallel_ops and self.threads > 1:
            raise ValueError(f"backend {backend.name!r} runs its own thread pool inside each op "
                             f"and must not be called from several threads. Received "
                             f"strategy={self.name!r}, threads={self.threads}; use "
                             f"backend='numba' (nogil kernels) with threads, or {backend.name} "
                             "with strategy='sequential'")

    @staticmethod
    def _warn_blas_threads(threads: int) -> None:
        if threads < 2:
            return
        try:
            from threadpoolctl import threadpool_info
            busy = [i for i in threadpool_info()
                    if i.get("user_api") == "blas" and i.get("num_threads", 1) > 1]
        except Exception:  # the probe must never break a fit
            return
        if busy:
            warnings.warn(f"{threads} worker threads with a multi-threaded BLAS "
                          f"({busy[0].get('internal_api')}, {busy[0].get('num_threads')} threads) "
                          "oversubscribe the cores; fit(blas_threads=1) pins BLAS to one "
                          "thread per worker", RuntimeWarning, stacklevel=4)

    def start(self, model, optimizer, backend, params, seed=0, **kwargs) -> None:
        self._check_backend(backend)
        self._warn_blas_threads(self.threads)
        super().start(model, optimizer, backend, params, seed, **kwargs)
        self._contexts = [self.new_context(i) for i in range(self.threads)]
        try:
            self._setup()
            self._workers = _Workers(self.threads, self.name, self._abort_collectives)
            self._workers.lanes = [ctx.trace for ctx in self._contexts]
        except BaseException:
            self.close()
            raise

    def warm_up(self) -> bool:
        if self.threads > 1:  # the barriers' poll loops
            warm_up_spin()
            return True
        return False

    def _setup(self) -> None:
        """Allocate per-fit buffers (before the threads start)."""

    def _abort_collectives(self) -> None:
        """Release workers waiting in a collective of the strategy's own (a failed step)."""
        if self._barrier is not None:
            self._barrier.abort()

    def _context(self, i: int):
        """Worker ``i``'s training context, at the current global step (the shard's offset and
        the global batch are set by whoever computes the shard)."""
        ctx = self._contexts[i]
        ctx.step = self.steps
        return ctx

    def _run(self, phases: Sequence[Phase]) -> None:
        if self._workers is None:
            raise RuntimeError(f"strategy {self.name!r} is not started (call start() first)")
        if self._barrier is not None and self._barrier.broken:
            self._barrier.reset()  # a failed step aborted it; every worker has left it since
        self._workers.run(phases)

    def close(self) -> None:
        if self._workers is not None:
            self._workers.close()
            self._workers = None


class SyncThreads(ThreadStrategy):
    """Synchronous data parallelism over threads: :class:`~cnn.parallel.sync.SyncCore`'s step
    (the sequential algorithm, written once for threads, processes and MPI) with the
    shared-memory transport: per-worker gradient slots in ordinary NumPy memory and a
    :class:`~cnn.parallel.spin.SpinBarrier`. See the module docstring.

    Args:
        threads: workers.
        reduce_bytes: bytes per worker for the cross-shard ``reduce`` of synchronised layers
            (batch statistics); the default holds 4,096 float32 values.
    """

    name = "sync"

    def __init__(self, threads: int = 1, reduce_bytes: int = 1 << 16):
        super().__init__(threads)
        self.reduce_bytes = check_int(None, "reduce_bytes", reduce_bytes, low=0)

    def check_batch_size(self, batch_size: int) -> None:
        if batch_size < self.threads:
            raise ValueError(f"strategy 'sync' splits each batch of batch_size={batch_size} "
                             f"examples into threads={self.threads} shards; every shard needs "
                             "at least one example, so use batch_size >= threads")

    def _setup(self) -> None:
        t = self.threads
        self._core = SyncCore(self.model, self.optimizer, self.backend, self.params, self.state,
                              flat=True)
        lay = self._core.layout
        self._barrier = SpinBarrier(t)
        reduce = SharedReduce(t, self._barrier, np.zeros((2, t, self.reduce_bytes), np.uint8))
        # the workers sum each other's gradient arrays in place (no slots); no barrier after
        # the update: _Workers.run passes one after the step's phase
        self._transport = SharedSlots(lay, None, np.empty(lay.total, lay.dtype), self._barrier,
                                      reduce, done_barrier=False, by_reference=True)
        self._transport.lanes = {i: c.trace for i, c in enumerate(self._contexts) if c.trace}
        self._out: list[Any] = [None] * t
        self._xb = self._yb = None

    def _work(self, i: int) -> None:
        self._out[i] = self._core.worker_step(i, self.threads, self._xb, self._yb,
                                              self._transport, self._context(i), *self._scalars)

    def step(self, xb, yb):
        if self._workers is None:
            raise RuntimeError(f"strategy {self.name!r} is not started (call start() first)")
        self._xb, self._yb = xb, yb
        self._out = [None] * self.threads
        # one learning rate and step number for every slice of this global step
        self._scalars = step_scalars(self.optimizer, self.state, self.steps)
        try:
            self._run((self._work,))
            self.steps += 1
            self.comm_time += self._out[0][2]  # as seen by worker 0
            return (sum(o[0] for o in self._out), sum(o[1] for o in self._out))
        finally:
            self._xb = self._yb = None
            self._out = [None] * self.threads


class AverageThreads(AverageStrategy, ThreadStrategy):
    """Model averaging over threads: :class:`~cnn.parallel.average.AverageCore`'s steps (one
    replica per thread, written once for threads and MPI ranks) with the shared-memory
    transport. See the module docstring.

    Args:
        threads: replicas (and worker threads).
        every: steps between averages (each step, every replica trains on one batch of
            ``batch_size``), or ``"epoch"`` (the default): average after each epoch, i.e. each
            thread trains on its own unique subset for a whole epoch.
    """

    name = "average"

    def __init__(self, threads: int = 1, every: "int | str" = "epoch"):
        super().__init__(threads)
        self.every = check_every(f"strategy {self.name!r}", every)

    @property
    def replica_count(self) -> int:
        return self.threads

    def _setup(self) -> None:
        t = self.threads
        core = self._start_average(range(t))
        lay = core.layout
        self._barrier = SpinBarrier(t)
        # the workers sum their ranges of the slots straight into the mean; the barrier after
        # it (done) makes the mean whole before each worker copies it into its replica
        self._transport = SharedSlots(lay, [np.empty(lay.total, lay.dtype) for _ in range(t)],
                                      core.mean.flat, self._barrier)
        self._out: list[Any] = [None] * t
        self._seconds = [0.0] * t
        self._xb = self._yb = None
        self._averaging: tuple = ()  # (weights, into_replicas) of the next average phase

    def _train(self, i: int) -> None:
        self._out[i] = self._core.train(i, self._xb, self._yb, self._context(i), *self._scalars)

    def _average_phase(self, i: int) -> None:
        self._seconds[i] = self._core.average(i, self._transport, *self._averaging)

    def _average(self, weights, into_replicas):
        self._averaging = (weights, into_replicas)
        self._run((self._average_phase,))
        return self._seconds[0]  # as seen by worker 0

    def _gather_replicas(self):
        return np.stack([self._core.replicas[i].flat for i in range(self.threads)])

    def _scatter_replicas(self, flats):
        if flats.shape != (self.threads, self._core.layout.total):
            raise ValueError(f"replicas of shape {flats.shape}; strategy {self.name!r} has "
                             f"{self.threads} of {self._core.layout.total} values")
        for i in range(self.threads):
            np.copyto(self._core.replicas[i].flat, flats[i])

    def step(self, xb, yb):
        if self._workers is None:
            raise RuntimeError(f"strategy {self.name!r} is not started (call start() first)")
        weights = self._core.begin_step(len(yb))
        self._xb, self._yb = xb, yb
        self._out = [None] * self.threads
        # one learning rate and update number for every replica (the scalar step is shared)
        self._scalars = step_scalars(self.optimizer, self.state, self.steps)
        phases: list[Phase] = [self._train]
        if weights is not None:
            self._averaging = (weights, True)
            phases.append(self._average_phase)
        try:
            self._run(phases)
            self.steps += 1
            if weights is not None:
                self.comm_time += self._seconds[0]
            return (sum(o[0] for o in self._out), sum(o[1] for o in self._out))
        finally:
            self._xb = self._yb = None
            self._out = [None] * self.threads


class HogwildThreads(ThreadStrategy):
    """Lock-free asynchronous updates of shared weights; per-worker momentum. See the module
    docstring for the races it accepts."""

    name = "hogwild"

    def examples_per_step(self, batch_size: int) -> int:
        return self.threads * batch_size

    def algorithm(self) -> dict:
        """Each worker's update uses its own shard, so the number of workers is part of it."""
        return {"algorithm": "hogwild", "workers": self.threads}

    def snapshot(self) -> dict:
        """The slots of workers 1 .. P-1 (worker 0's are the optimizer state the backup
        holds): a backup at a step boundary, when no update is in flight, has everything."""
        return {"slots": [self._slots[i] for i in range(1, self.threads)]}

    def restore(self, snapshot: dict) -> None:
        for mine, saved in zip(self._slots[1:], snapshot["slots"]):
            for name, per_key in mine.items():
                for key, a in per_key.items():
                    np.copyto(a, saved[name][key])

    def _shard_context(self, i: int, n: int):
        """Worker ``i``'s context for the current step: its shard's offset among the step's
        ``n`` examples (distinct dropout keys per example) and the global step. Each worker's
        shard is a whole batch of its own here (its update uses it alone), so ``global_batch``
        is None and ``reduce`` the identity: batch statistics are the worker's own."""
        ctx = self._contexts[i]
        ctx.step, ctx.offset, ctx.global_batch, ctx.reduce = self.steps, self._bounds[i][0], None, None
        return ctx

    def _host_sums(self, results, sizes) -> tuple[float, int]:
        be = self.backend
        loss, correct = 0.0, 0
        for r, n in zip(results, sizes):
            if r is not None:
                loss += float(be.to_host(r[0])) * n
                correct += int(be.to_host(r[1]))
        return loss, correct

    def _setup(self) -> None:
        t = self.threads
        # worker 0 uses the slots of the state start() made; the others get their own (zero)
        self._slots = [self.state.slots] + [self.optimizer.init_slots(self.params, self.backend)
                                            for _ in range(t - 1)]
        self._results: list[Any] = [None] * t
        self._bounds: list[tuple[int, int]] = []
        self._xb = self._yb = None

    def _train(self, i: int) -> None:
        lo, hi = self._bounds[i]
        if hi > lo:
            # reads self.params while other workers update it in place: see the module docstring
            ctx = self._shard_context(i, len(self._yb))
            loss, correct, grads = self.model.loss_and_grads(
                self._xb[lo:hi], self._yb[lo:hi], self.params, self.backend, ctx)
            lr, t = self._scalars
            self.optimizer.apply(self.params, grads, self._slots[i], self.backend, lr, t)
            # the shared buffers: each worker rebinds them to its own new statistics, the
            # last one to finish wins (batch norm's running statistics race like the weights)
            ctx.commit()
            self._results[i] = (loss, correct)

    def step(self, xb, yb):
        self._xb, self._yb = xb, yb
        self._bounds = shard_bounds(len(yb), self.threads)
        self._results = [None] * self.threads
        self._scalars = step_scalars(self.optimizer, self.state, self.steps)
        try:
            self._run((self._train,))
            self.steps += 1
            return self._host_sums(self._results, [hi - lo for lo, hi in self._bounds])
        finally:
            self._xb = self._yb = None
            self._results = [None] * self.threads
