"""Optimizers (cnn.optim): every optimizer equal to its Keras counterpart from transferred
weights over several steps, on every CPU path; the primitives against their formulas; slice-wise
updates against whole-array formulas; state that persists across fit calls; validation.

References are independent of the code under test: Keras 3 (``train_on_batch`` from the same
weights, with the same hyper-parameters and schedule), formulas evaluated in float64 here, or
updates worked out by hand. CUDA: ``tests/cuda_sim_checks.py`` (simulator) and
``tests/test_cuda_ptx.py`` (every kernel, the optimizer primitives included, compiles).
MPI: ``tests/test_mpi.py`` (Adam, AdamW with a cosine schedule and RMSProp over two ranks
against the sequential path).

Tolerance (float32): ``assert_close(a, ref, rel)`` = every entry within ``rel * max|ref|``.
"""
from __future__ import annotations

import math

import numpy as np
import pytest

from cnn import build_model
from cnn.backends import get_backend
from cnn.optim import (SGD, Adam, AdamW, OptimizerState, RMSProp, make_optimizer,
                       optimizer_names)
from cnn.train import fit

NP = get_backend("numpy")
SPEC = {"input_shape": [1, 6, 6], "layers": [
    {"type": "conv2d", "filters": 3, "kernel_size": 3, "activation": "relu"},
    {"type": "flatten"}, {"type": "dense", "units": 3}]}
STEPS, BATCH = 3, 8

#: (id, spec): every optimizer and option, one with a schedule and one with weight decay
OPTIMIZERS = [
    ("sgd", {"type": "sgd", "lr": 0.1}),
    ("sgd_momentum", {"type": "sgd", "lr": 0.1, "momentum": 0.9}),
    ("sgd_nesterov", {"type": "sgd", "lr": 0.1, "momentum": 0.9, "nesterov": True}),
    ("sgd_wd_cosine", {"type": "sgd", "lr": 0.1, "momentum": 0.5, "weight_decay": 0.05,
                       "schedule": {"type": "cosine", "decay_steps": 4, "alpha": 0.1}}),
    ("rmsprop", {"type": "rmsprop", "lr": 0.01}),
    ("rmsprop_momentum_centered", {"type": "rmsprop", "lr": 0.01, "rho": 0.8,
                                   "momentum": 0.5, "centered": True}),
    ("adam", {"type": "adam", "lr": 0.01}),
    ("adam_betas_step", {"type": "adam", "lr": 0.02, "beta_1": 0.5, "beta_2": 0.9,
                         "epsilon": 1e-4, "schedule": {"type": "step", "step_size": 2,
                                                       "factor": 0.5}}),
    ("adamw", {"type": "adamw", "lr": 0.01, "weight_decay": 0.1}),
]
#: (id, fit arguments): the CPU paths; average/hogwild with one worker are the sequential
#: algorithm (their own replica and slot handling, averaging every slot each step)
PATHS = [
    ("numpy", {"backend": "numpy"}),
    ("numba", {"backend": "numba"}),
    ("sync2", {"strategy": "sync", "threads": 2}),
    ("sync3_numba", {"strategy": "sync", "threads": 3, "backend": "numba"}),
    ("average1_every1", {"strategy": "average", "threads": 1,
                         "strategy_options": {"every": 1}}),
    ("hogwild1", {"strategy": "hogwild", "threads": 1}),
    ("processes2", {"strategy": "processes", "threads": 2}),
]


def assert_close(actual, reference, rel, what=""):
    reference = np.asarray(reference, dtype=np.float64)
    scale = float(np.abs(reference).max()) or 1.0
    np.testing.assert_allclose(np.asarray(actual, dtype=np.float64), reference, rtol=rel,
                               atol=rel * scale, err_msg=what)


def data(n=STEPS * BATCH, seed=3):
    rng = np.random.default_rng(seed)
    return rng.standard_normal((n, 1, 6, 6)).astype(np.float32), rng.integers(0, 3, n)


