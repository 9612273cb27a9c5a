"""strategy="processes": worker processes over shared memory running the sync step written
once (cnn.parallel.sync). Equal to sequential (computed separately, in this process), the
cross-shard reduce of synchronised layers, errors that name the worker, a worker killed with
SIGKILL, and no shared-memory segment left behind. Tiny shapes; no test measures time."""
from __future__ import annotations

import glob
import multiprocessing
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from cnn.backends.numpy import NumpyBackend
from cnn.optim import make_optimizer
from cnn.parallel import make_strategy
from cnn.parallel.processes import SEGMENT_PREFIX, SyncProcesses, WorkerError
from cnn.backends import get_backend
from parallel_helpers import (OPT, KillingBackend, blobs, build, max_abs_diff, max_rel_diff,
                              train)


def my_segments() -> list[str]:
    """Shared-memory segments this process's strategies created and did not unlink."""
    return sorted(glob.glob(f"/dev/shm/{SEGMENT_PREFIX}{os.getpid()}_*"))


@pytest.fixture(autouse=True)
def no_segment_left_behind():
    before = my_segments()
    yield
    assert my_segments() == before


_SEQ: dict = {}


def sequential(**kw):
    key = tuple(sorted(kw.items()))
    if key not in _SEQ:
        _SEQ[key] = train(**kw)[0]
    return _SEQ[key]


# ---- the sequential algorithm ------------------------------------------------------------------
@pytest.mark.parametrize("workers,batch_size", [(2, 7), (3, 10)])
def test_processes_equal_sequential_float64(workers, batch_size):
    """Several steps and two epochs; batch 7 splits 4/3 and the last batch of each epoch has 1
    example (one worker runs a ghost pass); batch 10 splits 4/3/3."""
    ref = sequential(batch_size=batch_size)
    got, hist = train("processes", workers, batch_size=batch_size)
    assert max_abs_diff(got, ref) < 1e-12
    assert hist.info["strategy"] == "processes" and hist.info["workers"] == workers
    assert all(c > 0 for c in hist.history["comm_time"])


def test_processes_equal_sequential_float32():
    ref = sequential(dtype=np.float32)
    got, _ = train("processes", 2, dtype=np.float32)
    assert got["conv2d.w"].dtype == np.float32
    assert max_rel_diff(got, ref) < 1e-5


def test_processes_default_to_the_fastest_backend_in_every_worker():
    """backend "auto" (fit's default): the workers run the backend the fit resolved (numba
    here), and the run still equals the sequential path on it."""
    ref = sequential(backend="auto")
    got, hist = train("processes", 2, backend="auto")
    assert hist.info["backend"] == "numba" and hist.info["backend_requested"] == "auto"
    assert max_abs_diff(got, ref) < 1e-12


def test_processes_one_worker_is_bitwise_sequential():
    ref = sequential()
    got, _ = train("processes", 1)
    assert all(np.array_equal(got[k], ref[k]) for k in ref)


def test_processes_reduce_across_shards_equals_sequential():
    """A layer that centres each feature over the global batch (forward and backward sum over
    every shard through StepContext.reduce): equal to sequential only if the shared-memory
    reduce sums every worker's part, ghosts included."""
    ref = sequential(kind="center")
    assert max_abs_diff(ref, sequential()) > 1e-3  # the layer matters
    got, _ = train("processes", 2, kind="center")
    assert max_abs_diff(got, ref) < 1e-12


def test_labels_of_another_dtype_are_copied_in_and_train_the_same():
    """The fit gathers int64 labels straight into the shared batch segment; uint8 labels
    cannot be (np.take does not convert), so each batch is copied in, converted: same
    weights, bit for bit."""
    x, y = blobs()
    weights = []
    for labels in (y.astype(np.int64), y.astype(np.uint8)):
        model = build()
        model.fit(x, labels, epochs=2, batch_size=8, optimizer=OPT, strategy="processes",
                  threads=2, verbose=0)
        weights.append(model.get_weights())
    for k in weights[0]:
        np.testing.assert_array_equal(weights[0][k], weights[1][k], err_msg=k)


