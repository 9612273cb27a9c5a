"""The Numba kernels of the ops residual networks add (issue 20), and batch norm on the
channels-last arrays the numba backend hands between conv layers, fused or not with the ReLU
after it.

Every op, forward and backward, in float32 and float64 on odd shapes, against references
written here with plain NumPy slicing and float64 sums (or the naive backend's loops, for batch
norm); each array input in both of the numba backend's layouts, NCHW and a channels-last view
(``channels_last``), and in mixed layouts for the two-operand ops. Outputs must keep the
input's dtype and the layout of their first input. Then the BatchNorm, ReLU fusion: the same
loss, gradients and running statistics as the layers run one by one, bit for bit, sequential
and ``sync`` over threads; and a residual block's chain of ops, whose arrays stay channels-last
from one conv to the next.
"""
from __future__ import annotations

import numpy as np
import pytest

from cnn.backends import get_backend
from cnn.backends.fusion import BATCHNORM_RELU, BatchNormRelu
from cnn.backends.numba import NumbaBackend
from cnn.context import StepContext, Workspace
from cnn.model import build_model
from cnn.plan import FusedOp

NAIVE = get_backend("naive")
BACKENDS = ["numba", "numba_parallel"]
DTYPES = [pytest.param(np.float64, 1e-12, id="float64"),
          pytest.param(np.float32, 1e-5, id="float32")]
LAYOUTS = ["nchw", "channels-last"]


def channels_last(a):
    """``a (N, C, H, W)`` as an (N, C, H, W) view of a channels-last buffer."""
    return np.ascontiguousarray(a.transpose(0, 2, 3, 1)).transpose(0, 3, 1, 2)


def laid_out(a, layout):
    return channels_last(a) if layout == "channels-last" else np.ascontiguousarray(a)


def is_channels_last(a):
    return not a.flags.c_contiguous and a.transpose(0, 2, 3, 1).flags.c_contiguous


def assert_close(got, want, dtype, tol):
    """Shape and dtype, then values relative to the reference's magnitude."""
    assert got.shape == want.shape, (got.shape, want.shape)
    assert got.dtype == dtype, got.dtype
    np.testing.assert_allclose(got, want, rtol=tol, atol=tol * max(1.0, np.abs(want).max()))


def normal(rng, shape, dtype):
    return rng.standard_normal(shape).astype(dtype)


# ---- the block's sum ---------------------------------------------------------------------------
SHAPES = [pytest.param((3, 5, 7, 6), id="4d-odd"), pytest.param((2, 17, 3, 5), id="4d-17ch"),
          pytest.param((5, 11), id="2d")]


def operands(shape, dtype, seed):
    """Two operands whose sum is exactly zero at some entries (the ReLU's kink)."""
    rng = np.random.default_rng(seed)
    a, b = normal(rng, shape, dtype), normal(rng, shape, dtype)
    b.reshape(-1)[::7] = -a.reshape(-1)[::7]
    return a, b


def layouts_of(shape):
    return [(la, lb) for la in LAYOUTS for lb in LAYOUTS] if len(shape) == 4 else [("nchw",) * 2]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype, tol", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("relu", [True, False], ids=["relu", "linear"])
def test_residual_add(backend, dtype, tol, shape, relu):
    """``max(main + shortcut, 0)`` (or the plain sum) and its backward ``dout * (sum > 0)``
    (``dout`` itself without the ReLU), each operand and ``dout`` in either layout."""
    be = get_backend(backend)
    a, b = operands(shape, dtype, 1)
    total = a.astype(np.float64) + b
    assert (total == 0).any()
    want = np.maximum(total, 0) if relu else total
    dout = normal(np.random.default_rng(2), shape, dtype)
    want_d = np.where(total > 0, dout, 0) if relu else dout
    for la, lb in layouts_of(shape):
        main = laid_out(a, la) if len(shape) == 4 else a
        out, cache = be.residual_add_forward(main, laid_out(b, lb) if len(shape) == 4 else b,
                                             relu)
        assert_close(out, want, dtype, tol)
        if len(shape) == 4:
            assert is_channels_last(out) == (la == "channels-last"), (la, lb)
        for ld in layouts_of(shape)[0:: 2 if len(shape) == 4 else 1]:
            d = laid_out(dout, ld[0]) if len(shape) == 4 else dout
            got = be.residual_add_backward(d, cache)
            assert_close(got, want_d, dtype, tol)
            if not relu:
                assert got is d  # the sum passes its gradient on as it is


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype, tol", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_residual_grad_sum(backend, dtype, tol, shape):
    be = get_backend(backend)
    a, b = operands(shape, dtype, 3)
    for la, lb in layouts_of(shape):
        args = (laid_out(a, la), laid_out(b, lb)) if len(shape) == 4 else (a, b)
        dx = be.residual_grad_sum(*args)
        assert_close(dx, a.astype(np.float64) + b, dtype, tol)
        if len(shape) == 4:
            assert is_channels_last(dx) == (la == "channels-last")


