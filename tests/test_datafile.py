"""Your own data: the ``.npz`` format of ``--dataset PATH.npz`` (cnn.datafile) and
``python -m cnn data NAME --out PATH.npz``. The round trips are checked against the built-in
loaders, the scaling and the layouts against arrays converted here by hand, and every refusal
for the file and the array it names. In process through ``cnn.cli.main``; no network."""
from __future__ import annotations

import re

import numpy as np
import pytest

from cnn.cli import main
from cnn.data import load_dataset
from cnn.datafile import image_layout, read_dataset_file, stored_input_shape
from cnn.presets import default_model

SPLITS = ("x_train", "y_train", "x_test", "y_test", "x_val", "y_val")


def run(capsys, *argv):
    code = main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


# ---- python -m cnn data: the built-in sets, read back bit for bit ------------------------------
@pytest.mark.parametrize("name, limits", [("xor", []), ("blobs", ["--limit", "300"]),
                                          ("mnist_embedded", ["--limit", "300",
                                                              "--test-limit", "100"])])
def test_data_command_round_trip(capsys, tmp_path, name, limits):
    out = tmp_path / "sub" / f"{name}.npz"
    code, text, err = run(capsys, "data", name, "--out", str(out), "--seed", "3", *limits)
    assert code == 0, err
    assert f"{name} written to {out}" in text
    limit = int(limits[1]) if limits else None
    test_limit = int(limits[3]) if len(limits) > 2 else None
    for dtype in (np.float32, np.float64):
        ours = load_dataset(name, limit=limit, test_limit=test_limit, seed=3, dtype=dtype,
                            validation_split=0.1)
        back = load_dataset(str(out), seed=3, dtype=dtype, validation_split=0.1)
        for split in SPLITS:
            a, b = getattr(ours, split), getattr(back, split)
            assert a.dtype == b.dtype and np.array_equal(a, b), (name, dtype, split)
        assert back.classes == ours.classes
    stored = read_dataset_file(out)  # the image sets as uint8 pixels, the synthetic as float64
    assert stored.x_train.dtype == (np.uint8 if name == "mnist_embedded" else np.float64)


def test_data_command_refuses_other_suffixes(capsys, tmp_path):
    code, _, err = run(capsys, "data", "xor", "--out", str(tmp_path / "x.npy"))
    assert code == 2 and "--out" in err and ".npz" in err


# ---- layouts and scaling ---------------------------------------------------------------------
def _pixels(shape, seed=0):
    return np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)


def test_channels_last_uint8_is_transposed_scaled_and_stated(tmp_path):
    x = _pixels((40, 9, 7, 3))
    y = np.arange(40) % 4
    xt = _pixels((10, 9, 7, 3), seed=1)
    path = tmp_path / "rgb.npz"
    np.savez(path, x_train=x, y_train=y, x_test=xt, y_test=np.arange(10) % 4)
    data = load_dataset(str(path), dtype=np.float64)
    expected = np.stack([[[[x[n, h, w, c] / 255.0 for w in range(7)] for h in range(9)]
                          for c in range(3)] for n in range(40)])
    np.testing.assert_array_equal(data.x_train, expected)
    assert data.input_shape == (3, 9, 7) and data.num_classes == 4
    assert any("(N, H, W, C)" in note for note in data.notes), data.notes


@pytest.mark.parametrize("shape, expected", [((5, 1, 28, 28), (1, 28, 28)),
                                             ((5, 28, 28, 1), (1, 28, 28)),
                                             ((5, 3, 32, 32), (3, 32, 32)),
                                             ((5, 32, 32, 4), (4, 32, 32)),
                                             ((5, 28, 28), (1, 28, 28)),
                                             ((5, 7), (1, 1, 7))])
def test_every_image_form_is_read_channels_first(tmp_path, shape, expected):
    path = tmp_path / "d.npz"
    x = np.random.default_rng(0).random(shape)
    np.savez(path, x_train=x, y_train=np.arange(5) % 2)
    found = read_dataset_file(path)
    assert found.x_train.shape[1:] == expected
    assert stored_input_shape(path) == expected  # from the header alone
    # floats are used as they are: the values are the same numbers, moved
    assert np.array_equal(np.sort(found.x_train, axis=None), np.sort(x, axis=None))


def test_an_ambiguous_shape_is_assumed_channels_first_and_layout_settles_it(tmp_path):
    x = np.random.default_rng(0).random((6, 8, 5, 8))
    path = tmp_path / "a.npz"
    np.savez(path, x_train=x, y_train=np.arange(6) % 2)
    found = read_dataset_file(path)
    assert found.x_train.shape[1:] == (8, 5, 8)
    assert any("assumed" in note for note in found.notes)
    np.savez(path, x_train=x, y_train=np.arange(6) % 2, layout="channels_last")
    found = read_dataset_file(path)
    np.testing.assert_array_equal(found.x_train, x.transpose(0, 3, 1, 2))
    assert not any("assumed" in note for note in found.notes)
    assert image_layout((6, 8, 5, 8)) == ("channels_first", True)


def test_without_a_test_set_a_stratified_fifth_is_held_out(tmp_path):
    y = np.repeat(np.arange(3), [50, 30, 20])
    x = np.random.default_rng(0).random((100, 1, 4, 4))
    path = tmp_path / "t.npz"
    np.savez(path, x_train=x, y_train=y)
    data = load_dataset(str(path), dtype=np.float64)
    assert np.bincount(data.y_test).tolist() == [10, 6, 4]  # 20% of every class
    assert np.bincount(data.y_train).tolist() == [40, 24, 16]
    assert any("held out as the test set" in note for note in data.notes)
    # every example is in exactly one part
    both = np.concatenate([data.x_train, data.x_test]).reshape(100, -1)
    assert sorted(map(tuple, both)) == sorted(map(tuple, x.reshape(100, -1)))


