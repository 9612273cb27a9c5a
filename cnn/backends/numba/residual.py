"""Numba CPU kernels of the ops residual networks add (see :mod:`cnn.backends.base`): a block's
sum with the ReLU after it, the sum's backward, the sum of the branches' input gradients,
option A's shortcut (stride subsampling and zero-padded channels) and global average pooling;
and the mixin that gives them to :class:`~cnn.backends.numba.backend.NumbaBackend`.

Kernels are ``@njit(nogil=True, cache=True, fastmath=False)`` like those of
:mod:`cnn.backends.numba.kernels`: they release the GIL (the threads strategy runs one per
core), keep IEEE semantics and write into arrays the caller allocates (workspace buffers).
Every op is one memory-bound pass, so what they save is passes and conversions: the ReLU
rides in the sum's pass, and no op converts between layouts on the path a ResNet takes.
``numba_parallel`` runs these same sequential kernels, as it does batch norm's.

Layouts
-------
Every op returns its output in the layout of its (first) input, channels-last or NCHW (see
:mod:`cnn.backends.numba.layout`), so a channels-last activation stays channels-last through
a block: the block's sum, the shortcut and the pooling read and write the buffers the conv
layers hand over, and their backwards hand the conv layers channels-last gradients back.

The kernels walk 4-D arrays with the last axis innermost, channels-last arrays as their
``(N, H, W, C)`` buffers. When every operand of an elementwise op is contiguous in that order
(the operands of a block come from layers of one kind), the op passes ``(1, 1, 1, size)``
views, so the inner loop runs over the whole array and vectorises. An operand of the other
layout (the first block's shortcut, when the layers before the block hand over NCHW arrays) is
read through its strided view: a second compiled specialisation, for that case only. Option A's
shortcut and global average pooling have a kernel shape per layout instead, as pooling has in
:mod:`~cnn.backends.numba.kernels`: the subsampled pixels are rows of ``C`` channels
channels-last, and strided runs of a plane in NCHW.
"""
from __future__ import annotations

import numpy as np
from numba import njit

from ...checks import check_int
from .layout import channels_last, like

_JIT = dict(nogil=True, cache=True, fastmath=False)


# ---- elementwise: the block's sum and its backward ----------------------------------------------
# Four nested loops over 4-D views of any strides, the last axis innermost; the zero is typed
# like the data (an int in the select stops LLVM from vectorising the loop).
@njit(**_JIT)
def add(a4, b4, relu, out4):
    """``out4 = a4 + b4``, then ``max(out4, 0)`` when ``relu`` (NaN gives 0, as the ReLU
    kernel); arrays of one shape."""
    zero = out4.dtype.type(0)
    n0, n1, n2, n3 = out4.shape
    for i in range(n0):
        for j in range(n1):
            for k in range(n2):
                for m in range(n3):
                    s = a4[i, j, k, m] + b4[i, j, k, m]
                    out4[i, j, k, m] = s if (s > zero or not relu) else zero


@njit(**_JIT)
def pass_positive(dout4, out4, dx4):
    """``dx4 = dout4`` where the forward's output ``out4`` is positive, else 0: the ReLU's
    backward (its derivative at 0 taken as 0)."""
    zero = dx4.dtype.type(0)
    n0, n1, n2, n3 = dx4.shape
    for i in range(n0):
        for j in range(n1):
            for k in range(n2):
                for m in range(n3):
                    dx4[i, j, k, m] = dout4[i, j, k, m] if out4[i, j, k, m] > zero else zero


# ---- option A's shortcut ------------------------------------------------------------------------
# Channel offsets index with uint64 values: with a signed ``before + c`` Numba emits
# negative-index wraparound code, which stops the copy loop from vectorising (see kernels.py).
@njit(**_JIT)
def shortcut_pad_nhwc(x4, stride, before, out4):
    """``out4 (N, Ho, Wo, C')``: channels ``before:before + C`` of pixel ``(i, j)`` are the
    channels of pixel ``(i * stride, j * stride)`` of the channels-last ``x4 (N, H, W, C)``,
    the others zero."""
    nimg, ho, wo, c_out = out4.shape
    c_in = x4.shape[3]
    zero = out4.dtype.type(0)
    ub, uc = np.uint64(before), np.uint64(c_in)
    for n in range(nimg):
        for i in range(ho):
            for j in range(wo):
                for c in range(ub):
                    out4[n, i, j, c] = zero
                for c in range(uc):
                    out4[n, i, j, ub + c] = x4[n, i * stride, j * stride, c]
                for c in range(ub + uc, np.uint64(c_out)):
                    out4[n, i, j, c] = zero