def test_residual_ops_refuse_mismatched_operands():
    be = get_backend("numba")
    a = np.zeros((2, 3, 4, 4))
    with pytest.raises(ValueError, match=r"shortcut.shape=\(2, 4, 4, 4\)"):
        be.residual_add_forward(a, np.zeros((2, 4, 4, 4)), True)
    with pytest.raises(ValueError, match="float32"):
        be.residual_grad_sum(a, a.astype(np.float32))
    with pytest.raises(ValueError, match=r"main.shape=\(3, 4, 4\)"):
        be.residual_add_forward(a[0], a[0], False)


# ---- option A's shortcut -----------------------------------------------------------------------
PAD_CASES = [  # (N, C, H, W), stride, channels before, channels after
    pytest.param((2, 3, 7, 5), 2, 2, 1, id="s2-odd-asymmetric"),
    pytest.param((3, 16, 8, 8), 2, 8, 8, id="s2-resnet"),
    pytest.param((2, 4, 6, 7), 1, 0, 3, id="s1-after-only"),
    pytest.param((1, 5, 7, 7), 3, 4, 0, id="s3-before-only"),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype, tol", DTYPES)
@pytest.mark.parametrize("shape, stride, before, after", PAD_CASES)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_shortcut_pad(backend, dtype, tol, shape, stride, before, after, layout):
    """Forward: ``F.pad(x[:, :, ::s, ::s], (0, 0, 0, 0, before, after))``; backward: the
    channels ``before:before + C`` of ``dout`` at the kept pixels, zero at the skipped ones
    (overwriting whatever the workspace buffer held); ``dout`` in either layout."""
    be = get_backend(backend)
    rng = np.random.default_rng(sum(shape) + stride)
    x = normal(rng, shape, dtype)
    n, c, h, w = shape
    want = np.zeros((n, before + c + after, -(-h // stride), -(-w // stride)), dtype)
    want[:, before:before + c] = x[:, :, ::stride, ::stride]
    dout = normal(rng, want.shape, dtype)
    want_dx = np.zeros(shape, dtype)
    want_dx[:, :, ::stride, ::stride] = dout[:, before:before + c]
    ws = Workspace(be)
    for step in range(2):  # the second time, into buffers that hold the first step's values
        out, cache = be.shortcut_pad_forward(laid_out(x, layout), stride, before, after, ws=ws)
        assert_close(out, want, dtype, tol)
        assert is_channels_last(out) == (layout == "channels-last")
        for ld in LAYOUTS:
            dx = be.shortcut_pad_backward(laid_out(dout, ld), cache, ws=ws)
            assert_close(dx, want_dx, dtype, tol)
            assert is_channels_last(dx) == (layout == "channels-last")
        x, dout = x[::-1].copy(), dout[::-1].copy()
        want, want_dx = want[::-1].copy(), want_dx[::-1].copy()


def test_shortcut_pad_refuses_bad_arguments():
    be = get_backend("numba")
    x = np.zeros((1, 2, 4, 4))
    with pytest.raises(ValueError, match="stride=0"):
        be.shortcut_pad_forward(x, 0, 1, 1)
    with pytest.raises(ValueError, match="channels_after=-1"):
        be.shortcut_pad_forward(x, 2, 1, -1)
    with pytest.raises(ValueError, match=r"x.shape=\(2, 4, 4\)"):
        be.shortcut_pad_forward(x[0], 2, 1, 1)


# ---- global average pooling --------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype, tol", DTYPES)
@pytest.mark.parametrize("shape", [(3, 5, 7, 6), (2, 17, 8, 8), (4, 3, 1, 1)],
                         ids=["odd", "17ch", "1x1"])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_globalavgpool2d(backend, dtype, tol, shape, layout):
    """The mean of each channel's image (a float64 sum over the pixels divided by H*W), and
    the backward ``dout / (H*W)`` spread over the image, in the input's layout."""
    be = get_backend(backend)
    rng = np.random.default_rng(sum(shape))
    x = (normal(rng, shape, dtype) + 3).astype(dtype)  # a mean far from 0: relative error
    n, c, h, w = shape
    want = x.astype(np.float64).reshape(n, c, h * w).sum(axis=2) / (h * w)
    dout = normal(rng, (n, c), dtype)
    want_dx = np.repeat(dout.astype(np.float64) / (h * w), h * w).reshape(shape)
    out, cache = be.globalavgpool2d_forward(laid_out(x, layout))
    assert_close(out, want, dtype, tol)
    dx = be.globalavgpool2d_backward(dout, cache)
    assert_close(dx, want_dx, dtype, tol)
    assert is_channels_last(dx) == is_channels_last(laid_out(x, layout))


# ---- batch norm on channels-last arrays, and fused with the ReLU --------------------------------
def bn_inputs(shape, dtype, seed):
    rng = np.random.default_rng(seed)
    c = shape[1]
    x = (rng.standard_normal(shape) * 3 + 2).astype(dtype)
    return (x, normal(rng, shape, dtype), normal(rng, c, dtype), normal(rng, c, dtype),
            rng.standard_normal(c).astype(dtype), rng.uniform(0.5, 2, c).astype(dtype))


def naive_bn(x, dout, gamma, beta, rmean, rvar, relu):
    """The naive backend's batch norm (then its ReLU, chained) in training and inference:
    ``[sums, sq, out, dbeta, dgamma, dx, inference out, inference dx]``."""
    inv = 1.0 / (x.size // x.shape[1])
    sums = NAIVE.batchnorm_sums(x)
    sq = NAIVE.batchnorm_sq_dev_sums(x, sums, inv)
    results = [sums, sq]
    for train in (True, False):
        if train:
            y, cache = NAIVE.batchnorm_train_forward(x, sums, sq, inv, gamma, beta, 1e-3)
        else:
            y, cache = NAIVE.batchnorm_infer_forward(x, rmean, rvar, gamma, beta, 1e-3)
        d = dout
        if relu:
            y, relu_cache = NAIVE.relu_forward(y)
            d = NAIVE.relu_backward(dout, relu_cache)
        s1, s2 = NAIVE.batchnorm_backward_sums(d, cache)
        dx = NAIVE.batchnorm_backward_dx(d, cache, s1, s2, inv if train else 0.0)
        results += [y, s1, s2, dx] if train else [y, dx]
    return results


def backend_bn(be, x, dout, gamma, beta, rmean, rvar, relu, ws=None):
    """The same list from ``be``'s ops (the ``batchnorm_relu_*`` ones when ``relu``); with a
    workspace, copies (the inference pass reuses the training pass's buffers)."""
    fused = "batchnorm_relu_" if relu else "batchnorm_"
    keep = (lambda a: a) if ws is None else np.copy
    inv = 1.0 / (x.size // x.shape[1])
    sums = be.batchnorm_sums(x, ws=ws)
    sq = be.batchnorm_sq_dev_sums(x, sums, inv, ws=ws)
    y, cache = getattr(be, fused + "train_forward")(x, sums, sq, inv, gamma, beta, 1e-3, ws=ws)
    s1, s2 = getattr(be, fused + "backward_sums")(dout, cache, ws=ws)
    dx = getattr(be, fused + "backward_dx")(dout, cache, s1, s2, inv, ws=ws)
    results = [keep(a) for a in (sums, sq, y, s1, s2, dx)]
    y, cache = getattr(be, fused + "infer_forward")(x, rmean, rvar, gamma, beta, 1e-3, ws=ws)
    dx = getattr(be, fused + "backward_dx")(dout, cache, s1, s2, 0.0, ws=ws)
    return results + [y, dx]


BN_NAMES = ["sums", "sq", "out", "dbeta", "dgamma", "dx", "inference out", "inference dx"]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype, tol", DTYPES)
@pytest.mark.parametrize("shape", [(4, 17, 5, 6), (3, 5, 3, 7), (2, 16, 8, 8)],
                         ids=["17ch-rows-of-2", "5ch-rows-of-1", "16ch-rows-of-8"])
@pytest.mark.parametrize("relu", [False, True], ids=["bn", "bn-relu"])
@pytest.mark.parametrize("dout_layout", LAYOUTS)
def test_batchnorm_on_channels_last_inputs(backend, dtype, tol, shape, relu, dout_layout):
    """Every batch-norm op on a channels-last ``x`` (``dout`` in either layout), alone or
    fused with the ReLU, against the naive loops; outputs and ``dx`` stay channels-last, and
    the values are those of the NCHW kernels, bit for bit (the same sums in the same order)."""
    be = get_backend(backend)
    x, dout, gamma, beta, rmean, rvar = bn_inputs(shape, dtype, 5)
    want = naive_bn(x, dout, gamma, beta, rmean, rvar, relu)
    got = backend_bn(be, channels_last(x), laid_out(dout, dout_layout), gamma, beta, rmean,
                     rvar, relu)
    for name, g, w in zip(BN_NAMES, got, want):
        assert_close(g, w, dtype, tol)
        assert g.ndim == 1 or is_channels_last(g), name
    nchw = backend_bn(be, x, dout, gamma, beta, rmean, rvar, relu)
    for name, g, w in zip(BN_NAMES, got, nchw):
        np.testing.assert_array_equal(g, w, err_msg=name)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype, tol", DTYPES)
@pytest.mark.parametrize("shape", [(4, 3, 5, 6), (7, 5)], ids=["4d", "dense"])
def test_batchnorm_relu_ops_on_nchw_inputs(backend, dtype, tol, shape):
    """The fused ops on NCHW arrays and after a dense layer, against the naive batch norm then
    ReLU; with a workspace, twice (the buffers of the second step hold the first's values)."""
    be = get_backend(backend)
    x, dout, gamma, beta, rmean, rvar = bn_inputs(shape, dtype, 6)
    want = naive_bn(x, dout, gamma, beta, rmean, rvar, True)
    assert (want[2] == 0).any() and (want[2] > 0).any()  # the ReLU cut some values
    ws = Workspace(be)
    for _ in range(2):
        got = backend_bn(be, x, dout, gamma, beta, rmean, rvar, True, ws=ws)
        for name, g, w in zip(BN_NAMES, got, want):
            assert_close(g, w, dtype, tol)


# ---- the BatchNorm, ReLU fusion in a model -------------------------------------------------------
SPEC = {"input_shape": [3, 8, 8], "layers": [
    {"type": "conv2d", "filters": 16, "kernel_size": 3, "padding": "same"},
    {"type": "batchnorm", "momentum": 0.8}, {"type": "relu"},
    {"type": "conv2d", "filters": 16, "kernel_size": 3, "padding": "same"},  # channels-last
    {"type": "batchnorm", "momentum": 0.8}, {"type": "relu"},
    {"type": "maxpool2d", "pool_size": 2}, {"type": "flatten"},
    {"type": "dense", "units": 6}, {"type": "batchnorm"}, {"type": "relu"},
    {"type": "dense", "units": 3}]}


def fit(backend, **kw):
    model = build_model(SPEC, dtype=np.float64, seed=2, backend=backend)
    rng = np.random.default_rng(3)
    x, y = rng.standard_normal((24, 3, 8, 8)), rng.integers(0, 3, 24)
    model.fit(x, y, epochs=2, batch_size=8, optimizer={"type": "sgd", "lr": 0.05,
                                                       "momentum": 0.9}, seed=4, verbose=0, **kw)
    return {**model.params, **model.buffers}


def test_the_batchnorm_relu_fusion_equals_the_layers_bit_for_bit():
    """On Numba each BatchNorm, ReLU pair of the model is one fused op (the second pair after a
    conv with 16 input channels, which hands its output over channels-last); one step's loss,
    gradients and running statistics, and two epochs of training, sequential and ``sync`` over
    threads, are those of the same model with the fusion switched off, exactly."""
    fused_be = NumbaBackend()
    unfused_be = type("NoBatchNormRelu", (NumbaBackend,), {"fusions": tuple(
        f for f in NumbaBackend.fusions if not isinstance(f, BatchNormRelu))})()
    model = build_model(SPEC, dtype=np.float64, seed=2)
    fused_ops = [op for op in model.plan(fused_be)
                 if isinstance(op, FusedOp) and op.fusion is BATCHNORM_RELU]
    assert [[layer.type for layer in op.layers] for op in fused_ops] == [["batchnorm", "relu"]] * 3
    assert not any(isinstance(op, FusedOp) and op.fusion is BATCHNORM_RELU
                   for op in model.plan(unfused_be))

    rng = np.random.default_rng(5)
    x, y = rng.standard_normal((6, 3, 8, 8)), rng.integers(0, 3, 6)
    steps = {}
    for name, be in (("fused", fused_be), ("unfused", unfused_be)):
        ctx = StepContext(training=True, workspace=Workspace(be), buffers=dict(model.buffers))
        loss, _, grads = model.loss_and_grads(x, y, backend=be, ctx=ctx)
        steps[name] = (float(loss), {k: v.copy() for k, v in grads.items()},
                       {k: np.array(v) for k, v in ctx.updates.items()})
    assert steps["fused"][0] == steps["unfused"][0]
    for part in (1, 2):
        assert steps["fused"][part].keys() == steps["unfused"][part].keys()
        for k, v in steps["unfused"][part].items():
            np.testing.assert_array_equal(steps["fused"][part][k], v, err_msg=k)
    ref = build_model(SPEC, dtype=np.float64, seed=2)
    r_loss, _, r_grads = ref.loss_and_grads(x, y, backend="numpy",
                                            ctx=StepContext(training=True,
                                                            buffers=dict(ref.buffers)))
    assert steps["fused"][0] == pytest.approx(float(r_loss), rel=1e-12)
    for k, g in r_grads.items():
        np.testing.assert_allclose(steps["fused"][1][k], g, rtol=1e-9, atol=1e-12, err_msg=k)

    for kw in ({}, {"strategy": "sync", "threads": 2}):
        fused, unfused = fit(fused_be, **kw), fit(unfused_be, **kw)
        for k, v in unfused.items():
            np.testing.assert_array_equal(fused[k], v, err_msg=f"{kw} {k}")


# ---- a residual block's chain of ops -------------------------------------------------------------
class Reference:
    """The NumPy backend's conv, ReLU and batch norm (its normalisation and the ReLU chained
    for the fused ops), and the residual ops written here with NumPy slicing."""

    def __getattr__(self, name):
        return getattr(NUMPY, name)

    def residual_add_forward(self, main, shortcut, relu, ws=None):
        out = np.maximum(main + shortcut, 0)
        return out, out

    def residual_add_backward(self, dout, cache, ws=None):
        return np.where(cache > 0, dout, 0)

    def residual_grad_sum(self, a, b, ws=None):
        return a + b

    def shortcut_pad_forward(self, x, stride, before, after, ws=None):
        n, c, h, w = x.shape
        out = np.zeros((n, before + c + after, -(-h // stride), -(-w // stride)), x.dtype)
        out[:, before:before + c] = x[:, :, ::stride, ::stride]
        return out, (x.shape, stride, before)

    def shortcut_pad_backward(self, dout, cache, ws=None):
        shape, stride, before = cache
        dx = np.zeros(shape, dout.dtype)
        dx[:, :, ::stride, ::stride] = dout[:, before:before + shape[1]]
        return dx

    def globalavgpool2d_forward(self, x, ws=None):
        return x.mean(axis=(2, 3)), x.shape

    def globalavgpool2d_backward(self, dout, shape, ws=None):
        return np.broadcast_to(dout[:, :, None, None] / (shape[2] * shape[3]), shape)


NUMPY = get_backend("numpy")


@pytest.mark.parametrize("dtype, tol", DTYPES)
@pytest.mark.parametrize("stride", [1, 2])
def test_a_block_stays_channels_last_from_conv_to_conv(dtype, tol, stride):
    """A residual block of ResNet-20 as the numba backend's ops, with workspaces: conv, batch
    norm + ReLU (fused), conv, batch norm, the sum with the shortcut (identity, or option A's
    with stride 2) and its ReLU, then global average pooling, forward and backward, against
    :class:`Reference` (unfused). The block's input is a channels-last conv output; every
    activation and gradient between the convs comes out channels-last (no conversion ran),
    the block's input gradient included."""
    be = get_backend("numba")
    rng = np.random.default_rng(7 + stride)
    n, c, hw = 3, 16, 8
    f = c * stride
    w0 = normal(rng, (c, c, 3, 3), dtype) * 0.3
    w1, w2 = normal(rng, (f, c, 3, 3), dtype) * 0.3, normal(rng, (f, f, 3, 3), dtype) * 0.3
    zeros_c, zeros_f = np.zeros(c, dtype), np.zeros(f, dtype)
    g1, b1, g2, b2 = (normal(rng, f, dtype) for _ in range(4))
    x0 = normal(rng, (n, c, hw, hw), dtype)
    pad = ((1, 1), (1, 1))

    def block(b, fused):
        """Forward and backward of the block on ``b``: ``(results, arrays between convs)``."""
        bn = "batchnorm_relu_" if fused else "batchnorm_"
        ws = Workspace(b) if isinstance(b, NumbaBackend) else None
        sc = (lambda name: None) if ws is None else ws.scope
        x, _ = b.conv2d_forward(x0, w0, zeros_c, 1, pad, ws=sc("stem"))
        h, c1 = b.conv2d_forward(x, w1, zeros_f, stride, pad, ws=sc("conv1"))
        inv = 1.0 / (h.size // f)
        s = b.batchnorm_sums(h, ws=sc("bn1"))
        sq = b.batchnorm_sq_dev_sums(h, s, inv, ws=sc("bn1"))
        h, c2 = getattr(b, bn + "train_forward")(h, s, sq, inv, g1, b1, 1e-3, ws=sc("bn1"))
        if not fused:
            h, c2r = b.relu_forward(h)
        h, c3 = b.conv2d_forward(h, w2, zeros_f, 1, pad, ws=sc("conv2"))
        s = b.batchnorm_sums(h, ws=sc("bn2"))
        sq = b.batchnorm_sq_dev_sums(h, s, inv, ws=sc("bn2"))
        h, c4 = b.batchnorm_train_forward(h, s, sq, inv, g2, b2, 1e-3, ws=sc("bn2"))
        short, c5 = (b.shortcut_pad_forward(x, stride, (f - c) // 2, f - c - (f - c) // 2,
                                            ws=sc("pad")) if stride > 1 else (x, None))
        out, c6 = b.residual_add_forward(h, short, True, ws=sc("block"))
        pooled, c7 = b.globalavgpool2d_forward(out, ws=sc("gap"))
        d = b.globalavgpool2d_backward(pooled + 1, c7, ws=sc("gap"))
        dsum = b.residual_add_backward(d, c6, ws=sc("block"))
        dshort = b.shortcut_pad_backward(dsum, c5, ws=sc("pad")) if stride > 1 else dsum
        s1, s2 = b.batchnorm_backward_sums(dsum, c4, ws=sc("bn2"))
        dh = b.batchnorm_backward_dx(dsum, c4, s1, s2, inv, ws=sc("bn2"))
        dh, dw2, _ = b.conv2d_backward(dh, c3, ws=sc("conv2"))
        if not fused:
            dh = b.relu_backward(dh, c2r)
        t1, t2 = getattr(b, bn + "backward_sums")(dh, c2, ws=sc("bn1"))
        dh = getattr(b, bn + "backward_dx")(dh, c2, t1, t2, inv, ws=sc("bn1"))
        dx, dw1, _ = b.conv2d_backward(dh, c1, ws=sc("conv1"))
        dx = b.residual_grad_sum(dx, dshort, ws=sc("block"))
        return [out, pooled, dw2, dw1, dx, s1, s2, t1, t2], [x, out, d, dsum, dshort, dh, dx]

    want, _ = block(Reference(), fused=False)
    got, between = block(be, fused=True)
    for g, w in zip(got, want):
        assert_close(g, w, dtype, tol)
    assert all(is_channels_last(a) for a in between)
