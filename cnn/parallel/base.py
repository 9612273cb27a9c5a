"""Strategies: how a training step's work is split across workers.

The one fit loop (:mod:`cnn.train`) hands a strategy one *global batch* per step; the strategy
computes with the model's shared layer math on its backend and updates the parameters. A
strategy owns its workers (threads, ranks) for the whole fit: ``start`` creates them and
``close`` ends them, never per step.
"""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from ..backends import Backend
from ..checks import check_int
from ..context import StepContext, Workspace


class Strategy:
    """Base class and the contract every strategy follows."""

    name = "abstract"
    #: True in the one process that prints, shows progress, evaluates and saves (MPI: rank 0;
    #: nanoGPT's ``master_process``); every other strategy runs in one process
    is_master = True
    #: the :class:`cnn.trace.Tracer` of a traced fit (set by ``fit`` before :meth:`start`), or
    #: None: then no worker records anything
    tracer = None

    def __init__(self, threads: int = 1):
        self.threads = check_int(None, "threads", threads)
        #: seconds spent combining gradients between workers (threads and processes: the
        #: reduce phase; MPI: the allreduce) since the last :meth:`take_comm_time`
        self.comm_time = 0.0

    def take_comm_time(self) -> float:
        """The communication seconds accumulated since the last call (the fit loop calls it
        once per epoch for the ``comm_time`` column), and restart the count."""
        t, self.comm_time = self.comm_time, 0.0
        return t

    def abort(self, err: BaseException) -> None:
        """Called by ``fit`` when training stops with ``err``, before :meth:`close`. A strategy
        whose workers could be left waiting for this one ends them (MPI: ``MPI_Abort``)."""

    def share_metrics(self, values: dict[str, float]) -> dict[str, float]:
        """The master's ``values`` (validation metrics it alone computed) on every process;
        one process: ``values`` as they are."""
        return values

    def share(self, value: Any) -> Any:
        """The master's JSON-able ``value`` on every process (what it read from a backup);
        one process: ``value`` as it is."""
        return value

    # ---- stopping at a step boundary ------------------------------------------------------------
    def request_stop(self) -> None:
        """Ask the fit to stop after the step in progress (safe to call from a signal
        handler: it only sets a flag). See :meth:`stop_requested`."""
        self._stop_vote = True

    def stop_requested(self) -> bool:
        """Whether the fit stops now, at this step boundary: the same answer on every process
        of the job (MPI ranks agree through the step's own collective, so all of them stop
        after the same step). One process: whether :meth:`request_stop` was called."""
        return getattr(self, "_stop_vote", False)

    # ---- what a backup holds (cnn.backup) --------------------------------------------------------
    def algorithm(self) -> dict:
        """What a run's result depends on besides the model, the data and the optimizer: a
        backup written by one strategy continues under another whose ``algorithm()`` is equal.
        The ``sync`` family (sequential, ``sync`` threads, processes, MPI ranks) computes the
        same update from the same global batch whatever the number of workers (up to the order
        of floating-point sums), so it does not name the workers."""
        return {"algorithm": "sync"}

    def snapshot(self) -> Any:
        """What this strategy holds beyond :meth:`current_params`, :meth:`current_buffers` and
        :meth:`current_state` that a backup needs to continue the run exactly (arrays and
        plain values; None: nothing). Called on every process at the same step (it may be a
        collective); what the master returns is written."""
        return None

    def restore(self, snapshot: Any) -> None:
        """After :meth:`start`: continue from ``snapshot`` (what :meth:`snapshot` returned on
        the master when the backup was written; on other processes its arrays are None)."""

    def examples_per_step(self, batch_size: int) -> int:
        """How many examples one ``step`` consumes (``batch_size`` unless each worker takes a
        batch of its own)."""
        return batch_size

    def check_batch_size(self, batch_size: int) -> None:
        """Raise ``ValueError`` when this strategy cannot split batches of ``batch_size``."""

    def start(self, model, optimizer, backend: Backend, params: dict[str, Any],
              seed: int = 0, state=None) -> None:
        """Set up for a fit: ``params`` are the backend arrays to train (updated in place);
        ``seed`` keys the randomness inside training steps (see :mod:`cnn.context`);
        ``state`` is the :class:`~cnn.optim.OptimizerState` to continue from (on ``backend``;
        None: a fresh one). How a strategy applies the optimizer: see :mod:`cnn.optim`."""
        self.model, self.optimizer, self.backend, self.params = model, optimizer, backend, params
        self.state = optimizer.init_state(params, backend) if state is None else state
        #: the buffers the workers read (batch norm's running statistics), on the backend; a
        #: training pass leaves new values in its context's ``updates`` and the strategy
        #: commits them (``ctx.commit()``), once per copy of the buffers
        self.buffers = {k: backend.asarray(v.copy()) for k, v in model.buffers.items()}
        self.seed = seed

    @property
    def steps(self) -> int:
        """Global optimizer steps taken so far, across epochs and ``fit`` calls: the optimizer
        state's scalar ``step`` (so it persists with the state). It is the ``step`` of every
        context (it keys dropout masks) and schedules read it; a strategy advances it once
        per global step (``self.steps += 1``)."""
        return self.state.step

    @steps.setter
    def steps(self, value: int) -> None:
        self.state.step = int(value)

    def learning_rate(self) -> float:
        """The learning rate of the global step about to be taken (the optimizer's schedule
        at :attr:`steps`); every update of that step uses it."""
        return self.optimizer.learning_rate(self.steps)

    def current_state(self):
        """The optimizer state that represents the run now (kept by ``fit`` for the next one;
        ``average`` averages its replicas' slots, ``hogwild`` gives worker 0's)."""
        return self.state

    def new_context(self, worker: int = 0) -> StepContext:
        """A training context for worker ``worker``, with a workspace of its own (one per
        worker, kept for the whole fit, so steps after the first reuse its buffers) and, in a
        traced fit, the worker's lane of the timeline (worker 0's is the fit loop's)."""
        lane = None if self.tracer is None else self.tracer.lane(
            worker, f"{self.name} worker {worker}")
        return StepContext(training=True, workspace=Workspace(self.backend), seed=self.seed,
                           buffers=self.buffers, trace=lane)

    def merge_trace(self, tracer) -> None:
        """Bring the timelines of the workers that run elsewhere (worker processes, other MPI
        ranks) into ``tracer``, on its clock; called by a traced fit after the last epoch (a
        collective for MPI). Workers in this process record into ``tracer`` directly."""

    def step(self, xb, yb) -> tuple[float, int]:
        """Train on one global batch (backend arrays). Returns the sum of the per-example
        losses and the number of correctly classified examples, as host numbers."""
        raise NotImplementedError

    def batch_buffers(self, rows: int, x_dtype, y_dtype) -> list | None:
        """Where the fit loop gathers batches of up to ``rows`` examples: None (buffers of its
        own), or reused ``(x, y)`` pairs of that capacity (at least two) that the strategy's
        workers read in place, with ``x_dtype`` and ``y_dtype``."""
        return None

    def warm_up(self) -> bool:
        """Compile what the strategy's own steps run (called by ``fit`` in its warm-up, so that
        the compilation is timed as ``compile_time`` and no epoch pays for it); whether there
        was anything to compile."""
        return False

    def local_rows(self, n: int) -> tuple[int, int]:
        """The rows ``[lo, hi)`` of a global batch of ``n`` examples that this process needs:
        all of them (the default), or, where each process computes on a part alone (an MPI
        rank), that part, so that the fit loop gathers only it (PyTorch's
        ``DistributedSampler``) and hands it to :meth:`step_rows`."""
        return 0, n

    def step_rows(self, xb, yb, n: int) -> tuple[float, int]:
        """Train on one global batch of ``n`` examples of which ``xb, yb`` hold the rows
        :meth:`local_rows` gave (the fit loop's call); returns what :meth:`step` does. The
        default, for strategies that take every row, is :meth:`step`."""
        return self.step(xb, yb)

    def current_params(self) -> dict[str, Any]:
        """The parameters that represent the model now (for evaluation and the final copy)."""
        return self.params

    def current_buffers(self) -> dict[str, Any]:
        """The buffers that go with :meth:`current_params` (for evaluation and the final copy)."""
        return self.buffers

    def end_epoch(self) -> None:
        """Called after the last step of each epoch (strategies that average do it here)."""

    def close(self) -> None:
        """Release workers. Safe to call twice."""

    def describe(self) -> dict:
        return {"strategy": self.name, "threads": self.threads}


class SequentialStrategy(Strategy):
    """One worker: forward, loss, backward and update on the whole batch. The baseline."""

    name = "sequential"

    def __init__(self, threads: int = 1):
        super().__init__(threads)
        if threads != 1:
            raise ValueError(f"the sequential strategy runs one worker. Received threads={threads}; "
                             "use strategy='sync', 'average' or 'hogwild' for more")

    def start(self, model, optimizer, backend, params, seed=0, state=None) -> None:
        super().start(model, optimizer, backend, params, seed, state)
        self._ctx = self.new_context()

    def step(self, xb, yb):
        be = self.backend
        self._ctx.step, self._ctx.global_batch = self.steps, len(yb)
        loss, correct, grads = self.model.loss_and_grads(xb, yb, self.params, be, self._ctx)
        self.optimizer.update(self.params, grads, self.state, be)  # advances self.steps
        if self._ctx.trace is not None:
            self._ctx.trace.span("update", cat="update")
        self._ctx.commit()
        return float(be.to_host(loss)) * len(yb), int(be.to_host(correct))


# ---- the optimizer's state, as every strategy handles it -----------------------------------------
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
