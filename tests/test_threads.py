"""Tests for the multithreaded CPU strategies (cnn.parallel.threads): sync equals sequential,
exact properties of average and hogwild, that they learn, errors, and worker lifetime.

Small model on (1, 8, 8) blobs so every fit takes milliseconds. No test measures time."""
from __future__ import annotations

import threading
from functools import lru_cache

import numpy as np
import pytest
from threadpoolctl import threadpool_limits

from cnn import cli
from cnn.backends import get_backend
from cnn.backends.numpy import NumpyBackend
from cnn.data import make_blobs_images
from cnn.model import Sequential
from cnn.optim import make_optimizer
from cnn.parallel import make_strategy
from cnn.parallel.threads import AverageThreads, HogwildThreads, SyncThreads, shard_bounds

SPEC = [{"type": "conv2d", "filters": 4, "kernel_size": 3, "activation": "relu"},
        {"type": "maxpool2d", "pool_size": 2},
        {"type": "flatten"},
        {"type": "dense", "units": 10}]
#: for the learning tests: without pooling, 3 epochs on 1000 blobs reach ~0.99 sequentially
LEARN_SPEC = [{"type": "conv2d", "filters": 8, "kernel_size": 3, "activation": "relu"},
              {"type": "flatten"},
              {"type": "dense", "units": 10}]
OPT = {"type": "sgd", "lr": 0.05, "momentum": 0.9}
N = 50  # batch sizes 7 and 10 below: 7 does not divide 50, and 10 splits unevenly in 3 and 4

BACKENDS = ["numpy", "numba"]


@lru_cache(maxsize=None)
def blobs(n: int = N, dtype=np.float64, seed: int = 1):
    return make_blobs_images(n, classes=10, size=8, seed=seed, dtype=dtype)


def train(strategy="sequential", threads=1, *, dtype=np.float64, batch_size=7, epochs=1,
          backend="numpy", optimizer=OPT, n=N, **options):
    x, y = blobs(n, dtype)
    model = Sequential.from_spec(SPEC, input_shape=(1, 8, 8), dtype=dtype, seed=3, backend=backend)
    model.fit(x, y, epochs=epochs, batch_size=batch_size, optimizer=optimizer, strategy=strategy,
              threads=threads, strategy_options=options or None, seed=5, verbose=0)
    return model.get_weights()


@lru_cache(maxsize=None)
def sequential_weights(backend, dtype, batch_size):
    return train(backend=backend, dtype=dtype, batch_size=batch_size)


def max_abs_diff(a, b):
    assert a.keys() == b.keys()
    return max(float(np.max(np.abs(a[k].astype(np.float64) - b[k]))) for k in a)


def max_rel_diff(a, b):
    """Per parameter array: max |a - b| / max |b|; the worst over the arrays."""
    return max(float(np.max(np.abs(a[k].astype(np.float64) - b[k])) / np.max(np.abs(b[k])))
               for k in a)


# ---- sync is the sequential algorithm -------------------------------------------------------
def test_shard_bounds():
    assert shard_bounds(10, 3) == [(0, 4), (4, 7), (7, 10)]
    assert shard_bounds(2, 4) == [(0, 1), (1, 2), (2, 2), (2, 2)]
    for n in range(0, 30):
        for t in range(1, 6):
            b = shard_bounds(n, t)
            sizes = [hi - lo for lo, hi in b]
            assert b[0][0] == 0 and b[-1][1] == n and sum(sizes) == n
            assert all(b[i][1] == b[i + 1][0] for i in range(t - 1))
            assert max(sizes) - min(sizes) <= 1


