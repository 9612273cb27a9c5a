"""Barriers for workers that spin before they sleep: :class:`SpinBarrier` for threads (it
spins without the GIL), :class:`SharedSpinBarrier` for processes (its state in shared memory).

Why not :class:`threading.Barrier`: its waiters sleep on a lock at once, and waking a sleeping
thread costs a futex wake-up and, on a virtual machine, the wake of an idle virtual CPU: tens of
microseconds per barrier (``python -m cnn bench threads`` shows the barrier spans), paid two or
three times per step by every thread strategy. :class:`SpinBarrier` keeps the same interface
(``wait``, ``abort``, ``reset``, ``broken``, :class:`threading.BrokenBarrierError`) but a
waiter first polls the barrier's generation for up to ``spin`` seconds in a Numba ``nogil``
loop (so the threads still working keep the GIL to themselves), and only then sleeps on a
condition. The last thread to arrive opens the barrier under the condition's lock and wakes
the sleepers, if any; a sleeper re-checks the generation under that lock, so no wake-up is lost.

Spinning pays only while every waiting thread has a core of its own: with more workers than
the CPUs this process may run on, a spinning thread would take the core of the thread it waits
for, so the default spin is then zero (a plain sleeping barrier). The bound on the spin keeps a
barrier that waits long (an epoch's end, an evaluation, another contender timed by the bench)
from burning a core.

The poll reads the generation with an atomic *acquire* load: an ordinary load in a loop that
writes nothing may be hoisted out of it by the compiler, and the loop would never see the
release.

Worker processes share no lock a waiter could sleep on cheaply (``multiprocessing.Barrier``
is a condition over semaphores: a few system calls and a wake-up per wait), so
:class:`SharedSpinBarrier` keeps its count and generation in a shared ``int64`` array that
every process maps, counts arrivals with an atomic fetch-and-add, spins like the threads' one,
and then sleeps in short naps until the generation moves. It holds no lock at any time, so a
worker killed inside it leaves nothing locked. :class:`SharedSpinBarrier`'s state also serves
as a doorbell (:class:`SharedDoorbell`): one process rings (an atomic add) and goes on, the
others wait for the generation to move as a barrier's waiters do (``processes``: the fit's
process announces each step to its worker processes so).
"""
from __future__ import annotations

import os
import platform
import threading
import time

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.core import cgutils
from numba.extending import intrinsic

__all__ = ["SharedDoorbell", "SharedSpinBarrier", "SpinBarrier", "default_spin", "warm_up"]

#: seconds a waiter polls before it sleeps, where every worker has a core of its own
SPIN_SECONDS = 2e-3

_X86 = platform.machine().lower() in ("x86_64", "amd64", "i386", "i686")


@intrinsic
def _load_acquire(typingctx, ary, index):
    """``ary[index]`` of an int64 array, read with an atomic acquire load."""
    if not (isinstance(ary, types.Array) and ary.dtype == types.int64
            and isinstance(index, types.Integer)):
        return None

    def codegen(context, builder, signature, args):
        aryty = signature.args[0]
        array = context.make_array(aryty)(context, builder, args[0])
        ptr = cgutils.get_item_pointer(context, builder, aryty, array, [args[1]])
        return builder.load_atomic(ptr, "acquire", 8)

    return types.int64(ary, index), codegen


@intrinsic
def _fetch_add(typingctx, ary, index, value):
    """``ary[index] += value`` of an int64 array as one atomic read-modify-write (sequentially
    consistent); returns the value before the addition."""
    if not (isinstance(ary, types.Array) and ary.dtype == types.int64
            and isinstance(index, types.Integer) and isinstance(value, types.Integer)):
        return None

    def codegen(context, builder, signature, args):
        aryty = signature.args[0]
        array = context.make_array(aryty)(context, builder, args[0])
        ptr = cgutils.get_item_pointer(context, builder, aryty, array, [args[1]])
        v = context.cast(builder, args[2], signature.args[2], types.int64)
        return builder.atomic_rmw("add", ptr, v, "seq_cst")

    return types.int64(ary, index, value), codegen


@intrinsic
def _pause(typingctx):
    """The x86 ``pause`` hint of a spin-wait loop (nothing elsewhere)."""
    def codegen(context, builder, signature, args):
        if _X86:
            fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(ir.VoidType(), []),
                                                "llvm.x86.sse2.pause")
            builder.call(fn, [])
        return context.get_dummy_value()

    return types.none(), codegen


