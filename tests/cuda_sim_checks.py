"""CUDA backend checks under Numba's CUDA simulator, against the NumPy and naive references.

``tests/test_cuda_kernels.py`` runs this file in subprocesses with ``NUMBA_ENABLE_CUDASIM=1``:
the variable only takes effect if it is set before Numba is imported, which a pytest process
that already ran the Numba CPU tests cannot undo. Importing this module imports neither Numba
nor the CUDA backend (the test module reads ``CHECKS`` from it at collection time).

    NUMBA_ENABLE_CUDASIM=1 python tests/cuda_sim_checks.py [NAME ...] [--json OUT]

runs the named checks (default: all) and prints one line per check; ``--json`` also writes
``{name: {"ok": bool, "message": str, "seconds": float}}``. The simulator runs a few thousand
threads per second, so shapes are tiny, yet chosen to cross tile edges (sizes that are not
multiples of the 16-wide tiles, reductions longer than one tile), stride 2, asymmetric and
'same' padding, overlapping pooling windows and ties.
"""
from __future__ import annotations

import json
import os
import sys
import time
import traceback
from pathlib import Path

import numpy as np

from cnn.backends.naive import NaiveBackend
from cnn.backends.numpy import NumpyBackend

NP = NumpyBackend()
NAIVE = NaiveBackend()
#: max |got - want| / max |want| allowed, per dtype
TOL = {np.float32: 1e-5, np.float64: 1e-12}

#: name -> (function, relative cost in simulator seconds, for splitting across workers)
CHECKS: dict[str, tuple] = {}


def check(cost: float):
    """Register ``check_<name>(cb)`` under ``<name>``; ``cost`` (simulator seconds, measured)
    lets the test deal the checks evenly to its workers."""
    def register(fn):
        CHECKS[fn.__name__.removeprefix("check_")] = (fn, cost)
        return fn
    return register


def assert_close(what: str, got, want, dtype) -> None:
    got, want = np.asarray(got), np.asarray(want)
    assert got.shape == want.shape, f"{what}: shape {got.shape}, expected {want.shape}"
    assert got.dtype == np.dtype(dtype), f"{what}: dtype {got.dtype}, expected {np.dtype(dtype)}"
    scale = max(float(np.max(np.abs(want))), 1e-30)
    err = float(np.max(np.abs(got.astype(np.float64) - want))) / scale
    assert err < TOL[dtype], \
        f"{what}: relative error {err:.3g} >= {TOL[dtype]:g} ({np.dtype(dtype)})"


def _rng(seed):
    return np.random.default_rng(seed)


# ---- convolution ---------------------------------------------------------------------------------
def _conv_case(cb, tag, n, c, h, w, f, kh, kw, stride, padding, dtype, seed):
    """Forward and all three gradients of the CUDA conv vs NumPy and the naive loops."""
    rng = _rng(seed)
    x = rng.standard_normal((n, c, h, w)).astype(dtype)
    wt = rng.standard_normal((f, c, kh, kw)).astype(dtype)
    b = rng.standard_normal(f).astype(dtype)
    out, cache = cb.conv2d_forward(cb.asarray(x), cb.asarray(wt), cb.asarray(b), stride, padding)
    dout = rng.standard_normal(out.shape).astype(dtype)
    dx, dw, db = cb.conv2d_backward(cb.asarray(dout), cache)
    assert out.is_c_contiguous() and dx.is_c_contiguous(), f"{tag}: outputs not C-contiguous"
    for name, ref in (("numpy", NP), ("naive", NAIVE)):
        r_out, r_cache = ref.conv2d_forward(x, wt, b, stride, padding)
        r_dx, r_dw, r_db = ref.conv2d_backward(dout, r_cache)
        assert_close(f"{tag} out vs {name}", cb.to_host(out), r_out, dtype)
        assert_close(f"{tag} dx vs {name}", cb.to_host(dx), r_dx, dtype)
        assert_close(f"{tag} dw vs {name}", cb.to_host(dw), r_dw, dtype)
        assert_close(f"{tag} db vs {name}", cb.to_host(db), r_db, dtype)


@check(cost=4)
def check_conv_same_padding(cb):
    _conv_case(cb, "3x3 'same' stride 1", 2, 2, 5, 5, 3, 3, 3, 1, ((1, 1), (1, 1)), np.float32, 1)


@check(cost=4)
def check_conv_stride2_asymmetric_padding(cb):
    _conv_case(cb, "3x3 stride 2 pad ((1,0),(0,1))", 2, 3, 7, 6, 2, 3, 3, 2, ((1, 0), (0, 1)),
               np.float32, 2)


@check(cost=2.5)
def check_conv_rectangular_kernel_no_padding(cb):
    _conv_case(cb, "2x3 valid", 2, 2, 6, 5, 3, 2, 3, 1, ((0, 0), (0, 0)), np.float32, 3)


@check(cost=4.5)
def check_conv_many_channels(cb):
    # C = F = 17 span two 16-row tiles (forward rows are filters, dx rows are channels) and
    # the reductions C*KH*KW = F*KH*KW = 68 span five tiles; even 2x2 kernel, 'same' padding.
    _conv_case(cb, "17->17 channels 2x2", 1, 17, 2, 3, 17, 2, 2, 1, ((1, 0), (1, 0)),
               np.float32, 4)


@check(cost=3)
def check_conv_float64(cb):
    _conv_case(cb, "float64 stride 2", 2, 2, 6, 5, 2, 3, 3, 2, ((1, 1), (1, 1)), np.float64, 5)