@njit(**_JIT)
def shortcut_unpad_nhwc(dout4, stride, before, dx4):
    """The adjoint of :func:`shortcut_pad_nhwc`: ``dx4 (N, H, W, C)`` holds channels
    ``before:before + C`` of ``dout4 (N, Ho, Wo, C')`` at the pixels the subsampling kept, and
    zeros at the others."""
    nimg, h, w, c_in = dx4.shape
    zero = dx4.dtype.type(0)
    ub, uc = np.uint64(before), np.uint64(c_in)
    for n in range(nimg):
        for y in range(h):
            i = y // stride
            for xc in range(w):
                if y - i * stride or xc % stride:
                    for c in range(uc):
                        dx4[n, y, xc, c] = zero
                else:
                    j = xc // stride
                    for c in range(uc):
                        dx4[n, y, xc, c] = dout4[n, i, j, ub + c]


@njit(**_JIT)
def shortcut_pad_planes(x4, stride, before, out4):
    """:func:`shortcut_pad_nhwc` on NCHW arrays: ``out4 (N, C', Ho, Wo)``, planes
    ``before:before + C`` subsampled from the planes of ``x4 (N, C, H, W)``, the others zero."""
    nimg, c_out, ho, wo = out4.shape
    c_in = x4.shape[1]
    zero = out4.dtype.type(0)
    for n in range(nimg):
        for c in range(c_out):
            if c < before or c >= before + c_in:
                for i in range(ho):
                    for j in range(wo):
                        out4[n, c, i, j] = zero
            else:
                for i in range(ho):
                    for j in range(wo):
                        out4[n, c, i, j] = x4[n, c - before, i * stride, j * stride]


@njit(**_JIT)
def shortcut_unpad_planes(dout4, stride, before, dx4):
    """:func:`shortcut_unpad_nhwc` on NCHW arrays."""
    nimg, c_in, h, w = dx4.shape
    zero = dx4.dtype.type(0)
    for n in range(nimg):
        for c in range(c_in):
            for y in range(h):
                i = y // stride
                if y - i * stride:
                    for xc in range(w):
                        dx4[n, c, y, xc] = zero
                    continue
                for xc in range(w):
                    j = xc // stride
                    dx4[n, c, y, xc] = zero if xc - j * stride else dout4[n, before + c, i, j]


# ---- global average pooling ---------------------------------------------------------------------
# Images as (A, L, K): the channels-last (N, H*W, C), or an NCHW array's planes (N*C, H*W, 1).
@njit(**_JIT)
def means(x3, acc, out2):
    """``out2[a, k] = mean of x3[a, :, k]``, summed in float64 (``acc (K,)``) in index order
    and divided by ``L``."""
    na, length, nk = x3.shape
    for a in range(na):
        for k in range(nk):
            acc[k] = 0.0
        for j in range(length):
            for k in range(nk):
                acc[k] += x3[a, j, k]
        for k in range(nk):
            out2[a, k] = acc[k] / length


@njit(**_JIT)
def spread_means(dout2, dx3):
    """The adjoint of :func:`means`: ``dx3[a, j, k] = dout2[a, k] / L``."""
    na, length, nk = dx3.shape
    count = dx3.dtype.type(length)
    for a in range(na):
        for j in range(length):
            for k in range(nk):
                dx3[a, j, k] = dout2[a, k] / count


# ---- the ops ------------------------------------------------------------------------------------
def _check_operands(op: str, a, b, names: tuple[str, str]) -> None:
    """Refuse operands of an elementwise op that differ in shape or dtype, or are neither
    ``(N, C, H, W)`` nor ``(N, D)``."""
    if a.shape != b.shape or a.dtype != b.dtype:
        raise ValueError(f"{op}: {names[0]} and {names[1]} differ: {names[0]}.shape={a.shape} "
                         f"{a.dtype}, {names[1]}.shape={b.shape} {b.dtype}")
    if a.ndim not in (2, 4):
        raise ValueError(f"{op} expects (N, C, H, W) or (N, D) arrays; received "
                         f"{names[0]}.shape={a.shape}")


def _walk(last, *arrays):
    """The 4-D views the elementwise kernels walk: channels-last ``(N, H, W, C)`` views when
    ``last`` (the output's layout), ``(N, 1, 1, D)`` for ``(N, D)`` arrays, and ``(1, 1, 1,
    size)`` when every one is contiguous in that order (see "Layouts" above)."""
    if arrays[0].ndim == 2:
        views = [a[:, None, None, :] for a in arrays]
    elif last:
        views = [a.transpose(0, 2, 3, 1) for a in arrays]
    else:
        views = list(arrays)
    if all(v.flags.c_contiguous for v in views):
        return [v.reshape(1, 1, 1, -1) for v in views]
    return views


def _image_rows(a, last):
    """An ``(N, C, H, W)`` array as the ``(A, L, K)`` images of :func:`means`: channels-last
    ``(N, H*W, C)`` when ``last``, else planes ``(N*C, H*W, 1)``. Views of our buffers; a
    strided NCHW input is copied first."""
    n, c, h, w = a.shape
    if last:
        return a.transpose(0, 2, 3, 1).reshape(n, h * w, c)
    return np.ascontiguousarray(a).reshape(n * c, h * w, 1)


