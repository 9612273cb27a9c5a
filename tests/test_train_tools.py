"""The tools around training: presets xor_mlp/mnist_mlp, the train options for optimizers,
schedules, validation split, early stopping, checkpoints and curves, ``predict``, and
``train --config`` (several models, a comparison table). In process through ``cnn.cli.main``.
"""
from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest

from cnn import build_model
from cnn.cli import main
from cnn.configs import best_row, load_config, parse_option_spec
from cnn.data import load_dataset, stratified_split
from cnn.predict import confusion_matrix, load_model

FINAL = re.compile(r"final test accuracy (\d\.\d{4})")


def run(capsys, *argv):
    code = main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


# ---- presets and XOR on every CPU path ---------------------------------------------------------
@pytest.mark.parametrize("path", [[], ["--backend", "numba"], ["--strategy", "sync", "--threads", "2"],
                                  ["--strategy", "average", "--threads", "2"],
                                  ["--strategy", "hogwild", "--threads", "2"]],
                         ids=["numpy", "numba", "sync", "average", "hogwild"])
def test_train_dataset_xor_picks_a_model_that_learns_it(capsys, path):
    code, out, err = run(capsys, "train", "--dataset", "xor", "--epochs", "3", "--quiet", *path)
    assert code == 0, err
    assert "flatten" in out and "dense" in out and "conv2d" not in out  # xor_mlp
    assert float(FINAL.search(out).group(1)) >= 0.97


def test_mnist_mlp_is_feed_forward_and_learns():
    data = load_dataset("mnist_embedded", limit=1024, test_limit=500)
    model = build_model("mnist_mlp", seed=0)
    assert [layer.type for layer in model.layers] == ["flatten", "dense", "relu", "dense"]
    assert model.num_params == 784 * 128 + 128 + 128 * 10 + 10
    model.fit(data.x_train, data.y_train, epochs=2, batch_size=32,
              optimizer={"type": "sgd", "lr": 0.1}, verbose=0)
    assert model.evaluate(data.x_test, data.y_test)["accuracy"] > 0.7  # chance: 0.1


# ---- train options ----------------------------------------------------------------------------
def test_train_with_adam_cosine_checkpoint_and_curves(capsys, tmp_path):
    ck, png, save = tmp_path / "best.npz", tmp_path / "curves.png", tmp_path / "w.npz"
    code, out, err = run(capsys, "train", "--dataset", "blobs", "--limit", "400",
                         "--test-limit", "100", "--epochs", "3", "--quiet",
                         "--optimizer", "adam:lr=0.005,beta_2=0.99", "--lr-schedule", "cosine",
                         "--warmup-steps", "3", "--weight-decay", "0.001",
                         "--checkpoint", str(ck), "--plot", str(png), "--save", str(save))
    assert code == 0, err
    assert "'type': 'adam'" in out and "'beta_2': 0.99" in out and "'weight_decay': 0.001" in out
    assert ck.is_file() and png.is_file() and png.stat().st_size > 1000
    # the per-epoch table validates on 10% of the training data; the test set gives the final
    # number: the saved model reproduces it
    model = load_model(save)
    data = load_dataset("blobs", limit=400, test_limit=100, seed=0)
    acc = model.evaluate(data.x_test, data.y_test)["accuracy"]
    assert float(FINAL.search(out).group(1)) == pytest.approx(acc, abs=1e-4)
    x_t, y_t, x_v, y_v = stratified_split(data.x_train, data.y_train, 0.1, 0)
    assert len(y_v) == 40


def test_early_stopping_restores_the_best_epoch(capsys, tmp_path):
    code, out, err = run(capsys, "train", "--dataset", "blobs", "--limit", "200",
                         "--test-limit", "50", "--epochs", "3", "--quiet",
                         "--early-stopping", "1")
    assert code == 0, err
    assert "kept the weights of epoch" in out