def test_processes_keep_the_optimizer_state():
    """Momentum lives in shared memory: after the fit the strategy's state is the workers'."""
    x, y = blobs()
    model = build()
    strat = SyncProcesses(threads=2)
    params = {k: v.copy() for k, v in model.params.items()}
    strat.check_batch_size(8)
    strat.start(model, make_optimizer(OPT), get_backend("numpy"), params)
    try:
        for i in range(0, 24, 8):
            strat.step(x[i:i + 8], y[i:i + 8])
        strat.current_params()
    finally:
        strat.close()
    ref = build()
    opt = make_optimizer(OPT)
    state = opt.init_state(ref.params, get_backend("numpy"))
    for i in range(0, 24, 8):
        _, _, g = ref.loss_and_grads(x[i:i + 8], y[i:i + 8])
        opt.update(ref.params, g, state, get_backend("numpy"))
    assert strat.state.step == state.step == 3
    for name, slot in state.slots.items():  # every optimizer slot (velocity)
        for k in slot:
            np.testing.assert_allclose(strat.state.slots[name][k], slot[k], rtol=0, atol=1e-13)
    for k in ref.params:
        np.testing.assert_allclose(params[k], ref.params[k], rtol=0, atol=1e-13)


def test_processes_learn():
    x, y = blobs(600, np.float32, seed=2)
    model = build(dtype=np.float32, seed=0)
    hist = model.fit(x[:500], y[:500], epochs=3, batch_size=16, optimizer=OPT,
                     strategy="processes", threads=2, validation_data=(x[500:], y[500:]),
                     verbose=0)
    assert hist.history["val_accuracy"][-1] > 0.6  # chance is 0.1


def test_batches_larger_than_the_first_grow_the_shared_batch():
    """A batch of 4, then of 20 (a new batch segment, which every worker re-attaches while
    its workspace may still hold rows of the old one), then 20 again: the same weights as
    the sequential steps."""
    x, y = blobs()
    model = build()
    params = {k: v.copy() for k, v in model.params.items()}
    strat = SyncProcesses(threads=2)
    strat.check_batch_size(4)
    strat.start(model, make_optimizer(OPT), get_backend("numpy"), params)
    batches = [(0, 4), (4, 24), (24, 44)]
    try:
        names = set(strat.segment_names)
        for lo, hi in batches:
            loss, correct = strat.step(x[lo:hi], y[lo:hi])
            assert np.isfinite(loss) and 0 <= correct <= hi - lo
        assert set(strat.segment_names) != names  # a new batch segment, the old one unlinked
        strat.current_params()
    finally:
        strat.close()
    ref = build()
    opt = make_optimizer(OPT)
    state = opt.init_state(ref.params, get_backend("numpy"))
    for lo, hi in batches:
        _, _, g = ref.loss_and_grads(x[lo:hi], y[lo:hi])
        opt.update(ref.params, g, state, get_backend("numpy"))
    assert max_abs_diff(params, ref.params) < 1e-12


# ---- failures ---------------------------------------------------------------------------------
class FailingBackend(NumpyBackend):
    """Raises in the dense forward of worker ``worker`` after ``after`` calls (worker 0: the
    fit's own process)."""

    def __init__(self, worker: int, after: int = 2):
        self.worker, self.after, self.calls = worker, after, 0

    def dense_forward(self, x, w, b, *args, **kwargs):
        name = "MainProcess" if self.worker == 0 else f"cnn-processes-worker-{self.worker}"
        if multiprocessing.current_process().name == name:
            self.calls += 1
            if self.calls > self.after:
                raise FloatingPointError("injected failure")
        return super().dense_forward(x, w, b, *args, **kwargs)


