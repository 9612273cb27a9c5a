"""NumPy's own BLAS GEMM, callable from ``nogil`` Numba code.

The Numba backend's BLAS conv paths run chunk by chunk: unroll a chunk's patches, one GEMM,
pool the result, and so on. Driven from Python, every chunk cost half a dozen calls, each of
which released the GIL and took it back, hundreds of hand-overs per training pass. Two
``sync`` worker threads then queued for the GIL between their kernels, and their passes ran
slower side by side than alone, where two processes did not. Calling the GEMM from Numba lets
a whole chunk loop run as one ``nogil`` call (:mod:`~cnn.backends.numba.conv`).

:func:`gemm` calls ``cblas_sgemm``/``cblas_dgemm`` of the BLAS library that NumPy itself
loaded (found with threadpoolctl, so ``threadpool_limits`` pins it as it pins NumPy's
``matmul``): the same kernels as ``np.matmul`` on the same operands. The compiled code calls
the fixed symbols ``cnn_cblas_sgemm64``/``cnn_cblas_dgemm64``, which this module registers
with LLVM at import (for the library found, or else for :func:`_gemm_loops`), so Numba's disk
cache holds code that is valid whichever library a later process finds. NumPy's wheels
bundle OpenBLAS with 64-bit integers and renamed symbols (``scipy_cblas_sgemm64_``); other
builds export ``cblas_sgemm64_`` or ``cblas_sgemm`` (32-bit integers, not used). Without a
64-bit-integer CBLAS, :data:`HAVE_BLAS` is False and the symbols run a plain loop nest
(correct, and much slower); :data:`BLAS_SOURCE` says which it is.
"""
from __future__ import annotations

import ctypes

import llvmlite.binding as llvm
import numpy as np
from numba import carray, cfunc, njit, types

_JIT = dict(nogil=True, cache=True, fastmath=False)

_ROW_MAJOR, _NO_TRANS, _TRANS = 101, 111, 112


def _signature(real):
    """``cblas_?gemm``'s: order, trans_a, trans_b, m, n, k, alpha, a, lda, b, ldb, beta, c,
    ldc (64-bit integers)."""
    i32, i64, p = types.int32, types.int64, types.voidptr
    return types.void(i32, i32, i32, i64, i64, i64, real, p, i64, p, i64, real, p, i64)


_SIGNATURES = {"s": _signature(types.float32), "d": _signature(types.float64)}
_sgemm = types.ExternalFunction("cnn_cblas_sgemm64", _SIGNATURES["s"])
_dgemm = types.ExternalFunction("cnn_cblas_dgemm64", _SIGNATURES["d"])


def _find_cblas() -> tuple[dict[str, int] | None, str]:
    """``({"s": address, "d": address}, description)`` of the 64-bit-integer
    ``cblas_sgemm``/``cblas_dgemm`` of the BLAS NumPy uses, or ``(None, why not)``."""
    try:
        from threadpoolctl import threadpool_info
        np.ones((2, 2)) @ np.ones((2, 2))  # NumPy loads its BLAS on first use
        libs = [i for i in threadpool_info() if i.get("user_api") == "blas"]
    except Exception as err:  # noqa: BLE001 - the fallback still works
        return None, f"threadpoolctl could not list the BLAS libraries ({err})"
    tried = []
    for info in libs:
        try:
            lib = ctypes.CDLL(info["filepath"])
        except OSError as err:
            tried.append(f"{info['filepath']}: {err}")
            continue
        for prefix in ("scipy_", ""):
            names = {t: f"{prefix}cblas_{t}gemm64_" for t in "sd"}
            if all(hasattr(lib, n) for n in names.values()):
                return ({t: ctypes.cast(getattr(lib, n), ctypes.c_void_p).value
                         for t, n in names.items()},
                        f"{names['s']}/{names['d']} of {info['filepath']}")
        tried.append(f"{info['filepath']}: no 64-bit-integer cblas_sgemm/cblas_dgemm")
    return None, "; ".join(tried) or "NumPy has loaded no BLAS library threadpoolctl can see"


def _gemm_loops(real):
    """A C-callable ``cblas_?gemm`` (row-major only) as a plain loop nest: the fallback."""
    dt = np.float32 if real == "s" else np.float64

    @cfunc(_SIGNATURES[real], nopython=True)
    def gemm_loops(order, trans_a, trans_b, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc):
        rows_a = k if trans_a == _TRANS else m
        rows_b = n if trans_b == _TRANS else k
        av = carray(a, (max(rows_a, 1) * lda,), dt)
        bv = carray(b, (max(rows_b, 1) * ldb,), dt)
        cv = carray(c, (m * ldc,), dt)
        for i in range(m):
            for j in range(n):
                acc = dt(0)
                for q in range(k):
                    x = av[q * lda + i] if trans_a == _TRANS else av[i * lda + q]
                    y = bv[j * ldb + q] if trans_b == _TRANS else bv[q * ldb + j]
                    acc += x * y
                old = cv[i * ldc + j] if beta != 0 else dt(0)
                cv[i * ldc + j] = alpha * acc + beta * old
    return gemm_loops


_ADDRESSES, BLAS_SOURCE = _find_cblas()
#: whether :func:`gemm` calls NumPy's BLAS (else the loop nest of :func:`_gemm_loops`)
HAVE_BLAS = _ADDRESSES is not None
if not HAVE_BLAS:
    _FALLBACK = {t: _gemm_loops(t) for t in "sd"}  # kept alive: LLVM holds their addresses
    _ADDRESSES = {t: f.address for t, f in _FALLBACK.items()}
    BLAS_SOURCE = f"Numba loop nest ({BLAS_SOURCE})"
for _t, _address in _ADDRESSES.items():
    llvm.add_symbol(f"cnn_cblas_{_t}gemm64", _address)


@njit(**_JIT)
def _layout(a):
    """``(trans, leading dimension)`` of a 2-D array with one unit stride (a C-contiguous
    matrix, or the transposed view of one)."""
    item = a.itemsize
    if a.strides[1] == item or a.shape[1] == 1:
        return _NO_TRANS, max(a.strides[0] // item, max(a.shape[1], 1))
    return _TRANS, max(a.strides[1] // item, max(a.shape[0], 1))


@njit(**_JIT)
def gemm(a, b, c, beta):
    """``c = a @ b + beta * c`` (``beta`` 0: ``c`` is only written) for 2-D float32 or float64
    arrays ``a (M, K)``, ``b (K, N)``, ``c (M, N)``; ``a`` and ``b`` C-contiguous or
    transposed views of C-contiguous arrays, ``c`` C-contiguous."""
    m, k, n = a.shape[0], a.shape[1], b.shape[1]
    if m == 0 or n == 0:
        return
    ta, lda = _layout(a)
    tb, ldb = _layout(b)
    ldc = max(c.strides[0] // c.itemsize, max(n, 1))
    if c.itemsize == 4:
        _sgemm(_ROW_MAJOR, ta, tb, m, n, k, np.float32(1.0), a.ctypes, lda, b.ctypes, ldb,
               np.float32(beta), c.ctypes, ldc)
    else:
        _dgemm(_ROW_MAJOR, ta, tb, m, n, k, 1.0, a.ctypes, lda, b.ctypes, ldb, float(beta),
               c.ctypes, ldc)