# ---- Keras reference ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def keras_after():
    """``{id: weights}``: the Keras copy of the model after STEPS train_on_batch calls."""
    pytest.importorskip("tensorflow")
    from cnn.reference.keras import (build_keras_model, compile_keras_model, configure_threads,
                                     get_keras_weights, to_keras_images)
    configure_threads(1)
    x, y = data()
    out = {}
    for name, spec in OPTIMIZERS:
        model = build_model(SPEC, seed=5)
        kmodel = build_keras_model(model)
        compile_keras_model(kmodel, model, spec)
        for i in range(STEPS):
            sl = slice(i * BATCH, (i + 1) * BATCH)
            kmodel.train_on_batch(to_keras_images(x[sl]), y[sl])
        out[name] = get_keras_weights(kmodel, model)
    return out


@pytest.mark.parametrize("path", [p for _, p in PATHS], ids=[i for i, _ in PATHS])
@pytest.mark.parametrize("name, spec", OPTIMIZERS, ids=[i for i, _ in OPTIMIZERS])
def test_optimizer_equals_keras_on_every_cpu_path(keras_after, name, spec, path):
    x, y = data()
    model = build_model(SPEC, seed=5)
    fit(model, x, y, epochs=1, batch_size=BATCH, optimizer=spec, shuffle=False, verbose=0,
        **path)
    assert model.optimizer_state.step == STEPS
    for k, v in model.params.items():
        assert_close(v, keras_after[name][k], 2e-5, f"{name}: {k} after {STEPS} steps")


def test_keras_optimizer_counterparts():
    keras = pytest.importorskip("keras")
    assert isinstance(make_optimizer({"type": "adamw"}).keras(), keras.optimizers.AdamW)
    k = make_optimizer({"type": "rmsprop", "rho": 0.8, "centered": True}).keras()
    assert isinstance(k, keras.optimizers.RMSprop) and k.centered and k.rho == 0.8


# ---- the formulas by hand ----------------------------------------------------------------------
GRADS = [np.array([0.5, -1.0, 2.0, 1e-3]), np.array([-0.25, 0.5, 1.0, -1e-3]),
         np.array([1.0, 0.0, -3.0, 0.0])]
W0 = np.array([1.0, -2.0, 0.5, 0.25])


def _reference(spec):
    """The optimizer's published update rule, written out here in float64 over GRADS."""
    kind, lr = spec["type"], spec.get("lr")
    w = W0.copy()
    m = np.zeros_like(w)
    v = np.zeros_like(w)
    a = np.zeros_like(w)
    for t, g in enumerate(GRADS, 1):
        wd = spec.get("weight_decay", 0.004 if kind == "adamw" else 0.0)
        if spec.get("weight_decay_mode") == "coupled":  # an L2 penalty wd / 2 * |w|^2
            g = g + wd * w
        else:
            w = w - lr * wd * w
        if kind == "sgd":
            mu = spec.get("momentum", 0.0)
            m = mu * m - lr * g
            w = w + (mu * m - lr * g if spec.get("nesterov") else m)
        elif kind == "rmsprop":
            rho, mu, eps = spec.get("rho", 0.9), spec.get("momentum", 0.0), spec.get("epsilon", 1e-7)
            v = rho * v + (1 - rho) * g ** 2
            a = rho * a + (1 - rho) * g
            den = np.sqrt(v - (a ** 2 if spec.get("centered") else 0) + eps)
            m = mu * m + lr * g / den
            w = w - m
        else:
            b1, b2, eps = spec.get("beta_1", 0.9), spec.get("beta_2", 0.999), spec.get("epsilon", 1e-7)
            m = b1 * m + (1 - b1) * g
            v = b2 * v + (1 - b2) * g ** 2
            w = w - lr * math.sqrt(1 - b2 ** t) / (1 - b1 ** t) * m / (np.sqrt(v) + eps)
    return w


