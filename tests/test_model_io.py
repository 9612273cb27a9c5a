"""Errors of the model's inputs and files name what is wrong (issue 13, items 3 and 6): weights
files that are truncated or not weights at all, malformed JSON/YAML spec files, a zero or
negative ``input_shape``, and weights targets that cannot be written."""
from __future__ import annotations

import io
import json
import re
import shutil
import zipfile

import numpy as np
import pytest

from cnn.layers import layers_from_spec
from cnn.model import Sequential, check_weights_path, read_weights, resolve_spec, weights_path
from limits import run_python

SPEC = [{"type": "conv2d", "filters": 2, "kernel_size": 3, "activation": "relu"},
        {"type": "flatten"}, {"type": "dense", "units": 3}]


def model(seed=0):
    return Sequential(layers_from_spec(SPEC), (1, 6, 6), seed=seed)


# ---- weights files -----------------------------------------------------------------------------
@pytest.fixture
def saved(tmp_path):
    return model(seed=1).save_weights(tmp_path / "w.npz")


@pytest.mark.parametrize("keep", [0, 4, 30, 0.5, -22, -1])
def test_truncated_weights_file_names_the_path(saved, keep):
    data = saved.read_bytes()
    cut = int(len(data) * keep) if isinstance(keep, float) else (keep if keep >= 0 else len(data) + keep)
    saved.write_bytes(data[:cut])
    m = model()
    before = m.get_weights()
    with pytest.raises(ValueError) as exc:
        m.load_weights(saved)
    message = str(exc.value)
    assert str(saved) in message and "allow_pickle" not in message
    assert message != "File is not a zip file"
    assert all(np.array_equal(before[k], m.params[k]) for k in before)   # nothing half-loaded


def test_garbage_weights_file_names_the_path_without_pickle_advice(tmp_path):
    path = tmp_path / "garbage.npz"
    path.write_bytes(np.random.default_rng(0).bytes(500))
    with pytest.raises(ValueError, match="garbage.npz: not a weights file") as exc:
        model().load_weights(path)
    assert "allow_pickle" not in str(exc.value)
    path.write_bytes(b"")
    with pytest.raises(ValueError, match="garbage.npz"):
        model().load_weights(path)


def test_corrupt_member_names_the_path_and_the_array(saved):
    data = bytearray(saved.read_bytes())
    with zipfile.ZipFile(saved) as z:
        info = z.getinfo("dense.w.npy")
    start = info.header_offset + 30 + len(info.filename) + 200   # inside that member's data
    data[start:start + 8] = b"\xff" * 8
    saved.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=r"w\.npz.*'dense\.w'"):
        model().load_weights(saved)


def test_npz_with_pickled_objects_is_refused_naming_the_array(tmp_path):
    path = tmp_path / "objects.npz"
    np.savez(path, **{"conv2d.w": np.array([{"a": 1}], dtype=object)})
    with pytest.raises(ValueError, match=r"objects\.npz: array 'conv2d\.w' holds pickled"):
        model().load_weights(path)


def test_npy_file_and_string_arrays_are_refused(tmp_path):
    np.save(tmp_path / "single.npy", np.zeros(3))
    with pytest.raises(ValueError, match="single.npy"):
        read_weights(tmp_path / "single.npy")
    np.savez(tmp_path / "text.npz", **{"conv2d.w": np.array(["a", "b"])})
    with pytest.raises(ValueError, match=r"text\.npz: weight 'conv2d\.w' is a <U1 array"):
        read_weights(tmp_path / "text.npz")
    np.savez(tmp_path / "empty.npz")
    with pytest.raises(ValueError, match="empty.npz: holds no weight arrays"):
        read_weights(tmp_path / "empty.npz")


def test_a_folder_is_not_a_weights_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="no weights file"):
        model().load_weights(tmp_path)


