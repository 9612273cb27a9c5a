"""The layers of issue 12 on every data-parallel path: ``sync`` over threads, worker processes
and MPI ranks equals the sequential path with dropout and batch norm (masks keyed by the global
example index; batch statistics, forward and backward, reduced across shards; running
statistics committed once per copy), ``average`` is local SGD whose replicas keep and average
their own batch-norm statistics (against a naive loop over the replicas), ``hogwild`` runs.

Model: ``parallel_helpers.LAYERS_SPEC`` on 50 blobs, batch 7 (shards of 4/3, 3/2/2, 2/2/2/1,
and a last batch of one example, so every worker but the first runs a ghost pass)."""
from __future__ import annotations

import json

import numpy as np
import pytest

from cnn.context import StepContext
from cnn.parallel.transport import shard_bounds
from parallel_helpers import (OPT, blobs, build, max_abs_diff, max_rel_diff, run_mpi_checks,
                              train)

BUFFERS = ("batchnorm.running_mean", "batchnorm.running_var", "batchnorm_1.running_mean",
           "batchnorm_1.running_var")


def layers_run(strategy="sequential", threads=1, **kw):
    return train(strategy, threads, kind="layers", **kw)[0]


_SEQ: dict = {}


def sequential(**kw):
    key = tuple(sorted((k, str(v)) for k, v in kw.items()))
    if key not in _SEQ:
        _SEQ[key] = layers_run(**kw)
    return _SEQ[key]


def test_the_runs_have_buffers_and_they_moved():
    ref = sequential()
    assert set(BUFFERS) <= set(ref)
    assert not np.allclose(ref["batchnorm.running_mean"], 0)
    assert not np.allclose(ref["batchnorm_1.running_var"], 1)


@pytest.mark.parametrize("backend", ["numpy", "numba"])
@pytest.mark.parametrize("threads", [2, 3, 4])
def test_sync_threads_with_dropout_and_batchnorm_equal_sequential(backend, threads):
    ref = sequential(backend=backend)
    got = layers_run("sync", threads, backend=backend)
    assert got.keys() == ref.keys()
    assert max_abs_diff(got, ref) < 1e-12


def test_sync_threads_float32():
    ref = sequential(dtype=np.float32)
    got = layers_run("sync", 2, dtype=np.float32)
    # the conv bias before batch norm only ever gets rounding noise (its exact gradient is 0)
    bias = "conv2d.b"
    assert np.abs(got[bias] - ref[bias]).max() < 1e-5
    assert max_rel_diff({k: v for k, v in got.items() if k != bias},
                        {k: v for k, v in ref.items() if k != bias}) < 1e-5


def test_masks_really_depend_on_the_example_not_the_worker():
    """A control: keying the masks by the shard-local index (what a per-worker generator would
    do) breaks the equality that the test above asserts."""
    from cnn import layers as layers_mod

    original = layers_mod.Dropout.forward

    def local_masks(self, params, x, backend, ctx):
        saved = ctx.offset
        ctx.offset = 0
        try:
            return original(self, params, x, backend, ctx)
        finally:
            ctx.offset = saved

    layers_mod.Dropout.forward = local_masks
    try:
        got = layers_run("sync", 2)
    finally:
        layers_mod.Dropout.forward = original
    assert max_abs_diff(got, sequential()) > 1e-3


def test_sync_processes_equal_sequential():
    got = layers_run("processes", 2)
    assert max_abs_diff(got, sequential()) < 1e-12


@pytest.mark.parametrize("strategy", ["average", "hogwild"])
def test_one_worker_is_the_sequential_path(strategy):
    got = layers_run(strategy, 1)
    ref = sequential()
    assert all(np.array_equal(got[k], ref[k]) for k in ref)


