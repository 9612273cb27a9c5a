"""The third edition's study: its profile (three problems, every CPU path, warm-up epochs,
time-to-accuracy), the emulated cluster as a path's network (refused clearly where it cannot be
made), the warm-up epoch recorded and kept out of throughput, the reference frameworks' engines
recorded and computing the same model, processes and MPI ranks equal to the sequential path
step by step on a ResNet, and the dry-run estimate against a measured run."""
from __future__ import annotations

import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from cnn import paths as P
from cnn.study import expand_grid, run_study
from cnn.study.profiles import THIRD_PERIODS, THIRD_PROBLEMS, THIRD_TTA

TINY = {"dataset": "blobs", "model": "mnist_small", "train_size": 64, "test_size": 32,
        "batch_size": 32, "epochs": 1, "timeout": 300}
MPIEXEC = Path(sys.executable).parent / "mpiexec"


def _have(module: str) -> bool:
    import importlib.util
    return importlib.util.find_spec(module) is not None


needs_mpi = pytest.mark.skipif(not (MPIEXEC.is_file() and _have("mpi4py")),
                               reason=f"MPI unavailable: no mpi4py or no {MPIEXEC}")


# ---- the profile ---------------------------------------------------------------------------------
def test_third_profile_runs_every_cpu_path_on_each_problem_five_seeds_with_a_warm_up():
    runs = expand_grid("third", gpu=False, include_unavailable=True)
    throughput = [r for r in runs if r.target is None]
    tta = [r for r in runs if r.target is not None]
    cpu_paths = {name for name, e in P.PATHS.items() if not e.needs_gpu}
    for problem in THIRD_PROBLEMS:
        mine = [r for r in throughput if r.model == problem["model"]]
        assert {r.path for r in mine} == cpu_paths, problem["model"]
        assert {r.augment for r in mine} == {"pad=4,flip=true" if problem.get("augment")
                                            else ""}
        assert {(r.train_size, r.warmup_epochs, r.epochs) for r in mine} == {
            (problem["train_size"], 1, 1)}
        per_config = Counter((r.variant, r.threads) for r in mine)
        # 5 seeds of each configuration: threads/sync at 1 and 2 workers
        assert set(per_config.values()) == {5}
        assert per_config[("threads/sync[numba]", 1)] == per_config[("threads/sync[numba]", 2)]
        variants = {v for v, _ in per_config}
        assert {"mpi/sync[numba]", "mpi/sync[numba]@1gbe", "mpi/sync[numba]@10gbe",
                "keras", "keras+xla", "torch", "torch+channels_last", "torch+compiled",
                "torch_ddp", "threads/average[numba]", "threads/hogwild[numba]",
                "processes[numba]", "numba_parallel", "accumulate[numba]", "numba",
                "sequential"} <= variants
        seeds = {(r.variant, r.threads): set() for r in mine}
        for r in mine:
            seeds[(r.variant, r.threads)].add(r.seed)
        assert all(s == {0, 1, 2, 3, 4} for s in seeds.values())
    assert len(throughput) == 3 * 5 * 18
    # time to accuracy: no warm-up, the contenders of each problem, average's period swept on
    # MNIST
    assert {r.warmup_epochs for r in tta} == {0}
    for spec in THIRD_TTA:
        mine = [r for r in tta if r.model == spec["model"]]
        assert {r.target for r in mine} == {spec["target"]}
        labels = Counter((r.label, r.period) for r in mine)
        # the ResNet's fastest one-core trainer is compiled PyTorch: it is timed to target too
        best_elsewhere = {"torch+compiled ×1"} if spec["model"] == "cifar_resnet20" else set()
        assert {"numba", "threads/sync[numba] ×2", "threads/hogwild[numba] ×2",
                "threads/average[numba] ×2", "keras ×1",
                "torch+channels_last ×1"} | best_elsewhere == {label for label, _ in labels}
        assert set(labels.values()) == {spec["repeats"]}
        periods = {r.period for r in mine if r.strategy == "average"}
        assert periods == ({str(p) for p in THIRD_PERIODS} if spec["model"] == "mnist_small"
                           else {"8"})


def test_third_profile_dry_run_prints_the_plan_and_the_cluster_note(capsys):
    from cnn.study.cli import main
    assert main(["--profile", "third", "--dry-run", "--out", "/nonexistent/x.pkl"]) == 0
    out = capsys.readouterr().out
    assert "third profile:" in out and "mpi/sync[numba]@1gbe" in out
    assert "emulated clusters for the runs across links (10gbe, 1gbe)" in out
    assert "estimated wall time" in out


