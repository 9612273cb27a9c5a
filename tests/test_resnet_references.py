"""Residual networks against Keras (functional API) and PyTorch models built from the same spec
with transferred weights (issue 20): logits, loss and every gradient of one batch, in training
and inference mode, float32 and float64, for the test ResNet of tests/parallel_helpers.py (both
shortcut options, a nested block, batch norm everywhere) and for ``cifar_resnet20`` itself; and
20-step trajectories of SGD with momentum and the paper's coupled weight decay on every CPU
path, from the same weights and batches.

The conventions follow the paper and its Torch code, and both references are built to match
(see docs/resnet.md): explicit symmetric padding (Keras: ``ZeroPadding2D``), batch norm momentum
0.875 ours and Keras's = 0.125 PyTorch's, epsilon 1e-5, weight decay coupled on every parameter
(PyTorch: ``SGD(weight_decay=...)``; Keras: an L2 penalty on every weight, as
``cnn.reference.keras.compile_keras_model`` adds it). PyTorch's running variance takes the
unbiased batch variance, so its running variances are compared through that factor.

Tolerances: ``assert_close(a, ref, rel)`` = every entry within ``rel * max|ref|``. One batch:
float64 1e-10, float32 1e-4 (gradients) and 1e-5 (logits, loss). Trajectories (float64): 1e-9
against the references; ``sync``, processes and MPI against the sequential path 1e-12 (absolute:
the same sums in another order).
"""
from __future__ import annotations

import numpy as np
import pytest

from cnn.context import StepContext
from cnn.model import build_model
from cnn.parallel.sync import shard_bounds
from cnn.train import fit
from parallel_helpers import RESNET_OPT, blobs, build, max_abs_diff, run_mpi_checks
from parallel_helpers import train as train_helper

STEPS, BATCH = 20, 8
TOL = {np.float64: {"logits": 1e-10, "grads": 1e-10}, np.float32: {"logits": 1e-5, "grads": 1e-4}}
TRAJECTORY = 1e-9


def assert_close(actual, ref, rel, what=""):
    ref = np.asarray(ref, dtype=np.float64)
    np.testing.assert_allclose(np.asarray(actual, dtype=np.float64), ref, rtol=rel,
                               atol=rel * max(float(np.abs(ref).max()), 1e-300), err_msg=what)


def batch(model, n=6, seed=4):
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((n, *model.input_shape)).astype(model.dtype),
            rng.integers(0, model.num_classes, n))


def moved_statistics(model, seed=5):
    """Running statistics and affine parameters away from their initial values, so inference
    mode tests them."""
    rng = np.random.default_rng(seed)
    for k, v in model.buffers.items():
        v[...] = rng.uniform(0.5, 2, v.shape) if k.endswith("var") else rng.standard_normal(v.shape)
    for k, v in model.params.items():
        if k.endswith((".gamma", ".beta")):
            v[...] = rng.uniform(0.5, 1.5, v.shape)


def ours(model, x, y, training):
    loss, _, grads = model.loss_and_grads(x, y, ctx=StepContext(training=training))
    return float(loss), model.predict_logits(x) if not training else None, grads


CASES = [("resnet", np.float64), ("resnet", np.float32), ("cifar_resnet20", np.float64)]
IDS = ["resnet-float64", "resnet-float32", "cifar_resnet20-float64"]


def make(name, dtype):
    model = (build("resnet", dtype=dtype) if name == "resnet"
             else build_model(name, dtype=dtype, seed=1))
    moved_statistics(model)
    return model


# ---- one batch: Keras ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def keras_ready():
    pytest.importorskip("tensorflow")
    from cnn.reference.keras import configure_threads
    configure_threads(1)