@check(cost=5)
def check_conv_weight_grad_split_k(cb):
    from cnn.backends.cuda import kernels as K

    n, c, h, w, f = 2, 1, 9, 9, 2
    splits, _ = K.conv2d_dw_splits(f, c * 9 + 1, n * h * w)
    assert splits > 1, f"shape chosen to split the dw reduction, got {splits} split(s)"
    rng = _rng(6)
    x = rng.standard_normal((n, c, h, w)).astype(np.float32)
    wt = rng.standard_normal((f, c, 3, 3)).astype(np.float32)
    b = np.zeros(f, np.float32)
    pad = ((1, 1), (1, 1))
    _, cache = cb.conv2d_forward(cb.asarray(x), cb.asarray(wt), cb.asarray(b), 1, pad)
    _, r_cache = NP.conv2d_forward(x, wt, b, 1, pad)
    dout = rng.standard_normal((n, f, h, w)).astype(np.float32)
    dx, dw, db = cb.conv2d_backward(cb.asarray(dout), cache, need_dx=False)
    _, r_dw, r_db = NP.conv2d_backward(dout, r_cache, need_dx=False)
    assert dx is None, "need_dx=False must return dx=None"
    assert_close(f"dw with {splits} split-K slices", cb.to_host(dw), r_dw, np.float32)
    assert_close("db", cb.to_host(db), r_db, np.float32)


# ---- pooling -------------------------------------------------------------------------------------
def _pool_case(cb, tag, x, pool, stride):
    dtype = x.dtype.type
    out, cache = cb.maxpool2d_forward(cb.asarray(x), pool, stride)
    r_out, _ = NP.maxpool2d_forward(x, pool, stride)
    dout = _rng(7).standard_normal(r_out.shape).astype(dtype)
    dx = cb.maxpool2d_backward(cb.asarray(dout), cache)
    for name, ref in (("numpy", NP), ("naive", NAIVE)):
        r_out, r_cache = ref.maxpool2d_forward(x, pool, stride)
        assert_close(f"{tag} out vs {name}", cb.to_host(out), r_out, dtype)
        assert_close(f"{tag} dx vs {name}", cb.to_host(dx), ref.maxpool2d_backward(dout, r_cache),
                     dtype)


@check(cost=1)
def check_maxpool(cb):
    rng = _rng(8)
    x = rng.standard_normal((2, 2, 5, 5)).astype(np.float32)
    _pool_case(cb, "2x2/2 odd size", x, 2, 2)
    _pool_case(cb, "3x3/2 overlapping", rng.standard_normal((2, 2, 7, 7)).astype(np.float32), 3, 2)
    _pool_case(cb, "2x2/1 overlapping float64", x.astype(np.float64), 2, 1)
    # Ties: few distinct values, so windows hold repeated maxima; the first one in row-major
    # window order takes the gradient.
    ties = rng.integers(0, 3, (2, 2, 6, 6)).astype(np.float32)
    _pool_case(cb, "3x3/1 with ties", ties, 3, 1)


# ---- activations ---------------------------------------------------------------------------------
@check(cost=0.5)
def check_relu(cb):
    for dtype in (np.float32, np.float64):
        x = _rng(9).standard_normal((2, 3, 5, 7)).astype(dtype)
        x[0, 0, 0, :3] = 0  # the derivative at 0 is 0
        dout = _rng(10).standard_normal(x.shape).astype(dtype)
        out, cache = cb.relu_forward(cb.asarray(x))
        r_out, r_cache = NP.relu_forward(x)
        assert_close("relu out", cb.to_host(out), r_out, dtype)
        assert_close("relu dx", cb.to_host(cb.relu_backward(cb.asarray(dout), cache)),
                     NP.relu_backward(dout, r_cache), dtype)


# ---- dense ---------------------------------------------------------------------------------------
@check(cost=7)
def check_dense(cb):
    # (5, 19, 7): every size below a tile; (17, 33, 3): rows and the reduction span tiles.
    for seed, (n, d, m), dtype in ((11, (5, 19, 7), np.float32), (12, (17, 33, 3), np.float32),
                                   (13, (5, 19, 7), np.float64)):
        rng = _rng(seed)
        x = rng.standard_normal((n, d)).astype(dtype)
        w = rng.standard_normal((d, m)).astype(dtype)
        b = rng.standard_normal(m).astype(dtype)
        dout = rng.standard_normal((n, m)).astype(dtype)
        out, cache = cb.dense_forward(cb.asarray(x), cb.asarray(w), cb.asarray(b))
        dx, dw, db = cb.dense_backward(cb.asarray(dout), cache)
        for name, ref in (("numpy", NP), ("naive", NAIVE)):
            r_out, r_cache = ref.dense_forward(x, w, b)
            r_dx, r_dw, r_db = ref.dense_backward(dout, r_cache)
            tag = f"dense {(n, d, m)} {np.dtype(dtype)}"
            assert_close(f"{tag} out vs {name}", cb.to_host(out), r_out, dtype)
            assert_close(f"{tag} dx vs {name}", cb.to_host(dx), r_dx, dtype)
            assert_close(f"{tag} dw vs {name}", cb.to_host(dw), r_dw, dtype)
            assert_close(f"{tag} db vs {name}", cb.to_host(db), r_db, dtype)
    assert cb.dense_backward(cb.asarray(dout), cache, need_dx=False)[0] is None, \
        "need_dx=False must return dx=None"