BAD = [
    (["--optimizer", "lion"], "'lion'"),
    (["--optimizer", "adam:beta_1=2"], "beta_1=2"),
    (["--optimizer", "adam:beta_1"], "key=value"),
    (["--optimizer", "{bad json"], "--optimizer"),
    (["--optimizer", "adam", "--momentum", "0.9"], "'momentum' for optimizer 'adam'"),
    (["--optimizer", "sgd", "--nesterov"], "nesterov=True needs momentum"),
    (["--lr-schedule", "step"], "step_size"),
    (["--lr-schedule", "cosine:alpha=5"], "alpha=5"),
    (["--lr-schedule", "sine"], "'sine'"),
    (["--lr-schedule", "plateau", "--validation-split", "0"], "--validation-split"),
    (["--early-stopping", "2", "--validation-split", "0"], "--validation-split"),
    (["--checkpoint", "/proc/nope/w.npz"], "--checkpoint"),
    (["--plot", "curves.jpg"], "--plot"),
    (["--name", "a"], "--config"),
    (["--optimizer", "missing.yaml"], "missing.yaml"),
]


@pytest.mark.parametrize("extra, match", BAD, ids=[m for _, m in BAD])
def test_bad_options_exit_2_naming_the_value_before_training(capsys, extra, match):
    code, out, err = run(capsys, "train", "--dataset", "xor", "--epochs", "1", "--quiet", *extra)
    assert code == 2
    assert match in err, err
    assert "epoch " not in out  # nothing trained


@pytest.mark.parametrize("option, value", [("--weight-decay", "-1"), ("--weight-decay", "inf"),
                                           ("--validation-split", "1"), ("--early-stopping", "0"),
                                           ("--warmup-steps", "0"), ("--lr", "nan")])
def test_bad_numbers_name_the_option(capsys, option, value):
    with pytest.raises(SystemExit) as exc:
        main(["train", "--dataset", "xor", option, value])
    assert exc.value.code == 2
    assert option in capsys.readouterr().err


def test_parse_option_spec(tmp_path):
    assert parse_option_spec("adam", "x") == {"type": "adam"}
    assert parse_option_spec("step:step_size=2,factor=0.5,unit=epoch", "x") == {
        "type": "step", "step_size": 2, "factor": 0.5, "unit": "epoch"}
    assert parse_option_spec('{"type": "sgd", "nesterov": true}', "x") == {"type": "sgd",
                                                                          "nesterov": True}
    f = tmp_path / "opt.yaml"
    f.write_text("type: rmsprop\nrho: 0.8\n")
    assert parse_option_spec(str(f), "x") == {"type": "rmsprop", "rho": 0.8}


# ---- predict ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    path = tmp_path_factory.mktemp("predict") / "w.npz"
    data = load_dataset("blobs", limit=300, test_limit=120, seed=0)
    model = build_model("mnist_small", input_shape=data.input_shape, seed=1)
    model.fit(data.x_train, data.y_train, epochs=2, batch_size=32, verbose=0,
              optimizer={"type": "adam", "lr": 0.01})
    model.save_weights(path)
    return path, model, data


def test_predict_on_the_test_set(capsys, saved, tmp_path):
    path, model, _ = saved
    data = load_dataset("blobs", test_limit=120, seed=0)  # what predict loads
    fig = tmp_path / "preds.png"
    code, out, err = run(capsys, "predict", "--weights", str(path), "--dataset", "blobs",
                         "--test-limit", "120", "--figure", str(fig))
    assert code == 0, err
    probs = model.predict(data.x_test)
    pred = probs.argmax(1)
    acc = float((pred == data.y_test).mean())
    assert f"test accuracy {acc:.4f} ({int((pred == data.y_test).sum())} of 120)" in out
    assert f"image 0: predicted {pred[0]} (p={probs[0, pred[0]]:.3f}), true {data.y_test[0]}" in out
    # the confusion matrix printed: row k sums to the count of class k, diagonal = hits
    m = confusion_matrix(data.y_test, pred, 10)
    rows = [line.split() for line in out.splitlines() if re.match(r"^\d\s+\d", line)]
    assert [[int(v) for v in r[1:11]] for r in rows] == m.tolist()
    assert m.sum() == 120 and np.trace(m) == int((pred == data.y_test).sum())
    assert fig.is_file() and fig.stat().st_size > 1000


def test_confusion_matrix_by_hand():
    m = confusion_matrix([0, 0, 1, 2, 2, 2], [0, 1, 1, 2, 0, 2], 3)
    assert m.tolist() == [[1, 1, 0], [0, 1, 0], [1, 0, 2]]