def test_class_names_come_from_the_file(tmp_path):
    path = tmp_path / "c.npz"
    np.savez(path, x_train=_pixels((6, 1, 4, 4)), y_train=np.array([0, 1, 2, 0, 1, 2]),
             classes=np.array(["cat", "dog", "eel", "fox"]))
    data = load_dataset(str(path), validation_split=0.0)
    assert data.classes == ["cat", "dog", "eel", "fox"] and data.num_classes == 4


# ---- every check, naming the file and the array -----------------------------------------------
GOOD = {"x_train": np.zeros((4, 1, 3, 3), np.float32), "y_train": np.array([0, 1, 0, 1])}


@pytest.mark.parametrize("arrays, named", [
    ({"y_train": GOOD["y_train"]}, "no array 'x_train'"),
    ({**GOOD, "x_val": GOOD["x_train"]}, "unknown array 'x_val'"),
    ({**GOOD, "x_test": GOOD["x_train"]}, "no 'y_test'"),
    ({**GOOD, "y_train": np.array([0.0, 1.0, 0.0, 1.0])}, "array 'y_train' has dtype float64"),
    ({**GOOD, "y_train": np.array([0, -1, 0, 1])}, "array 'y_train': label -1 is negative"),
    ({**GOOD, "y_train": np.array([0, 1, 0])}, "array 'y_train' has shape (3,)"),
    ({**GOOD, "x_train": np.zeros((0, 1, 3, 3))}, "array 'x_train' holds no examples"),
    ({**GOOD, "x_train": np.full((4, 1, 3, 3), np.nan)}, "array 'x_train' holds NaN"),
    ({**GOOD, "x_train": np.zeros((4, 1, 3, 3), np.int16)}, "array 'x_train' has dtype int16"),
    ({**GOOD, "x_train": np.zeros((4, 2, 1, 3, 3))}, "array 'x_train' has shape (4, 2, 1, 3, 3)"),
    ({**GOOD, "x_test": np.zeros((2, 1, 4, 4)), "y_test": np.array([0, 1])},
     "the test images are (1, 4, 4)"),
    ({**GOOD, "classes": np.array(["a"])}, "array 'classes' names 1 classes"),
    ({**GOOD, "layout": np.array("nhwc")}, "array 'layout' must be one of"),
])
def test_bad_files_are_refused_naming_file_and_array(capsys, tmp_path, arrays, named):
    path = tmp_path / "bad.npz"
    np.savez(path, **arrays)
    with pytest.raises(ValueError) as err:
        read_dataset_file(path)
    assert str(path) in str(err.value) and named in str(err.value), err.value
    # the command line refuses it the same way, before any training: exit 2
    code, out, text = run(capsys, "train", "--dataset", str(path), "--model", "xor_mlp")
    assert code == 2 and named in text and "epoch" not in out


def test_pickled_arrays_are_refused(tmp_path):
    path = tmp_path / "obj.npz"
    np.savez(path, x_train=np.array([{"a": 1}] * 4, dtype=object), y_train=GOOD["y_train"])
    with pytest.raises(ValueError, match=r"array 'x_train' holds Python objects"):
        read_dataset_file(path)


@pytest.mark.parametrize("kind", ["missing", "not a zip", "npy", "folder"])
def test_files_that_are_not_data_sets(capsys, tmp_path, kind):
    path = tmp_path / "d.npz"
    if kind == "not a zip":
        path.write_text("hello")
    elif kind == "npy":
        with open(path, "wb") as f:
            np.save(f, np.zeros(3))
    elif kind == "folder":
        path.mkdir()
    code, _, err = run(capsys, "train", "--dataset", str(path))
    assert code == 2 and str(path) in err, err


# ---- training on a file --------------------------------------------------------------------------
def test_train_on_a_file_sizes_the_preset_to_its_classes_and_says_how_it_read_it(capsys, tmp_path):
    """Three classes of 12x12 channels-last blobs: mnist_small with a 3-unit output layer, the
    layout stated, and the trained weights predict the file's test set as evaluated here."""
    data = load_dataset("blobs", limit=300, test_limit=60, seed=0)
    keep = data.y_train < 3
    x = np.pad(data.x_train[keep], ((0, 0), (0, 0), (2, 2), (2, 2))).transpose(0, 2, 3, 1)
    y = data.y_train[keep]
    path = tmp_path / "mine.npz"
    np.savez(path, x_train=x.astype(np.float32), y_train=y,
             x_test=x[:20].astype(np.float32), y_test=y[:20])
    assert default_model(str(path)) == "mnist_small"
    weights = tmp_path / "w.npz"
    code, out, err = run(capsys, "train", "--dataset", str(path), "--epochs", "2", "--quiet",
                         "--save", str(weights))
    assert code == 0, err
    assert "read as (N, H, W, C)" in out
    assert re.search(r"^dense\s+dense\s+\(3,\)", out, re.M), out
    from cnn.predict import load_model
    model = load_model(weights)
    test = load_dataset(str(path), validation_split=0.0)
    acc = float(re.search(r"final test accuracy (\d\.\d{4})", out).group(1))
    assert model.evaluate(test.x_test, test.y_test)["accuracy"] == pytest.approx(acc, abs=1e-4)


def test_feature_vectors_get_the_feed_forward_preset(tmp_path):
    path = tmp_path / "f.npz"
    np.savez(path, x_train=np.zeros((8, 5)), y_train=np.arange(8) % 2)
    assert default_model(str(path)) == "xor_mlp"