@pytest.mark.parametrize("workers,ghost", [(1, None), (2, None), (3, None), (3, 1)])
def test_sum_by_reference_is_the_ordered_sum_of_every_range(workers, ghost):
    """Threads' sync sums each worker's range straight from the workers' gradient arrays
    (one compiled call per range): equal, bit for bit in float32, to adding the workers'
    elements one by one in worker order (a ghost adds nothing), over ranges that cut
    parameters in two."""
    from cnn.parallel.spin import SpinBarrier
    from cnn.parallel.transport import FlatLayout, SharedSlots
    rng = np.random.default_rng(workers)
    shapes = {"a.w": (3, 5), "a.b": (5,), "b.w": (7, 2, 2), "b.b": (1,)}
    layout = FlatLayout({k: np.zeros(s, np.float32) for k, s in shapes.items()})
    slots = SharedSlots(layout, None, np.full(layout.total, np.nan, np.float32),
                        SpinBarrier(workers), by_reference=True)
    slots._wait = lambda i: None  # every worker has contributed: no one to wait for
    cuts = [hi for _, hi in slots.ranges[:-1]]
    assert all(any(off < c < off + layout.sizes[k] for k, off in layout.offsets.items())
               for c in cuts)
    grads = [{k: rng.standard_normal(s).astype(np.float32) for k, s in shapes.items()}
             for _ in range(workers)]
    for i in range(workers):
        slots.contribute(i, None, grads[i], ghost=i == ghost)
    flat = [layout.pack(g, np.empty(layout.total, np.float32)) for g in grads]
    for i, (lo, hi) in enumerate(slots.ranges):
        expected = np.empty(hi - lo, np.float32)
        for j in range(lo, hi):
            total = None
            for w in range(workers):
                if w != ghost:
                    total = flat[w][j] if total is None else np.float32(total + flat[w][j])
            expected[j - lo] = total
        out, a, b, _ = slots.combine(i, (0.0, 0))
        assert (a, b) == (lo, hi)
        np.testing.assert_array_equal(out, expected)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("batch_size", [7, 10])
@pytest.mark.parametrize("threads", [1, 2, 3, 4])
def test_sync_equals_sequential_float64(backend, batch_size, threads):
    ref = sequential_weights(backend, np.float64, batch_size)
    got = train("sync", threads, backend=backend, dtype=np.float64, batch_size=batch_size)
    assert max_abs_diff(got, ref) < 1e-10
    if threads == 1:  # one shard with weight 1: the very same arithmetic
        assert all(np.array_equal(got[k], ref[k]) for k in ref)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("batch_size", [7, 10])
@pytest.mark.parametrize("threads", [1, 2, 3, 4])
def test_sync_equals_sequential_float32(backend, batch_size, threads):
    ref = sequential_weights(backend, np.float32, batch_size)
    got = train("sync", threads, backend=backend, dtype=np.float32, batch_size=batch_size)
    assert got["conv2d.w"].dtype == np.float32
    assert max_rel_diff(got, ref) < 1e-4


def test_sync_is_deterministic():
    """The combination order is fixed, so thread timing cannot change a single bit."""
    a = train("sync", 3, batch_size=10, epochs=2)
    b = train("sync", 3, batch_size=10, epochs=2)
    assert all(np.array_equal(a[k], b[k]) for k in a)


def test_sync_without_momentum_and_more_epochs():
    plain = {"type": "sgd", "lr": 0.1}
    ref = train(batch_size=10, epochs=3, optimizer=plain)
    got = train("sync", 4, batch_size=10, epochs=3, optimizer=plain)
    assert max_abs_diff(got, ref) < 1e-10


# ---- average and hogwild: exact properties ----------------------------------------------------
@pytest.mark.parametrize("every", ["epoch", 1, 3])
def test_average_one_thread_is_sequential(every):
    ref = sequential_weights("numpy", np.float64, 7)
    got = train("average", 1, batch_size=7, every=every)
    assert all(np.array_equal(got[k], ref[k]) for k in ref)


@pytest.mark.parametrize("threads", [2, 3])
def test_average_every_step_is_sync_on_the_global_batch(threads):
    """Averaging the replicas (weights and momentum, weighted by examples) after every step is
    synchronous SGD on the global batch of threads * batch_size examples, including the last,
    shorter step of the epoch."""
    ref = train("sync", threads, batch_size=threads * 7, epochs=2)
    got = train("average", threads, batch_size=7, epochs=2, every=1)
    assert max_abs_diff(got, ref) < 1e-12


def test_average_every_k_differs_from_every_step():
    """k > 1 is really local SGD (the replicas drift between averages), not sync in disguise."""
    a = train("average", 2, batch_size=5, every=1)
    b = train("average", 2, batch_size=5, every=3)
    assert max_abs_diff(a, b) > 1e-6


def test_hogwild_one_thread_is_sequential():
    ref = sequential_weights("numpy", np.float64, 7)
    got = train("hogwild", 1, batch_size=7)
    assert all(np.array_equal(got[k], ref[k]) for k in ref)


def test_average_current_params_is_the_mean_of_the_replicas():
    x, y = blobs()
    model = Sequential.from_spec(SPEC, input_shape=(1, 8, 8), dtype=np.float64, seed=3)
    strat = AverageThreads(threads=2, every=1000)  # never averages by itself
    be = get_backend("numpy")
    params = {k: v.copy() for k, v in model.params.items()}
    with threadpool_limits(1, "blas"):
        strat.start(model, make_optimizer(OPT), be, params)
    try:
        strat.step(x[:14], y[:14])  # shards of 7 and 7
        strat.step(x[14:20], y[14:20])  # shards of 3 and 3
        reps = [strat._core.replicas[i].params for i in range(2)]
        got = strat.current_params()
        for k in got:
            np.testing.assert_allclose(got[k], 0.5 * reps[0][k] + 0.5 * reps[1][k], rtol=0,
                                       atol=1e-15)
        assert not np.array_equal(reps[0]["dense.w"], reps[1]["dense.w"])
    finally:
        strat.close()


