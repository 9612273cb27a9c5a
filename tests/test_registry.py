"""The registries are the one source of truth: what the study's grid, runs, estimates and
analysis, the CLI and the strategies decide about a path, a strategy, a backend or an
optimizer, they read from its :class:`~cnn.paths.TrainingPath` entry, its strategy record
(:data:`cnn.paths.STRATEGIES`), its backend record (:mod:`cnn.backends.registry`) or its
:class:`~cnn.optim.Optimizer` class. Shown here with throwaway entries added through the
public registration functions only, which every consumer then knows without any other
change."""
from __future__ import annotations

import ast
import json
import sys
from dataclasses import fields, replace
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest

from cnn import cli
from cnn import paths as P
from cnn.analysis.numbers import communication
from cnn.backends.numpy import NumpyBackend
from cnn.backends.registry import BACKENDS, BackendInfo, register_backend
from cnn.data import make_blobs_images
from cnn.model import Sequential
from cnn.optim import OPTIMIZERS, Optimizer, make_optimizer, register_optimizer
from cnn.parallel import (SequentialStrategy, make_strategy, mpi_strategies, strategy_names,
                          strategy_options)
from cnn.results import CONFIG_FIELDS
from cnn.study import estimate_seconds, expand_grid
from cnn.study.child import execute_run
from cnn.study.equivalence import sequential_variants
from cnn.study.estimate import DATASET_OVERHEAD, START_OVERHEAD
from cnn.study.grid import run_optimizer
from cnn.study.run import Run

ROOT = Path(__file__).resolve().parents[1]
TINY = {"dataset": "blobs", "model": "mnist_small", "train_size": 64, "test_size": 32,
        "batch_size": 32, "epochs": 2}


@pytest.fixture
def registered():
    """Register throwaway entries through the public functions; remove them afterwards."""
    added = []

    def add(kind, thing, name=None):
        if kind == "path":
            P.register_path(thing)
            added.append((P.PATHS, thing.name))
        elif kind == "backend":
            register_backend(name, thing)
            added.append((BACKENDS, name))
        elif kind == "strategy":
            P.register_strategy(name, thing)
            added.append((P.STRATEGIES, name))
        elif kind == "algorithm":
            P.register_algorithm(thing)
            added.append((P.ALGORITHMS, thing.name))
        else:
            register_optimizer(thing)
            added.append((OPTIMIZERS, thing.type))
        return thing
    yield add
    for table, name in added:
        table.pop(name, None)


def _fake_path(name, **facts):
    return P.TrainingPath(name, f"a throwaway path ({name})", strategies=("sync",),
                          backends=("numpy",), workers="fake workers", scales=True, **facts)


# ---- paths ---------------------------------------------------------------------------------------
def test_a_registered_path_is_known_to_grid_estimate_equivalence_and_analysis(registered):
    registered("path", _fake_path("fake", overhead=7.0, speed_guess=2.0, communicates=True,
                                  sequential_algorithm=True, optimizers=("sgd",)))
    registered("path", _fake_path("plain"))  # no overhead, as fast as sequential
    runs = {r.path: r for r in expand_grid({**TINY, "path": ["fake", "plain"], "threads": 2})}
    assert set(runs) == {"fake", "plain"} and runs["fake"].entry is P.PATHS["fake"]
    # the estimate: the entry's overhead on top of the interpreter's, its speed guess dividing
    # the time of the epochs (no data-set overhead for blobs, nothing compiled on numpy)
    fake, plain = estimate_seconds([runs["fake"], runs["plain"]])
    assert DATASET_OVERHEAD.get("blobs", 0.0) == 0.0
    assert fake - START_OVERHEAD - 7.0 == pytest.approx((plain - START_OVERHEAD) / 2)
    # the optimizers its trainer runs
    with pytest.raises(ValueError, match="path 'fake' trains plain SGD with a constant rate"):
        expand_grid({**TINY, "path": "fake", "optimizer": "adam"})
    # the equivalence table compares it with the sequential path; the other is not the
    # sequential algorithm
    assert ("fake", "sync", "numpy", 2) in sequential_variants()
    assert not [v for v in sequential_variants() if v[0] == "plain"]
    # the report's communication table takes the paths that communicate
    t = pd.DataFrame({"path": ["fake", "plain"], "p": [2.0, 2.0], "problem": ["x", "x"],
                      "label": ["fake ×2", "plain ×2"], "batch_size": [32, 32],
                      "filters": [8, 8], "threads": [2, 2], "compute_per_epoch": [3.0, 3.0],
                      "comm_per_epoch": [1.0, 1.0]})
    assert [r["label"] for r in communication(t)] == ["fake ×2"]