@pytest.mark.parametrize("worker", [0, 1])
def test_a_worker_exception_ends_the_fit_naming_the_worker(worker):
    x, y = blobs()
    model = build()
    with pytest.raises(FloatingPointError, match="injected failure") as info:
        model.fit(x, y, epochs=2, batch_size=6, optimizer=OPT, strategy="processes", threads=2,
                  backend=FailingBackend(worker), verbose=0)
    notes = "\n".join(getattr(info.value, "__notes__", []))
    if worker == 0:  # raised in the fit's process: its own traceback
        assert "worker 0 of 2, the fit's own process" in notes
        assert any(e.name == "dense_forward" for e in info.traceback)
        # its frames hold arrays over the shared segments, which the fit closed: they must
        # still be mapped (reading unmapped memory crashes the reader, a debugger or pytest
        # printing the frames) and hold the shared weights the model got back
        from cnn.parallel.processes import _Worker
        from cnn.parallel.transport import FlatLayout
        worker_0 = next(f.f_locals["self"] for f in _frames(info.value.__traceback__)
                        if isinstance(f.f_locals.get("self"), _Worker))
        flat = FlatLayout(model.params).pack(model.params, np.empty(worker_0.plan.total))
        np.testing.assert_array_equal(worker_0.views["params"], flat)
    else:
        assert f"worker process {worker} of 2" in notes
        assert "dense_forward" in notes  # the worker's own traceback
    assert all(np.all(np.isfinite(v)) for v in model.params.values())
    assert not multiprocessing.active_children()


def _frames(tb):
    while tb is not None:
        yield tb.tb_frame
        tb = tb.tb_next


def test_a_killed_worker_ends_the_fit_naming_it():
    x, y = blobs()
    model = build()
    with pytest.raises(WorkerError, match=r"worker process 1 of 2 \(pid \d+\) was killed by "
                                          r"signal 9 \(SIGKILL\) during step 3"):
        model.fit(x, y, epochs=2, batch_size=6, optimizer=OPT, strategy="processes", threads=2,
                  backend=KillingBackend(), verbose=0)
    assert not multiprocessing.active_children()


class CountingBackend(NumpyBackend):
    """Counts the dense forwards of the process it runs in (picklable: a module's class)."""
    passes = 0

    def dense_forward(self, *args, **kwargs):
        CountingBackend.passes += 1
        return super().dense_forward(*args, **kwargs)


def test_a_worker_killed_between_steps_fails_the_next_step_naming_it():
    """A worker process killed while the fit's process is between two steps (an OOM kill while
    it evaluates): the next step raises at once, naming the worker, instead of training a
    pass and waiting for it; the step count stays that of the whole steps."""
    x, y = blobs()
    model = build()
    strat = SyncProcesses(threads=2)
    strat.start(model, make_optimizer(OPT), CountingBackend(),
                {k: v.copy() for k, v in model.params.items()})
    try:
        strat.step(x[:8], y[:8])
        os.kill(strat.pids[0], signal.SIGKILL)
        time.sleep(0.5)  # the watcher sees the sentinel
        passes = CountingBackend.passes
        with pytest.raises(WorkerError, match=r"worker process 1 of 2 \(pid \d+\) was killed "
                                              r"by signal 9 \(SIGKILL\) during step 2"):
            strat.step(x[8:16], y[8:16])
        assert strat.steps == 1 and CountingBackend.passes == passes  # no pass trained
        with pytest.raises(RuntimeError, match="stopped after an earlier failure: worker 1"):
            strat.step(x[8:16], y[8:16])
    finally:
        strat.close()


def test_workers_that_do_not_start_in_time_end_the_fit_naming_one():
    """start_timeout shorter than a worker's start-up (import, attach, compile): the fit
    stops with a WorkerError naming the late worker, and leaves no worker and no segment."""
    x, y = blobs()
    with pytest.raises(WorkerError, match=r"worker process 1 of 2 \(pid \d+\) did not answer "
                                          r"within 0 s"):
        build().fit(x, y, batch_size=8, strategy="processes", threads=2, verbose=0,
                    strategy_options={"start_timeout": 0.01})
    assert not multiprocessing.active_children()


def test_close_is_idempotent_and_step_after_close_fails():
    x, y = blobs()
    model = build()
    strat = SyncProcesses(threads=2)
    strat.start(model, make_optimizer(OPT), get_backend("numpy"),
                {k: v.copy() for k, v in model.params.items()})
    pids = strat.pids
    assert len(pids) == 1 and len(my_segments()) == 2  # worker 0 is this process
    for i in range(0, 24, 8):
        strat.step(x[i:i + 8], y[i:i + 8])
    assert strat.pids == pids  # the same workers for every step
    for pid in pids:
        os.kill(pid, 0)  # alive
    strat.close()
    strat.close()
    assert not my_segments()
    assert not multiprocessing.active_children()
    for pid in pids:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
    with pytest.raises(RuntimeError, match="not started"):
        strat.step(x[:8], y[:8])