# ---- where weights are written -----------------------------------------------------------------
def test_weights_path_suffix_rules(tmp_path):
    assert weights_path(tmp_path / "w.npz") == tmp_path / "w.npz"
    assert weights_path(tmp_path / "w") == tmp_path / "w.npz"
    assert weights_path(tmp_path / "w.v2") == tmp_path / "w.v2.npz"   # appended, not replaced
    (tmp_path / "d").mkdir()
    with pytest.raises(IsADirectoryError, match=r"d is a folder.*d/weights\.npz"):
        weights_path(tmp_path / "d")
    (tmp_path / "e.npz").mkdir()
    with pytest.raises(IsADirectoryError, match="e.npz is a folder"):
        weights_path(tmp_path / "e")
    with pytest.raises(IsADirectoryError):
        weights_path(str(tmp_path / "new") + "/")
    with pytest.raises(ValueError, match="empty"):
        weights_path("")


def test_save_weights_refuses_folders_and_file_parents_without_writing(tmp_path):
    (tmp_path / "some_dir").mkdir()
    (tmp_path / "a_file").write_text("x")
    m = model()
    with pytest.raises(IsADirectoryError, match="some_dir"):
        m.save_weights(tmp_path / "some_dir")
    with pytest.raises(NotADirectoryError, match="a_file is a file"):
        m.save_weights(tmp_path / "a_file" / "w.npz")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a_file", "some_dir"]
    assert list((tmp_path / "some_dir").iterdir()) == []


@pytest.mark.parametrize("target, match", [
    ("/proc/x/w.npz", "cannot create the folder for /proc/x/w.npz"),
    ("/proc/w.npz", "cannot write the weights to /proc/w.npz"),
])
def test_check_weights_path_unwritable(target, match):
    with pytest.raises(OSError, match=match):
        check_weights_path(target)


def test_check_weights_path_leaves_nothing_behind(tmp_path):
    assert check_weights_path(tmp_path / "a" / "b" / "w") == tmp_path / "a" / "b" / "w.npz"
    assert list(tmp_path.iterdir()) == []


def test_save_overwrites_atomically(tmp_path):
    path = model(seed=1).save_weights(tmp_path / "w.npz")
    model(seed=2).save_weights(path)
    m = model()
    m.load_weights(path)
    np.testing.assert_array_equal(m.params["dense.w"], model(seed=2).params["dense.w"])
    assert [p.name for p in tmp_path.iterdir()] == ["w.npz"]


# ---- spec files --------------------------------------------------------------------------------
@pytest.mark.parametrize("name, text, match", [
    ("bad.json", '{"layers": [{"type": "flatten"},]}', r"bad\.json: not valid JSON: .* line 1"),
    ("bad.json", "", r"bad\.json: not valid JSON"),
    ("bad.json", '{"layers": [', r"bad\.json: not valid JSON"),
    ("bad.yaml", "layers: [ {type: flatten}\n", r"bad\.yaml: not valid YAML: .*line 2"),
    ("bad.yaml", "layers:\n  - type: flatten\n - type: dense\n", r"bad\.yaml: not valid YAML"),
    ("bad.yml", "layers: {{{", r"bad\.yml: not valid YAML"),
    ("bad.yaml", "\tlayers: []", r"bad\.yaml: not valid YAML"),
    ("null.yaml", "", r"null\.yaml: a model spec is a list .* Received None"),
    ("scalar.json", "42", r"scalar\.json: a model spec is a list"),
    ("nolayers.json", '{"layer": []}', r"nolayers\.json: a model spec is a list"),
    ("empty.json", '{"layers": []}', r"empty\.json: 'layers' must be a non-empty list"),
    ("str.json", '{"layers": "conv2d"}', r"str\.json: 'layers' must be a non-empty list"),
    ("int.json", '{"layers": [3]}', r"int\.json: layer 0 must be a dict"),
    ("notype.yaml", "layers:\n  - units: 3\n", r"notype\.yaml: layer 0 needs a 'type'"),
    ("typeint.yaml", "layers:\n  - type: 3\n", r"typeint\.yaml: layer 0 needs a 'type'"),
    ("keys.yaml", "layers:\n  - {type: dense, 1: 2}\n", r"keys\.yaml: layer 0: option names"),
    ("name.yaml", "layers:\n  - {type: dense, units: 2, name: [a]}\n", r"name\.yaml: layer 0: name"),
    ("act.yaml", "layers:\n  - {type: dense, units: 2, activation: [relu]}\n", r"act\.yaml: .*activation"),
    ("shape.json", '{"input_shape": [1, -28, 28], "layers": [{"type": "flatten"}]}',
     r"shape\.json: input_shape must be .* Received input_shape=\(1, -28, 28\)"),
    ("opt.yaml", "optimizer: sgd\nlayers: [{type: flatten}]\n", r"opt\.yaml: optimizer must be a dict"),
])
def test_malformed_spec_files_name_the_file(tmp_path, name, text, match):
    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(ValueError, match=match):
        resolve_spec(str(path))
    with pytest.raises(ValueError, match=match):
        Sequential.from_spec(path, input_shape=(1, 8, 8))