HAND = [{"type": "sgd", "lr": 0.1}, {"type": "sgd", "lr": 0.1, "momentum": 0.9},
        {"type": "sgd", "lr": 0.1, "momentum": 0.9, "nesterov": True},
        {"type": "sgd", "lr": 0.1, "weight_decay": 0.5},
        {"type": "rmsprop", "lr": 0.01}, {"type": "rmsprop", "lr": 0.01, "momentum": 0.9},
        {"type": "rmsprop", "lr": 0.01, "centered": True, "rho": 0.5},
        {"type": "adam", "lr": 0.01}, {"type": "adam", "lr": 0.1, "beta_1": 0.5, "epsilon": 1e-3},
        {"type": "adamw", "lr": 0.01}, {"type": "adamw", "lr": 0.01, "weight_decay": 0.3},
        {"type": "sgd", "lr": 0.1, "momentum": 0.9, "weight_decay": 0.5,
         "weight_decay_mode": "coupled"},
        {"type": "rmsprop", "lr": 0.01, "weight_decay": 0.5, "weight_decay_mode": "coupled"},
        {"type": "adam", "lr": 0.01, "weight_decay": 0.5, "weight_decay_mode": "coupled"}]


@pytest.mark.parametrize("backend", ["numpy", "naive", "numba"])
@pytest.mark.parametrize("spec", HAND, ids=lambda s: "-".join(f"{v}" for v in s.values()))
def test_three_updates_equal_the_published_rule(spec, backend):
    be = get_backend(backend)
    opt = make_optimizer(spec)
    params = {"w": W0.copy()}
    state = opt.init_state(params, be)
    for g in GRADS:
        opt.update(params, {"w": g.copy()}, state, be)  # coupled decay adds to the gradient
    assert state.step == 3 and state.optimizer == spec["type"]
    np.testing.assert_allclose(params["w"], _reference(spec), rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("backend", ["numpy", "naive", "numba"])
@pytest.mark.parametrize("momentum, nesterov", [(0.0, False), (0.9, False), (0.9, True)])
def test_coupled_weight_decay_equals_pytorch_sgd(backend, momentum, nesterov):
    """``weight_decay_mode="coupled"`` is PyTorch's ``SGD(weight_decay=...)`` (the ResNet
    paper's L2 decay): three steps from the same weights and gradients leave the same weights
    (PyTorch's ``v = m v + g + wd w; w -= lr v`` is our ``v' = m v' - lr (g + wd w); w += v'``
    with ``v' = -lr v`` at a constant learning rate)."""
    torch = pytest.importorskip("torch")
    be = get_backend(backend)
    lr, wd = 0.1, 0.05
    opt = SGD(lr=lr, momentum=momentum, nesterov=nesterov, weight_decay=wd,
              weight_decay_mode="coupled")
    params = {"w": W0.copy()}
    state = opt.init_state(params, be)
    tw = torch.tensor(W0.copy(), dtype=torch.float64, requires_grad=True)
    topt = torch.optim.SGD([tw], lr=lr, momentum=momentum, nesterov=nesterov, weight_decay=wd)
    for g in GRADS:
        opt.update(params, {"w": g.copy()}, state, be)
        tw.grad = torch.tensor(g, dtype=torch.float64)
        topt.step()
    np.testing.assert_allclose(params["w"], tw.detach().numpy(), rtol=1e-13, atol=1e-15)
    # the decoupled mode (Keras's) is a different update once momentum carries it
    dec = SGD(lr=lr, momentum=momentum, nesterov=nesterov, weight_decay=wd)
    p2 = {"w": W0.copy()}
    s2 = dec.init_state(p2, be)
    for g in GRADS:
        dec.update(p2, {"w": g.copy()}, s2, be)
    assert (np.abs(p2["w"] - params["w"]).max() > 1e-4) == bool(momentum)


def test_coupled_weight_decay_has_no_keras_optimizer():
    with pytest.raises(NotImplementedError, match="coupled"):
        SGD(lr=0.1, weight_decay=1e-4, weight_decay_mode="coupled").keras()


def test_sgd_momentum_by_hand():
    """Worked on paper: v1 = -0.05, v2 = -0.045 + 0.025 = -0.02, v3 = -0.018 - 0.1 = -0.118."""
    params, opt = {"w": np.array([1.0])}, SGD(lr=0.1, momentum=0.9)
    state = opt.init_state(params, NP)
    for g in (0.5, -0.25, 1.0):
        opt.update(params, {"w": np.array([g])}, state, NP)
    np.testing.assert_allclose(state.slots["velocity"]["w"], [-0.118], atol=1e-15)
    np.testing.assert_allclose(params["w"], [1.0 - 0.05 - 0.02 - 0.118], atol=1e-15)


def test_adam_first_step_moves_every_weight_by_lr():
    """With zero state, Adam's first step is ``lr * g / (|g| + eps / sqrt(1 - b2))`` ~ lr *
    sign(g): the bias correction makes it independent of the gradient's scale."""
    g = np.array([3.0, -1e-2, 50.0])
    params = {"w": np.zeros(3)}
    opt = Adam(lr=0.1)
    opt.update(params, {"w": g}, opt.init_state(params, NP), NP)
    np.testing.assert_allclose(params["w"], -0.1 * g / (np.abs(g) + 1e-7 / math.sqrt(0.001)),
                               rtol=1e-12)
    np.testing.assert_allclose(params["w"], -0.1 * np.sign(g), rtol=1e-3)


@pytest.mark.parametrize("backend", ["numpy", "naive", "numba"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_primitives_against_formulas(backend, dtype):
    be = get_backend(backend)
    rng = np.random.default_rng(0)
    y, x, num = (rng.standard_normal(20).astype(dtype) for _ in range(3))
    den = (rng.random(20) + 0.5).astype(dtype)
    c = (0.3 * rng.standard_normal(20)).astype(dtype)
    f = lambda a: a.astype(np.float64)  # noqa: E731
    tol = 1e-6 if dtype == np.float32 else 1e-14
    cases = [
        (lambda o: be.axpby(o, 0.9, x, -0.05), 0.9 * f(y) - 0.05 * f(x)),
        (lambda o: be.axpby(o, 1.0, x, 1.0), f(y) + f(x)),
        (lambda o: be.axpby(o, 2.0, x, -1.0), 2 * f(y) - f(x)),
        (lambda o: be.axpby(o, 1.0, o, -0.1), 0.9 * f(y)),
        (lambda o: be.axpby(o, 0.5, o, 0.25), 0.75 * f(y)),  # x is y, a != 1
        (lambda o: be.axpby_square(o, 0.99, x, 0.01), 0.99 * f(y) + 0.01 * f(x) ** 2),
        (lambda o: be.axpby_ratio(o, 1.0, -0.1, num, den, 1e-3, False),
         f(y) - 0.1 * f(num) / (np.sqrt(f(den)) + 1e-3)),
        (lambda o: be.axpby_ratio(o, 0.5, 0.2, num, den, 1e-3, True),
         0.5 * f(y) + 0.2 * f(num) / np.sqrt(f(den) + 1e-3)),
        (lambda o: be.axpby_ratio(o, 1.0, -0.1, num, den, 1e-3, True, c),
         f(y) - 0.1 * f(num) / np.sqrt(f(den) - f(c) ** 2 + 1e-3)),
    ]
    for i, (op, want) in enumerate(cases):
        out = y.copy()
        op(out)
        assert out.dtype == dtype, i
        np.testing.assert_allclose(out, want, rtol=tol, atol=tol, err_msg=f"case {i}")
    # views of one buffer: the aliasing check must see through them
    buf = y.copy()
    be.axpby(buf[:10], 0.5, buf.reshape(2, 10)[0], 1.0)
    np.testing.assert_allclose(buf[:10], 1.5 * f(y[:10]), rtol=tol)


# ---- slice-wise use (what sync, processes and MPI do) ---------------------------------------
@pytest.mark.parametrize("spec", [HAND[2], HAND[5], HAND[6], HAND[9]],
                         ids=["nesterov", "rmsprop_momentum", "rmsprop_centered", "adamw"])
def test_updating_slices_in_any_pieces_equals_the_whole_update(spec):
    """The documented recipe (cnn.optim): one lr and t per global step, update_step on pieces
    of the flat parameters, gradients and slots, the scalar step advanced once: equal to the
    published rule applied to whole arrays."""
    opt = make_optimizer(spec)
    params = {"a": np.tile(W0, 3).reshape(3, 4), "b": W0.copy()}  # 12 + 4 elements
    state = opt.init_state(params, NP)
    flat_p = {k: v.reshape(-1) for k, v in params.items()}
    flat_s = state.flat()
    rng = np.random.default_rng(1)
    for g in GRADS:
        grads = {"a": np.tile(g, 3), "b": g}
        lr, t = opt.learning_rate(state.step), state.step + 1
        for key in params:  # random cuts of each flat parameter, in a random order
            n = flat_p[key].size
            cuts = np.sort(rng.choice(np.arange(1, n), size=3, replace=False))
            pieces = [slice(a, b) for a, b in zip([0, *cuts], [*cuts, n])]
            for sl in rng.permutation(len(pieces)):
                sl = pieces[sl]
                opt.update_step(flat_p[key][sl], grads[key][sl],
                                {n_: flat_s[n_][key][sl] for n_ in flat_s}, lr, t, NP)
        state.step += 1
    want = _reference(spec)
    np.testing.assert_allclose(params["b"], want, rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(params["a"], np.tile(want, 3).reshape(3, 4), rtol=1e-12,
                               atol=1e-14)


def test_a_second_update_allocates_next_to_nothing():
    """The NumPy primitives reuse a per-thread scratch buffer: after the first update, an
    Adam step over 100k parameters allocates no array (tracemalloc sees NumPy's buffers)."""
    import tracemalloc
    params = {"w": np.ones(100_000, np.float32)}
    grads = {"w": np.full(100_000, 0.5, np.float32)}
    opt = Adam()
    state = opt.init_state(params, NP)
    opt.update(params, grads, state, NP)
    tracemalloc.start()
    try:
        opt.update(params, grads, state, NP)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 20_000, peak  # 400 kB per temporary array


def test_update_refuses_a_plain_dict_state():
    opt = Adam()
    with pytest.raises(TypeError, match="update_step"):
        opt.update({"w": W0.copy()}, {"w": GRADS[0]}, {"w": np.zeros(4)}, NP)


def test_average_averages_every_slot():
    """average, 2 replicas, every=1, Adam: after one step each replica has taken its own Adam
    step from the common start on its own batch; the weights AND m and v are then averaged
    (computed here from the published rule)."""
    x, y = data(16)
    model = build_model(SPEC, seed=5)
    start = model.get_weights()
    opt = Adam(lr=0.01)
    fit(model, x, y, epochs=1, batch_size=8, optimizer=opt, shuffle=False, verbose=0,
        strategy="average", threads=2, strategy_options={"every": 1})
    replicas = []
    for sl in (slice(0, 8), slice(8, 16)):
        ref = build_model(SPEC, seed=5)
        _, _, grads = ref.loss_and_grads(x[sl], y[sl])
        rep = {}
        for k, w in start.items():
            g = grads[k].astype(np.float64)
            m, v = 0.1 * g, 0.001 * g ** 2
            rep[k] = (w - 0.01 * math.sqrt(0.001) / 0.1 * m / (np.sqrt(v) + 1e-7), m, v)
        replicas.append(rep)
    state = model.optimizer_state
    assert state.step == 1
    for k in start:
        for i, (name, arr) in enumerate([("w", model.params[k]), ("m", state.slots["m"][k]),
                                         ("v", state.slots["v"][k])]):
            want = (replicas[0][k][i] + replicas[1][k][i]) / 2
            assert_close(arr, want, 1e-5, f"average of {name} for {k}")


def test_hogwild_keeps_per_worker_slots_and_one_step_count():
    x, y = data(64)
    model = build_model(SPEC, seed=5)
    h = fit(model, x, y, epochs=3, batch_size=8, optimizer={"type": "adam", "lr": 0.01},
            strategy="hogwild", threads=2, verbose=0)
    assert model.optimizer_state.step == 3 * 4  # 64 examples, 16 per global step
    assert h.history["loss"][-1] < h.history["loss"][0]


# ---- state across fit calls ---------------------------------------------------------------------
@pytest.mark.parametrize("spec", [{"type": "sgd", "lr": 0.05, "momentum": 0.9},
                                  {"type": "adam", "lr": 0.01},
                                  {"type": "rmsprop", "lr": 0.01, "momentum": 0.5,
                                   "schedule": {"type": "cosine", "decay_steps": 30}}],
                         ids=["sgd_momentum", "adam", "rmsprop_cosine"])
@pytest.mark.parametrize("strategy", ["sequential", "sync", "processes"])
def test_ten_plus_ten_steps_equal_twenty(spec, strategy):
    """Optimizer state (slots, step count, hence Adam's bias correction and the schedule)
    persists across fit calls, as in Keras and PyTorch."""
    x, y = data(80)  # 10 steps of 8 per epoch
    kw = dict(batch_size=8, optimizer=spec, shuffle=False, verbose=0, strategy=strategy,
              threads=1 if strategy == "sequential" else 2)
    once = build_model(SPEC, seed=2)
    fit(once, x, y, epochs=2, **kw)
    twice = build_model(SPEC, seed=2)
    fit(twice, x, y, epochs=1, **kw)
    assert twice.optimizer_state.step == 10
    fit(twice, x, y, epochs=1, **kw)
    assert twice.optimizer_state.step == once.optimizer_state.step == 20
    for k in once.params:
        np.testing.assert_allclose(twice.params[k], once.params[k], rtol=1e-6, atol=1e-7)
    # resetting the state (or fit(reset_optimizer=True)) makes the second fit start afresh
    fresh = build_model(SPEC, seed=2)
    fit(fresh, x, y, epochs=1, **kw)
    fresh.reset_optimizer_state()
    fit(fresh, x, y, epochs=1, **kw)
    other = build_model(SPEC, seed=2)
    fit(other, x, y, epochs=1, **kw)
    fit(other, x, y, epochs=1, reset_optimizer=True, **kw)
    assert fresh.optimizer_state.step == other.optimizer_state.step == 10
    diff = max(float(np.abs(fresh.params[k] - once.params[k]).max()) for k in once.params)
    assert diff > 1e-4
    for k in once.params:
        np.testing.assert_array_equal(fresh.params[k], other.params[k])


def test_another_optimizer_type_starts_fresh():
    x, y = data(40)
    model = build_model(SPEC, seed=2)
    fit(model, x, y, batch_size=8, optimizer={"type": "sgd", "momentum": 0.9}, verbose=0)
    assert model.optimizer_state.optimizer == "sgd" and model.optimizer_state.step == 5
    h = fit(model, x, y, batch_size=8, optimizer={"type": "adam"}, verbose=0)
    assert h.info["start_step"] == 0 and h.info["end_step"] == 5
    assert model.optimizer_state.optimizer == "adam" and model.optimizer_state.names == ("m", "v")


def test_global_step_keys_the_context_across_fits():
    """StepContext.step is the optimizer's step count, so it continues in a second fit."""
    from cnn.callbacks import Callback

    class Steps(Callback):
        def __init__(self):
            self.seen = []

        def on_step_end(self, step, logs):
            self.seen.append((logs["global_step"], self.run.strategy._ctx.step))

    x, y = data(16)
    model, probe = build_model(SPEC), Steps()
    fit(model, x, y, batch_size=8, verbose=0, callbacks=[probe])
    fit(model, x, y, batch_size=8, verbose=0, callbacks=[probe])
    assert probe.seen == [(1, 0), (2, 1), (3, 2), (4, 3)]


# ---- validation ---------------------------------------------------------------------------------
def test_numpy_numbers_are_accepted():
    opt = make_optimizer({"type": "adam", "lr": np.float32(0.1), "beta_1": np.float64(0.8)})
    assert opt.lr == pytest.approx(0.1) and isinstance(opt.lr, float)
    assert SGD(lr=np.float32(0.1), momentum=np.float16(0.5)).momentum == 0.5
    assert SGD(lr=1).lr == 1.0  # ints are numbers too


BAD = [
    ({"lr": float("inf")}, "lr=inf"), ({"lr": float("nan")}, "lr=nan"), ({"lr": 0}, "lr=0"),
    ({"lr": -0.1}, "lr=-0.1"), ({"lr": True}, "lr=True"), ({"lr": "0.1"}, "lr='0.1'"),
    ({"lr": None}, "lr=None"), ({"lr": 10 ** 400}, "lr=1000"), ({"momentum": 1.0}, "momentum=1.0"),
    ({"momentum": -0.1}, "momentum=-0.1"), ({"momentum": float("nan")}, "momentum=nan"),
    ({"nesterov": 1}, "nesterov=1"), ({"nesterov": True}, "momentum"),
    ({"weight_decay": -1e-4}, "weight_decay=-0.0001"),
    ({"weight_decay": float("inf")}, "weight_decay=inf"),
    ({"type": "adam", "beta_1": 1.0}, "beta_1=1.0"), ({"type": "adam", "beta_2": -0.5}, "beta_2=-0.5"),
    ({"type": "adamw", "epsilon": 0}, "epsilon=0"), ({"type": "adam", "epsilon": float("inf")}, "epsilon=inf"),
    ({"type": "rmsprop", "rho": 1.5}, "rho=1.5"), ({"type": "rmsprop", "centered": "yes"}, "centered='yes'"),
    ({"type": "rmsprop", "momentum": 2}, "momentum=2"),
    ({"type": "adam", "momentum": 0.9}, "'momentum' for optimizer 'adam'"),
    ({"type": "sgd", "lr": 0.1, "betas": 1}, "'betas'"),
    ({"type": "lion"}, "'lion'"), ({"type": 3}, "type 3"),
    ({"type": "sgd", "schedule": {"type": "bogus"}}, "'bogus'"),
    ({"type": "sgd", "lr": float("inf"), "schedule": "cosine"}, "lr=inf"),
    ({"weight_decay_mode": "l2"}, "weight_decay_mode='l2'"),
    ({"type": "adamw", "weight_decay_mode": "coupled"}, "'weight_decay_mode' for optimizer 'adamw'"),
]


@pytest.mark.parametrize("spec, match", BAD, ids=[m for _, m in BAD])
def test_bad_hyper_parameters_are_refused_naming_them(spec, match):
    with pytest.raises(ValueError, match=match.replace("(", r"\(").replace("+", r"\+")):
        make_optimizer({"type": "sgd", **spec})


def test_bad_optimizer_is_refused_before_training():
    x, y = data(16)
    model = build_model(SPEC)
    w0 = model.get_weights()
    with pytest.raises(ValueError, match="lr=inf"):
        fit(model, x, y, optimizer={"type": "adam", "lr": float("inf")}, verbose=0)
    for k, v in w0.items():
        np.testing.assert_array_equal(model.params[k], v)
    assert model.optimizer_state is None


def test_config_round_trips():
    for spec in [s for _, s in OPTIMIZERS] + HAND:
        opt = make_optimizer(spec)
        again = make_optimizer(opt.config())
        assert again.config() == opt.config() and type(again) is type(opt)
    assert optimizer_names() == ["sgd", "rmsprop", "adam", "adamw"]
    assert isinstance(make_optimizer(None), SGD) and isinstance(make_optimizer({"type": "AdamW"}), AdamW)
    assert isinstance(make_optimizer({"type": "rmsprop"}), RMSProp)


def test_state_helpers():
    params = {"w": np.ones((2, 3), np.float32)}
    opt = Adam()
    st = opt.init_state(params, NP)
    assert st.nbytes == 2 * 24 and st.of("w").keys() == {"m", "v"}
    cp = st.copy()
    cp.slots["m"]["w"][...] = 1
    assert not st.slots["m"]["w"].any()
    with pytest.raises(ValueError, match="step=-1"):
        OptimizerState({}, -1)
    assert opt.accepts(st, params) and not SGD(momentum=0.9).accepts(st, params)
    assert not opt.accepts(st, {"w": np.ones((3, 2), np.float32)})


def test_fit_keras_follows_fit_with_adam_and_a_cosine_to_the_end():
    """fit_keras resolves a schedule's horizon as fit does (a cosine without decay_steps ends
    with the fit): two epochs of Adam + cosine reach the same weights on both."""
    pytest.importorskip("tensorflow")
    from cnn.reference.keras import configure_threads, fit_keras
    configure_threads(1)
    x, y = data(40)
    kw = dict(epochs=2, batch_size=8, optimizer={"type": "adam", "lr": 0.01,
                                                  "schedule": "cosine"}, seed=4, verbose=0)
    ours, theirs = build_model(SPEC, seed=6), build_model(SPEC, seed=6)
    h = fit(ours, x, y, **kw)
    hk = fit_keras(theirs, x, y, threads=1, **kw)
    np.testing.assert_allclose(hk.history["lr"], h.history["lr"], rtol=1e-12)
    for k, v in ours.params.items():
        assert_close(theirs.params[k], v, 1e-4, k)