@check(cost=2)
def check_matmul_transposes(cb):
    rng = _rng(14)
    m, k, n = 17, 18, 5  # M spans two row tiles, K two reduction tiles
    for trans_a in (False, True):
        for trans_b in (False, True):
            a = rng.standard_normal((k, m) if trans_a else (m, k)).astype(np.float32)
            b = rng.standard_normal((n, k) if trans_b else (k, n)).astype(np.float32)
            got = cb.to_host(cb._matmul(cb.asarray(a), cb.asarray(b), trans_a, trans_b))
            want = (a.T if trans_a else a) @ (b.T if trans_b else b)
            assert_close(f"matmul trans_a={trans_a} trans_b={trans_b}", got, want, np.float32)


@check(cost=0.7)
def check_column_sums(cb):
    from cnn.backends.cuda import kernels as K

    # 40 columns > one 32-wide block; 20 rows > the 8 row phases of a column
    a = _rng(15).standard_normal((20, 40)).astype(np.float32)
    out = cb.zeros_like(cb.asarray(np.zeros(40, np.float32)))
    K.column_sums_kernel[K.column_sum_grid(40), K.COLUMN_SUM_THREADS](cb.asarray(a), out)
    assert_close("column sums", cb.to_host(out), a.sum(axis=0), np.float32)


# ---- loss ----------------------------------------------------------------------------------------
@check(cost=2)
def check_softmax_cross_entropy(cb):
    rng = _rng(17)
    cases = [
        ("random", rng.standard_normal((5, 4)), rng.integers(0, 4, 5)),
        # |logits| ~ 1e4: exp would overflow without the max shift
        ("large logits", 1e4 * rng.standard_normal((6, 3)), rng.integers(0, 3, 6).astype(np.int32)),
        # more rows than the block has threads: threads loop over rows
        ("300 rows", rng.standard_normal((300, 3)), rng.integers(0, 3, 300)),
    ]
    for tag, logits, labels in cases:
        for dtype in (np.float32, np.float64):
            z = logits.astype(dtype)
            loss, dlogits, correct = cb.softmax_cross_entropy(cb.asarray(z), cb.asarray(labels))
            r_loss, r_d, r_correct = NP.softmax_cross_entropy(z, labels)
            h_loss, h_correct = cb.to_host(loss), cb.to_host(correct)
            assert h_loss.shape == () and h_correct.shape == (), \
                f"{tag}: loss/correct must be 0-d, got {h_loss.shape} and {h_correct.shape}"
            assert np.isfinite(float(h_loss)), f"{tag}: loss not finite ({np.dtype(dtype)})"
            assert_close(f"{tag} loss", h_loss, r_loss, dtype)
            assert_close(f"{tag} dlogits", cb.to_host(dlogits), r_d, dtype)
            assert int(h_correct) == int(r_correct), \
                f"{tag}: correct {int(h_correct)}, expected {int(r_correct)} ({np.dtype(dtype)})"


# ---- optimizer -----------------------------------------------------------------------------------
@check(cost=1.5)
def check_optimizer_primitives(cb):
    """axpby, axpby_square and axpby_ratio (both eps placements, centered or not) against
    their formulas computed in float64, in float32 and float64."""
    rng = _rng(18)
    for dtype in (np.float32, np.float64):
        y, x, num = (rng.standard_normal((3, 2, 3, 3)).astype(dtype) for _ in range(3))
        den = (rng.random((3, 2, 3, 3)) + 0.5).astype(dtype)
        center = (0.3 * rng.standard_normal((3, 2, 3, 3))).astype(dtype)
        yd = y.astype(np.float64)
        cases = [
            ("axpby", lambda d: cb.axpby(d, 0.9, cb.asarray(x), -0.05),
             0.9 * yd - 0.05 * x),
            ("axpby_square", lambda d: cb.axpby_square(d, 0.99, cb.asarray(x), 0.01),
             0.99 * yd + 0.01 * x.astype(np.float64) ** 2),
            ("axpby_ratio", lambda d: cb.axpby_ratio(d, 1.0, -0.1, cb.asarray(num),
                                                     cb.asarray(den), 1e-3, False),
             yd - 0.1 * num / (np.sqrt(den.astype(np.float64)) + 1e-3)),
            ("axpby_ratio eps inside", lambda d: cb.axpby_ratio(d, 0.5, 0.2, cb.asarray(num),
                                                                cb.asarray(den), 1e-3, True),
             0.5 * yd + 0.2 * num / np.sqrt(den.astype(np.float64) + 1e-3)),
            ("axpby_ratio centered", lambda d: cb.axpby_ratio(
                d, 1.0, -0.1, cb.asarray(num), cb.asarray(den), 1e-3, True, cb.asarray(center)),
             yd - 0.1 * num / np.sqrt(den.astype(np.float64) - center.astype(np.float64) ** 2
                                      + 1e-3)),
        ]
        for name, launch, want in cases:
            d = cb.asarray(y)
            launch(d)
            assert_close(f"{name} ({np.dtype(dtype)})", cb.to_host(d), want, dtype)
        d = cb.asarray(y)  # x aliasing y (decoupled weight decay: w = w - c * w)
        cb.axpby(d, 1.0, d, -0.01)
        assert_close(f"axpby aliased ({np.dtype(dtype)})", cb.to_host(d), yd - 0.01 * yd, dtype)


