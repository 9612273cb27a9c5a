"""The 16-bit wire formats of gradient compression (:mod:`cnn.parallel.compression`) against
independent conversions: ml_dtypes' bfloat16 (TensorFlow's own type) and the IEEE half
precision of Python's ``struct`` (format ``e``); their sums through the MPI user operation.
The training runs with compression (2 ranks, against a plain loop) are in tests/test_mpi.py,
their bytes on a shaped link in tests/test_cluster.py."""
from __future__ import annotations

import struct

import numpy as np
import pytest

from cnn.parallel.compression import FORMATS, check_compression, float32_to_bf16

ml_dtypes = pytest.importorskip("ml_dtypes")


def _random_float32(n: int, seed: int = 0) -> np.ndarray:
    """Finite float32 values from random bit patterns (every exponent, subnormals too)."""
    bits = np.random.default_rng(seed).integers(0, 2 ** 32, n, dtype=np.uint64).astype(np.uint32)
    x = bits.view(np.float32)
    return x[np.isfinite(x)]


def test_bf16_rounds_to_nearest_even_as_ml_dtypes():
    edge = np.array([0.0, -0.0, 1.0, 1.00390625, 1.01171875, -2.5, 3.0e38, 3.4028235e38,
                     np.inf, -np.inf, 1e-40, -1e-45], np.float32)  # ties, overflow, subnormals
    x = np.concatenate([_random_float32(200_000), edge])
    words = float32_to_bf16(x, np.empty(x.size, np.uint16))
    np.testing.assert_array_equal(words, x.astype(ml_dtypes.bfloat16).view(np.uint16))


def test_bf16_keeps_nan_a_nan():
    # the second: a NaN whose rounding would carry into the sign bit
    x = np.array([0x7FC00000, 0xFFFFFFFF, 0x3F800000], np.uint32).view(np.float32)
    words = float32_to_bf16(x, np.empty(3, np.uint16))
    back = FORMATS["bf16"].decode(words, np.empty(3, np.float32))
    assert np.isnan(back[:2]).all() and back[2] == 1.0


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_bf16_decodes_exactly(dtype):
    words = _random_float32(10_000).astype(ml_dtypes.bfloat16).view(np.uint16)
    out = FORMATS["bf16"].decode(words, np.empty(words.size, dtype))
    np.testing.assert_array_equal(out, words.view(ml_dtypes.bfloat16).astype(dtype))


def test_fp16_encodes_as_ieee_half_from_float64():
    x = np.random.default_rng(1).standard_normal(2000) * 10.0 ** np.arange(-8, 6, 14 / 2000)
    words = FORMATS["fp16"].encode(x, FORMATS["fp16"].empty(x.size))
    want = np.array([struct.unpack("<e", struct.pack("<e", v))[0] if abs(v) < 65520 else
                     np.copysign(np.inf, v) for v in x])
    np.testing.assert_array_equal(words.astype(np.float64), want)
    assert FORMATS["fp16"].itemsize == FORMATS["bf16"].itemsize == 2


@pytest.mark.parametrize("name", ["fp16", "bf16"])
def test_the_mpi_sum_of_words_rounds_the_float32_sum(name):
    """The user-defined operation (MPICH's path for bfloat16; fp16's where the library lacks
    a half type): ``inout = round(float32(in) + float32(inout))``."""
    from mpi4py import MPI
    from cnn.parallel.compression import sum_op
    fmt = FORMATS[name]
    wire = np.float16 if name == "fp16" else ml_dtypes.bfloat16
    rng = np.random.default_rng(2)
    a, b = (rng.standard_normal(5000).astype(np.float32).astype(wire) for _ in range(2))
    want = (a.astype(np.float32) + b.astype(np.float32)).astype(wire)
    inout = b.view(fmt.storage).copy()
    op = sum_op(MPI, fmt)
    try:
        op.Reduce_local([a.view(fmt.storage), MPI.UINT16_T], [inout, MPI.UINT16_T])
    finally:
        op.Free()
    np.testing.assert_array_equal(inout, want.view(fmt.storage))


def test_fp16_sums_as_the_library_half_type_does():
    """Our operation on fp16 words gives the bits of MPICH's own ``MPI_SUM`` on
    ``MPIX_C_FLOAT16`` (both the correctly rounded sum), which is slower."""
    from mpi4py import MPI
    if getattr(MPI, "FLOAT16_T", MPI.DATATYPE_NULL) == MPI.DATATYPE_NULL:
        pytest.skip("this MPI library has no half-precision type")
    rng = np.random.default_rng(3)
    a, b = (rng.standard_normal(5000) * 10.0 ** rng.integers(-8, 5, 5000) for _ in range(2))
    a, b = a.astype(np.float16), b.astype(np.float16)
    theirs = b.copy()
    MPI.SUM.Reduce_local([a, MPI.FLOAT16_T], [theirs, MPI.FLOAT16_T])
    datatype, op = FORMATS["fp16"].mpi_type_and_op(MPI)
    ours = b.copy()
    try:
        op.Reduce_local([a, datatype], [ours, datatype])
    finally:
        op.Free()
    np.testing.assert_array_equal(ours.view(np.uint16), theirs.view(np.uint16))


@pytest.mark.parametrize("value", ["fp8", "float16", 16, True])
def test_unknown_compression_is_refused_naming_the_value(value):
    with pytest.raises(ValueError, match=f"Received compression={value!r}"):
        check_compression(value)
    assert check_compression(None) is None and check_compression("bf16") == "bf16"
