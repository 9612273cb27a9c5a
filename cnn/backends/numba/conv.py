"""The chunk loops of the Numba backend's BLAS conv paths, each one ``nogil`` call.

A conv op on the BLAS path walks the batch chunk by chunk (see ``NumbaBackend._blas_chunk``):
unroll the chunk's patches (:mod:`~cnn.backends.numba.kernels`), multiply them with NumPy's
own BLAS (:func:`~cnn.backends.numba.blas.gemm`), and, in a fused conv, pool the product
while it is in L2. Here those loops are compiled whole, so an op takes the GIL once, not once
per chunk and kernel (see :mod:`~cnn.backends.numba.blas` for why that matters to threads).
The Python side (``NumbaBackend._conv_*``) allocates every buffer from the workspace and
passes it in; nothing here allocates.

Two layouts, as in the backend: the *images* path (few input channels: per-image patches
``(C*KH*KW + 1, P)`` and per-image GEMMs ``[w | b] @ patches`` into NCHW planes) and the
*channels-last* path (patch rows ``(nb*P, KH*KW*C + 1)``, one GEMM per chunk into
channels-last rows). ``pool > 0`` fuses ReLU and max pooling (indices as in
:func:`~cnn.backends.numba.kernels.maxpool2x2_forward` and friends); ``pool == 0`` is the
plain conv. Buffers a variant does not use are passed as empty arrays.
"""
from __future__ import annotations

from numba import njit

from . import kernels as K
from .blas import gemm

_JIT = dict(nogil=True, cache=True, fastmath=False)


@njit(**_JIT)
def _pool_planes(planes, pool, stride, out, arg):
    """ReLU + max pooling of NCHW planes ``(M, H, W)`` into ``out``/``arg`` ``(M, Hp, Wp)``:
    the 2 x 2 kernel with one-byte in-window indices, else the general one (flat indices)."""
    if arg.itemsize == 1:
        K.maxpool2x2_forward(planes, True, out, arg)
    else:
        K.maxpool2d_forward(planes, pool, stride, True, out, arg)


@njit(**_JIT)
def _unpool_planes(dout, arg, dx):
    """Adjoint of :func:`_pool_planes`: ``dx (M, H, W)`` (overwritten) from ``dout (M, Hp,
    Wp)``."""
    if arg.itemsize == 1:
        K.maxpool2x2_backward(dout, arg, dx)
    else:
        K.maxpool2d_backward(dout, arg, dx.reshape(dx.shape[0], dx.shape[1] * dx.shape[2]))


@njit(**_JIT)
def images_forward(x, wb, kh, kw, stride, top, left, ho, wo, cols, out,
                   pool, pool_stride, chunk, planes, arg, pooled):
    """The images path, forward.

    ``x (N, C, H, W)``; ``wb (F, C*KH*KW + 1)`` the weights, bias last; ``cols (nb, C*KH*KW +
    1, Ho*Wo)`` one chunk's patches (``nb`` images per chunk). ``pool == 0``: ``out (N, F,
    Ho*Wo)`` gets the conv output. Else ``chunk (nb, F, Ho*Wo)`` holds a chunk's conv output,
    ``planes (nb, F, Hp, Wp)`` its pooled planes, which go channels-last into ``pooled (N, Hp,
    Wp, F)`` (the next conv's layout), and ``arg (N*F, Hp, Wp)`` gets the window indices."""
    n, nb, f = x.shape[0], cols.shape[0], wb.shape[0]
    for c0 in range(0, n, nb):
        c1 = min(c0 + nb, n)
        m = c1 - c0
        K.im2col_images(x[c0:c1], 0, m, kh, kw, stride, top, left, ho, wo, cols)
        for i in range(m):
            gemm(wb, cols[i], out[c0 + i] if pool == 0 else chunk[i], 0.0)
        if pool > 0:
            hp, wp = planes.shape[2], planes.shape[3]
            _pool_planes(chunk[:m].reshape(m * f, ho, wo), pool, pool_stride,
                         planes[:m].reshape(m * f, hp, wp), arg[c0 * f:c1 * f])
            K.nchw_to_nhwc_pad(planes[:m], 0, m, 0, 0, pooled[c0:c1])


@njit(**_JIT)
def images_backward(x, w2t, kh, kw, stride, top, left, ho, wo, cols, dout, pooled_dout,
                    arg, planes, dchunk, need_dx, dcols, dwbt, dx):
    """The images path, backward: ``dwbt (C*KH*KW + 1, F) = sum over images of patches[n] @
    dout[n]^T`` (the ones row gives the bias gradient; this orientation of the product, whose
    result is short and wide, runs faster in BLAS than ``dout[n] @ patches[n]^T``) and, with
    ``need_dx``, ``dx (N, C,
    H, W)`` = col2im of ``w2t @ dout[n]`` (``w2t (C*KH*KW, F)``, ``dcols (nb, C*KH*KW,
    Ho*Wo)``). The gradient of the conv output comes from ``dout (N, F, Ho*Wo)`` (plain conv:
    ``pooled_dout`` empty), or is unpooled chunk by chunk into ``dchunk (nb, F, Ho*Wo)`` from
    ``pooled_dout``: the pooled output's gradient channels-last ``(N, Hp, Wp, F)``, converted
    through ``planes (nb, F, Hp, Wp)``, or NCHW ``(N, F, Hp, Wp)`` when ``planes`` is empty;
    ``arg`` the forward's window indices."""
    n, nb, f = x.shape[0], cols.shape[0], dwbt.shape[1]
    pooled = pooled_dout.shape[0] > 0
    for c0 in range(0, n, nb):
        c1 = min(c0 + nb, n)
        m = c1 - c0
        K.im2col_images(x[c0:c1], 0, m, kh, kw, stride, top, left, ho, wo, cols)
        if pooled:
            hp, wp = arg.shape[1], arg.shape[2]
            if planes.shape[0] > 0:
                K.nhwc_to_nchw(pooled_dout[c0:c1], planes[:m])
                src = planes[:m].reshape(m * f, hp, wp)
            else:
                src = pooled_dout[c0:c1].reshape(m * f, hp, wp)
            _unpool_planes(src, arg[c0 * f:c1 * f], dchunk[:m].reshape(m * f, ho, wo))
        for i in range(m):
            dq = dchunk[i] if pooled else dout[c0 + i]
            gemm(cols[i], dq.T, dwbt, 0.0 if c0 + i == 0 else 1.0)
            if need_dx:
                gemm(w2t, dq, dcols[i], 0.0)
        if need_dx:
            K.col2im_images(dcols, c0, c1, kh, kw, stride, top, left, ho, wo, dx)