def test_binary_spec_file_names_the_file(tmp_path):
    path = tmp_path / "bin.json"
    path.write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(ValueError, match=r"bin\.json: not a text file"):
        resolve_spec(path)


def test_deeply_nested_json_names_the_file(tmp_path):
    path = tmp_path / "deep.json"
    path.write_text("[" * 100000 + "]" * 100000)
    with pytest.raises(ValueError, match="deep.json"):
        resolve_spec(path)


def test_spec_file_round_trip_still_works(tmp_path):
    path = tmp_path / "ok.json"
    path.write_text(json.dumps({"input_shape": [1, 6, 6], "layers": SPEC}))
    m = Sequential.from_spec(path)
    assert m.input_shape == (1, 6, 6) and m.layers[-1].output_shape == (3,)


# ---- input_shape -------------------------------------------------------------------------------
@pytest.mark.parametrize("shape", [(1, -28, 28), (0, 8, 8), (1, 8, 0), (-1,), (), (1, 2.5, 3),
                                   (1, True, 3), ("1", 8, 8)])
def test_bad_input_shape_is_reported_as_such(shape):
    with pytest.raises(ValueError, match=r"input_shape must be a non-empty list of positive "
                                         r"integers .* Received input_shape="):
        Sequential(layers_from_spec(SPEC), shape)
    with pytest.raises(ValueError, match="input_shape") as exc:
        Sequential.from_spec(SPEC, input_shape=shape)
    assert "larger than" not in str(exc.value)


@pytest.mark.parametrize("shape", ["1x28x28", 28, None, {"c": 1}])
def test_input_shape_of_the_wrong_type(shape):
    with pytest.raises((TypeError, ValueError), match="input_shape"):
        Sequential(layers_from_spec(SPEC), shape)


def test_numpy_ints_in_input_shape_are_fine():
    assert Sequential(layers_from_spec(SPEC), np.array([1, 6, 6])
                      .tolist()).input_shape == (1, 6, 6)
    assert Sequential(layers_from_spec(SPEC), tuple(np.int64(v) for v in (1, 6, 6))).input_shape == (1, 6, 6)


def test_input_shape_too_large_for_int64_sizes_is_refused():
    """(2**20)**4 wraps to 0 in int64 arithmetic: it must not build a model with 0 features."""
    with pytest.raises(ValueError, match=r"values per example; at most"):
        Sequential.from_spec([{"type": "flatten"}, {"type": "dense", "units": 2}],
                             input_shape=(2**20,) * 4)


@pytest.mark.parametrize("units", [2**40, 2**62, 2**63, 10**30])
def test_parameters_too_large_to_allocate_name_the_layer(units):
    with pytest.raises(ValueError, match=r"dense 'dense': cannot create its parameters"):
        Sequential.from_spec([{"type": "flatten"}, {"type": "dense", "units": units}],
                             input_shape=(1, 4, 4))
    with pytest.raises(ValueError, match=r"conv2d 'conv2d': cannot create its parameters"):
        Sequential.from_spec([{"type": "conv2d", "filters": units}, {"type": "flatten"},
                              {"type": "dense", "units": 2}], input_shape=(1, 4, 4))


