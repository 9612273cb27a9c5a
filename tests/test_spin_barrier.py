"""The barriers of cnn.parallel.spin (SpinBarrier, SharedSpinBarrier) and the processes'
doorbell (SharedDoorbell): every party sees every write made before the barrier (or the ring),
in spinning and in sleeping waits; abort and reset release the waiters as threading.Barrier's
do; a spinning waiter neither holds the GIL nor misses the release."""
from __future__ import annotations

import os
import threading
import time

import numpy as np
import pytest

from cnn.parallel.spin import SPIN_SECONDS, SpinBarrier, default_spin
from parallel_helpers import barrier_rounds


def _run(parties: int, target) -> list[BaseException]:
    """Run ``target(i)`` in ``parties`` threads; the exceptions they raised."""
    errors: list[BaseException] = []

    def body(i):
        try:
            target(i)
        except BaseException as err:  # noqa: BLE001 - collected for the assertion
            errors.append(err)

    threads = [threading.Thread(target=body, args=(i,)) for i in range(parties)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
        assert not t.is_alive(), "a thread never left the barrier"
    return errors


@pytest.mark.parametrize("parties", [2, 3, 5])
@pytest.mark.parametrize("spin", [None, 0.0, 1e-5], ids=["default", "sleep", "short-spin"])
def test_every_party_sees_every_write_of_its_generation(parties, spin):
    """Every thread writes its cell, passes, reads all cells and passes again, 300 rounds
    (:func:`parallel_helpers.barrier_rounds`): a thread let through early would read a stale
    cell."""
    barrier, cells = SpinBarrier(parties, spin), np.full(parties, -1)
    assert _run(parties, lambda i: barrier_rounds(i, barrier, cells, 300)) == []


@pytest.mark.parametrize("spin", [5.0, 0.0], ids=["spinning", "sleeping"])
def test_abort_releases_the_waiters_and_reset_restores_the_barrier(spin):
    barrier = SpinBarrier(3, spin)
    started = threading.Barrier(3)

    def waiter(i):
        started.wait()
        barrier.wait()

    threads_done: list = []
    runner = threading.Thread(target=lambda: threads_done.extend(_run(2, waiter)))
    runner.start()
    started.wait()
    time.sleep(0.05)  # both are in the barrier now
    t = time.perf_counter()
    barrier.abort()
    runner.join(10)
    assert time.perf_counter() - t < 2.0  # released at once, not when the spin ends
    assert len(threads_done) == 2
    assert all(isinstance(e, threading.BrokenBarrierError) for e in threads_done)
    assert barrier.broken
    with pytest.raises(threading.BrokenBarrierError):
        barrier.wait()
    barrier.reset()
    assert not barrier.broken
    assert _run(3, lambda i: barrier.wait()) == []


def test_reset_breaks_the_threads_waiting_in_it():
    barrier = SpinBarrier(2, 0.0)
    errors: list = []
    t = threading.Thread(target=lambda: errors.extend(_run(1, lambda i: barrier.wait())))
    t.start()
    time.sleep(0.05)
    barrier.reset()
    t.join(10)
    assert len(errors) == 1 and isinstance(errors[0], threading.BrokenBarrierError)
    assert not barrier.broken
    assert _run(2, lambda i: barrier.wait()) == []


def test_a_spinning_waiter_leaves_the_gil_and_sees_the_release():
    """With a 5 s spin, a waiter that held the GIL would stop the other thread's Python until
    the spin ran out, and a poll whose load the compiler hoisted out of its loop would miss
    the release until then: either way the round would take 5 s, not milliseconds."""
    barrier = SpinBarrier(2, spin=5.0)
    t = time.perf_counter()

    def party(i):
        if i == 1:
            total = 0
            for k in range(200_000):  # pure Python: needs the GIL throughout
                total += k
        barrier.wait()

    assert _run(2, party) == []
    assert time.perf_counter() - t < 2.0


def test_spin_only_where_every_party_has_a_cpu():
    cpus = len(os.sched_getaffinity(0))
    assert default_spin(1) == SPIN_SECONDS
    assert default_spin(cpus) == SPIN_SECONDS
    assert default_spin(cpus + 1) == 0.0
    assert SpinBarrier(cpus + 1).spin == 0.0


def test_a_barrier_needs_a_party():
    with pytest.raises(ValueError, match="parties=0"):
        SpinBarrier(0)


# ---- the processes' barrier ---------------------------------------------------------------------
@pytest.fixture
def shared_arrays():
    """Shared segments for a barrier's state and 3 cells; unlinked afterwards."""
    from multiprocessing import shared_memory

    from cnn.parallel.spin import STATE_SIZE
    segs = [shared_memory.SharedMemory(create=True, size=8 * STATE_SIZE),
            shared_memory.SharedMemory(create=True, size=8 * 3)]
    arrays = [np.ndarray((STATE_SIZE,), np.int64, buffer=segs[0].buf),
              np.ndarray((3,), np.int64, buffer=segs[1].buf)]
    arrays[0][:] = 0
    yield segs, arrays
    del arrays
    for seg in segs:
        seg.close()
        seg.unlink()


def test_shared_barrier_orders_processes(shared_arrays):
    """3 processes (more than the 2 cores of CI: the sleeping path runs too) pass 200 rounds
    that would catch a process let through early (see the threads' test above)."""
    import multiprocessing

    from parallel_helpers import shared_barrier_rounds
    segs, _ = shared_arrays
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=shared_barrier_rounds,
                         args=(i, 3, 200, (segs[0].name, segs[1].name))) for i in range(3)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
    assert [p.exitcode for p in procs] == [0, 0, 0]