def test_a_path_names_known_strategies_and_cannot_be_registered_twice(registered):
    with pytest.raises(ValueError, match="strategy 'gossip' is not one of"):
        P.TrainingPath("gossip", "x", strategies=("gossip",))
    registered("path", _fake_path("once"))
    with pytest.raises(ValueError, match="path 'once' is already registered"):
        P.register_path(_fake_path("once"))


def test_time_to_accuracy_runs_on_every_trainer():
    """Keras's reference has a step hook too (cnn.reference.keras.fit_keras(callbacks=)):
    a target expands on its path as on ours and PyTorch's."""
    for path in ("keras", "torch", "sequential"):
        (run,) = expand_grid({**TINY, "path": path, "target": 0.5}, include_unavailable=True)
        assert run.target == 0.5 and run.eval_every > 0


def test_what_a_strategy_computes_decides_the_steps_between_evaluations():
    # about 10 evaluations an epoch: sync splits each batch of 8 between its 2 workers, so an
    # epoch of 640 examples has 80 steps (an evaluation every 8); average's workers take a
    # whole batch each per step: 640 / (8 * 2) = 40 steps (every 4)
    grid = {**TINY, "train_size": 640, "batch_size": 8, "path": "threads", "threads": 2,
            "target": 0.5, "val_size": 64}
    every = {r.strategy: r.eval_every for r in expand_grid({**grid,
                                                           "strategy": ["sync", "average"]})}
    assert every == {"sync": 8, "average": 4}


# ---- strategies ----------------------------------------------------------------------------------
class TwiceStrategy(SequentialStrategy):
    """A throwaway strategy, found through its record (this module and this class name): two
    sequential updates on every batch."""

    name = "twice"

    def __init__(self, threads: int = 1, times: int = 2):
        super().__init__(threads)
        self.times = times

    def step(self, xb, yb):
        for _ in range(self.times - 1):
            super().step(xb, yb)
        return super().step(xb, yb)


def _register_twice(registered):
    registered("strategy", P.StrategyInfo(__name__, "TwiceStrategy"), name="twice")