@pytest.mark.parametrize("training", [True, False], ids=["training", "inference"])
@pytest.mark.parametrize("name, dtype", CASES, ids=IDS)
def test_one_batch_equals_keras(keras_ready, name, dtype, training):
    from cnn.reference.keras import (build_keras_model, get_keras_weights, keras_loss_and_grads,
                                     to_keras_images)
    model = make(name, dtype)
    kmodel = build_keras_model(model)
    back = get_keras_weights(kmodel, model)
    for k, v in model.get_weights().items():  # the transfer is exact both ways
        assert np.array_equal(back[k], v), k
    x, y = batch(model, 2 if name == "cifar_resnet20" else 6)
    tol = TOL[dtype]
    assert_close(kmodel(to_keras_images(x), training=False).numpy(), model.predict_logits(x),
                 tol["logits"], "inference logits")
    loss, _, grads = ours(model, x, y, training)
    kloss, _, kgrads = keras_loss_and_grads(kmodel, model, x, y, training=training)
    assert_close(kloss, loss, tol["logits"], "loss")
    assert kgrads.keys() == grads.keys() == model.params.keys()
    scale = max(float(np.abs(g).max()) for g in grads.values())  # conv biases before batch
    for k in grads:  # norm have a zero gradient: their floor is the model's scale
        np.testing.assert_allclose(kgrads[k], grads[k], rtol=tol["grads"],
                                   atol=tol["grads"] * scale, err_msg=k)


# ---- one batch: PyTorch -------------------------------------------------------------------------
@pytest.fixture(scope="module")
def torch():
    torch = pytest.importorskip("torch")
    torch.set_num_threads(1)
    return torch


@pytest.mark.parametrize("training", [True, False], ids=["training", "inference"])
@pytest.mark.parametrize("name, dtype", CASES, ids=IDS)
def test_one_batch_equals_pytorch(torch, name, dtype, training):
    from cnn.reference.torch import build_torch_model, get_torch_weights, torch_grads
    model = make(name, dtype)
    tmodel = build_torch_model(model)
    back = get_torch_weights(tmodel, model)
    for k, v in model.get_weights().items():
        assert np.array_equal(back[k], v), k
    x, y = batch(model, 2 if name == "cifar_resnet20" else 6)
    tol = TOL[dtype]
    tmodel.eval()
    with torch.no_grad():
        assert_close(tmodel(torch.from_numpy(x)).numpy(), model.predict_logits(x),
                     tol["logits"], "inference logits")
    tmodel.train(training)
    tloss = torch.nn.functional.cross_entropy(tmodel(torch.from_numpy(x)), torch.from_numpy(y))
    tloss.backward()
    loss, _, grads = ours(model, x, y, training)
    assert_close(tloss.item(), loss, tol["logits"], "loss")
    tgrads = torch_grads(tmodel, model)
    assert tgrads.keys() == grads.keys()
    scale = max(float(np.abs(g).max()) for g in grads.values())
    for k in grads:
        np.testing.assert_allclose(tgrads[k], grads[k], rtol=tol["grads"],
                                   atol=tol["grads"] * scale, err_msg=k)


# ---- 20 steps on every CPU path ------------------------------------------------------------------
def data():
    return blobs(STEPS * BATCH, np.float64, channels=3)


#: (id, fit arguments): the CPU paths that run the sequential algorithm on this model
PATHS = [
    ("sequential", {}),
    ("numba", {"backend": "numba"}),
    ("sync2", {"strategy": "sync", "threads": 2}),
    ("sync3_numba", {"strategy": "sync", "threads": 3, "backend": "numba"}),
    ("processes2", {"strategy": "processes", "threads": 2}),
    ("average1", {"strategy": "average", "threads": 1, "strategy_options": {"every": 1}}),
    ("hogwild1", {"strategy": "hogwild", "threads": 1}),
]
#: the paths that must equal the sequential one to rounding (1e-12): the same algorithm
SAME_SUMS = ("sync2", "sync3_numba", "processes2", "average1", "hogwild1")


def train(**path):
    x, y = data()
    model = build("resnet")
    fit(model, x, y, epochs=1, batch_size=BATCH, optimizer=RESNET_OPT, shuffle=False, verbose=0,
        seed=5, **path)
    assert model.optimizer_state.step == STEPS
    return model.get_weights()


@pytest.fixture(scope="module")
def trajectories():
    return {name: train(**path) for name, path in PATHS}