@check(cost=9)
def check_optimizers_on_device(cb):
    """Three updates of every optimizer (state on the device, lr changing every step as a
    schedule would) equal the NumPy backend's, for the parameters and every slot."""
    from cnn.optim import make_optimizer

    rng = _rng(21)
    params = {"w": rng.standard_normal((2, 3, 3)).astype(np.float32),
              "b": rng.standard_normal(5).astype(np.float32)}
    grads = [{k: rng.standard_normal(v.shape).astype(np.float32) for k, v in params.items()}
             for _ in range(3)]
    specs = [{"type": "sgd", "lr": 0.1}, {"type": "sgd", "lr": 0.1, "momentum": 0.9},
             {"type": "sgd", "lr": 0.1, "momentum": 0.9, "nesterov": True},
             {"type": "rmsprop", "lr": 0.01}, {"type": "rmsprop", "lr": 0.01, "momentum": 0.5,
                                               "centered": True},
             {"type": "adam", "lr": 0.01}, {"type": "adamw", "lr": 0.01, "weight_decay": 0.1}]
    for spec in specs:
        opt = make_optimizer(spec)
        dev = {k: cb.asarray(v) for k, v in params.items()}
        ref = {k: v.copy() for k, v in params.items()}
        s_dev, s_ref = opt.init_state(dev, cb), opt.init_state(ref, NP)
        for i, g in enumerate(grads):
            lr = spec["lr"] * (1.0 - 0.2 * i)
            opt.update(dev, {k: cb.asarray(v) for k, v in g.items()}, s_dev, cb, lr)
            opt.update(ref, g, s_ref, NP, lr)
        assert s_dev.step == s_ref.step == 3, f"{spec}: step {s_dev.step}"
        for k in params:
            assert_close(f"{spec['type']} {spec} param {k}", cb.to_host(dev[k]), ref[k], np.float32)
            for name in opt.slot_names:
                assert_close(f"{spec} slot {name}/{k}", cb.to_host(s_dev.slots[name][k]),
                             s_ref.slots[name][k], np.float32)


# ---- memory and a device-resident step -----------------------------------------------------------
@check(cost=0.1)
def check_memory(cb):
    x = _rng(19).standard_normal((3, 4, 5)).astype(np.float32)
    d = cb.asarray(x)
    assert cb.asarray(d) is d, "asarray of a device array must not copy"
    np.testing.assert_array_equal(cb.to_host(d), x, err_msg="asarray/to_host round trip")
    z = cb.to_host(cb.zeros_like(d))
    assert z.dtype == x.dtype and z.shape == x.shape and not z.any(), "zeros_like"
    assert cb.asarray(x[:, ::2]).is_c_contiguous(), "asarray must store C-contiguous arrays"
    cb.synchronize()


@check(cost=3)
def check_device_step_without_transfers(cb):
    """conv -> relu -> pool -> flatten -> dense -> loss, backward, Adam, all on the device:
    no host<->device copy inside the step, and the same update as the NumPy backend."""
    from cnn.optim import Adam
    adam = Adam(lr=0.01)
    import numba.cuda.simulator.kernel as sim_kernel
    from numba import cuda
    from numba.cuda.simulator.cudadrv.devicearray import FakeCUDAArray

    rng = _rng(20)
    n, k = 2, 3
    x = rng.standard_normal((n, 1, 4, 4)).astype(np.float32)
    y = np.array([0, 2])
    params = {"cw": rng.standard_normal((2, 1, 3, 3)).astype(np.float32),
              "cb": rng.standard_normal(2).astype(np.float32),
              "dw": rng.standard_normal((8, k)).astype(np.float32),
              "db": rng.standard_normal(k).astype(np.float32)}

    def step(be, p, vel, xb, yb):
        h1, c1 = be.conv2d_forward(xb, p["cw"], p["cb"], 1, ((1, 1), (1, 1)))
        h2, c2 = be.relu_forward(h1)
        h3, c3 = be.maxpool2d_forward(h2, 2, 2)
        flat = h3.reshape(n, -1)
        logits, c4 = be.dense_forward(flat, p["dw"], p["db"])
        loss, dlogits, correct = be.softmax_cross_entropy(logits, yb)
        dflat, g_dw, g_db = be.dense_backward(dlogits, c4)
        d3 = be.maxpool2d_backward(dflat.reshape(h3.shape), c3)
        d2 = be.relu_backward(d3, c2)
        _, g_cw, g_cb = be.conv2d_backward(d2, c1, need_dx=False)
        grads = {"cw": g_cw, "cb": g_cb, "dw": g_dw, "db": g_db}
        adam.update(p, grads, vel, be)
        return loss, correct

    dev = {name: cb.asarray(v) for name, v in params.items()}
    vel = adam.init_state(dev, cb)
    xb, yb = cb.asarray(x), cb.asarray(y)

    transfers = []
    saved = (cuda.to_device, FakeCUDAArray.copy_to_host, sim_kernel.FakeCUDAKernel.__call__)

    def launch(kernel, *args):
        if any(isinstance(a, np.ndarray) for a in args):
            transfers.append(f"host array passed to {kernel.fn.__name__}")
        return saved[2](kernel, *args)

    cuda.to_device = lambda *a, **kw: transfers.append("to_device") or saved[0](*a, **kw)
    FakeCUDAArray.copy_to_host = lambda self, *a, **kw: (transfers.append("copy_to_host")
                                                         or saved[1](self, *a, **kw))
    sim_kernel.FakeCUDAKernel.__call__ = launch
    try:
        loss, correct = step(cb, dev, vel, xb, yb)
    finally:
        cuda.to_device, FakeCUDAArray.copy_to_host, sim_kernel.FakeCUDAKernel.__call__ = saved
    assert not transfers, f"host transfers inside a device step: {transfers}"

    ref = {name: v.copy() for name, v in params.items()}
    r_loss, r_correct = step(NP, ref, adam.init_state(ref, NP), x, y)
    assert_close("step loss", cb.to_host(loss), r_loss, np.float32)
    assert int(cb.to_host(correct)) == int(r_correct), "step correct count"
    for name in params:
        assert_close(f"step updated {name}", cb.to_host(dev[name]), ref[name], np.float32)


