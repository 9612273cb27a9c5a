"""Numba CPU backends: ``numba`` (sequential ``nogil`` kernels) and ``numba_parallel``
(``parallel=True`` kernels, the intra-op alternative).

Both implement the contract of :mod:`cnn.backends.base` with the signatures of
:class:`~cnn.backends.numpy.backend.NumpyBackend`. Convolution, pooling and ReLU run Numba
kernels (:mod:`cnn.backends.numba.kernels`); on the BLAS path (layers with enough filters),
each conv op's whole chunk loop, GEMMs included, is one compiled ``nogil`` call
(:mod:`cnn.backends.numba.conv`, or :mod:`cnn.backends.numba.winograd` for the 3 x 3 layers
that run Winograd's algorithm, see "Convolution algorithms" below), whose GEMMs call NumPy's
own BLAS (:mod:`cnn.backends.numba.blas`): the op takes the GIL once, not once per chunk and
kernel.
The loss, the optimizer's ``axpby`` and each way of a dense layer are single ``nogil`` calls
(NumPy's arithmetic, bit for bit; the data-parallel threads would otherwise take turns at the
GIL for their many small ufunc calls); a dense layer's products are BLAS GEMMs called from
Numba (:mod:`cnn.backends.numba.dense`): the Numba GEMM of the small-filter kernels is slower
than BLAS on the dense shapes, whose few outputs (the classes, a hidden layer's units) are
too few for its vectorised inner loop. Memory ops and the other optimizer primitives are
inherited from NumPy.

Which backend for which training path
-------------------------------------
- Sequential runs and the data-parallel *threads* strategy use ``numba``: its kernels release
  the GIL, so N Python threads each running one op on their own shard use N cores, and no
  kernel starts threads of its own.
- ``numba_parallel`` splits each op across Numba's thread pool (``prange``). Use it with ONE
  calling Python thread. Calling it from the threads strategy would nest a thread pool inside
  every worker thread: oversubscription at best, and under the ``workqueue`` layer, which is
  not thread-safe, an abort ("Concurrent access has been detected"); this module therefore
  serialises its calls with a lock when the layer is ``workqueue``. Keep BLAS at one thread
  with it (``fit``'s default): its dense ops are BLAS, and OpenBLAS's spinning worker threads
  otherwise take the cores from Numba's pool after every dense op.

Layout: channels-last between BLAS-path layers
----------------------------------------------
Conv layers with many input channels (>= ``_NHWC_MIN_CHANNELS``) return their output as an
``(N, F, Ho, Wo)`` *view* of a channels-last ``(N, Ho, Wo, F)`` buffer (``buf.transpose(0, 3,
1, 2)``): a NumPy array of the contract's shape whose memory is channels-last, which is what
their GEMM writes. ReLU, max pooling, batch norm, a residual block's sum and shortcut and
global average pooling keep such inputs channels-last (their kernels run along the contiguous
channels), the next conv reads them as they are, and the backward passes hand ``dx`` back the
same way, so no NCHW <-> NHWC transpose runs between these layers. Every op accepts either
layout (:mod:`~cnn.backends.numba.layout` tells them apart; a channels-last ``dout`` meeting an
NCHW cache, or the reverse, is converted), and any other consumer sees an ordinary strided array
(a flatten layer's ``reshape`` copies it into NCHW order). The first conv layer (3 input
channels) keeps NCHW: its patch rows would be runs of 9 values.

Fused layers: conv -> ReLU -> max pooling as one op, and more
-------------------------------------------------------------
Both backends declare three fusions (``fusions``, see :mod:`cnn.backends.fusion`), so the
model's plan runs a Conv2D, ReLU, MaxPool2D run of layers as one op
(:meth:`NumbaBackend.conv2d_relu_maxpool2d_forward`) and a ReLU, MaxPool2D pair as another
(:meth:`NumbaBackend.maxpool2d_relu_forward`). Max and ReLU commute, so the ReLU acts on the
pooled values, inside the pooling kernel, and its mask rides in the pooling's window indices
(a window the ReLU cut gets an index no offset matches): the ReLU costs two passes less over
the largest activation each way. The conv version pools each chunk of its GEMM output while it
is still in L2, and its backward unpools each chunk's gradient just before that chunk's GEMMs:
the full-size conv output and its gradient, the largest buffers of a training step, are never
written, so the workspaces of two workers that share an L3 cache can both fit in it instead of
evicting each other's activations. The first layer's pooled output is handed over
channels-last too (see ``_Pooling``). A third fusion runs a BatchNorm, ReLU pair as the batch
norm's ops with the ReLU inside their passes (the ``batchnorm_relu_*`` ops of
:class:`~cnn.backends.numba.layer_ops.NumbaLayerOps`): the pattern after every convolution of a
residual network but the block's last.

Convolution algorithms
----------------------
``NumbaBackend(conv_algorithm=...)``, by default the value of the environment variable
``CNN_NUMBA_CONV_ALGORITHM`` (read when the backend is made, e.g. by the first
``get_backend("numba")`` of a process), else ``"auto"``:

- ``"direct"``: im2col and GEMM (the paths above) for every layer;
- ``"winograd"``: Winograd's minimal filtering F(m x m, 3 x 3) (:mod:`.winograd`) for every
  3 x 3, stride-1 conv, with the tile ``m`` of fewer multiplications (4, or 2 on outputs of
  one or two pixels across), and the direct algorithm for the others;
- ``"auto"``: Winograd where it pays: 3 x 3, stride-1 layers of the channels-last BLAS path
  (at least ``_NHWC_MIN_CHANNELS`` input channels and BLAS-sized filters) whose GEMMs do at
  most ``_WINOGRAD_MAX_MULTIPLICATIONS`` of the direct conv's multiplications, counting the
  tiles that hang over the output's edge. The first layer of an RGB network stays direct:
  with 3 channels its transforms cost as much as its GEMMs, whose dot products are 3 long.

The choice is made per layer at each call, from the layer's shape
(:meth:`NumbaBackend.winograd_tile`), so models, plans and workspaces need no setting of
their own. Winograd's path hands over and takes the same layouts as the direct channels-last
path, and fuses the ReLU and pooling the same way. It computes the same convolution with
other roundings: in float32 its errors, against the float64 result, are larger than the
direct algorithm's (F(4x4, 3x3) multiplies by up to 8 in its transforms), which
``tests/test_winograd.py`` bounds and ``python -m cnn.bench.conv_algorithms`` prints per layer
of a network; in float64 they stay far below the 1e-12 the equivalence tests hold every path
to, so float64 runs Winograd too. ``numba_parallel`` runs the direct algorithm.

Threading layer
---------------
Importing this module sets ``numba.config.THREADING_LAYER`` (unless the user chose one with
``NUMBA_THREADING_LAYER``, or a parallel kernel already ran): ``"threadsafe"``, i.e. TBB if it
loads and otherwise OpenMP, when either is available; ``"workqueue"`` otherwise. Where TBB is
missing (no ``libtbb.so.12``) and GNU OpenMP (``libgomp.so.1``) is there, the layer is
**omp**: thread-safe, which makes concurrent calls from several Python threads legal, but GNU
OpenMP is not fork-safe: do not ``fork`` (e.g. ``multiprocessing`` with the fork start method)
after a ``numba_parallel`` op has run. MPI ranks are separate processes started by
``mpiexec`` and are unaffected.
:attr:`NumbaParallelBackend.threading_layer` reports the layer actually in use
(``numba.threading_layer()``) once a parallel kernel has run; ``warmup`` runs one.

Compilation
-----------
Kernels are compiled lazily, once per dtype (float32, float64), and cached on disk
(``cache=True``, in ``cnn/backends/numba/__pycache__``). A fresh clone (CI, a new machine)
compiles on first use, seconds per backend and dtype, where loading from the cache takes a
fraction of that; :meth:`NumbaBackend.warmup` compiles every kernel for one dtype on tiny
inputs and returns the seconds spent, so the training loop can record JIT time in its own
column. The parallel kernels hold nothing but their ``prange`` loop, the backend allocating
their outputs: in a ``parallel=True`` function every array expression becomes a parfor of its
own, and compile time grows with each.
"""
from __future__ import annotations