def torch_trajectory(torch, micro_batches=1):
    """20 steps of PyTorch's SGD (momentum, coupled weight decay) on the torch copy of the test
    ResNet, the batches in order; each batch's gradient summed over ``micro_batches`` shards
    (each shard's mean loss times its share, its own batch statistics). Weights, in our keys."""
    from cnn.reference.torch import build_torch_model, get_torch_weights
    x, y = data()
    model = build("resnet")
    tmodel = build_torch_model(model)
    tmodel.train()
    opt = torch.optim.SGD(tmodel.parameters(), lr=RESNET_OPT["lr"],
                          momentum=RESNET_OPT["momentum"], weight_decay=RESNET_OPT["weight_decay"])
    for step in range(STEPS):
        xb = torch.from_numpy(x[step * BATCH:(step + 1) * BATCH])
        yb = torch.from_numpy(y[step * BATCH:(step + 1) * BATCH])
        opt.zero_grad()
        for lo, hi in shard_bounds(BATCH, micro_batches):
            loss = torch.nn.functional.cross_entropy(tmodel(xb[lo:hi]), yb[lo:hi])
            (loss * ((hi - lo) / BATCH)).backward()
        opt.step()
    return get_torch_weights(tmodel, model)


def check_against_torch(got, ref, buffers=True, what=""):
    """Parameters and running means within TRAJECTORY of the weights' scale (the nested
    block's conv bias feeds batch norm: its gradient is 0, it stays at rounding noise); PyTorch's
    running variances are the unbiased ones: ``r_torch - m^k = L / (L - 1) (r_ours - m^k)``
    after k updates from 1, with ``m`` our momentum and ``L`` the values each update's
    statistics were taken over."""
    scale = max(float(np.abs(v).max()) for v in ref.values())
    for k, v in ref.items():
        if k.endswith("running_var"):
            if not buffers:
                continue
            owner = k.rsplit(".", 1)[0]
            layer = next(leaf for leaf in build("resnet").leaves if leaf.name == owner)
            c, h, w = layer.input_shape
            count = BATCH * h * w
            start = layer.momentum ** STEPS
            v = start + (v - start) * (count - 1) / count
        elif k.endswith("running_mean") and not buffers:
            continue
        np.testing.assert_allclose(got[k], v, rtol=TRAJECTORY, atol=TRAJECTORY * scale,
                                   err_msg=f"{what}: {k} after {STEPS} steps")


@pytest.mark.parametrize("path", [name for name, _ in PATHS])
def test_twenty_steps_equal_pytorch_on_every_path(torch, trajectories, path):
    got = trajectories[path]
    check_against_torch(got, torch_trajectory(torch), what=path)
    if path in SAME_SUMS:
        assert max_abs_diff(got, trajectories["sequential"]) < 1e-12, path


def test_twenty_steps_equal_keras(keras_ready, trajectories):
    from cnn.reference.keras import (build_keras_model, compile_keras_model, get_keras_weights,
                                     to_keras_images)
    x, y = data()
    model = build("resnet")
    kmodel = build_keras_model(model)
    compile_keras_model(kmodel, model, RESNET_OPT)
    for step in range(STEPS):
        sl = slice(step * BATCH, (step + 1) * BATCH)
        kmodel.train_on_batch(to_keras_images(x[sl]), y[sl])
    got = trajectories["sequential"]
    ref = get_keras_weights(kmodel, model)
    scale = max(float(np.abs(v).max()) for v in ref.values())
    for k, v in ref.items():
        np.testing.assert_allclose(got[k], v, rtol=TRAJECTORY, atol=TRAJECTORY * scale,
                                   err_msg=f"{k} after {STEPS} steps")


def test_accumulation_equals_pytorchs_accumulated_micro_batches(torch):
    """``accumulate``: each micro-batch normalised with its own statistics ("ghost" batch norm,
    see cnn.parallel.accumulate), gradients summed, one update: PyTorch accumulating ``.grad``
    over the same micro-batches. (Running statistics differ by design: ours keep the last
    micro-batch's update of each step, PyTorch applies every micro-batch's.)"""
    got = train(strategy="accumulate", threads=2)
    check_against_torch(got, torch_trajectory(torch, micro_batches=2), buffers=False,
                        what="accumulate")