# ---- audit findings (a reliability pass on fa4b133) ----------------------------------------------
def zip_bomb(path, key: str, values: int) -> None:
    """An .npz of the model's weights but ``key``, a float32 array of ``values`` zeros stored
    deflated: about a thousandth of its size on disk."""
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(header, {"descr": "<f4", "fortran_order": False,
                                                  "shape": (values,)})
    chunk = bytes(1 << 24)
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as z:
        with z.open(f"{key}.npy", "w", force_zip64=True) as f:
            f.write(header.getvalue())
            for _ in range(values * 4 // len(chunk)):
                f.write(chunk)
        for k, v in model().get_weights().items():
            if k != key:
                with z.open(f"{k}.npy", "w") as f:
                    np.lib.format.write_array(f, v)


@pytest.fixture(scope="module")
def bomb(tmp_path_factory):
    """512 MiB of zeros under a parameter's name, in a file of about half a megabyte."""
    path = tmp_path_factory.mktemp("bomb") / "bomb.npz"
    zip_bomb(path, "conv2d.w", 1 << 27)
    assert path.stat().st_size < 2 << 20
    return path


@pytest.mark.parametrize("load", ["load_weights", "predict"])
def test_a_zip_bomb_is_refused_before_it_is_decompressed(tmp_path, bomb, load):
    """Audit finding 7: every array of an .npz was decompressed before its names and shapes
    were checked (a 3.9 MB file took 3.9 GB and 20 s before it was refused). Here 512 MiB
    under a parameter's name, loaded with 256 MiB of address space to spare."""
    path = tmp_path / "bomb.npz"
    shutil.copyfile(bomb, path)
    if load == "predict":  # a file with a spec, as train --save writes
        with zipfile.ZipFile(path, "a") as z:
            with z.open("__spec__.npy", "w") as f:
                np.lib.format.write_array(f, np.array(json.dumps(model().spec())))
    call = ("model().load_weights(path)" if load == "load_weights"
            else "__import__('cnn.predict').predict.load_model(path)")
    res = run_python("import json\nfrom cnn.layers import layers_from_spec\n"
                     "from cnn.model import Sequential\n"
                     f"def model():\n    return Sequential(layers_from_spec("
                     f"json.loads({json.dumps(SPEC)!r})), (1, 6, 6))\n"
                     f"path = {str(path)!r}\n"
                     f"try:\n    {call}\nexcept ValueError as err:\n    print(err)\n",
                     256 << 20)
    assert re.search(r"bomb\.npz: weight 'conv2d\.w' has shape \(134217728,\); the model "
                     r"expects \(2, 1, 3, 3\)", res.stdout), res.stdout + res.stderr[-2000:]


def test_a_misspelled_spec_key_is_refused_naming_it(tmp_path):
    """Audit finding 8: a misspelled top-level key (``los:``) was dropped and the default loss
    trained."""
    path = tmp_path / "spec.yaml"
    path.write_text("los: binary_cross_entropy\nlayers:\n  - {type: flatten}\n"
                    "  - {type: dense, units: 1}\n")
    with pytest.raises(ValueError, match=r"spec\.yaml: unknown key 'los' in the model spec "
                                         r"\(did you mean 'loss'\?\)"):
        Sequential.from_spec(path, input_shape=(1, 2, 2))


def test_an_unknown_backend_is_refused_when_the_model_is_built():
    """Audit finding 9: build_model(..., backend="tpu") was accepted and failed only at fit."""
    from cnn.model import build_model
    with pytest.raises(ValueError, match=r"unknown backend 'tpu'; choose one of \[.*'numpy'"):
        build_model(SPEC, input_shape=(1, 6, 6), backend="tpu")


def test_batch_norm_momentum_one_is_refused():
    """Audit finding 9: momentum=1.0 was accepted, and the running statistics never moved."""
    with pytest.raises(ValueError, match=r"momentum must be in \[0, 1\)\. Received "
                                         r"momentum=1\.0"):
        layers_from_spec([{"type": "batchnorm", "momentum": 1.0}])