def test_a_registered_strategy_is_made_by_name_listed_and_trains_like_its_formula(registered,
                                                                                 capsys):
    """Its record alone makes it known to make_strategy, fit and the CLI; one epoch of one
    batch of all 8 examples is two SGD steps on that batch, written out here."""
    _register_twice(registered)
    assert "twice" in strategy_names() and "twice" not in mpi_strategies()
    assert type(make_strategy("twice")) is TwiceStrategy
    assert strategy_options("twice") == ["times"]
    with pytest.raises(SystemExit):
        cli.main(["train", "--help"])
    assert "accumulate | twice" in " ".join(capsys.readouterr().out.split())
    x, y = make_blobs_images(8, classes=10, size=4, seed=5, dtype=np.float64)
    model = Sequential.from_spec([{"type": "flatten"}, {"type": "dense", "units": 10}],
                                 input_shape=(1, 4, 4), dtype=np.float64, seed=0)
    w, b = model.params["dense.w"].copy(), model.params["dense.b"].copy()
    flat, onehot = x.reshape(len(x), -1), np.eye(10)[y]
    for _ in range(2):
        z = flat @ w + b
        p = np.exp(z - z.max(axis=1, keepdims=True))
        p /= p.sum(axis=1, keepdims=True)
        dz = (p - onehot) / len(x)
        w, b = w - 0.1 * (flat.T @ dz), b - 0.1 * dz.sum(axis=0)
    model.fit(x, y, epochs=1, batch_size=8, verbose=0, strategy="twice",
              optimizer={"type": "sgd", "lr": 0.1})
    np.testing.assert_allclose(model.params["dense.w"], w, rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(model.params["dense.b"], b, rtol=1e-12, atol=1e-14)


def test_a_path_over_a_registered_strategy_runs_in_the_study(registered):
    """A new strategy and its path: the strategy's record, what it computes and the path's
    entry, and nothing else, take it from the grid to a trained run."""
    _register_twice(registered)
    registered("algorithm", P.Algorithm("twice"))
    registered("path", P.TrainingPath("twice", "two updates per batch", strategies=("twice",),
                                      cores="one"))
    run = expand_grid({**TINY, "path": "twice"})[0]
    assert (run.entry, run.strategy, run.variant) == (P.PATHS["twice"], "twice", "twice")
    assert run.entry.fit_arguments(run) == {"strategy": "twice", "threads": 1}
    result = execute_run(run)
    assert [e["epoch"] for e in result["epochs"]] == [1, 2]
    assert all(np.isfinite(e["train_loss"]) for e in result["epochs"])


def test_strategy_records_are_checked(registered):
    with pytest.raises(ValueError, match="unknown strategy 'gossip'; choose one of"):
        make_strategy("gossip")
    with pytest.raises(ValueError, match="fit strategy 'gossip' is not one of"):
        P.TrainingPath("gossip", "x", strategies=("sync",), fit_strategy={"sync": "gossip"})
    with pytest.raises(ValueError, match="names the module and class"):
        P.register_strategy("gossip", P.StrategyInfo("", "Gossip"))
    with pytest.raises(ValueError, match="strategy 'sync' is already registered"):
        P.register_strategy("sync", P.StrategyInfo("cnn.parallel.threads", "SyncThreads"))
    with pytest.raises(ValueError, match="algorithm 'sync' is already registered"):
        P.register_algorithm(P.Algorithm("sync"))
    with pytest.raises(TypeError, match="a strategy's record is a StrategyInfo; received "
                                        "BackendInfo"):
        P.register_strategy("gossip", BackendInfo("cnn.parallel.threads", "SyncThreads"))
    with pytest.raises(TypeError, match="a backend's record is a BackendInfo; received "
                                        "StrategyInfo"):
        register_backend("gossip", P.StrategyInfo("cnn.backends.numpy", "NumpyBackend"))
    with pytest.raises(ValueError, match="backend 'numpy' is already registered"):
        register_backend("numpy", BackendInfo("cnn.backends.numpy", "NumpyBackend"))
    assert "gossip" not in P.STRATEGIES and "gossip" not in BACKENDS


def test_the_mpi_strategies_are_those_whose_record_says_so(registered):
    assert mpi_strategies() == ["mpi", "mpi_average"]
    registered("strategy", P.StrategyInfo("cnn.parallel.mpi", "MPISync", mpi_ranks=True),
               name="mpi_again")
    assert mpi_strategies() == ["mpi", "mpi_average", "mpi_again"]
    from cnn.parallel.launch import maybe_launch
    args = SimpleNamespace(ranks=2, hostfile=None, strategy="sync", threads=1)
    with pytest.raises(ValueError, match="--strategy mpi or mpi_average or mpi_again"):
        maybe_launch(args, [])


# ---- backends ------------------------------------------------------------------------------------
class _Stand(NumpyBackend):
    """The NumPy ops under a name whose record the tests register."""


def test_a_registered_backend_s_facts_reach_the_estimate_and_the_strategies(registered):
    registered("backend", BackendInfo("cnn.backends.numpy", "NumpyBackend", jit=True,
                                      cold_compile=33.0), name="slowjit")
    registered("path", P.TrainingPath("jitted", "NumPy under a compiling name",
                                      backends=("slowjit",), cores="one"))
    registered("path", P.TrainingPath("unjitted", "NumPy", cores="one"))
    first, second = expand_grid({**TINY, "path": "jitted", "seed": [0, 1]})
    plain = expand_grid({**TINY, "path": "unjitted"})[0]
    assert first.jit_key() == ("slowjit", "float32")
    # the first run of a compiling backend carries the record's cold compile, once
    a, b, c = estimate_seconds([first, second, plain])
    assert a - c == pytest.approx(33.0) and b == pytest.approx(c)
    assert replace(first, cuda_simulator=True).jit_key() is None  # the simulator compiles nothing


@pytest.mark.parametrize("facts, strategy, match", [
    ({"on_device": True}, "sync", "keeps the weights on a device"),
    ({"on_device": True}, "accumulate", "keeps the weights on a device"),
    ({"parallel_ops": True}, "sync", "'pooled' runs its own thread pool inside each op"),
])
def test_strategies_refuse_backends_by_their_record(registered, facts, strategy, match):
    registered("backend", BackendInfo("cnn.backends.numpy", "NumpyBackend", **facts),
               name="pooled")
    stand = type("Pooled", (_Stand,), {"name": "pooled"})()
    assert (stand.on_device, stand.parallel_ops) == (facts.get("on_device", False),
                                                     facts.get("parallel_ops", False))
    x, y = make_blobs_images(16, classes=10, size=8, seed=0)
    model = Sequential.from_spec([{"type": "flatten"}, {"type": "dense", "units": 10}],
                                 input_shape=(1, 8, 8), seed=0)
    with pytest.raises(ValueError, match=match):
        model.fit(x, y, batch_size=8, strategy=strategy, threads=2, backend=stand, verbose=0)


def test_backend_facts_are_read_from_the_record():
    from cnn.backends import get_backend
    assert get_backend("numpy").jit is False and get_backend("numpy").on_device is False
    assert get_backend("numba").jit is True and not get_backend("numba").parallel_ops
    assert get_backend("numba_parallel").parallel_ops is True
    assert P.PATHS["threads"].compiles("numba") and not P.PATHS["keras"].compiles()


def test_the_path_registry_imports_the_standard_library_only():
    """The study's child reads the registry before Numba, TensorFlow or PyTorch; so do the
    backends' records it reads, and the record type both use."""
    package = {"cnn/paths.py": {"backends.registry", "records"},  # relative imports allowed
               "cnn/backends/registry.py": {"records"}, "cnn/records.py": set()}
    for module, allowed in package.items():
        tree = ast.parse((ROOT / module).read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    assert node.module in allowed, (module, node.module)
                    continue
                names = [node.module]
            else:
                continue
            for name in names:
                top = name.split(".")[0]
                assert top in sys.stdlib_module_names or top == "__future__", (module, name)


# ---- optimizers ----------------------------------------------------------------------------------
class HeavyBall(Optimizer):
    """``v = momentum * v - lr * g;  w += v`` under another name, with its own default rate."""

    type = "heavyball"

    def __init__(self, lr=0.05, momentum=0.0, weight_decay=0.0):
        super().__init__(lr, weight_decay)
        self.momentum = momentum
        self.slot_names = ("velocity",)

    def _update(self, param, grad, slots, lr, step, be):
        be.axpby(slots["velocity"], self.momentum, grad, -lr)
        be.axpby(param, 1.0, slots["velocity"], 1.0)


class Sign(Optimizer):
    """``w -= lr * sign(g)``: no momentum."""

    type = "sign"

    def __init__(self, lr=0.002, weight_decay=0.0):
        super().__init__(lr, weight_decay)

    def _update(self, param, grad, slots, lr, step, be):
        param -= lr * np.sign(grad)


def test_a_registered_optimizer_is_known_to_specs_the_grid_and_the_cli(registered, capsys):
    registered("optimizer", HeavyBall)
    registered("optimizer", Sign)
    assert type(make_optimizer({"type": "heavyball"})) is HeavyBall
    # the grid: its own default rate, a momentum axis only where the class takes one
    heavy = expand_grid({**TINY, "optimizer": "heavyball", "momentum": 0.5})[0]
    assert (heavy.optimizer, heavy.lr, heavy.momentum) == ("heavyball", 0.05, 0.5)
    assert run_optimizer(heavy, {"optimizer": {"type": "sgd"}}) == {
        "type": "heavyball", "lr": 0.05, "momentum": 0.5}
    sign = expand_grid({**TINY, "optimizer": "sign"})[0]
    assert (sign.lr, sign.momentum) == (0.002, 0.0)
    assert "momentum" not in run_optimizer(sign, {"optimizer": {"type": "sgd"}})
    with pytest.raises(ValueError, match="sign takes no momentum"):
        expand_grid({**TINY, "optimizer": "sign", "momentum": 0.5})
    # the CLI lists it
    with pytest.raises(SystemExit):
        cli.main(["train", "--help"])
    assert "sgd | rmsprop | adam | adamw | heavyball | sign" in " ".join(
        capsys.readouterr().out.split())
    with pytest.raises(ValueError, match="'heavyball' is already registered"):
        register_optimizer(HeavyBall)


def test_a_registered_optimizer_trains_like_its_formula(registered):
    """Two steps of HeavyBall on a softmax regression equal the same two steps written out
    here, with the gradient of the mean cross-entropy computed by hand."""
    registered("optimizer", HeavyBall)
    x, y = make_blobs_images(8, classes=10, size=4, seed=3, dtype=np.float64)
    model = Sequential.from_spec([{"type": "flatten"}, {"type": "dense", "units": 10}],
                                 input_shape=(1, 4, 4), dtype=np.float64, seed=0)
    w, b = model.params["dense.w"].copy(), model.params["dense.b"].copy()
    vw, vb = np.zeros_like(w), np.zeros_like(b)
    flat, onehot = x.reshape(len(x), -1), np.eye(10)[y]
    for _ in range(2):  # one batch of all 8 examples per epoch: its order does not matter
        z = flat @ w + b
        p = np.exp(z - z.max(axis=1, keepdims=True))
        p /= p.sum(axis=1, keepdims=True)
        dz = (p - onehot) / len(x)
        vw, vb = 0.5 * vw - 0.1 * (flat.T @ dz), 0.5 * vb - 0.1 * dz.sum(axis=0)
        w, b = w + vw, b + vb
    model.fit(x, y, epochs=2, batch_size=8, verbose=0,
              optimizer={"type": "heavyball", "lr": 0.1, "momentum": 0.5})
    np.testing.assert_allclose(model.params["dense.w"], w, rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(model.params["dense.b"], b, rtol=1e-12, atol=1e-14)


# ---- runs ----------------------------------------------------------------------------------------
def test_a_run_is_typed_holds_its_entry_and_round_trips_through_its_row():
    run = expand_grid({**TINY, "path": "threads", "backend": "numba", "threads": 2})[0]
    assert [f.name for f in fields(Run)][:len(CONFIG_FIELDS)] == list(CONFIG_FIELDS)
    assert run.entry is P.PATHS["threads"] and run.variant == "threads/sync[numba]"
    assert dict(run)["path"] == "threads" and "entry" not in dict(run)
    back = Run.from_row(json.loads(json.dumps(dict(run))))  # the child's JSON
    assert back == run and back.entry is run.entry
    with pytest.raises(ValueError, match="unknown column 'colour'"):
        Run.from_row({**run, "colour": "red"})
    with pytest.raises(ValueError, match="unknown path 'gpu'"):
        replace(run, path="gpu")
