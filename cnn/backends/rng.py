"""The counter-based random numbers of training passes (dropout masks), the same on every path.

A dropout mask must not depend on which worker, rank or device computes it, so that ``sync``
over any number of threads or ranks draws exactly the masks of the sequential path. Masks are
therefore not drawn from a stateful generator but *computed*, as a hash of their coordinates
(a counter-based generator, like Philox in cuRAND/JAX, or SplitMix64):

    key   = layer_key(seed, layer name)                      once per layer      (host)
    k     = mix64(key + (step + 1) * GOLDEN)                 once per pass       (host)
    row   = mix64(k + (example + 1) * GOLDEN)                once per example    (kernel)
    bits  = mix64(row + (element + 1) * GOLDEN)              once per element    (kernel)
    keep  = (bits >> 32) >= threshold(rate)                  integer comparison

``mix64`` is the SplitMix64 finaliser (Steele, Lea & Flood 2014, the output function of
``java.util.SplittableRandom``), all arithmetic modulo 2**64; ``example`` is the index of the
example in the *global* batch (``StepContext.offset + i``) and ``element`` the flat index of the
unit within one example, so the mask of a unit is a pure function of ``(seed, layer, step,
example, unit)``. The comparison is on integers (``threshold = floor(rate * 2**32)``), so
float32 and float64 models and every backend keep exactly the same units; a unit is kept with
probability ``1 - threshold / 2**32``, within ``2**-32`` of ``1 - rate``.

The same function is written four times: with Python integers (:func:`keep_mask_reference`,
the test oracle), vectorised in NumPy (:func:`keep_mask`), and as Numba CPU and CUDA device
functions (:mod:`cnn.backends.numba.layer_ops`, :mod:`cnn.backends.cuda.layer_kernels`);
``tests/test_rng.py`` and the simulator checks assert that all four agree bit for bit.

Data augmentation (:mod:`cnn.augment`) draws from the same construction, with the epoch as
the pass counter and the example's index in the *training set* as the example:
``k = pass_key(seed, "__augment__", epoch)``, the example's key ``index_keys(k, i)`` and its
draws ``uniform_below(row, j, count)`` (integers in ``[0, count)``), so the crop and flip of an
example depend neither on the batch it falls in nor on the worker or rank that gathers it.
"""
from __future__ import annotations

import zlib

import numpy as np

MASK64 = (1 << 64) - 1
#: 2**64 / golden ratio, odd: the SplitMix64 increment
GOLDEN = 0x9E3779B97F4A7C15
MIX1 = 0xBF58476D1CE4E5B9
MIX2 = 0x94D049BB133111EB


def mix64(z: int) -> int:
    """The SplitMix64 finaliser on a Python int (modulo 2**64)."""
    z &= MASK64
    z = ((z ^ (z >> 30)) * MIX1) & MASK64
    z = ((z ^ (z >> 27)) * MIX2) & MASK64
    return z ^ (z >> 31)


def layer_key(seed: int, name: str) -> int:
    """The key of one layer's stream: the fit's ``seed`` and a stable hash of the layer name
    (CRC-32, not Python's ``hash``, which differs between processes)."""
    return mix64(mix64((int(seed) & MASK64) + GOLDEN) ^ zlib.crc32(name.encode("utf-8")))


def pass_key(seed: int, name: str, step: int) -> int:
    """The key of layer ``name``'s masks in global optimizer step ``step`` (a 64-bit int that
    the backends' ``dropout_forward`` takes)."""
    return mix64(layer_key(seed, name) + (int(step) + 1) * GOLDEN)


def threshold(rate: float) -> int:
    """``floor(rate * 2**32)``: a unit is dropped when the top 32 bits of its hash are below it."""
    if not 0.0 <= rate < 1.0:
        raise ValueError(f"dropout rate must be in [0, 1). Received rate={rate!r}")
    return int(rate * 4294967296.0)


def keep_mask_reference(key: int, rate: float, offset: int, shape: tuple[int, ...]) -> np.ndarray:
    """Boolean keep mask of shape ``shape = (N, ...)`` from Python integer arithmetic, one unit
    at a time: the definition above, and the oracle of the tests (slow: tiny shapes only)."""
    n = shape[0]
    per_example = int(np.prod(shape[1:], dtype=np.int64))
    t = threshold(rate)
    out = np.zeros((n, per_example), dtype=bool)
    for i in range(n):
        row = mix64(key + (offset + i + 1) * GOLDEN)
        for j in range(per_example):
            out[i, j] = (mix64(row + (j + 1) * GOLDEN) >> 32) >= t
    return out.reshape(shape)