def naive_local_sgd(every, batch_size=5, replicas=2, epochs=2, seed=5):
    """Replicas trained one after the other in plain loops, each on its shard of every global
    step, with its own batch-norm statistics and the dropout masks of its examples' global
    positions; weights, velocities and buffers averaged (weighted by examples) every ``every``
    steps or (``None``) after each epoch; the result: the average."""
    x, y = blobs()
    model = build("layers")
    reps = [{k: v.copy() for k, v in model.params.items()} for _ in range(replicas)]
    vels = [{k: np.zeros_like(v) for k, v in model.params.items()} for _ in range(replicas)]
    bufs = [{k: v.copy() for k, v in model.buffers.items()} for _ in range(replicas)]
    counts = [0] * replicas
    rng = np.random.default_rng(seed)
    step = since = 0

    def average():
        total = sum(counts)
        for group in (reps, vels, bufs):
            for k in group[0]:
                avg = sum(counts[r] * group[r][k] for r in range(replicas)) / total
                for r in range(replicas):
                    group[r][k] = avg.copy()
        counts[:] = [0] * replicas

    for _ in range(epochs):
        order = rng.permutation(len(x))
        for i in range(0, len(x), replicas * batch_size):
            idx = order[i:i + replicas * batch_size]
            for r, (lo, hi) in enumerate(shard_bounds(len(idx), replicas)):
                if hi > lo:
                    ctx = StepContext(training=True, seed=seed, step=step, offset=lo,
                                      global_batch=len(idx), buffers=bufs[r])
                    _, _, g = model.loss_and_grads(x[idx[lo:hi]], y[idx[lo:hi]], reps[r],
                                                   ctx=ctx)
                    for k in g:
                        vels[r][k] = OPT["momentum"] * vels[r][k] - OPT["lr"] * g[k]
                        reps[r][k] = reps[r][k] + vels[r][k]
                    ctx.commit()
                    counts[r] += hi - lo
            step += 1
            since += 1
            if every is not None and since % every == 0:
                average()
        if every is None:
            average()
    if sum(counts):
        average()
    return {**reps[0], **bufs[0]}


@pytest.mark.parametrize("every", [3, "epoch"])
def test_average_threads_is_local_sgd_with_per_replica_statistics(every):
    got = layers_run("average", 2, batch_size=5, every=every)
    ref = naive_local_sgd(None if every == "epoch" else every)
    assert got.keys() == ref.keys()
    assert max_abs_diff(got, ref) < 1e-12


def test_hogwild_threads_runs_and_updates_the_shared_statistics():
    got = layers_run("hogwild", 2, batch_size=5)
    init = build("layers").get_weights()
    for k in BUFFERS:
        assert np.isfinite(got[k]).all() and not np.array_equal(got[k], init[k]), k


# ---- MPI ranks ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def mpi_runs(tmp_path_factory):
    return run_mpi_checks("layers", tmp_path_factory.mktemp("mpi_layers"))


def _load(out, name, rank=0):
    with np.load(out / f"{name}.rank{rank}.npz") as f:
        return {k: f[k] for k in f.files}


@pytest.mark.parametrize("name, kw", [("layers", {}), ("layers_overlap", {}),
                                      ("layers_batch1", {"batch_size": 1, "epochs": 1, "n": 9})])
def test_two_mpi_ranks_with_dropout_and_batchnorm_equal_sequential(mpi_runs, name, kw):
    got = _load(mpi_runs, name)
    assert max_abs_diff(got, sequential(**kw)) < 1e-12
    other = _load(mpi_runs, name, 1)
    assert all(np.array_equal(got[k], other[k]) for k in got)  # buffers too, on both ranks
    info = json.loads((mpi_runs / f"{name}.rank0.json").read_text())["info"]
    assert info["strategy"] == "mpi"


def test_mpi_average_is_local_sgd_with_per_replica_statistics(mpi_runs):
    got = _load(mpi_runs, "layers_average3")
    assert max_abs_diff(got, naive_local_sgd(3)) < 1e-12