# ---- arguments ------------------------------------------------------------------------------------
@pytest.mark.parametrize("option,value", [("start_method", "thread"), ("reduce_bytes", -1),
                                          ("start_timeout", 0)])
def test_bad_options_are_refused_naming_the_value(option, value):
    with pytest.raises(ValueError, match=f"{option}.*Received {option}={value!r}"):
        make_strategy("processes", threads=2, **{option: value})


def test_more_workers_than_the_batch_is_refused_before_starting():
    x, y = blobs()
    with pytest.raises(ValueError, match=r"batch_size=2 .* threads=3"):
        build().fit(x, y, batch_size=2, strategy="processes", threads=3, verbose=0)
    assert not multiprocessing.active_children()


class FakeDeviceBackend(NumpyBackend):
    name = "fake_device"
    on_device = True


def test_device_backend_refused():
    x, y = blobs()
    with pytest.raises(ValueError, match="keeps the weights on a device"):
        build().fit(x, y, batch_size=8, strategy="processes", threads=2,
                    backend=FakeDeviceBackend(), verbose=0)
    assert threading.active_count() >= 1 and not multiprocessing.active_children()


HANG_SCRIPT = """
import sys
from parallel_helpers import OPT, DyingInsideTheBarrier, blobs, build
from cnn.parallel.processes import WorkerError
x, y = blobs()
model = build()
try:
    model.fit(x, y, epochs=2, batch_size=6, optimizer=OPT, strategy="processes", threads=2,
              backend=DyingInsideTheBarrier(), verbose=0)
except WorkerError as err:
    print(f"WorkerError: {err}")
"""


def test_a_worker_killed_inside_the_barrier_ends_the_fit():
    """Audit finding 1: the main process waited forever in Barrier.abort() for a lock that a
    killed worker held (6 of 18 tries of kill -9 during a fit). The shared barrier holds no
    lock now, but the worker left waiting in it must still be ended: the fit names the dead
    worker and stops."""
    # its own session: a hung fit, its forkserver and workers are killed together
    proc = subprocess.Popen([sys.executable, "-c", HANG_SCRIPT], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, cwd=Path(__file__).parent,
                            start_new_session=True)
    try:
        out, err = proc.communicate(timeout=90)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail(f"the fit hung after its worker died inside the barrier\n{err}")
    assert re.search(r"WorkerError: worker process 1 of 2 \(pid \d+\) was killed by signal 9 "
                     r"\(SIGKILL\) during step 3", out), out + err


KILLED_FIT_SCRIPT = """
import os, signal
from cnn.callbacks import Callback
from parallel_helpers import OPT, blobs, build


class KillTheFitAtStepThree(Callback):
    def on_step_end(self, step, logs):
        if logs["global_step"] == 3:
            print(*self.run.strategy.pids, flush=True)
            os.kill(os.getpid(), signal.SIGKILL)


x, y = blobs()
build().fit(x, y, epochs=100, batch_size=6, optimizer=OPT, strategy="processes", threads=3,
            verbose=0, callbacks=[KillTheFitAtStepThree()])
"""


