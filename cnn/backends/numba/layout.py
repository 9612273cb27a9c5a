"""The two memory layouts of the numba backend's ``(N, C, H, W)`` arrays, told apart by their
strides alone (see "Layout" in :mod:`cnn.backends.numba.backend`): C-contiguous (NCHW), or an
``(N, C, H, W)`` view of a C-contiguous channels-last ``(N, H, W, C)`` buffer, which the conv
layers on the BLAS path hand from layer to layer.
"""
from __future__ import annotations


def nhwc(a):
    """The channels-last buffer ``(N, H, W, C)`` behind an ``(N, C, H, W)`` array when there
    is one (the array is a transposed view of a C-contiguous buffer), else None."""
    if a.ndim != 4:
        return None
    t = a.transpose(0, 2, 3, 1)
    return t if t.flags.c_contiguous else None


def channels_last(a):
    """:func:`nhwc` of an array that is not C-contiguous as well: a channels-last array an op
    keeps channels-last. (An array with ``C == 1``, or ``H == W == 1``, is both; the ops treat
    it as NCHW.)"""
    return None if a.flags.c_contiguous else nhwc(a)


def like(backend, ws, name: str, a):
    """An uninitialised output buffer shaped like ``a``, in ``a``'s layout: an ``(N, C, H, W)``
    view of the channels-last buffer ``name + "_nhwc"`` when ``a`` is channels-last, else the
    C-contiguous buffer ``name`` (``backend.scratch``: the workspace's, or a new array)."""
    if channels_last(a) is not None:
        n, c, h, w = a.shape
        return backend.scratch(ws, name + "_nhwc", (n, h, w, c), a.dtype).transpose(0, 3, 1, 2)
    return backend.scratch(ws, name, a.shape, a.dtype)