# a barrier's state, an int64 array (the processes' one in shared memory): arrivals in this
# generation (processes only; threads count under their lock), the generation, broken
_ARRIVED, _GENERATION, _BROKEN = 0, 1, 2
STATE_SIZE = 3


@njit(nogil=True, cache=True)
def _poll(state, generation, polls):
    """Poll until the generation moves on from ``generation`` or the barrier breaks, up to
    ``polls`` times; True when either happened."""
    for _ in range(polls):
        if (_load_acquire(state, _GENERATION) != generation
                or _load_acquire(state, _BROKEN) != 0):
            return True
        _pause()
    return False


@njit(nogil=True, cache=True)
def _arrive(state, parties):
    """Count one arrival; returns ``(generation, last)``: the generation arrived in and whether
    this arrival completed it (it then opened the barrier)."""
    generation = _load_acquire(state, _GENERATION)
    if _fetch_add(state, _ARRIVED, 1) == parties - 1:
        _fetch_add(state, _ARRIVED, -parties)  # the next generation counts from 0
        _fetch_add(state, _GENERATION, 1)      # opens it (no one arrives again before)
        return generation, True
    return generation, False


@njit(nogil=True, cache=True)
def _ring(state):
    """Count one ring of a doorbell (atomically, ordered after every earlier write)."""
    _fetch_add(state, _GENERATION, 1)


@njit(nogil=True, cache=True)
def _break(state):
    """Mark the barrier broken (atomically: every process's next load sees it)."""
    _fetch_add(state, _BROKEN, 1)


_polls_per_second: float | None = None


def _polls_for(seconds: float) -> int:
    """How many polls take about ``seconds`` on this CPU (measured once per process)."""
    global _polls_per_second
    if seconds <= 0:
        return 0
    if _polls_per_second is None:
        state, n = np.zeros(STATE_SIZE, np.int64), 100_000
        _poll(state, 0, 1)  # compile (or load from the cache) before timing
        t = time.perf_counter()
        _poll(state, 0, n)  # the generation stays 0: no poll sees a change, every one runs
        _polls_per_second = n / max(time.perf_counter() - t, 1e-9)
    return max(1, int(seconds * _polls_per_second))


def warm_up() -> None:
    """Compile the poll loops (or load them from Numba's cache) and measure their speed, once
    per process: the first barrier would otherwise do it."""
    _polls_for(SPIN_SECONDS)
    scratch = np.zeros(STATE_SIZE, np.int64)
    _arrive(scratch, 1)
    _ring(scratch)
    _break(scratch)