def test_predict_images_file(capsys, saved, tmp_path):
    path, model, data = saved
    imgs = data.x_test[:5, 0]  # (N, H, W): one channel implied
    np.save(tmp_path / "imgs.npy", imgs)
    code, out, err = run(capsys, "predict", "--weights", str(path), "--images",
                         str(tmp_path / "imgs.npy"), "--figure", str(tmp_path / "f.png"))
    assert code == 0, err
    pred = model.predict(data.x_test[:5]).argmax(1)
    for i in range(5):
        assert f"image {i}: {pred[i]} " in out
    np.save(tmp_path / "one.npy", data.x_test[0])
    code, out, _ = run(capsys, "predict", "--weights", str(path), "--images",
                       str(tmp_path / "one.npy"), "--figure", "none")
    assert code == 0 and f"image 0: {pred[0]} " in out


@pytest.mark.parametrize("case", ["missing", "garbage", "shape", "dataset"])
def test_predict_errors_name_the_file(capsys, saved, tmp_path, case):
    path, _, _ = saved
    args = ["predict", "--weights", str(path), "--figure", "none"]
    if case == "missing":
        args[2] = str(tmp_path / "none.npz")
        match = "none.npz"
    elif case == "garbage":
        (tmp_path / "g.npz").write_bytes(b"not a zip")
        args[2] = str(tmp_path / "g.npz")
        match = "g.npz"
    elif case == "shape":
        np.save(tmp_path / "bad.npy", np.zeros((2, 5, 5), np.float32))
        args += ["--images", str(tmp_path / "bad.npy")]
        match = "(2, 5, 5)"
    else:
        args += ["--dataset", "xor"]
        match = "(1, 1, 2)"
    code, _, err = run(capsys, *args)
    assert code == 2 and match in err, err


# ---- several models from one file --------------------------------------------------------------
CONFIG = """\
defaults:
  dataset: xor
  epochs: 2
models:
  mlp_adam:
    model: xor_mlp
    optimizer: adam:lr=0.02
    lr_schedule: cosine
  mlp_sgd:
    model: xor_mlp
    optimizer: {type: sgd, lr: 0.1, momentum: 0.9}
  linear:
    model: {input_shape: [1, 1, 2], layers: [{type: flatten}, {type: dense, units: 2}]}
    optimizer: sgd:lr=0.5
"""


def _table(out):
    return {line[2:].split()[0]: line for line in out.splitlines()
            if line[:2] in ("* ", "  ") and line[2:].split() and line[2:].split()[-1] == "ok"}


@pytest.mark.parametrize("parallel", ["1", "2"])
def test_config_trains_every_model_and_marks_the_best(capsys, tmp_path, parallel):
    cfg = tmp_path / "models.yaml"
    cfg.write_text(CONFIG)
    code, out, err = run(capsys, "train", "--config", str(cfg), "--quiet", "--parallel", parallel)
    assert code == 0, err
    table = _table(out)
    assert set(table) == {"mlp_adam", "mlp_sgd", "linear"}
    # a linear model cannot learn XOR; the networks with a hidden layer do, and one is marked
    val = {k: float(v.split()[-4]) for k, v in table.items()}
    assert val["linear"] < 0.8 and min(val["mlp_adam"], val["mlp_sgd"]) > 0.95
    marked = [k for k, v in table.items() if v.startswith("* ")]
    assert len(marked) == 1 and val[marked[0]] == max(val.values())
    assert f"* best: {marked[0]}" in out


def test_config_one_named_model(capsys, tmp_path):
    cfg = tmp_path / "models.json"
    cfg.write_text('{"models": [{"name": "a", "model": "xor_mlp", "dataset": "xor", "epochs": 1},'
                   ' {"name": "b", "model": "xor_mlp", "dataset": "xor", "epochs": 1}]}')
    code, out, err = run(capsys, "train", "--config", str(cfg), "--name", "b", "--quiet")
    assert code == 0, err
    assert set(_table(out)) == {"b"}
    code, _, err = run(capsys, "train", "--config", str(cfg), "--name", "c")
    assert code == 2 and "'c'" in err