import contextlib
import functools
import importlib
import os
import threading
import time

import numba
import numpy as np
from numba.np.ufunc import parallel as _numba_parallel

from ...checks import check_choice
from ..base import Padding
from ..fusion import BATCHNORM_RELU, CONV_RELU_MAXPOOL, RELU_MAXPOOL
from ..numpy import NumpyBackend
from . import conv as C
from . import dense as D
from . import kernels as K
from . import winograd as WG
from .layer_ops import NumbaLayerOps
from .layout import nhwc as _nhwc
from .residual import NumbaResidualOps

#: target number of GEMM columns (images x output pixels) per im2col chunk of the fused Numba
#: kernels (small layers): long enough for the vectorised inner loop, small enough for the
#: chunk's patches to stay in cache (the conv times change little around it; it was the best
#: of a sweep on the reference layers)
_CHUNK_COLUMNS = 512
#: bytes of patch rows plus GEMM result per chunk on the BLAS path (see ``_blas_chunk``), for
#: layers with few input channels (short runs per patch row) ...
_CHUNK_BYTES = 1 << 20
#: ... and for layers with at least this many
_NHWC_MIN_CHANNELS = 16
_NHWC_CHUNK_BYTES = 1 << 20
#: conv layers with at least this many filters and patch rows use BLAS for their GEMMs
_BLAS_MIN_FILTERS = 16
_BLAS_MIN_ROWS = 16
#: the conv algorithms ``NumbaBackend(conv_algorithm=...)`` takes (see "Convolution
#: algorithms" above), and the environment variable that sets the default
CONV_ALGORITHMS = ("auto", "direct", "winograd")
CONV_ALGORITHM_ENV = "CNN_NUMBA_CONV_ALGORITHM"
#: bytes of split input, transformed patches and products, and conv output per chunk of the
#: Winograd path (see ``_winograd_chunk``): twice the L2 of one core, as its phases touch
#: parts of it at a time and longer GEMMs run faster (the best of a sweep on CIFAR's layers)
_WINOGRAD_CHUNK_BYTES = 2 << 20
#: ``auto`` runs Winograd on a layer when its GEMMs do at most this fraction of the direct
#: conv's multiplications (:func:`~cnn.backends.numba.winograd.multiplications`): the
#: transforms cost passes over the data that must be paid for
_WINOGRAD_MAX_MULTIPLICATIONS = 0.75


def _select_threading_layer() -> str:
    """Set Numba's threading layer (see the module docstring); returns the setting."""
    if _numba_parallel._is_initialized:  # a parallel kernel ran already: the layer is fixed
        return numba.threading_layer()
    if numba.config.THREADING_LAYER != "default":  # the user's explicit choice wins
        return numba.config.THREADING_LAYER
    for pool in ("tbbpool", "omppool"):
        try:
            importlib.import_module(f"numba.np.ufunc.{pool}")
        except ImportError:  # the extension is built but its runtime library is missing
            continue
        numba.config.THREADING_LAYER = "threadsafe"
        return "threadsafe"
    numba.config.THREADING_LAYER = "workqueue"
    return "workqueue"


_LAYER_SETTING = _select_threading_layer()


def _conv_geometry(x, w, b, stride: int, padding: Padding):
    """Validate a conv call; returns ``(Ho, Wo)``."""
    if x.ndim != 4 or w.ndim != 4:
        raise ValueError(f"conv2d expects x (N, C, H, W) and w (F, C, KH, KW); "
                         f"received x.shape={x.shape}, w.shape={w.shape}")
    if x.shape[1] != w.shape[1]:
        raise ValueError(f"input channels differ: x.shape={x.shape}, w.shape={w.shape}")
    if not x.dtype == w.dtype == b.dtype:
        raise ValueError(f"dtypes differ: x {x.dtype}, w {w.dtype}, b {b.dtype}")
    if b.shape != w.shape[:1]:
        raise ValueError(f"conv2d expects b (F,); received b.shape={b.shape}, w.shape={w.shape}")
    if int(stride) != stride or stride < 1:
        raise ValueError(f"stride must be a positive int; received stride={stride!r}")
    (top, bottom), (left, right) = padding
    if min(top, bottom, left, right) < 0:
        raise ValueError(f"padding must be non-negative; received padding={padding!r}")
    ho = (x.shape[2] + top + bottom - w.shape[2]) // stride + 1
    wo = (x.shape[3] + left + right - w.shape[3]) // stride + 1
    if ho < 1 or wo < 1:
        raise ValueError(f"kernel {w.shape[2:]} larger than padded input {x.shape[2:]} "
                         f"with padding={padding!r}")
    return ho, wo


def _check_pool(pool: int, stride: int, shape) -> None:
    """Refuse a pooling that does not fit an ``(N, C, H, W)`` input of ``shape``."""
    if pool < 1 or stride < 1 or pool > min(shape[2], shape[3]):
        raise ValueError(f"need 1 <= pool <= min(H, W) and stride >= 1; received "
                         f"pool={pool}, stride={stride}, x.shape={tuple(shape)}")


def _window_index_dtype(pool: int, stride: int, channels_last: bool):
    """The dtype of pooling's window indices. Channels-last kernels keep the index within the
    window (``pool*pool``: cut by a fused ReLU), one byte up to 15 x 15 windows. On NCHW
    planes the 2 x 2, stride-2 kernels keep it in one byte too; the others keep a flat
    in-plane index. :meth:`NumbaBackend._unpool_planes` tells the two apart by it."""
    if channels_last:
        return np.uint8 if pool * pool < 256 else np.int32
    return np.uint8 if pool == stride == 2 else np.int32


def _scope(ws, name: str):
    """The sub-scope ``name`` of a workspace scope (None without a workspace)."""
    return None if ws is None else ws.scope(name)


