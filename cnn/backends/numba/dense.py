"""The dense layer's forward and backward on the Numba backends, each one ``nogil`` call.

The products are NumPy's own BLAS GEMMs (:func:`~cnn.backends.numba.blas.gemm`), as in the
NumPy backend; what the compiled call adds is that the bias (forward) and the bias gradient
(backward) are done in the same call, and that the call releases the GIL once. NumPy's dense
op is three or four calls (``matmul``, ``+=``, ``sum``, ``matmul``), each taking and
releasing the GIL, and a small layer's ufuncs hold it throughout: with data-parallel threads
each of those hand-overs is a point where one worker waits for the other's Python. The bias
gradient sums the rows of ``dout`` in row order, as NumPy's ``sum(axis=0)`` of a C-contiguous
array does, so the results are NumPy's bit for bit when the GEMMs are.
"""
from __future__ import annotations

from numba import njit

from .blas import gemm

_JIT = dict(nogil=True, cache=True, fastmath=False)


@njit(**_JIT)
def dense_forward(x, w, b, out):
    """``out (N, F) = x (N, D) @ w (D, F) + b (F,)``."""
    gemm(x, w, out, 0.0)
    for i in range(out.shape[0]):
        for j in range(out.shape[1]):
            out[i, j] += b[j]


@njit(**_JIT)
def dense_backward(dout, x, w, need_dx, dw, db, dx):
    """From ``dout (N, F)`` and the forward's ``x (N, D)``, ``w (D, F)``: ``dw (D, F) = x^T @
    dout``, ``db (F,)`` the column sums of ``dout`` and, with ``need_dx``, ``dx (N, D) = dout
    @ w^T`` (else ``dx`` is not touched)."""
    gemm(x.T, dout, dw, 0.0)
    db[:] = 0
    for i in range(dout.shape[0]):
        for j in range(dout.shape[1]):
            db[j] += dout[i, j]
    if need_dx:
        gemm(dout, w.T, dx, 0.0)