# ---- the layers of issue 12: activations, dropout, batch norm, BCE, penalties ------------------
@check(cost=1)
def check_sigmoid_tanh(cb):
    for dtype in (np.float32, np.float64):
        x = (_rng(21).standard_normal((2, 3, 4, 5)) * 4).astype(dtype)
        x[0, 0, 0, :3] = [0.0, 50.0, -120.0]  # exp(120) overflows float32: must not matter
        dout = _rng(22).standard_normal(x.shape).astype(dtype)
        for op in ("sigmoid", "tanh"):
            out, cache = getattr(cb, f"{op}_forward")(cb.asarray(x))
            dx = getattr(cb, f"{op}_backward")(cb.asarray(dout), cache)
            r_out, r_cache = getattr(NAIVE, f"{op}_forward")(x)
            assert np.isfinite(cb.to_host(out)).all(), f"{op}: non-finite output"
            assert_close(f"{op} out", cb.to_host(out), r_out, dtype)
            assert_close(f"{op} dx", cb.to_host(dx),
                         getattr(NAIVE, f"{op}_backward")(dout, r_cache), dtype)


@check(cost=0.5)
def check_dropout_masks_match_every_backend(cb):
    from cnn.backends import rng

    for dtype, shape, rate, offset in ((np.float32, (3, 2, 4, 5), 0.3, 0),
                                       (np.float64, (4, 37), 0.75, 1000)):
        x = _rng(23).standard_normal(shape).astype(dtype)
        dout = _rng(24).standard_normal(shape).astype(dtype)
        key = rng.pass_key(7, "dropout_1", 11)
        out, cache = cb.dropout_forward(cb.asarray(x), rate, key, offset)
        dx = cb.dropout_backward(cb.asarray(dout), cache)
        keep = rng.keep_mask_reference(key, rate, offset, shape)  # Python integers
        got_keep = cb.to_host(cache[0]).astype(bool)
        assert np.array_equal(got_keep, keep), \
            f"dropout {shape}: {int((got_keep != keep).sum())} units differ from the reference mask"
        r_out, r_cache = NAIVE.dropout_forward(x, rate, key, offset)
        np.testing.assert_array_equal(cb.to_host(out), r_out, err_msg=f"dropout out {shape}")
        np.testing.assert_array_equal(cb.to_host(dx), NAIVE.dropout_backward(dout, r_cache),
                                      err_msg=f"dropout dx {shape}")


def _bn_case(cb, tag, x, dtype, seed):
    rng_ = _rng(seed)
    c = x.shape[1]
    count = x.size // c
    gamma = rng_.standard_normal(c).astype(dtype)
    beta = rng_.standard_normal(c).astype(dtype)
    rmean = rng_.standard_normal(c).astype(dtype)
    rvar = rng_.uniform(0.5, 2, c).astype(dtype)
    dout = rng_.standard_normal(x.shape).astype(dtype)
    dx_ = cb.asarray(x)
    sums = cb.batchnorm_sums(dx_)
    sq = cb.batchnorm_sq_dev_sums(dx_, sums, 1.0 / count)
    r_sums = NAIVE.batchnorm_sums(x)
    r_sq = NAIVE.batchnorm_sq_dev_sums(x, r_sums, 1.0 / count)
    assert_close(f"{tag} sums", cb.to_host(sums), r_sums, dtype)
    assert_close(f"{tag} squared deviations", cb.to_host(sq), r_sq, dtype)
    out, cache = cb.batchnorm_train_forward(dx_, sums, sq, 1.0 / count, cb.asarray(gamma),
                                            cb.asarray(beta), 1e-3)
    r_out, r_cache = NAIVE.batchnorm_train_forward(x, r_sums, r_sq, 1.0 / count, gamma, beta, 1e-3)
    assert_close(f"{tag} train out", cb.to_host(out), r_out, dtype)
    new_m, new_v = cb.batchnorm_running_update(cb.asarray(rmean), cb.asarray(rvar), sums, sq,
                                               1.0 / count, 0.9)
    r_m, r_v = NAIVE.batchnorm_running_update(rmean, rvar, r_sums, r_sq, 1.0 / count, 0.9)
    assert_close(f"{tag} running mean", cb.to_host(new_m), r_m, dtype)
    assert_close(f"{tag} running var", cb.to_host(new_v), r_v, dtype)
    s1, s2 = cb.batchnorm_backward_sums(cb.asarray(dout), cache)
    r1, r2 = NAIVE.batchnorm_backward_sums(dout, r_cache)
    assert_close(f"{tag} dbeta", cb.to_host(s1), r1, dtype)
    assert_close(f"{tag} dgamma", cb.to_host(s2), r2, dtype)
    dx = cb.batchnorm_backward_dx(cb.asarray(dout), cache, s1, s2, 1.0 / count)
    assert_close(f"{tag} dx", cb.to_host(dx),
                 NAIVE.batchnorm_backward_dx(dout, r_cache, r1, r2, 1.0 / count), dtype)
    out, cache = cb.batchnorm_infer_forward(dx_, cb.asarray(rmean), cb.asarray(rvar),
                                            cb.asarray(gamma), cb.asarray(beta), 1e-3)
    r_out, r_cache = NAIVE.batchnorm_infer_forward(x, rmean, rvar, gamma, beta, 1e-3)
    assert_close(f"{tag} inference out", cb.to_host(out), r_out, dtype)
    dx = cb.batchnorm_backward_dx(cb.asarray(dout), cache, s1, s2, 0.0)
    assert_close(f"{tag} inference dx", cb.to_host(dx),
                 NAIVE.batchnorm_backward_dx(dout, r_cache, r1, r2, 0.0), dtype)


