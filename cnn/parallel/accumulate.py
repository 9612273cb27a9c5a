"""Micro-batch gradient accumulation on one thread: the ``sync`` algorithm, serially.

Each global batch of ``batch_size`` examples is cut into ``micro_batches`` contiguous shards
(the same :func:`~cnn.parallel.transport.shard_bounds` as ``sync``); one worker computes the
mean-loss gradient ``g_i`` of each shard in turn and accumulates ``g = sum_i (n_i / N) g_i``;
then one optimizer update. That is the arithmetic of ``sync`` with ``micro_batches`` threads,
done by one thread: the study's single-thread contender for ``sync`` (a ``sync`` speed-up over
it is parallelism; a speed-up over the whole-batch sequential path may also be the smaller
per-shard batch being faster per image).

Constructed as ``make_strategy("accumulate", threads=m)``: ``threads`` is the number of
micro-batches (the study's grid calls it so for this path); one worker runs them. Layers with
batch statistics (batch normalisation) see each micro-batch on its own here ("ghost" batch
norm), unlike ``sync``, whose shards share their statistics: for such models accumulation is
not the sequential algorithm.
"""
from __future__ import annotations

import numpy as np

from ..checks import check_int
from .base import Strategy
from .transport import shard_bounds


class AccumulateStrategy(Strategy):
    """One worker, ``micro_batches`` micro-batches per step, one update (CPU backends)."""

    name = "accumulate"

    def __init__(self, threads: int = 1, micro_batches: int | None = None):
        super().__init__(threads)
        m = threads if micro_batches is None else micro_batches
        self.micro_batches = check_int("strategy 'accumulate'", "micro_batches", m)
        self.threads = 1  # one worker runs every micro-batch

    def algorithm(self) -> dict:
        """The ``sync`` arithmetic, but batch statistics per micro-batch: their number counts."""
        return {"algorithm": "accumulate", "micro_batches": self.micro_batches}

    def check_batch_size(self, batch_size: int) -> None:
        if batch_size < self.micro_batches:
            raise ValueError(f"strategy 'accumulate' splits each batch of batch_size="
                             f"{batch_size} into micro_batches={self.micro_batches}; use "
                             f"batch_size >= micro_batches")

    def start(self, model, optimizer, backend, params, seed=0, state=None) -> None:
        if backend.on_device:  # the accumulator and its sums are host arrays
            raise ValueError(f"strategy 'accumulate' runs on CPU backends; backend "
                             f"{backend.name!r} keeps the weights on a device")
        super().start(model, optimizer, backend, params, seed, state)
        self._ctx = self.new_context()
        self._acc = {k: np.zeros_like(v) for k, v in params.items()}  # reused every step

    def step(self, xb, yb):
        be = self.backend
        n = len(yb)
        loss_sum, correct, first = 0.0, 0, True
        self._ctx.step, self._ctx.global_batch = self.steps, n
        for lo, hi in shard_bounds(n, self.micro_batches):
            if hi == lo:
                continue
            # the gradients of this shard's share n_i/N of the batch's mean loss (sync's
            # convention), so the shards' gradients simply add up
            w = (hi - lo) / n
            loss, ok, grads = self.model.loss_and_grads(xb[lo:hi], yb[lo:hi], self.params, be,
                                                        self._ctx, loss_scale=w)
            for k, acc in self._acc.items():  # grads may be workspace buffers: use them now
                if first:
                    np.copyto(acc, grads[k])
                else:
                    acc += grads[k]
            first = False
            loss_sum += float(be.to_host(loss)) * (hi - lo)
            correct += int(be.to_host(ok))
        self.optimizer.update(self.params, self._acc, self.state, be)  # advances self.steps
        self._ctx.commit()
        return loss_sum, correct

    def describe(self) -> dict:
        return {**super().describe(), "micro_batches": self.micro_batches}