def test_engine_and_link_axes_are_checked_and_fixed_where_a_path_has_none():
    (keras,) = expand_grid({**TINY, "path": "keras", "engine": "xla"}, gpu=False,
                           include_unavailable=True)
    assert keras.engine == "xla" and keras.variant == "keras+xla"
    (seq,) = expand_grid({**TINY, "path": "sequential", "engine": "xla", "link": "1gbe"},
                         gpu=False)
    assert (seq.engine, seq.link) == ("", "")
    with pytest.raises(ValueError, match="engine.*'keras' runs as one of"):
        expand_grid({**TINY, "path": "keras", "engine": "compiled"}, include_unavailable=True)
    with pytest.raises(ValueError, match="grid axis 'link'"):
        expand_grid({**TINY, "path": "mpi", "threads": 2, "link": "2gbe"})
    with pytest.raises(ValueError, match="one rank per host, 2 to 8; received threads=1"):
        expand_grid({**TINY, "path": "mpi", "threads": 1, "link": "1gbe"},
                    include_unavailable=True)
    with pytest.raises(ValueError, match="takes no warm-up epoch"):
        expand_grid({**TINY, "warmup_epochs": 1, "target": 0.5})
    # the keys of runs that leave the new axes at their defaults do not change
    (plain,) = expand_grid({**TINY, "path": "keras"}, include_unavailable=True)
    (graph,) = expand_grid({**TINY, "path": "keras", "engine": "graph"},
                           include_unavailable=True)
    assert plain.run_key == graph.run_key and plain.engine == "graph"


def test_the_registry_marks_mpi_as_the_sequential_algorithm_and_engines_match_the_trainers():
    from cnn.reference import keras as keras_reference
    from cnn.reference import torch as torch_reference
    from cnn.study.equivalence import sequential_variants
    assert P.get_path("mpi").computes_sequential("sync")
    assert not P.get_path("mpi").computes_sequential("average")
    variants = sequential_variants()
    assert ("mpi", "sync", "numpy", 2) in variants and ("processes", "sync", "numpy", 2) in variants
    assert P.get_path("keras").engines == tuple(keras_reference.ENGINES)
    assert P.get_path("torch").engines == tuple(torch_reference.ENGINES)


def test_accumulation_is_the_sequential_algorithm_only_without_batch_statistics():
    """Micro-batches normalise with their own statistics ("ghost" batch norm): on the ResNet
    accumulation computes another algorithm, so it is not compared with the sequential path
    there, step by step or by final accuracy; sync, processes and MPI still are (they reduce
    the statistics over the whole batch)."""
    from cnn.model import has_batch_statistics
    from cnn.study.equivalence import sequential_variants
    assert has_batch_statistics("cifar_resnet20")  # inside the residual blocks too
    assert has_batch_statistics([{"type": "residual", "layers": [{"type": "batchnorm"}]}])
    assert not has_batch_statistics("cifar_tutorial")
    assert not has_batch_statistics("mnist_small")
    accumulate = P.get_path("accumulate")
    assert accumulate.computes_sequential("accumulate")
    assert not accumulate.computes_sequential("accumulate", batch_statistics=True)
    plain, normalised = sequential_variants(), sequential_variants(batch_statistics=True)
    assert {v[0] for v in plain} - {v[0] for v in normalised} == {"accumulate"}
    assert ("mpi", "sync", "numba", 2) in normalised
    assert ("processes", "sync", "numba", 2) in normalised


# ---- the emulated cluster --------------------------------------------------------------------------
def test_runs_across_a_cluster_are_refused_before_any_run_where_none_can_be_made(
        tmp_path, monkeypatch):
    import cnn.cluster
    monkeypatch.setattr(cnn.cluster, "unavailable",
                        lambda: "not root (uid 1000): network namespaces need CAP_NET_ADMIN")
    out = tmp_path / "r.pkl"
    grid = [{**TINY, "path": "sequential"}, {**TINY, "path": "mpi", "threads": 2,
                                             "link": ["1gbe", "10gbe"]}]
    with pytest.raises(ValueError, match=r"2 run\(s\) of this grid run MPI ranks across an "
                                         r"emulated cluster \(link 10gbe, 1gbe\), which cannot "
                                         r"be made here: not root \(uid 1000\)"):
        run_study(grid, out=out, progress=False)
    assert not out.exists()  # nothing ran, not even the sequential run