@check(cost=7)
def check_batchnorm(cb):
    rng_ = _rng(25)
    # 3 * 10 * 10 = 300 values per channel: more than the 256 threads of a channel's block
    _bn_case(cb, "conv (3, 2, 10, 10)", (rng_.standard_normal((3, 2, 10, 10)) * 2 + 1)
             .astype(np.float32), np.float32, 26)
    _bn_case(cb, "dense (5, 3) float64", rng_.standard_normal((5, 3)), np.float64, 27)


@check(cost=3)
def check_binary_cross_entropy(cb):
    rng_ = _rng(28)
    cases = [("random", rng_.standard_normal((7, 1)), rng_.integers(0, 2, 7)),
             ("large logits", 1e4 * rng_.standard_normal((6, 1)), rng_.integers(0, 2, 6)),
             ("300 rows", rng_.standard_normal((300, 1)), rng_.integers(0, 2, 300))]
    for tag, logits, labels in cases:
        for dtype in (np.float32, np.float64):
            z = logits.astype(dtype)
            loss, dlogits, correct = cb.binary_cross_entropy(cb.asarray(z), cb.asarray(labels))
            r_loss, r_d, r_correct = NAIVE.binary_cross_entropy(z, labels)
            h_loss = cb.to_host(loss)
            assert h_loss.shape == () and np.isfinite(float(h_loss)), f"{tag}: loss {h_loss}"
            assert_close(f"bce {tag} loss", h_loss, r_loss, dtype)
            assert_close(f"bce {tag} dlogits", cb.to_host(dlogits), r_d, dtype)
            assert int(cb.to_host(correct)) == int(r_correct), f"bce {tag}: correct count"


@check(cost=0.8)
def check_weight_penalty(cb):
    for dtype in (np.float32, np.float64):
        w = _rng(29).standard_normal((3, 2, 3, 3)).astype(dtype)
        w.flat[:2] = 0  # sign(0) = 0
        g = _rng(30).standard_normal(w.shape).astype(dtype)
        loss0 = np.asarray(0.75, dtype=dtype)
        got = cb.weight_penalty(cb.asarray(w), 0.01, 0.003, cb.asarray(loss0.reshape(1)).reshape(()))
        assert_close("penalty loss", cb.to_host(got), NAIVE.weight_penalty(w, 0.01, 0.003, loss0),
                     dtype)
        dg = cb.asarray(g)
        cb.weight_penalty_grad(dg, cb.asarray(w), 0.01, 0.003)
        assert_close("penalty grad", cb.to_host(dg),
                     NAIVE.weight_penalty_grad(g.copy(), w, 0.01, 0.003), dtype)


@check(cost=14)
def check_model_with_new_layers_on_the_device(cb):
    """A training pass (batch norm, dropout, sigmoid/tanh, an L1/L2 penalty, BCE) of a model
    on the CUDA backend, with a device workspace, against the NumPy backend: loss, every
    gradient, the new running statistics; then an inference pass with them."""
    from cnn.context import StepContext, Workspace
    from cnn.model import build_model

    spec = {"loss": "binary_cross_entropy", "input_shape": [1, 4, 4], "layers": [
        {"type": "conv2d", "filters": 2, "kernel_size": 3, "padding": "same",
         "kernel_regularizer": {"l1": 0.01, "l2": 0.02}},
        {"type": "batchnorm", "momentum": 0.8}, {"type": "tanh"},
        {"type": "maxpool2d", "pool_size": 2}, {"type": "flatten"},
        {"type": "dropout", "rate": 0.4},
        {"type": "dense", "units": 3, "activation": "sigmoid"}, {"type": "batchnorm"},
        {"type": "dense", "units": 1}]}
    model = build_model(spec, seed=3)
    rng_ = _rng(31)
    x = rng_.standard_normal((5, 1, 4, 4)).astype(np.float32)
    y = rng_.integers(0, 2, 5)
    dev = {k: cb.asarray(v) for k, v in model.params.items()}
    dev_buf = {k: cb.asarray(v) for k, v in model.buffers.items()}
    ctx = StepContext(training=True, workspace=Workspace(cb), seed=4, step=9, offset=3,
                      buffers=dev_buf)
    loss, correct, grads = model.loss_and_grads(cb.asarray(x), cb.asarray(y), dev, cb, ctx)
    r_ctx = StepContext(training=True, seed=4, step=9, offset=3, buffers=dict(model.buffers))
    r_loss, r_correct, r_grads = model.loss_and_grads(x, y, model.params, NP, r_ctx)
    assert_close("model loss", cb.to_host(loss), r_loss, np.float32)
    assert int(cb.to_host(correct)) == int(r_correct), "model correct count"
    for k in r_grads:
        if k == "conv2d.b":  # a bias before batch norm has no effect: its gradient is ~0
            assert np.abs(cb.to_host(grads[k])).max() < 1e-6, f"{k}: {cb.to_host(grads[k])}"
            continue
        assert_close(f"model grad {k}", cb.to_host(grads[k]), r_grads[k], np.float32)
    assert set(ctx.updates) == set(model.buffers), f"updates {sorted(ctx.updates)}"
    for k in r_ctx.updates:
        assert_close(f"new {k}", cb.to_host(ctx.updates[k]), r_ctx.updates[k], np.float32)
    ctx.commit()
    r_ctx.commit()
    got = cb.to_host(model.forward(cb.asarray(x), dev, cb, StepContext(buffers=dev_buf))[0])
    want = model.forward(x, ctx=StepContext(buffers=r_ctx.buffers))[0]
    assert_close("inference logits", got, want, np.float32)