@pytest.mark.parametrize("body, match", [
    ("models: {a: {model: xor_mlp, optimiser: adam}}", "'optimiser'"),
    ("models: {a: {dataset: xor, optimizer: 'adam:lr=-1'}}", "lr=-1"),
    ("models: {a: {dataset: xor, epochs: 0}}", "epochs=0"),
    ("models: {a: {dataset: xor, lr_schedule: 'cosine:alpha=3'}}", "alpha=3"),
    ("models: {a: {dataset: xor, model: nope}}", "'nope'"),
    ("models: []", "no models"),
    ("defaults: {epochs: 1}", "'models'"),
    ("models: {a: {dataset: xor}}\nextra: 1", "'extra'"),
    ("models: [\n  - model: xor_mlp", "line"),
    ("models: {a: {dataset: xor, augment: 'pad=-2'}}", "pad=-2"),
    ("models: {a: {dataset: xor, normalize: maybe}}", "normalize='maybe'"),
])
def test_bad_config_is_refused_before_any_model_trains(capsys, tmp_path, body, match):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text(body)
    code, out, err = run(capsys, "train", "--config", str(cfg))
    assert code == 2 and match in err and "bad.yaml" in err, err
    assert "val_acc" not in out


def test_best_is_decided_on_validation_not_test():
    rows = [{"status": "ok", "val_accuracy": 0.9, "val_loss": 0.3, "test_accuracy": 0.99},
            {"status": "ok", "val_accuracy": 0.95, "val_loss": 0.2, "test_accuracy": 0.5},
            {"status": "failed"}]
    assert best_row(rows) == 1


def test_load_config_applies_defaults(tmp_path):
    cfg = tmp_path / "m.yaml"
    cfg.write_text("defaults: {dataset: xor, epochs: 4, optimizer: 'adam:lr=0.01'}\n"
                   "models: {a: {}, b: {epochs: 2, optimizer: sgd}}\n")
    a, b = load_config(cfg)
    assert (a.epochs, a.optimizer["type"], a.optimizer["lr"]) == (4, "adam", 0.01)
    assert (b.epochs, b.optimizer) == (2, {"type": "sgd"})
    assert a.spec["input_shape"] == [1, 1, 2] and a.batch_size == 16  # xor_mlp's
    assert Path(cfg).is_file()


# ---- --config: each model saved and plotted -----------------------------------------------------
SAVED_CONFIG = """\
defaults:
  dataset: xor
  epochs: 2
  save: {save}
  plot: {plot}
models:
  adam: {{model: xor_mlp, optimizer: 'adam:lr=0.02'}}
  sgd: {{model: xor_mlp, optimizer: 'sgd:lr=0.5'}}
"""


def test_config_saves_and_plots_every_model_and_predict_reads_them(capsys, tmp_path):
    cfg = tmp_path / "models.yaml"
    cfg.write_text(SAVED_CONFIG.format(save=f"'{tmp_path}/weights/'",
                                       plot=f"'{tmp_path}/curves/{{name}}.png'"))
    code, out, err = run(capsys, "train", "--config", str(cfg), "--quiet")
    assert code == 0, err
    for name in ("adam", "sgd"):
        weights, curves = tmp_path / "weights" / f"{name}.npz", tmp_path / "curves" / f"{name}.png"
        assert f"{name}: " in out and f"weights in {weights}" in out and f"curves in {curves}" in out
        assert curves.stat().st_size > 1000
        # the saved model scores on the test set what the comparison table printed for it
        acc = float(_table(out)[name].split()[-3])
        data = load_dataset("xor", seed=0)
        assert load_model(weights).evaluate(data.x_test, data.y_test)["accuracy"] == \
            pytest.approx(acc, abs=1e-4)
    code, out, err = run(capsys, "predict", "--weights", str(tmp_path / "weights" / "adam.npz"),
                         "--weights", str(tmp_path / "weights" / "sgd.npz"), "--dataset", "xor",
                         "--figure", "none")
    assert code == 0 and "ensemble of 2" in out, err