# ---- they learn -------------------------------------------------------------------------------
@pytest.mark.parametrize("strategy,options", [("sync", {}), ("average", {"every": "epoch"}),
                                              ("average", {"every": 4}), ("hogwild", {})])
def test_threaded_strategies_learn(strategy, options):
    x, y = make_blobs_images(1500, classes=10, size=8, seed=2, dtype=np.float32)
    model = Sequential.from_spec(LEARN_SPEC, input_shape=(1, 8, 8), dtype=np.float32, seed=0)
    hist = model.fit(x[:1000], y[:1000], epochs=3, batch_size=16, optimizer=OPT,
                     strategy=strategy, threads=2, strategy_options=options,
                     validation_data=(x[1000:], y[1000:]), verbose=0)
    assert hist.history["val_accuracy"][-1] > 0.9
    assert model.evaluate(x[1000:], y[1000:])["accuracy"] > 0.9  # the weights fit kept
    assert hist.info["strategy"] == strategy and hist.info["threads"] == 2


# ---- workers: persistent, concurrent, cleaned up ---------------------------------------------
class RecordingBackend(NumpyBackend):
    """NumPy backend that records which threads ran a convolution."""

    def __init__(self):
        self.idents: set[int] = set()
        self.calls = 0
        self._lock = threading.Lock()

    def conv2d_forward(self, *args, **kwargs):
        with self._lock:
            self.idents.add(threading.get_ident())
            self.calls += 1
        return super().conv2d_forward(*args, **kwargs)


@pytest.mark.parametrize("strategy", ["sync", "average", "hogwild"])
def test_workers_live_for_the_whole_fit(strategy):
    be = RecordingBackend()
    baseline = threading.active_count()
    x, y = blobs()
    model = Sequential.from_spec(SPEC, input_shape=(1, 8, 8), dtype=np.float64, seed=3)
    model.fit(x, y, epochs=3, batch_size=4, optimizer=OPT, strategy=strategy, threads=3,
              backend=be, verbose=0)
    assert be.calls >= 3 * 4  # many steps ...
    assert len(be.idents) == 3  # ... all run by the same three threads (the main one included)
    assert threading.get_ident() in be.idents
    assert threading.active_count() == baseline


class RendezvousBackend(NumpyBackend):
    """Each conv forward waits until every worker is inside one: passes only if the shards
    really run at the same time (a serialised implementation would time out)."""

    def __init__(self, parties):
        self.barrier = threading.Barrier(parties, timeout=20)

    def conv2d_forward(self, *args, **kwargs):
        self.barrier.wait()
        return super().conv2d_forward(*args, **kwargs)


@pytest.mark.parametrize("strategy", ["sync", "average", "hogwild"])
def test_shards_run_concurrently(strategy):
    x, y = blobs()
    model = Sequential.from_spec(SPEC, input_shape=(1, 8, 8), dtype=np.float64, seed=3)
    # batch 10 with sync (10 per step, shards of 5); 5 per worker for the others: every step
    # (the last included, 50 = 5 * 10) gives both workers a shard
    bs = 10 if strategy == "sync" else 5
    model.fit(x, y, epochs=1, batch_size=bs, optimizer=OPT, strategy=strategy, threads=2,
              backend=RendezvousBackend(2), verbose=0)


class FailingBackend(NumpyBackend):
    """Raises in the dense forward when called from the worker thread named ``fail_in``
    (``"main"`` for worker 0, the calling thread) after ``after`` calls."""

    def __init__(self, fail_in: str, after: int = 2):
        self.fail_in, self.after, self.calls = fail_in, after, 0
        self._lock = threading.Lock()

    def dense_forward(self, x, w, b, ws=None):
        me = threading.current_thread()
        mine = (me is threading.main_thread()) if self.fail_in == "main" else \
            me.name.endswith(self.fail_in)
        if mine:
            with self._lock:
                self.calls += 1
                if self.calls > self.after:
                    raise FloatingPointError("injected failure")
        return super().dense_forward(x, w, b, ws=ws)