# ---- NumPy ---------------------------------------------------------------------------------------
_U = np.uint64


def _mix64_np(z: np.ndarray) -> np.ndarray:
    """``mix64`` on a uint64 array, in place (wrapping multiplication)."""
    z ^= z >> _U(30)
    z *= _U(MIX1)
    z ^= z >> _U(27)
    z *= _U(MIX2)
    z ^= z >> _U(31)
    return z


def index_keys(key: int, indices, out: np.ndarray | None = None) -> np.ndarray:
    """``mix64(key + (i + 1) * GOLDEN)`` for every ``i`` of ``indices`` (non-negative
    integers): the keys of the examples ``indices`` (uint64), into ``out`` when given."""
    z = np.empty(np.shape(indices), np.uint64) if out is None else out
    z[...] = indices
    z += _U(1)
    z *= _U(GOLDEN)
    z += _U(key & MASK64)
    return _mix64_np(z)


def uniform_below(rows: np.ndarray, element: int, count: int) -> np.ndarray:
    """Draw ``element`` of each example's stream as an integer uniform in ``[0, count)``:
    ``((mix64(row + (element + 1) * GOLDEN) >> 32) * count) >> 32`` for every per-example key
    ``row`` of ``rows`` (uint64, :func:`index_keys`). The top 32 bits of the unit's hash, as a
    dropout unit's, scaled by a multiplication (Lemire 2019): each value has probability
    within ``2**-32`` of ``1 / count``; ``count <= 2**32``. Returns int64."""
    if not 1 <= count <= 1 << 32:
        raise ValueError(f"count must be in [1, 2**32]. Received count={count!r}")
    bits = rows + _U(((element + 1) * GOLDEN) & MASK64)
    _mix64_np(bits)
    bits >>= _U(32)
    bits *= _U(count)
    bits >>= _U(32)
    return bits.astype(np.int64)


def row_keys(key: int, offset: int, n: int, out: np.ndarray | None = None) -> np.ndarray:
    """``mix64(key + (offset + i + 1) * GOLDEN)`` for ``i < n``: the per-example keys (uint64)
    of the examples ``offset .. offset + n - 1``, into ``out`` when given."""
    return index_keys(key, np.arange(offset, offset + n, dtype=np.uint64), out)


def keep_mask_into(keep: np.ndarray, key: int, rate: float, offset: int, z: np.ndarray,
                   tmp: np.ndarray, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
    """The keep mask of ``keep (N, D)`` (bool) computed in caller-provided uint64 buffers
    ``z``, ``tmp`` ``(N, D)``, ``rows (N,)``, ``cols (D,)``: no allocation of size ``N*D``."""
    n, d = keep.shape
    row_keys(key, offset, n, out=rows)
    cols[...] = np.arange(1, d + 1, dtype=np.uint64)
    cols *= _U(GOLDEN)
    np.add(rows[:, None], cols[None, :], out=z)
    for shift, mult in ((30, MIX1), (27, MIX2)):
        np.right_shift(z, _U(shift), out=tmp)
        np.bitwise_xor(z, tmp, out=z)
        np.multiply(z, _U(mult), out=z)
    np.right_shift(z, _U(31), out=tmp)
    np.bitwise_xor(z, tmp, out=z)
    np.right_shift(z, _U(32), out=z)
    return np.greater_equal(z, _U(threshold(rate)), out=keep)


def keep_mask(key: int, rate: float, offset: int, shape: tuple[int, ...]) -> np.ndarray:
    """Boolean keep mask of ``shape = (N, ...)``, vectorised (the NumPy backend's)."""
    n = shape[0]
    d = int(np.prod(shape[1:], dtype=np.int64))
    u64 = [np.empty((n, d), np.uint64), np.empty((n, d), np.uint64), np.empty(n, np.uint64),
           np.empty(d, np.uint64)]
    return keep_mask_into(np.empty((n, d), bool), key, rate, offset, *u64).reshape(shape)