#: a tiny network with batch norm and dropout, for the checks of fit on the device
FIT_SPEC = {"input_shape": [1, 3, 3], "layers": [
    {"type": "conv2d", "filters": 2, "kernel_size": 2}, {"type": "batchnorm", "momentum": 0.5},
    {"type": "flatten"}, {"type": "dropout", "rate": 0.5}, {"type": "dense", "units": 2}]}


@check(cost=12)
def check_fit_commits_statistics_on_the_device(cb):
    """fit on the CUDA backend (the sequential strategy, buffers on the device, the JIT
    warm-up) with batch norm and dropout: the same weights and running statistics as the
    NumPy path, and the warm-up committed nothing (else the statistics would differ)."""
    from cnn.model import build_model

    rng_ = _rng(32)
    x = rng_.standard_normal((6, 1, 3, 3)).astype(np.float32)
    y = rng_.integers(0, 2, 6)
    got = {}
    for backend in ("cuda", "numpy"):
        model = build_model(FIT_SPEC, seed=1, backend=cb if backend == "cuda" else backend)
        model.fit(x, y, epochs=1, batch_size=3, optimizer={"type": "sgd", "lr": 0.1}, seed=2,
                  verbose=0)
        got[backend] = model.get_weights()
    for k, v in got["numpy"].items():
        if k == "conv2d.b":  # before batch norm: rounding noise only
            assert np.abs(got["cuda"][k] - v).max() < 1e-6, k
            continue
        assert_close(f"fit {k}", got["cuda"][k], v, np.float32)


@check(cost=15)
def check_fit_keeps_optimizer_state_on_the_device(cb):
    """fit on the CUDA backend with Adam and a cosine schedule, twice (the state goes to the
    device, stays there for the fit, and comes back for the next): the same weights, slots and
    step count as the NumPy path after 2 + 2 steps."""
    from cnn.model import build_model

    spec = {"input_shape": [1, 2, 3], "layers": [
        {"type": "flatten"}, {"type": "dense", "units": 4, "activation": "relu"},
        {"type": "dense", "units": 3}]}
    rng_ = _rng(33)
    x = rng_.standard_normal((6, 1, 2, 3)).astype(np.float32)
    y = rng_.integers(0, 3, 6)
    opt = {"type": "adam", "lr": 0.05, "schedule": {"type": "cosine", "decay_steps": 5}}
    got = {}
    for backend in ("cuda", "numpy"):
        model = build_model(spec, seed=1, backend=cb if backend == "cuda" else backend)
        for _ in range(2):
            model.fit(x, y, epochs=1, batch_size=3, optimizer=opt, seed=2, verbose=0)
        got[backend] = model
    ours, ref = got["cuda"], got["numpy"]
    assert ours.optimizer_state.step == ref.optimizer_state.step == 4, "step count"
    assert all(isinstance(a, np.ndarray) for s in ours.optimizer_state.slots.values()
               for a in s.values()), "the kept state must be host arrays"
    for k, v in ref.params.items():
        assert_close(f"fit twice {k}", ours.params[k], v, np.float32)
        for name in ("m", "v"):
            assert_close(f"slot {name}/{k}", ours.optimizer_state.slots[name][k],
                         ref.optimizer_state.slots[name][k], np.float32)


# ---- the ops of residual networks (issue 20) -----------------------------------------------------
# References written here with NumPy slicing and float64 arithmetic (the NumPy backend's versions
# are another branch's work).
def _stale(cb, ws, name, shape, dtype):
    """Fill the workspace buffer ``name`` with NaN, as a previous step's values: an op that
    relies on zeros it did not write fails."""
    ws.buffer(name, shape, dtype).copy_to_device(np.full(shape, np.nan, dtype))


@check(cost=0.5)
def check_residual_add(cb):
    """The sum with and without its ReLU (exact zeros at the kink), its backward, the gradient
    sum, on (N, C, H, W) and (N, D) operands, float32 and float64."""
    for shape, dtype in (((2, 3, 4, 5), np.float32), ((3, 7), np.float64)):
        rng = _rng(34)
        a = rng.standard_normal(shape).astype(dtype)
        b = rng.standard_normal(shape).astype(dtype)
        b.reshape(-1)[::7] = -a.reshape(-1)[::7]
        total = a.astype(np.float64) + b
        dout = rng.standard_normal(shape).astype(dtype)
        for relu in (True, False):
            out, cache = cb.residual_add_forward(cb.asarray(a), cb.asarray(b), relu)
            assert_close(f"sum {shape} relu={relu}", cb.to_host(out),
                         np.maximum(total, 0) if relu else total, dtype)
            d_dev = cb.asarray(dout)
            d = cb.residual_add_backward(d_dev, cache)
            assert_close(f"sum backward {shape} relu={relu}", cb.to_host(d),
                         np.where(total > 0, dout, 0) if relu else dout, dtype)
            assert relu or d is d_dev, "without the ReLU the gradient passes on as it is"
        assert_close(f"gradient sum {shape}", cb.to_host(cb.residual_grad_sum(
            cb.asarray(a), cb.asarray(b))), total, dtype)
    try:
        cb.residual_grad_sum(cb.asarray(a), cb.asarray(a[:, :6]))
    except ValueError as exc:
        assert "dx_shortcut.shape=(3, 6)" in str(exc), str(exc)
    else:
        raise AssertionError("operands of different shapes were accepted")