class _Pooling:
    """The max pooling (with ReLU) that a fused conv applies to each chunk of its output
    (:mod:`~cnn.backends.numba.conv`): the pooled output and the window indices for the whole
    batch. ``spec``: ``(pool, stride)``; ``conv_shape``: the conv output ``(N, F, Ho, Wo)``;
    ``channels_last``: the conv path's layout. Indices as in
    :meth:`NumbaBackend.maxpool2d_relu_forward`.

    The pooled output is channels-last on both paths. The NCHW path serves the first layer
    (few input channels); its output, with as many channels as the layer has filters (at
    least ``_BLAS_MIN_FILTERS``), is the input of a channels-last conv, which would convert an
    NCHW input chunk by chunk in its forward and again in its backward. Each chunk is pooled
    into a chunk-sized NCHW buffer and converted from there (a fraction of the conv output,
    still in L2), so each value is converted once per step instead of twice. The window
    indices, and the backward's unpooling, stay NCHW on that path."""

    def __init__(self, backend, ws, spec, conv_shape, dtype, channels_last: bool):
        self.pool, self.stride = (int(v) for v in spec)
        self.conv_shape = conv_shape
        n, f, ho, wo = conv_shape
        hp, wp = (ho - self.pool) // self.stride + 1, (wo - self.pool) // self.stride + 1
        self.out = backend.scratch(ws, "pool_out", (n, hp, wp, f), dtype)
        self.arg = backend.scratch(ws, "pool_arg", (n, hp, wp, f) if channels_last
                                   else (n * f, hp, wp),
                                   _window_index_dtype(self.pool, self.stride, channels_last))

    def output(self):
        """The pooled output as an ``(N, F, Hp, Wp)`` view of its channels-last buffer."""
        return self.out.transpose(0, 3, 1, 2)

    @staticmethod
    def grads(dout):
        """``(array, channels_last)``: the gradient of the pooled output, ``(N, F, Hp, Wp)``,
        as the kernels take it: its channels-last buffer (from a channels-last conv), else
        NCHW, C-contiguous."""
        ds = None if dout.flags.c_contiguous else _nhwc(dout)
        return (np.ascontiguousarray(dout), False) if ds is None else (ds, True)


def _dense_kernel_dtypes(*arrays) -> bool:
    """Whether the dense kernels take ``arrays``: one float dtype for all (BLAS multiplies
    float32 or float64 operands of one type; anything else takes NumPy's dense op)."""
    return arrays[0].dtype in (np.float32, np.float64) and all(
        a.dtype == arrays[0].dtype for a in arrays)


@functools.lru_cache(maxsize=None)
def _none(dtype, ndim: int):
    """An empty array standing for a buffer a :mod:`.conv` variant does not use (one per
    dtype and rank, made once: nothing is allocated per step)."""
    return np.empty((0,) * ndim, dtype)