def default_spin(parties: int) -> float:
    """:data:`SPIN_SECONDS` when each of ``parties`` threads has a CPU of its own, else 0."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cpus = os.cpu_count() or 1
    return SPIN_SECONDS if parties <= cpus else 0.0


class SpinBarrier:
    """A barrier of ``parties`` threads, :class:`threading.Barrier`'s interface, whose waiters
    spin (without the GIL) for up to ``spin`` seconds before they sleep.

    Args:
        parties: the threads that must call :meth:`wait` before any returns.
        spin: seconds a waiter polls before it sleeps; None: :func:`default_spin`.
    """

    def __init__(self, parties: int, spin: float | None = None):
        if parties < 1:
            raise ValueError(f"a barrier needs at least one party. Received parties={parties}")
        self.parties = parties
        self.spin = default_spin(parties) if spin is None else float(spin)
        self._polls = _polls_for(self.spin)
        self._cond = threading.Condition(threading.Lock())
        self._count = 0  # threads arrived in the current generation
        self._generation = 0
        #: the generation, where the spinning waiters read it without the GIL (a barrier
        #: state whose other entries stay 0: this barrier counts and breaks under its lock)
        self._state = np.zeros(STATE_SIZE, np.int64)
        self._sleepers = 0
        self._broken = False
        self._broken_generation = -1  # the last generation ended by abort() or reset()

    @property
    def broken(self) -> bool:
        return self._broken

    def _open(self) -> None:
        """End the current generation (under the lock) and wake whoever sleeps."""
        self._count = 0
        self._generation += 1
        self._state[_GENERATION] = self._generation
        if self._sleepers:
            self._cond.notify_all()

    def wait(self) -> None:
        """Block until all ``parties`` threads have called it; raises
        :class:`threading.BrokenBarrierError` if the barrier is or gets aborted (or reset)
        while waiting."""
        with self._cond:
            if self._broken:
                raise threading.BrokenBarrierError
            generation = self._generation
            self._count += 1
            if self._count == self.parties:
                self._open()
                return
        if not (self._polls and _poll(self._state, generation, self._polls)):
            with self._cond:
                while self._generation == generation:
                    self._sleepers += 1
                    try:
                        self._cond.wait()
                    finally:
                        self._sleepers -= 1
        if self._broken_generation == generation:
            raise threading.BrokenBarrierError

    def abort(self) -> None:
        """Break the barrier: the waiting threads and every later :meth:`wait` raise
        :class:`threading.BrokenBarrierError` until :meth:`reset`."""
        with self._cond:
            self._broken = True
            self._broken_generation = self._generation
            self._open()

    def reset(self) -> None:
        """Return the barrier to its empty, unbroken state; threads waiting in it raise
        :class:`threading.BrokenBarrierError`."""
        with self._cond:
            if self._count:
                self._broken_generation = self._generation
                self._open()
            self._broken = False


class _SharedGeneration:
    """A generation in ``state``, an ``int64`` array of :data:`STATE_SIZE` zeros (at first) in
    memory several processes map, that waiters wait to see move: spinning for up to ``spin``
    seconds (None: :func:`default_spin` for ``parties``), then polling between naps of
    ``nap`` seconds."""

    def __init__(self, state: np.ndarray, parties: int, spin: float | None, nap: float):
        if state.dtype != np.int64 or state.shape != (STATE_SIZE,):
            raise ValueError(f"state must be int64 of shape ({STATE_SIZE},). Received "
                             f"{state.dtype} {state.shape}")
        self.state, self.nap = state, nap
        self.spin = default_spin(parties) if spin is None else float(spin)
        self._polls = _polls_for(self.spin)

    def _wait_past(self, generation: int, nap=None) -> None:
        """Return once the generation is no longer ``generation`` (or the state is broken);
        ``nap`` (called with :attr:`nap`) replaces :func:`time.sleep` between polls."""
        if not (self._polls and _poll(self.state, generation, self._polls)):
            while not _poll(self.state, generation, 1):
                (nap or time.sleep)(self.nap)


class SharedSpinBarrier(_SharedGeneration):
    """A barrier of ``parties`` processes over ``state``, an ``int64`` array of
    :data:`STATE_SIZE` zeros (at first) in memory they all map; :class:`threading.Barrier`'s
    ``wait``, ``abort`` and ``broken``. A waiter spins for up to ``spin`` seconds (None:
    :func:`default_spin`), then naps ``nap`` seconds at a time until the barrier opens.
    """

    def __init__(self, parties: int, state: np.ndarray, spin: float | None = None,
                 nap: float = 50e-6):
        if parties < 1:
            raise ValueError(f"a barrier needs at least one party. Received parties={parties}")
        super().__init__(state, parties, spin, nap)
        self.parties = parties

    @property
    def broken(self) -> bool:
        return bool(self.state[_BROKEN])  # an aligned 8-byte load: atomic

    def wait(self) -> None:
        """Block until all ``parties`` processes have called it; raises
        :class:`threading.BrokenBarrierError` if the barrier is or gets aborted."""
        if self.broken:
            raise threading.BrokenBarrierError
        generation, last = _arrive(self.state, self.parties)
        if not last:
            self._wait_past(generation)
        if self.broken:
            raise threading.BrokenBarrierError

    def abort(self) -> None:
        """Break the barrier for good: every waiting and later :meth:`wait` raises."""
        _break(self.state)


class SharedDoorbell(_SharedGeneration):
    """A doorbell over ``state``, an ``int64`` array of :data:`STATE_SIZE` zeros (at first) in
    memory several processes map: one process rings it (:meth:`ring`) after writing what the
    others should read (the ring is an atomic add, ordered after those writes); the others
    :meth:`wait` for a ring they have not seen yet, spinning for up to ``spin`` seconds (None:
    :func:`default_spin` for ``parties``), then polling between naps of ``nap`` seconds.

    A process rings the doorbell where a barrier would make it wait for the others: the
    ringer goes on at once.
    """

    def __init__(self, state: np.ndarray, parties: int, spin: float | None = None,
                 nap: float = 50e-6):
        super().__init__(state, parties, spin, nap)

    @property
    def rings(self) -> int:
        """How often it has rung."""
        return int(self.state[_GENERATION])  # an aligned 8-byte load: atomic

    def ring(self) -> None:
        _ring(self.state)

    def wait(self, seen: int, nap=None) -> int:
        """Block until the doorbell has rung more than ``seen`` times; returns :attr:`rings`.
        ``nap``: called with the nap's seconds instead of :func:`time.sleep` (a worker's nap
        can watch for its parent's end)."""
        self._wait_past(seen, nap)
        return self.rings