def test_shared_barrier_abort_releases_a_waiter(shared_arrays):
    from cnn.parallel.spin import SharedSpinBarrier
    _, (state, _) = shared_arrays
    barrier = SharedSpinBarrier(2, state, spin=5.0)
    errors: list = []
    t = threading.Thread(target=lambda: errors.extend(_run(1, lambda i: barrier.wait())))
    t.start()
    time.sleep(0.05)
    began = time.perf_counter()
    barrier.abort()
    t.join(10)
    assert time.perf_counter() - began < 2.0
    assert len(errors) == 1 and isinstance(errors[0], threading.BrokenBarrierError)
    assert barrier.broken
    with pytest.raises(threading.BrokenBarrierError):
        barrier.wait()


def test_shared_barrier_checks_its_state():
    from cnn.parallel.spin import SharedSpinBarrier
    with pytest.raises(ValueError, match=r"int64 of shape \(3,\). Received float64 \(3,\)"):
        SharedSpinBarrier(2, np.zeros(3))


def test_the_spin_lasts_about_as_long_as_asked():
    """The poll count is calibrated on this CPU: polling an unchanging flag for 20 ms worth of
    polls takes about 20 ms (a calibration that measured polls that returned at once would
    spin for seconds, taking a core from whatever runs while the workers wait)."""
    from cnn.parallel.spin import STATE_SIZE, _poll, _polls_for
    polls, state = _polls_for(0.02), np.zeros(STATE_SIZE, np.int64)
    t = time.perf_counter()
    assert not _poll(state, 0, polls)
    assert 0.004 < time.perf_counter() - t < 0.2


def test_a_waiter_sleeps_once_its_spin_is_over():
    barrier = SpinBarrier(2, spin=0.01)
    t = threading.Thread(target=barrier.wait)
    t.start()
    time.sleep(0.3)
    assert barrier._sleepers == 1  # asleep on the condition, not spinning
    barrier.wait()
    t.join(5)
    assert not t.is_alive()


# ---- the processes' doorbell ------------------------------------------------------------------
def test_a_doorbell_waiter_sees_what_was_written_before_the_ring(shared_arrays):
    """The ringer writes its count into a cell, then rings, 300 times; two waiters (spinning,
    and sleeping) read the cell after every ring they see: a ring ordered before the write
    would let them read a smaller count. Each waiter's last ring is the last one rung."""
    from cnn.parallel.spin import SharedDoorbell
    _, (state, cells) = shared_arrays
    rings = 300
    seen_last = {}

    def waiter(i):
        bell = SharedDoorbell(state, 3, spin=(5.0, 0.0)[i])
        seen = 0
        while seen < rings:
            seen = bell.wait(seen)
            assert cells[0] >= seen, (cells[0], seen)
        seen_last[i] = seen

    threads = [threading.Thread(target=waiter, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    bell = SharedDoorbell(state, 3)
    rng = np.random.default_rng(0)
    for r in range(1, rings + 1):
        cells[0] = r
        bell.ring()
        if rng.random() < 0.05:
            time.sleep(rng.random() * 1e-3)
    for t in threads:
        t.join(30)
        assert not t.is_alive(), "a waiter missed the last ring"
    assert seen_last == {0: rings, 1: rings} and bell.rings == rings


def test_a_doorbell_waiter_naps_with_the_nap_it_is_given(shared_arrays):
    """Once its spin is over a waiter calls the nap it was given (a worker's watches its
    pipe), with the doorbell's nap seconds, until the ring; what the nap raises ends the
    wait."""
    from cnn.parallel.spin import SharedDoorbell
    _, (state, _) = shared_arrays
    bell = SharedDoorbell(state, 2, spin=0.0, nap=1e-4)
    naps = []

    def nap(seconds):
        naps.append(seconds)
        if len(naps) == 3:
            bell.ring()

    assert bell.wait(0, nap) == 1 and naps == [1e-4] * 3

    def parent_gone(seconds):
        raise EOFError("gone")

    with pytest.raises(EOFError, match="gone"):
        bell.wait(1, parent_gone)
