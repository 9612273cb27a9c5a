"""Gradient compression on the wire: 16-bit floats for the MPI allreduce (Horovod's
``Compression.fp16``), an option of the ``mpi`` strategy (``compression="fp16"`` or
``"bf16"``; off by default).

A :class:`WireFormat` turns the flat gradient buffer (float32 or float64) into 16-bit values
before the allreduce and back after it, so every rank sends half the bytes of float32 (a
quarter of float64) per round. The sum is taken in the wire format, as Horovod's is: every
partial sum of the reduction is rounded to it, and every rank ends with the same bits (each
element is added by every rank in the same pairwise order).

- ``fp16``: IEEE half precision (5 exponent bits, 11 significant bits: ~3 decimal digits,
  largest 65504, smallest normal 6.1e-5; a larger gradient becomes infinite, and the fit
  stops as diverged).
- ``bf16``: bfloat16 (float32's 8 exponent bits, 8 significant bits: float32's range, ~2 to
  3 decimal digits), rounded to nearest even from float32 (float64 goes through float32
  first).

Both are summed by :func:`sum_op`, a user-defined operation on 16-bit words that adds in
float32 with NumPy and rounds back (float32 holds 2 x 11 + 2 bits, so this is the correctly
rounded half-precision sum). MPICH has no bfloat16 type, and its own ``MPI_SUM`` on
``MPIX_C_FLOAT16`` converts element by element, several times slower than NumPy's whole-array
conversion (``python -m cnn bench compression`` times the formats). For a user-defined
operation MPICH picks recursive doubling: the same bytes as Rabenseifner's algorithm on 2
ranks, ``log2 p`` times the message from each rank on ``p`` (against ``2 (p - 1) / p`` for an
exact float32 sum), so from 8 ranks on compression saves less than half the bytes.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

from ..checks import check_choice

__all__ = ["FORMATS", "WireFormat", "bf16_to_float32", "check_compression", "float32_to_bf16",
           "get_wire_format"]


def float32_to_bf16(x: np.ndarray, out: np.ndarray) -> np.ndarray:
    """``out`` (uint16, the shape of ``x``) = the bfloat16 bit patterns of ``x`` rounded to
    nearest, ties to even (NaN stays NaN). ``x``: float32, or wider (cast to float32 first)."""
    bits = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    # add half a unit of the kept 16 bits, plus one where the kept part is odd (ties to even)
    rounded = bits + (np.uint32(0x7FFF) + ((bits >> np.uint32(16)) & np.uint32(1)))
    np.right_shift(rounded, np.uint32(16), out=out, casting="unsafe")
    nan = np.isnan(x)
    if nan.any():  # rounding could carry a NaN's payload into the exponent: keep it a NaN
        out[nan] = 0x7FC0
    return out


def bf16_to_float32(words: np.ndarray) -> np.ndarray:
    """float32 values of bfloat16 bit patterns ``words`` (uint16): exact."""
    return (words.astype(np.uint32) << np.uint32(16)).view(np.float32)


def _decode_bf16(words: np.ndarray, out: np.ndarray) -> np.ndarray:
    if out.dtype == np.float32:  # the bits straight into place, no temporary
        np.left_shift(words, np.uint32(16), out=out.view(np.uint32), dtype=np.uint32)
    else:
        np.copyto(out, bf16_to_float32(words))
    return out


@dataclass(frozen=True)
class WireFormat:
    """A 16-bit format for the allreduce: ``name``, how values go in (``encode(values,
    words)``, ``words`` an array of ``storage`` dtype) and come out (``decode(words,
    values)``, exact: every 16-bit value is a float32 and a float64), and ``add(a, b)``: the
    sum of two arrays of words, rounded to the format."""
    name: str
    storage: np.dtype
    encode: Callable[[np.ndarray, np.ndarray], np.ndarray]
    decode: Callable[[np.ndarray, np.ndarray], np.ndarray]
    add: Callable[[np.ndarray, np.ndarray], np.ndarray]

    @property
    def itemsize(self) -> int:
        return self.storage.itemsize

    def empty(self, n: int) -> np.ndarray:
        """A wire buffer of ``n`` values."""
        return np.empty(n, self.storage)

    def mpi_type_and_op(self, MPI):
        """``(datatype, op)`` for an ``Allreduce`` of this format's words: 16-bit words and
        :func:`sum_op` (free it with ``op.Free()``)."""
        return MPI.UINT16_T, sum_op(MPI, self)


def _copy(src: np.ndarray, out: np.ndarray) -> np.ndarray:
    with np.errstate(over="ignore"):  # to float16: beyond 65504 is inf, which fit reports
        np.copyto(out, src, casting="unsafe")  # IEEE rounding to nearest even
    return out


def _add_bf16(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    out = np.empty(a.shape, np.uint16)
    return float32_to_bf16(bf16_to_float32(a) + bf16_to_float32(b), out)


def _add_fp16(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a.astype(np.float32) + b.astype(np.float32)).astype(np.float16)


#: the wire formats by name
FORMATS = {
    "fp16": WireFormat("fp16", np.dtype(np.float16), _copy, _copy, _add_fp16),
    "bf16": WireFormat("bf16", np.dtype(np.uint16), float32_to_bf16, _decode_bf16,
                       _add_bf16),
}


def check_compression(value) -> str | None:
    """``compression``: None (off) or a name of :data:`FORMATS`; else a ``ValueError``."""
    return check_choice(None, "compression", value, (None, *FORMATS))


def get_wire_format(name: str) -> WireFormat:
    return FORMATS[check_compression(name)]


def sum_op(MPI, fmt: WireFormat):
    """A commutative user-defined MPI operation that adds buffers of ``fmt``'s 16-bit words
    (``inout = fmt.add(in, inout)``)."""
    def add(inbuf, inoutbuf, datatype) -> None:
        a = np.frombuffer(inbuf, fmt.storage)
        b = np.frombuffer(inoutbuf, fmt.storage)
        b[...] = fmt.add(a, b)

    return MPI.Op.Create(add, commute=True)