@needs_mpi
def test_mpi_ranks_run_one_per_host_across_an_emulated_cluster(tmp_path):
    from cnn.cluster import unavailable
    why = unavailable()
    if why:
        pytest.skip(f"no emulated cluster here: {why}")
    import subprocess

    def namespaces():
        listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
        return {line.split()[0] for line in listed.splitlines() if line.startswith("pcnn-")}
    before = namespaces()  # other studies' clusters, if any
    df = run_study({**TINY, "path": "mpi", "threads": 2, "link": "10gbe"},
                   out=tmp_path / "r.pkl", progress=False)
    assert set(df["status"]) == {"ok"} and set(df["link"]) == {"10gbe"}
    # rank 0 on the first emulated host, rank 1 on the second: not this machine's name
    assert set(df["hosts"]) == {"node0,node1"}
    assert namespaces() <= before  # the study took its cluster down


# ---- the warm-up epoch ---------------------------------------------------------------------------
def test_warm_up_epoch_is_recorded_and_kept_out_of_throughput(tmp_path):
    from cnn.analysis.summary import run_table
    df = run_study({**TINY, "path": "sequential", "warmup_epochs": 1, "epochs": 2},
                   out=tmp_path / "r.pkl", progress=False)
    assert list(df["epoch"]) == [1, 2, 3]
    assert list(df["warmup"]) == [True, False, False]
    runs = run_table(df)
    assert runs["n_timed"].tolist() == [2]
    measured = df.loc[~df["warmup"], "time"]
    assert runs["epoch_time"].iloc[0] == pytest.approx(float(np.median(measured)))
    assert runs["total_time"].iloc[0] == pytest.approx(float(measured.sum()))


# ---- the references' engines -----------------------------------------------------------------------
@pytest.mark.skipif(not _have("torch"), reason="PyTorch is not installed")
def test_pytorch_engines_train_the_same_model(blobs64):
    from cnn.model import Sequential, resolve_spec
    from cnn.reference.torch import ENGINES, fit_torch
    x, y = blobs64
    weights, infos = {}, {}
    for engine in ENGINES:
        model = Sequential.from_spec(resolve_spec("mnist_small"), input_shape=x.shape[1:],
                                     dtype=np.float64, seed=0)
        hist = fit_torch(model, x, y, epochs=1, batch_size=24,
                         optimizer={"type": "sgd", "lr": 0.05, "momentum": 0.9},
                         engine=engine)
        weights[engine], infos[engine] = model.get_weights(), hist.info
    assert {e: i["engine"] for e, i in infos.items()} == {e: e for e in ENGINES}
    # torch.compile builds before the first epoch, timed apart; eager compiles nothing
    assert infos["compiled"]["compile_time"] > 0 == infos["eager"]["compile_time"]
    for engine in ("channels_last", "compiled"):
        for k, w in weights["eager"].items():
            np.testing.assert_allclose(weights[engine][k], w, rtol=1e-9, atol=1e-10,
                                       err_msg=f"{engine}: {k}")
    with pytest.raises(ValueError, match="engine"):
        fit_torch(Sequential.from_spec(resolve_spec("mnist_small"), input_shape=x.shape[1:]),
                  x, y, engine="jit")


@pytest.fixture(scope="module")
def blobs64():
    from cnn.data import load_dataset
    data = load_dataset("blobs", limit=48, test_limit=8, dtype=np.float64)
    return data.x_train, data.y_train


@pytest.mark.skipif(not (_have("torch") and _have("tensorflow")),
                    reason="PyTorch or TensorFlow is not installed")
def test_study_records_each_reference_engine(tmp_path):
    df = run_study([{**TINY, "path": "keras", "engine": ["graph", "xla"]},
                    {**TINY, "path": "torch", "engine": ["eager", "compiled"]}],
                   out=tmp_path / "r.pkl", progress=False)
    assert set(df["status"]) == {"ok"}
    assert sorted(df.groupby("run_key")["engine"].first()) == ["compiled", "eager", "graph",
                                                               "xla"]
    from cnn.analysis.summary import run_table
    assert sorted(run_table(df)["variant"]) == ["keras", "keras+xla", "torch",
                                                "torch+compiled"]