@check(cost=0.2)
def check_shortcut_pad(cb):
    """Option A's shortcut and its backward against NumPy slicing: stride 2 on odd sizes with
    zero channels on both sides, stride 1 with channels after only; into workspace buffers
    that hold NaN (every element must be written)."""
    from cnn.context import Workspace

    for shape, stride, before, after, dtype in (((2, 3, 5, 4), 2, 2, 1, np.float32),
                                                ((1, 2, 3, 3), 1, 0, 2, np.float64)):
        rng = _rng(35)
        x = rng.standard_normal(shape).astype(dtype)
        n, c, h, w = shape
        want = np.zeros((n, before + c + after, -(-h // stride), -(-w // stride)), dtype)
        want[:, before:before + c] = x[:, :, ::stride, ::stride]
        dout = rng.standard_normal(want.shape).astype(dtype)
        want_dx = np.zeros(shape, dtype)
        want_dx[:, :, ::stride, ::stride] = dout[:, before:before + c]
        ws = Workspace(cb)
        _stale(cb, ws, "out", want.shape, dtype)
        _stale(cb, ws, "dx", shape, dtype)
        out, cache = cb.shortcut_pad_forward(cb.asarray(x), stride, before, after, ws=ws)
        tag = f"shortcut {shape} stride {stride} +{before}/{after}"
        assert_close(f"{tag} out", cb.to_host(out), want, dtype)
        assert_close(f"{tag} dx", cb.to_host(cb.shortcut_pad_backward(cb.asarray(dout), cache,
                                                                      ws=ws)), want_dx, dtype)


@check(cost=1.6)
def check_globalavgpool2d(cb):
    """Global average pooling and its backward: planes shorter than a block (5 x 4) and
    longer (9 x 9 > 64 threads: threads stride, then the tree), float32 and float64."""
    for shape, dtype in (((2, 3, 5, 4), np.float32), ((1, 2, 9, 9), np.float64)):
        rng = _rng(36)
        x = (rng.standard_normal(shape) + 2).astype(dtype)
        n, c, h, w = shape
        dout = rng.standard_normal((n, c)).astype(dtype)
        out, cache = cb.globalavgpool2d_forward(cb.asarray(x))
        assert_close(f"pooling {shape}", cb.to_host(out),
                     x.astype(np.float64).reshape(n, c, -1).sum(axis=2) / (h * w), dtype)
        assert_close(f"pooling backward {shape}",
                     cb.to_host(cb.globalavgpool2d_backward(cb.asarray(dout), cache)),
                     np.repeat(dout.astype(np.float64) / (h * w), h * w).reshape(shape), dtype)


@check(cost=25)
def check_fit_resumes_bitwise_on_the_device(cb):
    """fit on the CUDA backend with backups (batch norm, dropout, Adam on a cosine): stopped
    after step 2 (a backup of that step, the device arrays copied to the host), then
    continued by a new fit from the backup: the weights of the run never stopped, bit for
    bit."""
    import tempfile

    from cnn.callbacks import Callback
    from cnn.errors import Interrupted
    from cnn.model import build_model

    class StopAt(Callback):
        def on_step_end(self, step, logs):
            if logs["global_step"] == 2:
                self.run.strategy.request_stop()

    rng_ = _rng(34)
    x = rng_.standard_normal((9, 1, 3, 3)).astype(np.float32)
    y = rng_.integers(0, 2, 9)
    run = {"epochs": 1, "batch_size": 3, "seed": 2, "verbose": 0,
           "optimizer": {"type": "adam", "lr": 0.05, "schedule": "cosine"}}
    ref = build_model(FIT_SPEC, seed=1, backend=cb)
    ref.fit(x, y, **run)
    with tempfile.TemporaryDirectory() as folder:
        try:
            build_model(FIT_SPEC, seed=1, backend=cb).fit(x, y, backup_dir=folder,
                                                      callbacks=[StopAt()], **run)
            raise AssertionError("the fit did not stop")
        except Interrupted:
            pass
        model = build_model(FIT_SPEC, seed=1, backend=cb)
        hist = model.fit(x, y, backup_dir=folder, **run)
    assert hist.info["resumes"][0]["global_step"] == 2, hist.info["resumes"]
    for k, v in ref.get_weights().items():
        assert np.array_equal(model.get_weights()[k], v), f"{k} differs from the run never stopped"


# ---- runner --------------------------------------------------------------------------------------
def run(names):
    """Run the named checks; ``{name: {"ok", "message", "seconds"}}``."""
    if os.environ.get("NUMBA_ENABLE_CUDASIM") != "1":
        raise SystemExit("set NUMBA_ENABLE_CUDASIM=1 before running the simulator checks")
    from cnn.backends.cuda.backend import CudaBackend

    cb = CudaBackend()
    results = {}
    for name in names:
        fn, _ = CHECKS[name]
        t0 = time.perf_counter()
        try:
            fn(cb)
            ok, message = True, ""
        except Exception as exc:  # report every failure, not only the first
            ok = False
            message = (f"{exc}" if isinstance(exc, AssertionError)
                       else "".join(traceback.format_exception(exc)))
        results[name] = {"ok": ok, "message": message,
                         "seconds": round(time.perf_counter() - t0, 2)}
        print(f"{'ok  ' if ok else 'FAIL'} {name} ({results[name]['seconds']} s) {message}",
              flush=True)
    return results


if __name__ == "__main__":
    args = sys.argv[1:]
    out = None
    if "--json" in args:
        i = args.index("--json")
        out = args[i + 1]
        del args[i:i + 2]
    unknown = sorted(set(args) - set(CHECKS))
    if unknown:
        raise SystemExit(f"unknown checks {unknown}; known: {sorted(CHECKS)}")
    res = run(args or list(CHECKS))
    if out:
        Path(out).write_text(json.dumps(res, indent=1))
    sys.exit(0 if all(r["ok"] for r in res.values()) else 1)
