"""The Numba CPU backends, ``numba`` and ``numba_parallel`` (:mod:`.backend`), with what they
run: the compiled kernels (:mod:`.kernels`, :mod:`.layer_ops`), the BLAS conv paths' chunk
loops (:mod:`.conv`, and :mod:`.winograd` for Winograd's fast 3 x 3 convolution) and NumPy's
BLAS GEMM called from compiled code (:mod:`.blas`).

Importing this package imports Numba; :func:`cnn.backends.get_backend` does so only when a
Numba backend is first asked for."""
from .backend import NumbaBackend, NumbaParallelBackend

__all__ = ["NumbaBackend", "NumbaParallelBackend"]