@njit(**_JIT)
def _patches_nhwc(x, xs, c0, c1, kh, kw, stride, top, left, ho, wo, xt, cols):
    """The patch rows of images ``c0:c1`` in ``cols[:(c1 - c0)*Ho*Wo]``: from the
    channels-last ``xs (N, H, W, C)`` when it is not empty, else from ``x (N, C, H, W)``,
    through the padded chunk buffer ``xt (nb, Hp, Wp, C)`` unless ``xs`` needs no padding
    (``xt`` empty)."""
    m = c1 - c0
    colq = cols[:m * ho * wo]
    if xs.shape[0] > 0 and xt.shape[0] == 0:
        K.im2col_nhwc(xs[c0:c1], kh, kw, stride, ho, wo, colq)
        return colq
    src = xt[:m]
    if xs.shape[0] > 0:
        K.nhwc_pad(xs, c0, c1, top, left, src)
    else:
        K.nchw_to_nhwc_pad(x, c0, c1, top, left, src)
    K.im2col_nhwc(src, kh, kw, stride, ho, wo, colq)
    return colq


@njit(**_JIT)
def nhwc_forward(x, xs, wtb, kh, kw, stride, top, left, ho, wo, xt, cols, out,
                 pool, pool_stride, chunk, arg, pooled):
    """The channels-last path, forward. Input as in :func:`_patches_nhwc` (``n`` images);
    ``wtb (KH*KW*C + 1, F)`` the weights, bias last; ``cols (nb*Ho*Wo, KH*KW*C + 1)``.
    ``pool == 0``: ``out (N*Ho*Wo, F)`` gets the conv output. Else ``chunk (nb*Ho*Wo, F)``
    holds a chunk's output, pooled into ``pooled (N, Hp, Wp, F)`` and ``arg`` (same shape)."""
    n = max(x.shape[0], xs.shape[0])
    f, p = wtb.shape[1], ho * wo
    nb = cols.shape[0] // p
    for c0 in range(0, n, nb):
        c1 = min(c0 + nb, n)
        m = c1 - c0
        colq = _patches_nhwc(x, xs, c0, c1, kh, kw, stride, top, left, ho, wo, xt, cols)
        if pool == 0:
            gemm(colq, wtb, out[c0 * p:c1 * p], 0.0)
        else:
            gemm(colq, wtb, chunk[:m * p], 0.0)
            K.maxpool_nhwc_forward(chunk[:m * p].reshape(m, ho, wo, f), pool, pool_stride,
                                   True, pooled[c0:c1], arg[c0:c1])


@njit(**_JIT)
def nhwc_backward(x, xs, kh, kw, stride, top, left, ho, wo, xt, cols, dout, pooled_dout, arg,
                  pool, pool_stride, dchunk, need_dx, wf, dcols, dxt, dwb, dx):
    """The channels-last path, backward: ``dwb (KH*KW*C + 1, F) = patches^T @ dout`` summed
    over the chunks (the ones column gives the bias gradient) and, with ``need_dx``, ``dx (N,
    H, W, C)`` = col2im of ``dout @ wf`` (``wf (F, KH*KW*C)``, ``dcols (nb*Ho*Wo,
    KH*KW*C)``; through the padded chunk buffer ``dxt`` when the forward padded, else ``dxt``
    is empty). The conv output's gradient: ``dout (N*Ho*Wo, F)`` (plain conv), or unpooled
    chunk by chunk into ``dchunk (nb*Ho*Wo, F)`` from ``pooled_dout (N, Hp, Wp, F)`` and the
    forward's ``arg``."""
    n = max(x.shape[0], xs.shape[0])
    f, p = dwb.shape[1], ho * wo
    nb = cols.shape[0] // p
    pooled = pooled_dout.shape[0] > 0
    for c0 in range(0, n, nb):
        c1 = min(c0 + nb, n)
        m = c1 - c0
        if pooled:
            dq = dchunk[:m * p]
            K.maxpool_nhwc_backward(pooled_dout[c0:c1], arg[c0:c1], pool, pool_stride,
                                    dq.reshape(m, ho, wo, f))
        else:
            dq = dout[c0 * p:c1 * p]
        colq = _patches_nhwc(x, xs, c0, c1, kh, kw, stride, top, left, ho, wo, xt, cols)
        gemm(colq.T, dq, dwb, 0.0 if c0 == 0 else 1.0)
        if need_dx:
            dcq = dcols[:m * p]
            gemm(dq, wf, dcq, 0.0)
            if dxt.shape[0] > 0:
                K.col2im_nhwc(dcq, kh, kw, stride, ho, wo, dxt[:m])
                K.nhwc_crop(dxt[:m], top, left, dx[c0:c1])
            else:
                K.col2im_nhwc(dcq, kh, kw, stride, ho, wo, dx[c0:c1])