@pytest.mark.parametrize("strategy", ["sync", "average", "hogwild"])
@pytest.mark.parametrize("fail_in", ["main", "worker-1", "worker-2"])
def test_worker_exception_propagates_and_threads_end(strategy, fail_in):
    baseline = threading.active_count()
    x, y = blobs()
    model = Sequential.from_spec(SPEC, input_shape=(1, 8, 8), dtype=np.float64, seed=3)
    with pytest.raises(FloatingPointError, match="injected failure") as info:
        model.fit(x, y, epochs=2, batch_size=6, optimizer=OPT, strategy=strategy, threads=3,
                  backend=FailingBackend(fail_in), verbose=0)
    if fail_in != "main":
        assert any(f"worker thread {fail_in[-1]} of 3" in note
                   for note in getattr(info.value, "__notes__", []))
    assert threading.active_count() == baseline
    assert all(np.all(np.isfinite(v)) for v in model.params.values())


def test_close_is_idempotent_and_step_after_close_fails():
    x, y = blobs()
    model = Sequential.from_spec(SPEC, input_shape=(1, 8, 8), dtype=np.float64, seed=3)
    strat = SyncThreads(threads=2)
    baseline = threading.active_count()
    with threadpool_limits(1, "blas"):
        strat.start(model, make_optimizer(OPT), get_backend("numpy"),
                    {k: v.copy() for k, v in model.params.items()})
    assert threading.active_count() == baseline + 1  # worker 0 is the calling thread
    loss, correct = strat.step(x[:8], y[:8])
    assert np.isfinite(loss) and 0 <= correct <= 8
    strat.close()
    strat.close()
    assert threading.active_count() == baseline
    with pytest.raises(RuntimeError, match="not started"):
        strat.step(x[:8], y[:8])


# ---- errors -----------------------------------------------------------------------------------
def _fit(**kwargs):
    x, y = blobs()
    model = Sequential.from_spec(SPEC, input_shape=(1, 8, 8), dtype=np.float64, seed=3)
    return model.fit(x, y, **{"epochs": 1, "batch_size": 8, "verbose": 0, **kwargs})


@pytest.mark.parametrize("strategy", ["sync", "average", "hogwild"])
@pytest.mark.parametrize("threads", [0, -1, 1.5, True, "2"])
def test_bad_threads(strategy, threads):
    with pytest.raises(ValueError, match=f"threads must be a positive integer. Received "
                                         f"threads={threads!r}".replace(".", r"\.")):
        _fit(strategy=strategy, threads=threads)


def test_unknown_strategy():
    with pytest.raises(ValueError, match=r"unknown strategy 'hogwash'; choose one of"):
        _fit(strategy="hogwash", threads=2)


def test_sequential_with_threads_points_to_the_threaded_strategies():
    with pytest.raises(ValueError, match="strategy='sync', 'average' or 'hogwild'"):
        _fit(strategy="sequential", threads=2)


def test_sync_more_threads_than_batch():
    baseline = threading.active_count()
    with pytest.raises(ValueError, match=r"batch_size=3 .* threads=4 .* batch_size >= threads"):
        _fit(strategy="sync", threads=4, batch_size=3)
    assert threading.active_count() == baseline


def test_average_and_hogwild_accept_small_batches():
    # each worker takes batch_size examples of its own, so threads > batch_size is fine
    for strategy in ("average", "hogwild"):
        _fit(strategy=strategy, threads=3, batch_size=2)


@pytest.mark.parametrize("every", [0, -2, 1.5, "step", None, True])
def test_average_bad_every(every):
    with pytest.raises(ValueError, match=f"every must be a positive number of steps or 'epoch'. "
                                         f"Received every={every!r}".replace(".", r"\.")):
        _fit(strategy="average", threads=2, strategy_options={"every": every})


def test_unknown_strategy_option():
    with pytest.raises(TypeError, match="every"):
        make_strategy("sync", threads=2, every=3)


class FakeDeviceBackend(NumpyBackend):
    name = "fake_device"
    on_device = True


@pytest.mark.parametrize("strategy", ["sync", "average", "hogwild"])
def test_device_backend_refused(strategy):
    baseline = threading.active_count()
    with pytest.raises(ValueError, match="keeps the weights on a device"):
        _fit(strategy=strategy, threads=2, backend=FakeDeviceBackend())
    assert threading.active_count() == baseline


def test_numba_parallel_refused_from_several_threads():
    with pytest.raises(ValueError, match="numba_parallel.*must not be called from several threads"):
        _fit(strategy="sync", threads=2, backend="numba_parallel")