# ---- equivalence -------------------------------------------------------------------------------------
@needs_mpi
def test_processes_and_mpi_ranks_track_the_sequential_resnet_step_by_step():
    from cnn.study.equivalence import weight_trajectories
    table = weight_trajectories(variants=(("processes", "sync", "numpy", 2),
                                          ("mpi", "sync", "numpy", 2)),
                                dtypes=("float64",), problems=[("blobs", "cifar_resnet20")],
                                steps=3, batch_size=8)
    last = table.groupby("label")["rel_diff"].max()
    assert last["processes ×2"] < 1e-12 and last["mpi/sync ×2"] < 1e-12
    assert set(table["problem"]) == {"blobs/cifar_resnet20"}
    assert list(table.loc[table["label"] == "mpi/sync ×2", "step"]) == [1, 2, 3]


# ---- the estimate ---------------------------------------------------------------------------------------
def test_dry_run_estimate_of_a_measured_grid_is_within_a_quarter_of_its_run_time(tmp_path):
    """Calibrated on a measured study of the same grid, the estimate rebuilds each run's wall
    time from its parts (start-up, warm-up epoch, measured epochs, evaluation): an identity up
    to the medians, so a quarter holds however loaded the machine is."""
    from cnn.study.estimate import estimate_seconds
    grid = {**TINY, "train_size": 256, "path": ["sequential", "accumulate"], "threads": 2,
            "warmup_epochs": 1, "repeats": 2}
    df = run_study(grid, out=tmp_path / "r.pkl", progress=False)
    runs = expand_grid(grid)
    estimate = sum(estimate_seconds(runs, df))
    measured = df.groupby("run_key")["run_time"].first().sum()
    assert estimate == pytest.approx(measured, rel=0.25)


def test_dry_run_estimate_of_time_to_accuracy_runs_uses_their_measured_epochs_to_target(
        tmp_path):
    """A time-to-accuracy run stops at its target: one reached at the first evaluation trains a
    sliver of its cap, one that never reaches it (a learning rate too small to move) trains the
    whole cap. Calibrated on them, the estimate follows each; a fixed share of the cap (what
    the estimate guessed before it calibrated on them) misses both by far more than a quarter.
    With a longer cap, the run that missed the target is charged the longer cap."""
    from cnn.study.estimate import TTA_SHARE_OF_CAP, estimate_seconds
    grid = [{**TINY, "train_size": 512, "batch_size": 16, "epochs": 3, "val_size": 64,
             "target": 0.01, "path": "sequential", "repeats": 2},
            {**TINY, "train_size": 512, "batch_size": 16, "epochs": 3, "val_size": 64,
             "target": 0.99, "lr": 1e-9, "path": "sequential", "repeats": 2}]
    df = run_study(grid, out=tmp_path / "r.pkl", progress=False)
    runs = expand_grid(grid)
    measured = df.groupby("run_key")["run_time"].first()
    status = df.groupby("run_key")["tta_status"].first()
    estimate = dict(zip([r.run_key for r in runs], estimate_seconds(runs, df)))
    for reached in ("reached", "not reached"):
        keys = status.index[status == reached]
        assert len(keys) == 2
        assert sum(estimate[k] for k in keys) == pytest.approx(measured[keys].sum(), rel=0.25)
    # reached at the first evaluation, a tenth of an epoch; missed, all three epochs trained
    steps = df.groupby("run_key")["steps_to_target"].first()
    assert (steps[status == "reached"] <= 512 // 16 // 10).all()
    assert (df.groupby("run_key")["epoch"].max()[status == "not reached"] == 3).all()
    trained = df.groupby("run_key")["time"].sum()
    # twice the cap: the runs that missed the target cost three more epochs (training, the
    # validation passes and the test set's evaluation: what their three measured ones cost),
    # the others no more
    passes = df.groupby("run_key")[["step_eval_time", "eval_time"]].sum().sum(axis=1)
    longer = expand_grid([{**g, "epochs": 6} for g in grid])
    for r, a, b in zip(runs, estimate_seconds(runs, df), estimate_seconds(longer, df)):
        if status[r.run_key] == "not reached":
            k = status.index[status == "not reached"]
            assert b - a == pytest.approx((trained[k] + passes[k]).median(), rel=0.3)
        else:
            assert b == pytest.approx(a)
    # the guess without a measured run of the configuration is a share of the cap
    assert 0 < TTA_SHARE_OF_CAP < 1