class NumbaBackend(NumbaLayerOps, NumbaResidualOps, NumpyBackend):
    """Sequential Numba kernels (``nogil``): one core per op, safe to call from many threads.
    Outputs are allocated here and filled by the kernels (see "Compilation" above). The ops of
    dropout and batch norm come from :class:`~cnn.backends.numba.layer_ops.NumbaLayerOps`,
    those of residual blocks and global average pooling from
    :class:`~cnn.backends.numba.residual.NumbaResidualOps`; those of sigmoid, tanh, binary
    cross-entropy, the weight penalties and the optimizer primitives other than ``axpby`` are
    NumPy's."""

    name = "numba"
    fusions = (CONV_RELU_MAXPOOL, RELU_MAXPOOL, BATCHNORM_RELU)

    conv2d_forward_kernel = staticmethod(K.conv2d_forward)
    conv2d_backward_kernel = staticmethod(K.conv2d_backward)
    maxpool2d_forward_kernel = staticmethod(K.maxpool2d_forward)
    maxpool2d_backward_kernel = staticmethod(K.maxpool2d_backward)
    maxpool2x2_forward_kernel = staticmethod(K.maxpool2x2_forward)
    maxpool2x2_backward_kernel = staticmethod(K.maxpool2x2_backward)
    relu_forward_kernel = staticmethod(K.relu_forward)
    relu_backward_kernel = staticmethod(K.relu_backward)

    def __init__(self, conv_algorithm: str | None = None):
        if conv_algorithm is None:
            conv_algorithm = os.environ.get(CONV_ALGORITHM_ENV) or "auto"
            owner = f"{type(self).__name__} (from ${CONV_ALGORITHM_ENV})"
        else:
            owner = type(self).__name__
        #: ``"auto"``, ``"direct"`` or ``"winograd"``: see "Convolution algorithms" above
        self.conv_algorithm = check_choice(owner, "conv_algorithm", conv_algorithm,
                                           CONV_ALGORITHMS)

    def _launch(self, kernel, *args):
        kernel(*args)

    def _chunk_images(self, n: int, pixels: int) -> int:
        """Images per im2col chunk for ``n`` images of ``pixels`` output pixels each."""
        return max(1, min(n, -(-_CHUNK_COLUMNS // pixels)))

    def _weight_grad_parts(self, chunks: int) -> int:
        """Number of separate ``[dw^T; db]`` accumulators for ``chunks`` conv chunks."""
        return 1

    # ---- JIT ------------------------------------------------------------------------------
    def warmup(self, dtype=np.float32) -> float:
        """Compile (or load from the disk cache) every kernel for ``dtype`` by running each op
        forward and backward on tiny inputs. Returns the wall-clock seconds spent."""
        t0 = time.perf_counter()
        rng = np.random.default_rng(0)
        x = rng.standard_normal((2, 2, 5, 5)).astype(dtype)
        w = rng.standard_normal((3, 2, 3, 3)).astype(dtype)
        out, cache = self.conv2d_forward(x, w, np.zeros(3, dtype), 1, ((1, 1), (1, 1)))
        self.conv2d_backward(out, cache)
        # the BLAS path: NCHW data in (padded and not), then channels-last between layers
        w16 = rng.standard_normal((_BLAS_MIN_FILTERS, 2, 3, 3)).astype(dtype)
        b16 = np.zeros(_BLAS_MIN_FILTERS, dtype)
        w1616 = rng.standard_normal((_BLAS_MIN_FILTERS,) * 2 + (3, 3)).astype(dtype)
        for pad in ((0, 0), (1, 1)):
            h, cache16 = self.conv2d_forward(x, w16, b16, 1, (pad, pad))
            h, cr = self.relu_forward(h)
            hp, cp = self.maxpool2d_forward(h, 2, 2)
            hp2, cp2 = self.maxpool2d_forward(h, 2, 1)
            h2, cache2 = self.conv2d_forward(h, w1616, b16, 1, (pad, pad))
            dh, _, _ = self.conv2d_backward(h2, cache2)
            self.maxpool2d_backward(hp2, cp2)
            self.relu_backward(self.maxpool2d_backward(hp, cp), cr)
            self.conv2d_backward(self.relu_backward(dh, cr), cache16, need_dx=pad == (1, 1))
        out, cache = self.relu_forward(out)
        self.relu_backward(out, cache)
        out, cache = self.maxpool2d_forward(out, 2, 2)
        self.maxpool2d_backward(out, cache)
        h, cache = self.dense_forward(x.reshape(2, -1), rng.standard_normal((50, 3)).astype(dtype),
                                      np.zeros(3, dtype))
        for need_dx in (True, False):
            self.dense_backward(h, cache, need_dx=need_dx)
        return time.perf_counter() - t0

    # ---- convolution -----------------------------------------------------------------------
    def _use_blas(self, f: int, k: int) -> bool:
        """Whether a conv layer with ``f`` filters over ``k = C*KH*KW`` patch rows multiplies
        with BLAS (im2col/col2im in Numba, the GEMMs in BLAS, chunk by chunk) or with the
        fused Numba kernels (tiny layers, whose GEMMs are too small for BLAS to pay)."""
        return f >= _BLAS_MIN_FILTERS and k >= _BLAS_MIN_ROWS

    def _blas_chunk(self, n: int, pixels: int, k: int, f: int, itemsize: int,
                    budget: int | None = None) -> int:
        """Images per chunk of the BLAS path: the chunk's patch rows ``(nb*P, k)`` and GEMM
        result ``(nb*P, f)`` fill about ``budget`` bytes (default ``_CHUNK_BYTES``), so that
        the GEMM reads the patches im2col has just written from the 1 MiB L2 of a Zen 4 or
        Skylake-SP core."""
        per_image = (k + f) * pixels * itemsize
        return max(1, min(n, (_CHUNK_BYTES if budget is None else budget) // per_image))

    def conv2d_forward(self, x, w, b, stride, padding, ws=None):
        w, b = np.ascontiguousarray(w), np.ascontiguousarray(b)
        ho, wo = _conv_geometry(x, w, b, stride, padding)
        n = x.shape[0]
        f, _, kh, kw = w.shape
        k = w[0].size
        p = ho * wo
        (top, _), (left, _) = padding
        stride, top, left = int(stride), int(top), int(left)
        tile = self.winograd_tile(x.shape[1], f, kh, kw, stride, ho, wo)
        if tile:
            return self._conv_forward_winograd(x, w, b, padding, ho, wo, tile, ws)
        if not self._use_blas(f, k):
            x = np.ascontiguousarray(x)
            out = self.scratch(ws, "out", (n, f, p), x.dtype)
            # Python ints throughout, so every call hits the same compiled specialisation
            self._launch(self.conv2d_forward_kernel, x, w.reshape(f, -1), b, kh, kw, stride,
                         top, left, ho, wo, 0, n, self._chunk_images(n, p), out)
            return out.reshape(n, f, ho, wo), (x, w, stride, padding)
        if x.shape[1] >= _NHWC_MIN_CHANNELS:
            return self._conv_forward_nhwc(x, w, b, stride, padding, ho, wo, ws)
        return self._conv_forward_images(x, w, b, stride, padding, ho, wo, ws)

    def _conv_forward_images(self, x, w, b, stride, padding, ho, wo, ws, pool=None):
        """Few input channels (the first layer): per-image patches (C*KH*KW + 1, P), the last
        row ones, in a chunk-sized buffer that stays in L2 (the backward unrolls them again,
        as the channels-last path does); the weights get the bias as their last column, so
        each image's GEMM writes its (F, P) output in place, bias included. The output stays
        NCHW: channels-last patch rows would be runs of KW*C values (9 for RGB images and a
        3 x 3 kernel), too short for im2col to copy fast, and the (P, F) GEMM with them was
        slower than these. ``pool``: see :meth:`conv2d_relu_maxpool2d_forward`. The chunk loop is
        :func:`~cnn.backends.numba.conv.images_forward`."""
        n = x.shape[0]
        f, _, kh, kw = w.shape
        k, p = w[0].size, ho * wo
        (top, _), (left, _) = padding
        x = np.ascontiguousarray(x)
        dt = x.dtype
        nb = self._blas_chunk(n, p, k, f, x.itemsize)
        cols = self.scratch(ws, "cols", (nb, k + 1, p), dt)
        wb = self.scratch(ws, "w_bias", (f, k + 1), dt)
        wb[:, :k] = w.reshape(f, k)
        wb[:, k] = b
        cache = (x, w, stride, padding, cols, nb)
        if pool is None:
            out = self.scratch(ws, "out", (n, f, p), dt)
            C.images_forward(x, wb, kh, kw, stride, int(top), int(left), ho, wo, cols, out, 0,
                             0, _none(dt, 3), _none(dt, 4), _none(np.uint8, 3), _none(dt, 4))
            return out.reshape(n, f, ho, wo), cache
        # the chunk's conv output only, pooled into the layer's output while in L2
        pooled = _Pooling(self, ws, pool, (n, f, ho, wo), dt, channels_last=False)
        chunk = self.scratch(ws, "out_chunk", (nb, f, p), dt)
        _, hp, wp, _ = pooled.out.shape
        planes = self.scratch(ws, "pool_chunk", (nb, f, hp, wp), dt)
        C.images_forward(x, wb, kh, kw, stride, int(top), int(left), ho, wo, cols,
                         _none(dt, 3), pooled.pool, pooled.stride, chunk, planes, pooled.arg,
                         pooled.out)
        return pooled.output(), (cache, pooled)

    def conv2d_backward(self, dout, cache, need_dx=True, ws=None):
        if cache[-1] == "nhwc":
            return self._conv_backward_nhwc(dout, cache, need_dx, ws)
        if cache[-1] == "winograd":
            return self._conv_backward_winograd(dout, cache, need_dx, ws)
        x, w, stride, padding = cache[:4]
        n, f, ho, wo = dout.shape
        k = w[0].size
        p = ho * wo
        dt = x.dtype
        (top, _), (left, _) = padding
        dout3 = self._nchw(dout, ws).reshape(n, f, p)
        dx = self.scratch(ws, "dx", (n if need_dx else 0,) + x.shape[1:], dt)
        if len(cache) == 6:
            return self._conv_backward_images(x, w, stride, padding, cache[4], dout3, None,
                                              need_dx, dx, ws, ho, wo)
        nb = self._chunk_images(n, p)
        parts = self.scratch(ws, "parts", (self._weight_grad_parts(-(-n // nb)), k + 1, f), dt)
        parts.fill(0)
        self._launch(self.conv2d_backward_kernel, x, np.ascontiguousarray(w.reshape(f, k).T),
                     dout3, w.shape[2], w.shape[3], stride, int(top), int(left), ho, wo, 0,
                     n, nb, parts, dx)
        dwt = parts.sum(axis=0) if parts.shape[0] > 1 else parts[0]
        dw = self.scratch(ws, "dw", (f, k), dt)
        np.copyto(dw, dwt[:k].T)
        db = self.scratch(ws, "db", (f,), dt)
        np.copyto(db, dwt[k])
        return (dx if need_dx else None), dw.reshape(w.shape), db

    def _nchw(self, a, ws):
        """``a`` as a C-contiguous ``(N, C, H, W)`` array: itself, or a channels-last view
        converted by a Numba kernel (NumPy's strided copy is the slower of the two)."""
        if a.flags.c_contiguous:
            return a
        src = _nhwc(a)
        if src is None:
            return np.ascontiguousarray(a)
        out = self.scratch(ws, "dout_nchw", a.shape, a.dtype)
        K.nhwc_to_nchw(src, out)
        return out

    def _conv_backward_images(self, x, w, stride, padding, cols, dout3, pooled, need_dx, dx,
                              ws, ho, wo):
        """Gradients of the per-image BLAS path (few input channels): ``[dw | db]^T +=
        cols[n] @ dout[n]^T`` image by image (the patches unrolled again into the chunk
        buffer ``cols``; the ones row gives ``db``); ``dx`` = col2im of ``w^T @ dout``. The conv
        output's gradient is ``dout3 (N, F, P)``, or, after a fused pooling (``pooled``, the
        forward's :class:`_Pooling`; ``dout3`` is then the pooled output's gradient), unpooled
        chunk by chunk. The chunk loop is :func:`~cnn.backends.numba.conv.images_backward`."""
        n, f, p = x.shape[0], w.shape[0], ho * wo
        k = w[0].size
        dt = x.dtype
        nb = cols.shape[0]
        (top, _), (left, _) = padding
        dwbt = self.scratch(ws, "dw_db_t", (k + 1, f), dt)
        dcols = self.scratch(ws, "dcols", (nb, k, p), dt) if need_dx else _none(dt, 3)
        w2t = np.ascontiguousarray(w.reshape(f, k).T)
        if pooled is None:
            args = (dout3, _none(dt, 4), _none(np.uint8, 3), _none(dt, 4), _none(dt, 3))
        else:
            ds, channels_last = _Pooling.grads(dout3)
            _, hp, wp = pooled.arg.shape
            # a channels-last gradient is converted chunk by chunk, in a chunk-sized buffer
            planes = (self.scratch(ws, "pool_dout_chunk", (nb, f, hp, wp), dt)
                      if channels_last else _none(dt, 4))
            args = (_none(dt, 3), ds, pooled.arg, planes,
                    self.scratch(ws, "pool_dchunk", (nb, f, p), dt))
        C.images_backward(x, w2t, w.shape[2], w.shape[3], stride, int(top), int(left), ho, wo,
                          cols, *args, bool(need_dx), dcols, dwbt, dx)
        dw = self.scratch(ws, "dw", (f, k), dt)
        np.copyto(dw, dwbt[:k].T)
        db = self.scratch(ws, "db", (f,), dt)
        np.copyto(db, dwbt[k])
        return (dx if need_dx else None), dw.reshape(w.shape), db

    def _conv_forward_nhwc(self, x, w, b, stride, padding, ho, wo, ws, pool=None):
        """The BLAS path, channels-last: chunk by chunk, the (padded) channels-last images are
        unrolled into patch rows ``(nb*P, KH*KW*C + 1)`` (the last column ones) and one GEMM
        ``patches @ [w; b] (KH*KW*C + 1, F)`` writes the chunk's output, bias included, into
        its rows of the channels-last output ``(N*P, F)``. ``x`` is a channels-last view (the
        output of a previous layer) or an ordinary NCHW array (the data), converted chunk by
        chunk. Returns the output as an ``(N, F, Ho, Wo)`` view of its channels-last buffer.

        The patches live in one chunk-sized buffer that stays in L2, and the backward unrolls
        them again: keeping all of them for the backward means reading the whole batch's
        patches back from memory, which slows the weight-gradient GEMM by more than the
        im2col it saves.
        ``pool``: see :meth:`conv2d_relu_maxpool2d_forward`. The chunk loop is
        :func:`~cnn.backends.numba.conv.nhwc_forward`."""
        n, c, h, wd = x.shape
        f, _, kh, kw = w.shape
        p, kc, dt = ho * wo, kh * kw * c, x.dtype
        nb = self._blas_chunk(n, p, kc, f, dt.itemsize,
                              _NHWC_CHUNK_BYTES if c >= _NHWC_MIN_CHANNELS else _CHUNK_BYTES)
        wtb = self.scratch(ws, "w_hwcf_b", (kc + 1, f), dt)  # (KH, KW, C, F) flattened; bias
        np.copyto(wtb[:kc].reshape(kh, kw, c, f), w.transpose(2, 3, 1, 0))
        wtb[kc] = b
        cols = self.scratch(ws, "cols_nhwc", (nb * p, kc + 1), dt)
        xs = _nhwc(x)
        if xs is None:
            x = np.ascontiguousarray(x)
        cache = (x, xs, w, stride, padding, nb, "nhwc")
        inputs = self._nhwc_inputs(cache, ws)
        (top, _), (left, _) = padding
        geometry = (kh, kw, stride, int(top), int(left), ho, wo)
        if pool is None:
            out_t = self.scratch(ws, "out_nhwc", (n, ho, wo, f), dt)
            C.nhwc_forward(*inputs[:2], wtb, *geometry, inputs[2], cols,
                           out_t.reshape(n * p, f), 0, 0, _none(dt, 2), _none(np.uint8, 4),
                           _none(dt, 4))
            return out_t.transpose(0, 3, 1, 2), cache
        # the chunk's conv output only, pooled into the layer's output while in L2
        pooled = _Pooling(self, ws, pool, (n, f, ho, wo), dt, channels_last=True)
        chunk = self.scratch(ws, "out_chunk_nhwc", (nb * p, f), dt)
        C.nhwc_forward(*inputs[:2], wtb, *geometry, inputs[2], cols, _none(dt, 2), pooled.pool,
                       pooled.stride, chunk, pooled.arg, pooled.out)
        return pooled.output(), (cache, pooled)

    def _nhwc_inputs(self, cache, ws):
        """``(x, xs, xt)`` for :mod:`~cnn.backends.numba.conv`'s channels-last path: the NCHW
        input or the channels-last one (the other empty), and the padded chunk buffer
        (empty when the channels-last input needs no padding: it is unrolled in place)."""
        x, xs, w, stride, padding, nb, _ = cache
        (top, bottom), (left, right) = padding
        n, c, h, wd = x.shape
        if xs is not None and not (top or bottom or left or right):
            return _none(x.dtype, 4), xs, _none(x.dtype, 4)
        xt = self.scratch(ws, "x_nhwc", (nb, h + top + bottom, wd + left + right, c), x.dtype)
        if xs is not None:
            return _none(x.dtype, 4), xs, xt
        return x, _none(x.dtype, 4), xt

    def _conv_backward_nhwc(self, dout, cache, need_dx, ws, pooled=None):
        """Gradients of :meth:`_conv_forward_nhwc`, chunk by chunk from the channels-last
        ``dout`` rows ``(nb*P, F)`` (converted first if ``dout`` is an ordinary NCHW array) and
        the chunk's patch rows, unrolled again: ``[dw; db]^T += patches^T @ dout`` (the ones
        column gives ``db``), and ``dx`` = col2im of ``dout @ w (F, KH*KW*C)`` into a
        channels-last buffer, returned as an ``(N, C, H, W)`` view. ``pooled``: the forward
        pooled its output (see :meth:`conv2d_relu_maxpool2d_forward`), ``dout`` is the
        gradient of the pooled output, unpooled chunk by chunk. The chunk loop is
        :func:`~cnn.backends.numba.conv.nhwc_backward`."""
        x, _, w, stride, padding, nb, _ = cache
        n, f, ho, wo = dout.shape if pooled is None else pooled.conv_shape
        _, c, h, wd = x.shape
        kh, kw = w.shape[2], w.shape[3]
        (top, bottom), (left, right) = padding
        padded = top or bottom or left or right
        p, kc, dt = ho * wo, kh * kw * c, x.dtype
        if pooled is None:
            ds = self._channels_last(dout, ws, "dout_nhwc")
            grads = (ds.reshape(n * p, f), _none(dt, 4), _none(np.uint8, 4), 0, 0,
                     _none(dt, 2))
        else:
            ds = self._channels_last(dout, ws, "pool_dout_nhwc")
            grads = (_none(dt, 2), ds, pooled.arg, pooled.pool, pooled.stride,
                     self.scratch(ws, "pool_dchunk_nhwc", (nb * p, f), dt))
        cols = self.scratch(ws, "cols_nhwc", (nb * p, kc + 1), dt)
        # (KH*KW*C + 1, F): patches^T @ dout was as fast as dout^T @ patches on the CIFAR
        # layers with many input channels, and faster on the first one
        dwb = self.scratch(ws, "dw_db_t", (kc + 1, f), dt)
        dx_t = dxt = _none(dt, 4)
        wf = dcols = _none(dt, 2)
        if need_dx:
            wf = self.scratch(ws, "w_fhwc", (f, kc), dt)
            np.copyto(wf.reshape(f, kh, kw, c), w.transpose(0, 2, 3, 1))
            dcols = self.scratch(ws, "dcols_nhwc", (nb * p, kc), dt)
            dx_t = self.scratch(ws, "dx_nhwc", (n, h, wd, c), dt)
            if padded:
                dxt = self.scratch(ws, "dx_pad", (nb, h + top + bottom, wd + left + right, c), dt)
        inputs = self._nhwc_inputs(cache, ws)
        C.nhwc_backward(*inputs[:2], kh, kw, stride, int(top), int(left), ho, wo, inputs[2],
                        cols, *grads, bool(need_dx), wf, dcols, dxt, dwb, dx_t)
        dw = self.scratch(ws, "dw", (f, c, kh, kw), dt)
        np.copyto(dw, dwb[:kc].reshape(kh, kw, c, f).transpose(3, 2, 0, 1))
        db = self.scratch(ws, "db", (f,), dt)
        np.copyto(db, dwb[kc])
        return (dx_t.transpose(0, 3, 1, 2) if need_dx else None), dw, db

    def _channels_last(self, a, ws, name: str):
        """The channels-last buffer ``(N, H, W, C)`` of ``a (N, C, H, W)``: its own when ``a``
        is a channels-last view, else a copy in the workspace buffer ``name``."""
        s = _nhwc(a)
        if s is None:
            s = self.scratch(ws, name, (a.shape[0], a.shape[2], a.shape[3], a.shape[1]),
                             a.dtype)
            np.copyto(s, a.transpose(0, 2, 3, 1))
        return s

    # ---- Winograd ---------------------------------------------------------------------------
    def winograd_tile(self, c: int, f: int, kh: int, kw: int, stride: int, ho: int,
                      wo: int) -> int:
        """The output tile ``m`` of F(m x m, 3 x 3) that a conv layer with ``c`` input
        channels, ``f`` filters of ``kh x kw``, ``stride`` and an ``ho x wo`` output runs
        with under :attr:`conv_algorithm`, or 0 for the direct algorithm (see "Convolution
        algorithms" above)."""
        if self.conv_algorithm == "direct" or (kh, kw) != (3, 3) or stride != 1:
            return 0
        tile = min(WG.TILES, key=lambda m: WG.multiplications(ho, wo, m))
        if self.conv_algorithm == "winograd":
            return tile
        # auto: the channels-last BLAS path's layers, where the GEMMs save enough
        if c < _NHWC_MIN_CHANNELS or not self._use_blas(f, c * kh * kw):
            return 0
        return tile if WG.multiplications(ho, wo, tile) <= _WINOGRAD_MAX_MULTIPLICATIONS else 0

    def _winograd_chunk(self, n: int, split: int, tiles: int, pixels: int, c: int, f: int,
                        a: int, itemsize: int) -> int:
        """Images per chunk of the Winograd path: the chunk's phase-split input (``split``
        pixels), transformed patches and products (``a*a`` elements of ``tiles`` tiles) and
        conv output (``pixels``) fill about ``_WINOGRAD_CHUNK_BYTES``."""
        per_image = (split * c + a * a * tiles * (c + f) + pixels * f) * itemsize
        return max(1, min(n, _WINOGRAD_CHUNK_BYTES // per_image))

    def _winograd_buffers(self, ws, n, c, f, ho, wo, m, dt):
        """``(nb, (xq, ycol, v, mm, z, yq))``: images per chunk and the chunk buffers of
        :func:`~cnn.backends.numba.winograd.forward` and ``backward``."""
        a = m + 2
        th, tw = WG.tile_grid(ho, wo, m)
        hp = th * m + 2
        nb = self._winograd_chunk(n, hp * a * tw, th * tw, ho * wo, c, f, a,
                                  np.dtype(dt).itemsize)
        return nb, (self.scratch(ws, "wino_x", (nb, hp, a, tw, c), dt),
                    # the transform of a chunk's columns, and in the backward a tile row's
                    self.scratch(ws, "wino_cols", (a * (hp + a), tw * c), dt),
                    self.scratch(ws, "wino_v", (a * a, nb * th * tw, c), dt),
                    self.scratch(ws, "wino_m", (a * a, nb * th * tw, f), dt),
                    self.scratch(ws, "wino_rows", (a, m, tw * f), dt),
                    self.scratch(ws, "wino_tiles", (m, m, tw * f), dt))

    def _conv_forward_winograd(self, x, w, b, padding, ho, wo, m, ws, pool=None):
        """A 3 x 3, stride-1 conv by Winograd's F(m x m, 3 x 3) (:mod:`~cnn.backends.numba.
        winograd`), channels-last: ``x`` a channels-last view or an NCHW array (converted
        chunk by chunk), the output an ``(N, F, Ho, Wo)`` view of its channels-last buffer
        like the direct channels-last path's. The transformed filters ``U (a*a, F, C)`` stay
        in the cache for the input gradient. ``pool``: see
        :meth:`conv2d_relu_maxpool2d_forward`. The chunk loop is
        :func:`~cnn.backends.numba.winograd.forward`."""
        n, c = x.shape[:2]
        f, dt = w.shape[0], x.dtype
        u = self.scratch(ws, "wino_u", ((m + 2) ** 2, f, c), dt)
        WG.filter_transform(w, WG.transform_matrices(m)[1], u,
                            self.scratch(ws, "wino_filter", WG.filter_scratch_shape(m),
                                         np.float64))
        xs = _nhwc(x)
        if xs is None:
            x = np.ascontiguousarray(x)
        nb, bufs = self._winograd_buffers(ws, n, c, f, ho, wo, m, dt)
        (top, _), (left, _) = padding
        inputs = (_none(dt, 4), xs) if xs is not None else (x, _none(dt, 4))
        cache = (x, xs, w, padding, m, u, "winograd")
        if pool is None:
            out_t = self.scratch(ws, "out_nhwc", (n, ho, wo, f), dt)
            WG.forward(*inputs, u, b, int(top), int(left), *bufs, out_t, 0, 0,
                       _none(dt, 4), _none(np.uint8, 4), _none(dt, 4))
            return out_t.transpose(0, 3, 1, 2), cache
        pooled = _Pooling(self, ws, pool, (n, f, ho, wo), dt, channels_last=True)
        chunk = self.scratch(ws, "wino_out_chunk", (nb, ho, wo, f), dt)
        WG.forward(*inputs, u, b, int(top), int(left), *bufs, _none(dt, 4),
                   pooled.pool, pooled.stride, chunk, pooled.arg, pooled.out)
        return pooled.output(), (cache, pooled)

    def _conv_backward_winograd(self, dout, cache, need_dx, ws, pooled=None):
        """Gradients of :meth:`_conv_forward_winograd` in the same tiles: ``dw`` and ``db``,
        and ``dx`` as an ``(N, C, H, W)`` view of a channels-last buffer. ``pooled``: the
        forward pooled its output, ``dout`` is the pooled output's gradient (unpooled chunk
        by chunk). The chunk loop is :func:`~cnn.backends.numba.winograd.backward`."""
        x, xs, w, padding, m, u, _ = cache
        n, c, h, wd = x.shape
        f, dt = w.shape[0], x.dtype
        _, _, ho, wo = dout.shape if pooled is None else pooled.conv_shape
        nb, bufs = self._winograd_buffers(ws, n, c, f, ho, wo, m, dt)
        if pooled is None:
            grads = (self._channels_last(dout, ws, "dout_nhwc"), _none(dt, 4),
                     _none(np.uint8, 4), 0, 0, _none(dt, 4))
        else:
            grads = (_none(dt, 4), self._channels_last(dout, ws, "pool_dout_nhwc"),
                     pooled.arg, pooled.pool, pooled.stride,
                     self.scratch(ws, "wino_dchunk", (nb, ho, wo, f), dt))
        dx_t = self.scratch(ws, "dx_nhwc", (n, h, wd, c), dt) if need_dx else _none(dt, 4)
        du = self.scratch(ws, "wino_du", u.shape, dt)
        db64 = self.scratch(ws, "db_float64", (f,), np.float64)
        (top, _), (left, _) = padding
        inputs = (_none(dt, 4), xs) if xs is not None else (x, _none(dt, 4))
        WG.backward(*inputs, u, int(top), int(left), *bufs, *grads, bool(need_dx),
                    du, db64, dx_t)
        dw = self.scratch(ws, "dw", w.shape, dt)
        WG.filter_transform_adjoint(du, WG.transform_matrices(m)[1], dw,
                                    self.scratch(ws, "wino_filter",
                                                 WG.filter_scratch_shape(m), np.float64))
        db = self.scratch(ws, "db", (f,), dt)
        np.copyto(db, db64)
        return (dx_t.transpose(0, 3, 1, 2) if need_dx else None), dw, db

    # ---- conv -> ReLU -> max pooling, fused -------------------------------------------------
    def conv2d_relu_maxpool2d_forward(self, x, w, b, stride, padding, pool, pool_stride,
                                      ws=None):
        """On the BLAS paths, each chunk's conv output is pooled (with the ReLU, as in
        :meth:`maxpool2d_relu_forward`) while it is still in L2: the layer's full-size conv
        output is never written, nor, in the backward, the full-size gradient that pooling
        scatters into (the largest buffers of a training step, and what two cores sharing one
        L3 cache would fight over). The small-filter kernels run the conv, then the pooling."""
        w, b = np.ascontiguousarray(w), np.ascontiguousarray(b)
        ho, wo = _conv_geometry(x, w, b, stride, padding)
        _check_pool(pool, pool_stride, (x.shape[0], w.shape[0], ho, wo))
        spec = (int(pool), int(pool_stride))
        f, c, kh, kw = w.shape
        tile = self.winograd_tile(c, f, kh, kw, int(stride), ho, wo)
        if tile:
            return self._conv_forward_winograd(x, w, b, padding, ho, wo, tile, ws, spec)
        if not self._use_blas(w.shape[0], w[0].size):
            h, conv_cache = self.conv2d_forward(x, w, b, stride, padding, ws=ws)
            out, pool_cache = self.maxpool2d_relu_forward(h, pool, pool_stride,
                                                          ws=_scope(ws, "pool"))
            return out, ("conv, then pooling", conv_cache, pool_cache)
        if x.shape[1] >= _NHWC_MIN_CHANNELS:
            return self._conv_forward_nhwc(x, w, b, int(stride), padding, ho, wo, ws, spec)
        return self._conv_forward_images(x, w, b, int(stride), padding, ho, wo, ws, spec)

    def conv2d_relu_maxpool2d_backward(self, dout, cache, need_dx=True, ws=None):
        if cache[0] == "conv, then pooling":
            dh = self.maxpool2d_relu_backward(dout, cache[2], ws=_scope(ws, "pool"))
            return self.conv2d_backward(dh, cache[1], need_dx=need_dx, ws=ws)
        conv_cache, pooled = cache
        if conv_cache[-1] == "nhwc":
            return self._conv_backward_nhwc(dout, conv_cache, need_dx, ws, pooled)
        if conv_cache[-1] == "winograd":
            return self._conv_backward_winograd(dout, conv_cache, need_dx, ws, pooled)
        x, w, stride, padding, cols, nb = conv_cache
        dx = self.scratch(ws, "dx", (x.shape[0] if need_dx else 0,) + x.shape[1:], x.dtype)
        _, _, ho, wo = pooled.conv_shape
        return self._conv_backward_images(x, w, stride, padding, cols, dout, pooled, need_dx,
                                          dx, ws, ho, wo)

    # ---- pooling ---------------------------------------------------------------------------
    def maxpool2d_forward(self, x, pool, stride, ws=None):
        return self._maxpool(x, pool, stride, False, ws)

    def maxpool2d_relu_forward(self, x, pool, stride, ws=None):
        return self._maxpool(x, pool, stride, True, ws)

    def _maxpool(self, x, pool, stride, relu, ws):
        """Max pooling, followed by a ReLU when ``relu`` (in the pooling kernel: the ReLU then
        reads and writes a ``pool*pool``-th of the values, and its backward is the pooling's
        own, whose window indices mark the windows the ReLU cut)."""
        n, c, h, w = x.shape
        _check_pool(pool, stride, x.shape)
        ho, wo = (h - pool) // stride + 1, (w - pool) // stride + 1
        xs = _nhwc(x)
        if xs is not None and not x.flags.c_contiguous:  # channels-last: stays so
            out_t = self.scratch(ws, "out_nhwc", (n, ho, wo, c), x.dtype)
            # the index within the window (pool*pool: cut by the ReLU); one byte covers
            # windows up to 15 x 15
            arg = self.scratch(ws, "argmax_nhwc", (n, ho, wo, c),
                               _window_index_dtype(pool, stride, True))
            self._launch_nhwc(K.maxpool_nhwc_forward, xs, int(pool), int(stride), relu, out_t,
                              arg)
            return out_t.transpose(0, 3, 1, 2), (x.shape, arg, int(pool), int(stride))
        x = np.ascontiguousarray(x)
        out = self.scratch(ws, "out", (n * c, ho, wo), x.dtype)
        arg = self.scratch(ws, "argmax", (n * c, ho, wo), _window_index_dtype(pool, stride, False))
        self._pool_planes(x.reshape(n * c, h, w), pool, stride, relu, out, arg)
        return out.reshape(n, c, ho, wo), (x.shape, arg)

    def _pool_planes(self, planes, pool, stride, relu, out, arg):
        """Max pooling (and a fused ReLU) of the planes ``(M, H, W)`` into ``out (M, Ho, Wo)``,
        the window indices (of :func:`_window_index_dtype`) into ``arg``."""
        if pool == stride == 2:  # the common case: the index within the window, one byte
            self._launch(self.maxpool2x2_forward_kernel, planes, relu, out, arg)
        else:
            self._launch(self.maxpool2d_forward_kernel, planes, int(pool), int(stride), relu,
                         out, arg)

    def _unpool_planes(self, dout3, arg, dx3):
        """``dx3 (M, H, W)`` (overwritten) from ``dout3 (M, Ho, Wo)`` and the indices of
        :meth:`_pool_planes`: one byte for the 2 x 2 kernels, else flat in-plane indices."""
        if arg.dtype == np.uint8:
            self._launch(self.maxpool2x2_backward_kernel, dout3, arg, dx3)
        else:
            self._launch(self.maxpool2d_backward_kernel, dout3, arg,
                         dx3.reshape(dx3.shape[0], -1))

    def maxpool2d_backward(self, dout, cache, ws=None):
        if len(cache) == 4:  # channels-last
            x_shape, arg, pool, stride = cache
            n, c, h, w = x_shape
            ds = _nhwc(dout)
            if ds is None:
                ds = self.scratch(ws, "dout_nhwc", arg.shape, dout.dtype)
                np.copyto(ds, dout.transpose(0, 2, 3, 1))
            dx_t = self.scratch(ws, "dx_nhwc", (n, h, w, c), dout.dtype)
            self._launch_nhwc(K.maxpool_nhwc_backward, ds, arg, pool, stride, dx_t)
            return dx_t.transpose(0, 3, 1, 2)
        x_shape, arg = cache
        dx = self.scratch(ws, "dx", (arg.shape[0],) + tuple(x_shape[2:]), dout.dtype)
        self._unpool_planes(self._nchw(dout, ws).reshape(arg.shape), arg, dx)
        return dx.reshape(x_shape)

    # the window indices of a fused forward carry the ReLU's mask
    maxpool2d_relu_backward = maxpool2d_backward

    # ---- dense: one nogil call each way (:mod:`~cnn.backends.numba.dense`) -------------------
    def dense_forward(self, x, w, b, ws=None):
        if not _dense_kernel_dtypes(x, w, b):
            return super().dense_forward(x, w, b, ws=ws)
        x = np.ascontiguousarray(x)
        out = self.scratch(ws, "out", (x.shape[0], w.shape[1]), x.dtype)
        D.dense_forward(x, np.ascontiguousarray(w), b, out)
        return out, (x, w)

    def dense_backward(self, dout, cache, need_dx=True, ws=None):
        x, w = cache
        if not _dense_kernel_dtypes(dout, x, w):
            return super().dense_backward(dout, cache, need_dx=need_dx, ws=ws)
        dt = dout.dtype
        dw = self.scratch(ws, "dw", w.shape, dt)
        db = self.scratch(ws, "db", (dout.shape[1],), dt)
        dx = self.scratch(ws, "dx", x.shape, dt) if need_dx else _none(dt, 2)
        D.dense_backward(np.ascontiguousarray(dout), x, np.ascontiguousarray(w), bool(need_dx),
                         dw, db, dx)
        return (dx if need_dx else None), dw, db

    # ---- loss and optimizer primitives: one nogil pass each (NumPy's arithmetic) -----------
    def softmax_cross_entropy(self, logits, labels, ws=None):
        logits, labels = np.ascontiguousarray(logits), np.asarray(labels)
        out = self.scratch(ws, "dlogits", logits.shape, logits.dtype)
        loss, correct = K.softmax_cross_entropy(logits, labels, out)
        if correct < 0:
            k = logits.shape[1]
            bad = labels[(labels < 0) | (labels >= k)]
            raise ValueError(f"labels must be class indices in [0, {k}). Received {int(bad[0])}")
        return np.asarray(loss, dtype=logits.dtype), out, np.asarray(correct)

    def axpby(self, y, a, x, b):
        if (float(b) == 0.0 or x.shape != y.shape or x.dtype != y.dtype
                or not (x.flags.c_contiguous and y.flags.c_contiguous)):
            return super().axpby(y, a, x, b)  # y = a * y alone, or strided operands
        dt = y.dtype.type  # NumPy 2 computes a float32 array times a Python float in float32
        K.axpby(y.reshape(-1), dt(a), x.reshape(-1), dt(b))

    # ---- activations -----------------------------------------------------------------------
    def relu_forward(self, x, ws=None):
        xs = _nhwc(x)
        if xs is not None and not x.flags.c_contiguous:  # channels-last: stays so
            out_t = self.scratch(ws, "out_nhwc", xs.shape, x.dtype)
            self._launch(self.relu_forward_kernel, xs.reshape(-1), out_t.reshape(-1))
            out = out_t.transpose(0, 3, 1, 2)
            return out, out
        x = np.ascontiguousarray(x)
        out = self.scratch(ws, "out", x.shape, x.dtype)
        self._launch(self.relu_forward_kernel, x.reshape(-1), out.reshape(-1))
        return out, out

    def relu_backward(self, dout, cache, ws=None):
        cs = _nhwc(cache)
        if cs is not None and not cache.flags.c_contiguous:  # the forward ran channels-last
            ds = _nhwc(dout)
            if ds is None:  # e.g. from a flatten layer's backward: NCHW
                ds = self.scratch(ws, "dout_nhwc", cs.shape, dout.dtype)
                np.copyto(ds, dout.transpose(0, 2, 3, 1))
            dx_t = self.scratch(ws, "dx_nhwc", cs.shape, dout.dtype)
            self._launch(self.relu_backward_kernel, ds.reshape(-1), cs.reshape(-1),
                         dx_t.reshape(-1))
            return dx_t.transpose(0, 3, 1, 2)
        dout = self._nchw(dout, ws)
        cache = np.ascontiguousarray(cache)
        dx = self.scratch(ws, "dx", dout.shape, dout.dtype)
        self._launch(self.relu_backward_kernel, dout.reshape(-1), cache.reshape(-1),
                     dx.reshape(-1))
        return dx

    def _launch_nhwc(self, kernel, *args):
        """The channels-last kernels have no ``parallel=True`` twin: the BLAS path (the only
        producer of channels-last arrays) is the sequential backend's."""
        kernel(*args)


class NumbaParallelBackend(NumbaBackend):
    """``parallel=True`` kernels: each op uses Numba's whole thread pool. One caller thread
    only (see the module docstring); under ``workqueue`` concurrent calls are serialised."""

    name = "numba_parallel"

    conv2d_forward_kernel = staticmethod(K.conv2d_forward_par)
    conv2d_backward_kernel = staticmethod(K.conv2d_backward_par)
    maxpool2d_forward_kernel = staticmethod(K.maxpool2d_forward_par)
    maxpool2d_backward_kernel = staticmethod(K.maxpool2d_backward_par)
    maxpool2x2_forward_kernel = staticmethod(K.maxpool2x2_forward_par)
    maxpool2x2_backward_kernel = staticmethod(K.maxpool2x2_backward_par)
    relu_forward_kernel = staticmethod(K.relu_forward_par)
    relu_backward_kernel = staticmethod(K.relu_backward_par)

    def __init__(self):
        # the Winograd path's chunk loop is sequential BLAS, like the direct BLAS path, which
        # this backend does not use either (see ``_use_blas``)
        super().__init__(conv_algorithm="direct")
        self._guard = (threading.Lock() if _LAYER_SETTING == "workqueue"
                       else contextlib.nullcontext())

    @property
    def threading_layer(self) -> str:
        """The layer in use once a parallel kernel has run, else the configured setting."""
        return numba.threading_layer() if _numba_parallel._is_initialized else _LAYER_SETTING

    def _launch(self, kernel, *args):
        with self._guard:
            kernel(*args)

    def _use_blas(self, f, k):
        # the prange kernels split the chunks (im2col and GEMM together) among Numba's threads
        return False

    def _chunk_images(self, n, pixels):
        # at least one chunk per thread, so that every thread gets work
        per_thread = -(-n // numba.get_num_threads())
        return min(super()._chunk_images(n, pixels), per_thread)

    def _weight_grad_parts(self, chunks):
        # one accumulator per chunk: parallel chunks never add into the same memory
        return chunks
