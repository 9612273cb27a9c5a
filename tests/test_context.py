"""The step context: workspaces hand back the same buffer for the same request, and every
strategy passes each worker a training context that says where its shard sits."""
from __future__ import annotations

import numpy as np
import pytest

from cnn.backends import get_backend
from cnn.context import StepContext, Workspace
from cnn.layers import Layer
from cnn.model import Sequential
from cnn.layers import Dense, Flatten

NP = get_backend("numpy")


def test_workspace_reuses_buffers_per_name_shape_and_dtype():
    ws = Workspace(NP)
    a = ws.buffer("cols", (4, 5), np.float32)
    assert a.shape == (4, 5) and a.dtype == np.float32 and a.flags.c_contiguous
    assert ws.buffer("cols", (4, 5), np.float32) is a
    last = ws.buffer("cols", (3, 5), np.float32)                    # the last, smaller batch:
    assert last.shape == (3, 5) and np.shares_memory(last, a)       # the first rows of a
    assert ws.buffer("cols", (4, 5), np.float64) is not a
    assert ws.buffer("cols", (4, 5), np.float32) is a               # alternating shapes: no realloc
    conv, dense = ws.scope("conv2d"), ws.scope("dense")
    assert conv.buffer("cols", (4, 5), np.float32) is not a
    assert conv.buffer("cols", (4, 5), np.float32) is not dense.buffer("cols", (4, 5), np.float32)
    assert len(ws) == 4 and ws.nbytes == 4 * (20 + 20 + 20) + 8 * 20
    z = ws.zeros("acc", (3,), np.float64)
    z += 1
    assert np.array_equal(ws.zeros("acc", (3,), np.float64), np.zeros(3))


def test_context_defaults_are_one_shard_inference():
    ctx = StepContext()
    assert not ctx.training and ctx.scope("conv2d") is None
    arrays = [np.ones(2), np.zeros(3)]
    assert ctx.sum_over_shards(arrays) == arrays


class _Recorder(Layer):
    """Identity layer that records the context of every training forward."""

    type = "recorder"

    def __init__(self, log):
        super().__init__()
        self.log = log

    def forward(self, params, x, backend, ctx):
        if ctx.training:
            self.log.append((ctx.step, ctx.offset, ctx.global_batch, len(x),
                             ctx.workspace, ctx.seed))
        return x, None

    def backward(self, params, dout, cache, backend, ctx, need_dx=True):
        return dout, {}


@pytest.mark.parametrize("strategy,threads", [("sequential", 1), ("sync", 2), ("average", 2),
                                              ("hogwild", 2)])
def test_strategies_pass_each_worker_its_shard_position(strategy, threads):
    log: list = []
    model = Sequential([_Recorder(log), Flatten(), Dense(3)], (2, 2, 2), seed=0)
    x = np.random.default_rng(0).random((10, 2, 2, 2), dtype=np.float32)
    y = np.arange(10) % 3
    model.fit(x, y, epochs=2, batch_size=4, strategy=strategy, threads=threads, seed=7,
              shuffle=False, verbose=0)
    log = [e for e in log if e[4] is not None]  # drop the JIT warm-up pass, if any
    per_step = 4 * (threads if strategy in ("average", "hogwild") else 1)
    steps = 2 * -(-10 // per_step)
    assert sorted({e[0] for e in log}) == list(range(steps))       # global step, across epochs
    assert {e[5] for e in log} == {7}
    for step in range(steps):
        shards = sorted((e[1], e[3], e[2]) for e in log if e[0] == step)
        # shards tile the global batch: each starts where the previous ended
        starts = [o for o, _, _ in shards]
        ends = [o + n for o, n, _ in shards]
        assert starts[0] == 0 and starts[1:] == ends[:-1]
        # sync: every shard is part of one global batch; average/hogwild: each worker's
        # shard is a batch of its own (its own statistics), so no global batch
        expected = None if strategy in ("average", "hogwild") else ends[-1]
        assert {g for _, _, g in shards} == {expected}
    # one workspace per worker, kept for the whole fit
    assert len({id(e[4]) for e in log}) == threads