def _gone(pid: int) -> bool:
    """Whether process ``pid`` has ended (a zombie no one reaped has)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            return any(line.startswith("State:") and "Z" in line.split()[1] for line in f)
    except FileNotFoundError:
        return True


def test_the_workers_end_when_the_fit_s_process_is_killed():
    """kill -9 of the fit's process, between two steps: its worker processes, waiting for the
    next step's doorbell, find their pipe closed and end, and its shared segments are
    unlinked (by Python's resource tracker)."""
    proc = subprocess.Popen([sys.executable, "-c", KILLED_FIT_SCRIPT], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, cwd=Path(__file__).parent)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == -signal.SIGKILL, err
    pids = [int(p) for p in out.split()]
    assert len(pids) == 2

    def ended() -> bool:
        segments = glob.glob(f"/dev/shm/{SEGMENT_PREFIX}{proc.pid}_*")
        return all(_gone(p) for p in pids) and not segments

    deadline = time.monotonic() + 20
    while not ended() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert all(_gone(p) for p in pids), "a worker outlived the fit's process"
    assert not glob.glob(f"/dev/shm/{SEGMENT_PREFIX}{proc.pid}_*")


def _assert_weights_of_a_clean_stop(model, x, y):
    """``model``, stopped by a Ctrl-C, holds bit for bit the weights of a run stopped cleanly
    (request_stop) after as many steps as it counts, and no worker outlives it."""
    from cnn.callbacks import Callback
    from cnn.errors import Interrupted
    steps = model.optimizer_state.step

    class StopAt(Callback):
        def on_step_end(self, step, logs):
            if logs["global_step"] == steps:
                self.run.strategy.request_stop()
    ref = build()
    with pytest.raises(Interrupted):
        ref.fit(x, y, epochs=1000, batch_size=6, optimizer=OPT, strategy="processes",
                threads=2, verbose=0, callbacks=[StopAt()])
    assert ref.optimizer_state.step == steps > 0
    for k, v in ref.get_weights().items():
        np.testing.assert_array_equal(model.get_weights()[k], v, err_msg=k)
    assert not multiprocessing.active_children()


@pytest.mark.parametrize("where", ["rings", "answers"])
def test_ctrl_c_at_any_point_of_a_step_keeps_weights_and_step_count_together(monkeypatch,
                                                                               where):
    """The Ctrl-C lands at a chosen point of the fourth step: right after the fit's process
    rang the workers' doorbell (before its own pass), or after the step's last barrier but
    before the step is counted. Either way the model holds the weights of as many whole steps
    as it counts (the race a loaded CI machine once hit: the interrupt raised between the
    workers' update and the count)."""
    from cnn.parallel.processes import STEP
    ring, take = SyncProcesses._ring, SyncProcesses._take_results
    calls = {"n": 0}

    def ring_then_ctrl_c(self, kind):
        ring(self, kind)
        if kind == STEP and self.steps == 3:
            os.kill(os.getpid(), signal.SIGINT)  # delivered before the next bytecode

    def ctrl_c_then_take(self):
        calls["n"] += 1
        if calls["n"] == 4:
            os.kill(os.getpid(), signal.SIGINT)
        return take(self)

    monkeypatch.setattr(SyncProcesses, *(("_ring", ring_then_ctrl_c) if where == "rings"
                                         else ("_take_results", ctrl_c_then_take)))
    x, y = blobs()
    model = build()
    with pytest.raises(KeyboardInterrupt):
        model.fit(x, y, epochs=1000, batch_size=6, optimizer=OPT, strategy="processes",
                  threads=2, verbose=0)
    monkeypatch.undo()
    assert model.optimizer_state.step == 4
    _assert_weights_of_a_clean_stop(model, x, y)


def test_ctrl_c_during_a_step_keeps_the_weights_of_a_whole_step():
    """Ctrl-C reaches the whole process group; the workers ignore it and finish their step,
    and the main process waits for them before it stops: the model holds the weights of a
    whole step, bit for bit those of a run stopped cleanly after the same step."""
    from cnn.callbacks import Callback

    x, y = blobs()
    model = build()
    # the Ctrl-C comes while the steps run (not during start-up, whose length the backend's
    # compile decides): armed after the third step, it lands somewhere in a later one
    timer = threading.Timer(0.05, lambda: os.kill(os.getpid(), signal.SIGINT))

    class ArmAfterThree(Callback):
        def on_step_end(self, step, logs):
            if logs["global_step"] == 3:
                timer.start()
    try:
        with pytest.raises(KeyboardInterrupt):
            model.fit(x, y, epochs=1000, batch_size=6, optimizer=OPT, strategy="processes",
                      threads=2, verbose=0, callbacks=[ArmAfterThree()])
    finally:
        timer.cancel()
    _assert_weights_of_a_clean_stop(model, x, y)