# ---- selectable everywhere --------------------------------------------------------------------
def test_cli_trains_with_threads(capsys):
    assert cli.main(["train", "--dataset", "blobs", "--limit", "300", "--test-limit", "100",
                     "--epochs", "1", "--strategy", "sync", "--threads", "2", "--quiet"]) == 0
    assert "strategy sync x2" in capsys.readouterr().out


def test_cli_reports_bad_threads(capsys):
    assert cli.main(["train", "--dataset", "blobs", "--limit", "300", "--test-limit", "100",
                     "--epochs", "1", "--strategy", "sync", "--threads", "0", "--quiet"]) == 2
    assert "threads must be a positive integer" in capsys.readouterr().err


def test_describe_records_the_configuration():
    assert SyncThreads(2).describe() == {"strategy": "sync", "threads": 2}
    assert AverageThreads(3, every=5).describe() == {"strategy": "average", "threads": 3,
                                                     "average_every": 5}
    assert HogwildThreads(2).examples_per_step(16) == 32
    assert AverageThreads(2).examples_per_step(16) == 32
    assert SyncThreads(2).examples_per_step(16) == 16


def test_sync_comm_time_is_its_own_column():
    """comm_time (the reduce phase, as seen by worker 0) is measured apart from compute."""
    x, y = blobs()
    model = Sequential.from_spec(SPEC, input_shape=(1, 8, 8), dtype=np.float64, seed=3)
    h = model.fit(x, y, epochs=2, batch_size=10, optimizer=OPT, strategy="sync", threads=2,
                  verbose=0).history
    assert all(c > 0 for c in h["comm_time"]) and all(c >= 0 for c in h["compute_time"])
    for i in range(2):
        parts = h["compute_time"][i] + h["comm_time"][i] + h["data_time"][i] + h["transfer_time"][i]
        assert parts <= h["time"][i] * 1.0001 + 1e-6


@pytest.mark.parametrize("threads", [2, 3, 4])
def test_sync_reduce_across_shards_equals_sequential(threads):
    """A layer that centres each feature over the global batch, summing over the shards with
    StepContext.reduce in forward and backward (what synchronised batch norm needs): equal to
    sequential with uneven shards (7 = 4 + 3) and with ghost workers (the last batch of 1)."""
    from parallel_helpers import max_abs_diff as diff, train as train_kind
    ref, _ = train_kind(kind="center")
    got, hist = train_kind("sync", threads, kind="center")
    assert diff(got, ref) < 1e-12
    assert all(c > 0 for c in hist.history["comm_time"])


def test_flat_core_updates_a_range_spanning_parameters_as_the_formula_says():
    """SyncCore(flat=True) moves the weights and the momentum into one buffer each (the
    parameter dicts then hold views of them) and updates any range of it with one optimizer
    call: the momentum SGD formula, element by element, across parameter boundaries."""
    from cnn.parallel.sync import SyncCore
    model = Sequential.from_spec(SPEC, input_shape=(1, 8, 8), dtype=np.float64, seed=2)
    opt = make_optimizer({"type": "sgd", "lr": 0.1, "momentum": 0.9})
    params = {k: v.copy() for k, v in model.params.items()}
    state = opt.init_state(params, get_backend("numpy"))
    rng = np.random.default_rng(0)
    for slot in state.slots["velocity"].values():
        slot[...] = rng.standard_normal(slot.shape)
    before_p = {k: v.copy() for k, v in params.items()}
    before_v = {k: v.copy() for k, v in state.slots["velocity"].items()}
    core = SyncCore(model, opt, get_backend("numpy"), params, state, flat=True)
    lay = core.layout
    flat_p, flat_slots = core._flat
    for k in params:  # views of the one buffer, holding the same values
        assert np.shares_memory(params[k], flat_p) and np.array_equal(params[k], before_p[k])
        assert np.shares_memory(state.slots["velocity"][k], flat_slots["velocity"])
    lo, hi = lay.offsets["dense.b"] + 3, lay.offsets["conv2d.w"] + 5  # spans several arrays
    g = rng.standard_normal(hi - lo)
    core.lr, core.t = 0.1, 1
    core.apply(g, lo, hi)
    p0 = np.concatenate([before_p[k].ravel() for k in lay.keys])
    v0 = np.concatenate([before_v[k].ravel() for k in lay.keys])
    v1, p1 = v0.copy(), p0.copy()
    v1[lo:hi] = 0.9 * v0[lo:hi] - 0.1 * g  # v = m v - lr g; w += v
    p1[lo:hi] = p0[lo:hi] + v1[lo:hi]
    np.testing.assert_allclose(flat_slots["velocity"], v1, rtol=0, atol=1e-15)
    np.testing.assert_allclose(flat_p, p1, rtol=0, atol=1e-15)