def test_average_over_two_threads_is_local_sgd_in_pytorch(torch):
    """``average`` over two threads, every 2 steps: two PyTorch replicas, each taking its SGD
    step on its half of every global batch of ``2 * BATCH`` examples with its own batch
    statistics, their weights and momentum buffers averaged every second step (equal shards:
    equal weights). The weights only (PyTorch's running variances are unbiased)."""
    from cnn.reference.torch import build_torch_model, get_torch_weights
    x, y = data()
    model = build("resnet")
    fit(model, x, y, epochs=1, batch_size=BATCH, optimizer=RESNET_OPT, shuffle=False, verbose=0,
        seed=5, strategy="average", threads=2, strategy_options={"every": 2})
    reps = [build_torch_model(build("resnet")) for _ in range(2)]
    opts = [torch.optim.SGD(r.parameters(), lr=RESNET_OPT["lr"], momentum=RESNET_OPT["momentum"],
                            weight_decay=RESNET_OPT["weight_decay"]) for r in reps]
    for step in range(STEPS // 2):
        for r, (rep, opt) in enumerate(zip(reps, opts)):
            rep.train()
            lo = (2 * step + r) * BATCH
            opt.zero_grad()
            torch.nn.functional.cross_entropy(rep(torch.from_numpy(x[lo:lo + BATCH])),
                                              torch.from_numpy(y[lo:lo + BATCH])).backward()
            opt.step()
        if step % 2 == 1:
            with torch.no_grad():
                for a, b in zip(reps[0].parameters(), reps[1].parameters()):
                    mean = (a + b) / 2
                    a.copy_(mean)
                    b.copy_(mean)
                    va, vb = opts[0].state[a]["momentum_buffer"], opts[1].state[b]["momentum_buffer"]
                    vmean = (va + vb) / 2
                    va.copy_(vmean)
                    vb.copy_(vmean)
    check_against_torch(model.params, get_torch_weights(reps[0], model), buffers=False,
                        what="average")


def test_hogwild_over_two_threads_trains_the_resnet():
    """Lock-free updates race by design (no reference to equal): it runs, stays finite and
    lowers the loss."""
    x, y = data()
    model = build("resnet")
    hist = fit(model, x, y, epochs=3, batch_size=BATCH, optimizer=RESNET_OPT, verbose=0, seed=5,
               strategy="hogwild", threads=2)
    assert all(np.isfinite(v).all() for v in model.get_weights().values())
    assert hist.history["loss"][-1] < hist.history["loss"][0]


# ---- MPI ranks -----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def mpi_runs(tmp_path_factory):
    """The scenarios of ``mpi_checks.RESNET_SCENARIOS``, trained under ``mpiexec -n 2``."""
    return run_mpi_checks("resnet", tmp_path_factory.mktemp("mpi_resnet"))


def _load(out, name, rank):
    with np.load(out / f"{name}.rank{rank}.npz") as f:
        return {k: f[k] for k in f.files}


@pytest.mark.parametrize("name", ["resnet", "resnet_uneven", "resnet_average"])
def test_two_mpi_ranks_equal_the_threads_and_sequential_paths(mpi_runs, name):
    """``mpi`` over two ranks equals the sequential path (batch norm synchronised inside the
    blocks, a ghost rank on a one-example step); ``mpi_average`` equals ``average`` over two
    threads (the same local SGD over another transport). Both ranks end alike."""
    from mpi_checks import RESNET_SCENARIOS
    strategy, kwargs = RESNET_SCENARIOS[name]
    got = _load(mpi_runs, name, 0)
    other = _load(mpi_runs, name, 1)
    assert all(np.array_equal(got[k], other[k]) for k in got)
    if strategy == "mpi":
        ref, _ = train_helper("sequential", **kwargs)
    else:
        ref, _ = train_helper("average", 2, **kwargs)
    assert got.keys() == ref.keys()
    assert max_abs_diff(got, ref) < 1e-12
