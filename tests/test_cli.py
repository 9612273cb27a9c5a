"""The command line: ``python -m cnn train`` (as a subprocess and in-process through
``cnn.cli.main``) and one smoke run of ``python -m cnn bench``. Only synthetic data: no network."""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from cnn.cli import main
from cnn.data import load_dataset
from cnn.model import Sequential

ROOT = Path(__file__).resolve().parents[1]
ROW = re.compile(r"^\s*(\d+)\s+(\d\.\d{4})\s+(\d+\.\d{4})\s+(\d+\.\d{2})\s+([\d,]+)\s*$")


def run_cli(*args, timeout=300):
    env = dict(os.environ)
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    return subprocess.run([sys.executable, "-m", "cnn", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


def table_rows(stdout):
    lines = stdout.splitlines()
    header = [i for i, line in enumerate(lines) if line.split() == ["epoch", "val_acc",
                                                                    "train_loss", "time_s", "img/s"]]
    assert len(header) == 1, stdout
    return [ROW.match(line).groups() for line in lines[header[0] + 1:] if ROW.match(line)]


def test_train_subprocess_prints_table_and_saves_weights(tmp_path):
    save = tmp_path / "w.npz"
    proc = run_cli("train", "--dataset", "blobs", "--epochs", "1", "--quiet", "--save", str(save))
    assert proc.returncode == 0, proc.stderr
    rows = table_rows(proc.stdout)
    assert len(rows) == 1 and rows[0][0] == "1"
    assert 0.0 <= float(rows[0][1]) <= 1.0  # validation accuracy, on a split of the training data
    assert f"weights saved to {save}" in proc.stdout
    final = re.search(r"final test accuracy (\d\.\d{4})", proc.stdout)
    acc = float(final.group(1))
    # the default model for 8x8 blobs is mnist_small: conv 3x3 -> 6x6, pool -> 3x3
    assert re.search(r"^conv2d\s+conv2d\s+\(8, 6, 6\)\s+80\s*$", proc.stdout, re.M), proc.stdout
    # the file loads into the same architecture and reproduces the printed test accuracy
    model = Sequential.from_spec("mnist_small", input_shape=(1, 8, 8))
    before = model.get_weights()
    model.load_weights(save)
    assert any(not np.array_equal(before[k], model.params[k]) for k in before)
    data = load_dataset("blobs", seed=0)   # the CLI's defaults: 2000 train, 500 test, seed 0
    assert round(model.evaluate(data.x_test, data.y_test)["accuracy"], 4) == pytest.approx(acc, abs=1e-4)
    with np.load(save) as f:
        assert json.loads(str(f["__spec__"]))["input_shape"] == [1, 8, 8]


def test_train_in_process_with_json_model(tmp_path, capsys):
    spec = {"layers": [{"type": "conv2d", "filters": 2, "kernel_size": 3, "activation": "relu"},
                       {"type": "flatten"}, {"type": "dense", "units": 10}]}
    path = tmp_path / "tiny.json"
    path.write_text(json.dumps(spec))
    rc = main(["train", "--dataset", "blobs", "--model", str(path), "--epochs", "2", "--quiet",
               "--limit", "100", "--test-limit", "40", "--lr", "0.05", "--dtype", "float64",
               "--batch-size", "10", "--save", str(tmp_path / "out")])
    out = capsys.readouterr().out
    assert rc == 0
    assert [r[0] for r in table_rows(out)] == ["1", "2"]
    assert "float64" in out and "'lr': 0.05" in out and "batch 10" in out
    model = Sequential.from_spec(str(path), input_shape=(1, 8, 8), dtype=np.float64)
    model.load_weights(tmp_path / "out.npz")


def test_train_filters_option(capsys):
    rc = main(["train", "--dataset", "blobs", "--filters", "4", "--epochs", "1", "--quiet",
               "--limit", "64", "--test-limit", "16"])
    assert rc == 0
    assert re.search(r"^conv2d\s+conv2d\s+\(4, 6, 6\)\s+40\s*$", capsys.readouterr().out, re.M)


@pytest.mark.parametrize("args, named", [
    (["--dataset", "bogus_data"], "bogus_data"),
    (["--dataset", "blobs", "--model", "bogus_model"], "bogus_model"),
    (["--dataset", "blobs", "--model", "no_such_spec.json"], "no_such_spec.json"),
    (["--dataset", "blobs", "--model", ""], "''"),
    (["--dataset", "blobs", "--strategy", "bogus_strategy"], "bogus_strategy"),
    (["--dataset", "blobs", "--backend", "bogus_backend"], "bogus_backend"),
    (["--dataset", "blobs", "--threads", "0"], "threads=0"),
    (["--dataset", "blobs", "--strategy", "sync", "--threads", "-2"], "threads=-2"),
    (["--dataset", "blobs", "--strategy", "sync", "--threads", "2", "--batch-size", "1"],
     "batch"),
    (["--dataset", "blobs", "--augment", "foo"], "--augment: expected a name"),
    (["--dataset", "blobs", "--augment", "pad=9"], "Received pad=9 (data set blobs)"),
    (["--dataset", "xor", "--augment"], "--augment: needs images"),
])
def test_train_errors_exit_2_naming_the_value(args, named, capsys):
    rc = main(["train", "--quiet", "--limit", "32", "--test-limit", "8", *args])
    err = capsys.readouterr().err
    assert rc == 2
    assert named in err and err.startswith("error:")


def test_unknown_dataset_and_model_exit_code_from_python_m():
    proc = run_cli("train", "--dataset", "bogus_data", "--quiet")
    assert proc.returncode == 2
    assert "bogus_data" in proc.stderr
    proc = run_cli("train", "--dataset", "blobs", "--model", "bogus_model", "--quiet",
                   "--limit", "32", "--test-limit", "8")
    assert proc.returncode == 2
    assert "bogus_model" in proc.stderr


def test_argparse_errors_exit_2(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["train", "--epochs", "many"])
    assert exc.value.code == 2
    assert "many" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        main(["nonsense"])
    assert exc.value.code == 2


def test_bench_quick_smoke():
    """Imports TensorFlow and trains both contenders on 256 images: slow, so just one run."""
    proc = run_cli("bench", "--quick", "--presets", "mnist_small", "--batch-sizes", "32",
                   timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "mnist_small, batch 32" in proc.stdout
    ratios = re.findall(r"ratio\s+(\d+\.\d+)", proc.stdout)
    assert ratios, proc.stdout
    assert all(float(r) > 0 for r in ratios)
    assert re.search(r"ratio ours/keras", proc.stdout)


def test_bench_tta_quick_smoke(tmp_path):
    """The study's runs to a target, every family: ours (one and two cores), and Keras and
    PyTorch where installed; the same seed gives every contender the same batches, which
    the same number of steps to the target shows (every one reaches it at the first
    evaluation of this smoke run)."""
    from cnn.bench.tta import QUICK_CONTENDERS, QUICK_PROBLEM
    out = tmp_path / "tta.json"
    proc = run_cli("bench", "tta", "--quick", "--json", str(out), timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    record = json.loads(out.read_text())["presets"]["mnist_small"]
    assert record["problem"] == list(QUICK_PROBLEM)
    rows = {r["contender"]: r for r in record["rows"]}
    assert {"ours numpy (one core)", "ours sync numpy x2"} <= set(rows) <= set(QUICK_CONTENDERS)
    assert all(r["runs"] == r["reached"] == 1 for r in rows.values())
    assert {r["steps"] for r in rows.values()} == {record["eval_every"]}
    assert "to 60% validation accuracy" in proc.stdout


def test_bench_gpu_without_a_gpu_says_so_and_exits_cleanly():
    env = {**os.environ, "NUMBA_ENABLE_CUDASIM": "0"}
    out = subprocess.run([sys.executable, "-m", "cnn", "bench", "gpu"], capture_output=True,
                         text=True, env=env, cwd=ROOT, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "no CUDA GPU present" in out.stdout



# ---- numbers: refused by argparse, naming the option, never replaced by a default -------------
@pytest.mark.parametrize("option, value", [
    ("--epochs", "0"), ("--epochs", "-1"), ("--epochs", "1.5"), ("--epochs", "many"),
    ("--batch-size", "0"), ("--batch-size", "-32"),
    ("--lr", "0"), ("--lr", "-0.1"), ("--lr", "inf"), ("--lr", "nan"), ("--lr", "fast"),
    ("--momentum", "-0.1"), ("--momentum", "1"), ("--momentum", "nan"),
    ("--filters", "0"), ("--limit", "0"), ("--test-limit", "-5"),
    ("--seed", "-1"), ("--seed", "1e3"),
])
def test_bad_train_numbers_name_the_option(option, value, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["train", "--dataset", "blobs", option, value])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert f"argument {option}:" in err and repr(value) in err, err


@pytest.mark.parametrize("argv", [
    ["bench", "--repeats", "0"], ["bench", "--batch-sizes", "32", "0"],
    ["report", "--n-boot", "0"], ["report", "--level", "1"], ["report", "--level", "0"],
    ["report", "--seed", "-1"], ["report", "--dpi", "0"],
])
def test_bad_bench_and_report_numbers_name_the_option(argv, capsys):
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    assert f"argument {argv[1]}:" in capsys.readouterr().err


def test_bench_json_on_a_suite_without_figures_is_refused(tmp_path, capsys):
    """``--json`` is not silently dropped: a suite that writes no figures refuses it, naming
    the option and the path, before it measures anything."""
    out = tmp_path / "x.json"
    assert main(["bench", "keras", "--json", str(out)]) == 2
    err = capsys.readouterr().err
    assert f"--json {out}" in err and "'keras' suite writes no figures" in err, err
    assert not out.exists()


def test_zero_values_are_not_replaced_by_defaults():
    """No ``args.x or default``: a value of 0 never silently becomes the preset's."""
    source = (ROOT / "cnn" / "cli.py").read_text()
    assert not re.search(r"args\.\w+ or ", source)


def test_batch_size_given_is_the_batch_size_used(capsys):
    rc = main(["train", "--dataset", "blobs", "--quiet", "--limit", "40", "--test-limit", "8",
               "--epochs", "1", "--batch-size", "5"])
    assert rc == 0 and "batch 5," in capsys.readouterr().out


def test_spec_batch_size_is_checked_before_training(tmp_path, capsys):
    path = tmp_path / "spec.json"
    path.write_text(json.dumps({"layers": [{"type": "flatten"}, {"type": "dense", "units": 10}],
                                "batch_size": 0}))
    rc = main(["train", "--dataset", "blobs", "--model", str(path), "--quiet"])
    err = capsys.readouterr().err
    assert rc == 2 and "batch_size=0" in err and str(path) in err


# ---- --save is checked before training --------------------------------------------------------
def save_cases(tmp_path):
    (tmp_path / "a_file").write_text("x")
    (tmp_path / "some_dir").mkdir()
    return {
        "unwritable": ("/proc/x/w.npz", "/proc/x/w.npz"),
        "parent is a file": (str(tmp_path / "a_file" / "w.npz"), "a_file is a file"),
        "grandparent is a file": (str(tmp_path / "a_file" / "x" / "w.npz"), "a_file is a file"),
        "existing folder": (str(tmp_path / "some_dir"), "some_dir is a folder"),
        "trailing slash": (str(tmp_path / "new_dir") + "/", "new_dir/ is a folder"),
    }


@pytest.mark.parametrize("case", ["unwritable", "parent is a file", "grandparent is a file",
                                  "existing folder", "trailing slash"])
def test_bad_save_target_refused_before_training(case, tmp_path, capsys, monkeypatch):
    target, named = save_cases(tmp_path)[case]
    before = sorted(p.name for p in tmp_path.rglob("*"))
    trained = []
    monkeypatch.setattr(Sequential, "fit", lambda *a, **k: trained.append(1))
    rc = main(["train", "--dataset", "blobs", "--quiet", "--limit", "32", "--test-limit", "8",
               "--save", target])
    err = capsys.readouterr().err
    assert rc == 2 and not trained
    assert err.startswith("error: --save:") and named in err, err
    assert "Traceback" not in err
    # nothing written: no some_dir.npz beside the folder, no probe, no folders left behind
    assert sorted(p.name for p in tmp_path.rglob("*")) == before


def test_save_into_new_folders_and_without_suffix(tmp_path, capsys):
    rc = main(["train", "--dataset", "blobs", "--quiet", "--limit", "32", "--test-limit", "8",
               "--epochs", "1", "--save", str(tmp_path / "new" / "deeper" / "weights")])
    out = capsys.readouterr().out
    target = tmp_path / "new" / "deeper" / "weights.npz"
    assert rc == 0 and target.is_file()
    assert f"weights will be saved to {target}" in out and f"weights saved to {target}" in out
    assert [p.name for p in target.parent.iterdir()] == ["weights.npz"]   # no temporary left
    assert oct(target.stat().st_mode & 0o777) == oct(0o666 & ~current_umask())


def current_umask():
    mask = os.umask(0)
    os.umask(mask)
    return mask


# ---- Ctrl-C keeps the weights -------------------------------------------------------------------
def interrupt_train(tmp_path, *extra):
    save = tmp_path / "w.npz"
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
    proc = subprocess.Popen([sys.executable, "-m", "cnn", "train", "--dataset", "blobs",
                             "--epochs", "100000", "--quiet", "--limit", "256", "--test-limit",
                             "32", *extra], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    lines = []
    last = "weights will be saved" if "--save" in extra else "optimizer "
    for line in proc.stdout:            # the last line printed before fit starts
        lines.append(line)
        if line.startswith(last):
            break
    time.sleep(1.0)                     # well into training (an epoch takes milliseconds)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    return proc.returncode, "".join(lines) + out, err, save


def test_ctrl_c_saves_the_weights_fit_kept(tmp_path):
    save = tmp_path / "w.npz"
    rc, out, err, _ = interrupt_train(tmp_path, "--save", str(save))
    assert rc == 130, err
    assert "Traceback" not in err
    # 256 training examples less the 10% validation split (26) that train holds out
    assert re.search(r"interrupted in epoch \d+ after \d+ of 230 examples", err), err
    assert f"weights of the last completed step saved to {save}" in err
    model = Sequential.from_spec("mnist_small", input_shape=(1, 8, 8))
    before = model.get_weights()
    model.load_weights(save)          # a whole, loadable file with trained (changed) weights
    assert any(not np.array_equal(before[k], model.params[k]) for k in before)
    assert all(np.isfinite(v).all() for v in model.params.values())


def test_ctrl_c_without_save_says_nothing_was_saved(tmp_path):
    rc, out, err, _ = interrupt_train(tmp_path)
    assert rc == 130 and "weights not saved (no --save given)" in err, err
    assert "Traceback" not in err



@pytest.mark.parametrize("presses", [1, 2])
def test_ctrl_c_after_the_fit_still_saves_the_finished_run(tmp_path, monkeypatch, capsys, presses):
    """Ctrl-C once training has ended (during the final test evaluation): the run is whole, so
    one press lets it finish (report, test accuracy, save) and exit 130; a second press stops
    it at once and still saves. Before, the handler was gone by then: a traceback and no weights."""
    import cnn.cli as cli
    argv = ["train", "--dataset", "blobs", "--limit", "256", "--test-limit", "32", "--epochs",
            "2", "--quiet", "--seed", "5", "--save"]
    assert main([*argv, str(tmp_path / "ref.npz")]) == 0
    capsys.readouterr()
    finish = cli._finish_training
    monkeypatch.setattr(cli._Interrupt, "SAME_PRESS", 0.0)  # each kill below is a new press

    def pressed_once_the_fit_returned(*a, **kw):
        for _ in range(presses):
            os.kill(os.getpid(), signal.SIGINT)
        return finish(*a, **kw)

    monkeypatch.setattr(cli, "_finish_training", pressed_once_the_fit_returned)
    save = tmp_path / "w.npz"
    assert main([*argv, str(save)]) == 130
    out, err = capsys.readouterr()
    assert "Traceback" not in err
    assert "training has ended; finishing the final evaluation and the save" in err, err
    if presses == 1:
        assert "final test accuracy" in out and f"weights saved to {save}" in out, out
    else:
        assert f"weights of the last completed step saved to {save}" in err, err
    ref, got = np.load(tmp_path / "ref.npz"), np.load(save)
    assert all(np.array_equal(ref[k], got[k]) for k in ref.files if k != "__spec__")

def test_filters_on_a_model_without_conv_and_layer_errors_name_the_file(tmp_path, capsys):
    path = tmp_path / "dense_only.json"
    path.write_text(json.dumps({"layers": [{"type": "flatten"}, {"type": "dense", "units": 10}]}))
    assert main(["train", "--dataset", "blobs", "--model", str(path), "--filters", "3"]) == 2
    assert "--filters 3" in capsys.readouterr().err
    path.write_text(json.dumps({"layers": [{"type": "Conv2D", "filters": 2}, {"type": "flatten"},
                                           {"type": "dense", "units": 10}]}))
    assert main(["train", "--dataset", "blobs", "--model", str(path), "--filters", "3",
                 "--quiet", "--epochs", "1", "--limit", "16", "--test-limit", "8"]) == 0
    assert re.search(r"^conv2d\s+conv2d\s+\(3, 6, 6\)", capsys.readouterr().out, re.M)
    path.write_text(json.dumps({"layers": [{"type": "conv2d", "filtres": 2}]}))
    assert main(["train", "--dataset", "blobs", "--model", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {path}: layer 0") and "filtres" in err
    path.write_text(json.dumps({"layers": [{"type": "conv2d", "filters": 2, "kernel_size": 9},
                                           {"type": "flatten"}, {"type": "dense", "units": 10}]}))
    assert main(["train", "--dataset", "blobs", "--model", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {path}: ") and "larger than its input" in err


# ---- the per-phase timing table --------------------------------------------------------------
PHASES = ("data", "compute", "communication", "transfer", "evaluation", "compile", "other")


def timing_rows(stdout: str) -> dict[str, float]:
    """The timing table's rows: phase -> share of the wall time (a fraction)."""
    rows = {}
    for line in stdout.splitlines():
        m = re.match(r"^\s+(\w+)\s+(\d+\.\d{2})\s+(\d+\.\d)%\s", line)
        if m and m.group(1) in PHASES:
            rows[m.group(1)] = float(m.group(3)) / 100
    return rows


def test_train_ends_with_the_timing_table(capsys):
    rc = main(["train", "--dataset", "blobs", "--quiet", "--limit", "200", "--test-limit", "40",
               "--epochs", "2", "--strategy", "sync", "--threads", "2"])
    out = capsys.readouterr().out
    assert rc == 0
    rows = timing_rows(out)
    assert list(rows) == list(PHASES), out
    assert sum(rows.values()) == pytest.approx(1.0, abs=0.004)  # seven shares rounded to 0.1%
    assert out.index("time per phase") > out.index("epoch   val_acc")


# ---- --backend keras and torch: the same spec through the references ---------------------------
def _train_losses(stdout: str) -> list[float]:
    return [float(row[2]) for row in table_rows(stdout)]


#: the ResNet presets' optimizer: coupled weight decay, which Keras's optimizers lack (its
#: reference puts the decay on the model as an L2 penalty); with the ResNet recipe's schedule,
#: a warm-up and a cosine to the end of the run (its horizon resolved from the run's steps)
COUPLED = ["--optimizer", "sgd:lr=0.05,momentum=0.875,weight_decay=0.01,"
                          "weight_decay_mode=coupled", "--lr-schedule", "cosine",
           "--warmup-steps", "5"]


@pytest.mark.parametrize("backend, extra", [("keras", []), ("torch", []), ("keras", COUPLED)],
                         ids=["keras", "torch", "keras-coupled-decay"])
def test_reference_backends_train_the_same_spec_with_the_same_output(backend, extra, tmp_path):
    """From the same initial weights and batches the reference's per-epoch training losses are
    ours (to the 4 printed decimals, float64), the table and the timing table are printed alike,
    and the saved weights load and score as printed."""
    if backend == "torch":
        pytest.importorskip("torch")
    common = ["--dataset", "blobs", "--limit", "300", "--test-limit", "60", "--epochs", "2",
              "--dtype", "float64", "--quiet", *extra]
    ours_save, save = tmp_path / "ours.npz", tmp_path / "w.npz"
    ours = run_cli("train", *common, "--save", str(ours_save))
    assert ours.returncode == 0, ours.stderr
    ref = run_cli("train", *common, "--backend", backend, "--save", str(save))
    assert ref.returncode == 0, ref.stderr[-3000:]
    assert f"the {backend} reference with 1 thread(s)" in ref.stdout
    if not extra:  # Keras's printed loss includes the L2 penalty coupled decay becomes there
        assert _train_losses(ref.stdout) == pytest.approx(_train_losses(ours.stdout), abs=2e-4)
    with np.load(ours_save) as a, np.load(save) as b:
        weights = [key for key in a.files if a[key].dtype.kind == "f"]  # not the metadata
        assert weights and sorted(weights) == sorted(k for k in b.files if b[k].dtype.kind == "f")
        for key in weights:  # the same training: the same weights
            np.testing.assert_allclose(b[key], a[key], rtol=1e-6, atol=1e-6, err_msg=key)
    assert len(table_rows(ref.stdout)) == 2 and list(timing_rows(ref.stdout)) == list(PHASES)
    acc = float(re.search(r"final test accuracy (\d\.\d{4})", ref.stdout).group(1))
    model = Sequential.from_spec("mnist_small", input_shape=(1, 8, 8), dtype=np.float64)
    model.load_weights(save)
    data = load_dataset("blobs", limit=300, test_limit=60, seed=0, dtype=np.float64)
    assert model.evaluate(data.x_test, data.y_test)["accuracy"] == pytest.approx(acc, abs=1e-4)


@pytest.mark.parametrize("argv, named", [
    (["--backend", "keras", "--strategy", "sync", "--threads", "2"], "--strategy sync: not with"),
    (["--backend", "keras", "--early-stopping", "2"], "--early-stopping: not with"),
    (["--backend", "torch", "--lr-schedule", "cosine"], "--lr-schedule: not with"),
    (["--backend", "torch", "--optimizer", "adam"], "--backend torch: the PyTorch reference "
                                                    "trains with SGD"),
    # decoupled weight decay (Keras 3's, ours by default): PyTorch's SGD decays coupled only
    (["--backend", "torch", "--weight-decay", "0.01"], "--backend torch"),
])
def test_reference_backends_refuse_what_they_cannot_honour(argv, named, capsys, monkeypatch):
    trained = []
    monkeypatch.setattr("cnn.reference.torch.fit_torch", lambda *a, **k: trained.append(1))
    rc = main(["train", "--dataset", "blobs", "--limit", "64", "--test-limit", "8", *argv])
    err = capsys.readouterr().err
    assert rc == 2 and named in err and not trained, err


def test_cuda_without_a_gpu_is_an_error_line_and_exit_2():
    env = {**os.environ, "NUMBA_ENABLE_CUDASIM": "0"}
    probe = subprocess.run([sys.executable, "-c", "from numba import cuda; "
                            "print(cuda.is_available())"], capture_output=True, text=True,
                           env=env, timeout=120)
    if probe.stdout.strip() == "True":
        pytest.skip("a CUDA GPU is present: --backend cuda trains here")
    proc = subprocess.run([sys.executable, "-m", "cnn", "train", "--backend", "cuda",
                           "--dataset", "blobs"], capture_output=True, text=True, env=env,
                          cwd=ROOT, timeout=300)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.startswith("error: CudaBackend: no CUDA GPU is usable here: ")
    assert "no CUDA driver" in proc.stderr or "found no GPU" in proc.stderr
    assert "NUMBA_ENABLE_CUDASIM=1" in proc.stderr and "Traceback" not in proc.stderr
    assert "epoch" not in proc.stdout


# ---- a missing optional part is named before any work -----------------------------------------
@pytest.fixture
def without_matplotlib(monkeypatch):
    """matplotlib reported missing (cnn.extras looks with importlib.util.find_spec);
    tests/test_packaging.py checks the same in an environment that really lacks it."""
    import importlib.util
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name.split(".")[0] == "matplotlib"
                        else find_spec(name, *a))


def test_plot_without_matplotlib_is_refused_before_training(without_matplotlib, tmp_path,
                                                            capsys):
    png = tmp_path / "c.png"
    rc = main(["train", "--dataset", "blobs", "--plot", str(png), "--save",
               str(tmp_path / "w.npz")])
    out, err = capsys.readouterr()
    assert rc == 2 and err.startswith("error: --plot needs matplotlib, which is not installed"), err
    assert "plot extra" in err and "pip install" in err and "'matplotlib>=3.8'" in err
    assert "epoch" not in out and not list(tmp_path.iterdir())


def test_predict_figure_without_matplotlib(without_matplotlib, tmp_path, capsys):
    weights = tmp_path / "w.npz"
    assert main(["train", "--dataset", "blobs", "--quiet", "--limit", "64", "--test-limit", "16",
                 "--epochs", "1", "--save", str(weights)]) == 0
    capsys.readouterr()
    # asked for: refused before anything is loaded
    rc = main(["predict", "--weights", str(weights), "--dataset", "blobs", "--figure",
               str(tmp_path / "p.png")])
    out, err = capsys.readouterr()
    assert rc == 2 and "--figure needs matplotlib" in err and "plot extra" in err
    assert "test set" not in out
    # the default one: the predictions, and a note instead of the figure
    rc = main(["predict", "--weights", str(weights), "--dataset", "blobs", "--test-limit", "16"])
    out, err = capsys.readouterr()
    assert rc == 0 and "test accuracy" in out
    assert "note: no figure of sample predictions: matplotlib is not installed" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["w.npz"]


@pytest.mark.parametrize("command", ["train", "predict", "bench", "study", "report", "data",
                                     "cluster"])
def test_every_command_prints_its_help(command, capsys):
    """argparse formats help texts with %: a help naming "98%" crashed ``bench --help``."""
    with pytest.raises(SystemExit) as exit_:
        main([command, "--help"])
    assert exit_.value.code == 0
    assert f"usage: python -m cnn {command}" in capsys.readouterr().out