def test_config_save_and_plot_from_the_command_line(capsys, tmp_path):
    cfg = tmp_path / "models.yaml"
    cfg.write_text("defaults: {dataset: xor, epochs: 1}\nmodels: {a: xor_mlp, b: xor_mlp}\n")
    code, out, err = run(capsys, "train", "--config", str(cfg), "--quiet", "--save",
                         str(tmp_path / "w_{name}.npz"), "--plot", str(tmp_path / "p") + "/")
    assert code == 0, err
    assert sorted(p.name for p in tmp_path.rglob("*.npz")) == ["w_a.npz", "w_b.npz"]
    assert sorted(p.name for p in (tmp_path / "p").iterdir()) == ["a.png", "b.png"]


@pytest.mark.parametrize("argv, named", [
    (["--save", "one.npz"], "models 'a' and 'b' would both write save to"),
    (["--plot", "one.png"], "models 'a' and 'b' would both write plot to"),
    (["--plot", "{name}.pdf"], "plot must be a .png path"),
    (["--epochs", "5"], "--epochs does not apply to --config"),
    (["--epochs", "3"], "--epochs does not apply to --config"),  # the default, given
    (["--backend", "numba"], "--backend does not apply to --config"),
    (["--lr", "0.1"], "--lr does not apply to --config"),
])
def test_config_refuses_what_it_cannot_honour(capsys, tmp_path, monkeypatch, argv, named):
    cfg = tmp_path / "models.yaml"
    cfg.write_text("defaults: {dataset: xor, epochs: 1}\nmodels: {a: xor_mlp, b: xor_mlp}\n")
    monkeypatch.chdir(tmp_path)
    code, out, err = run(capsys, "train", "--config", str(cfg), *argv)
    assert code == 2 and named in err and "val_acc" not in out, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["models.yaml"]


# ---- predict: an ensemble, and the figure beside the weights ------------------------------------
def test_predict_ensemble_is_the_mean_of_the_probabilities(capsys, saved, tmp_path):
    path, model, data = saved
    other = build_model("mnist_small", input_shape=data.input_shape, seed=7)
    other.fit(data.x_train, data.y_train, epochs=1, batch_size=32, verbose=0,
              optimizer={"type": "sgd", "lr": 0.05})
    other_path = other.save_weights(tmp_path / "other.npz")
    test = load_dataset("blobs", test_limit=120, seed=0)
    code, out, err = run(capsys, "predict", "--weights", str(path), "--weights",
                         str(other_path), "--dataset", "blobs", "--test-limit", "120",
                         "--figure", "none", "--show", "3")
    assert code == 0, err
    each = [m.predict(test.x_test) for m in (model, other)]
    mean = (each[0] + each[1]) / 2
    pred = mean.argmax(1)
    hits = int((pred == test.y_test).sum())
    assert f"ensemble of 2: log loss of the mean probabilities" in out
    assert f"test accuracy {hits / 120:.4f} ({hits} of 120)" in out.split("ensemble of 2:")[-1]
    assert f"image 0: predicted {pred[0]} (p={mean[0, pred[0]]:.3f})" in out
    for p, m_path in zip(each, (path, other_path)):
        alone = int((p.argmax(1) == test.y_test).sum())
        assert f"{m_path}: test loss" in out and f"({alone} of 120)" in out


def test_predict_refuses_models_of_different_tasks(capsys, saved, tmp_path):
    path, _, _ = saved
    xor = build_model("xor_mlp", seed=0)
    xor_path = xor.save_weights(tmp_path / "xor.npz")
    code, _, err = run(capsys, "predict", "--weights", str(path), "--weights", str(xor_path),
                       "--figure", "none")
    assert code == 2 and str(xor_path) in err and "one task" in err, err


def test_predict_figure_goes_beside_the_weights(capsys, saved, tmp_path, monkeypatch):
    path, _, _ = saved
    work = tmp_path / "elsewhere"
    work.mkdir()
    monkeypatch.chdir(work)
    code, out, err = run(capsys, "predict", "--weights", str(path), "--dataset", "blobs",
                         "--test-limit", "40")
    figure = path.with_name("w_predictions.png")
    assert code == 0 and f"figure of sample predictions: {figure}" in out, err
    assert figure.stat().st_size > 1000 and not list(work.iterdir())
