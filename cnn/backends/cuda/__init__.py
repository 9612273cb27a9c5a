"""The CUDA backend (:mod:`.backend`): every op of the contract as a Numba CUDA kernel on
device arrays (:mod:`.kernels`, and :mod:`.layer_kernels` launched by :mod:`.layer_ops`).

Importing this package imports ``numba.cuda``; :func:`cnn.backends.get_backend` does so only
when the ``cuda`` backend is first asked for."""
from .backend import CudaBackend

__all__ = ["CudaBackend"]