class NumbaResidualOps:
    """The ops of residual blocks and global average pooling on the kernels above (a mixin of
    ``NumbaBackend``, which supplies ``_launch`` and ``scratch``). Buffer names: ``out`` (the
    sum), ``dsum`` (its backward) and ``dx`` (the gradient sum) share the block's workspace
    scope, each with an ``_nhwc`` twin for channels-last outputs."""

    def _elementwise(self, kernel, out, operands, flags=()):
        """``kernel(*operands, *flags, out)`` on the views :func:`_walk` makes after ``out``'s
        layout; returns ``out``."""
        views = _walk(channels_last(out) is not None, *operands, out)
        self._launch(kernel, *views[:-1], *flags, views[-1])
        return out

    # ---- residual blocks -------------------------------------------------------------------
    def residual_add_forward(self, main, shortcut, relu, ws=None):
        _check_operands("residual_add_forward", main, shortcut, ("main", "shortcut"))
        out = self._elementwise(add, like(self, ws, "out", main), (main, shortcut),
                                (bool(relu),))
        return out, (out if relu else None)

    def residual_add_backward(self, dout, cache, ws=None):
        if cache is None:  # no ReLU: the sum hands its gradient to both operands as it is
            return dout
        _check_operands("residual_add_backward", cache, dout, ("out", "dout"))
        return self._elementwise(pass_positive, like(self, ws, "dsum", cache), (dout, cache))

    def residual_grad_sum(self, dx_main, dx_shortcut, ws=None):
        _check_operands("residual_grad_sum", dx_main, dx_shortcut, ("dx_main", "dx_shortcut"))
        return self._elementwise(add, like(self, ws, "dx", dx_main), (dx_main, dx_shortcut),
                                 (False,))

    def shortcut_pad_forward(self, x, stride, channels_before, channels_after, ws=None):
        if x.ndim != 4:
            raise ValueError(f"shortcut_pad_forward expects x (N, C, H, W); received "
                             f"x.shape={x.shape}")
        stride = check_int("shortcut_pad_forward", "stride", stride)
        before = check_int("shortcut_pad_forward", "channels_before", channels_before, low=0)
        after = check_int("shortcut_pad_forward", "channels_after", channels_after, low=0)
        n, c, h, w = x.shape
        shape = (n, before + c + after, (h - 1) // stride + 1, (w - 1) // stride + 1)
        xs = channels_last(x)
        if xs is not None:
            out_t = self.scratch(ws, "out_nhwc", (n, *shape[2:], shape[1]), x.dtype)
            self._launch(shortcut_pad_nhwc, xs, stride, before, out_t)
            out = out_t.transpose(0, 3, 1, 2)
        else:
            out = self.scratch(ws, "out", shape, x.dtype)
            self._launch(shortcut_pad_planes, x, stride, before, out)
        return out, (x.shape, stride, before, xs is not None)

    def shortcut_pad_backward(self, dout, cache, ws=None):
        (n, c, h, w), stride, before, last = cache
        if last:  # the forward's input was channels-last: so is dx
            dx_t = self.scratch(ws, "dx_nhwc", (n, h, w, c), dout.dtype)
            # dout's buffer when it is channels-last, else read through its strides
            self._launch(shortcut_unpad_nhwc, dout.transpose(0, 2, 3, 1), stride, before, dx_t)
            return dx_t.transpose(0, 3, 1, 2)
        dx = self.scratch(ws, "dx", (n, c, h, w), dout.dtype)
        self._launch(shortcut_unpad_planes, dout, stride, before, dx)
        return dx

    # ---- global average pooling -------------------------------------------------------------
    def globalavgpool2d_forward(self, x, ws=None):
        if x.ndim != 4:
            raise ValueError(f"globalavgpool2d_forward expects x (N, C, H, W); received "
                             f"x.shape={x.shape}")
        n, c = x.shape[:2]
        last = channels_last(x) is not None
        out = self.scratch(ws, "out", (n, c), x.dtype)
        rows = _image_rows(x, last)
        acc = self.scratch(ws, "sum", rows.shape[2:], np.float64)
        self._launch(means, rows, acc, out.reshape(rows.shape[0], rows.shape[2]))
        return out, (x.shape, last)

    def globalavgpool2d_backward(self, dout, cache, ws=None):
        (n, c, h, w), last = cache
        if last:
            dx = self.scratch(ws, "dx_nhwc", (n, h, w, c), dout.dtype).transpose(0, 3, 1, 2)
        else:
            dx = self.scratch(ws, "dx", (n, c, h, w), dout.dtype)
        rows = _image_rows(dx, last)
        self._launch(spread_means, np.ascontiguousarray(dout).reshape(rows.shape[0], -1), rows)
        return dx
